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

How a download proceeds, so that an interrupted or failed one never looks complete:

1. ``<data_dir>/<folder>/.scmd_download_complete.json`` exists: the dataset is there, nothing is fetched. A
   folder without that marker that already has every domain folder (unpacked by hand) is used as it is; one
   that lacks domains is an error, never overwritten.
2. Each file is fetched to ``<data_dir>/_downloads/<file>.part`` (a short TCP check of the host first, so an
   offline machine fails in seconds), resumed with an HTTP Range request when a ``.part`` of the same source
   is there, and renamed to ``<data_dir>/_downloads/<file>`` when all its bytes arrived. A file already at that
   name (also one saved there by hand) is not fetched again.
3. The archives are unpacked into ``<data_dir>/.<folder>.partial``, the domain folders are checked, the
   marker is written, and only then is the folder renamed to ``<data_dir>/<folder>``. The archives are then
   deleted (``keep_archives=True`` keeps them).

Any network failure raises :class:`scmd.errors.DataError` with one line: the URL, the cause, and how to get
the data by hand. A lock file serialises concurrent calls for the same dataset (POSIX only).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.client
import json
import lzma
import os
import re
import shutil
import socket
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path
from typing import IO, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

from scmd.datasets import DATASETS
from scmd.errors import DataError, ScmdError, UsageError

MARKER = ".scmd_download_complete.json"
DOWNLOADS = "_downloads"
CHUNK = 1 << 20
PROBE_TIMEOUT = 5.0  # the first connection check never waits longer than this
USER_AGENT = "scmd-download/0.1 (python-urllib)"

# Google Drive: the bytes come from this endpoint; a file too large for Drive's virus scan answers with an
# HTML page whose "download anyway" form carries the confirmation fields (module-level so tests can move it).
GDRIVE_DOWNLOAD = "https://drive.usercontent.google.com/download"

TERRA_LOCATIONS = tuple(e.split("_", 1)[1] for e in DATASETS["terraincognita"].envs)  # the folders' ids
TERRA_CLASSES = ("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel")
TERRA_IMAGES_DIR = "eccv_18_all_images_sm"
DOMAINNET_DOMAINS = tuple(DATASETS["domainnet"].envs)


def gdrive_url(file_id: str) -> str:
    """The public link of a Drive file (the one DomainBed's script uses), for messages and resume tags."""
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


# ---------------------------------------------------------------------------------------------------------
# Small helpers


def _say(msg: str) -> None:
    print(f"[download] {msg}", file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _cause(exc: BaseException) -> str:
    """A short, one-line description of why a network operation failed."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return _cause(reason) if isinstance(reason, BaseException) else _one_line(reason)
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the server"
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed before the end of the file"
    if isinstance(exc, OSError) and exc.strerror:
        return _one_line(exc.strerror)
    return _one_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


class _NetFail(Exception):
    """A failed attempt at one source; the caller tries the next mirror or raises a DataError."""


class _Progress:
    """Bytes done / total on stderr: a tqdm bar, or a line every few seconds without tqdm."""

    def __init__(self, label: str, total: Optional[int], initial: int = 0, enabled: bool = True):
        self.label, self.total, self.done, self.enabled = label, total, initial, enabled
        self._bar = None
        self._last = 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=label, file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10.0,
                         dynamic_ncols=True, leave=True)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last > 5.0:
            self._last = time.monotonic()
            total = f" / {_size(self.total)}" if self.total else ""
            _say(f"{self.label}: {_size(self.done)}{total}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _size(n: Optional[int]) -> str:
    if n is None:
        return "?"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} GiB"


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (flock; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                yield  # no locking on this file system (e.g. some NFS mounts)
                return
            _say(f"another process is downloading into the same folder; waiting for it ({path})")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------
# Network


def _probe(url: str, timeout: float) -> Optional[str]:
    """Open (and close) a TCP connection to the URL's host, or to the proxy urllib would use for it.

    Returns None on success, else the cause. Name resolution has no timeout of its own, so the attempt runs
    in a daemon thread that is abandoned after ``timeout``.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or host, p.port or (443 if p.scheme == "https" else 80)
    result: List[Optional[str]] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except Exception as e:  # any failure is the cause
            result.append(_cause(e))

    t = threading.Thread(target=attempt, name=f"probe-{host}", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if not result:
        return f"no answer from {host}:{port} within {timeout:g} s"
    cause = result[0]
    return None if cause is None else f"{cause} ({host}:{port})"


def _opener(jar: CookieJar) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))


def _open(opener: urllib.request.OpenerDirector, url: str, timeout: float,
          headers: Optional[Dict[str, str]] = None) -> http.client.HTTPResponse:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    try:
        return opener.open(req, timeout=timeout)
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError/HTTPError are OSErrors
        raise _NetFail(_cause(e)) from e


def _is_html(resp) -> bool:
    return (resp.headers.get("Content-Type") or "").lower().startswith("text/html")


class _DriveForm(HTMLParser):
    """The form of Drive's "can't scan this file for viruses" page: its action and hidden fields."""

    def __init__(self) -> None:
        super().__init__()
        self.action: Optional[str] = None
        self.fields: Dict[str, str] = {}
        self.title = ""
        self._in_form = self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        if tag == "form" and self.action is None and ("download" in a.get("id", "") or "download" in
                                                        a.get("action", "")):
            self.action, self._in_form = a.get("action"), True
        elif tag == "input" and self._in_form and a.get("name") and a.get("type", "").lower() == "hidden":
            self.fields[a["name"]] = a.get("value", "")
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def _resolve_gdrive(opener: urllib.request.OpenerDirector, jar: CookieJar, file_id: str, timeout: float) -> str:
    """The URL that serves the file's bytes.

    Small files come straight from ``GDRIVE_DOWNLOAD?id=..&export=download``. For large ones Drive answers
    with an HTML warning page instead; the bytes then come from the page's form (its action URL with its
    hidden fields: id, export, confirm, uuid) or, on older pages, from ``confirm=<token>`` where the token
    is in a ``download_warning*`` cookie.
    """
    first = f"{GDRIVE_DOWNLOAD}?{urllib.parse.urlencode({'id': file_id, 'export': 'download'})}"
    resp = _open(opener, first, timeout)
    with resp:
        if not _is_html(resp):
            return first
        try:
            page = resp.read(2 << 20).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as e:
            raise _NetFail(_cause(e)) from e
    form = _DriveForm()
    form.feed(page)
    if form.action:  # current pages: hidden fields; older ones: everything in the action's query
        action = urllib.parse.urljoin(first, form.action)
        if not form.fields:
            return action
        return f"{action}{'&' if '?' in action else '?'}{urllib.parse.urlencode(form.fields)}"
    for cookie in jar:
        if cookie.name.startswith("download_warning"):
            return f"{first}&{urllib.parse.urlencode({'confirm': cookie.value})}"
    title = _one_line(form.title) or "no download form on it"
    raise _NetFail(f"Google Drive answered with a web page instead of the file ({title!r}; the file may be "
                   "over its download quota for today, or moved)")


def _stream(opener: urllib.request.OpenerDirector, url: str, part: Path, timeout: float, label: str,
            resume: bool, progress: bool) -> None:
    """Fetch ``url`` into ``part``, appending to it (HTTP Range) when ``resume`` and it has bytes."""
    have = part.stat().st_size if resume and part.exists() else 0
    try:
        resp = _open(opener, url, timeout, {"Range": f"bytes={have}-"} if have else None)
    except _NetFail as e:
        if not (have and isinstance(e.__cause__, urllib.error.HTTPError) and e.__cause__.code == 416):
            raise
        have = 0  # "range not satisfiable": the .part is complete or stale; start again
        resp = _open(opener, url, timeout)
    with resp:
        if _is_html(resp):
            raise _NetFail("the server answered with a web page instead of the file (moved or blocked?)")
        total: Optional[int] = None
        m = re.match(r"bytes (\d+)-\d+/(\d+)", resp.headers.get("Content-Range") or "")
        if have and resp.status == 206 and m and int(m.group(1)) == have:
            total = int(m.group(2))
            _say(f"resuming {label} at {_size(have)}")
        else:
            have = 0  # no range support (or a fresh start): from the beginning
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if total is not None:
            free = shutil.disk_usage(part.parent).free
            if total - have > free:
                raise DataError(f"not enough disk space for {label}: {_size(total - have)} needed, "
                                f"{_size(free)} free in {part.parent}; free space or choose another --data-dir")
        bar = _Progress(label, total, have, progress)
        try:
            with open(part, "ab" if have else "wb") as f:
                while True:
                    try:
                        chunk = resp.read(CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        raise _NetFail(f"{_cause(e)} after {_size(bar.done)}") from e
                    if not chunk:
                        break
                    f.write(chunk)
                    bar.update(len(chunk))
        except OSError as e:
            raise DataError(_one_line(f"cannot write {part}: {e.strerror or e}; free disk space or choose "
                                      "another --data-dir")) from None
        finally:
            bar.close()
    got = part.stat().st_size
    if total is not None and got != total:
        raise _NetFail(f"the connection ended at {_size(got)} of {_size(total)}")


def _fetch(remote: Remote, dl_dir: Path, timeout: float, dest_hint: Path, progress: bool) -> Path:
    """``<dl_dir>/<filename>``, downloaded unless it is already there. Tries every source in order."""
    target = dl_dir / remote.filename
    if target.is_file():
        _say(f"using {target} (already downloaded)")
        return target
    part = dl_dir / f"{remote.filename}.part"
    tag = dl_dir / f"{remote.filename}.part.src"
    failures: List[Tuple[str, str]] = []
    for source in remote.sources:
        url = source
        probe_url = GDRIVE_DOWNLOAD if remote.gdrive_id else source
        cause = _probe(probe_url, min(timeout, PROBE_TIMEOUT))
        if cause is not None:
            failures.append((source, cause))
            continue
        same_source = part.exists() and tag.is_file() and tag.read_text().strip() == source
        try:
            jar = CookieJar()
            opener = _opener(jar)
            if remote.gdrive_id:
                url = _resolve_gdrive(opener, jar, remote.gdrive_id, timeout)
            tag.write_text(source + "\n")
            _say(f"downloading {remote.filename} from {source}")
            _stream(opener, url, part, timeout, remote.filename, same_source, progress)
        except _NetFail as e:
            failures.append((source, str(e)))
            continue
        os.replace(part, target)
        tag.unlink(missing_ok=True)
        return target
    first, cause = failures[0]
    more = "".join(f"; mirror {u}: {c}" for u, c in failures[1:])
    raise DataError(_one_line(
        f"cannot download {remote.filename} from {first}: {cause}{more}. No network? Download {first} by hand "
        f"and unpack it to {dest_hint} in the DomainBed layout (or save it as {target} and rerun)"))


# ---------------------------------------------------------------------------------------------------------
# Archives


def _member_path(root: Path, name: str) -> Optional[Path]:
    """Where an archive member goes under ``root``: None for macOS resource forks; an error for absolute
    or ``..`` paths."""
    norm = name.replace("\\", "/")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or ".." in parts:
        raise DataError(f"unsafe path {name!r} in an archive; the download is not what was expected")
    if not parts or parts[0] == "__MACOSX" or parts[-1].startswith("._") or parts[-1] == ".DS_Store":
        return None
    return root.joinpath(*parts)


class _CountingReader:
    """A read-only file wrapper that reports bytes read to a progress bar."""

    def __init__(self, f: IO[bytes], bar: _Progress):
        self._f, self._bar = f, bar

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self._bar.update(len(b))
        return b


def _bad_archive(archive: Path, err: Union[str, BaseException]) -> DataError:
    return DataError(_one_line(f"{archive} is not a readable archive ({err}); delete it and rerun to download "
                               "it again"))


def _tar_members(archive: Path, progress: bool) -> Iterator[Tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """The members of a (compressed) tar, read in one streaming pass, with progress over its bytes."""
    bar = _Progress(f"reading {archive.name}", archive.stat().st_size, 0, progress)
    try:
        with open(archive, "rb") as raw:
            with tarfile.open(fileobj=_CountingReader(raw, bar), mode="r|*") as tar:  # type: ignore[arg-type]
                for member in tar:
                    yield member, tar
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:  # read side only
        raise _bad_archive(archive, e) from None
    finally:
        bar.close()


def _write_member(src: IO[bytes], dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "wb") as out:
        shutil.copyfileobj(src, out, CHUNK)


def extract(archive: Path, dest: Path, progress: bool = True) -> None:
    """Unpack a zip or (gz/bz2/xz) tar into ``dest``: regular files and folders only, no links, no paths
    outside ``dest``, no macOS resource forks."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        try:
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                bar = _Progress(f"unpacking {archive.name}", sum(i.file_size for i in infos), 0, progress)
                try:
                    for info in infos:
                        target = _member_path(dest, info.filename)
                        if target is None:
                            continue
                        if info.is_dir():
                            target.mkdir(parents=True, exist_ok=True)
                            continue
                        with zf.open(info) as src:
                            _write_member(src, target)
                        bar.update(info.file_size)
                finally:
                    bar.close()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as e:
            raise _bad_archive(archive, e) from None
        return
    if not tarfile.is_tarfile(archive):
        raise _bad_archive(archive, "neither zip nor tar")
    for member, tar in _tar_members(archive, progress):
        target = _member_path(dest, member.name)
        if target is None:
            continue
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
        elif member.isfile():
            src = tar.extractfile(member)
            if src is not None:
                _write_member(src, target)


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
            if loc in TERRA_LOCATIONS:
                images[im["id"]] = (loc, str(im["file_name"]).replace("\\", "/"))
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
                jsons = [i for i in zf.infolist() if i.filename.lower().endswith(".json")
                         and _member_path(Path("."), i.filename) is not None]
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
    writing only the images that are kept)."""
    images_tar, annotations_file = files
    plan = _terra_plan(_read_terra_annotations(annotations_file))
    if not plan:
        raise DataError(f"{annotations_file} lists no image of locations {', '.join(TERRA_LOCATIONS)} with "
                        f"one of the classes {', '.join(TERRA_CLASSES)}")
    by_base: Dict[str, str] = {k.rsplit("/", 1)[-1]: k for k in plan}
    out = work / "terra_incognita"
    out.mkdir(parents=True)
    found: Set[str] = set()
    for member, tar in _tar_members(images_tar, progress):
        if not member.isfile():
            continue
        rel = member.name.replace("\\", "/").lstrip("./")
        if rel.startswith(TERRA_IMAGES_DIR + "/"):
            rel = rel[len(TERRA_IMAGES_DIR) + 1:]
        key = rel if rel in plan else by_base.get(rel.rsplit("/", 1)[-1])
        if key is None or key in found:
            continue
        src = tar.extractfile(member)
        if src is None:
            continue
        targets = sorted(plan[key])
        first = out / targets[0]
        _write_member(src, first)
        for t in targets[1:]:
            (out / t).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(first, out / t)
        found.add(key)
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


def _write_marker(folder: Path, name: str, spec: Spec) -> None:
    info = {
        "dataset": name,
        "folder": spec.folder,
        "domains": list(spec.envs),
        "sources": [s for r in spec.remotes for s in r.sources],
        "completed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / MARKER).write_text(json.dumps(info, indent=1) + "\n")


def download_dataset(name: str, data_dir: Union[str, Path], timeout: float = 20.0, *, keep_archives: bool = False,
                     progress: bool = True) -> Path:
    """Make sure ``<data_dir>/<folder>`` holds the dataset ``name`` in the DomainBed layout; return that folder.

    ``timeout`` bounds each connection attempt and each read (seconds); the first connection check of each
    host waits at most ``min(timeout, 5)``. Raises UsageError for an unknown name and DataError (one line:
    URL, cause, fix) when the data cannot be fetched or unpacked.
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
        files = [_fetch(r, dl_dir, timeout, final, progress) for r in spec.remotes]
        work = root / f".{spec.folder}.partial"
        if work.exists():
            shutil.rmtree(work)  # a crashed earlier unpack: never trusted, redone from the archives
        work.mkdir()
        try:
            _say(f"unpacking {spec.folder}")
            try:
                built = spec.build(files, work, progress)
            except OSError as e:
                raise DataError(_one_line(f"cannot unpack {spec.folder} into {work}: {e.strerror or e}; free disk "
                                          "space or choose another --data-dir")) from None
            missing = _missing_envs(built, spec.envs)
            if missing:
                raise DataError(_one_line(f"the downloaded {spec.folder} lacks the domain folders {missing}; delete "
                                          f"{dl_dir} and rerun, or unpack the dataset to {final} by hand"))
            extra = sorted(p.name for p in built.iterdir() if p.is_dir() and p.name not in spec.envs)
            if extra:
                _say(f"warning: {final} also has the folders {extra}, which scmd would read as domains")
            try:
                _write_marker(built, key, spec)
                os.replace(built, final)
            except OSError as e:
                raise DataError(_one_line(f"cannot move the unpacked {spec.folder} to {final}: {e}")) from None
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
