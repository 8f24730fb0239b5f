"""Download the five DomainBed datasets into the folder layout scmd reads.

    python -m scmd.download pacs --data-dir data          # -> data/PACS/<domain>/<class>/<image>

``download_dataset(name, data_dir)`` returns ``<data_dir>/<folder>``: ``VLCS``, ``PACS``, ``office_home``,
``terra_incognita`` or ``domain_net``, each holding one folder per domain and one per class inside it.

Sources (the ones DomainBed's own download script uses):

* VLCS, PACS, OfficeHome: one archive each on Google Drive (DomainBed's file ids below), unpacked as is;
  the PACS zip holds ``kfold/`` and the OfficeHome zip ``OfficeHomeDataset_10072016/``, renamed here.
* TerraIncognita: the Caltech Camera Traps images ``eccv_18_all_images_sm.tar.gz`` and its image-level
  annotations (``caltech_camera_traps.json.zip``) from LILA. Only the images of camera locations 38, 43, 46
  and 100 whose annotation is one of DomainBed's 10 classes are kept, as
  ``terra_incognita/location_<L>/<class>/<file>``; an image with several such annotations goes to each class.
* DomainNet: the six domain zips of the VisDA 2019 multi-source site (the "groundtruth" versions of clipart
  and painting, as DomainBed), then the files named in DomainBed's ``domain_net_duplicates.txt`` are removed.
  That list (~8k paths) is fetched from DomainBed's repository at run time rather than copied in here.

The files are fetched with ``gdown`` (Google Drive's confirmation pages, resume, and with gdown 6 retries and
timeouts; it also fetches the plain HTTP files). ``ARCHIVE_MD5`` is the checksum table: a file with a known md5
is verified; one whose md5 is unknown (``None``; DomainBed's script states no checksum) is used with one line
saying it was not checksum-verified, and its md5 is printed and written to the completion marker.

How a download proceeds, so that an interrupted or failed one never looks complete:

1. ``<data_dir>/<folder>/.scmd_download_complete.json`` exists: the dataset is there, nothing is fetched. A
   folder without that marker that already has every domain folder (unpacked by hand) is used as it is; one
   that lacks domains is an error, never overwritten.
2. Each file is fetched to ``<data_dir>/_downloads/<file>``. Until all its bytes arrived they are in a
   ``<file>XXXXXXXX.part`` next to it, which the next run resumes. A file already at that name (also one saved
   there by hand) is not fetched again. Its md5 is then checked; a file that fails the check is moved to
   ``<file>.bad`` (never used again) and the download stops with an error.
3. The archives are unpacked into ``<data_dir>/.<folder>.partial`` (tar members through ``tarfile``'s
   ``data`` extraction filter, zip members after a path check; absolute or ``..`` paths are refused), the
   domain folders are checked, the marker is written, and only then is the folder renamed to
   ``<data_dir>/<folder>``. The archives are then deleted (``keep_archives=True`` keeps them).

Any network failure raises :class:`scmd.errors.DataError` with one line: the URL, the cause, and how to get
the data by hand. A lock file (``filelock``) serialises concurrent calls for the same dataset.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import gzip
import hashlib
import inspect
import json
import lzma
import os
import re
import shutil
import socket
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import filelock
import gdown
import requests
from tqdm import tqdm

from scmd.datasets import DATASETS
from scmd.errors import DataError, ScmdError, UsageError, write_cause

MARKER = ".scmd_download_complete.json"
DOWNLOADS = "_downloads"
RETRIES = 2  # gdown's extra attempts per file after a transient network failure (it resumes the transfer)
# gdown 6.x (Python >= 3.10) takes timeout, retries and hasher; 5.x (the last for Python 3.9) does not, so
# only the arguments the installed gdown accepts are passed, and the md5 is then read back from the file.
_GDOWN_PARAMS = frozenset(inspect.signature(gdown.download).parameters)
_GDOWN_ERRORS = tuple(getattr(gdown.exceptions, n) for n in ("DownloadError", "FileURLRetrievalError")
                      if hasattr(gdown.exceptions, n))
CHUNK = 1 << 20

TERRA_LOCATIONS = tuple(e.split("_", 1)[1] for e in DATASETS["terraincognita"].envs)  # the folders' ids
TERRA_CLASSES = ("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel")
TERRA_IMAGES_DIR = "eccv_18_all_images_sm"
DOMAINNET_DOMAINS = tuple(DATASETS["domainnet"].envs)

# The md5 of every file fetched, by file name. None = unknown: DomainBed's download script states no checksum
# and none is known with certainty from the publishers (LILA, the VisDA 2019 site, the Drive copies), so these
# files are not verified; a download prints its md5 and the completion marker records it. Fill in a value only
# from a source that states it; a known value is always checked.
ARCHIVE_MD5: Dict[str, Optional[str]] = {
    "VLCS.tar.gz": None,  # unknown
    "PACS.zip": None,  # unknown
    "office_home.zip": None,  # unknown
    "eccv_18_all_images_sm.tar.gz": None,  # unknown
    "caltech_camera_traps.json.zip": None,  # unknown
    "domain_net_duplicates.txt": None,  # unknown (fetched from DomainBed's main branch)
    **{f"{d}.zip": None for d in DOMAINNET_DOMAINS},  # unknown
}


def gdrive_url(file_id: str) -> str:
    """The public link of a Drive file (the one DomainBed's script uses), for messages and the marker."""
    return f"https://drive.google.com/uc?id={file_id}"


@dataclass(frozen=True)
class Remote:
    """One file to fetch into ``<data_dir>/_downloads/<filename>``: from ``urls`` (mirrors, tried in
    order) or from the Google Drive file ``gdrive_id``."""

    filename: str
    urls: Tuple[str, ...] = ()
    gdrive_id: Optional[str] = None

    @property
    def sources(self) -> Tuple[str, ...]:
        return (gdrive_url(self.gdrive_id),) if self.gdrive_id else self.urls


Builder = Callable[[List[Path], Path, bool], Path]


@dataclass(frozen=True)
class Spec:
    folder: str
    envs: Tuple[str, ...]
    remotes: Tuple[Remote, ...]
    build: Builder  # (downloaded files in remotes' order, empty work folder, progress) -> dataset folder


def _say(msg: str) -> None:
    print(f"[download] {msg}", file=sys.stderr, flush=True)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------------------
# Fetching


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything behind it (causes, contexts, urllib3's ``reason``), breadth first."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [x for x in (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args)
                 if isinstance(x, BaseException)]


def _cause(exc: BaseException) -> str:
    """A short, one-line description of why a download failed."""
    if type(exc).__name__ == "FileURLRetrievalError":
        return ("Google Drive did not hand out the file (over its download quota for today, moved, or no longer "
                "shared)")
    for e in _chain(exc):
        if isinstance(e, requests.HTTPError) and e.response is not None:
            return _one_line(f"HTTP {e.response.status_code} {e.response.reason or ''}")
        if isinstance(e, (requests.Timeout, socket.timeout, TimeoutError)):
            return "timed out"
        if isinstance(e, socket.gaierror):
            return "cannot resolve the host name"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, ConnectionResetError):
            return "connection reset by the server"
    text = str(exc).strip().splitlines()
    return _one_line(text[0][:300]).rstrip(".") if text else type(exc).__name__


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _looks_like_a_web_page(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def _verify(target: Path, digest: Optional[str] = None) -> str:
    """Check ``target`` against ``ARCHIVE_MD5``; return its md5. A mismatch moves it to ``<file>.bad``."""
    digest = digest or _md5(target)
    expected = ARCHIVE_MD5.get(target.name)
    if expected is None:
        _say(f"{target.name} was not checksum-verified (no md5 is known for it); its md5 is {digest}")
        return digest
    if digest != expected.lower():
        bad = target.with_name(target.name + ".bad")
        os.replace(target, bad)
        raise DataError(f"{target.name} has md5 {digest}, not the expected {expected} (a corrupted or changed "
                        f"file); it was moved to {bad}; rerun to download it again")
    return digest


def _fetch(remote: Remote, dl_dir: Path, timeout: float, dest_hint: Path, progress: bool) -> Tuple[Path, str]:
    """``<dl_dir>/<filename>`` and its md5: downloaded unless it is already there; every source in order."""
    target = dl_dir / remote.filename
    if target.is_file():
        _say(f"using {target} (already downloaded)")
        return target, _verify(target)
    failures: List[Tuple[str, str]] = []
    for source in remote.sources:
        hasher = hashlib.md5()
        _say(f"downloading {remote.filename} from {source}")
        kwargs = {"timeout": timeout, "retries": RETRIES, "hasher": hasher}
        try:
            gdown.download(**({"id": remote.gdrive_id} if remote.gdrive_id else {"url": source}),
                           output=str(target), quiet=not progress, resume=True,
                           **{k: v for k, v in kwargs.items() if k in _GDOWN_PARAMS})
        except (requests.RequestException, *_GDOWN_ERRORS) as e:
            failures.append((source, _cause(e)))
            continue
        except OSError as e:
            raise DataError(_one_line(f"cannot write {target}: {write_cause(e)}; free disk space or choose "
                                      "another --data-dir")) from None
        if not target.is_file():  # gdown 5 returns without a file when several .part files are there
            failures.append((source, f"no file arrived (several {remote.filename}*.part in {dl_dir}? keep one)"))
            continue
        if _looks_like_a_web_page(target):
            target.unlink()
            failures.append((source, "the server answered with a web page instead of the file (moved or blocked?)"))
            continue
        return target, _verify(target, hasher.hexdigest() if "hasher" in _GDOWN_PARAMS else None)
    first, cause = failures[0]
    more = "".join(f"; mirror {u}: {c}" for u, c in failures[1:])
    raise DataError(_one_line(
        f"cannot download {remote.filename} from {first}: {cause}{more}. No network? Download {first} by hand "
        f"and unpack it to {dest_hint} in the DomainBed layout (or save it as {target} and rerun)"))


# ---------------------------------------------------------------------------------------------------------
# Archives


def _junk(name: str) -> bool:
    """macOS resource forks and folder metadata, never unpacked."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return not parts or parts[0] == "__MACOSX" or parts[-1].startswith("._") or parts[-1] == ".DS_Store"


def _unsafe(name: str) -> DataError:
    return DataError(f"unsafe path {name!r} in an archive; the download is not what was expected")


def _check_inside(name: str) -> None:
    """An archive member's name must stay inside the folder it is unpacked into."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or ".." in PurePosixPath(norm).parts:
        raise _unsafe(name)


def _bad_archive(archive: Path, err: Union[str, BaseException]) -> DataError:
    return DataError(_one_line(f"{archive} is not a readable archive ({err}); delete it and rerun to download "
                               "it again"))


_READ_ERRORS = (tarfile.TarError, gzip.BadGzipFile, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error,
                lzma.LZMAError)
_FILTER_ERRORS = (tarfile.FilterError,) if hasattr(tarfile, "data_filter") else ()


def _tar_filter(member: tarfile.TarInfo, dest: str) -> Optional[tarfile.TarInfo]:
    if _junk(member.name):
        return None
    _check_inside(member.name)  # absolute and ``..`` names are refused, not rewritten
    if hasattr(tarfile, "data_filter"):
        return tarfile.data_filter(member, dest)  # raises a FilterError for links out of dest, devices, ...
    return member if member.isfile() or member.isdir() else None  # older Pythons: no links, no devices


_DECOMPRESSORS = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")), (b"BZh", bz2.BZ2File),
                  (b"\xfd7zXZ\x00", lzma.LZMAFile))  # these raise EOFError on a truncated archive


@contextlib.contextmanager
def _open_tar(archive: Path, progress: bool, desc: str) -> Iterator[tarfile.TarFile]:
    """One streaming pass over a (compressed) tar, with progress over its bytes."""
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(open(archive, "rb"))
        head = raw.read(6)
        raw.seek(0)
        f = stack.enter_context(tqdm.wrapattr(raw, "read", total=archive.stat().st_size, desc=desc,
                                              disable=not progress, file=sys.stderr))
        decompress = next((d for magic, d in _DECOMPRESSORS if head.startswith(magic)), None)
        if decompress is not None:
            f = stack.enter_context(decompress(f))
        yield stack.enter_context(tarfile.open(fileobj=f, mode="r|"))


def extract(archive: Path, dest: Path, progress: bool = True) -> None:
    """Unpack a zip or (gz/bz2/xz) tar into ``dest``: nothing outside ``dest`` (an absolute or ``..`` member is
    an error), no links out of it, no device files, no macOS resource forks."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = [i for i in zf.infolist() if not _junk(i.filename)]
                for info in infos:  # every name is checked before anything is written
                    _check_inside(info.filename)
                with tqdm(total=sum(i.file_size for i in infos), desc=f"unpacking {archive.name}", file=sys.stderr,
                          disable=not progress, unit="B", unit_scale=True, unit_divisor=1024) as bar:
                    for info in infos:
                        zf.extract(info, dest)
                        bar.update(info.file_size)
        elif tarfile.is_tarfile(archive):
            with _open_tar(archive, progress, f"unpacking {archive.name}") as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(dest, filter=_tar_filter)
                else:
                    tar.extractall(dest, members=(m for m in tar if _tar_filter(m, str(dest)) is not None))
        else:
            raise _bad_archive(archive, "neither zip nor tar")
    except _FILTER_ERRORS as e:
        raise _unsafe(e.tarinfo.name) from None
    except _READ_ERRORS as e:
        raise _bad_archive(archive, e) from None


def _single_subfolder(root: Path) -> Optional[Path]:
    subs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return subs[0] if len(subs) == 1 else None


def _missing_envs(folder: Path, envs: Sequence[str]) -> List[str]:
    return [e for e in envs if not (folder / e).is_dir() or not any((folder / e).iterdir())]


# ---------------------------------------------------------------------------------------------------------
# Per-dataset procedures


def _unpack_folder(top: str, envs: Sequence[str]) -> Builder:
    """One archive holding one folder (``top``) with the domain folders inside."""

    def build(files: List[Path], work: Path, progress: bool) -> Path:
        out = work / "unpacked"
        extract(files[0], out, progress)
        if (out / top).is_dir():
            return out / top
        if all((out / e).is_dir() for e in envs):
            return out
        only = _single_subfolder(out)
        if only is not None:
            return only
        found = sorted(p.name for p in out.iterdir())
        raise DataError(_one_line(f"{files[0]} does not hold the folder {top!r} (found {found[:6]}); delete it "
                                  "and rerun, or unpack the dataset by hand"))

    return build


def _terra_plan(annotations: dict) -> Dict[str, Set[str]]:
    """image file name (relative to ``eccv_18_all_images_sm/``) -> ``location_<L>/<class>/<basename>`` for
    every image of the kept locations and every annotation of a kept class."""
    try:
        names = {c["id"]: c["name"] for c in annotations["categories"]}
        images = {}
        for im in annotations["images"]:
            loc = str(im.get("location"))
            fname = str(im["file_name"]).replace("\\", "/")
            if loc in TERRA_LOCATIONS and fname.rsplit("/", 1)[-1] not in ("", ".", ".."):
                images[im["id"]] = (loc, fname)
        plan: Dict[str, Set[str]] = {}
        for ann in annotations["annotations"]:
            hit = images.get(ann.get("image_id"))
            cls = names.get(ann.get("category_id"))
            if hit is None or cls not in TERRA_CLASSES:
                continue
            loc, fname = hit
            plan.setdefault(fname, set()).add(f"location_{loc}/{cls}/{fname.rsplit('/', 1)[-1]}")
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"the TerraIncognita annotation file is not in the COCO Camera Traps format ({e!r})") from None
    return plan


def _read_terra_annotations(path: Path) -> dict:
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                jsons = [i for i in zf.infolist() if i.filename.lower().endswith(".json") and not _junk(i.filename)]
                if not jsons:
                    raise DataError(f"{path} holds no .json annotation file; delete it and rerun")
                with zf.open(max(jsons, key=lambda i: i.file_size)) as f:
                    return json.load(f)
        with open(path, "rb") as f:
            return json.load(f)
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad_archive(path, e) from None


def _build_terra(files: List[Path], work: Path, progress: bool) -> Path:
    """Reorganise the Caltech Camera Traps images into ``location_<L>/<class>/`` (one pass over the tar,
    writing only the images that are kept, to paths made from the annotations, not from the tar)."""
    images_tar, annotations_file = files
    plan = _terra_plan(_read_terra_annotations(annotations_file))
    if not plan:
        raise DataError(f"{annotations_file} lists no image of locations {', '.join(TERRA_LOCATIONS)} with "
                        f"one of the classes {', '.join(TERRA_CLASSES)}")
    by_base: Dict[str, str] = {k.rsplit("/", 1)[-1]: k for k in plan}
    out = work / "terra_incognita"
    out.mkdir(parents=True)
    found: Set[str] = set()
    try:
        with _open_tar(images_tar, progress, f"reading {images_tar.name}") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = PurePosixPath(member.name.replace("\\", "/")).parts
                parts = parts[1:] if parts[:1] == (TERRA_IMAGES_DIR,) else parts
                rel = "/".join(parts)
                key = rel if rel in plan else by_base.get(parts[-1] if parts else "")
                src = tar.extractfile(member) if key is not None and key not in found else None
                if src is None:
                    continue
                targets = sorted(plan[key])
                for t in targets:
                    (out / t).parent.mkdir(parents=True, exist_ok=True)
                with open(out / targets[0], "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                for t in targets[1:]:
                    shutil.copyfile(out / targets[0], out / t)
                found.add(key)
    except _READ_ERRORS as e:
        raise _bad_archive(images_tar, e) from None
    if not found:
        raise DataError(f"{images_tar} holds none of the images its annotations list; delete it and rerun")
    missing = len(plan) - len(found)
    if missing:
        _say(f"warning: {missing} of {len(plan)} annotated images were not in {images_tar.name}")
    for loc in TERRA_LOCATIONS:
        d = out / f"location_{loc}"
        have = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        absent = [c for c in TERRA_CLASSES if c not in have]
        if have and absent:
            _say(f"warning: location_{loc} has no image of {', '.join(absent)}")
    _say(f"terra_incognita: {len(found)} images in {len(TERRA_LOCATIONS)} locations")
    return out


def _read_duplicates(path: Path) -> List[str]:
    """DomainBed's DomainNet duplicate list: one ``<domain>/<class>/<file>`` path a line."""
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the DomainNet duplicate list {path}: {e}; delete it and rerun") from None
    paths = [ln for ln in lines if ln and not ln.startswith("#")]
    bad = [p for p in paths if len(p.split("/")) != 3 or p.split("/")[0] not in DOMAINNET_DOMAINS or ".." in p]
    if not paths or bad:
        raise DataError(_one_line(f"{path} is not DomainBed's DomainNet duplicate list (expected lines like "
                                  f"clipart/<class>/<file>, got {(bad or ['an empty file'])[0]!r}); delete it and "
                                  "rerun"))
    return paths


def _build_domainnet(files: List[Path], work: Path, progress: bool) -> Path:
    duplicates, zips = files[0], files[1:]
    remove = _read_duplicates(duplicates)  # checked before hours of unpacking
    out = work / "domain_net"
    for z in zips:
        extract(z, out, progress)
    removed = 0
    for rel in remove:
        p = out.joinpath(*rel.split("/"))
        if p.is_file():
            p.unlink()
            removed += 1
    _say(f"domain_net: removed {removed} of the {len(remove)} duplicate images DomainBed lists")
    return out


_VLCS_ENVS, _PACS_ENVS, _OFFICEHOME_ENVS = (tuple(DATASETS[k].envs) for k in ("vlcs", "pacs", "officehome"))
_VISDA = "http://csr.bu.edu/ftp/visda/2019/multi-source"
_LILA_GCP = "https://storage.googleapis.com/public-datasets-lila/caltechcameratraps"
_LILA_AZURE = "https://lilablobssc.blob.core.windows.net/caltechcameratraps"  # DomainBed's (older) host

SPECS: Dict[str, Spec] = {
    # Google Drive ids as in DomainBed's domainbed/scripts/download.py.
    "vlcs": Spec("VLCS", _VLCS_ENVS, (Remote("VLCS.tar.gz", gdrive_id="1skwblH1_okBwxWxmRsp9_qi15hyPpxg8"),),
                 _unpack_folder("VLCS", _VLCS_ENVS)),
    "pacs": Spec("PACS", _PACS_ENVS, (Remote("PACS.zip", gdrive_id="1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd"),),
                 _unpack_folder("kfold", _PACS_ENVS)),
    "officehome": Spec("office_home", _OFFICEHOME_ENVS,
                       (Remote("office_home.zip", gdrive_id="1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC"),),
                       _unpack_folder("OfficeHomeDataset_10072016", _OFFICEHOME_ENVS)),
    "terraincognita": Spec(
        "terra_incognita", tuple(DATASETS["terraincognita"].envs),
        (
            Remote("eccv_18_all_images_sm.tar.gz", urls=(f"{_LILA_GCP}/eccv_18_all_images_sm.tar.gz",
                                                         f"{_LILA_AZURE}/eccv_18_all_images_sm.tar.gz")),
            Remote("caltech_camera_traps.json.zip", urls=(f"{_LILA_GCP}/labels/caltech_camera_traps.json.zip",
                                                          f"{_LILA_AZURE}/labels/caltech_camera_traps.json.zip")),
        ),
        _build_terra),
    "domainnet": Spec(
        "domain_net", DOMAINNET_DOMAINS,
        (Remote("domain_net_duplicates.txt", urls=(
            "https://raw.githubusercontent.com/facebookresearch/DomainBed/main/domainbed/misc/"
            "domain_net_duplicates.txt",)),)
        + tuple(Remote(f"{d}.zip", urls=(f"{_VISDA}/{'groundtruth/' if d in ('clipart', 'painting') else ''}{d}.zip",))
                for d in DOMAINNET_DOMAINS),
        _build_domainnet),
}


def canonical_name(name: str) -> str:
    """``vlcs``, ``pacs``, ``officehome``, ``terraincognita`` or ``domainnet`` (also the folder names and
    DomainBed's class names, any case); a UsageError for anything else."""
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key in SPECS:
        return key
    raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(SPECS)}")


# ---------------------------------------------------------------------------------------------------------
# Entry points


def _write_marker(folder: Path, name: str, spec: Spec, md5s: Dict[str, str]) -> None:
    info = {
        "dataset": name,
        "folder": spec.folder,
        "domains": list(spec.envs),
        "sources": [s for r in spec.remotes for s in r.sources],
        "md5": md5s,
        "md5_verified": sorted(f for f in md5s if ARCHIVE_MD5.get(f)),
        "completed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / MARKER).write_text(json.dumps(info, indent=1) + "\n")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``, saying so when another process holds it."""
    lock = filelock.FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        _say(f"another process is downloading into the same folder; waiting for it ({path})")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def download_dataset(name: str, data_dir: Union[str, Path], timeout: float = 20.0, *, keep_archives: bool = False,
                     progress: bool = True) -> Path:
    """Make sure ``<data_dir>/<folder>`` holds the dataset ``name`` in the DomainBed layout; return that folder.

    ``timeout`` bounds each connection attempt and each wait for bytes (seconds; gdown 5, the last for Python
    3.9, has no timeout and ignores it). Raises UsageError for an
    unknown name and DataError (one line: URL, cause, fix) when the data cannot be fetched, verified or unpacked.
    """
    key = canonical_name(name)
    spec = SPECS[key]
    if not timeout > 0:
        raise UsageError(f"the download timeout must be positive, got {timeout!r}")
    root = Path(data_dir).expanduser()
    final = root / spec.folder
    if (final / MARKER).is_file():
        return final
    if final.exists():
        return _existing(final, spec)
    try:
        dl_dir = root / DOWNLOADS
        dl_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(_one_line(f"cannot create {root / DOWNLOADS}: {e.strerror or e}")) from None
    with _lock(dl_dir / f"{spec.folder}.lock"):
        if (final / MARKER).is_file():  # finished by another process while we waited
            return final
        if final.exists():
            return _existing(final, spec)
        fetched = [_fetch(r, dl_dir, timeout, final, progress) for r in spec.remotes]
        files = [f for f, _ in fetched]
        work = root / f".{spec.folder}.partial"
        if work.exists():
            shutil.rmtree(work)  # a crashed earlier unpack: never trusted, redone from the archives
        work.mkdir()
        try:
            _say(f"unpacking {spec.folder}")
            try:
                built = spec.build(files, work, progress)
            except OSError as e:
                raise DataError(_one_line(f"cannot unpack {spec.folder} into {work}: {write_cause(e)}; free "
                                          "disk space or choose another --data-dir")) from None
            missing = _missing_envs(built, spec.envs)
            if missing:
                raise DataError(_one_line(f"the downloaded {spec.folder} lacks the domain folders {missing}; "
                                          f"delete {dl_dir} and rerun, or unpack the dataset to {final} by hand"))
            extra = sorted(p.name for p in built.iterdir() if p.is_dir() and p.name not in spec.envs)
            if extra:
                _say(f"warning: {final} also has the folders {extra}, which scmd would read as domains")
            try:
                _write_marker(built, key, spec, {f.name: m for f, m in fetched})
                os.replace(built, final)
            except OSError as e:
                raise DataError(_one_line(f"cannot finish {final} (marker file, rename): {write_cause(e)}")) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if not keep_archives:
            for f in files:
                f.unlink(missing_ok=True)
    _say(f"{spec.folder} ready in {final}")
    return final


def _existing(final: Path, spec: Spec) -> Path:
    """A dataset folder that this module did not complete (no marker): used when it has every domain."""
    if not final.is_dir():
        raise DataError(f"{final} exists but is not a folder; move it away and rerun")
    missing = _missing_envs(final, spec.envs)
    if missing:
        raise DataError(_one_line(f"{final} exists but lacks the domain folders {missing} (an incomplete copy?); "
                                  "move it away and rerun to download it, or complete it by hand"))
    _say(f"using {final} as it is (it has every domain folder but no download marker)")
    return final


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scmd.download",
                                 description="Download DomainBed datasets into the layout scmd reads.")
    ap.add_argument("names", nargs="+", metavar="NAME", help=f"dataset: {', '.join(SPECS)}")
    ap.add_argument("--data-dir", required=True, help="parent folder of the dataset folders")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per connection/read (default 20)")
    ap.add_argument("--keep-archives", action="store_true", help="keep the downloaded archives in _downloads/")
    args = ap.parse_args(argv)
    try:
        for n in args.names:
            print(download_dataset(n, args.data_dir, args.timeout, keep_archives=args.keep_archives))
    except ScmdError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume the download", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
