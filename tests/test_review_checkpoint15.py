"""Checkpoint review 15: a roll-back (train.resume=<path>) in a run whose ``checkpoints/`` is a link to
another file system (scratch space) sets the later checkpoints aside instead of failing with
"Invalid cross-device link". Real files: checkpoints published by `checkpoint._complete`, a real
symbolic link into /dev/shm (a tmpfs, another file system than the test's tmp_path)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from vutrain import checkpoint as ckpt


def _publish(ckpt_dir: str, step: int) -> None:
    """A complete checkpoint of `step`, written and published the way a save does."""
    tmp_dir = os.path.join(ckpt_dir, ckpt.tag_for(step) + ckpt.TMP_SUFFIX)
    os.makedirs(tmp_dir)
    with open(os.path.join(tmp_dir, "mp_rank_00_model_states.pt"), "wb") as fh:
        fh.write(bytes(100 + step))
    ckpt._complete(ckpt_dir, ckpt.tag_for(step), step)


@pytest.fixture
def scratch(tmp_path):
    """A folder on another file system than tmp_path, removed afterwards."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is no second file system here to link the checkpoints to")
    folder = tempfile.mkdtemp(prefix="vutrain_scratch_", dir="/dev/shm")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_roll_back_sets_checkpoints_on_linked_scratch_space_aside(tmp_path, scratch):
    """RUN/checkpoints links to scratch; the run rolls back to step 2 of 2, 4, 6. Before, rank 0's
    rename of step 4 into RUN/checkpoints.replaced-S failed with OSError EXDEV after the resume had
    loaded (the other ranks went on training into a collective with no peer). Now steps 4 and 6
    sit aside on the scratch file system behind a link of that name, a later auto resume continues
    from step 2, and a resume from the set-aside step 6 still takes this run's tokenizer."""
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    real_ckpts = os.path.join(scratch, "checkpoints")
    os.makedirs(real_ckpts)
    own = ckpt.checkpoints_dir(run_dir)
    os.symlink(real_ckpts, own)
    for step in (2, 4, 6):
        _publish(own, step)

    moved = ckpt.set_aside_later(run_dir, os.path.join(own, "step_00000002"), 2)

    (aside,) = {os.path.dirname(p) for p in moved}
    assert os.path.dirname(aside) == run_dir and os.path.basename(aside).startswith("checkpoints.replaced-")
    assert sorted(os.listdir(aside)) == ["step_00000004", "step_00000006"]
    assert os.stat(aside).st_dev == os.stat(scratch).st_dev  # renamed on scratch, nothing copied
    assert ckpt.list_tags(own) == ["step_00000002"]
    assert ckpt.resolve_resume("auto", run_dir, verbose=False) == (own, "step_00000002")
    set_aside = os.path.join(aside, "step_00000006")
    assert ckpt.resolve_resume(set_aside, run_dir, verbose=False) == (aside, "step_00000006")
    assert ckpt.resume_tokenizer_dir(set_aside) == os.path.join(run_dir, "tokenizer")


def test_a_fresh_start_keeps_checkpoints_on_linked_scratch_space(tmp_path, scratch):
    """RUN/checkpoints links to scratch and the run starts afresh (train.resume=never). Before, the
    link itself was renamed to RUN/checkpoints.replaced-S and the new run made a plain
    RUN/checkpoints in the run directory: its checkpoints silently filled the file system the link
    was there to spare. Now the link stays, to an empty folder on scratch, and the old checkpoints
    sit aside on scratch behind RUN/checkpoints.replaced-S, from which they still resume."""
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    real_ckpts = os.path.join(scratch, "checkpoints")
    os.makedirs(real_ckpts)
    own = ckpt.checkpoints_dir(run_dir)
    os.symlink(real_ckpts, own)
    _publish(own, 2)

    (aside,) = ckpt.move_aside(run_dir)

    assert os.path.islink(own) and os.path.realpath(own) == os.path.realpath(real_ckpts)
    assert os.listdir(own) == []
    assert os.path.basename(aside).startswith("checkpoints.replaced-")
    assert os.path.dirname(os.path.realpath(aside)) == os.path.realpath(scratch)
    assert ckpt.resolve_resume(aside, run_dir, verbose=False) == (aside, "step_00000002")
