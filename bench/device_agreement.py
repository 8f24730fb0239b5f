"""Does a run on another device select the same samples as on the CPU? The first steps of one embedded-world run,
built twice from the same seed (scmd_ref.build_models: same initial weights), fed the same step batches, once
on the CPU and once on --device (CUDA: fp16 autocast + GradScaler in the training forward; the selection pass is
fp32). Prints and saves, per step, whether the kept sets are equal and their overlap |A & B| / k (as multisets);
fp16 and other kernels may flip near-ties, and the two runs drift apart as their weights do.

    python bench/device_agreement.py --device cuda --steps 20 --out agreement.json
    python bench/device_agreement.py --device cpu               # a self-check: agreement must be 1.0 everywhere
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import scmd_ref  # noqa: E402
from scmd import run as R  # noqa: E402
from scmd import settings as S  # noqa: E402


def kept_ids_per_step(s, hparams, data, device: torch.device, steps: int):
    R.seed_everything(s.seed)  # as scmd_ref.train: the same initial weights on every device
    trainer, _ = scmd_ref.build_models(s, hparams, data.index, device)
    kept, selector = [], trainer.selector

    def recording(losses, domains, ids, step):
        keep = selector(losses, domains, ids, step)
        kept.append(sorted(ids[keep.cpu()].tolist()))
        return keep

    trainer.selector = recording
    batches = data.step_batches(hparams["batch_size"], 0, device)
    for step in range(steps):
        trainer.update(*next(batches), step)
    weights = {k: v.float().cpu() for k, v in trainer.student.state_dict().items() if v.is_floating_point()}
    return kept, weights


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--world-per-class", type=int, default=40)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    argv = ["--world-per-class", str(a.world_per_class), "--data-dir", a.data_dir, "--selector", "torch",
            "--no-progress", "--device", a.device]
    s, hparams = S.resolve(S.parse(scmd_ref.Settings, argv, scmd_ref.__doc__), scmd_ref.ALGORITHMS,
                           scmd_ref.fastsel is not None)
    with tempfile.TemporaryDirectory() as tmp:
        root = R.dataset_root(s.dataset, s.data_dir, world_per_class=s.world_per_class, progress=False)
        data = R.Data(s.dataset, root, s.holdout_fraction, s.trial_seed, s.test_env, s.seed, s.image_size,
                      s.eval_splits, s.workers, False, Path(tmp), scmd_ref.fastsel)
        cpu_kept, cpu_w = kept_ids_per_step(s, hparams, data, torch.device("cpu"), a.steps)
        dev_kept, dev_w = kept_ids_per_step(s, hparams, data, R.device_for(a.device), a.steps)
    rows = []
    for step, (c, d) in enumerate(zip(cpu_kept, dev_kept)):
        overlap = sum((Counter(c) & Counter(d)).values()) / max(len(c), 1)  # ids repeat: draws with replacement
        rows.append({"step": step, "equal": c == d, "overlap": overlap})
        print(f"step {step:3d}: kept sets {'equal' if c == d else 'differ'}, overlap {overlap:.3f}")
    drift = max(float((cpu_w[k] - dev_w[k]).abs().max()) for k in cpu_w)
    first_diff = next((r["step"] for r in rows if not r["equal"]), None)
    print(f"{a.device} vs cpu over {a.steps} steps: {sum(r['equal'] for r in rows)} equal kept sets, mean overlap "
          f"{np.mean([r['overlap'] for r in rows]):.3f}, first difference at step {first_diff}; max |weight "
          f"difference| after the last step {drift:.3g}")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": a.device, "steps": rows, "first_difference": first_diff,
                                           "max_weight_difference": drift}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
