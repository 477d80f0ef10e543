"""VM images: recipes, builders (debootstrap disks, busybox initramfs) and repositories."""
