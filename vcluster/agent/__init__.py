"""The host agent, ``vcluster-agent``: the only privileged part of vcluster.

One per host (root). It serves a unix socket (``server``) with a small,
versioned request schema (``protocol``), proves who calls (``peer``), creates
a job's bridges, taps and FAM regions (``netdev``, ``fam``, ``jobs``) within
the site's limits read from its own configuration (``policy``), joins a
private network's bridges across the job's hosts (VXLAN ids from the store:
``vnis``; peers, addresses and underlay: ``tunnel``; the VXLAN device:
``netdev``; its source filter in nftables: ``firewall``), records all of it
in a per-job undo log (``undo``) that ``release`` and the reconcile pass
(``reconcile``) walk back, registers its host in the store
(``registration``) and hands out etcd credentials (``credentials``).
``client`` is the client the VM runner and the SLURM scripts use; it and
``protocol`` (typed requests and answers, through ``vcluster.codec``) are
the agent's public face and import nothing beyond the standard library, the
codec and the error tree.

This package's ``__init__`` imports nothing: the client is imported in every
VM runner.
"""
