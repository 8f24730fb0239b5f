"""DomainBed protocol pieces against the spec's test vectors and against torchvision itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from scmd import data as D
from scmd import outputs as O
from scmd import world
from scmd.datasets import DATASETS
from scmd.errors import DataError, UsageError
from scmd.hparams import make_hparams, seed_hash


def test_seed_hash_vectors():
    assert [seed_hash(0, e) for e in range(4)] == [894182419, 1514274641, 1325548499, 1796103049]
    assert seed_hash("VLCS", "SCMD", [2], 0, 0) == 1719258486
    assert seed_hash(1, 0) == 785910682


def test_split_shuffle_vectors():
    keys = np.arange(10)
    np.random.RandomState(894182419).shuffle(keys)
    assert keys.tolist() == [2, 3, 8, 1, 4, 5, 0, 9, 6, 7]
    out_idx, in_idx = D.in_out_split(10, 0.2, trial_seed=0, env_i=0)
    assert out_idx.tolist() == [2, 3] and in_idx.tolist() == [8, 1, 4, 5, 0, 9, 6, 7]


def test_default_hparams_are_the_scmd_defaults():
    hp = make_hparams("vlcs", 0, 0)
    assert hp == {"lambda1": 0.5, "lambda2": 0.5, "temperature": 3.0, "worst_case_p": 0.2, "last_k_epoch": 0.25,
                  "lr": 5e-5, "weight_decay": 0.0, "batch_size": 32, "resnet_dropout": 0.0}


def test_every_dataset_runs_the_spec_protocol_and_the_world_deviates_only_in_its_lr():
    for name, info in DATASETS.items():
        assert (info.steps, info.checkpoint_freq) == ((5001, 1000) if name == "domainnet" else (5001, 300)), name
        assert info.lr == (world.LR if name == "embedded" else 5e-5), name
    emb = make_hparams("embedded", 0, 0, lr=DATASETS["embedded"].lr)
    vlcs = make_hparams("vlcs", 0, 0)
    assert emb["lr"] == world.LR and {k: v for k, v in emb.items() if k != "lr"} == {
        k: v for k, v in vlcs.items() if k != "lr"}
    scale = world.LR / 5e-5
    for s in range(1, 20):  # the random search is the spec's, with its lr choices scaled alike
        a, b = make_hparams("embedded", s, 0, lr=world.LR), make_hparams("vlcs", s, 0)
        assert a["lr"] == pytest.approx(b["lr"] * scale, rel=1e-12)
        assert {k: v for k, v in a.items() if k != "lr"} == {k: v for k, v in b.items() if k != "lr"}


def test_random_hparams_vector():
    # docs/algorithm.md §7.2: SCMD, VLCS, hparams_seed 1, trial 0
    hp = make_hparams("vlcs", 1, 0)
    assert hp["lambda1"] == pytest.approx(0.688043, abs=1e-6)
    assert hp["lambda2"] == pytest.approx(0.984035, abs=1e-6)
    assert hp["last_k_epoch"] == pytest.approx(0.336482, abs=1e-6)
    assert hp["temperature"] == pytest.approx(3.599418, abs=1e-6)
    assert (hp["worst_case_p"], hp["lr"], hp["weight_decay"], hp["batch_size"], hp["resnet_dropout"]) == (
        0.25, 5e-5, 1e-4, 33, 0.5)
    json.dumps(hp)  # plain Python scalars
    # the sweep JSON then pins batch size and dropout
    hp = make_hparams("vlcs", 1, 0, '{"batch_size": 32, "resnet_dropout": 0}')
    assert hp["batch_size"] == 32 and hp["resnet_dropout"] == 0


def test_the_authors_sweep_json_is_accepted_where_it_says_what_we_do():
    authors = ('{"resnet18": false, "resnet_dropout": 0, "nonlinear_classifier": false, "data_augmentation": true, '
               '"clip_backbone": "ViT-B/32", "student_model": "resnet", "SMA": true, "batch_size": 32}')
    assert make_hparams("vlcs", 1, 0, authors) == make_hparams("vlcs", 1, 0, '{"batch_size": 32, "resnet_dropout": 0}')
    ours18 = {"student": "resnet18", "teacher": "ViT-B-32-quickgelu"}
    assert make_hparams("vlcs", 0, 0, '{"resnet18": true}', ours=ours18) == make_hparams("vlcs", 0, 0)
    with pytest.raises(UsageError, match="clip_backbone"):  # the embedded world's teacher is not ViT-B/32
        make_hparams("embedded", 0, 0, authors, ours={"student": "embedded_student", "teacher": "embedded_teacher"})


@pytest.mark.parametrize("bad,fragment", [
    ("{not json", "not valid JSON"), ('{"lambda3": 1}', "unknown hparam"), ("[1]", "JSON object"),
    ('{"worst_case_p": 1.5}', "worst_case_p"), ('{"worst_case_p": -0.1}', "worst_case_p"),
    ('{"temperature": 0}', "temperature"), ('{"lr": "fast"}', "must be a finite number"),
    ('{"lr": 1e10}', r"lr must be in \(0.0, 1.0\]"),
    ('{"lambda1": NaN}', "finite"), ('{"lambda2": Infinity}', "finite"), ('{"lambda1": 1000}', r"\[0.0, 100.0\]"),
    ('{"weight_decay": -1}', "weight_decay"), ('{"batch_size": 0}', "batch_size"), ('{"batch_size": 3.5}', "whole"),
    ('{"resnet_dropout": 1}', "resnet_dropout"), ('{"temperature": true}', "finite number"),
    ('{"SMA": false}', "SMA=True"), ('{"class_balanced": true}', "class_balanced"),
    ('{"clip_backbone": "RN50"}', "clip_backbone"), ('{"resnet18": true}', "--student resnet18")])
def test_bad_hparams_are_usage_errors(bad, fragment):
    with pytest.raises(UsageError, match=fragment):
        make_hparams("pacs", 0, 0, bad)


def test_env_order_tables():
    assert DATASETS["vlcs"].envs[2] == "SUN09"
    assert DATASETS["terraincognita"].envs == ("location_100", "location_38", "location_43", "location_46")
    for info in DATASETS.values():
        assert list(info.envs) == sorted(info.envs)


def _tree(root, spec):
    for rel in spec:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.lower().endswith((".png", ".jpg")):
            Image.new("RGB", (4, 4), (len(rel) % 255, 0, 0)).save(p, format="PNG")
        else:
            p.write_text("not an image")


def test_index_matches_imagefolder_order(tmp_path):
    root = tmp_path / "DS"
    files = ["b_env/Zebra/1.png", "b_env/apple/x/2.PNG", "b_env/apple/1.jpg", "b_env/apple/notes.txt",
             "a_env/Zebra/9.png", "a_env/apple/b.png", "a_env/apple/A.png", "a_env/apple/sub/c.png"]
    _tree(root, files)
    idx = D.index_dataset(root)
    assert idx.envs == ["a_env", "b_env"]
    assert idx.classes == ["Zebra", "apple"]  # code-point order: upper case first
    for e, env in enumerate(idx.envs):
        ref = ImageFolder(str(root / env))
        assert idx.paths[e] == [p for p, _ in ref.samples]
        assert idx.labels[e].tolist() == [t for _, t in ref.samples]
    assert idx.offsets == [0, 4] and idx.global_path(4) == idx.paths[1][0]


def test_index_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        D.index_dataset(tmp_path / "nope")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        D.index_dataset(f)
    _tree(tmp_path / "A", ["e0/cat/1.png", "e0/dog/1.png", "e1/cat/1.png", "e1/cow/1.png"])
    with pytest.raises(DataError, match="different class folders"):
        D.index_dataset(tmp_path / "A")
    _tree(tmp_path / "B", ["e0/cat/1.png", "e0/dog/readme.txt"])
    with pytest.raises(DataError, match="no valid file for the classes dog"):
        D.index_dataset(tmp_path / "B")


def test_unreadable_images_are_named(tmp_path):
    empty = tmp_path / "zero.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="zero.png"):
        D.load_rgb(str(empty))
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(good, format="JPEG")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match="trunc.jpg"):
        D.load_rgb(str(trunc))


def test_step_batches_are_a_function_of_seed_env_step(tmp_path):
    _tree(tmp_path / "W", [f"e{e}/c{c}/{i}.png" for e in range(2) for c in range(2) for i in range(5)])
    idx = D.index_dataset(tmp_path / "W")
    store = D.ImageStore(idx, preload=False)
    ds = D.StepBatches(store, 1, np.arange(10), 6, seed=3, size=8)
    x1, y1, ids1 = ds[7]
    torch.manual_seed(123)  # the global RNG does not matter ...
    x2, y2, ids2 = ds[7]
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(ids1, ids2)
    assert (ids1 >= 10).all()  # global sample ids of env 1
    x3, _, _ = ds[8]  # ... the step does
    assert not torch.equal(x1, x3)
    state = torch.get_rng_state()
    ds[9]
    assert torch.equal(state, torch.get_rng_state())  # and loading leaves the global RNG alone


def test_results_file_drops_a_torn_last_line(tmp_path):
    p = tmp_path / "results.jsonl"
    O.append_record(p, {"step": 0})
    O.append_record(p, {"step": 300})
    with open(p, "ab") as f:
        f.write(b'{"step": 600, "env0_in')
    assert [r["step"] for r in O.read_records(p)] == [0, 300]


def test_training_domain_validation_picks_first_best():
    recs = [{"step": s, "env0_out_acc": a, "env1_out_acc": b, "env2_out_acc": 0.0}
            for s, a, b in [(0, 0.5, 0.5), (1, 0.7, 0.6), (2, 0.6, 0.7), (3, 0.1, 0.1)]]
    sel = O.training_domain_selection(recs, test_env=2, n_envs=3)
    assert sel["record"]["step"] == 1 and sel["val_acc"] == pytest.approx(0.65)


def test_lazy_step_batches_draw_the_same_candidates_and_pixels(tmp_path):
    """Stale selection loads lazily: the same candidates (ids, labels) as the full batch, and the rows it takes
    have exactly the full batch's pixels, whatever rows and in whatever order (also across two envs)."""
    rng = np.random.default_rng(0)
    for e in range(2):
        for c in range(2):
            (tmp_path / f"W/e{e}/c{c}").mkdir(parents=True)
            for i in range(6):  # noise, so that every crop, flip and colour op shows in the pixels
                noise = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
                Image.fromarray(noise).save(tmp_path / f"W/e{e}/c{c}/{i}.png")
    store = D.ImageStore(D.index_dataset(tmp_path / "W"), preload=False, as_tensors=True)
    full = [D.StepBatches(store, e, np.arange(12), 7, seed=3, size=8) for e in range(2)]
    lazy = [D.StepBatches(store, e, np.arange(12), 7, seed=3, size=8, lazy_until=5) for e in range(2)]
    for step in (0, 5):
        a, b = [ds[step] for ds in full], [ds[step] for ds in lazy]
        assert all(isinstance(x, D.LazyImages) for x, _, _ in b)
        for (_, ya, ia), (_, yb, ib) in zip(a, b):
            assert torch.equal(ya, yb) and torch.equal(ia, ib)
        x_full = D.cat_images([x for x, _, _ in a], torch.device("cpu"))
        x_lazy = D.cat_images([x for x, _, _ in b], torch.device("cpu"))
        assert len(x_lazy) == 14
        rows = torch.tensor([13, 2, 7, 0, 6])  # both envs, unsorted, as a ranking returns them
        assert torch.equal(x_lazy[rows], x_full[rows])
        assert torch.equal(x_lazy.all(), x_full)
        assert x_lazy[torch.zeros(0, dtype=torch.int64)].shape == (0, 3, 8, 8)
    assert isinstance(lazy[0][6][0], torch.Tensor)  # after lazy_until (the cut-off): whole batches again
    assert torch.equal(lazy[0][6][0], full[0][6][0])
