"""``python -m pneumoscan`` runs the ``pneumoscan`` command."""

from pneumoscan.apps.cli import main

raise SystemExit(main())
