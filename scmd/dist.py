"""One run on several processes (torchrun): every rank draws the same global step batch and holds its share of each
domain's rows; the selection ranks the whole batch as one process would; the gradients are summed over the ranks.

    torchrun --standalone --nproc_per_node 2 scmd_ref.py --dataset pacs --test-env 0     # 2 GPUs (nccl), or CPU (gloo)

Without torchrun (no WORLD_SIZE in the environment) everything here is the identity and scmd_ref.py is one process.

The equivalence with one process (tests/test_distributed.py): the step batch of rank r is rows [r b / W, (r+1) b / W)
of each domain's b rows, the per-sample losses (and ids, domains) are all-gathered into the single-process row order,
the kept set is chosen from them on every rank (the same ids), and each rank's loss is scaled by n_r / n (its kept
rows over all kept rows) before the gradients are summed, so that the summed gradient is the single-process
gradient of the mean over the kept samples. The gradients are summed with one all-reduce per step (what
DistributedDataParallel does, without overlapping it with the backward): DDP's module wrapper cannot serve here,
because the trained parameters span the student, the projector P and theta, and because a rank may hold no kept row
in a step, where DDP's reducer would wait for a backward that never comes. Dropout (resnet_dropout > 0) draws its
masks per rank, so with dropout a run on W ranks is an equally valid but different random realisation.
"""

from __future__ import annotations

import os
from typing import List, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0
        self.on = self.world > 1

    def start(self, device: torch.device) -> torch.device:
        """Joins the process group (nccl on CUDA, one GPU per local rank; gloo on CPU); returns this rank's device."""
        if not self.on:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.device = device
        return device

    # --- the step batch ----------------------------------------------------------------------------------
    def share(self, n: int) -> slice:
        """This rank's rows of a domain's n rows."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def positions(self, sizes: Sequence[int], rank: int) -> torch.Tensor:
        """Positions in the single-process batch (domains concatenated in order) of `rank`'s local rows."""
        out, base = [], 0
        for n in sizes:
            out.append(torch.arange(base + rank * n // self.world, base + (rank + 1) * n // self.world))
            base += n
        return torch.cat(out)

    def gather_rows(self, local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """The rows of every rank, in the single-process order, with local's dtype and device (sent as float64,
        so that ids stay exact below 2**53)."""
        if not self.on:
            return local
        dev = local.device if local.device.type == "cuda" else torch.device("cpu")
        n_max = max(len(self.positions(sizes, r)) for r in range(self.world))
        buf = torch.zeros((n_max,) + local.shape[1:], dtype=torch.float64, device=dev)
        buf[:len(local)] = local.to(dev, torch.float64)
        parts: List[torch.Tensor] = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        out = torch.empty((sum(sizes),) + local.shape[1:], dtype=torch.float64, device=dev)
        for r, part in enumerate(parts):
            pos = self.positions(sizes, r).to(dev)
            out[pos] = part[:len(pos)]
        return out.to(local.device, local.dtype)

    def local_keep(self, keep: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Of the kept single-process positions, this rank's, as local row indices (in the ranking order)."""
        if not self.on:
            return keep
        where = torch.full((sum(sizes),), -1, dtype=torch.int64)
        mine = self.positions(sizes, self.rank)
        where[mine] = torch.arange(len(mine))
        local = where[keep.cpu()]
        return local[local >= 0].to(keep.device)

    def kept_in_order(self, values: torch.Tensor, keep: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Per kept position (in `keep`'s order) the value that its rank computed for it: one all-reduce."""
        if not self.on:
            return values
        mine = torch.zeros(sum(sizes), dtype=torch.bool)
        mine[self.positions(sizes, self.rank)] = True
        out = torch.zeros(len(keep), dtype=torch.float64, device=values.device)
        out[mine[keep.cpu()].to(values.device)] = values.detach().to(torch.float64)
        return self.sum(out)

    # --- reductions ------------------------------------------------------------------------------------------
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sums every parameter's gradient over the ranks, as one flat buffer (a missing gradient counts as 0)."""
        if not self.on:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        i = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[i:i + n].view_as(g).to(g.dtype)
            i += n

    def fraction(self, correct: int, total: int) -> float:
        """correct / total over every rank's share (an evaluation split is sharded over the ranks)."""
        if self.on:
            dev = self.device if self.device.type == "cuda" else torch.device("cpu")
            correct, total = self.sum(torch.tensor([correct, total], dtype=torch.float64, device=dev)).tolist()
        return correct / max(total, 1)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one (a stop signal must stop all ranks after the same step)."""
        if not self.on:
            return flag
        t = torch.tensor([float(flag)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def variant(self, trainer_class: type, sizes: Sequence[int]) -> type:
        """trainer_class with DistributedStep's update; sizes: each training domain's rows in the step batch."""
        return type(f"Distributed{trainer_class.__name__}", (DistributedStep, trainer_class), {"sizes": list(sizes)})


DIST = Dist()


class DistributedStep:
    """Mixin over scmd_ref.SCMDTrainer (or its stale variant): the paper's step on this rank's rows of the step
    batch. Every rank ranks the whole step batch (the losses, ids and domains are all-gathered), so the kept ids
    are one process's; the loss is weighted by n_r / n before the gradients are summed over the ranks."""

    sizes: List[int] = []

    def update(self, x, y, domains, ids, step) -> dict:
        g, n_seen = self.sizes, len(y)
        selecting, stale = self.selecting(step), hasattr(self.selector, "stale_keep")
        if selecting:
            domains, ids = DIST.gather_rows(domains, g), DIST.gather_rows(ids, g)
            if stale:  # (scmd/stale.py: ranked by the recorded losses, no selection pass)
                keep = self.selector.stale_keep(domains, ids, step).to(y.device)
            else:
                keep = self.selector(DIST.gather_rows(self.per_sample_ce(x, y), g), domains, ids, step)
            mine = DIST.local_keep(keep, g)
            x, y = x[mine], y[mine]
        self.share = len(y) / (len(keep) if selecting else sum(g))  # n_r / n: this rank's weight
        zero = y.new_zeros((), dtype=torch.float32)
        loss, loss_ce, loss_logits, loss_cm, z_s = self.losses(x, y) if len(y) else [zero] * 5
        if selecting and stale:
            ce = F.cross_entropy(z_s.detach().float(), y, reduction="none") if len(y) else z_s.new_zeros(0)
            self.selector.observe(step, domains, ids, keep, DIST.kept_in_order(ce, keep, g))
        self.optimise(loss * self.share)
        return self.stats((loss, loss_ce, loss_logits, loss_cm), len(y), n_seen)

    def backward(self, loss) -> None:
        scaled = self.scaler.scale(loss)
        if scaled.requires_grad:  # (a rank without kept rows has no graph: its gradient is 0)
            scaled.backward()
        DIST.sum_gradients([p for grp in self.optimizer.param_groups for p in grp["params"]])

    def stats(self, losses, n: int, n_seen: int) -> dict:
        """The step's loss terms weighted by this rank's share and summed over the ranks (the single-process means),
        and the counts of trained and seen rows of all ranks."""
        dev = losses[0].device
        v = torch.stack([t.detach().float() * self.share for t in losses]
                        + [torch.tensor(float(n), device=dev), torch.tensor(float(n_seen), device=dev)])
        return dict(zip(("loss", "ce", "logits", "cm", "n", "N"), DIST.sum(v)))
