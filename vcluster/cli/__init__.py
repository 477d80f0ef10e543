"""The ``vcluster`` command line: a lazy click group whose commands load on demand."""
