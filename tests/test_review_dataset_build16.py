"""dataset_tools build, sixteenth review: processes of one build extending pauses at the same moment
lose none of them in ``host_cooldown.json``; a lock never let go does not stop the write.

Runtime: ~5 s on 2 busy cores (six real processes writing one file).
"""

import fcntl
import json
import multiprocessing
import time

from dataset_tools import politeness
from dataset_tools.politeness import SharedCoolDown

_PROCESSES = 6
_EXTENDS = 40
_STEP = 1000.0  # each extend asks this much longer than the last: a lost one is far short


def _hammer(path: str, host: str, start) -> None:
    start.wait(timeout=60)  # all start together, so their read-modify-writes overlap
    for i in range(1, _EXTENDS + 1):
        # A fresh limiter each time, as img2dataset's freshly started workers have: one that
        # remembered its own last write would skip nothing, but might hide a lost one.
        SharedCoolDown(path, 1e9, host=host).extend(_STEP * i)


def test_concurrent_extends_of_several_processes_keep_every_hosts_latest_pause(tmp_path):
    # Each process read the file, then replaced it with its own map: a write landing between
    # another's read and write dropped that host's new pause, or kept its shorter end.
    path = str(tmp_path / "host_cooldown.json")
    hosts = [f"h{i}.example" for i in range(_PROCESSES)]
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    workers = [ctx.Process(target=_hammer, args=(path, host, start)) for host in hosts]
    for worker in workers:
        worker.start()
    t0 = time.time()
    start.set()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    kept = json.loads(open(path).read())["hosts"]
    lost = {h: kept.get(h) for h in hosts if kept.get(h, 0.0) < t0 + _STEP * _EXTENDS}
    assert not lost, f"pauses lost or cut short: {lost}"
    for host in hosts:
        assert SharedCoolDown(path, 1e9, host=host).remaining() > _STEP * (_EXTENDS - 1)


def test_a_lock_held_past_the_wait_does_not_stop_the_pause_being_written(tmp_path, monkeypatch):
    # A holder that never lets go (a stopped process) must not stop every download of the build:
    # past the wait the pause is written unlocked, as a write that fails is skipped.
    monkeypatch.setattr(politeness, "COOL_DOWN_LOCK_WAIT", 0.2)
    path = str(tmp_path / "host_cooldown.json")
    with open(f"{path}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        SharedCoolDown(path, 60, host="h.example").extend(30)
    assert SharedCoolDown(path, 60, host="h.example").remaining() > 25
