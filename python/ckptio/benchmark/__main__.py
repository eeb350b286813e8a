"""``python -m ckptio.benchmark``: see :func:`ckptio.benchmark.main`."""

import sys

from . import main

sys.exit(main())
