"""leanconv: make convolutional networks physically smaller and measurably faster."""

from leanconv.errors import LeanconvError

__version__ = "0.1.0"
__all__ = ["LeanconvError", "__version__"]
