"""Training entry point: parse, build, train, close.

    deepspeed --num_gpus N vutrain/train.py --config vutrain/configs/tiny.yaml [section.key=value ...]
    torchrun --nproc_per_node N vutrain/train.py --config ...
    srun python vutrain/train.py --config ...
    python vutrain/train.py --config ...
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vutrain.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run file, e.g. vutrain/configs/tiny.yaml")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)  # fails here, before any process group
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from vutrain.distributed import cleanup, init_distributed, resolve_dist_env
    from vutrain.global_batch import with_global_batch
    from vutrain.trainer import PREEMPT_EXIT_CODE, Preempted, Trainer

    info = resolve_dist_env(local_rank_arg=args.local_rank)
    if info.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 logs; every rank logs warnings/errors
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    init_distributed(info)
    try:
        trainer = Trainer(with_global_batch(cfg, info.world_size), info)
        trainer.train()
    except Preempted:
        return PREEMPT_EXIT_CODE
    except ConfigError as exc:  # e.g. a resume on another world size that would change the global batch
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
