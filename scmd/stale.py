"""--selection-losses stale: a variant of SCMD's selection that is not the paper's (docs/algorithm.md §9).

The paper ranks the N rows of a step by a no-grad forward pass of the current student (scmd_ref.SCMDTrainer.update).
This variant ranks them, without that pass, by each candidate's latest training CE that fastsel's tracker recorded
in a step where the sample was kept: never-scored samples rank first (their loss is NaN, and NaN ranks first), so
each sample gets a loss as early as possible; ties come in a random order drawn from (seed, step), which keeps
resume exact. The kept rows' CE from this step's training forward (before the update) is then recorded. Only the
kept rows of an in-memory batch are augmented (the batch comes as scmd.data.LazyImages).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class StaleSelector:
    """Ranks candidates by their last recorded CE with `selector`'s rule (scmd_ref.Selector: same top-k, same
    per-domain option); `tracker` (fastsel.Tracker) holds the recorded losses."""

    def __init__(self, selector, tracker, seed: int):
        self.selector, self.tracker, self.seed = selector, tracker, seed
        self.fastsel = selector.fastsel

    def stale_keep(self, domains: torch.Tensor, ids: torch.Tensor, step: int) -> torch.Tensor:
        """Positions of the kept rows, ranked by the candidates' last recorded CE (NaN where never scored)."""
        perm = np.random.default_rng((self.seed, step)).permutation(len(ids))  # random order among ties
        host = self.tracker.last_loss()[ids.numpy()[perm]]
        return torch.from_numpy(perm)[self.selector.rank(torch.from_numpy(host), domains[perm], host)]

    def observe(self, step: int, domains, ids, keep, kept_ce: torch.Tensor) -> None:
        """Every candidate counts as seen, the kept ones as selected with their training CE."""
        self.tracker.record_kept(step, ids.numpy(), domains.numpy(), keep.cpu().numpy(),
                                 kept_ce.detach().float().cpu().numpy())


class StaleStep:
    """Mixin over scmd_ref.SCMDTrainer: a selecting step ranks by the recorded losses (no selection pass), trains
    on the kept rows as the paper's step does, and records their CE; other steps are the paper's."""

    def update(self, x, y, domains, ids, step) -> dict:
        if not self.selecting(step):
            return super().update(x, y, domains, ids, step)
        n_seen = len(y)
        keep = self.selector.stale_keep(domains, ids, step).to(y.device)
        x, y = x[keep], y[keep]  # LazyImages: only the kept rows are augmented
        loss, loss_ce, loss_logits, loss_cm, z_s = self.losses(x, y)
        ce = F.cross_entropy(z_s.detach().float(), y, reduction="none")  # what later steps rank these rows by
        self.selector.observe(step, domains, ids, keep, ce)
        self.optimise(loss)
        return self.stats((loss, loss_ce, loss_logits, loss_cm), len(y), n_seen)


def variant(trainer_class: type) -> type:
    """trainer_class with the stale selecting step (its selector must be a StaleSelector)."""
    return type(f"Stale{trainer_class.__name__}", (StaleStep, trainer_class), {})
