"""``python -m dip_fast``: the ``dip-fast`` command line (see :mod:`dip_fast.apps.cli`)."""
import sys

from .apps.cli import main

sys.exit(main())
