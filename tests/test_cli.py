"""scmd_ref.py as a user runs it: a short run on the embedded world writes valid DomainBed records, the two
selectors give the same run, and a catalogue of bad inputs each ends with one clear line and exit status 2
(1 for runtime faults), no traceback, no half-written result file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import scmd_ref
from scmd import run as R
from scmd import world

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--world-per-class", "6", "--steps", "7", "--checkpoint-freq", "3", "--no-progress", "--workers", "0"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    world.ensure_dataset(d, progress=False, n_per_class=6)
    return d


def run_cli(argv, capsys):
    code = R.cli(scmd_ref.main, argv)
    err = capsys.readouterr().err
    return code, err


def last_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("scmd_ref.py: error:")]
    assert len(lines) == 1, err
    return lines[0]


def records(out: Path):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# a short run


@pytest.mark.slow
def test_short_run_writes_domainbed_records_and_report(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        code, err = run_cli(["--data-dir", str(data_dir), "--output-dir", str(out), *QUICK], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    for name in ("results.jsonl", "summary.json", "done", "checkpoint_last.pt", "checkpoint_best.pt"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name  # readable by colleagues, as the umask says
    recs = records(out)
    assert [r["step"] for r in recs] == [0, 3, 6]
    for r in recs:
        for e in range(4):
            assert 0.0 <= r[f"env{e}_in_acc"] <= 1.0 and 0.0 <= r[f"env{e}_out_acc"] <= 1.0
        assert r["args"]["test_envs"] == [0] and r["args"]["algorithm"] == "SCMD"
        assert set(r["hparams"]) >= {"lambda1", "lambda2", "temperature", "worst_case_p", "last_k_epoch"}
        assert np.isfinite(r["loss"])
    assert (out / "done").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selected_step"] in (0, 3, 6) and len(summary["teacher_zero_shot"]) == 4
    report = json.loads((out / "hardness.json").read_text())
    assert report["domains"][0]["rows_seen"] == 0  # the held-out domain is never trained on
    # the authors' horizon 5000 on every dataset: cut-off int(5000 * 0.75) = 3750, so all 7 steps select
    assert sum(d["rows_kept"] for d in report["domains"]) == 7 * int(96 * 0.2)
    assert sum(d["rows_seen"] for d in report["domains"]) == 7 * 96
    assert all(Path(p).exists() for ps in report["hardest_paths"].values() for p in ps)
    assert (out / "kept_share.png").stat().st_size > 0
    ck = torch.load(out / "checkpoint_last.pt", weights_only=True)  # no pickled code in checkpoints
    assert ck["step"] == 6
    torch.load(out / "checkpoint_best.pt", weights_only=True)


@pytest.mark.slow
def test_fastsel_and_torch_selectors_give_the_same_run(tmp_path, data_dir, capsys):
    outs = {}
    for sel in ("torch", "fastsel"):
        outs[sel] = tmp_path / sel
        code, err = run_cli(["--data-dir", str(data_dir), "--output-dir", str(outs[sel]), "--selector", sel,
                             "--steps", "5", "--checkpoint-freq", "4", *QUICK[:2], *QUICK[6:]], capsys)
        assert code == 0, err
    a = torch.load(outs["torch"] / "checkpoint_last.pt", weights_only=True)["trainer"]
    b = torch.load(outs["fastsel"] / "checkpoint_last.pt", weights_only=True)["trainer"]
    for part in ("student", "sma", "projector"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    strip = ("step_time", "args", "scmd_args")
    ra = [{k: v for k, v in r.items() if k not in strip} for r in records(outs["torch"])]
    rb = [{k: v for k, v in r.items() if k not in strip} for r in records(outs["fastsel"])]
    assert ra == rb
    ha = json.loads((outs["torch"] / "hardness.json").read_text())
    hb = json.loads((outs["fastsel"] / "hardness.json").read_text())
    assert ha["domains"] == hb["domains"]


@pytest.mark.slow
def test_eval_splits_selection_skips_only_reported_splits_and_changes_no_result(tmp_path, data_dir, capsys):
    """--eval-splits selection drops the training envs' in-splits (reported, never used by training-domain
    validation); training, the other accuracies and the selected step are those of the full evaluation."""
    outs = {}
    for mode in ("all", "selection"):
        outs[mode] = tmp_path / mode
        code, err = run_cli(["--data-dir", str(data_dir), "--output-dir", str(outs[mode]), "--eval-splits", mode,
                             "--test-env", "2", *QUICK], capsys)
        assert code == 0, err
    full, cheap = records(outs["all"]), records(outs["selection"])
    assert len(full) == len(cheap) == 3
    for rf, rc in zip(full, cheap):
        acc_keys = {k for k in rc if k.endswith("_acc")}
        assert acc_keys == {"env0_out_acc", "env1_out_acc", "env2_in_acc", "env2_out_acc", "env3_out_acc"}
        assert all(rc[k] == rf[k] for k in acc_keys) and rc["loss"] == rf["loss"]
    a = torch.load(outs["all"] / "checkpoint_last.pt", weights_only=True)["trainer"]
    b = torch.load(outs["selection"] / "checkpoint_last.pt", weights_only=True)["trainer"]
    assert all(torch.equal(a["sma"][k], b["sma"][k]) for k in a["sma"])
    sa, sb = (json.loads((outs[m] / "summary.json").read_text()) for m in ("all", "selection"))
    assert (sa["selected_step"], sa["test_acc"]) == (sb["selected_step"], sb["test_acc"])


# ---------------------------------------------------------------------------------------------------------
# bad inputs


def _tiny_domainbed(root: Path, envs, classes, n=3):
    for e in envs:
        for c in classes:
            (root / e / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 40, 10, 10)).save(root / e / c / f"{i}.png")


VLCS_ENVS = ["Caltech101", "LabelMe", "SUN09", "VOC2007"]
TINY_REAL = ["--student", "resnet18", "--student-weights", "none", "--teacher", world.TEACHER_MODEL_NAME,
             "--teacher-weights", str(world.TEACHER_WEIGHTS), "--image-size", str(world.IMAGE_SIZE),
             "--steps", "2", "--no-progress", "--workers", "0"]


def _case_ids(cases):
    return [c[0] for c in cases]


CATALOGUE = [
    # (name, argv builder(tmp, data_dir), expected fragment, exit code)
    ("unknown dataset", lambda t, d: ["--dataset", "mnist"], "unknown dataset", 2),
    ("unknown algorithm", lambda t, d: ["--algorithm", "dann"], "unknown --algorithm", 2),
    ("missing data dir", lambda t, d: ["--dataset", "vlcs", "--data-dir", str(t / "nowhere")], "--download", 2),
    ("dataset folder is a file", lambda t, d: _file_dataset(t), "not a folder|not a directory", 2),
    ("test env out of range", lambda t, d: ["--data-dir", str(d), "--test-env", "7", *QUICK], "out of range", 2),
    ("two test envs", lambda t, d: ["--test-env", "0", "1"], "exactly one domain", 2),
    ("steps 0", lambda t, d: ["--steps", "0"], "--steps must be >= 1", 2),
    ("worst_case_p > 1", lambda t, d: ["--hparams", '{"worst_case_p": 1.5}'], "worst_case_p", 2),
    ("worst_case_p < 0", lambda t, d: ["--hparams", '{"worst_case_p": -0.2}'], "worst_case_p", 2),
    ("temperature <= 0", lambda t, d: ["--hparams", '{"temperature": 0}'], "temperature", 2),
    ("malformed hparams", lambda t, d: ["--hparams", "{lr: 1"], "not valid JSON", 2),
    ("unknown hparam", lambda t, d: ["--hparams", '{"alpha": 1}'], "unknown hparam", 2),
    ("conflicting flags", lambda t, d: ["--algorithm", "erm", "--select-per-domain"], "--select-per-domain", 2),
    ("stale losses without selection", lambda t, d: ["--algorithm", "kd", "--selection-losses", "stale"],
     "--selection-losses stale needs an algorithm with selection", 2),
    ("unknown selection losses", lambda t, d: ["--selection-losses", "old"], "--selection-losses", 2),
    ("cuda without a GPU", lambda t, d: ["--device", "cuda"], "no CUDA device", 2),
    ("output dir not writable", lambda t, d: ["--output-dir", str(_a_file(t) / "sub"), "--data-dir", str(d), *QUICK],
     "not writable", 2),
    ("class sets differ", lambda t, d: _vlcs(t, classes_of={"SUN09": ["bird", "car", "cow"]}), "different class",
     2),
    ("empty domain", lambda t, d: _vlcs(t, empty_class=("LabelMe", "car")), "no image files|no valid file", 2),
    ("zero-byte image", lambda t, d: _vlcs(t, zero_byte=("VOC2007", "dog")), "cannot read image", 2),
    ("symlink loop", lambda t, d: _vlcs(t, loop=("Caltech101", "bird")), "symlink loop", 2),
    ("missing student weights file", lambda t, d: ["--data-dir", str(d), "--student-weights", str(t / "no.pt"),
                                                   *QUICK], "missing|not found", 2),
    ("student weights of the wrong architecture", lambda t, d: ["--data-dir", str(d), "--student-weights",
                                                                str(world.TEACHER_WEIGHTS), *QUICK],
     "does not fit|not an embedded-student", 2),
    ("teacher weights of the wrong architecture", lambda t, d: ["--data-dir", str(d), "--teacher-weights",
                                                                str(world.STUDENT_WEIGHTS), *QUICK],
     "do not fit", 2),
    ("resume without checkpoint", lambda t, d: ["--data-dir", str(d), "--resume", "yes", "--output-dir",
                                                str(t / "fresh"), *QUICK], "no checkpoint", 2),
    ("absurd lr", lambda t, d: ["--hparams", '{"lr": 1e10}'], r"hparam lr must be in \(0.0, 1.0\]", 2),
    # every hparam a finite number in its range, and a kept count of at least one sample
    ("NaN lambda", lambda t, d: ["--hparams", '{"lambda1": NaN}'], "lambda1 must be a finite number", 2),
    ("infinite temperature", lambda t, d: ["--hparams", '{"temperature": Infinity}'], "temperature", 2),
    ("absurd lambda", lambda t, d: ["--hparams", '{"lambda2": 1e6}'], r"lambda2 must be in \[0.0, 100.0\]", 2),
    ("negative weight decay", lambda t, d: ["--hparams", '{"weight_decay": -1e-4}'], "weight_decay", 2),
    ("batch size 0", lambda t, d: ["--hparams", '{"batch_size": 0}'], "batch_size", 2),
    ("fractional batch size", lambda t, d: ["--hparams", '{"batch_size": 3.5}'], "whole number", 2),
    ("kept count 0", lambda t, d: ["--hparams", '{"worst_case_p": 0.001}'], "keeps no sample", 2),
    ("kept count 0 per domain", lambda t, d: ["--select-per-domain", "--hparams", '{"worst_case_p": 0.02}'],
     "keeps no sample of each domain", 2),
    ("authors' key with another value", lambda t, d: ["--hparams", '{"SMA": false}'], "SMA", 2),
    # flags
    ("negative seed", lambda t, d: ["--seed", "-1"], r"--seed must be in \[0, 4294967295\]", 2),
    ("huge trial seed", lambda t, d: ["--trial-seed", str(2**40)], "--trial-seed must be in", 2),
    ("negative workers", lambda t, d: ["--workers", "-1"], "--workers must be in", 2),
    ("device syntax", lambda t, d: ["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N", 2),
    ("device index syntax", lambda t, d: ["--device", "cuda:x"], "--device must be", 2),
    ("prompt with two fields", lambda t, d: ["--prompt", "a {} and a {}"], "exactly one", 2),
    ("prompt with a named field", lambda t, d: ["--prompt", "a {x} {}"], "exactly one", 2),
    ("prompt with a numbered field", lambda t, d: ["--prompt", "a photo of a {0}"], "exactly one", 2),
    ("prompt with a conversion", lambda t, d: ["--prompt", "a photo of a {!r}"], "exactly one", 2),
    ("prompt with an open brace", lambda t, d: ["--prompt", "a photo of a {"], "not a valid template", 2),
    ("image size 0", lambda t, d: ["--image-size", "0"], r"--image-size must be in \[32, 4096\]", 2),
    ("image size 16", lambda t, d: ["--image-size", "16"], "--image-size must be in", 2),
    ("checkpoint freq 0", lambda t, d: ["--checkpoint-freq", "0"], "--checkpoint-freq must be >= 1", 2),
    ("save every 0", lambda t, d: ["--save-every", "0"], "--save-every must be >= 1", 2),
    ("holdout fraction 0", lambda t, d: ["--holdout-fraction", "0"], "--holdout-fraction must be in", 2),
    ("holdout fraction 1", lambda t, d: ["--holdout-fraction", "1"], "--holdout-fraction must be in", 2),
    ("holdout leaves no validation split", lambda t, d: ["--data-dir", str(d), "--holdout-fraction", "0.01",
                                                         *QUICK], "no validation images", 2),
    ("unknown flag", lambda t, d: ["--frobnicate"], "unrecognized arguments: --frobnicate", 2),
    ("non-integer steps", lambda t, d: ["--steps", "ten"], "invalid int value", 2),
    # I/O
    ("data dir is a file", lambda t, d: ["--data-dir", str(_a_file(t)), *QUICK], "is a file", 2),
    ("output dir is a file", lambda t, d: ["--output-dir", str(_a_file(t)), "--data-dir", str(d), *QUICK],
     "is a file", 2),
    ("empty checkpoint file", lambda t, d: _empty_checkpoint(t, d), "checkpoint .* cannot be read", 2),
    ("weights with missing and unexpected keys", lambda t, d: _misfit_weights(t, d),
     r"1 missing keys \(fc.bias\); 1 unexpected keys \(extra.weight\)", 2),
    ("image over the decompression-bomb limit", lambda t, d: _vlcs(t, bomb=True), "decompression-bomb limit", 2),
    ("truncated image with --refuse-truncated-images", lambda t, d: [*_vlcs(t, truncated=True),
                                                                     "--refuse-truncated-images"], "truncated", 2),
]


def _empty_checkpoint(t: Path, d: Path):
    (t / "out").mkdir()
    (t / "out" / "checkpoint_last.pt").write_bytes(b"")
    return ["--data-dir", str(d), *QUICK]


def _misfit_weights(t: Path, d: Path):
    import torchvision

    sd = torchvision.models.resnet18(weights=None).state_dict()
    del sd["fc.bias"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, t / "r18.pt")
    return ["--data-dir", str(d), "--student", "resnet18", "--student-weights", str(t / "r18.pt"), *QUICK]


def _a_file(t: Path) -> Path:
    f = t / "a_file"
    f.write_text("x")
    return f


def _file_dataset(t: Path):
    (t / "VLCS").write_text("not a folder")
    return ["--dataset", "vlcs", "--data-dir", str(t), *TINY_REAL]


def _vlcs(t: Path, classes_of=None, empty_class=None, zero_byte=None, loop=None, bomb=False, truncated=False):
    classes = ["bird", "car", "chair", "dog", "person"]
    root = t / "VLCS"
    for e in VLCS_ENVS:
        _tiny_domainbed(root, [e], (classes_of or {}).get(e, classes))
    if empty_class:
        for f in (root / empty_class[0] / empty_class[1]).iterdir():
            f.unlink()
    if zero_byte:
        (root / zero_byte[0] / zero_byte[1] / "1.png").write_bytes(b"")
    if loop:
        os.symlink("..", root / loop[0] / loop[1] / "again")
    if bomb:  # over twice PIL's pixel limit: PIL refuses to decode it
        Image.new("RGB", (4000, 4000)).save(root / "SUN09" / "car" / "big.png")
        Image.MAX_IMAGE_PIXELS = 4_000_000  # restored by the test
    if truncated:
        _truncated_jpeg(root / "LabelMe" / "dog" / "cut.jpg")
    return ["--dataset", "vlcs", "--data-dir", str(t), "--output-dir", str(t / "out"), *TINY_REAL]


def _truncated_jpeg(path: Path) -> None:
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path, format="JPEG", quality=95)
    path.write_bytes(path.read_bytes()[:-400])  # the end of the entropy-coded data is gone


@pytest.mark.parametrize("name,argv,fragment,code", CATALOGUE, ids=_case_ids(CATALOGUE))
def test_bad_input_gives_one_clear_line(name, argv, fragment, code, tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the bomb case
    args = argv(tmp_path, data_dir)
    if "--output-dir" not in args:
        args += ["--output-dir", str(tmp_path / "out")]
    got, err = run_cli(args, capsys)
    line = last_error_line(err)
    assert re.search(fragment, line), line
    assert got == code
    assert "Traceback" not in err
    for res in tmp_path.rglob("results.jsonl"):  # whatever was written is whole records
        for ln in res.read_text().splitlines():
            json.loads(ln)


@pytest.mark.slow
def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scmd_ref.py"), "--dataset", "vlcs", "--data-dir",
                        str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("scmd_ref.py: error: dataset folder") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "scmd_ref.py"), "--dataset", "vlcs", "--data-dir",
                        str(tmp_path), "--debug"], capture_output=True, text=True, cwd=tmp_path)
    assert "Traceback" in r.stderr  # --debug shows it


@pytest.mark.slow
def test_checkpoint_from_other_settings_is_refused(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    base = ["--data-dir", str(data_dir), "--output-dir", str(out), "--world-per-class", "6", "--checkpoint-freq",
            "3", "--no-progress", "--workers", "0"]
    code, err = run_cli([*base, "--steps", "4"], capsys)
    assert code == 0, err
    (out / "done").unlink()  # pretend it died
    code, err = run_cli([*base, "--steps", "4", "--test-env", "1"], capsys)
    assert code == 2 and "different settings (test_env)" in last_error_line(err)


@pytest.mark.slow
def test_finished_run_is_reused_only_with_the_same_settings(tmp_path, data_dir, capsys):
    """A `done` folder records its settings: the same command is a no-op, other settings are refused (they
    would otherwise silently report the old run), and the default folder name differs with the settings."""
    out = tmp_path / "run"
    base = ["--data-dir", str(data_dir), "--output-dir", str(out), "--world-per-class", "6", "--checkpoint-freq",
            "3", "--no-progress", "--workers", "0"]
    code, err = run_cli([*base, "--steps", "4"], capsys)
    assert code == 0, err
    before = (out / "results.jsonl").read_bytes()
    code, err = run_cli([*base, "--steps", "4"], capsys)
    assert code == 0 and "finished run with these settings" in err
    assert (out / "results.jsonl").read_bytes() == before
    code, err = run_cli([*base, "--steps", "5"], capsys)
    line = last_error_line(err)
    assert code == 2 and "other settings (steps: 4 there, 5 now)" in line and "--resume no" in line
    assert (out / "results.jsonl").read_bytes() == before
    (out / "done").write_text("done\n")  # a marker of an older version records no settings
    code, err = run_cli([*base, "--steps", "4"], capsys)
    assert code == 2 and "settings are not recorded" in last_error_line(err)


def test_default_output_folder_names_the_settings():
    from scmd import settings

    fa, fb = (settings.fingerprint(*settings.resolve(settings.parse(scmd_ref.Settings, ["--steps", n], ""),
                                                     scmd_ref.ALGORITHMS, True)) for n in ("20", "21"))
    assert settings.fingerprint_hash(fa) != settings.fingerprint_hash(fb)
    assert settings.fingerprint_hash(fa) == settings.fingerprint_hash(dict(fa))


@pytest.mark.slow
def test_a_fresh_start_over_a_finished_folder_leaves_no_stale_done_marker(tmp_path, data_dir, capsys, monkeypatch):
    """--resume no over a finished run: until the new run finishes, the folder holds no done marker, so a crash
    in between cannot leave the old marker vouching for the new, partial records."""
    out = tmp_path / "run"
    base = ["--data-dir", str(data_dir), "--output-dir", str(out), *QUICK]
    code, err = run_cli(base, capsys)
    assert code == 0, err
    seen = []

    def crash(*a, **k):
        seen.append((out / "done").exists())
        raise KeyboardInterrupt

    monkeypatch.setattr(scmd_ref.SCMDTrainer, "update", crash)
    assert run_cli([*base, "--resume", "no"], capsys)[0] == 130
    assert seen == [False] and not (out / "done").exists() and not (out / "results.jsonl").exists()


@pytest.mark.slow
def test_disk_full_while_checkpointing_is_one_line_and_leaves_no_temp_file(tmp_path, data_dir, capsys, monkeypatch):
    from scmd import outputs

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.torch, "save", full)
    out = tmp_path / "run"
    code, err = run_cli(["--data-dir", str(data_dir), "--output-dir", str(out), *QUICK], capsys)
    line = last_error_line(err)
    assert code == 2 and "cannot write" in line and "No space left on device" in line and "checkpoint" in line
    assert "Traceback" not in err
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / "done").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_data_dir_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, err = run_cli(["--data-dir", str(ro), "--output-dir", str(tmp_path / "out"), *QUICK], capsys)
    assert code == 2 and str(ro) in last_error_line(err) and "writable --data-dir" in last_error_line(err)


@pytest.mark.slow
def test_truncated_images_are_loaded_padded_as_domainbed_and_listed(tmp_path, capsys):
    args = _vlcs(tmp_path, truncated=True)
    code, err = run_cli(args, capsys)
    assert code == 0, err
    out = tmp_path / "out"
    listed = (out / "truncated_images.txt").read_text().split()
    assert [Path(p).name for p in set(listed)] == ["cut.jpg"]
    warn = [ln for ln in err.splitlines() if "truncated image file(s)" in ln]
    assert len(warn) == 1 and "1 truncated" in warn[0] and str(out / "truncated_images.txt") in warn[0]
    assert json.loads((out / "summary.json").read_text())["truncated_images"] == 1


@pytest.mark.slow
def test_domainbed_spellings_are_accepted(tmp_path, data_dir, capsys):
    """--data_dir, --output_dir, --test_envs and DomainBed's algorithm names, as its users type them."""
    out = tmp_path / "run"
    quick = [a for a in QUICK]
    code, err = run_cli(["--data_dir", str(data_dir), "--output_dir", str(out), "--algorithm", "ERM", "--test_envs",
                         "1", *quick], capsys)
    assert code == 0, err
    r = records(out)[0]
    assert r["args"]["algorithm"] == "ERM" and r["args"]["test_envs"] == [1] and r["scmd_args"]["algorithm"] == "erm"
    from scmd import settings

    for name, ours in [("SCMD_no_CM", "scmd-no-cm"), ("scmd_NO_select", "scmd-no-select"), ("Kd", "kd")]:
        s, _ = settings.resolve(settings.parse(scmd_ref.Settings, ["--algorithm", name], ""), scmd_ref.ALGORITHMS, True)
        assert s.algorithm == ours


def test_help_and_bad_flags_answer_before_torch_is_imported():
    for argv in (["--help"], ["--steps", "0"], ["--prompt", "x"]):
        r = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "scmd_ref.py"), *argv],
                           capture_output=True, text=True)
        imported = {ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
        assert "torch" not in imported and "numpy" in imported, argv
        assert r.returncode == (0 if argv == ["--help"] else 2)


def test_every_tensor_of_the_models_follows_the_device(data_dir):
    """The student, teacher (its text features and --teacher-renorm's normalisation buffers), projector,
    theta and the SMA copy all live on the run's device; checked on the meta device, which needs no GPU."""
    from types import SimpleNamespace

    from scmd import settings

    s, hp = settings.resolve(settings.parse(scmd_ref.Settings, ["--teacher-renorm"], ""), scmd_ref.ALGORITHMS, True)
    dev = torch.device("meta")
    index = SimpleNamespace(classes=world.CLASSES, envs=world.ENVIRONMENTS, n_samples=100)
    tr, clip = scmd_ref.build_models(s, hp, index, dev)  # what the run builds
    tensors = {**{f"student.{k}": v for k, v in tr.student.state_dict().items()},
               **{f"teacher.{k}": v for k, v in tr.teacher.state_dict().items()},
               **{f"projector.{k}": v for k, v in tr.projector.state_dict().items()},
               **{f"sma.{k}": v for k, v in tr.sma.net.state_dict().items()}, "theta": tr.theta}
    assert "teacher.renorm_a" in tensors and "teacher.t_hat" in tensors
    tensors.update({f"clip.{k}": v for k, v in clip.state_dict().items()})
    off = sorted(k for k, v in tensors.items() if v.device != dev)
    assert not off, off


def test_an_uncached_pretrained_teacher_fails_at_once_when_the_hub_is_unreachable(monkeypatch):
    import huggingface_hub

    from scmd import models
    from scmd.errors import DataError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)

    def unreachable(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(models.socket, "create_connection", unreachable)
    with pytest.raises(DataError, match="not in the local Hugging Face cache and huggingface.co cannot be reached"):
        models.load_clip("ViT-B-32-quickgelu", "openai", torch.device("cpu"))
