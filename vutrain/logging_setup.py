"""Quiet output by default: one line per cause, not one per process.

Every rank of a job runs the same code, so each library notice (DeepSpeed's "Setting accelerator to
CPU", transformers' torchvision fallback, torch's FutureWarnings about deprecated collectives)
would otherwise print once per rank: 16 copies on two 8-GPU nodes. Rank 0 keeps them (each Python
warning once per code location, Python's default); every other rank keeps only errors from
libraries, and warnings and errors from vutrain itself (a rank's own trouble, such as a skipped
non-finite step, must still be seen), each line tagged `[rank N]` so it can be traced to its rank
(Python warnings too, which print through `warnings.showwarning`, not a log handler, and the
report of an exception that ends a thread, which prints through `threading.excepthook`).

The training entry point calls it first thing, before DeepSpeed or transformers are imported:

    from vutrain.logging_setup import setup_logging
    setup_logging()          # rank from RANK / SLURM_PROCID / OMPI_COMM_WORLD_RANK, else 0
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
import warnings
from collections.abc import Mapping

from vutrain.launcher_ranks import in_srun_step, mpirun_inside_srun_step

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Ranks other than 0 name themselves: under the deepspeed launcher or mpirun (no `srun --label`) a
# warning from one of 16 ranks could not be traced to its rank. Rank 0's lines stay as FORMAT, so a
# line without a rank is rank 0's; the tag goes before the level so "WARNING vutrain.x: ..." still
# matches every rank's line.
RANK_FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
# Loggers of libraries that every rank would repeat. "DeepSpeed" is DeepSpeed's own logger (it has
# its own handler and does not propagate, so a level on a parent would not reach it).
LIBRARY_LOGGERS = (
    "DeepSpeed",
    "deepspeed",
    "transformers",
    "torch",
    "peft",
    "webdataset",
    "PIL",
    "matplotlib",
    "urllib3",
    "filelock",
    "fsspec",
)
# Library loggers that print through a handler and format of their own (they do not propagate to
# the root handler, so RANK_FORMAT does not reach them): on other ranks their messages get the tag.
OWN_HANDLER_LOGGERS = ("DeepSpeed",)
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def process_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank as the launcher exported it (0 for a plain `python` run): the
    rank `vutrain.distributed.resolve_dist_env` resolves (not imported here: it imports torch)."""
    env = os.environ if env is None else env
    for name in RANK_VARIABLES:
        value = env.get(name, "")
        # SLURM_PROCID is a rank only in an srun task: the sbatch script and salloc's shell export
        # SLURM_PROCID=0, which every rank of an mpirun started from them inherits. Nor is it one
        # in a rank of an mpirun inside a SLURM job: there it is the node of the srun step that
        # started mpirun's daemons, and every rank of node 0 took itself for rank 0.
        if name == "SLURM_PROCID" and (not in_srun_step(env) or mpirun_inside_srun_step(env)):
            continue
        if value.isdigit():
            return int(value)
    return 0


class _BelowLevel(logging.Filter):
    """Drops records under `level`; set on a logger object, it survives the library resetting the
    logger's level when it is imported (DeepSpeed's create_logger does)."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


class _RankTag(logging.Filter):
    """Puts `[rank N] ` before the message of a logger with its own handler (DeepSpeed's, created
    when deepspeed is imported, after setup_logging: its format cannot be set here). In the message,
    as DeepSpeed's own log_dist puts its "[Rank N]": a rank 1 error reads
    "[...] [ERROR] [engine.py:12:step] [rank 1] ..." where it read like rank 0's."""

    def __init__(self, rank: int):
        super().__init__()
        self.tag = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # bad arguments: the handler reports them, as untagged
            return True
        if not message.lower().startswith(self.tag):  # log_dist's "[Rank N]" names the rank already
            record.msg, record.args = self.tag + message, None
        return True


def _tag_warnings(rank: int) -> None:
    """Python warnings print through warnings.formatwarning, not a log handler: on ranks other than
    0, each of their lines (the source line under it included) starts with `[rank N] `, as the log
    lines do; rank 0's are the plain ones. Before, a vutrain warning (a library's deprecation notice
    about a call vutrain makes) printed once per rank with nothing saying which rank wrote which.
    Only the text changes: warnings are still shown (and recorded by catch_warnings) as before.

    The hook wrapped is `warnings._formatwarnmsg`, the step of the printing path that receives the
    whole warning, not the public `formatwarning`: replacing that one lost tracemalloc's "Object
    allocated at" note (`-X tracemalloc`; Python passes the allocated object only to the private
    step), and under `logging.captureWarnings(True)` the text it tagged went into a log line whose
    format tags it again ("[rank 1] WARNING py.warnings: [rank 1] ...")."""
    hook_name = "_formatwarnmsg" if hasattr(warnings, "_formatwarnmsg") else "formatwarning"
    current = getattr(warnings, hook_name)
    plain = getattr(current, "untagged", current)  # ours, from an earlier call
    if rank == 0:
        setattr(warnings, hook_name, plain)
        return
    tag = f"[rank {rank}] "

    def tagged(*args, **kwargs):
        text = plain(*args, **kwargs)
        return "".join(tag + part for part in text.splitlines(keepends=True))

    tagged.untagged = plain
    setattr(warnings, hook_name, tagged)


def _tag_thread_exceptions(rank: int) -> None:
    """On ranks other than 0, each line of an uncaught exception's report from a thread (a watcher,
    a library's worker thread) starts with `[rank N] `; rank 0's is Python's own. torch tags the
    main thread's tracebacks once the process group exists (its `sys.excepthook`), but
    `threading.excepthook` printed "Exception in thread ...:" and its traceback from every rank
    alike, with nothing saying which rank's thread died. A hook the user installed is kept as is."""
    plain = getattr(threading.excepthook, "untagged", threading.excepthook)  # ours, from an earlier call
    if rank == 0 or plain is not threading.__excepthook__:
        threading.excepthook = plain
        return
    tag = f"[rank {rank}] "

    def tagged(args) -> None:
        # Python's own report, as threading.__excepthook__ writes it (SystemExit ends a thread quietly).
        if args.exc_type is SystemExit or sys.stderr is None:
            plain(args)
            return
        name = args.thread.name if args.thread is not None else threading.get_ident()
        lines = [f"Exception in thread {name}:\n"]
        lines += traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)
        text = "".join(lines)
        sys.stderr.write("".join(tag + part for part in text.splitlines(keepends=True)))
        sys.stderr.flush()

    tagged.untagged = plain
    threading.excepthook = tagged


def log_format(rank: int) -> str:
    """The format of this rank's log lines: FORMAT on rank 0, with `[rank N]` on the others."""
    return FORMAT if rank == 0 else RANK_FORMAT.format(rank=rank)


def setup_logging(rank: int | None = None, level: int = logging.INFO) -> int:
    """Configure logging and warnings for this process; returns the rank it assumed.

    Rank 0: `level` for vutrain and the root handler, WARNING for libraries. Other ranks: WARNING
    for vutrain, ERROR for libraries, Python warnings from outside vutrain ignored (rank 0
    prints the same ones), and `[rank N]` in each line (in the message of DeepSpeed's, which has
    its own format; at the start of each line of a Python warning and of a thread's exception
    report).
    """
    rank = process_rank() if rank is None else rank
    main = rank == 0
    logging.basicConfig(level=level if main else logging.WARNING, format=log_format(rank))
    logging.getLogger("vutrain").setLevel(level if main else logging.WARNING)
    library_level = logging.WARNING if main else logging.ERROR
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(library_level)
        logger.filters = [f for f in logger.filters if not isinstance(f, (_BelowLevel, _RankTag))]
        logger.addFilter(_BelowLevel(library_level))  # first: a dropped record is not tagged
        if not main and name in OWN_HANDLER_LOGGERS:
            logger.addFilter(_RankTag(rank))
    # transformers reads its verbosity from the environment when it is first imported ...
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning" if main else "error")
    if "transformers" in sys.modules:  # ... and keeps its own level once it is
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(library_level)
    _tag_warnings(rank)
    _tag_thread_exceptions(rank)
    if not main:
        # Filters added later take precedence: ignore everything, then let vutrain's own through.
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"vutrain(\.|$)")
    return rank
