"""Benchmark fastsel against the Python/torch code it replaces; prints a table, writes JSON.

  python bench/bench_fastsel.py                       # full run (600k-file tree, a few minutes)
  python bench/bench_fastsel.py --quick               # tiny sizes, seconds
  python bench/bench_fastsel.py --index-files 60000   # smaller tree

(a) selection: median time per call of torch.sort(stable=True), torch.sort, torch.topk,
    fastsel.topk_desc, topk + Tracker.record, and the call floor fastsel.topk_desc(losses, 0)
    (the same argument checks and an empty result, no ranking); (b) indexing a DomainNet-shaped
    tree of empty files with fastsel.index_domainbed vs torchvision ImageFolder per env (identical
    output checked);
    (c) tokenising classes x templates with fastsel vs open_clip (identical ids checked).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import numpy as np

# DomainNet env sizes (DomainBed paper); the generated tree keeps these proportions.
DOMAINNET_ENVS = {
    "clipart": 48_129,
    "infograph": 51_605,
    "painting": 72_266,
    "quickdraw": 172_500,
    "real": 172_947,
    "sketch": 69_128,
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def per_call_us(fn: Callable[[], object], calls: int, samples: int) -> float:
    """Median over `samples` batches of the mean time per call, in microseconds."""
    fn()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


FLOOR = "fastsel.topk_desc(k=0) (floor)"


def selection_methods(n: int, p: float) -> Dict[str, Callable[[], object]]:
    """The timed callables for one batch size (CE-like losses without ties)."""
    import torch

    import fastsel

    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n).astype(np.float32) ** 2) * 2.0
    t = torch.from_numpy(x)
    k = int(n * p)  # the kept count, as scmd_ref.Selector
    ids = rng.integers(0, 10 * n, n).astype(np.int64)
    doms = (ids % 3).astype(np.int64)
    tracker = fastsel.Tracker(10 * n, 3, window=100)
    step = [0]

    def topk_record():
        kept = fastsel.topk_desc(x, k)
        tracker.record(step[0], ids, doms, x, kept)
        step[0] += 1

    np.testing.assert_array_equal(
        fastsel.topk_desc(x, k), torch.sort(t, descending=True, stable=True).indices[:k].numpy()
    )
    return {
        "torch.sort(stable=True)": lambda: torch.sort(t, descending=True, stable=True).indices[:k],
        "torch.sort": lambda: torch.sort(t, descending=True).indices[:k],
        "torch.topk": lambda: torch.topk(t, k).indices,
        "fastsel.topk_desc": lambda: fastsel.topk_desc(x, k),
        "fastsel topk + Tracker.record": topk_record,
        FLOOR: lambda: fastsel.topk_desc(x, 0),
    }


def bench_selection(sizes: List[int], p: float, samples: int) -> Dict:
    import torch


    rows = []
    ratios = {}
    for n in sizes:
        k = int(n * p)  # the kept count, as scmd_ref.Selector
        methods = selection_methods(n, p)
        calls = max(20, 20000 // n)
        # interleave the methods so that load changes hit them alike
        per_method: Dict[str, List[float]] = {m: [] for m in methods}
        for _ in range(samples):
            for name, fn in methods.items():
                per_method[name].append(per_call_us(fn, calls, 1))
        res = {name: statistics.median(v) for name, v in per_method.items()}
        for name, med in res.items():
            rows.append({"n": n, "k": k, "method": name, "median_us": med})
        ratios[str(n)] = {
            "torch_stable_over_fastsel": res["torch.sort(stable=True)"] / res["fastsel.topk_desc"],
            "torch_default_over_fastsel": res["torch.sort"] / res["fastsel.topk_desc"],
            "fastsel_over_floor": res["fastsel.topk_desc"] / res[FLOOR],
        }
    return {"p": p, "samples": samples, "torch_threads": torch.get_num_threads(), "rows": rows, "ratios": ratios}


def make_tree(root: str, total_files: int, n_classes: int) -> Dict[str, int]:
    """DomainNet-shaped tree of empty .jpg files (plus one non-image per class)."""
    scale = total_files / sum(DOMAINNET_ENVS.values())
    counts = {}
    for env, size in DOMAINNET_ENVS.items():
        n_env = max(n_classes, int(round(size * scale)))
        counts[env] = n_env
        for c in range(n_classes):
            d = os.path.join(root, env, f"{c:03d}_class")
            os.makedirs(d)
            n_cls = n_env // n_classes + (1 if c < n_env % n_classes else 0)
            for i in range(n_cls):
                open(os.path.join(d, f"{env}_{c:03d}_{i:06d}.jpg"), "wb").close()
            open(os.path.join(d, "notes.txt"), "wb").close()
    return counts


def bench_indexing(total_files: int, n_classes: int, repeats: int, keep: str | None) -> Dict:
    from torchvision.datasets import ImageFolder

    import fastsel

    tmp = keep or tempfile.mkdtemp(prefix="fastsel-bench-")
    root = os.path.join(tmp, "domain_net")
    try:
        t0 = time.perf_counter()
        if not os.path.isdir(root):
            counts = make_tree(root, total_files, n_classes)
        else:
            counts = {e: -1 for e in sorted(os.listdir(root))}
        create_s = time.perf_counter() - t0

        def run_imagefolder():
            envs = sorted(e.name for e in os.scandir(root) if e.is_dir())
            return envs, [ImageFolder(os.path.join(root, e)).samples for e in envs]

        # warm the page cache once, then alternate
        fs_out = fastsel.index_domainbed(root)
        envs, samples = run_imagefolder()
        identical = fs_out["envs"] == envs and all(
            fs_out["paths"][i] == [p for p, _ in s] and fs_out["labels"][i].tolist() == [t for _, t in s]
            for i, s in enumerate(samples)
        )

        def run_scandir_floor():
            # the bare listing cost: one os.scandir per folder, nothing else
            stack, n = [root], 0
            while stack:
                for e in os.scandir(stack.pop()):
                    if e.is_dir():
                        stack.append(e.path)
                    else:
                        n += 1
            return n

        t_fs, t_if, t_floor = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run_scandir_floor()
            t_floor.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fastsel.index_domainbed(root)
            t_fs.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_imagefolder()
            t_if.append(time.perf_counter() - t0)
        n_files = sum(len(s) for s in samples)
        return {
            "envs": len(envs),
            "classes": n_classes,
            "image_files": n_files,
            "files_per_env": {e: len(s) for e, s in zip(envs, samples)},
            "requested_files": total_files,
            "tree_creation_s": create_s,
            "repeats": repeats,
            "fastsel_s": statistics.median(t_fs),
            "imagefolder_s": statistics.median(t_if),
            "speedup": statistics.median(t_if) / statistics.median(t_fs),
            "scandir_floor_s": statistics.median(t_floor),
            "identical": bool(identical),
            "env_counts_requested": counts,
        }
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


def bench_tokenize(n_classes: int, repeats: int) -> Dict:
    import open_clip
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    import fastsel

    # the product formats prompts in Python (scmd.models.class_prompts) and tokenises them with fastsel;
    # both sides here tokenise the same strings: CLIP's 80 ImageNet templates for each class
    classnames = [f"class_name_{i}" for i in range(n_classes)]
    templates = list(OPENAI_IMAGENET_TEMPLATES)
    prompts = [t(c.replace("_", " ")) for c in classnames for t in templates]
    t0 = time.perf_counter()
    tok = fastsel.PromptTokenizer()
    load_fs = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = open_clip.get_tokenizer("ViT-B-32")
    load_oc = time.perf_counter() - t0

    def run_openclip():
        return ref(prompts).numpy()

    def run_fastsel():
        return tok.tokenize(prompts, 77)

    identical = bool(np.array_equal(run_fastsel(), run_openclip()))
    t_fs, t_oc = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_fastsel()
        t_fs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_openclip()
        t_oc.append(time.perf_counter() - t0)
    return {
        "classes": n_classes,
        "templates": len(templates),
        "prompts": n_classes * len(templates),
        "repeats": repeats,
        "fastsel_s": statistics.median(t_fs),
        "open_clip_s": statistics.median(t_oc),
        "speedup": statistics.median(t_oc) / statistics.median(t_fs),
        "fastsel_load_s": load_fs,
        "open_clip_load_s": load_oc,
        "identical": identical,
    }


def versions() -> Dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for mod in ("fastsel", "numpy", "torch", "torchvision", "open_clip"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # pragma: no cover - informational only
            out[mod] = f"unavailable ({e.__class__.__name__})"
    return out


def print_report(res: Dict) -> None:
    sel = res["selection"]
    print(f"\n(a) selection, median us per call (p = {sel['p']}, torch threads = {sel['torch_threads']})")
    sizes = sorted({r["n"] for r in sel["rows"]})
    methods = list(dict.fromkeys(r["method"] for r in sel["rows"]))
    table = {(r["n"], r["method"]): r["median_us"] for r in sel["rows"]}
    print(f"{'method':32s}" + "".join(f"{'N=' + str(n):>12s}" for n in sizes))
    for m in methods:
        print(f"{m:32s}" + "".join(f"{table[(n, m)]:12.2f}" for n in sizes))
    for key in (
        "torch_stable_over_fastsel",
        "torch_default_over_fastsel",
        "fastsel_over_floor",
    ):
        print(f"{key:32s}" + "".join(f"{sel['ratios'][str(n)][key]:11.1f}x" for n in sizes))
    ix = res["indexing"]
    print(
        f"\n(b) indexing {ix['envs']} envs x {ix['classes']} classes, {ix['image_files']} images "
        f"(median of {ix['repeats']}, warm cache)"
    )
    print(
        f"    fastsel.index_domainbed {ix['fastsel_s']:.3f} s | ImageFolder per env {ix['imagefolder_s']:.3f} s"
        f" | speedup {ix['speedup']:.1f}x | identical {ix['identical']}"
    )
    print(f"    (listing floor: bare os.scandir over all folders {ix['scandir_floor_s']:.3f} s)")
    tk = res["tokenize"]
    print(f"\n(c) tokenising {tk['classes']} classes x {tk['templates']} templates = {tk['prompts']} prompts")
    print(
        f"    fastsel {tk['fastsel_s'] * 1e3:.1f} ms | open_clip {tk['open_clip_s'] * 1e3:.1f} ms"
        f" | speedup {tk['speedup']:.1f}x | identical {tk['identical']}"
    )
    print("\ntargets:", json.dumps(res["targets"]))


def main(argv: List[str] | None = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join("bench", "results", "fastsel.json"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for tests")
    ap.add_argument("--index-files", type=int, default=None, help="images in the tree (default 600000)")
    ap.add_argument("--index-classes", type=int, default=None, help="classes per env (default 345)")
    ap.add_argument("--keep-tree", default=None, help="create/reuse the tree in this folder")
    ap.add_argument("--p", type=float, default=0.25, help="kept fraction for the selection benchmark")
    args = ap.parse_args(argv)

    if args.quick:
        sizes, samples, files, classes = [96, 160], 3, 1200, 20
        idx_rep, tok_classes, tok_rep = 1, 10, 1
    else:
        sizes, samples, files, classes = [96, 160, 1024, 8192], 25, 600_000, 345
        idx_rep, tok_classes, tok_rep = 3, 345, 3
    files = args.index_files or files
    classes = args.index_classes or classes

    res = {
        "benchmark": "fastsel",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "versions": versions(),
        "settings": {
            "quick": args.quick,
            "sizes": sizes,
            "samples": samples,
            "index_files": files,
            "index_classes": classes,
            "index_repeats": idx_rep,
            "tokenize_classes": tok_classes,
            "tokenize_repeats": tok_rep,
            "p": args.p,
        },
    }
    res["selection"] = bench_selection(sizes, args.p, samples)
    res["indexing"] = bench_indexing(files, classes, idx_rep, args.keep_tree)
    res["tokenize"] = bench_tokenize(tok_classes, tok_rep)
    r96 = res["selection"]["ratios"]["96"]
    res["targets"] = {
        "selection_5x_faster_than_torch_sort_at_96": r96["torch_stable_over_fastsel"] >= 5,
        "selection_within_3x_of_floor_at_96": r96["fastsel_over_floor"] <= 3,
        "indexing_5x_faster_than_imagefolder": res["indexing"]["speedup"] >= 5,
        "tokenize_20x_faster_than_open_clip": res["tokenize"]["speedup"] >= 20,
        "outputs_identical": res["indexing"]["identical"] and res["tokenize"]["identical"],
    }
    print_report(res)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\nwrote {args.out}")
    return res


if __name__ == "__main__":
    main()
