"""``python -m vcluster.agent``: the same as ``vcluster-agent``."""

import sys

from vcluster.agent.main import main

sys.exit(main())
