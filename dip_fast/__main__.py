"""``python -m dip_fast``: the ``dip-fast`` command line (see :mod:`dip_fast.cli`)."""
import sys

from .cli import main

sys.exit(main())
