"""The ``laplace-vlm`` command line."""

from laplace_vlm.cli.main import main

__all__ = ["main"]
