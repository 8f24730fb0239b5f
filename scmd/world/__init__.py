"""The embedded offline world: a synthetic multi-domain image dataset, a tiny CLIP teacher and a small
pretrained student backbone, all generated and trained by this project (nothing is downloaded).

Commands (from the repository root, in the venv):

    python -m scmd.world build            # retrain both checkpoints in assets/ (fixed seeds, ~15 min, 2 cores)
    python -m scmd.world check [--erm]    # the world's design criteria, measured (--erm: run ERM for the last)
    python -m scmd.world generate DATA    # write DATA/embedded_world (DomainBed layout) if not there yet

The dataset ("embedded_world", DomainBed folder layout ``<env>/<class>/<index>.png``):

* Objects of ``CLASSES`` drawn procedurally from parts (polygons and strokes) with random position,
  scale, rotation, aspect, flip, colours and shape variants, small distractor objects (clutter) and
  random occluders.
* Four styles, one per env (``ENVIRONMENTS``): flat ``cartoon`` (flat fills, thick black outlines),
  blurred ``painting`` (brush strokes, blur, colour cast), textured ``photo`` (shading, drop shadow,
  cluttered background, sensor noise) and ``sketch`` (pencil outlines and hatching on notebook paper).
* A nuisance factor that predicts the label inside a domain: the backdrop (background pattern + hue).
  Each env maps every class to its own backdrop (different in every env) and follows this mapping for
  a fraction ``NUISANCE_STRENGTH[env]`` of its images; the rest get a random backdrop. A shortcut
  learned on the source envs therefore fails on the held-out env.

The teacher (``TEACHER_MODEL_NAME``) is an open_clip ``CLIP`` with a small ModifiedResNet image tower,
pretrained contrastively on captioned images from the same renderer with FAR more variety (extra
classes, extra styles, nuisances independent of the class). The student (``build_student``) is a narrow
torchvision ResNet-18 pretrained by supervised CE on the extra classes only, photo style only.
Modules: ``spec`` (the fixed facts), ``render``, ``dataset`` (the writer), ``models`` (teacher config, student);
``pretrain`` (the pretraining, never imported at run time) and ``__main__`` (the commands).
"""

from __future__ import annotations

from scmd.world.dataset import (  # noqa: F401 - the package's interface
    _is_complete,
    _marker_text,
    class_count,
    dataset_dirname,
    dataset_scene,
    ensure_dataset,
    png_bytes,
    stable_seed,
)
from scmd.world.models import (  # noqa: F401 - the package's interface
    _narrow_resnet_class,
    build_student,
    load_teacher,
    register_teacher_config,
    save_compact,
    teacher_config,
)
from scmd.world.render import (  # noqa: F401 - the package's interface
    _MAX_ROT,
    ALL_CLASSES,
    SHAPES,
    P,
    Part,
    Scene,
    _apple,
    _arrow,
    _background,
    _balloon,
    _bell,
    _bottle,
    _candle,
    _car,
    _clock,
    _cloud,
    _cup,
    _draw_object,
    _fish,
    _flower,
    _heart,
    _house,
    _joint,
    _key,
    _kite,
    _ladder,
    _lightning,
    _lowfreq,
    _mask,
    _moon,
    _mushroom,
    _place,
    _PxPart,
    _random_parts,
    _resolve_colour,
    _rocket,
    _sailboat,
    _snowman,
    _star,
    _sun,
    _tent,
    _traffic_light,
    _tree,
    _umbrella,
    _union,
    backdrop_of,
    colour_name,
    ell,
    hsv,
    hue_distance,
    poly,
    rect,
    render,
)
from scmd.world.spec import (  # noqa: F401 - the package's interface
    ASSETS_DIR,
    CHECKED_PROMPT,
    CLASSES,
    COLOUR_NAMES,
    DATASET_DIRNAME,
    DATASET_STYLES,
    ENVIRONMENTS,
    EXTRA_CLASSES,
    EXTRA_STYLES,
    IMAGE_SIZE,
    LR,
    MARKER_NAME,
    NUISANCE_STRENGTH,
    PATTERNS,
    RENDER_SIZE,
    STUDENT_ARCH,
    STUDENT_NAME,
    STUDENT_WEIGHTS,
    STUDENT_WIDTHS,
    TEACHER_MODEL_NAME,
    TEACHER_WEIGHTS,
    WORLD_VERSION,
)
