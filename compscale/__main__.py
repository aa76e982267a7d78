"""``python -m compscale``: the same as the ``compscale`` command."""

import sys

from compscale.cli import main

sys.exit(main())
