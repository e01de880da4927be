"""The run lock's in-process re-entry (vutrain/run_lock.py) is keyed by the lock file, not its path.

A hold leaked in a notebook or test process (a Trainer never released) on a run directory that was
then deleted and re-created at the same path: the next run of that process "re-entered" the lock
of the deleted file, holding nothing on the new one, and a second process took the new directory's
lock, two runs in one output_dir. Real flock, a real second process.
"""

from __future__ import annotations

import shutil

from test_review_run_lock import _lock_free_for_another_process

from vutrain import run_lock


def test_a_leaked_hold_on_a_deleted_directory_does_not_stand_for_its_successor(tmp_path):
    run_dir = str(tmp_path / "run")
    leaked = run_lock.acquire(run_dir)  # never released by its run
    shutil.rmtree(run_dir)
    fresh = run_lock.acquire(run_dir)
    try:
        assert fresh.held
        assert not _lock_free_for_another_process(run_dir), "the re-created directory was not locked"
        # The leaked hold, released late, leaves the new directory's lock in place.
        leaked.release()
        assert not _lock_free_for_another_process(run_dir)
    finally:
        leaked.release()
        fresh.release()
    assert _lock_free_for_another_process(run_dir)


def test_re_entry_into_one_directory_still_shares_one_lock(tmp_path):
    """Two holds of one directory (also through a symlink) in one process: one lock, held until the
    last release."""
    run_dir = tmp_path / "run"
    first = run_lock.acquire(str(run_dir))
    (tmp_path / "alias").symlink_to(run_dir)
    second = run_lock.acquire(str(tmp_path / "alias"))
    try:
        assert second.held
        first.release()
        assert not _lock_free_for_another_process(str(run_dir))
    finally:
        first.release()
        second.release()
    assert _lock_free_for_another_process(str(run_dir))
