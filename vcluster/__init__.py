"""vcluster: private clusters of virtual machines inside batch jobs."""

__version__ = "0.1.0"
