"""fastsel: CPU-side helpers for SCMD (dataset indexing, prompt batching, hard-sample selection)."""

from fastsel._fastsel import __version__

__all__ = ["__version__"]
