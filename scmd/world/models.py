"""The world's models: the tiny open_clip teacher's config and the narrow torchvision ResNet-18 student."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

from scmd.world.spec import (
    EXTRA_CLASSES,
    STUDENT_ARCH,
    STUDENT_WEIGHTS,
    STUDENT_WIDTHS,
    TEACHER_CONFIG_FILE,
    TEACHER_MODEL_NAME,
    TEACHER_WEIGHTS,
)

# ---------------------------------------------------------------------------------------------------------
# Teacher: open_clip config registration


def teacher_config() -> dict:
    return json.loads(TEACHER_CONFIG_FILE.read_text())


def register_teacher_config() -> None:
    """Make ``TEACHER_MODEL_NAME`` known to open_clip (idempotent)."""
    import open_clip

    if TEACHER_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(TEACHER_CONFIG_FILE)


def load_teacher(weights: Union[str, Path, None] = None, device: str = "cpu"):
    """(model in eval mode, tokenizer) loaded the way scmd_ref.py does it."""
    import open_clip

    register_teacher_config()
    weights = Path(TEACHER_WEIGHTS if weights is None else weights)
    if not weights.is_file():
        raise FileNotFoundError(f"teacher weights {weights} are missing; rebuild them with "
                                f"`python -m scmd.world build`")
    model, _, _ = open_clip.create_model_and_transforms(TEACHER_MODEL_NAME, pretrained=str(weights), device=device)
    return model.eval(), open_clip.get_tokenizer(TEACHER_MODEL_NAME)


# ---------------------------------------------------------------------------------------------------------
# Student: a narrow ResNet-18 from torchvision's own building blocks


def _narrow_resnet_class():
    import torch.nn as nn
    from torchvision.models.resnet import BasicBlock, ResNet

    class NarrowResNet18(ResNet):
        """torchvision ResNet-18 with stage widths ``STUDENT_WIDTHS`` (forward, blocks and init are
        torchvision's; only the hard-coded widths 64-128-256-512 of ``ResNet.__init__`` differ)."""

        def __init__(self, num_classes: int, widths: Sequence[int] = STUDENT_WIDTHS) -> None:
            nn.Module.__init__(self)
            self._norm_layer = nn.BatchNorm2d
            self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._make_layer(BasicBlock, widths[0], 2)
            self.layer2 = self._make_layer(BasicBlock, widths[1], 2, stride=2)
            self.layer3 = self._make_layer(BasicBlock, widths[2], 2, stride=2)
            self.layer4 = self._make_layer(BasicBlock, widths[3], 2, stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)
            for m in self.modules():  # torchvision's initialisation
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

    return NarrowResNet18


def build_student(weights: Union[str, Path, None] = STUDENT_WEIGHTS):
    """The student backbone (a ``torchvision.models.ResNet``), with the fc head of its pretraining on
    ``EXTRA_CLASSES`` (scmd_ref.py replaces it). ``weights=None`` gives a random initialisation."""
    model = _narrow_resnet_class()(num_classes=len(EXTRA_CLASSES))
    if weights is None:
        return model
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"student weights {weights} are missing; rebuild them with "
                                f"`python -m scmd.world build`")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            arch = (f.metadata() or {}).get("arch")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights} is not a safetensors checkpoint: {e}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if arch != STUDENT_ARCH or got != expected:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:4]
        raise ValueError(f"{weights} is not an embedded-student checkpoint of architecture {STUDENT_ARCH} "
                         f"(file says arch={arch!r}; first mismatching entries: {diff})")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model


def save_compact(state: dict, path: Path, metadata: Optional[Dict[str, str]] = None) -> None:
    """safetensors with matrices/kernels in fp16 and vectors/scalars (biases, norms, logit scale) in fp32."""
    from safetensors.torch import save

    from scmd.outputs import atomic_write_bytes

    out = {}
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        if v.is_floating_point():
            v = v.half() if v.dim() >= 2 else v.float()
        out[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(out, metadata=metadata))


