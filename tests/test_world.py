"""The embedded world: dataset generation (determinism, DomainBed layout, marker/atomic behaviour,
nuisance strengths), the teacher loaded through open_clip, and the student backbone."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scmd import world

# ---------------------------------------------------------------------------------------------------------
# Dataset


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_names_are_sorted_and_domainbed_friendly():
    assert world.ENVIRONMENTS == sorted(world.ENVIRONMENTS) and len(world.ENVIRONMENTS) >= 4
    assert world.CLASSES == sorted(world.CLASSES) and 7 <= len(world.CLASSES) <= 10
    assert all(c == c.lower() and " " not in c for c in world.CLASSES)
    assert not set(world.CLASSES) & set(world.EXTRA_CLASSES)
    assert set(world.ENVIRONMENTS) == set(world.NUISANCE_STRENGTH)


def test_generation_is_deterministic_and_in_domainbed_layout(tmp_path):
    a = world.ensure_dataset(tmp_path / "a", progress=False, n_per_class=2)
    b = world.ensure_dataset(tmp_path / "b", progress=False, n_per_class=2)
    assert a == tmp_path / "a" / f"{world.DATASET_DIRNAME}_n2"  # a subset never takes the full world's folder
    fa, fb = _files(a), _files(b)
    assert fa == fb  # same bytes
    envs = sorted(e.name for e in os.scandir(a) if e.is_dir())
    assert envs == world.ENVIRONMENTS
    for env in envs:
        assert sorted(e.name for e in os.scandir(a / env) if e.is_dir()) == world.CLASSES
        for cls in world.CLASSES:
            assert sorted(os.listdir(a / env / cls)) == ["00000.png", "00001.png"]
    with Image.open(a / "photo" / "car" / "00001.png") as im:
        assert im.mode == "RGB" and im.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    # a subset holds the same images as a larger world (image i of a class depends only on its index)
    one = _files(world.ensure_dataset(tmp_path / "c", progress=False, n_per_class=1))
    pngs = {k: v for k, v in one.items() if k.endswith(".png")}
    assert len(pngs) == len(world.ENVIRONMENTS) * len(world.CLASSES)
    assert all(fa[k] == v for k, v in pngs.items())
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary folders left


def test_marker_skips_regeneration_and_replaces_stale_worlds(tmp_path, monkeypatch):
    root = world.ensure_dataset(tmp_path, progress=False, n_per_class=1)
    marker = root / world.MARKER_NAME
    assert world.WORLD_VERSION in marker.read_text()

    def boom(*_a, **_k):
        raise AssertionError("should not render")

    monkeypatch.setattr(world.dataset, "render", boom)
    assert world.ensure_dataset(tmp_path, progress=False, n_per_class=1) == root  # complete: nothing to do
    monkeypatch.undo()

    marker.write_text("embedded-world-v0\n")  # stale version (or a different size) -> regenerated
    (root / "photo" / "car" / "junk.png").write_bytes(b"x")
    world.ensure_dataset(tmp_path, progress=False, n_per_class=1)
    assert not (root / "photo" / "car" / "junk.png").exists()
    assert marker.read_text() == world._marker_text(1)


def test_crash_leaves_no_half_world(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = world.render

    def flaky(scene):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(scene)

    monkeypatch.setattr(world.dataset, "render", flaky)
    with pytest.raises(KeyboardInterrupt):
        world.ensure_dataset(tmp_path, progress=False, n_per_class=1)
    assert os.listdir(tmp_path) == []


# sha256 of the raw pixels of image 0 of every (env, class) of the current WORLD_VERSION
WORLD_PIXEL_DIGEST = "76ea7c919a7170f23edfcadcb2b8f786c54f2775026a33af6cb5b8ba0fbfbe2d"


def test_rendered_pixels_match_the_world_version():
    """Fails when the renderer's output changes: then bump WORLD_VERSION (so generated worlds on disk are
    replaced, not silently mixed) and record the new digest here; the teacher/student may need a rebuild."""
    import hashlib

    h = hashlib.sha256()
    for env in world.ENVIRONMENTS:
        for ci in range(len(world.CLASSES)):
            h.update(world.render(world.dataset_scene(env, ci, 0))[0].tobytes())
    assert world.WORLD_VERSION == "embedded-world-v4"
    assert h.hexdigest() == WORLD_PIXEL_DIGEST


def test_nuisance_follows_env_mapping_with_its_strength():
    n = 300
    for env in world.ENVIRONMENTS:
        follow = []
        for ci in range(len(world.CLASSES)):
            want = world.backdrop_of(env, ci)
            follow += [(s.pattern, s.bg_colour) == want for s in (world.dataset_scene(env, ci, i) for i in range(n))]
        # random backdrops hit the mapped one with probability 1/64
        expected = world.NUISANCE_STRENGTH[env] + (1 - world.NUISANCE_STRENGTH[env]) / 64
        assert abs(np.mean(follow) - expected) < 0.03, env
    for ci in range(len(world.CLASSES)):  # every env maps a class to a different backdrop
        assert len({world.backdrop_of(env, ci) for env in world.ENVIRONMENTS}) == len(world.ENVIRONMENTS)
    for env in world.ENVIRONMENTS:  # and different classes to different backdrops
        assert len({world.backdrop_of(env, ci) for ci in range(len(world.CLASSES))}) == len(world.CLASSES)


def test_every_class_and_style_renders():
    for i, cls in enumerate(world.ALL_CLASSES):
        for style in world.DATASET_STYLES + world.EXTRA_STYLES:
            img, meta = world.render(world.Scene(cls, style, world.PATTERNS[i % 8], world.COLOUR_NAMES[i % 8], seed=i))
            assert img.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and meta["cls"] == cls
            assert np.asarray(img).std() > 5  # not blank


# ---------------------------------------------------------------------------------------------------------
# Teacher


def test_teacher_loads_through_open_clip_pretrained_file():
    import open_clip
    from safetensors import safe_open

    world.register_teacher_config()
    model, _, preprocess = open_clip.create_model_and_transforms(world.TEACHER_MODEL_NAME,
                                                                 pretrained=str(world.TEACHER_WEIGHTS))
    model.eval()
    assert type(model.visual).__name__ == "ModifiedResNet"
    with safe_open(str(world.TEACHER_WEIGHTS), framework="pt") as f:
        trained_scale = float(f.metadata()["logit_scale"])
        assert f.get_tensor("logit_scale").dtype == torch.float32  # kept exact
    assert model.logit_scale.exp().item() == pytest.approx(trained_scale, abs=1e-3)
    assert all(p.dtype == torch.float32 for p in model.parameters())

    tok = open_clip.get_tokenizer(world.TEACHER_MODEL_NAME)
    assert isinstance(tok, open_clip.tokenizer.SimpleTokenizer) and tok.context_length == 77
    text = tok([world.CHECKED_PROMPT.format(c.replace("_", " ")) for c in world.CLASSES])
    img = torch.stack([preprocess(world.render(world.dataset_scene(e, 0, 0))[0]) for e in world.ENVIRONMENTS])
    with torch.no_grad():
        fi, ft = model.encode_image(img, normalize=True), model.encode_text(text, normalize=True)
    dim = world.teacher_config()["embed_dim"]
    assert fi.shape == (4, dim) and ft.shape == (len(world.CLASSES), dim)
    assert torch.isfinite(fi).all() and torch.isfinite(ft).all()
    assert torch.allclose(fi.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_truncated_text_encoding_equals_open_clip():
    import open_clip

    from scmd.world import pretrain as world_pretrain

    world.register_teacher_config()
    torch.manual_seed(0)
    model = open_clip.create_model(world.TEACHER_MODEL_NAME).eval()
    tok = open_clip.get_tokenizer(world.TEACHER_MODEL_NAME)(["a sketch of a red car on a striped background", "tree"])
    with torch.no_grad():
        assert torch.allclose(world_pretrain.encode_text_truncated(model, tok), model.encode_text(tok), atol=1e-5)


def test_killed_pretraining_resumes_exactly(tmp_path, monkeypatch):
    """A build killed mid-run continues from its saved state and ends with the same weights."""
    from safetensors.torch import load_file

    from scmd.world import pretrain as wp

    monkeypatch.setattr(wp, "RESUME_SECONDS", 0.0)
    monkeypatch.setattr(wp, "_student_val", lambda: (torch.zeros(2, 3, world.IMAGE_SIZE, world.IMAGE_SIZE),
                                                     torch.zeros(2, dtype=torch.long)))
    kw = dict(steps=4, batch_size=4, workers=0, log=lambda _m: None)
    wp.train_student(out=tmp_path / "a.safetensors", **kw)

    class Killed(Exception):
        pass

    real_save = wp._Resume.save

    def save_then_die(self, *a, **k):
        real_save(self, *a, **k)
        raise Killed

    monkeypatch.setattr(wp._Resume, "save", save_then_die)
    with pytest.raises(Killed):
        wp.train_student(out=tmp_path / "b.safetensors", **kw)
    assert (tmp_path / "b.resume.pt").exists()
    monkeypatch.setattr(wp._Resume, "save", real_save)
    wp.train_student(out=tmp_path / "b.safetensors", **kw)
    assert not (tmp_path / "b.resume.pt").exists()
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_captions_name_the_object():
    from scmd.world import pretrain as world_pretrain

    r = np.random.RandomState(0)
    meta = {"cls": "traffic_light", "style": "sketch", "pattern": "grid", "bg_colour": "blue", "obj_colour": "red"}
    for _ in range(50):
        assert "traffic light" in world_pretrain.caption(meta, r)
    meta = dict(meta, style="photo")
    caps = [world_pretrain.caption(meta, r) for _ in range(400)]
    assert any("red" in c or "blue" in c for c in caps)  # colour words occur ...
    free = [world_pretrain.caption(meta, r, colourless=True) for _ in range(400)]
    assert not any("red" in c or "blue" in c for c in free)  # ... but never for a colour-augmented image
    assert all("traffic light" in c for c in free)


def test_shortcut_premise_is_measured_from_the_scenes():
    from scmd.world import pretrain as world_pretrain

    shares = world_pretrain.shortcut_shares(n_per_env=800)
    for env in world.ENVIRONMENTS:
        own = world.NUISANCE_STRENGTH[env] + (1 - world.NUISANCE_STRENGTH[env]) / 64
        assert abs(shares[env][env] - own) < 0.05
        assert all(shares[env][o] < 0.05 for o in world.ENVIRONMENTS if o != env)


# ---------------------------------------------------------------------------------------------------------
# Student


def test_student_is_torchvision_resnet_and_loads_its_weights():
    from torchvision.models.resnet import ResNet

    m = world.build_student()
    assert isinstance(m, ResNet) and type(m).forward is ResNet.forward
    assert m.fc.in_features == world.STUDENT_WIDTHS[-1] and m.fc.out_features == len(world.EXTRA_CLASSES)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    m.eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, world.IMAGE_SIZE, world.IMAGE_SIZE))
    assert out.shape == (2, len(world.EXTRA_CLASSES)) and torch.isfinite(out).all()
    r = world.build_student(None)
    assert not torch.equal(r.conv1.weight, m.conv1.weight)


def test_wrong_student_weights_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="scmd.world build"):
        world.build_student(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not an embedded-student checkpoint"):
        world.build_student(world.TEACHER_WEIGHTS)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a safetensors checkpoint"):
        world.build_student(bad)


def test_checkpoints_are_small_and_compact():
    from safetensors import safe_open

    assert world.TEACHER_WEIGHTS.stat().st_size <= 10_000_000
    assert world.STUDENT_WEIGHTS.stat().st_size <= 6_000_000
    with safe_open(str(world.STUDENT_WEIGHTS), framework="pt") as f:
        assert f.get_tensor("conv1.weight").dtype == torch.float16
        assert f.get_tensor("bn1.weight").dtype == torch.float32


def test_the_premises_check_the_teacher_with_scmds_own_prompt():
    import scmd_ref

    assert world.CHECKED_PROMPT == scmd_ref.SCMD_PROMPT != scmd_ref.TABLE1_TEACHER_PROMPT
