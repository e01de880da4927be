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
import signal
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vutrain.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the training entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML run file, e.g. vutrain/configs/tiny.yaml")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    # Intermixed: plain parse_args takes the positionals once, so an override after an option
    # (`a=1 --config F b=2`, or after the --local_rank the deepspeed launcher appends) was refused
    # as "unrecognized arguments" while `python -m vutrain.config` read the same line.
    args, unknown = parser.parse_known_intermixed_args(argv)
    # An unknown option (`--seed=1`) goes to the config reader first, which refuses it in the one
    # line `python -m vutrain.config` prints for the same command (that one read it as seed=1).
    args.overrides = [*unknown, *args.overrides]
    return args


def check_world_size(cfg, world_size: int) -> None:
    """What needs the world size, checked before any process group: train.global_batch_size's
    multiple, and train.ds_config's batch keys and ZeRO stage (found when the engine was built,
    after the process group, the run directory and the preset tokenizer's training)."""
    from vutrain.ds_config import build_ds_config
    from vutrain.global_batch import with_global_batch

    build_ds_config(with_global_batch(cfg, world_size).train, world_size)


def check_shard_lists(cfg, log_warnings: bool) -> None:
    """Every shard a brace range names must exist (before any process group: fails in a second).

    With data.allow_missing_shards the spec is replaced by the list of shards that exist, so the
    data pipeline and the saved config.yaml name exactly what is read.
    """
    from vutrain.data.shards import check_openable, check_shards

    d = cfg.data
    found_of = {}
    for key in ("train_shards", "val_shards"):
        spec = getattr(d, key)
        if key == "val_shards" and not spec:
            continue
        found, missing = check_shards(spec, f"data.{key}", d.allow_missing_shards)
        check_openable(found, f"data.{key}")  # a URL scheme gopen has no handler for (s3://)
        found_of[key] = found
        if missing:
            if log_warnings:
                logging.getLogger("vutrain").warning(
                    "data.%s: %d of %d shards do not exist (accepted: data.allow_missing_shards=true); "
                    "first missing: %s",
                    key,
                    len(missing),
                    len(found) + len(missing),
                    missing[0],
                )
            setattr(d, key, "::".join(found))
    if log_warnings and "val_shards" in found_of:
        warn_of_val_shards_in_training(found_of["train_shards"], found_of["val_shards"])


def _shard_identity(url: str) -> str:
    """The real path of a local shard (a symlink, `./` or another relative spelling of it name the
    same file), the URL or `pipe:` command as written otherwise."""
    from vutrain.data.shards import is_remote

    return url if is_remote(url) else os.path.realpath(url)


def warn_of_val_shards_in_training(train: list[str], val: list[str]) -> None:
    """One warning when validation shards are also training shards (eval would measure training
    data, silently). Not an error: a smoke test may evaluate on what it trains on, on purpose."""
    in_training = {_shard_identity(url) for url in train}
    val_once: dict[str, str] = {}  # identity -> the val spec's first name of it (a repeat is one shard)
    for url in val:
        val_once.setdefault(_shard_identity(url), url)
    shared = [url for identity, url in val_once.items() if identity in in_training]
    if shared:
        logging.getLogger("vutrain").warning(
            "data.val_shards: %d of %d val shards are also training shards (first: %s): eval "
            "metrics will be measured on training data; hold out shards data.train_shards does not "
            "name (split the data, e.g. python -m dataset_tools split)",
            len(shared),
            len(val_once),
            shared[0],
        )


QUIET_EXIT_DELAY_S = 10.0
"""How long a rank that leaves a start-up error to rank 0 waits before it exits. Launchers end
every rank once one exits non-zero (deepspeed's at once): a quiet rank that got there first took
rank 0 down before it printed the error, and the job ended with no message at all (seen in CI on a
loaded machine: rank 0 was 0.7 s behind)."""


def _quiet_exit(code: int = 2) -> int:
    time.sleep(QUIET_EXIT_DELAY_S)
    return code


def _stop_before_rendezvous(info, line: str, speaks: bool) -> int:
    """A rank that fails before the process group exists: say `line` if this rank speaks, and tell
    the ranks already at the rendezvous (they waited 30 minutes there, then said only that some
    ranks never arrived: a config file or shards missing on one node)."""
    from vutrain.distributed import tell_peers_of_early_failure

    if speaks:
        print(line, file=sys.stderr, flush=True)
    rank_0_said_it = tell_peers_of_early_failure(info, line.removeprefix("error: "))
    if speaks or rank_0_said_it:
        return 2
    return _quiet_exit()


def _config_error_line(exc: ConfigError) -> str:
    """A refused output_dir is no mistake in the config (the same config runs once the other run
    ends), so it is not called one."""
    from vutrain.run_lock import RunDirInUseError

    return f"error: {exc}" if isinstance(exc, RunDirInUseError) else f"config error: {exc}"


INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # the shell's code for a Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """Entry point of training: resolve the ranks, load the config, train; returns the exit code."""
    args = parse_args(argv)
    progress: dict = {}  # what _train reached, for the Ctrl-C line: info, cfg, trainer
    try:
        return _train(args, progress)
    except KeyboardInterrupt:  # a Ctrl-C was a page of [rank0]: traceback from every rank
        return _interrupted(progress)


def _interrupted(progress: dict) -> int:
    """One line for a Ctrl-C, saying what a rerun does: unlike SIGTERM, a Ctrl-C writes no
    checkpoint on the way out. Rank 0 says it in full (a terminal's Ctrl-C reaches every rank of
    the node at once); every other rank says in one short tagged line that it was stopped: a SIGINT
    to one rank alone (`kill -INT`, a scheduler's signal to one task) ended it without a word, and
    the others' "Connection closed by peer ... check the logs of the remote worker" pointed at a
    log that was empty."""
    info = progress.get("info")
    rank = info.rank if info is not None else _launcher_rank()
    trainer, cfg = progress.get("trainer"), progress.get("cfg")
    where = "before training started" if trainer is None else f"at step {trainer.step}, with no checkpoint"
    if rank != 0:
        print(f"error: rank {rank}: stopped by Ctrl-C (SIGINT) {where}", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    if trainer is not None and _wrote_done_marker(trainer):
        print(_interrupted_after_finish(trainer), file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    print(
        f"error: stopped by Ctrl-C (SIGINT) {where}: {_what_a_rerun_does(cfg)}; to stop with a "
        "checkpoint, send SIGTERM instead (kill PID: it checkpoints at the next step and exits 75)",
        file=sys.stderr,
        flush=True,
    )
    return INTERRUPTED_EXIT_CODE


def _wrote_done_marker(trainer) -> bool:
    """Whether this run wrote its done.json (its start removed the previous run's): after it, rank
    0 only draws curves.png, which takes tens of seconds for a long run's metrics.jsonl."""
    return os.path.isfile(os.path.join(trainer.run_dir, "done.json"))


def _interrupted_after_finish(trainer) -> str:
    """The Ctrl-C line for a run that had finished: it said "with no checkpoint" and that a rerun
    resumes, of a run whose final checkpoint and done.json were written, and gave no way to get the
    curves.png it left missing or cut short."""
    return (
        f"error: stopped by Ctrl-C (SIGINT) while drawing curves.png, after the run finished at step "
        f"{trainer.step} (its final checkpoint and done.json are written): curves.png may be missing "
        f"or cut short; draw it with python -m vutrain.plots {trainer.run_dir}"
    )


def _launcher_rank() -> int:
    """The rank the launcher exported, for a Ctrl-C before the ranks were resolved."""
    from vutrain.logging_setup import process_rank

    return process_rank()


def _what_a_rerun_does(cfg) -> str:
    """After a Ctrl-C: where the same command starts again (None: the config was not read yet)."""
    if cfg is None:
        return "run the same command again"
    if cfg.train.resume == "never":
        return "the same command starts over (train.resume=never; auto resumes from the newest checkpoint)"
    if cfg.train.resume == "auto":
        return f"the same command resumes from the newest checkpoint in {cfg.output_dir}/checkpoints, if any"
    return f"the same command resumes from {cfg.train.resume} again (train.resume)"


def _train(args: argparse.Namespace, progress: dict) -> int:
    """Resolve the ranks, load the config, train; returns the exit code. Records in ``progress``
    what it has reached (main's Ctrl-C line reads it)."""
    from vutrain.logging_setup import setup_logging

    setup_logging()  # rank 0 logs; other ranks keep errors and vutrain's own warnings
    from vutrain.data.shards import ShardListError
    from vutrain.distributed import SharedGPUError, cleanup, init_distributed, resolve_dist_env

    try:
        info = resolve_dist_env(local_rank_arg=args.local_rank)
    except RuntimeError as exc:  # e.g. a rank outside the world size: every rank says the same
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress["info"] = info
    # Errors found before the process group exists: every rank finds the same one, rank 0 says it
    # (and the first rank of every other node, which may see another filesystem); the rest exit
    # quietly.
    speaks = info.rank == 0 or (info.local_rank == 0 and info.local_world_size < info.world_size)
    try:
        cfg = load_config(args.config, args.overrides)  # fails here, before any process group
        check_world_size(cfg, info.world_size)
        check_shard_lists(cfg, log_warnings=info.rank == 0)
        from vutrain.model import check_model_config

        # A LoRA target typo or an unreachable hub model, found from config files alone: after the
        # process group it cost a cluster start-up (and on other ranks a wait for the first one).
        check_model_config(cfg.model)
        progress["cfg"] = cfg
    except ConfigError as exc:
        return _stop_before_rendezvous(info, f"config error: {exc}", speaks)
    except ShardListError as exc:
        return _stop_before_rendezvous(info, f"error: {exc}", speaks)
    from vutrain import startup_errors
    from vutrain.checkpoint import CheckpointWriteError
    from vutrain.evaluate import ValShardsError
    from vutrain.global_batch import with_global_batch
    from vutrain.trainer import PREEMPT_EXIT_CODE, NonFiniteLossError, Preempted, Trainer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        init_distributed(info)
    except SharedGPUError as exc:  # every rank found the same: rank 0 says it
        cleanup()
        if info.rank != 0:
            return _quiet_exit()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # no group, so no agreement: each rank says its own, in one line
        cleanup()
        prefix = "" if info.world_size == 1 else f"rank {info.rank}: "
        print(f"error: {prefix}{startup_errors.rendezvous_message(info, exc)}", file=sys.stderr)
        return startup_errors.EXIT_CODE
    trainer, start_step = None, None

    def starting() -> bool:
        return trainer is None or trainer.step == start_step

    if info.rank == 0:
        startup_errors.watch(info.world_size, starting)
    try:
        built = Trainer(with_global_batch(cfg, info.world_size), info)
        start_step = built.step
        trainer = built  # only now: the watcher reads (trainer, start_step) from another thread
        progress["trainer"] = trainer
        trainer.train()
    except Preempted:
        return PREEMPT_EXIT_CODE
    except ConfigError as exc:  # e.g. a resume on another world size that changes the global batch:
        if trainer is not None:  # every rank finds it before any collective, so rank 0 alone says it
            raise
        if not speaks:
            return _quiet_exit()
        print(_config_error_line(exc), file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:  # every rank reads the same agreed streak: rank 0 says it
        if info.rank != 0:  # (a traceback from every rank before)
            return _quiet_exit(1)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValShardsError as exc:  # e.g. a node's copy of the val set lost a shard: every rank
        if not speaks:  # raises the same line at the eval's check; rank 0 (and each node's first) says it
            return _quiet_exit()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckpointWriteError as exc:  # each rank whose write failed says so, in one line
        prefix = "" if info.world_size == 1 else f"rank {info.rank}: "
        print(f"error: {prefix}{exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if trainer is not None and trainer.step > start_step:
            raise
        return startup_errors.report(exc, info.rank, info.world_size, cfg.output_dir)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
