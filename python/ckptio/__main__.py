"""``python -m ckptio``: the command line (see ckptio.cli)."""

import sys

from .cli import main

sys.exit(main())
