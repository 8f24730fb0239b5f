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

    def stop(self) -> None:
        if self.on and dist.is_initialized():
            dist.destroy_process_group()

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

    def share_of(self, n_local: int, n_total: int) -> float:
        """This rank's share n_r / n of the step's trained rows: its loss weight before the gradients are summed."""
        return n_local / n_total if self.on else 1.0

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

    def step_stats(self, share: float, losses, n: int, n_seen: int) -> dict:
        """The step's loss terms (weighted by the share, summed over the ranks: the single-process means) and its
        counts of trained and seen rows."""
        if not self.on:  # one process: the values as they are, the counts on the CPU (no transfer per step)
            return {"loss": losses[0].detach(), "ce": losses[1].detach(), "logits": losses[2].detach(),
                    "cm": losses[3].detach(), "n": torch.tensor(float(n)), "N": torch.tensor(float(n_seen))}
        dev = losses[0].device
        v = torch.stack([t.detach().float() * share for t in losses]
                        + [torch.tensor(float(n), device=dev), torch.tensor(float(n_seen), device=dev)])
        return dict(zip(("loss", "ce", "logits", "cm", "n", "N"), self.sum(v)))

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one (a stop signal must stop all ranks after the same step)."""
        if not self.on:
            return flag
        t = torch.tensor([float(flag)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return bool(t.item() > 0)


DIST = Dist()
