"""scmd.download, offline: network failures, resume, the Google Drive confirm page, unpacking and the
TerraIncognita / DomainNet reorganisation, on tiny archives and a local HTTP server."""

from __future__ import annotations

import dataclasses
import io
import json
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scmd import download as dl
from scmd.errors import DataError, ScmdError, UsageError

VLCS_ENVS = ("Caltech101", "LabelMe", "SUN09", "VOC2007")


# ---------------------------------------------------------------------------------------------------------
# helpers


def tar_bytes(files: dict, mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
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


def with_remotes(monkeypatch, key: str, *remotes: dl.Remote) -> None:
    monkeypatch.setitem(dl.SPECS, key, dataclasses.replace(dl.SPECS[key], remotes=tuple(remotes)))


def no_network(monkeypatch) -> None:
    """Any attempt to open a URL fails the test."""

    def refuse(*a, **k):
        raise AssertionError("the network was used")

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", refuse)
    monkeypatch.setattr(dl, "_probe", refuse)


def leftovers(root: Path) -> list:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") or p.name.endswith(".partial"))


class Server:
    """A local HTTP server: ``routes[path] = (body, content_type)`` or a callable(handler) -> the same (or
    None when it answered itself); honours ``Range: bytes=N-`` and records the requests."""

    def __init__(self):
        self.routes: dict = {}
        self.requests: list = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                parts = urllib.parse.urlsplit(self.path)
                server.requests.append((parts.path, parts.query, self.headers.get("Range")))
                route = server.routes.get(parts.path)
                if route is None:
                    self.send_error(404)
                    return
                answer = route(self) if callable(route) else route
                if answer is None:  # the route answered itself
                    return
                body, ctype = answer
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and ctype != "text/html":
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
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------------------
# names


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
    assert ids == {"vlcs": "1skwblH1_okBwxWxmRsp9_qi15hyPpxg8", "pacs": "1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd",
                   "officehome": "1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC"}
    dn = [r.urls[0] for r in dl.SPECS["domainnet"].remotes[1:]]
    assert dn[0] == "http://csr.bu.edu/ftp/visda/2019/multi-source/groundtruth/clipart.zip"
    assert dn[4] == "http://csr.bu.edu/ftp/visda/2019/multi-source/real.zip"
    assert all(u.endswith("eccv_18_all_images_sm.tar.gz") for u in dl.SPECS["terraincognita"].remotes[0].urls)


# ---------------------------------------------------------------------------------------------------------
# network failures: one clean line, fast


def assert_one_line_fix(err: DataError, url: str, dest: Path) -> str:
    msg = str(err)
    assert "\n" not in msg
    assert url in msg and "by hand" in msg and str(dest) in msg and "DomainBed layout" in msg
    return msg


def test_urllib_failure_is_a_clean_data_error(tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "_probe", lambda url, timeout: None)  # the check passes, the request fails

    def fail(self, req, *a, **k):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", fail)
    t0 = time.monotonic()
    with pytest.raises(DataError) as ei:
        dl.download_dataset("vlcs", tmp_path, progress=False)
    assert time.monotonic() - t0 < 2
    msg = assert_one_line_fix(ei.value, dl.gdrive_url("1skwblH1_okBwxWxmRsp9_qi15hyPpxg8"), tmp_path / "VLCS")
    assert "cannot resolve the host name" in msg
    assert not (tmp_path / "VLCS").exists() and leftovers(tmp_path) == []


def test_connection_check_never_hangs(tmp_path, monkeypatch):
    def hang(*a, **k):  # a resolver or connect that never answers
        time.sleep(30)

    monkeypatch.setattr(socket, "create_connection", hang)
    t0 = time.monotonic()
    with pytest.raises(DataError, match="no answer from .* within 0.2 s") as ei:
        dl.download_dataset("pacs", tmp_path, timeout=0.2, progress=False)
    assert time.monotonic() - t0 < 3
    assert_one_line_fix(ei.value, dl.gdrive_url("1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd"), tmp_path / "PACS")


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_blocked_and_refused_urls_fail_fast(tmp_path, monkeypatch):
    blocked = "http://10.255.255.1/VLCS.tar.gz"  # unroutable (or blocked by a proxy): any failure will do
    refused = f"http://127.0.0.1:{closed_port()}/VLCS.tar.gz"
    with_remotes(monkeypatch, "vlcs", dl.Remote("VLCS.tar.gz", urls=(blocked, refused)))
    t0 = time.monotonic()
    with pytest.raises(DataError) as ei:
        dl.download_dataset("vlcs", tmp_path, timeout=0.3, progress=False)
    assert time.monotonic() - t0 < 5
    msg = assert_one_line_fix(ei.value, blocked, tmp_path / "VLCS")
    assert f"mirror {refused}: connection refused" in msg
    assert not (tmp_path / "VLCS").exists()


def test_silent_server_times_out(tmp_path, monkeypatch):
    silent = socket.socket()  # accepts connections (kernel backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/VLCS.tar.gz"
        with_remotes(monkeypatch, "vlcs", dl.Remote("VLCS.tar.gz", urls=(url,)))
        t0 = time.monotonic()
        with pytest.raises(DataError, match="timed out") as ei:
            dl.download_dataset("vlcs", tmp_path, timeout=0.3, progress=False)
        assert time.monotonic() - t0 < 5
        assert_one_line_fix(ei.value, url, tmp_path / "VLCS")
    finally:
        silent.close()


def test_http_error_and_web_page_are_data_errors(tmp_path, monkeypatch, server):
    server.routes["/page.tar.gz"] = (b"<html>moved</html>", "text/html")
    with_remotes(monkeypatch, "vlcs", dl.Remote("VLCS.tar.gz", urls=(f"{server.base}/missing.tar.gz",
                                                                     f"{server.base}/page.tar.gz")))
    with pytest.raises(DataError, match=r"HTTP 404 .*mirror .*page.tar.gz: the server answered with a web page"):
        dl.download_dataset("vlcs", tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------------------
# downloads that work (local server)


def test_vlcs_download_extract_marker(tmp_path, monkeypatch, server, capfd):
    server.routes["/VLCS.tar.gz"] = (vlcs_tar(), "application/gzip")
    with_remotes(monkeypatch, "vlcs", dl.Remote("VLCS.tar.gz", urls=(f"{server.base}/VLCS.tar.gz",)))
    out = dl.download_dataset("vlcs", tmp_path)
    assert out == tmp_path / "VLCS"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == list(VLCS_ENVS)
    assert (out / "SUN09" / "car" / "1.jpg").read_bytes() == b"SUN09car1"
    marker = json.loads((out / dl.MARKER).read_text())
    assert marker["dataset"] == "vlcs" and marker["domains"] == list(VLCS_ENVS)
    assert leftovers(tmp_path) == []  # the .VLCS.partial work folder is gone
    assert [p.name for p in (tmp_path / dl.DOWNLOADS).iterdir() if not p.name.endswith(".lock")] == []
    assert "VLCS.tar.gz" in capfd.readouterr().err  # progress was shown

    no_network(monkeypatch)  # complete: not downloaded again
    assert dl.download_dataset("VLCS", tmp_path) == out


def test_resume_with_range(tmp_path, monkeypatch, server):
    body = vlcs_tar()
    url = f"{server.base}/VLCS.tar.gz"
    server.routes["/VLCS.tar.gz"] = (body, "application/gzip")
    with_remotes(monkeypatch, "vlcs", dl.Remote("VLCS.tar.gz", urls=(url,)))
    d = tmp_path / dl.DOWNLOADS
    d.mkdir()
    half = len(body) // 2
    (d / "VLCS.tar.gz.part").write_bytes(body[:half])
    (d / "VLCS.tar.gz.part.src").write_text(url + "\n")
    out = dl.download_dataset("vlcs", tmp_path, keep_archives=True, progress=False)
    assert server.requests == [("/VLCS.tar.gz", "", f"bytes={half}-")]
    assert (d / "VLCS.tar.gz").read_bytes() == body
    assert not (d / "VLCS.tar.gz.part").exists()
    assert (out / dl.MARKER).is_file()


def test_complete_part_416_starts_again(tmp_path, monkeypatch, server):
    body = vlcs_tar()
    url = f"{server.base}/VLCS.tar.gz"

    def strict(handler):  # a server that answers 416 to a range past the end
        rng = handler.headers.get("Range")
        if rng and int(rng[6:].split("-")[0]) >= len(body):
            handler.send_error(416)
            return None
        return body, "application/gzip"

    server.routes["/VLCS.tar.gz"] = strict
    with_remotes(monkeypatch, "vlcs", dl.Remote("VLCS.tar.gz", urls=(url,)))
    d = place(tmp_path, {"VLCS.tar.gz.part": body})  # complete, but the rename never happened
    (d / "VLCS.tar.gz.part.src").write_text(url + "\n")
    out = dl.download_dataset("vlcs", tmp_path, progress=False)
    assert [r[2] for r in server.requests] == [f"bytes={len(body)}-", None]
    assert (out / dl.MARKER).is_file()


def test_part_from_another_source_is_not_resumed(tmp_path, monkeypatch, server):
    body = vlcs_tar()
    server.routes["/VLCS.tar.gz"] = (body, "application/gzip")
    with_remotes(monkeypatch, "vlcs", dl.Remote("VLCS.tar.gz", urls=(f"{server.base}/VLCS.tar.gz",)))
    d = tmp_path / dl.DOWNLOADS
    d.mkdir()
    (d / "VLCS.tar.gz.part").write_bytes(b"garbage from elsewhere")
    (d / "VLCS.tar.gz.part.src").write_text("http://example.invalid/other.tar.gz\n")
    dl.download_dataset("vlcs", tmp_path, progress=False)
    assert server.requests[0][2] is None  # no Range header


DRIVE_WARNING = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<form id="download-form" action="{action}" method="get">
<input type="submit" value="Download anyway"/>
<input type="hidden" name="id" value="{fid}"><input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="u-123"></form></body></html>"""


def test_gdrive_confirm_page_then_pacs_layout(tmp_path, monkeypatch, server):
    archive = zip_bytes({**{f"kfold/{e}/dog/x.jpg": b"x" for e in ("art_painting", "cartoon", "photo", "sketch")},
                         "__MACOSX/kfold/._x.jpg": b"fork"})

    def drive(handler):
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        if q.get("confirm") == ["t"] and q.get("uuid") == ["u-123"] and q.get("id") == ["FILEID"]:
            return archive, "application/zip"
        return DRIVE_WARNING.format(action=f"{server.base}/download", fid="FILEID").encode(), "text/html"

    server.routes["/download"] = drive
    monkeypatch.setattr(dl, "GDRIVE_DOWNLOAD", f"{server.base}/download")
    with_remotes(monkeypatch, "pacs", dl.Remote("PACS.zip", gdrive_id="FILEID"))
    out = dl.download_dataset("pacs", tmp_path, progress=False)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["art_painting", "cartoon", "photo", "sketch"]
    assert not (tmp_path / "__MACOSX").exists() and not (out / "__MACOSX").exists()
    assert [r[1] for r in server.requests][0] == "id=FILEID&export=download"
    assert "uuid=u-123" in server.requests[-1][1]


def test_gdrive_older_confirm_form(tmp_path, monkeypatch, server):
    page = (f'<html><title>Google Drive - Virus scan warning</title><form id="downloadForm" '
            f'action="{server.base}/uc?export=download&amp;id=F2&amp;confirm=t&amp;uuid=v9" method="post">'
            '<input type="submit" value="Download anyway"></form></html>').encode()
    server.routes["/download"] = (page, "text/html")
    server.routes["/uc"] = lambda h: ((vlcs_tar(), "application/gzip") if "confirm=t&uuid=v9" in h.path
                                      else (b"no", "text/html"))
    monkeypatch.setattr(dl, "GDRIVE_DOWNLOAD", f"{server.base}/download")
    with_remotes(monkeypatch, "vlcs", dl.Remote("VLCS.tar.gz", gdrive_id="F2"))
    assert (dl.download_dataset("vlcs", tmp_path, progress=False) / dl.MARKER).is_file()


def test_gdrive_quota_page_is_a_data_error(tmp_path, monkeypatch, server):
    page = b"<html><head><title>Google Drive - Quota exceeded</title></head><body>Too many users</body></html>"
    server.routes["/download"] = (page, "text/html")
    monkeypatch.setattr(dl, "GDRIVE_DOWNLOAD", f"{server.base}/download")
    with_remotes(monkeypatch, "officehome", dl.Remote("office_home.zip", gdrive_id="FILEID"))
    with pytest.raises(DataError, match="Quota exceeded") as ei:
        dl.download_dataset("officehome", tmp_path, progress=False)
    assert_one_line_fix(ei.value, dl.gdrive_url("FILEID"), tmp_path / "office_home")


# ---------------------------------------------------------------------------------------------------------
# unpacking and reorganisation (archives placed in _downloads: no network)


def place(tmp_path: Path, files: dict) -> Path:
    d = tmp_path / dl.DOWNLOADS
    d.mkdir(exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def test_archive_saved_by_hand_is_used(tmp_path, monkeypatch):
    place(tmp_path, {"VLCS.tar.gz": vlcs_tar()})
    (tmp_path / ".VLCS.partial" / "junk").mkdir(parents=True)  # an earlier crashed unpack
    no_network(monkeypatch)
    out = dl.download_dataset("vlcs", tmp_path, progress=False)
    assert (out / "LabelMe" / "bird" / "0.jpg").is_file() and (out / dl.MARKER).is_file()
    assert leftovers(tmp_path) == [] and not (tmp_path / dl.DOWNLOADS / "VLCS.tar.gz").exists()


def test_office_home_zip_renamed(tmp_path, monkeypatch):
    envs = ("Art", "Clipart", "Product", "Real World")
    files = {f"OfficeHomeDataset_10072016/{e}/Alarm_Clock/00001.jpg": b"x" for e in envs}
    place(tmp_path, {"office_home.zip": zip_bytes({**files, "OfficeHomeDataset_10072016/ImageInfo.csv": b"a"})})
    no_network(monkeypatch)
    out = dl.download_dataset("office_home", tmp_path, progress=False)
    assert out.name == "office_home" and (out / "Real World" / "Alarm_Clock" / "00001.jpg").is_file()


def test_terra_incognita_reorganised(tmp_path, monkeypatch):
    cats = [{"id": i, "name": n} for i, n in enumerate(["bird", "deer", "empty", "coyote", "rabbit"])]
    images, annotations, tar_files = [], [], {}
    spec = [  # (file, location, [category ids])
        ("a.jpg", 38, [0]), ("b.jpg", "43", [2]), ("c.jpg", 46, [3, 4]), ("d.jpg", 100, [0]),
        ("e.jpg", 99, [0]),  # location not kept
        ("f.jpg", 38, [1]),  # class not kept
        ("g.jpg", 100, [1, 4]),  # one kept class of two
    ]
    for n, (fname, loc, cids) in enumerate(spec):
        images.append({"id": f"im{n}", "file_name": fname, "location": loc})
        annotations += [{"id": f"an{n}_{c}", "image_id": f"im{n}", "category_id": c} for c in cids]
        tar_files[f"eccv_18_all_images_sm/{fname}"] = fname.encode()
    ann = json.dumps({"images": images, "annotations": annotations, "categories": cats}).encode()
    place(tmp_path, {"eccv_18_all_images_sm.tar.gz": tar_bytes(tar_files),
                     "caltech_camera_traps.json.zip": zip_bytes({"caltech_images_20210113.json": ann})})
    no_network(monkeypatch)
    out = dl.download_dataset("terraincognita", tmp_path, progress=False)
    assert out == tmp_path / "terra_incognita"
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg"))
    assert got == ["location_100/bird/d.jpg", "location_100/rabbit/g.jpg", "location_38/bird/a.jpg",
                   "location_43/empty/b.jpg", "location_46/coyote/c.jpg", "location_46/rabbit/c.jpg"]
    assert (out / "location_46" / "rabbit" / "c.jpg").read_bytes() == b"c.jpg"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"location_{x}" for x in ("100", "38", "43", "46")]
    assert (out / dl.MARKER).is_file() and leftovers(tmp_path) == []


def test_terra_incognita_missing_location_is_an_error(tmp_path, monkeypatch):
    ann = {"images": [{"id": 1, "file_name": "a.jpg", "location": 38}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 0}], "categories": [{"id": 0, "name": "bird"}]}
    place(tmp_path, {"eccv_18_all_images_sm.tar.gz": tar_bytes({"eccv_18_all_images_sm/a.jpg": b"a"}),
                     "caltech_camera_traps.json.zip": zip_bytes({"x.json": json.dumps(ann).encode()})})
    no_network(monkeypatch)
    with pytest.raises(DataError, match="lacks the domain folders"):
        dl.download_dataset("terraincognita", tmp_path, progress=False)
    assert not (tmp_path / "terra_incognita").exists() and leftovers(tmp_path) == []
    assert (tmp_path / dl.DOWNLOADS / "eccv_18_all_images_sm.tar.gz").exists()  # kept for a retry


def domainnet_files() -> dict:
    files = {"domain_net_duplicates.txt": b"clipart/cake/clipart_052_000004.jpg\nsketch/zebra/sketch_344_000055.jpg\n"
             b"real/cake/not_there.jpg\n"}
    for d in dl.DOMAINNET_DOMAINS:
        files[f"{d}.zip"] = zip_bytes({f"{d}/cake/{d}_052_000004.jpg": b"1", f"{d}/zebra/{d}_344_000055.jpg": b"2"})
    return files


def test_domainnet_duplicates_removed(tmp_path, monkeypatch):
    place(tmp_path, domainnet_files())
    no_network(monkeypatch)
    out = dl.download_dataset("domainnet", tmp_path, progress=False)
    assert not (out / "clipart" / "cake" / "clipart_052_000004.jpg").exists()
    assert not (out / "sketch" / "zebra" / "sketch_344_000055.jpg").exists()
    assert (out / "clipart" / "zebra" / "clipart_344_000055.jpg").is_file()
    assert (out / "real" / "cake" / "real_052_000004.jpg").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == list(dl.DOMAINNET_DOMAINS)


def test_domainnet_bad_duplicate_list(tmp_path, monkeypatch):
    files = domainnet_files()
    files["domain_net_duplicates.txt"] = b"<html>rate limited</html>\n"
    place(tmp_path, files)
    no_network(monkeypatch)
    with pytest.raises(DataError, match="is not DomainBed's DomainNet duplicate list"):
        dl.download_dataset("domainnet", tmp_path, progress=False)
    assert not (tmp_path / "domain_net").exists() and leftovers(tmp_path) == []


def test_corrupt_and_unsafe_archives(tmp_path, monkeypatch):
    no_network(monkeypatch)
    place(tmp_path, {"VLCS.tar.gz": b"this is not an archive"})
    with pytest.raises(DataError, match="not a readable archive.*delete it and rerun"):
        dl.download_dataset("vlcs", tmp_path, progress=False)
    place(tmp_path, {"VLCS.tar.gz": tar_bytes({"VLCS/../../evil.txt": b"x"})})
    with pytest.raises(DataError, match="unsafe path"):
        dl.download_dataset("vlcs", tmp_path, progress=False)
    assert not (tmp_path.parent / "evil.txt").exists() and leftovers(tmp_path) == []


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
# command line


def test_cli_network_failure_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dl, "_probe", lambda url, timeout: "cannot resolve the host name (test)")
    assert dl.main(["pacs", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot download PACS.zip from https://drive.google.com/")
    assert "No network? Download" in err[0]


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
