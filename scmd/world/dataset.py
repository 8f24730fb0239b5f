"""The dataset writer: the scenes of every (env, class, index) and ``ensure_dataset`` (DomainBed layout)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from scmd.world.render import Scene, backdrop_of, render
from scmd.world.spec import (
    CLASSES,
    COLOUR_NAMES,
    DATASET_DIRNAME,
    ENVIRONMENTS,
    IMAGES_PER_CLASS_RANGE,
    MARKER_NAME,
    NUISANCE_STRENGTH,
    PATTERNS,
    WORLD_VERSION,
)

# ---------------------------------------------------------------------------------------------------------
# The dataset (DomainBed layout)


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from any repr-able values, identical on every machine and Python version."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") % 2**31


def class_count(env: str, cls: str) -> int:
    lo, hi = IMAGES_PER_CLASS_RANGE
    return int(np.random.RandomState(stable_seed(WORLD_VERSION, "count", env, cls)).randint(lo, hi + 1))


def dataset_scene(env: str, class_index: int, index: int) -> Scene:
    """Scene of image ``index`` of class ``class_index`` in ``env`` (a pure function of its arguments)."""
    cls = CLASSES[class_index]
    r = np.random.RandomState(stable_seed(WORLD_VERSION, "scene", env, cls, index))
    if r.rand() < NUISANCE_STRENGTH[env]:  # the env's spurious backdrop for this class
        pattern, colour = backdrop_of(env, class_index)
    else:
        pattern, colour = PATTERNS[r.randint(len(PATTERNS))], COLOUR_NAMES[r.randint(len(COLOUR_NAMES))]
    return Scene(cls, env, pattern, colour, seed=int(r.randint(2**31)))


def _marker_text(n_per_class: Optional[int]) -> str:
    return f"{WORLD_VERSION}\nn_per_class={'default' if n_per_class is None else n_per_class}\n"


def _is_complete(root: Path, n_per_class: Optional[int]) -> bool:
    try:
        return (root / MARKER_NAME).read_text() == _marker_text(n_per_class)
    except OSError:
        return False


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # no timestamps or other varying chunks
    return buf.getvalue()


def dataset_dirname(n_per_class: Optional[int] = None) -> str:
    """The full world's folder, or ``embedded_world_n<N>`` for a subset, so that runs of different sizes
    sharing a --data-dir never replace each other's images (a run may still be reading them)."""
    return DATASET_DIRNAME if n_per_class is None else f"{DATASET_DIRNAME}_n{n_per_class}"


def ensure_dataset(data_dir: Union[str, Path], progress: bool = True, n_per_class: Optional[int] = None) -> Path:
    """Generate ``<data_dir>/embedded_world/<env>/<class>/<index>.png`` unless a complete copy of this
    version is there; return the dataset folder. ``n_per_class`` (tests, quick checks) writes only the first
    n images of every (env, class), the same images as in the full world, into ``embedded_world_n<n>``.

    Generation writes into a temporary sibling folder that is renamed into place only when complete (the
    marker file is its last file), so an interrupted run never leaves a half world behind, and a stale
    or partial folder is replaced."""
    data_dir = Path(data_dir)
    name = dataset_dirname(n_per_class)
    root = data_dir / name
    if _is_complete(root, n_per_class):
        return root
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = [(env, ci, i) for env in ENVIRONMENTS for ci, cls in enumerate(CLASSES)
            for i in range(class_count(env, cls) if n_per_class is None else n_per_class)]
    from tqdm import tqdm

    try:
        for env in ENVIRONMENTS:
            for cls in CLASSES:
                (tmp / env / cls).mkdir(parents=True)
        for env, ci, i in tqdm(jobs, desc=f"generating {name}", unit="img", disable=not progress,
                               mininterval=1.0):
            img, _ = render(dataset_scene(env, ci, i))
            (tmp / env / CLASSES[ci] / f"{i:05d}.png").write_bytes(png_bytes(img))
        (tmp / MARKER_NAME).write_text(_marker_text(n_per_class))
        if _is_complete(root, n_per_class):  # another process finished first
            shutil.rmtree(tmp)
            return root
        if root.exists():  # stale or partial: move aside, then swap in the new world
            old = data_dir / f".{name}.old-{os.getpid()}"
            root.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_complete(root, n_per_class):  # lost a rename race to a complete world: fine
            return root
        raise
    return root


