"""Count the compute ops one training step dispatches in forward, backward and the optimizer step.

    python tools/count_step_ops.py --preset vit-b-32 --zero-stage 2 [--precision bf16] [--set k=v]

On a GPU nearly every compute op launches at least one kernel, so the count of the optimizer step
is the CPU's view of the issue-9 figure "about 7000 kernel launches a step". Runs the real Trainer
(one rank) on synthetic shards; counts the third step's aten ops under a dispatch mode, leaving out
those that only make views or allocate, and prints the ten most frequent call sites per phase and
a JSON line. Phases: forward with the loss, under GradCache its replayed forward, backward,
optimizer step, and other (between them); "step" is their sum. The count depends on the model's
parameter count, not on the batch size.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import traceback

from torch.utils._python_dispatch import TorchDispatchMode

NO_WORK = {
    "view", "as_strided", "detach", "_has_compatible_shallow_copy_type", "narrow", "slice", "t",
    "transpose", "expand", "_reshape_alias", "reshape", "alias", "unsqueeze", "squeeze", "select",
    "empty", "empty_strided", "empty_like", "result_type", "lift_fresh", "set_", "_unsafe_view",
    "split", "split_with_sizes", "unbind", "view_as", "permute", "is_same_size",
}  # fmt: skip
SKIP_FRAMES = ("_python_dispatch", "torch/utils", "torch/_compile", "_dynamo", "nn/modules/module.py")


REPLAYED = "replayed forward (GradCache)"
"""train.accumulation=gradcache: phase 3, each micro-batch's forward again with autograd."""
OTHER = "other"
"""Ops of the step outside the labelled calls: the data in this process, the guard's agreement."""


class OpCounter(TorchDispatchMode):
    """Counts dispatched compute ops by phase and (op, the innermost library call sites).

    One mode over the whole step, the phase the innermost labelled call (`labelled`): separate
    modes per call count an op of a call nested in another (engine.backward inside GradCache's
    replay) in both, and an op between calls in none, so the phases did not add up to the step.
    """

    def __init__(self):
        super().__init__()
        self.phases: dict[str, collections.Counter] = {}
        self._stack: list[str] = []

    def labelled(self, phase: str, fn):
        """`fn` with its ops (those of calls inside it in their own phase excepted) in `phase`."""

        def run(*a, **k):
            self._stack.append(phase)
            try:
                return fn(*a, **k)
            finally:
                self._stack.pop()

        return run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func._schema.name.split("::")[-1]
        if op not in NO_WORK:
            frames = [
                f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"
                for f in traceback.extract_stack()[:-1]
                if ("site-packages" in f.filename or "vutrain" in f.filename)
                and not any(s in f.filename for s in SKIP_FRAMES)
            ]
            phase = self._stack[-1] if self._stack else OTHER
            sites = self.phases.setdefault(phase, collections.Counter())
            sites[(op, " < ".join(reversed(frames[-2:])))] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def labelled_gradcache(counter: OpCounter):
    """GradCache's phases 1-2 (no-grad forwards, the step's loss) as the forward with the loss,
    its phase 3 (each micro-batch's forward replayed with autograd) as a phase of its own; its
    engine.backward and engine.step calls stay in theirs. Restored after: callers (the tests)
    run this tool several times in one process."""
    from vutrain.gradcache import GradCache

    forward, backward = GradCache.forward, GradCache.backward
    GradCache.forward = counter.labelled("forward with the loss", forward)
    GradCache.backward = counter.labelled(REPLAYED, backward)
    try:
        yield
    finally:
        GradCache.forward, GradCache.backward = forward, backward


def main(argv: list[str] | None = None) -> int:
    """Run the tool; its synthetic shards and run folder are removed when it ends (scratch_dirs)."""
    from scratch_dirs import run_with_scratch

    return run_with_scratch(_main, argv)


def _main(argv: list[str] | None, make_scratch) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from vutrain.config import PRECISIONS, PRESETS

    # Choices here: a wrong value is refused at once, not after seconds of imports in a traceback.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=PRESETS)
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS)
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override, e.g. model.lock_text=true",
    )
    args = parser.parse_args(argv)

    from vutrain.config import ConfigError, load_config
    from vutrain.data.synthetic import write_synthetic
    from vutrain.distributed import cleanup, init_distributed, resolve_dist_env
    from vutrain.model import PRESETS
    from vutrain.trainer import Trainer

    work = make_scratch("vutrain-ops-")
    size = PRESETS[args.preset].image_size
    data = write_synthetic(
        os.path.join(work, "data"), num_samples=64, shard_size=64, image_size=size, val_samples=0
    )
    overrides = [
        f"output_dir={work}/run",
        f"data.train_shards={data['train_shards']}",
        "data.val_shards=",
        "eval.every=0",
        f"model.preset={args.preset}",
        f"train.precision={args.precision}",
        f"train.zero_stage={args.zero_stage}",
        f"train.micro_batch_size={args.batch_size}",
        "train.max_steps=3",
        "train.checkpoint_every=0",
        "train.progress_bar=false",
        "train.resume=never",
        "data.num_workers=0",
        "data.resampled=true",
        "data.num_samples=1000",
        *args.set,
    ]
    try:  # a bad --set or --batch-size: one line saying which key, as train.py says it
        cfg = load_config(None, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    info = resolve_dist_env()
    init_distributed(info)
    trainer = Trainer(cfg, info)
    trainer.engine.train()
    engine, counter = trainer.engine, OpCounter()
    trainer.forward_loss = counter.labelled("forward with the loss", trainer.forward_loss)
    engine.backward = counter.labelled("backward", engine.backward)
    engine.step = counter.labelled("optimizer step", engine.step)
    try:
        for _ in range(2):
            trainer.train_step()
        with labelled_gradcache(counter), counter:  # warmed up: the optimizer's state exists
            trainer.train_step()
    finally:
        trainer.release_run_dir()  # train() is never called: nothing else releases it
        cleanup()
    params = [p for p in engine.module.parameters() if p.requires_grad]
    result = dict(vars(args), trainable_tensors=len(params))
    for phase, sites in counter.phases.items():
        result[phase] = sum(sites.values())
        # the non-finite guard's per-parameter gradient masks (vutrain/nonfinite.py)
        guard = [n for (_, site), n in sites.items() if "nonfinite.py" in site]
        result[f"{phase}: guard masks"] = sum(guard)
        print(f"\n{phase}: {result[phase]} compute ops ({len(params)} trainable tensors)")
        for (op, site), n in sites.most_common(10):
            print(f"  {n:6d}  {op:24s} {site}")
    result["step"] = sum(sum(sites.values()) for sites in counter.phases.values())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
