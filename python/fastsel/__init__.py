"""fastsel: CPU-side helpers for SCMD (dataset indexing, prompt batching, hard-sample selection).

Everything except :func:`seed_hash` is implemented in Rust (``fastsel._fastsel``); see
``_fastsel.pyi`` for the full API and the exactness contracts.
"""

from __future__ import annotations

import hashlib

from fastsel._fastsel import (
    DEFAULT_CONTEXT_LENGTH,
    IMAGENET_TEMPLATES,
    IMG_EXTENSIONS,
    SCMD_TEMPLATE,
    PromptTokenizer,
    Tracker,
    __version__,
    _noop,
    index_domainbed,
    kept_count,
    legacy_shuffle,
    split_in_out,
    topk_desc,
    topk_per_domain,
)


def seed_hash(*args: object) -> int:
    """DomainBed's ``seed_hash``: ``int(md5(str(args)).hexdigest(), 16) % 2**31``."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


__all__ = [
    "DEFAULT_CONTEXT_LENGTH",
    "IMAGENET_TEMPLATES",
    "IMG_EXTENSIONS",
    "SCMD_TEMPLATE",
    "PromptTokenizer",
    "Tracker",
    "__version__",
    "_noop",
    "index_domainbed",
    "kept_count",
    "legacy_shuffle",
    "seed_hash",
    "split_in_out",
    "topk_desc",
    "topk_per_domain",
]
