"""An error on any rank before the first step: one line, printed once by rank 0, within seconds.

Without this, the rank that hit the error dies with its traceback while the others block in a
collective until the peer's socket closes (or the collective times out), each printing its own
"Connection closed by peer" traceback, and the real message is buried among them.

The agreement runs over the process group's TCP store (hosted by rank 0), not over a collective,
because the other ranks may be blocked in one:

* A rank other than 0 with an error of its own posts the one-line message (the first one wins)
  and waits a few seconds for rank 0's acknowledgement, then exits quietly.
* On rank 0 a watcher thread (`watch`, running until the first step) polls the store; when a
  message appears it prints it, acknowledges, waits until the other ranks have read the
  acknowledgement (its exit stops the store) and ends the process, even if the main thread is
  blocked in a collective with the failed rank.
* Rank 0's own error is printed by rank 0 itself; a rank whose error only says that a peer went
  away prints nothing of its own.
* If rank 0 never acknowledges (killed, or unreachable), a rank with an error of its own prints
  it itself, so a message is never lost.

Every rank writes its full traceback to RUN/logs/error_rank{R}.log for whoever needs it.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

import torch.distributed as dist

ERROR_KEY = "vutrain/startup_error"
ACK_KEY = "vutrain/startup_error_ack"
EXITED_KEY = "vutrain/startup_error_exited"
PEER_WAIT_S = 10.0
EXIT_CODE = 1
# Messages torch/gloo/NCCL give when the failure is another rank's, not this one's.
_PEER_PHRASES = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "connection refused",
    "Socket Timeout",
    "NCCL communicator was aborted",
    # ncclRemoteError, which a survivor's collective raises when a peer died: "remote process exited
    # or there was a network error" (NCCL) and "... a remote process exiting prematurely" (torch).
    "remote process exit",
    "recvBytes",
    "sendBytes",
)
# Words every process-group error carries (gloo's source path, NCCL's name, c10d's functions), and a
# DataLoader worker's re-raised socket error does not.
_GROUP_MARKERS = ("gloo", "nccl", "c10d", "tcpstore", "processgroup", "recvbytes", "sendbytes")


def one_line(exc: BaseException) -> str:
    """The exception as one line; the type is named unless it is one of ours with its own wording."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    ours = type(exc).__module__.startswith("vutrain")
    return text if ours else f"{type(exc).__name__}: {text}"


def rendezvous_message(info, exc: BaseException) -> str:
    """The process group could not start: where this rank tried to meet the others, why, and what
    to check (`info` is the rank's `distributed.DistInfo`)."""
    text = one_line(exc)
    where = f"{info.master_addr}:{info.master_port}"
    # First: a RendezvousError names what to fix, and one that quotes EADDRINUSE (a peer told that
    # rank 0's port is taken) got "port N is taken on this host" added, which is not this host.
    if type(exc).__name__ == "RendezvousError":
        advice = ""
    elif "EADDRINUSE" in text or "address already in use" in text.lower():
        advice = (
            f"port {info.master_port} is taken on this host: set MASTER_PORT to a free port, "
            "the same on every rank"
        )
    elif info.world_size == 1:
        advice = "check MASTER_ADDR / MASTER_PORT"
    else:
        advice = (
            f"check that all {info.world_size} ranks started and that MASTER_ADDR / MASTER_PORT name a "
            "host and port every rank can reach"
        )
    return (
        f"the process group did not start (rank {info.rank} of {info.world_size}, {info.launcher} launcher, "
        f"rendezvous at {where}, backend {info.backend}): {text}" + (f"; {advice}" if advice else "")
    )


def is_peer_failure(exc: BaseException) -> bool:
    """True when the exception only reports that another rank went away.

    The phrases count only in the process group's own errors (its store's DistNetworkError, a
    gloo/NCCL/c10d RuntimeError): this rank's own socket errors (an HTTP shard server that refuses
    the connection, a `pipe:` command's broken pipe) are OSErrors with the same words, and taken for
    a peer's they went unprinted while rank 0 said "another rank stopped during start-up"."""
    if isinstance(exc, getattr(dist, "DistNetworkError", ())):
        return True
    if isinstance(exc, OSError) or not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    # torch.distributed's own error types (the store's, the backend's) are the group's whatever
    # their text says; a plain RuntimeError has to name the group.
    from_group = isinstance(exc, getattr(dist, "DistError", ())) or any(m in text for m in _GROUP_MARKERS)
    return from_group and any(p.lower() in text for p in _PEER_PHRASES)


def _write_traceback(exc: BaseException, run_dir: str | None, rank: int) -> str | None:
    if not run_dir:
        return None
    try:
        os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
        path = os.path.join(run_dir, "logs", f"error_rank{rank}.log")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return path
    except OSError:
        return None


def _print(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def _get(store, key: str, timeout_s: float) -> str | None:
    try:
        store.wait([key], datetime.timedelta(seconds=timeout_s))
        return store.get(key).decode()
    except Exception:
        return None


SHOWN_KEY = "vutrain/startup_error_shown"


def _claim_showing(store) -> bool:
    """True for the first caller in this process group: rank 0's main thread and its watcher may
    both hold a message. Counted in the group's store, not in this module: a process that runs a
    second training (a sweep, the tests) has a fresh group whose message must be shown, where a
    module flag set by the first run swallowed it."""
    try:
        return store.add(SHOWN_KEY, 1) == 1
    except Exception:  # the store is gone: print rather than lose the message
        return True


def _show_and_ack(store, message: str, world_size: int) -> bool:
    """Rank 0: print `message` unless something was printed already; acknowledge; let ranks read
    it. Returns whether this call printed it."""
    if not _claim_showing(store):
        return False
    _print(message)
    try:
        store.set(ACK_KEY, "1")
        deadline = time.monotonic() + PEER_WAIT_S
        while store.add(EXITED_KEY, 0) < world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:
        pass
    return True


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def watch(world_size: int, active: Callable[[], bool], poll_s: float = 0.2) -> threading.Thread | None:
    """Rank 0: print another rank's start-up error as soon as it is posted, then end the process.

    Runs while `active()` is true (until the first step). Needs the default process group.
    """
    store = _default_store() if world_size > 1 and dist.is_initialized() else None
    if store is None:
        return None

    def loop() -> None:
        # A start-up that failed leaves `active()` true: the watcher ends with its process group
        # too, or it outlived the run and, in a process that trains again, ended that process.
        while active() and _default_store() is store:
            try:
                posted = store.check([ERROR_KEY])
            except Exception:
                return
            if posted:
                if _show_and_ack(store, store.get(ERROR_KEY).decode(), world_size):
                    os._exit(EXIT_CODE)  # the main thread may be blocked in a collective with that rank
                return  # the main thread printed it and returns its exit code (after cleanup)
            time.sleep(poll_s)

    thread = threading.Thread(target=loop, name="startup-error-watch", daemon=True)
    thread.start()
    return thread


def report(exc: BaseException, rank: int, world_size: int, run_dir: str | None = None) -> int:
    """Print `exc` the agreed way (see module docstring) and return the exit code to use."""
    log_path = _write_traceback(exc, run_dir, rank)
    own = not is_peer_failure(exc)
    message = one_line(exc)
    if log_path and not type(exc).__module__.startswith("vutrain"):  # not ours: no advice in the text
        message += f" (full traceback: {log_path})"
    store = _default_store() if world_size > 1 and dist.is_initialized() else None
    if store is None:
        if rank == 0 or own:
            _print(message if rank == 0 else f"rank {rank}: {message}")
        return EXIT_CODE
    if rank == 0:
        if not own:  # the peer's own message is on its way (or the watcher printed it already)
            message = _get(store, ERROR_KEY, PEER_WAIT_S) or (
                f"another rank stopped during start-up ({message}); see its log in logs/"
            )
        _show_and_ack(store, message, world_size)
        return EXIT_CODE
    if own:
        try:
            store.compare_set(ERROR_KEY, "", f"rank {rank}: {message}")
        except Exception:
            pass
        if _get(store, ACK_KEY, PEER_WAIT_S) is None:
            _print(f"rank {rank}: {message}")
    try:
        store.add(EXITED_KEY, 1)
    except Exception:
        pass
    return EXIT_CODE
