"""fastsel.index_domainbed == scmd.data.index_imagefolder (torchvision ImageFolder per env)."""

import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.datasets import ImageFolder

import fastsel
from scmd.data import index_imagefolder

# ---------------------------------------------------------------------------------------------
# trees vs ImageFolder
# ---------------------------------------------------------------------------------------------

ALPHABET = "abcXYZ09 -_.,'~é日ßÅ\U0001f600\udcff"
NAMES = st.text(ALPHABET, min_size=1, max_size=5).filter(lambda s: s not in (".", ".."))
EXTS = st.sampled_from(
    [
        ".jpg",
        ".JPG",
        ".Jpeg",
        ".png",
        ".PnG",
        ".webp",
        ".tiff",
        ".TIF",
        ".bmp",
        ".pgm",
        ".ppm",
        ".txt",
        ".gif",
        "",
        ".jpg.bak",
        "jpg",
    ]
)
FILES = st.tuples(NAMES, EXTS).map("".join)
FOLDER = st.recursive(
    st.dictionaries(FILES, st.none(), max_size=4),
    lambda sub: st.dictionaries(st.one_of(NAMES, FILES), st.one_of(st.none(), sub), max_size=4),
    max_leaves=10,
)


def materialize(base, spec):
    os.makedirs(base, exist_ok=True)
    for name, child in spec.items():
        path = os.path.join(base, name)
        if child is None:
            with open(path, "wb"):
                pass
        else:
            materialize(path, child)


@st.composite
def datasets(draw):
    classes = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    envs = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    tree = {}
    for env in envs:
        env_classes = list(classes)
        if draw(st.integers(0, 9)) == 0:  # sometimes a different class set
            env_classes = draw(st.lists(NAMES, min_size=0, max_size=3, unique=True))
        tree[env] = {}
        for c in env_classes:
            folder = draw(FOLDER)
            if draw(st.integers(0, 5)):  # usually at least one image
                folder[draw(NAMES) + draw(st.sampled_from([".jpg", ".PNG"]))] = None
            tree[env][c] = folder
    extras = draw(
        st.lists(st.sampled_from(["class_link", "sub_link", "dangling", "root_file"]), max_size=3, unique=True)
    )
    return tree, extras


def build(tmp, tree, extras):
    root = os.path.join(tmp, "root")
    pool = os.path.join(tmp, "pool")  # outside the root, no links inside: no loops possible
    materialize(pool, {"p1.jpg": None, "deep": {"p2.JPEG": None, "note.txt": None}})
    os.makedirs(root)
    for env, classes in tree.items():
        materialize(os.path.join(root, env), classes)
    envs = sorted(tree)
    first_env = os.path.join(root, envs[0])
    first_classes = sorted(tree[envs[0]])
    if "class_link" in extras:
        # the same extra class in every env, as a symlinked folder
        for env in envs:
            os.symlink(pool, os.path.join(root, env, "zlinked"))
    if "sub_link" in extras and first_classes:
        os.symlink(pool, os.path.join(first_env, first_classes[0], "linked_sub"))
    if "dangling" in extras and first_classes:
        os.symlink(os.path.join(tmp, "missing"), os.path.join(first_env, first_classes[0], "dangling.jpg"))
    if "root_file" in extras:
        with open(os.path.join(root, "README.jpg"), "wb"):
            pass
    return root


def reference(root):
    """What fastsel must return, or the class of what it must raise: the product's reference indexer."""
    try:
        want = index_imagefolder(root)
    except (FileNotFoundError, ValueError) as e:
        return type(e)
    # the reference is torchvision's ImageFolder per env
    for env, paths, labels in zip(want["envs"], want["paths"], want["labels"]):
        samples = ImageFolder(os.path.join(root, env)).samples
        assert paths == [p for p, _ in samples]
        assert labels.tolist() == [t for _, t in samples]
    return want


def check(root):
    want = reference(root)
    if isinstance(want, type):
        with pytest.raises(want):
            fastsel.index_domainbed(root)
        return
    got = fastsel.index_domainbed(root)
    assert got["envs"] == want["envs"]
    assert got["classes"] == want["classes"]
    assert got["paths"] == want["paths"]
    assert [lab.tolist() for lab in got["labels"]] == [lab.tolist() for lab in want["labels"]]
    assert all(lab.dtype == np.int64 for lab in got["labels"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets())
def test_random_trees_match_imagefolder(tmp_path_factory, data):
    tree, extras = data
    tmp = str(tmp_path_factory.mktemp("tree"))
    check(build(tmp, tree, extras))


def test_folder_order_is_full_path_string_order(tmp_path):
    # os.walk folders sorted as strings: "c" < "c/sub" < "c/sub-a" < "c/sub/x" ('-' < '/')
    for env in ("e1", "e0"):
        materialize(
            str(tmp_path / env),
            {
                "c": {
                    "a.jpg": None,
                    "sub": {"x": {"1.jpg": None}, "2.jpg": None},
                    "sub-a": {"3.jpg": None},
                    "B.JPG": None,
                }
            },
        )
    got = fastsel.index_domainbed(str(tmp_path) + "/")
    rel = [os.path.relpath(p, tmp_path) for p in got["paths"][0]]
    assert rel == ["e0/c/B.JPG", "e0/c/a.jpg", "e0/c/sub/2.jpg", "e0/c/sub-a/3.jpg", "e0/c/sub/x/1.jpg"]
    assert got["paths"][0][0].startswith(str(tmp_path) + "/e0")  # os.path.join keeps one '/'
    check(str(tmp_path))
    check(str(tmp_path) + "/")


def test_non_utf8_names(tmp_path):
    root = os.fsencode(tmp_path)
    for env in (b"env", b"env2"):
        for cls in (b"cat", b"\xff\xfeodd"):
            d = os.path.join(root, env, cls)
            os.makedirs(d)
            for f in (b"\xe9t\xe9.jpg", "\ue000.jpg".encode(), b"z.png", b"\xc3\xa9.jpg"):
                open(os.path.join(d, f), "wb").close()
    check(str(tmp_path))


def test_pathlike_and_home(tmp_path, monkeypatch):
    materialize(str(tmp_path / "data" / "e"), {"c": {"x.jpg": None}})
    monkeypatch.setenv("HOME", str(tmp_path))
    a = fastsel.index_domainbed("~/data")
    b = fastsel.index_domainbed(tmp_path / "data")
    assert a["paths"] == b["paths"] == [[os.path.join(str(tmp_path), "data", "e", "c", "x.jpg")]]


def test_symlink_loop_is_reported(tmp_path):
    materialize(str(tmp_path / "e"), {"c": {"x.jpg": None, "sub": {"y.jpg": None}}})
    os.symlink(tmp_path / "e" / "c", tmp_path / "e" / "c" / "sub" / "back")
    with pytest.raises(OSError, match="symlink loop") as info:
        fastsel.index_domainbed(tmp_path)
    assert "back" in str(info.value)


def test_empty_class_folder_raises_like_imagefolder(tmp_path):
    materialize(str(tmp_path / "e"), {"a": {"x.jpg": None}, "b": {"notes.txt": None}})
    with pytest.raises(FileNotFoundError):
        ImageFolder(str(tmp_path / "e"))
    with pytest.raises(FileNotFoundError, match=r"no valid file for the classes b") as info:
        fastsel.index_domainbed(tmp_path)
    assert str(tmp_path / "e") in str(info.value)


def test_empty_env_and_missing_classes(tmp_path):
    materialize(str(tmp_path / "e1"), {"a": {"x.jpg": None}})
    materialize(str(tmp_path / "e2"), {"a": {"x.txt": None}})
    with pytest.raises(FileNotFoundError, match="contains no image files"):
        fastsel.index_domainbed(tmp_path)
    materialize(str(tmp_path / "e2"), {"b": {"y.jpg": None}})
    # the first failing env decides, checked as ImageFolder on it: e2's class a has no images
    with pytest.raises(FileNotFoundError, match="no valid file for the classes a"):
        fastsel.index_domainbed(tmp_path)
    check(str(tmp_path))
    materialize(str(tmp_path / "e2"), {"a": {"z.jpg": None}})
    with pytest.raises(ValueError, match=r"missing \[\], extra \[b\]"):
        fastsel.index_domainbed(tmp_path)
    check(str(tmp_path))
    materialize(str(tmp_path / "e1"), {"c": {"notes.txt": None}})  # now e1 fails first
    with pytest.raises(FileNotFoundError, match="no valid file for the classes c"):
        fastsel.index_domainbed(tmp_path)
    check(str(tmp_path))
    os.makedirs(tmp_path / "e0")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        fastsel.index_domainbed(tmp_path)


def test_no_env_folders(tmp_path):
    (tmp_path / "file.jpg").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no environment folders"):
        fastsel.index_domainbed(tmp_path)


def test_unreadable_folder(tmp_path):
    """An unreadable folder is an error naming it (ImageFolder would silently skip it).

    Root ignores permissions, so as root the check runs in a child without CAP_DAC_*."""
    materialize(str(tmp_path / "e"), {"c": {"x.jpg": None, "sub": {"y.jpg": None}}})
    sub = tmp_path / "e" / "c" / "sub"
    os.chmod(sub, 0)
    code = (
        "import fastsel, sys\n"
        "try:\n    fastsel.index_domainbed(sys.argv[1])\n"
        "except PermissionError as e:\n    print('PermissionError', e)\n"
    )
    cmd = [sys.executable, "-c", code, str(tmp_path)]
    if os.geteuid() == 0:
        if shutil.which("capsh") is None:
            pytest.skip("running as root without capsh: permissions cannot be enforced")
        cmd = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shlex.join(cmd)]
    try:
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    finally:
        os.chmod(sub, 0o755)
    if "PermissionError" not in out.stdout and "capsh" in " ".join(cmd) and out.returncode != 0:
        pytest.skip(f"capsh could not drop capabilities here: {out.stderr[-200:]}")
    assert out.stdout.startswith("PermissionError"), out.stdout + out.stderr
    assert str(sub) in out.stdout
