"""Type stub of the Rust extension ``fastsel._fastsel`` (re-exported by ``fastsel``).

Array arguments must be numpy arrays of the stated dtype, 1-D and C-contiguous; they are read
in place (zero copy). A wrong type or dtype raises TypeError, a wrong shape/layout or value
raises ValueError, with a message that names the argument. Work on large inputs runs with the
GIL released.
"""

import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Union, final

import numpy as np
import numpy.typing as npt
from typing_extensions import Self, disjoint_base

__all__ = ["ClipBpe", "Tracker", "__version__", "index_domainbed", "topk_desc", "topk_per_domain"]
__version__: str

_StrPath = Union[str, "os.PathLike[str]"]

# --- selection ------------------------------------------------------------------------------

def topk_desc(losses: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.int64]:
    """``torch.sort(losses, descending=True, stable=True).indices[:k]``.

    NaN ranks largest (all NaNs first, in position order), then +inf, finite values, -inf;
    -0.0 and +0.0 tie; ties keep ascending position. ``0 <= k <= len(losses)``.
    """

def topk_per_domain(
    losses: npt.NDArray[np.float32], domain_ids: npt.NDArray[np.int64], p: float
) -> npt.NDArray[np.int64]:
    """For each domain id present (ascending), the top ``int(n_d * p)`` row positions of that
    domain in ``topk_desc`` order; the groups concatenated."""

# --- tracker --------------------------------------------------------------------------------

@final
class Tracker:
    """Bookkeeping of one run. With fresh selection losses purely observational; with stale ones
    (``record_kept``) ``last_loss`` is what the next selecting steps rank by.

    ``tests/tracker_oracle.py`` is the numpy oracle (same arrays bit for bit, same JSON).
    """

    def __new__(cls, n_samples: int, n_domains: int, window: int = 100, ema: float = 0.9) -> Self: ...
    @property
    def n_samples(self) -> int: ...
    @property
    def n_domains(self) -> int: ...
    @property
    def window(self) -> int: ...
    @property
    def ema(self) -> float: ...
    @property
    def n_records(self) -> int: ...
    def record(
        self,
        step: int,
        sample_ids: npt.NDArray[np.int64],
        domain_ids: npt.NDArray[np.int64],
        losses: npt.NDArray[np.float32],
        kept: npt.NDArray[np.int64],
    ) -> None:
        """Records one step of N rows; ``kept`` holds distinct row positions in ``[0, N)``.

        ``step >= 0``; ids must be in range and a sample keeps one domain for the whole run.
        Everything is validated before anything changes.
        """
    def record_kept(
        self,
        step: int,
        sample_ids: npt.NDArray[np.int64],
        domain_ids: npt.NDArray[np.int64],
        kept: npt.NDArray[np.int64],
        kept_losses: npt.NDArray[np.float32],
    ) -> None:
        """Records one step of N rows of which only the kept rows carry a loss: ``kept_losses[j]``
        is row ``kept[j]``'s. Every row counts as seen, the kept rows as selected; only the kept
        rows' ``last_loss`` and ``ema_loss`` change. Validated as ``record``."""
    def times_seen(self) -> npt.NDArray[np.int64]: ...
    def times_selected(self) -> npt.NDArray[np.int64]: ...
    def times_scored(self) -> npt.NDArray[np.int64]:
        """Losses recorded per sample (``times_seen`` when every row carried its loss)."""
    def last_loss(self) -> npt.NDArray[np.float32]:
        """Latest recorded loss of each sample; NaN where none was recorded."""
    def ema_loss(self) -> npt.NDArray[np.float64]:
        """First loss, then ``ema * prev + (1 - ema) * loss`` per recorded loss; NaN where none.
        Any NaN is stored as the canonical quiet NaN (its bits do not depend on the arithmetic)."""
    def sample_domain(self) -> npt.NDArray[np.int64]:
        """Domain of each sample, -1 where never seen."""
    def window_rows_seen(self) -> npt.NDArray[np.int64]:
        """Rows seen, shape ``[n_windows, n_domains]``, window = ``step // window``."""
    def window_rows_kept(self) -> npt.NDArray[np.int64]:
        """Rows kept, shape ``[n_windows, n_domains]``."""
    def report_json(self, top: int = 10) -> str:
        """JSON report: settings, per-domain totals and kept share, per-window per-domain kept
        share (windows with rows only), and per domain the ``top`` hardest scored samples by
        ``ema_loss`` (NaN first, then descending, ties by lower id). Non-finite floats are the
        strings "NaN"/"Infinity"/"-Infinity"; an undefined share is null."""
    def state_dict(self) -> Dict[str, Union[np.ndarray, int, float]]: ...
    def load_state_dict(self, state: Dict[str, Union[np.ndarray, int, float]]) -> None:
        """Restores an exact state taken from a tracker with the same settings (state version 1,
        from before ``times_scored``, loads with ``times_scored = times_seen``)."""

# --- dataset indexing -----------------------------------------------------------------------

def index_domainbed(root: _StrPath) -> Dict[str, list]:
    """Index a DomainBed root (``~`` expanded).

    Returns ``{"envs": [env, ...], "classes": [class, ...], "paths": [[path, ...] per env],
    "labels": [int64 array per env]}``: envs are the sorted directories of ``root``, classes the
    sorted class folders (identical in every env), and each env's samples are exactly
    ``torchvision.datasets.ImageFolder(os.path.join(root, env)).samples``.

    Raises FileNotFoundError (missing root, no env folders, an env without class folders, an
    env or class folder without images, like ImageFolder), NotADirectoryError (root is a file),
    ValueError (class folders differ between envs), PermissionError (unreadable folder) and
    OSError (symlink loop, other I/O errors); messages name the path. The first env (in sorted
    order) that fails decides, checked as ImageFolder on it would: no class folder, a class
    without images, then class folders that differ from the first env's
    (``scmd.data.index_imagefolder`` is the reference).
    """

# --- prompts --------------------------------------------------------------------------------

@disjoint_base
class ClipBpe:
    """CLIP's BPE exactly as open_clip's ``SimpleTokenizer`` (ViT-B-32 settings) applies it to text that is
    already cleaned; ``fastsel.PromptTokenizer`` subclasses it and does open_clip's cleaning first.

    Built with HuggingFace ``tokenizers``: a ``Split`` pre-tokenizer with open_clip's regex, a ``ByteLevel``
    step and a ``BPE`` model (end-of-word suffix ``</w>``) over open_clip's vocabulary. Any text is accepted.
    """

    def __new__(cls, bpe_path: Optional[_StrPath] = None) -> Self:
        """``bpe_path`` defaults to open_clip's installed ``bpe_simple_vocab_16e6.txt.gz``. A missing file
        raises FileNotFoundError (PermissionError / OSError for other I/O failures), a file that is not a
        gzip of UTF-8 text ValueError; the message names the path."""
    @property
    def bpe_path(self) -> Path: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def sot_token_id(self) -> int: ...
    @property
    def eot_token_id(self) -> int: ...
    def tokenize_clean(
        self, texts: Union[str, Sequence[str]], context_length: int = 77
    ) -> npt.NDArray[np.int64]:
        """Ids of texts already cleaned like open_clip's ``_clean_lower`` (``fastsel._prompts.clean_lower``),
        int64 ``[len(texts), context_length]``: start token, BPE ids, end token, zero padding; too long:
        the first ``context_length`` ids with the end token last. ``context_length >= 1``."""
