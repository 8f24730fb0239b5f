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
from scmd import world

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--world-per-class", "6", "--steps", "7", "--checkpoint-freq", "3", "--no-progress", "--workers", "0"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    world.ensure_dataset(d, progress=False, n_per_class=6)
    return d


def run_cli(argv, capsys):
    code = scmd_ref.cli(argv)
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


def test_short_run_writes_domainbed_records_and_report(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    code, err = run_cli(["--data-dir", str(data_dir), "--output-dir", str(out), *QUICK], capsys)
    assert code == 0, err
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


@pytest.mark.skipif(not scmd_ref.fastsel_available(), reason="fastsel not built")
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
    ("NaN loss", lambda t, d: ["--data-dir", str(d), "--output-dir", str(t / "nan"), "--hparams",
                               '{"lr": 1e10}', *QUICK], "at step", 1),
]


def _a_file(t: Path) -> Path:
    f = t / "a_file"
    f.write_text("x")
    return f


def _file_dataset(t: Path):
    (t / "VLCS").write_text("not a folder")
    return ["--dataset", "vlcs", "--data-dir", str(t), *TINY_REAL]


def _vlcs(t: Path, classes_of=None, empty_class=None, zero_byte=None, loop=None):
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
    return ["--dataset", "vlcs", "--data-dir", str(t), "--output-dir", str(t / "out"), *TINY_REAL]


@pytest.mark.parametrize("name,argv,fragment,code", CATALOGUE, ids=_case_ids(CATALOGUE))
def test_bad_input_gives_one_clear_line(name, argv, fragment, code, tmp_path, data_dir, capsys):
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


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scmd_ref.py"), "--dataset", "vlcs", "--data-dir",
                        str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("scmd_ref.py: error: dataset folder") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "scmd_ref.py"), "--dataset", "vlcs", "--data-dir",
                        str(tmp_path), "--debug"], capture_output=True, text=True, cwd=tmp_path)
    assert "Traceback" in r.stderr  # --debug shows it


def test_checkpoint_from_other_settings_is_refused(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    base = ["--data-dir", str(data_dir), "--output-dir", str(out), "--world-per-class", "6", "--checkpoint-freq",
            "3", "--no-progress", "--workers", "0"]
    code, err = run_cli([*base, "--steps", "4"], capsys)
    assert code == 0, err
    (out / "done").unlink()  # pretend it died
    code, err = run_cli([*base, "--steps", "4", "--test-env", "1"], capsys)
    assert code == 2 and "different settings (test_env)" in last_error_line(err)


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
    a = scmd_ref.resolve_settings(scmd_ref.parse_args(["--steps", "20"]))
    b = scmd_ref.resolve_settings(scmd_ref.parse_args(["--steps", "21"]))
    fa = scmd_ref.run_fingerprint(a, {"lr": 5e-5})
    fb = scmd_ref.run_fingerprint(b, {"lr": 5e-5})
    from scmd import outputs

    assert outputs.fingerprint_hash(fa) != outputs.fingerprint_hash(fb)
    assert outputs.fingerprint_hash(fa) == outputs.fingerprint_hash(dict(fa))
