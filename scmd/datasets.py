"""The dataset table: each dataset's DomainBed protocol and defaults (folder, domains, steps, evaluation
frequency, image size, default student and teacher with their weights, lr, how the folder is prepared).
Everything that differs between datasets lives here, so that scmd_ref.py never names a dataset.
Imports no torch (settings are checked before torch loads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from scmd import world
from scmd.errors import UsageError


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset's protocol and defaults: everything that differs between datasets lives here."""

    folder: str  # directory under --data-dir
    domainbed_name: str  # DomainBed's dataset class name (written to results.jsonl)
    envs: Sequence[str]  # expected env folders, sorted
    steps: int = 5001  # training steps (docs/algorithm.md §7.5)
    checkpoint_freq: int = 300  # evaluate every N steps (docs/algorithm.md §7.5)
    image_size: int = 224  # input size of student and teacher
    student: str = "resnet50"  # --student default
    student_weights: str = "v2"  # --student-weights default (torchvision's DEFAULT, as the authors)
    teacher: str = "ViT-B-32-quickgelu"  # open_clip model name
    teacher_weights: str = "openai"  # open_clip pretrained tag or a local file
    lr: float = 5e-5  # default lr (the spec's; its random search is scaled alike)
    in_memory: bool = False  # decode every image once and augment whole batches as tensors (scmd.augment)
    generate: Optional[Callable[..., Path]] = None  # makes the folder: (data_dir, progress, n_per_class) -> root;
    # None: the folder must exist (or be fetched with --download)


DATASETS = {
    "embedded": DatasetInfo(
        world.DATASET_DIRNAME, "EmbeddedWorld", tuple(world.ENVIRONMENTS), image_size=world.IMAGE_SIZE,
        student=world.STUDENT_NAME, student_weights=str(world.STUDENT_WEIGHTS), teacher=world.TEACHER_MODEL_NAME,
        teacher_weights=str(world.TEACHER_WEIGHTS), lr=world.LR, in_memory=True, generate=world.ensure_dataset,
    ),
    "vlcs": DatasetInfo("VLCS", "VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007")),
    "pacs": DatasetInfo("PACS", "PACS", ("art_painting", "cartoon", "photo", "sketch")),
    "officehome": DatasetInfo("office_home", "OfficeHome", ("Art", "Clipart", "Product", "Real World")),
    "terraincognita": DatasetInfo(
        "terra_incognita", "TerraIncognita", ("location_100", "location_38", "location_43", "location_46")
    ),
    "domainnet": DatasetInfo(
        "domain_net", "DomainNet", ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
        checkpoint_freq=1000,
    ),
}
DATASET_ALIASES = {"office_home": "officehome", "terra_incognita": "terraincognita", "domain_net": "domainnet"}


def canonical_dataset(name: str, known: Sequence[str]) -> str:
    key = name.lower().replace("-", "")
    key = DATASET_ALIASES.get(key, key)
    if key not in known:
        raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(known)}")
    return key
