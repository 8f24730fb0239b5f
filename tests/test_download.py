"""scmd.download, offline: gdown replaced at the module boundary by a fake that writes tiny fixture archives
(md5 checks, unsafe archives, interrupted unpacking, the PACS / OfficeHome / TerraIncognita / DomainNet
re-arrangements), plus a few runs of the real gdown against a local HTTP server (failures, resume)."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gdown
import pytest
import requests

from scmd import download as dl
from scmd.errors import DataError, ScmdError, UsageError

VLCS_ENVS = ("Caltech101", "LabelMe", "SUN09", "VOC2007")
PACS_ENVS = ("art_painting", "cartoon", "photo", "sketch")
VLCS_ID = "1skwblH1_okBwxWxmRsp9_qi15hyPpxg8"


# ---------------------------------------------------------------------------------------------------------
# helpers


def tar_bytes(files: dict, mode: str = "w:gz", links: dict = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def zip_bytes(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def vlcs_tar() -> bytes:
    return tar_bytes({f"VLCS/{e}/{c}/{i}.jpg": f"{e}{c}{i}".encode() for e in VLCS_ENVS for c in ("bird", "car")
                      for i in range(2)})


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def with_remotes(monkeypatch, key: str, *remotes: dl.Remote) -> None:
    monkeypatch.setitem(dl.SPECS, key, dataclasses.replace(dl.SPECS[key], remotes=tuple(remotes)))


def leftovers(root: Path) -> list:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") or p.name.endswith(".partial"))


def archives(root: Path) -> list:
    d = root / dl.DOWNLOADS
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock")) if d.is_dir() else []


def markers(root: Path) -> list:
    return sorted(root.rglob(dl.MARKER))


class FakeGdown:
    """Stands in for ``gdown.download``: ``files[source]`` is the bytes to write to ``output`` (or an
    exception to raise), ``source`` being the Drive link of ``id=`` or the ``url=``. The arguments must be
    ones the real gdown accepts; every call is recorded."""

    def __init__(self, monkeypatch, files: dict):
        self.files, self.calls = files, []
        signature = inspect.signature(gdown.download)

        def download(*args, **kwargs):
            signature.bind(*args, **kwargs)
            self.calls.append(kwargs)
            source = dl.gdrive_url(kwargs["id"]) if kwargs.get("id") else kwargs["url"]
            body = self.files[source]
            if isinstance(body, BaseException):
                raise body
            Path(kwargs["output"]).write_bytes(body)
            if kwargs.get("hasher") is not None:
                kwargs["hasher"].update(body)
            return kwargs["output"]

        monkeypatch.setattr(dl.gdown, "download", download)


def no_network(monkeypatch) -> None:
    """Any download attempt fails the test."""

    def refuse(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(dl.gdown, "download", refuse)


def place(tmp_path: Path, files: dict) -> Path:
    d = tmp_path / dl.DOWNLOADS
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


# ---------------------------------------------------------------------------------------------------------
# names, sources and the checksum table


def test_unknown_name_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="unknown dataset 'mnist'; choose one of: vlcs, pacs"):
        dl.download_dataset("mnist", tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing created


@pytest.mark.parametrize("alias,key", [("VLCS", "vlcs"), ("office_home", "officehome"), ("OfficeHome", "officehome"),
                                       ("terra_incognita", "terraincognita"), ("domain-net", "domainnet")])
def test_aliases(alias, key):
    assert dl.canonical_name(alias) == key


def test_folders_and_domains_match_the_dataset_table():
    from scmd.datasets import DATASETS

    for key, spec in dl.SPECS.items():
        assert spec.folder == DATASETS[key].folder
        assert sorted(spec.envs) == sorted(DATASETS[key].envs)


def test_sources_are_domainbeds():
    ids = {k: dl.SPECS[k].remotes[0].gdrive_id for k in ("vlcs", "pacs", "officehome")}
    assert ids == {"vlcs": VLCS_ID, "pacs": "1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd",
                   "officehome": "1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC"}
    dn = [r.urls[0] for r in dl.SPECS["domainnet"].remotes[1:]]
    assert dn[0] == "http://csr.bu.edu/ftp/visda/2019/multi-source/groundtruth/clipart.zip"
    assert dn[4] == "http://csr.bu.edu/ftp/visda/2019/multi-source/real.zip"
    assert all(u.endswith("eccv_18_all_images_sm.tar.gz") for u in dl.SPECS["terraincognita"].remotes[0].urls)


def test_md5_table_covers_every_file():
    names = {r.filename for spec in dl.SPECS.values() for r in spec.remotes}
    assert names == set(dl.ARCHIVE_MD5)
    for value in dl.ARCHIVE_MD5.values():  # None (unknown) or an md5
        assert value is None or (len(value) == 32 and int(value, 16) >= 0)


# ---------------------------------------------------------------------------------------------------------
# downloads through the (fake) gdown


def test_vlcs_download_extract_marker(tmp_path, monkeypatch, capfd):
    body = vlcs_tar()
    fake = FakeGdown(monkeypatch, {dl.gdrive_url(VLCS_ID): body})
    out = dl.download_dataset("vlcs", tmp_path, timeout=7)
    assert out == tmp_path / "VLCS"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == list(VLCS_ENVS)
    assert (out / "SUN09" / "car" / "1.jpg").read_bytes() == b"SUN09car1"
    marker = json.loads((out / dl.MARKER).read_text())
    assert marker["dataset"] == "vlcs" and marker["domains"] == list(VLCS_ENVS)
    assert marker["md5"] == {"VLCS.tar.gz": md5(body)} and marker["md5_verified"] == []
    assert leftovers(tmp_path) == [] and archives(tmp_path) == []  # work folder and archive gone
    (call,) = fake.calls
    assert call["id"] == VLCS_ID and call["output"] == str(tmp_path / dl.DOWNLOADS / "VLCS.tar.gz")
    assert call["resume"] is True and call["timeout"] == 7 and call["quiet"] is False
    err = capfd.readouterr().err
    assert f"VLCS.tar.gz was not checksum-verified (no md5 is known for it); its md5 is {md5(body)}" in err

    no_network(monkeypatch)  # complete: not downloaded again
    assert dl.download_dataset("VLCS", tmp_path) == out


GDOWN5_PARAMS = frozenset({"url", "output", "quiet", "proxy", "speed", "use_cookies", "verify", "id", "fuzzy",
                           "resume", "format", "user_agent", "log_messages"})  # gdown 5.2's download()


def test_older_gdown_gets_only_its_arguments(tmp_path, monkeypatch):
    body = vlcs_tar()
    monkeypatch.setattr(dl, "_GDOWN_PARAMS", GDOWN5_PARAMS)
    monkeypatch.setitem(dl.ARCHIVE_MD5, "VLCS.tar.gz", md5(body))
    fake = FakeGdown(monkeypatch, {dl.gdrive_url(VLCS_ID): body})
    out = dl.download_dataset("vlcs", tmp_path, progress=False)
    assert set(fake.calls[0]) <= GDOWN5_PARAMS  # no timeout, retries or hasher
    assert json.loads((out / dl.MARKER).read_text())["md5"] == {"VLCS.tar.gz": md5(body)}  # read back


def test_gdown_returning_without_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(dl.gdown, "download", lambda **k: None)  # gdown 5 with several .part files
    with pytest.raises(DataError, match=r"no file arrived \(several VLCS.tar.gz\*.part"):
        dl.download_dataset("vlcs", tmp_path, progress=False)


def test_known_md5_is_verified(tmp_path, monkeypatch, capfd):
    body = vlcs_tar()
    monkeypatch.setitem(dl.ARCHIVE_MD5, "VLCS.tar.gz", md5(body).upper())
    FakeGdown(monkeypatch, {dl.gdrive_url(VLCS_ID): body})
    out = dl.download_dataset("vlcs", tmp_path, keep_archives=True, progress=False)
    assert json.loads((out / dl.MARKER).read_text())["md5_verified"] == ["VLCS.tar.gz"]
    assert "not checksum-verified" not in capfd.readouterr().err
    assert archives(tmp_path) == ["VLCS.tar.gz"]  # keep_archives


def test_md5_mismatch_is_an_error_and_the_file_is_set_aside(tmp_path, monkeypatch):
    good = vlcs_tar()
    monkeypatch.setitem(dl.ARCHIVE_MD5, "VLCS.tar.gz", md5(good))
    fake = FakeGdown(monkeypatch, {dl.gdrive_url(VLCS_ID): good[:-10] + b"corrupted!"})
    with pytest.raises(DataError, match=r"VLCS.tar.gz has md5 [0-9a-f]{32}, not the expected .*moved to .*\.bad"):
        dl.download_dataset("vlcs", tmp_path, progress=False)
    assert not (tmp_path / "VLCS").exists() and markers(tmp_path) == [] and leftovers(tmp_path) == []
    assert archives(tmp_path) == ["VLCS.tar.gz.bad"]  # not at the name that counts as downloaded

    fake.files[dl.gdrive_url(VLCS_ID)] = good  # the rerun downloads it again
    assert (dl.download_dataset("vlcs", tmp_path, progress=False) / dl.MARKER).is_file()
    assert len(fake.calls) == 2


def test_archive_saved_by_hand_is_checked_too(tmp_path, monkeypatch):
    monkeypatch.setitem(dl.ARCHIVE_MD5, "VLCS.tar.gz", md5(vlcs_tar()))
    place(tmp_path, {"VLCS.tar.gz": b"not the archive"})
    no_network(monkeypatch)
    with pytest.raises(DataError, match="not the expected"):
        dl.download_dataset("vlcs", tmp_path, progress=False)
    assert archives(tmp_path) == ["VLCS.tar.gz.bad"] and not (tmp_path / "VLCS").exists()


def test_archive_saved_by_hand_is_used(tmp_path, monkeypatch):
    place(tmp_path, {"VLCS.tar.gz": vlcs_tar()})
    crashed = tmp_path / ".VLCS.partial" / "unpacked" / "VLCS"  # an earlier unpack killed after its marker
    crashed.mkdir(parents=True)
    (crashed / dl.MARKER).write_text("{}")
    no_network(monkeypatch)
    out = dl.download_dataset("vlcs", tmp_path, progress=False)
    assert (out / "LabelMe" / "bird" / "0.jpg").is_file() and markers(tmp_path) == [out / dl.MARKER]
    assert leftovers(tmp_path) == [] and archives(tmp_path) == []


def test_network_failure_is_one_clean_line(tmp_path, monkeypatch):
    cause = requests.ConnectionError("HTTPSConnectionPool(host='drive.google.com', port=443): Max retries exceeded")
    cause.__cause__ = socket.gaierror(-2, "Name or service not known")
    FakeGdown(monkeypatch, {dl.gdrive_url(VLCS_ID): cause})
    with pytest.raises(DataError) as ei:
        dl.download_dataset("vlcs", tmp_path, progress=False)
    msg = str(ei.value)
    assert "\n" not in msg and "cannot resolve the host name" in msg
    assert dl.gdrive_url(VLCS_ID) in msg and "by hand" in msg and str(tmp_path / "VLCS") in msg
    assert "DomainBed layout" in msg and str(tmp_path / dl.DOWNLOADS / "VLCS.tar.gz") in msg
    assert not (tmp_path / "VLCS").exists() and leftovers(tmp_path) == []


def test_mirrors_are_tried_in_order(tmp_path, monkeypatch):
    http404 = requests.HTTPError("404")
    http404.response = requests.Response()
    http404.response.status_code, http404.response.reason = 404, "Not Found"
    a, b, c = "http://a.example/VLCS.tar.gz", "http://b.example/VLCS.tar.gz", "http://c.example/VLCS.tar.gz"
    with_remotes(monkeypatch, "vlcs", dl.Remote("VLCS.tar.gz", urls=(a, b, c)))
    fake = FakeGdown(monkeypatch, {a: http404, b: b"<!DOCTYPE html><html>moved</html>",
                                   c: gdown.exceptions.DownloadError("Download is incomplete: received 3 bytes but the "
                                                                     "server announced 9 bytes.\nThe received bytes "
                                                                     "are kept in X.part")})
    with pytest.raises(DataError) as ei:
        dl.download_dataset("vlcs", tmp_path, progress=False)
    msg = str(ei.value)
    assert msg.startswith(f"cannot download VLCS.tar.gz from {a}: HTTP 404 Not Found; mirror {b}: the server answered "
                          "with a web page")
    assert f"mirror {c}: Download is incomplete: received 3 bytes but the server announced 9 bytes. No network?" in msg
    assert "kept in" not in msg  # the first line of gdown's message only
    assert [k["url"] for k in fake.calls] == [a, b, c] and archives(tmp_path) == []
    fake.files[c] = vlcs_tar()
    assert (dl.download_dataset("vlcs", tmp_path, progress=False) / dl.MARKER).is_file()


def test_drive_refusal_names_the_quota(tmp_path, monkeypatch):
    fid = dl.SPECS["officehome"].remotes[0].gdrive_id
    FakeGdown(monkeypatch, {dl.gdrive_url(fid): gdown.exceptions.FileURLRetrievalError("Failed to retrieve\n...")})
    with pytest.raises(DataError, match="Google Drive did not hand out the file .*quota"):
        dl.download_dataset("officehome", tmp_path, progress=False)


def test_cli_network_failure_one_line_exit_2(tmp_path, monkeypatch, capsys):
    fid = dl.SPECS["pacs"].remotes[0].gdrive_id
    FakeGdown(monkeypatch, {dl.gdrive_url(fid): requests.ConnectTimeout("connect timeout")})
    assert dl.main(["pacs", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"[download] downloading PACS.zip from {dl.gdrive_url(fid)}"  # then the one error line
    assert len(err) == 2 and err[1].startswith(f"error: cannot download PACS.zip from {dl.gdrive_url(fid)}: timed out")
    assert "No network? Download" in err[1]


# ---------------------------------------------------------------------------------------------------------
# unsafe and broken archives, interrupted unpacking


@pytest.mark.parametrize("fmt", ["tar", "zip"])
@pytest.mark.parametrize("bad", ["VLCS/../../evil.txt", "/scmd-evil-absolute.txt"])
def test_traversal_members_are_refused(tmp_path, monkeypatch, fmt, bad):
    files = {f"VLCS/{e}/bird/0.jpg": b"x" for e in VLCS_ENVS}
    files[bad] = b"evil"
    data = tar_bytes(files) if fmt == "tar" else zip_bytes(files)
    place(tmp_path, {"VLCS.tar.gz": data})
    no_network(monkeypatch)
    with pytest.raises(DataError, match="unsafe path"):
        dl.download_dataset("vlcs", tmp_path, progress=False)
    assert not (tmp_path.parent / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/scmd-evil-absolute.txt").exists()
    assert not (tmp_path / "VLCS").exists() and leftovers(tmp_path) == [] and markers(tmp_path) == []


def test_link_out_of_the_folder_is_not_followed(tmp_path, monkeypatch):
    files = {f"VLCS/{e}/bird/0.jpg": b"x" for e in VLCS_ENVS}
    links = {"VLCS/Caltech101/bird/out.jpg": "../../../../../etc/passwd"}
    place(tmp_path, {"VLCS.tar.gz": tar_bytes(files, links=links)})
    no_network(monkeypatch)
    if hasattr(tarfile, "data_filter"):  # the data filter refuses it
        with pytest.raises(DataError, match="unsafe path 'VLCS/Caltech101/bird/out.jpg'"):
            dl.download_dataset("vlcs", tmp_path, progress=False)
    else:  # the fallback skips every link
        out = dl.download_dataset("vlcs", tmp_path, progress=False)
        assert not (out / "Caltech101" / "bird" / "out.jpg").exists()


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="3.14's default extraction filter needs tarfile.data_filter")
def test_fallback_without_extraction_filters(tmp_path, monkeypatch):
    monkeypatch.delattr(tarfile, "data_filter")  # a Python without extraction filters
    files = {f"VLCS/{e}/bird/0.jpg": b"x" for e in VLCS_ENVS}
    place(tmp_path, {"VLCS.tar.gz": tar_bytes(files, links={"VLCS/Caltech101/bird/out.jpg": "/etc/passwd"})})
    no_network(monkeypatch)
    out = dl.download_dataset("vlcs", tmp_path, progress=False)
    assert not (out / "Caltech101" / "bird" / "out.jpg").exists() and (out / "SUN09" / "bird" / "0.jpg").is_file()
    place(tmp_path / "again", {"VLCS.tar.gz": tar_bytes({**files, "VLCS/../../evil.txt": b"x"})})
    with pytest.raises(DataError, match="unsafe path"):
        dl.download_dataset("vlcs", tmp_path / "again", progress=False)
    assert not (tmp_path / "evil.txt").exists()


def test_corrupt_archive(tmp_path, monkeypatch):
    no_network(monkeypatch)
    place(tmp_path, {"VLCS.tar.gz": b"this is not an archive"})
    with pytest.raises(DataError, match="not a readable archive.*delete it and rerun"):
        dl.download_dataset("vlcs", tmp_path, progress=False)
    place(tmp_path, {"VLCS.tar.gz": vlcs_tar()[:200]})  # truncated
    with pytest.raises(DataError, match="not a readable archive"):
        dl.download_dataset("vlcs", tmp_path, progress=False)
    assert leftovers(tmp_path) == [] and markers(tmp_path) == []


def test_interrupted_unpack_leaves_nothing_complete_looking(tmp_path, monkeypatch):
    place(tmp_path, {"VLCS.tar.gz": vlcs_tar()})
    no_network(monkeypatch)
    real_extract = dl.extract

    def extract_then_ctrl_c(archive, dest, progress=True):
        real_extract(archive, dest, progress)
        assert any(dest.rglob("*.jpg"))  # the images were there when the interruption came
        raise KeyboardInterrupt

    monkeypatch.setattr(dl, "extract", extract_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        dl.download_dataset("vlcs", tmp_path, progress=False)
    assert not (tmp_path / "VLCS").exists() and markers(tmp_path) == [] and leftovers(tmp_path) == []
    assert archives(tmp_path) == ["VLCS.tar.gz"]  # kept for the rerun

    monkeypatch.setattr(dl, "extract", real_extract)
    assert (dl.download_dataset("vlcs", tmp_path, progress=False) / dl.MARKER).is_file()


def test_existing_folders(tmp_path, monkeypatch):
    no_network(monkeypatch)
    half = tmp_path / "VLCS"
    (half / "Caltech101" / "bird").mkdir(parents=True)
    (half / "Caltech101" / "bird" / "x.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match=r"lacks the domain folders \['LabelMe', 'SUN09', 'VOC2007'\]"):
        dl.download_dataset("vlcs", tmp_path)
    assert (half / "Caltech101" / "bird" / "x.jpg").exists()  # never overwritten
    for e in VLCS_ENVS[1:]:
        (half / e / "bird").mkdir(parents=True)
        (half / e / "bird" / "x.jpg").write_bytes(b"x")
    assert dl.download_dataset("vlcs", tmp_path) == half  # unpacked by hand: used as is


# ---------------------------------------------------------------------------------------------------------
# the dataset re-arrangements


def test_pacs_kfold_renamed(tmp_path, monkeypatch):
    archive = zip_bytes({**{f"kfold/{e}/dog/x.jpg": e.encode() for e in PACS_ENVS},
                         "__MACOSX/kfold/._x.jpg": b"fork", "kfold/photo/dog/._x.jpg": b"fork"})
    FakeGdown(monkeypatch, {dl.gdrive_url(dl.SPECS["pacs"].remotes[0].gdrive_id): archive})
    out = dl.download_dataset("pacs", tmp_path, progress=False)
    assert out == tmp_path / "PACS" and not (tmp_path / "kfold").exists()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == list(PACS_ENVS)
    assert (out / "sketch" / "dog" / "x.jpg").read_bytes() == b"sketch"
    assert not list(tmp_path.rglob("__MACOSX")) and not list(tmp_path.rglob("._x.jpg"))


def test_office_home_renamed(tmp_path, monkeypatch):
    envs = ("Art", "Clipart", "Product", "Real World")
    files = {f"OfficeHomeDataset_10072016/{e}/Alarm_Clock/00001.jpg": b"x" for e in envs}
    FakeGdown(monkeypatch, {dl.gdrive_url(dl.SPECS["officehome"].remotes[0].gdrive_id):
                            zip_bytes({**files, "OfficeHomeDataset_10072016/ImageInfo.csv": b"a"})})
    out = dl.download_dataset("office_home", tmp_path, progress=False)
    assert out == tmp_path / "office_home" and (out / "Real World" / "Alarm_Clock" / "00001.jpg").is_file()
    assert not (tmp_path / "OfficeHomeDataset_10072016").exists()


def terra_files(spec) -> dict:
    cats = [{"id": i, "name": n} for i, n in enumerate(["bird", "deer", "empty", "coyote", "rabbit"])]
    images, annotations, tar_files = [], [], {}
    for n, (fname, loc, cids) in enumerate(spec):
        images.append({"id": f"im{n}", "file_name": fname, "location": loc})
        annotations += [{"id": f"an{n}_{c}", "image_id": f"im{n}", "category_id": c} for c in cids]
        tar_files[f"eccv_18_all_images_sm/{fname}"] = fname.encode()
    ann = json.dumps({"images": images, "annotations": annotations, "categories": cats}).encode()
    return {"eccv_18_all_images_sm.tar.gz": tar_bytes(tar_files),
            "caltech_camera_traps.json.zip": zip_bytes({"caltech_images_20210113.json": ann})}


def test_terra_incognita_locations_and_classes(tmp_path, monkeypatch):
    files = terra_files([  # (file, location, [category ids])
        ("a.jpg", 38, [0]), ("b.jpg", "43", [2]), ("c.jpg", 46, [3, 4]), ("d.jpg", 100, [0]),
        ("e.jpg", 99, [0]),  # location not kept
        ("f.jpg", 38, [1]),  # class not kept
        ("g.jpg", 100, [1, 4]),  # one kept class of two
    ])
    images, labels = dl.SPECS["terraincognita"].remotes
    FakeGdown(monkeypatch, {images.urls[0]: files[images.filename], labels.urls[0]: files[labels.filename]})
    out = dl.download_dataset("terraincognita", tmp_path, progress=False)
    assert out == tmp_path / "terra_incognita"
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg"))
    assert got == ["location_100/bird/d.jpg", "location_100/rabbit/g.jpg", "location_38/bird/a.jpg",
                   "location_43/empty/b.jpg", "location_46/coyote/c.jpg", "location_46/rabbit/c.jpg"]
    assert (out / "location_46" / "rabbit" / "c.jpg").read_bytes() == b"c.jpg"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"location_{x}" for x in ("100", "38", "43", "46")]
    assert (out / dl.MARKER).is_file() and leftovers(tmp_path) == []


def test_terra_incognita_second_mirror(tmp_path, monkeypatch):
    files = terra_files([("a.jpg", 38, [0]), ("b.jpg", 43, [0]), ("c.jpg", 46, [0]), ("d.jpg", 100, [0])])
    images, labels = dl.SPECS["terraincognita"].remotes
    fake = FakeGdown(monkeypatch, {images.urls[0]: requests.ConnectionError("refused"),
                                   images.urls[1]: files[images.filename], labels.urls[0]: files[labels.filename]})
    out = dl.download_dataset("terraincognita", tmp_path, progress=False)
    assert (out / "location_43" / "bird" / "b.jpg").is_file()
    assert [c["url"] for c in fake.calls] == [images.urls[0], images.urls[1], labels.urls[0]]


def test_terra_incognita_missing_location_is_an_error(tmp_path, monkeypatch):
    place(tmp_path, terra_files([("a.jpg", 38, [0])]))
    no_network(monkeypatch)
    with pytest.raises(DataError, match="lacks the domain folders"):
        dl.download_dataset("terraincognita", tmp_path, progress=False)
    assert not (tmp_path / "terra_incognita").exists() and leftovers(tmp_path) == []
    assert "eccv_18_all_images_sm.tar.gz" in archives(tmp_path)  # kept for a retry


def domainnet_files() -> dict:
    files = {"domain_net_duplicates.txt": b"clipart/cake/clipart_052_000004.jpg\nsketch/zebra/sketch_344_000055.jpg\n"
             b"real/cake/not_there.jpg\n"}
    for d in dl.DOMAINNET_DOMAINS:
        files[f"{d}.zip"] = zip_bytes({f"{d}/cake/{d}_052_000004.jpg": b"1", f"{d}/zebra/{d}_344_000055.jpg": b"2"})
    return files


def test_domainnet_duplicates_removed(tmp_path, monkeypatch):
    files = domainnet_files()
    FakeGdown(monkeypatch, {r.urls[0]: files[r.filename] for r in dl.SPECS["domainnet"].remotes})
    out = dl.download_dataset("domainnet", tmp_path, progress=False)
    assert not (out / "clipart" / "cake" / "clipart_052_000004.jpg").exists()
    assert not (out / "sketch" / "zebra" / "sketch_344_000055.jpg").exists()
    assert (out / "clipart" / "zebra" / "clipart_344_000055.jpg").is_file()
    assert (out / "real" / "cake" / "real_052_000004.jpg").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == list(dl.DOMAINNET_DOMAINS)
    assert len(list(out.rglob("*.jpg"))) == 2 * len(dl.DOMAINNET_DOMAINS) - 2


def test_domainnet_bad_duplicate_list(tmp_path, monkeypatch):
    files = domainnet_files()
    files["domain_net_duplicates.txt"] = b"rate limited\n"
    place(tmp_path, files)
    no_network(monkeypatch)
    with pytest.raises(DataError, match="is not DomainBed's DomainNet duplicate list"):
        dl.download_dataset("domainnet", tmp_path, progress=False)
    assert not (tmp_path / "domain_net").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# the real gdown against a local server (no network): our arguments, its failures, its resume


class Server:
    """A local HTTP server: ``routes[path] = (body, content_type)``; honours ``Range: bytes=N-`` and records
    the requests' Range headers."""

    def __init__(self):
        self.routes: dict = {}
        self.ranges: list = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                route = server.routes.get(urllib.parse.urlsplit(self.path).path)
                server.ranges.append(self.headers.get("Range"))
                if route is None:
                    self.send_error(404)
                    return
                body, ctype = route
                start, rng = 0, self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def no_retries(monkeypatch):
    monkeypatch.setattr(dl, "RETRIES", 0)


def test_real_gdown_download_and_resume(tmp_path, monkeypatch, server):
    body = vlcs_tar()
    server.routes["/VLCS.tar.gz"] = (body, "application/gzip")
    monkeypatch.setitem(dl.ARCHIVE_MD5, "VLCS.tar.gz", md5(body))
    with_remotes(monkeypatch, "vlcs", dl.Remote("VLCS.tar.gz", urls=(f"{server.base}/VLCS.tar.gz",)))
    half = len(body) // 2
    place(tmp_path, {"VLCS.tar.gzabcd1234.part": body[:half]})  # what an interrupted gdown leaves
    out = dl.download_dataset("vlcs", tmp_path, progress=False, keep_archives=True)
    assert f"bytes={half}-" in server.ranges
    assert (tmp_path / dl.DOWNLOADS / "VLCS.tar.gz").read_bytes() == body and archives(tmp_path) == ["VLCS.tar.gz"]
    assert json.loads((out / dl.MARKER).read_text())["md5_verified"] == ["VLCS.tar.gz"]


def test_real_gdown_http_error(tmp_path, monkeypatch, server, no_retries):
    url = f"{server.base}/missing.tar.gz"
    with_remotes(monkeypatch, "vlcs", dl.Remote("VLCS.tar.gz", urls=(url,)))
    with pytest.raises(DataError, match=f"from {url}: HTTP 404"):
        dl.download_dataset("vlcs", tmp_path, progress=False)
    assert archives(tmp_path) == []


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_real_gdown_refused_and_unresolvable(tmp_path, monkeypatch, no_retries):
    refused = f"http://127.0.0.1:{closed_port()}/VLCS.tar.gz"
    unknown = "http://no-such-host.invalid/VLCS.tar.gz"
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *a, **k):  # no resolver is asked: the name is unknown
        if host == "no-such-host.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with_remotes(monkeypatch, "vlcs", dl.Remote("VLCS.tar.gz", urls=(refused, unknown)))
    t0 = time.monotonic()
    with pytest.raises(DataError) as ei:
        dl.download_dataset("vlcs", tmp_path, timeout=2, progress=False)
    assert time.monotonic() - t0 < 5
    msg = str(ei.value)
    assert f"from {refused}: connection refused; mirror {unknown}: cannot resolve the host name" in msg
    assert "\n" not in msg and not (tmp_path / "VLCS").exists()


def test_real_gdown_silent_server_times_out(tmp_path, monkeypatch, no_retries):
    silent = socket.socket()  # accepts connections (kernel backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/VLCS.tar.gz"
        with_remotes(monkeypatch, "vlcs", dl.Remote("VLCS.tar.gz", urls=(url,)))
        t0 = time.monotonic()
        with pytest.raises(DataError, match=f"from {url}: timed out"):
            dl.download_dataset("vlcs", tmp_path, timeout=0.3, progress=False)
        assert time.monotonic() - t0 < 5
    finally:
        silent.close()


# ---------------------------------------------------------------------------------------------------------
# command line and arguments


def test_cli_subprocess(tmp_path):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "scmd.download", "mnist", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=root)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown dataset 'mnist'" in r.stderr
    (tmp_path / "PACS").mkdir()  # an incomplete folder: an error before any network use
    r = subprocess.run([sys.executable, "-m", "scmd.download", "pacs", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=root)
    assert r.returncode == 2 and "lacks the domain folders" in r.stderr and r.stderr.strip().count("\n") == 0


def test_bad_timeout(tmp_path):
    with pytest.raises(UsageError, match="timeout must be positive"):
        dl.download_dataset("vlcs", tmp_path, timeout=0)


def test_errors_are_scmd_errors():
    assert issubclass(DataError, ScmdError) and DataError.exit_code == 2
