"""Throughput of the training data pipeline (DomainBed augmentation, scmd.data.StepBatches + train_loader, one
loader per training domain, batches concatenated as the loop does) for several worker counts, and whether the
loader or the model bounds a training step.

    python bench/data_loading.py                              # embedded world (generated into ./data if missing)
    python bench/data_loading.py --workers 0 1 2 4 8 --steps 50
    python bench/data_loading.py --step-json bench/results/step_breakdown_tiny_cpu.json
    python bench/data_loading.py --workers 0 --kept-share 0.2    # a stale selecting step: pixels of kept rows only
    python bench/data_loading.py --dataset-root /data/domainbed/PACS --image-size 224 \\
        --step-json bench/results/step_breakdown_full_cuda.json    # a real DomainBed dataset, read from disk

A step needs one batch from each training domain. With 0 workers the main process loads it between model steps
(step time = load + model); with w >= 1 workers per loader, loading overlaps the model (step time ~ max(load,
model)) as long as the workers have CPU cores of their own. The verdict compares the loader's images/s with the
model's (N / median step time of one configuration of a step_breakdown JSON). On a CPU-only machine the workers
and the model share the cores, so the overlap there is optimistic.

--kept-share p times what a selecting step of `--selection-losses stale` loads from an in-memory dataset: the
candidates are drawn as always, but only floor(N p) rows of them (a random choice here; the kept ones in a run)
are augmented (scmd.data.LazyImages).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scmd import data as D  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default="./data", help="where the embedded world is (generated if missing)")
    p.add_argument("--dataset-root", default=None,
                   help="a DomainBed-layout dataset folder (<env>/<class>/<image>) to read instead of the world")
    p.add_argument("--n-per-class", type=int, default=None,
                   help="generate/use a partial world (the first N images of every env/class), in its own "
                        "folder embedded_world_n<N> beside the full one")
    p.add_argument("--image-size", type=int, default=None, help="default: world 32 px, --dataset-root 224 px")
    p.add_argument("--preload", choices=["auto", "yes", "no"], default="auto",
                   help="decode all images into memory first (auto: yes for the world, as the loop; no otherwise)")
    p.add_argument("--test-env", type=int, default=0, help="held-out domain (the others are loaded)")
    p.add_argument("--batch", type=int, default=32, help="per training domain")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="worker counts per loader (default 0 1 2, plus 4 8 ... up to the CPU count)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per worker count")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (worker start-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kept-share", type=float, default=None,
                   help="augment only floor(N p) rows of each step batch, as stale selection does (in memory only)")
    p.add_argument("--step-json", default=None, help="a step_breakdown JSON to compare with")
    p.add_argument("--config", default="scmd", help="configuration of --step-json to compare with (default scmd)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/data_loading_<dataset>.json)")
    return p.parse_args(argv)


def default_workers() -> list:
    cpus = os.cpu_count() or 1
    ws, w = [0, 1, 2], 4
    while w <= cpus:
        ws.append(w)
        w *= 2
    return ws


def time_loader(store, index, splits, train_envs, batch, seed, size, workers, steps, warmup,
                kept_share=None) -> dict:
    """Steps per second of [next(it) for it in loaders] + the loop's concatenation (+ taking the kept rows)."""
    t_start = time.perf_counter()
    lazy_until = 2**62 if kept_share is not None else -1
    loaders = [D.train_loader(D.StepBatches(store, e, splits[e][1], batch, seed, size, lazy_until=lazy_until), 0,
                              workers) for e in train_envs]
    iters = [iter(ld) for ld in loaders]
    times = []
    first = None
    rng = np.random.default_rng(seed)
    n = len(train_envs) * batch
    for i in range(warmup + steps):
        kept = torch.from_numpy(rng.permutation(n)[: int(n * kept_share)]) if kept_share is not None else None
        t = time.perf_counter()
        batches = [next(it) for it in iters]
        x = D.cat_images([b[0] for b in batches], torch.device("cpu"))
        x = x[kept] if kept is not None else x
        torch.cat([b[1] for b in batches])
        torch.cat([b[2] for b in batches])
        dt = time.perf_counter() - t
        if i == 0:
            first = time.perf_counter() - t_start
        if i >= warmup:
            times.append(dt)
    del iters, loaders
    gc.collect()
    a = np.asarray(times)
    n_img = len(x)
    total = float(a.sum())
    return {"workers": workers, "steps": steps, "images_per_step": n_img, "image_shape": list(x.shape[1:]),
            "ms_per_step_median": float(np.median(a) * 1e3), "ms_per_step_mean": float(a.mean() * 1e3),
            "ms_per_step_p10": float(np.percentile(a, 10) * 1e3), "ms_per_step_p90": float(np.percentile(a, 90) * 1e3),
            "images_per_s": n_img * steps / total if total > 0 else float("inf"),
            "first_batch_s": first}


def model_rate(step_json: str, config: str):
    d = json.loads(Path(step_json).read_text())
    c = d["configs"].get(config)
    if c is None:
        raise SystemExit(f"data_loading: {step_json} has no configuration {config!r} "
                         f"(has {', '.join(d['configs'])})")
    ms = c["phases"]["total"]["median"]
    n = d["settings"]["N"]
    return {"file": step_json, "config": config, "device": d["device"], "scale": d["settings"]["scale"],
            "image_size": d["settings"]["image_size"], "N": n, "ms_per_step": ms, "images_per_s": n / ms * 1e3}


def verdict(r: dict, m: dict) -> str:
    load_ms, model_ms = r["ms_per_step_mean"], m["ms_per_step"]
    if r["workers"] == 0:
        return (f"serial: step ~ {load_ms:.1f} + {model_ms:.1f} ms, loading is "
                f"{100 * load_ms / (load_ms + model_ms):.0f}% of it")
    bound = "LOADER-bound" if load_ms > model_ms else "model-bound"
    return f"{bound}: loader {load_ms:.1f} ms/step vs model {model_ms:.1f} ms/step"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dataset_root:
        root = Path(args.dataset_root)
        name = root.name
        size = args.image_size or 224
        preload = args.preload == "yes"
    else:
        from scmd import world

        root = world.ensure_dataset(args.data_dir, progress=True, n_per_class=args.n_per_class)
        name = "embedded" if args.n_per_class is None else f"embedded{args.n_per_class}"
        size = args.image_size or int(world.IMAGE_SIZE)
        preload = args.preload != "no"
    t = time.perf_counter()
    index = D.index_dataset(root)
    n_envs = len(index.envs)
    if not 0 <= args.test_env < n_envs:
        raise SystemExit(f"data_loading: --test-env {args.test_env} out of range (0..{n_envs - 1})")
    train_envs = [e for e in range(n_envs) if e != args.test_env]
    in_memory = preload and not args.dataset_root  # the embedded world: batched tensor augmentation (scmd.augment)
    if args.kept_share is not None and not (in_memory and 0 < args.kept_share <= 1):
        raise SystemExit("data_loading: --kept-share needs a share in (0, 1] and the in-memory embedded world "
                         "(stale selection augments only the kept rows of in-memory batches)")
    store = D.ImageStore(index, preload=preload, as_tensors=in_memory)
    splits = [D.in_out_split(len(index.paths[e]), 0.2, 0, e) for e in range(n_envs)]
    setup_s = time.perf_counter() - t
    print(f"[data_loading] {name}: {index.n_samples} images in {n_envs} domains, {size} px, preload={preload}, "
          f"{'tensor' if in_memory else 'PIL'} augmentation "
          f"(index{' + decode' if preload else ''} {setup_s:.1f} s); {len(train_envs)} training domains x "
          f"batch {args.batch}", file=sys.stderr)
    m = model_rate(args.step_json, args.config) if args.step_json else None
    if m and m["image_size"] != size:
        print(f"[data_loading] note: the step JSON is at {m['image_size']} px, the loader at {size} px",
              file=sys.stderr)
    tag = "" if args.kept_share is None else f"_kept{args.kept_share:g}"
    out = Path(args.out or ROOT / "bench" / "results" / f"data_loading_{name}{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "data_loading", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "dataset": name, "root": str(root), "image_size": size, "preload": preload, "batch": args.batch,
              "augmentation": "tensor" if in_memory else "PIL", "kept_share": args.kept_share,
              "train_envs": train_envs, "steps": args.steps, "warmup": args.warmup, "setup_s": setup_s,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "torch_threads": torch.get_num_threads()},
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "results": [], "model": m}
    rows = result["results"]
    for w in args.workers if args.workers is not None else default_workers():
        r = time_loader(store, index, splits, train_envs, args.batch, args.seed, size, w, args.steps, args.warmup,
                        args.kept_share)
        if m:
            r["verdict"] = verdict(r, m)
        rows.append(r)
        out.write_text(json.dumps(result, indent=1))  # after every worker count (a time limit keeps the rest)
        print(f"[data_loading] workers {w}: {r['images_per_s']:.0f} img/s", file=sys.stderr)

    kept = "" if args.kept_share is None else f", pixels made for floor(N x {args.kept_share}) of them"
    print(f"data loading -- {name}, {size} px, {len(train_envs)}x{args.batch} images per step{kept}, "
          f"{args.steps} steps after {args.warmup} warm-up; {os.cpu_count()} CPUs")
    print(f"{'workers':>8} {'img/s':>9} {'ms/step':>9} {'p10':>8} {'p90':>8} {'1st batch s':>12}  verdict")
    for r in rows:
        print(f"{r['workers']:>8} {r['images_per_s']:>9.0f} {r['ms_per_step_median']:>9.1f} "
              f"{r['ms_per_step_p10']:>8.1f} {r['ms_per_step_p90']:>8.1f} {r['first_batch_s']:>12.2f}  "
              f"{r.get('verdict', '')}")
    if m:
        print(f"model: {m['config']} step {m['ms_per_step']:.1f} ms = {m['images_per_s']:.0f} img/s "
              f"({m['scale']} scale on {m['device']}, from {m['file']})")
        best = max((r for r in rows if r["workers"] > 0), key=lambda r: r["images_per_s"], default=None)
        need = m["images_per_s"]
        if best is None:
            print("no worker count >= 1 measured: loading runs serially with the model (see the verdict)")
        else:
            print(f"best loader with workers: {best['workers']} workers, {best['images_per_s']:.0f} img/s -> the "
                  f"{'LOADER' if best['images_per_s'] < need else 'MODEL'} bounds a step "
                  f"(loader rate = {best['images_per_s'] / need:.2f}x the model's)")
    print(f"JSON: {out}")
    return result


if __name__ == "__main__":
    main()
