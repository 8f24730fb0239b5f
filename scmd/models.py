"""The networks' weights: the student backbone (torchvision ResNets with their ImageNet weights, the embedded
world's narrow ResNet, or a state_dict file) and the frozen open_clip teacher (a pretrained tag or a local
file), plus the class prompts' tokens. Every failure is one DataError line naming the file and the fix."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.nn as nn

from scmd import world
from scmd.errors import DataError, UsageError, first_line

STUDENTS = ("resnet50", "resnet18", world.STUDENT_NAME)


def student_backbone(name: str, weights: str) -> nn.Module:
    """A ResNet with its fc layer (the caller replaces it): weights v2 / v1 (torchvision's IMAGENET1K_V2 / _V1),
    none (random), or a state_dict file (.pt/.pth/.safetensors)."""
    import torchvision

    if name not in STUDENTS:
        raise UsageError(f"--student must be one of {', '.join(STUDENTS)}, got {name!r}")
    if name == world.STUDENT_NAME:  # the embedded world's narrow ResNet-18 (its own weights file)
        if weights in ("v1", "v2"):
            raise UsageError(f"--student {world.STUDENT_NAME} has no torchvision weights; pass a file or none")
        try:
            return world.build_student(None if weights == "none" else weights)
        except (OSError, ValueError) as e:
            raise DataError(f"student weights: {e}") from None
    backbone = getattr(torchvision.models, name)(weights=None)
    if weights in ("v1", "v2"):
        enum = torchvision.models.ResNet50_Weights if name == "resnet50" else torchvision.models.ResNet18_Weights
        tag = "IMAGENET1K_V2" if weights == "v2" else "IMAGENET1K_V1"
        if not hasattr(enum, tag):
            raise UsageError(f"{name} has no {tag} weights in torchvision; use v1, none or a file")
        backbone.load_state_dict(_torchvision_weights(getattr(enum, tag)))
    elif weights != "none":
        load_state_dict_file(backbone, weights, f"student {name}")
    return backbone


def _torchvision_weights(weights) -> dict:
    """A torchvision weights enum's state_dict from the torch hub cache, fetched only if a network answers."""
    fname = weights.url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not cached.exists():
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(15)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(cached), progress=True)
        except Exception as e:  # noqa: BLE001 - any network failure gets the same advice
            raise DataError(f"student weights {fname} are not in the torch hub cache ({cached}) and could not be "
                            f"downloaded ({type(e).__name__}); download {weights.url} to that path (or set "
                            f"TORCH_HOME), or pass --student-weights FILE|none") from None
        finally:
            socket.setdefaulttimeout(old)
    return torch.load(cached, map_location="cpu", weights_only=True)


def load_state_dict_file(module: nn.Module, path: str, what: str) -> None:
    """Load a state_dict file strictly; a misfit names the missing, unexpected and mis-shaped keys."""
    if not Path(path).is_file():
        raise DataError(f"{what} weights file {path} not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise DataError(f"{what} weights file {path} cannot be read ({type(e).__name__}: {first_line(e)})") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise DataError(f"{what} weights file {path} holds no state_dict (a {type(sd).__name__})")
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(getattr(sd[k], "shape", ())))
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {label} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                 for label, v in (("missing keys", missing), ("unexpected keys", unexpected),
                                  ("keys of another shape", shapes)) if v]
        raise DataError(f"{what} weights file {path} does not fit the model: {'; '.join(parts)}")
    module.load_state_dict(sd)


def load_clip(name: str, pretrained: str, device: torch.device, image_size: int = 0) -> nn.Module:
    """The frozen open_clip teacher: a model name with an open_clip pretrained tag, a local weights file, or
    none (random; timing and tests only). A tag that is not in the local cache fails at once when the hub
    cannot be reached (instead of a minute of retries). image_size: the student's input size, which the
    teacher must share (SCMD feeds both the same tensor)."""
    import open_clip

    world.register_teacher_config()  # the embedded world's tiny CLIP is an open_clip model name like any other
    if pretrained == "none":
        pretrained = None
    elif os.path.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth")):
        if not Path(pretrained).is_file():
            raise DataError(f"teacher weights file {pretrained} not found")
    else:
        _check_pretrained_reachable(name, pretrained)
    try:
        clip = open_clip.create_model(name, pretrained=pretrained)
    except RuntimeError as e:
        msg = first_line(e)
        if "state_dict" in msg or "size mismatch" in msg:
            raise DataError(f"teacher weights {pretrained} do not fit open_clip model {name}: {msg}") from None
        raise DataError(f"cannot build teacher {name} with weights {pretrained!r}: {msg}; offline, pass "
                        f"--teacher-weights FILE") from None
    except Exception as e:  # noqa: BLE001 - unknown model names, missing downloads, ...
        raise DataError(f"cannot build teacher {name} with weights {pretrained!r} ({type(e).__name__}: "
                        f"{first_line(e)}); offline, pass --teacher-weights FILE (an open_clip state_dict)") from None
    if image_size and image_size_of(clip) != image_size:
        raise UsageError(f"teacher {name} expects {image_size_of(clip)}px images, the student gets {image_size}px; "
                         f"SCMD feeds both the same tensor")
    return clip.to(device).eval().requires_grad_(False)


def _check_pretrained_reachable(name: str, tag: str) -> None:
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, tag)
    hub = cfg.get("hf_hub") if cfg else None
    if not hub or os.environ.get("HF_HUB_OFFLINE") == "1":
        return  # unknown tags and offline mode: open_clip's own error is immediate
    from huggingface_hub import try_to_load_from_cache

    repo, fname = os.path.split(hub)  # 'org/model/' names the default file
    fname = fname or "open_clip_pytorch_model.bin"
    names = [fname, fname.replace(".bin", ".safetensors"), "open_clip_model.safetensors"]  # open_clip's alternatives
    if any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        raise DataError(f"teacher {name} weights {tag!r} are not in the local Hugging Face cache and huggingface.co "
                        f"cannot be reached; connect to a network once, or pass --teacher-weights FILE") from None


def class_prompts(template: str, class_names) -> list:
    return [template.format(c.replace("_", " ")) for c in class_names]  # folder name, '_' -> ' '


def tokenize(teacher: str, prompts, fastsel=None) -> torch.Tensor:
    """The teacher's tokens of the prompts: open_clip's tokenizer, or fastsel's exact copy of its SimpleTokenizer
    when fastsel is given and the teacher uses that one (tests/test_fastsel_prompts.py holds them equal)."""
    import open_clip

    tok = open_clip.get_tokenizer(teacher)
    if fastsel is not None and type(tok) is open_clip.tokenizer.SimpleTokenizer:
        return torch.from_numpy(fastsel.PromptTokenizer().tokenize(prompts, tok.context_length))
    return tok(prompts)


def image_size_of(clip: nn.Module) -> int:
    s = clip.visual.image_size
    return s[0] if isinstance(s, (tuple, list)) else int(s)
