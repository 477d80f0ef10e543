#!/usr/bin/env bash
# vcluster on one machine, from nothing: install what it needs, build the tiny image,
# then run the main job on the embedded default (no SLURM, no etcd, no /etc/vcluster):
# two VMs sharing a FAM region, vm0 writes to it and vm1 reads it back.
#
#   bash quickstart.sh      # as root (a fresh Debian has no sudo), or as a user with sudo
#
# As root the cluster gets taps and a bridge from the agent's code in the launcher; as a
# normal user it is rootless (a user-space switch, QEMU's user-mode NAT). Each step is
# printed with the time it started. Safe to run again: what is there is reused.
set -euo pipefail
cd "$(dirname "$0")"

venv="${VCLUSTER_VENV:-/opt/vcluster/venv}"
bindir="${VCLUSTER_BIN:-/usr/local/bin}"
started=$(date +%s)
step() { printf '\n[%4ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null; then
    as_root=(sudo)
else
    echo "quickstart: installing needs root: run it as root, or as a user with sudo" >&2
    exit 1
fi

step "system packages (apt-get)"
packages=(
    qemu-system-x86 qemu-utils          # the VMs (KVM if it works, else TCG)
    busybox-static cpio zstd e2fsprogs  # image builds
    vde2 util-linux iproute2            # networks (a normal user's: vde_switch), setpriv
    nftables python3-nftables           # the agent's packet filter (root's clusters)
    openssh-client python3 python3-venv
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    echo "all present"
fi

step "vcluster in $venv, on the PATH as $bindir/vcluster"
[ -x "$venv/bin/python3" ] || "${as_root[@]}" /usr/bin/python3 -m venv "$venv"
# pyroute2-minimal (setup.py) and an earlier install's full pyroute2 are the same package:
# the full one goes first, or the two would mix their files.
if "$venv/bin/python3" -m pip show pyroute2 >/dev/null 2>&1; then
    "${as_root[@]}" "$venv/bin/python3" -m pip uninstall -y -q pyroute2
fi
"${as_root[@]}" "$venv/bin/python3" -m pip install -q --disable-pip-version-check .
"${as_root[@]}" "$venv/bin/python3" -m pip install -q --disable-pip-version-check \
    --no-deps --force-reinstall .
site=$("$venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
"${as_root[@]}" ln -sfn /usr/lib/python3/dist-packages/nftables "$site/nftables"
"${as_root[@]}" chmod -R a+rX "$venv"
for program in vcluster vcluster-agent; do
    "${as_root[@]}" ln -sfn "$venv/bin/$program" "$bindir/$program"
done
hash -r
vcluster --version

step "vcluster doctor"
vcluster doctor

step "the tiny image (vcluster image build tiny; reused when up to date)"
# Builds need root (chroot, device nodes); root's go to the site repository.
"${as_root[@]}" "$bindir/vcluster" image build tiny

step "the main job: vcluster alloc tiny-fam:2, vm0 writes the FAM region, vm1 reads it"
vcluster alloc -E 'vcluster exec vm0 -- fam write 8 0xc0ffee &&
    echo "vm1 reads what vm0 wrote: $(vcluster exec vm1 -- fam read 8)"' tiny-fam:2

step "done: the cluster is gone, nothing is left (vcluster ps: $(vcluster ps 2>&1))"
