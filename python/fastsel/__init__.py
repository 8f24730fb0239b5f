"""fastsel: CPU-side helpers for SCMD (dataset indexing, prompt tokenisation, hard-sample selection).

Implemented in Rust (``fastsel._fastsel``; see ``_fastsel.pyi`` for the API and the exactness contracts), except
the text cleaning of ``PromptTokenizer``, which stays in Python like open_clip's (``fastsel._prompts``).
"""

from __future__ import annotations

from fastsel._fastsel import (
    Tracker,
    __version__,
    index_domainbed,
    topk_desc,
    topk_per_domain,
)
from fastsel._prompts import PromptTokenizer

__all__ = [
    "PromptTokenizer",
    "Tracker",
    "__version__",
    "index_domainbed",
    "topk_desc",
    "topk_per_domain",
]
