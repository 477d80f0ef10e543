"""The VM runner, ``vcluster internal vm``: one SLURM task per VM, as the job's user.

It gets its devices from the host agent, prepares the VM's files (``workdir``,
``guest`` for the seed, ``machine`` for the QEMU command line), starts QEMU as
its own child (``runner``), drives it over QMP (``control``), watches the
serial log for readiness (``readiness``), publishes every state change
(``state``) and relays consoles (``console``).  ``command`` holds the click
commands and imports the rest only when they run.
"""
