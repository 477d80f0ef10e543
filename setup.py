"""vcluster: clusters of virtual machines inside batch jobs."""

from glob import glob

from setuptools import find_packages, setup

setup(
    name="vcluster",
    version="0.1.0",
    description="Private clusters of virtual machines inside SLURM jobs",
    python_requires=">=3.11",
    packages=find_packages(include=["vcluster", "vcluster.*"]),
    package_data={"vcluster": ["py.typed", "images/recipes/*.yaml", "images/recipes/**/*"]},
    data_files=[
        ("share/vcluster/etc/vcluster", glob("etc/vcluster/*.yaml")),
        ("share/vcluster/slurm", glob("slurm/*")),
        ("share/vcluster/systemd", glob("systemd/*")),
    ],
    install_requires=[
        "click>=8.1",
        "pyyaml>=6.0",
        "pycdlib>=1.14",
        "etcd-sdk-python>=0.0.7",
        "protobuf>=4",
        "grpcio>=1.60",
        "qemu.qmp>=0.0.3",
        # pyroute2 as its own minimal distribution (the same package, without NDB, IPDB,
        # NSPopen, plan9 and ethtool): half the import, which root's local cluster waits for
        "pyroute2-minimal>=0.9",
    ],
    extras_require={
        "test": ["pytest>=7", "mypy>=1.10", "ruff>=0.5", "types-PyYAML", "types-protobuf"],
        # persistent clusters (vcluster cluster): builds against libvirt-dev and pkg-config
        "libvirt": ["libvirt-python>=9.0"],
    },
    entry_points={
        "console_scripts": [
            "vcluster = vcluster.cli.main:main",
            "vcluster-agent = vcluster.agent.main:main",
        ],
    },
)
