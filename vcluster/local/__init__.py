"""The local backend: clusters on this machine alone, without SLURM (``batch.backend: local``).

The launcher of ``vcluster.launch`` runs here in the user's own process
instead of inside salloc, with the machine as its one host; it starts the
same VM runners itself (``local.step``), under a job id taken from the store
(``local.registry``).  As root the agent's code runs in the launcher
(``vcluster.agent.local``: taps, bridges, NAT, FAM, one undo log); as a
normal user nothing of root's is used (``local.rootless``: a user-space
switch per private network, QEMU's user-mode NAT, FAM in the user's run
directory).  Whatever a killed launcher left is removed by the next
vcluster command (``local.reconcile``).
"""
