"""``python -m vcluster``: the same as the ``vcluster`` command."""

from vcluster.cli.main import main

main()
