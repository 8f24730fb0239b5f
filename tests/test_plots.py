"""scmd.plots: curves.png and kept_share.png are valid PNGs of the expected size, written atomically; a write
that fails is one DataError and leaves no temporary file behind."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.image
import pytest

from scmd import plots
from scmd.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENVS = ["cartoon", "painting", "photo", "sketch"]


def records(n: int, test_env: int = 0, train_in: bool = False):
    """n records as results.jsonl holds them (every 300 steps); training envs' in-splits only if `train_in`."""
    out = []
    for k in range(n):
        r = {"step": 300 * k, "epoch": 0.1 * k}
        for i in range(len(ENVS)):
            r[f"env{i}_out_acc"] = min(0.95, 0.2 + 0.05 * k + 0.01 * i)
            if i == test_env or train_in:
                r[f"env{i}_in_acc"] = min(0.9, 0.15 + 0.04 * k)
        out.append(r)
    return out


def expected_shape(size):
    return (round(size[1] * plots.DPI), round(size[0] * plots.DPI))


def check_png(path: Path, size) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(str(path))
    assert img.shape[:2] == expected_shape(size)
    assert img.shape[2] in (3, 4)
    assert not list(path.parent.glob(".*.tmp"))


@pytest.mark.parametrize("cutoff", [None, 2400, 3750])
@pytest.mark.parametrize("teacher", [None, [0.964, 0.963, 0.967, 0.948]])
def test_curves_png(tmp_path, cutoff, teacher):
    path = tmp_path / "curves.png"
    plots.plot_curves(records(17, test_env=1, train_in=True), ENVS, 1, cutoff, 1800, teacher, path)
    check_png(path, plots.CURVES_SIZE)


@pytest.mark.parametrize("cutoff,teacher", [(None, None), (3750, [0.9, 0.8, 0.7, 0.6])])
def test_curves_one_record(tmp_path, cutoff, teacher):
    path = tmp_path / "curves.png"
    plots.plot_curves(records(1, test_env=3), ENVS, 3, cutoff, 0, teacher, path)
    check_png(path, plots.CURVES_SIZE)


def test_curves_selected_step_defaults_to_training_domain_validation(tmp_path):
    path = tmp_path / "curves.png"
    plots.plot_curves(records(5), ENVS, 0, None, None, None, path)
    check_png(path, plots.CURVES_SIZE)


def test_curves_replaces_an_existing_file(tmp_path):
    path = tmp_path / "curves.png"
    path.write_bytes(b"old")
    plots.plot_curves(records(3), ENVS, 0, 300, 600, None, path)
    check_png(path, plots.CURVES_SIZE)


def test_curves_without_records_writes_nothing(tmp_path):
    path = tmp_path / "curves.png"
    plots.plot_curves([], ENVS, 0, None, None, None, path)
    assert not path.exists()


def test_write_into_missing_folder_is_a_data_error(tmp_path):
    path = tmp_path / "missing" / "curves.png"
    with pytest.raises(DataError, match="curves.png"):
        plots.plot_curves(records(3), ENVS, 0, None, 300, None, path)
    assert not path.parent.exists()


def test_failed_rename_is_a_data_error_and_leaves_no_temp(tmp_path):
    path = tmp_path / "curves.png"
    path.mkdir()  # the temporary file is written beside it, then cannot be renamed over a folder
    with pytest.raises(DataError, match="cannot write"):
        plots.plot_curves(records(3), ENVS, 0, None, 300, None, path)
    assert path.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


def test_disk_full_is_a_data_error_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "curves.png"

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DataError, match="No space left on device"):
        plots.plot_curves(records(3), ENVS, 0, None, 300, None, path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_a_data_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(DataError):
            plots.plot_curves(records(3), ENVS, 0, None, 300, None, folder / "curves.png")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def kept_report(n_windows: int):
    return {"windows": [{"first_step": 100 * w, "rows_seen": [32, 32, 32, 0],
                         "kept_share": [0.2, 0.25 if w % 2 else None, 0.15, None]} for w in range(n_windows)]}


def test_kept_share_png(tmp_path):
    path = tmp_path / "kept_share.png"
    plots.plot_kept_share(kept_report(6), ENVS, 0.2, path)
    check_png(path, plots.KEPT_SHARE_SIZE)


def test_kept_share_without_windows_writes_nothing(tmp_path):
    path = tmp_path / "kept_share.png"
    plots.plot_kept_share({"windows": []}, ENVS, 0.2, path)
    assert not path.exists()


def test_kept_share_failed_write_is_a_data_error(tmp_path):
    with pytest.raises(DataError):
        plots.plot_kept_share(kept_report(2), ENVS, 0.2, tmp_path / "missing" / "kept_share.png")
