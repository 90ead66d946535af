"""``python -m slmfleet ...``: the same as the ``slmfleet`` command."""

import sys

from slmfleet.cli import main

sys.exit(main())
