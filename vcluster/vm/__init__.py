"""The VM runner, ``vcluster internal vm``: one SLURM task per VM, as the job's user.

It gets its devices from the host agent, prepares the VM's files (``workdir``,
``disks`` for the overlay and extra disks, ``guest`` for the seed, ``machine``
for the QEMU command line), starts and ends QEMU as its own child
(``process``), drives it over QMP (``control``), watches the serial log for
readiness (``readiness``), publishes every state change (``state``) and
relays consoles (``console``); ``runner`` strings these phases together.
``command`` holds the click commands and imports the rest only when they run.
"""
