"""One run per output_dir: rank 0 holds an exclusive lock on ``OUTPUT_DIR/.run.lock``.

Two runs started into one output_dir (a job submitted twice, two hosts on a shared file system, a
second ``python -m vutrain.train``) overwrote and resumed from each other's checkpoints and
metrics. launch/local.sh's lock lives in /tmp of one host and only for its own launches.

The lock is ``flock`` on a file held open for the run: the kernel drops it when the process dies,
so a requeued or resumed run after a crash or SIGKILL is never refused by a dead holder (no stale
lock to clean up). The file stays in place (never moved aside with the checkpoints, never deleted:
removing a lock file lets a waiter lock the old inode while a newcomer locks a new one) and records
its holder (host, pid, SLURM job) for the refusal's message.

A forked child (a data loader worker) shares the open file, and with it the lock: a worker that
outlived a killed trainer blocked the requeued run. Children close their copy right after the fork.

Within one process the lock is re-entrant (per lock file): in-process tests and notebooks that
build a second Trainer into a directory before the first was released are one user, not two runs.
Re-entry is keyed by the lock file's device and inode, not its path: a hold leaked on a directory
that was then deleted and re-created at the same path let a later run of the process "re-enter" a
lock on the deleted file, holding nothing on the new one, and a second process then took it.

On NFS the server keeps a crashed node's lock until its lease ends (about 90 s on NFSv4): the
requeued job was refused at once (exit 2), SLURM does not requeue that, and the training stopped for
good. A holder that is probably gone (this run is a SLURM requeue, or the holder recorded our SLURM
job or another host) is waited for, up to VUTRAIN_RUN_LOCK_WAIT_S (default 120 s for a requeue or
our own job, 0 otherwise), before the refusal; a live holder on this host is refused at once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time

from vutrain.config import ConfigError

log = logging.getLogger("vutrain")
LOCK_NAME = ".run.lock"
# A file system that cannot lock (Lustre without -o flock, some FUSE mounts): run unlocked.
_NO_LOCK_SUPPORT = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
_HELD_BY_OTHER = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES}
WAIT_ENV = "VUTRAIN_RUN_LOCK_WAIT_S"
# Longer than an NFSv4 lease (90 s by default), after which the server drops a dead client's locks.
REQUEUE_WAIT_S = 120.0
_RETRY_EVERY_S = 1.0


class RunDirInUseError(ConfigError):
    """Another live run holds this output_dir's lock; the message is one line that says what to do."""


class _Held:
    """One open, locked lock file of this process and how many RunLocks share it."""

    def __init__(self, handle, path: str):
        self.handle, self.path, self.users = handle, path, 1
        stat = os.fstat(handle.fileno())
        self.key = (stat.st_dev, stat.st_ino)


# (device, inode) of a lock file -> its open, locked handle in this process. The open handle keeps
# its inode allocated, so a file re-created at the same path never gets the key of a held one.
_held: dict[tuple[int, int], _Held] = {}


def _entry_holding(path: str) -> _Held | None:
    """This process's hold on the lock file now at ``path``, if any."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return _held.get((stat.st_dev, stat.st_ino))


class RunLock:
    """This process's hold on one run directory; `release()` once (more calls do nothing)."""

    def __init__(self, entry: _Held | None):
        self._entry = entry  # None: the file system does not lock, nothing is held

    @property
    def held(self) -> bool:
        return self._entry is not None

    def release(self) -> None:
        entry, self._entry = self._entry, None
        # Not ours any more: a forked child closed its copy (and cleared _held).
        if entry is None or _held.get(entry.key) is not entry:
            return
        entry.users -= 1
        if entry.users > 0:
            return
        del _held[entry.key]
        try:
            fcntl.flock(entry.handle, fcntl.LOCK_UN)
        finally:
            entry.handle.close()


def acquire(run_dir: str) -> RunLock:
    """Lock ``run_dir`` (created if missing) for this run, or raise RunDirInUseError naming the holder.

    A holder that is probably gone (see the module's docstring) is waited for first, up to
    VUTRAIN_RUN_LOCK_WAIT_S. OSError (the directory cannot be created or the lock file opened) goes
    to the caller, which reports an output_dir that cannot be prepared."""
    wait_setting = wait_from_env()
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_NAME)
    # Looked up by stat, not by opening the file: on NFS flock is a POSIX lock, which closing any
    # other descriptor of the file in this process would drop.
    entry = _entry_holding(path)
    if entry is not None:
        entry.users += 1
        return RunLock(entry)
    # "a+": created if missing, never truncated before the lock is ours (the holder's record).
    handle = open(path, "a+", encoding="utf-8")
    try:
        waited = None if _try_lock(handle) else _wait_for_a_gone_holder(handle, run_dir, path, wait_setting)
    except OSError as exc:
        handle.close()
        if exc.errno in _NO_LOCK_SUPPORT:
            _warn_unlocked(run_dir, exc)
            return RunLock(None)
        raise
    except BaseException:
        handle.close()
        raise
    if waited is not None:
        handle.close()
        raise RunDirInUseError(in_use_message(run_dir, read_holder(path), waited))
    entry = _Held(handle, path)
    _held[entry.key] = entry
    _record_holder(handle)
    return RunLock(entry)


def _try_lock(handle) -> bool:
    """True once the lock is ours, False while another process holds it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _HELD_BY_OTHER:
            return False
        raise
    return True


def wait_from_env() -> float | None:
    """VUTRAIN_RUN_LOCK_WAIT_S in seconds, None when unset; a bad value is a one-line ConfigError."""
    text = os.environ.get(WAIT_ENV, "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):  # also NaN
        raise ConfigError(
            f"{WAIT_ENV}={text!r} is not a number of seconds: set it to 0 or more (how long a run "
            "waits for a probably-gone holder of its output_dir's lock), or unset it"
        )
    return seconds


def wait_budget(holder: dict, setting: float | None) -> float:
    """How long to wait for ``holder``'s lock: 0 for a live holder on this host (a second run)."""
    here = socket.gethostname()
    host, pid = holder.get("host"), holder.get("pid")
    if host == here and isinstance(pid, int) and _pid_alive(pid):
        return 0.0
    ours = os.environ.get("SLURM_JOB_ID") or None
    requeued = _int_or_zero(os.environ.get("SLURM_RESTART_COUNT")) > 0
    own_job = ours is not None and str(holder.get("slurm_job_id")) == ours
    if requeued or own_job:
        return REQUEUE_WAIT_S if setting is None else setting
    if host and host != here:  # a crashed node's, or a live run's there: the user's setting decides
        return setting or 0.0
    return 0.0


def _wait_for_a_gone_holder(handle, run_dir: str, path: str, setting: float | None) -> float | None:
    """Retry the lock while its holder is probably gone, up to its wait budget: None once the lock
    is ours, else the seconds waited in vain."""
    holder = read_holder(path)
    budget = wait_budget(holder, setting)
    if budget <= 0:
        return 0.0
    log.warning(
        "output_dir=%s is locked by %s, probably gone (on NFS a crashed node's lock lasts until the "
        "server's lease ends): waiting up to %.0f s for it (%s)",
        run_dir,
        describe_holder(holder),
        budget,
        WAIT_ENV,
    )
    started = time.monotonic()
    while (waited := time.monotonic() - started) < budget:
        time.sleep(min(_RETRY_EVERY_S, budget - waited))
        if _try_lock(handle):
            log.warning("output_dir=%s: its lock was freed after %.0f s", run_dir, time.monotonic() - started)
            return None
    return waited


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def _int_or_zero(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def _record_holder(handle) -> None:
    """Write who holds the lock into its file; a failed write costs the message its names only."""
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None,
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
    except OSError as exc:
        log.warning("%s: the lock's holder was not recorded (%s)", handle.name, exc)


def read_holder(path: str) -> dict:
    """The holder recorded in the lock file at ``path``; {} if unreadable (a holder still writing it)."""
    try:
        with open(path, encoding="utf-8") as fh:
            holder = json.loads(fh.read() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict) -> str:
    """The recorded holder in words: host, pid and SLURM job, as far as recorded."""
    parts = [f"host {holder['host']}" if holder.get("host") else None]
    parts.append(f"pid {holder['pid']}" if holder.get("pid") else None)
    parts.append(f"SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else None)
    return ", ".join(p for p in parts if p) or "holder not recorded"


def in_use_message(run_dir: str, holder: dict, waited_s: float = 0.0) -> str:
    """The one-line refusal of a second run in ``run_dir``."""
    waited = f", still held after waiting {waited_s:.0f} s for it" if waited_s > 0 else ""
    return (
        f"output_dir={run_dir} is in use by another run ({describe_holder(holder)}; lock "
        f"{os.path.join(run_dir, LOCK_NAME)}{waited}): two runs in one output_dir overwrite and resume "
        "from each other's checkpoints. Wait for that run to end (or stop it), or give this one another "
        f"output_dir=... (a requeued run whose crashed node still holds the lock: set {WAIT_ENV} longer)"
    )


def _warn_unlocked(run_dir: str, exc: OSError) -> None:
    log.warning(
        "output_dir=%s: its file system does not support locks (%s), so a second run started into it "
        "is not refused: make sure only one run uses it (Lustre: mount with -o flock)",
        run_dir,
        errno.errorcode.get(exc.errno, exc.errno),
    )


def _close_in_forked_child() -> None:
    """A forked child keeps no copy of the lock: it would outlive a killed parent's hold."""
    for entry in _held.values():
        try:
            entry.handle.close()  # close only: an unlock here would release the parent's lock too
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_forked_child)
