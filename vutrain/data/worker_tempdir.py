"""A temporary folder short enough for the loader workers' batch hand-over sockets.

A loader worker hands each batch's tensors to the trainer as file descriptors (torch's default
sharing strategy on Linux), through multiprocessing's resource sharer: an AF_UNIX socket at
``TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX``. The kernel limits such a path to 107 bytes (103 on
macOS). Under a longer ``TMPDIR`` (a cluster's per-job scratch folder, a test's tmp_path) the bind
fails inside the worker's queue feeder thread, which prints the error to stderr and drops the
batch: the trainer then waited for it forever, with no error of its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from multiprocessing import process, util

log = logging.getLogger(__name__)

SOCKET_PATH_MAX = 107 if sys.platform.startswith("linux") else 103
"""The longest AF_UNIX socket path the kernel binds (sun_path less its terminating NUL)."""

_LISTENER = len("/listener-XXXXXXXX")  # the socket's name in multiprocessing's temp folder
_PYMP = len("/pymp-XXXXXXXX")  # the folder multiprocessing makes in tempfile.gettempdir()

SHORT_BASES = ("/tmp", "/var/tmp", "/dev/shm")
"""Where a short folder is made when the temp folder is too long (the first writable one)."""


def socket_path_length(mp_tempdir: str | None, gettempdir: str) -> int:
    """Bytes of the resource sharer's socket path: in multiprocessing's temp folder, or in the one
    it would make under ``gettempdir``."""
    if mp_tempdir is not None:
        return len(os.fsencode(mp_tempdir)) + _LISTENER
    return len(os.fsencode(gettempdir)) + _PYMP + _LISTENER


def ensure_short_worker_tempdir() -> str | None:
    """Before loader workers are forked: give this process (and so the workers, which inherit it)
    a multiprocessing temp folder whose socket path fits the kernel's limit. Returns the folder
    made, or None when the current one fits. Raises RuntimeError, in one line, when no short
    folder can be made."""
    config = process.current_process()._config  # where multiprocessing.util.get_temp_dir keeps it
    current = config.get("tempdir")
    length = socket_path_length(current, tempfile.gettempdir())
    if length <= SOCKET_PATH_MAX:
        return None
    for base in SHORT_BASES:
        if socket_path_length(None, base) > SOCKET_PATH_MAX or not os.access(base, os.W_OK | os.X_OK):
            continue
        try:
            short = tempfile.mkdtemp(prefix="pymp-", dir=base)
        except OSError:
            continue
        # Removed at exit like multiprocessing's own folder (a forked worker drops the finalizer).
        util.Finalize(None, shutil.rmtree, args=(short,), kwargs={"ignore_errors": True}, exitpriority=-100)
        config["tempdir"] = short
        log.warning(
            "the temporary folder %s is too long for the loader workers' sockets (%d of %d bytes): "
            "they use %s instead",
            current or tempfile.gettempdir(),
            length,
            SOCKET_PATH_MAX,
            short,
        )
        return short
    raise RuntimeError(
        f"the temporary folder {current or tempfile.gettempdir()} is too long for the loader workers' "
        f"sockets ({length} of {SOCKET_PATH_MAX} bytes) and none of {', '.join(SHORT_BASES)} is writable: "
        f"set TMPDIR to a folder of at most {SOCKET_PATH_MAX - _PYMP - _LISTENER} characters, or "
        "data.num_workers=0"
    )
