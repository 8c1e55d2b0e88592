"""``python -m pneumoscan.apps.cli``: the same command as ``pneumoscan`` (the benchmarks start servers so)."""

import sys

from pneumoscan.apps.cli.main import main

sys.exit(main())
