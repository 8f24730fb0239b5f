"""``PromptTokenizer``: open_clip's text cleaning in Python, CLIP BPE in Rust (``_fastsel.ClipBpe``).

open_clip's ``SimpleTokenizer(clean='lower')`` cleans each text with ``ftfy.fix_text``, ``html.unescape``
(twice), whitespace clean-up and ``str.lower``; this module does exactly that and hands the cleaned text to
the Rust tokenizer, so the ids are open_clip's for any text whose cleaned form holds only code points assigned in
Python's Unicode database (beyond it, Python's ``regex`` and Rust's ``regex`` may disagree on what is a letter:
ftfy can turn mojibake such as ``"Ö\x8b"`` into U+058B; see tests/test_fastsel_prompts.py).
"""

from __future__ import annotations

import html
from typing import Callable, Iterable, List, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

from fastsel._fastsel import ClipBpe

_fix_text: Optional[Callable[[str], str]] = None


def _ftfy_fix_text(text: str) -> str:
    global _fix_text
    if _fix_text is None:
        try:
            import ftfy
        except ImportError as e:  # pragma: no cover - ftfy comes with open_clip
            raise ImportError(
                "fastsel.PromptTokenizer needs ftfy (a dependency of open_clip) to clean text that is not "
                "printable ASCII without '&'"
            ) from e
        _fix_text = ftfy.fix_text
    return _fix_text(text)


def clean_lower(text: str) -> str:
    """open_clip's ``_clean_lower``: ``ftfy.fix_text``, ``html.unescape`` twice, whitespace runs to one space
    (stripped), ``str.lower``.

    Printable ASCII without ``&`` skips ftfy and ``html.unescape``: neither changes such text (ftfy's fixes
    need non-ASCII characters, control characters, ``\\r`` or an ``&`` entity; ``html.unescape`` needs ``&``).
    """
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = html.unescape(html.unescape(_ftfy_fix_text(text)))
    return " ".join(text.split()).lower()


def _clean_all(texts: Union[str, Iterable[str]]) -> List[str]:
    if isinstance(texts, str):
        return [clean_lower(texts)]
    try:
        items = iter(texts)
    except TypeError:
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}") from None
    out = []
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        out.append(clean_lower(text))
    return out


class PromptTokenizer(ClipBpe):
    """open_clip ``SimpleTokenizer`` (ViT-B-32 settings) reproduced exactly (on the text of the module docstring).

    ``PromptTokenizer(bpe_path=None)``: ``bpe_path`` defaults to open_clip's installed
    ``bpe_simple_vocab_16e6.txt.gz``; a missing file raises FileNotFoundError (PermissionError, OSError for
    other I/O failures), a file that is not a gzip of UTF-8 text ValueError, each naming the path.
    Properties ``bpe_path``, ``vocab_size``, ``sot_token_id``, ``eot_token_id`` come from ``ClipBpe``.
    """

    __slots__ = ()

    def tokenize(self, texts: Union[str, Sequence[str]], context_length: int = 77) -> npt.NDArray[np.int64]:
        """``open_clip.get_tokenizer('ViT-B-32')(texts, context_length)`` as an int64 array
        ``[len(texts), context_length]`` (too long: first ``context_length`` ids, end token last).
        ``context_length >= 1``; a text that is not a str raises TypeError."""
        return self.tokenize_clean(_clean_all(texts), context_length)
