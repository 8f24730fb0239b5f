"""Test driver: scmd_ref.py's main, with the kept sample ids of every selecting step written to
$SCMD_KEPT_LOG.<rank>.json (one process, or each rank of a torchrun run)."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import scmd_ref as S  # noqa: E402
from scmd.stale import StaleSelector  # noqa: E402

KEPT = {}


def logged(rank_keep):
    def inner(self, *args):  # __call__(losses, domains, ids, step) and stale_keep(domains, ids, step)
        keep = rank_keep(self, *args)
        ids, step = args[-2], args[-1]
        KEPT[int(step)] = ids[keep.cpu()].tolist()
        return keep

    return inner


S.Selector.__call__ = logged(S.Selector.__call__)
StaleSelector.stale_keep = logged(StaleSelector.stale_keep)
code = S.R.cli(S.main, sys.argv[1:])
Path(f"{os.environ['SCMD_KEPT_LOG']}.{os.environ.get('RANK', '0')}.json").write_text(json.dumps(KEPT))
sys.exit(code)
