"""The sandbox: munge, etcd, slurmctld and N SLURM hosts in network namespaces on one machine.

``lifecycle`` brings it up and down, ``use`` runs commands in it and reports
its status; the state file (``state``) ties the commands together.
"""
