"""python -m scmd.world build | check [--erm] | generate DATA (see scmd/world/__init__.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from scmd.world.dataset import ensure_dataset
from scmd.world.spec import ASSETS_DIR

# ---------------------------------------------------------------------------------------------------------
# CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    import scmd.world

    p = argparse.ArgumentParser(prog="python -m scmd.world", description=scmd.world.__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="retrain the teacher and the student checkpoints in assets/")
    b.add_argument("--only", choices=["teacher", "student"], help="rebuild just one of them")
    b.add_argument("--data-dir", default="data", help="where the dataset for the final check is generated")
    b.add_argument("--out-dir", default=str(ASSETS_DIR), help="where the checkpoints and their logs go")
    c = sub.add_parser("check", help="the world's design criteria: teacher zero-shot accuracy per env, the "
                                     "student's classes, the shortcuts, ERM's source accuracy")
    c.add_argument("--data-dir", default="data")
    c.add_argument("--erm", action="store_true", help="run the four ERM runs the last criterion needs "
                                                     "(finished ones are reused)")
    g = sub.add_parser("generate", help="generate the dataset if not there yet")
    g.add_argument("data_dir", nargs="?", default="data")
    args = p.parse_args(argv)
    if args.cmd == "generate":
        print(ensure_dataset(args.data_dir))
        return 0
    from scmd.world import pretrain as world_pretrain

    if args.cmd == "build":
        world_pretrain.build(only=args.only, data_dir=args.data_dir, out_dir=Path(args.out_dir))
    else:
        return 0 if world_pretrain.check_premises(args.data_dir, run_erm=args.erm) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
