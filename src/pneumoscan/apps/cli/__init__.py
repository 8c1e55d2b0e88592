"""The ``pneumoscan`` command line: :mod:`.main` routes, one module per command group holds each command's
parser beside its runner (:mod:`.training`, :mod:`.model`, :mod:`.site`, :mod:`.scoring`, :mod:`.serving`),
and :mod:`.common` the arguments they share."""

from pneumoscan.apps.cli.main import main

__all__ = ["main"]
