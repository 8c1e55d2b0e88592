"""pneumoscan: pneumonia detection on chest X-rays.

Importing the package stays light (no PyTorch) so that the inference path and
the web service start fast and small; training code imports torch on its own.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pneumoscan")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
