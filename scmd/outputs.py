"""Run outputs that survive a crash: results.jsonl (one whole record per write), checkpoints (temp file,
fsync, rename; loadable with ``torch.load(weights_only=True)``), the ``done`` marker, the final table."""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from scmd.errors import DISK_FULL, DataError, UsageError, first_line, write_cause

RESULTS = "results.jsonl"
DONE = "done"
CKPT_LAST = "checkpoint_last.pt"
CKPT_BEST = "checkpoint_best.pt"
LOCK = ".lock"
LOCK_HOLDER = ".lock.holder"
TRUNCATED = "truncated_images.txt"


def check_finished_run(out: Path, fingerprint: dict) -> None:
    """A folder's ``done`` marker records the settings of its run; refuse to reuse it for other settings."""
    try:
        done = json.loads((out / DONE).read_text())
    except (OSError, ValueError):
        done = None
    if not isinstance(done, dict):
        raise UsageError(f"{out} holds a finished run whose settings are not recorded; use another --output-dir, "
                         f"or --resume no to run again there")
    diff = sorted(k for k in set(fingerprint) | set(done) if fingerprint.get(k) != done.get(k))
    if diff:
        shown = ", ".join(f"{k}: {done.get(k)!r} there, {fingerprint.get(k)!r} now" for k in diff[:4])
        raise UsageError(f"{out} holds a finished run made with other settings ({shown}); use another "
                         f"--output-dir, or --resume no to replace it")


def prepare_output_dir(path: Path) -> None:
    """Create the output folder and prove it is writable, before any work is done."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"output folder {path} is a file; pass another --output-dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        if e.errno in DISK_FULL:
            raise write_error(path / ".write_probe", e, "free space or pass another --output-dir") from None
        raise UsageError(f"output folder {path} is not writable ({e.strerror}); pass --output-dir DIR") from None


@contextlib.contextmanager
def run_lock(out: Path):
    """One run per folder: an exclusive lock on ``out/.lock`` for the whole run (released by the OS if the
    process dies). A second run into the folder fails at once, naming the holder."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(out / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = (out / LOCK_HOLDER).read_text().strip()
        except OSError:
            holder = "holder unknown"
        raise UsageError(f"{out} is in use by another run ({holder}); wait for it to finish, or pass another "
                         f"--output-dir") from None
    try:
        import socket

        try:
            (out / LOCK_HOLDER).write_text(f"pid {os.getpid()} on {socket.gethostname()}, since "
                                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        except OSError as e:
            raise write_error(out / LOCK_HOLDER, e) from None
        yield
    finally:
        (out / LOCK_HOLDER).unlink(missing_ok=True)
        lock.release()


def remove_stale_temps(path: Path) -> None:
    """Temporary files of writes that a crash interrupted (they are never renamed into place). Call it only
    under the run's lock: another run's temporary files would be in use."""
    for p in path.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_error(path, e: OSError, where: str = "free space or pass another --output-dir (the run can be "
                                                 "resumed: rerun the same command)") -> DataError:
    """One DataError naming the file and the cause of a failed write; `where` says what to do about it."""
    cause = write_cause(e)
    if e.errno in DISK_FULL:
        where = where.replace("free space", "free space or lift the limit")
    return DataError(f"cannot write {path}: {cause}; {where}")


@contextlib.contextmanager
def _replaced_atomically(path: Path):
    """Yields a temporary path beside `path`; once the body has written it, it is fsynced and renamed over
    `path` (readers see the old file or the new one, never a part). On error the temporary file goes, and an
    I/O error (disk full, quota, file-size limit, read-only folder) is one DataError naming the path."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # readable as the user's umask says (mkstemp alone gives 0600)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _replaced_atomically(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_torch_save(obj, path: Path) -> None:
    with _replaced_atomically(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            if not _torch_writer_failed(e):
                raise
            _probe_room(tmp, _serialised_size(obj))  # raises the OSError of a full disk or a file-size limit
            raise


def _torch_writer_failed(e: RuntimeError) -> bool:
    """torch's zip writer reports a failed write as a RuntimeError without errno (``[enforce fail at
    inline_container.cc:...] . unexpected pos ...``, ``PytorchStreamWriter failed writing file ...``)."""
    text = str(e)
    return "inline_container" in text or "PytorchStreamWriter" in text or "file write failed" in text


class _ByteCounter:
    """A file-like sink that only counts what torch.save writes into it."""

    def __init__(self):
        self.n = 0

    def write(self, b) -> int:
        self.n += memoryview(b).nbytes
        return len(b)

    def flush(self) -> None:
        pass


def _serialised_size(obj) -> int:
    sink = _ByteCounter()
    torch.save(obj, sink)
    return sink.n


def _probe_room(tmp: str, size: int) -> None:
    """After torch's writer failed on `tmp`: write `size` plain bytes into the same file (emptied first, so that
    its partial content frees its room) and fsync. A full disk, a quota or a file-size limit raises its OSError
    (ENOSPC, EDQUOT, EFBIG) here; if the plain write succeeds, the failure was something else and returns."""
    chunk = bytes(1 << 20)
    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, memoryview(chunk)[:min(left, len(chunk))])
        os.fsync(fd)
    finally:
        os.close(fd)


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line, then fsync: a crash leaves at most a torn last line; a failed write (disk full,
    file-size limit) is cut off again, so the file keeps its whole records only."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:  # a short write (the limit reached in the middle): the rest gets the real errno
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
    except OSError as e:
        raise write_error(path, e) from None


def read_records(path: Path) -> List[dict]:
    """Whole records of results.jsonl; a torn (unparseable) last line is dropped."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # the last line (possibly followed by nothing): torn by a crash
                break
            raise DataError(f"{path} line {i + 1} is not valid JSON; the results file is damaged") from None
    return out


def rewrite_records(path: Path, records: List[dict]) -> None:
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8")
    atomic_write_bytes(path, data)


# ---------------------------------------------------------------------------------------------------------
# RNG state as plain tensors/ints (weights_only-loadable)


def rng_state() -> Dict:
    np_state = np.random.get_state()
    st = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict) -> None:
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def load_checkpoint(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise DataError(f"checkpoint {path} cannot be read ({type(e).__name__}: {first_line(e)}); "
                        f"delete it to start the run afresh") from None


# ---------------------------------------------------------------------------------------------------------
# Reporting


def training_domain_selection(records: List[dict], test_env: int, n_envs: int) -> dict:
    """DomainBed's IIDAccuracySelectionMethod within one run: the record with the highest mean
    out-split accuracy over the training envs (first maximum in file order)."""
    train_envs = [i for i in range(n_envs) if i != test_env]
    best, best_val = None, -1.0
    for r in records:
        val = float(np.mean([r[f"env{i}_out_acc"] for i in train_envs]))
        if val > best_val:
            best, best_val = r, val
    return {"record": best, "val_acc": best_val}


def format_table(envs: List[str], test_env: int, selected: dict, teacher_acc: Optional[List[float]]) -> str:
    rec = selected["record"]
    rows = [f"{'domain':<16} {'role':<6} {'in_acc':>7} {'out_acc':>8} {'teacher0shot':>13}"]
    for i, e in enumerate(envs):
        role = "TEST" if i == test_env else "train"
        t = f"{100 * teacher_acc[i]:>12.1f}%" if teacher_acc is not None else f"{'-':>13}"
        in_acc = rec.get(f"env{i}_in_acc")  # absent for training envs under --eval-splits selection
        in_s = f"{100 * in_acc:>6.1f}%" if in_acc is not None else f"{'-':>7}"
        rows.append(f"{e:<16} {role:<6} {in_s} {100 * rec[f'env{i}_out_acc']:>7.1f}% {t}")
    rows.append(
        f"selected step {rec['step']} (training-domain validation acc {100 * selected['val_acc']:.1f}%); "
        f"test-domain accuracy {100 * rec[f'env{test_env}_in_acc']:.1f}% ({envs[test_env]}, in-split)"
    )
    return "\n".join(rows)
