"""Counting host reads of tensor values: the device syncs of a training step.

Every ``.item()``, ``bool(t)``, ``float(t)`` or ``int(t)`` of a tensor dispatches
``aten._local_scalar_dense``; on a GPU each one waits for the device queue to drain. A step that
reads nothing on the host lets the CPU run ahead and keep the GPU fed, which is what issue 9's
"lean step" asks for. :class:`HostReads` is a dispatch mode that counts those reads by call site
(the innermost frames outside torch), optionally only for tensors on one device type:

    with HostReads("cuda") as reads:
        trainer.train_step()
    reads.total, reads.sites

Explicit waits count too: ``torch.cuda.synchronize`` and DeepSpeed's accelerator
``synchronize`` (its throughput timer called it twice a step) are counted while the mode is
active, at their callers' sites, prefixed ``synchronize``.

Used by ``tests/test_train_step.py`` (nothing from forward to backward on CPU ranks) and by
``python -m vutrain.bench --compare open_clip`` (``host_reads_per_step`` of one extra, untimed
step of each side). The mode adds Python work to every op: never inside a timed region.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READ = torch.ops.aten._local_scalar_dense.default


class HostReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` calls (host reads of a tensor value) by call site.

    Args:
        device_type: count only reads of tensors on this device type (``"cuda"``: the reads that
            sync a GPU); None counts every read (on a CPU-only run all of them are host tensors).
        frames: how many frames outside torch name a call site.
    """

    def __init__(self, device_type: str | None = None, frames: int = 3):
        super().__init__()
        self.device_type, self.frames = device_type, frames
        self.sites: Counter[str] = Counter()
        self._paused = 0

    @property
    def total(self) -> int:
        """Reads counted so far."""
        return sum(self.sites.values())

    @contextmanager
    def paused(self):
        """Reads inside this block are not counted (e.g. a phase the caller accounts separately)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def pause_during(self, fn: Callable, when: Callable[[], bool] = lambda: True) -> Callable:
        """``fn`` wrapped so that its reads are not counted (only when ``when()`` holds at the call)."""

        def call(*args, **kwargs):
            if not when():
                return fn(*args, **kwargs)
            with self.paused():
                return fn(*args, **kwargs)

        return call

    def _count(self, prefix: str = "") -> None:
        outside = [
            f
            for f in traceback.extract_stack()[:-2]
            if f"{os.sep}torch{os.sep}" not in f.filename and f.filename != __file__
        ]
        where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in outside[-self.frames :])
        self.sites[prefix + where] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _READ and not self._paused:
            tensor = args[0]
            if self.device_type is None or tensor.device.type == self.device_type:
                self._count()
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._restore = self._count_synchronize()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._restore()

    def _count_synchronize(self) -> Callable[[], None]:
        """Wrap the explicit device waits; returns what undoes it."""
        targets = [(torch.cuda, "synchronize", "cuda")]
        try:
            from deepspeed.accelerator import get_accelerator

            accelerator = get_accelerator()
            targets.append((accelerator, "synchronize", accelerator.device_name()))
        except ImportError:  # deepspeed is optional here: torch's own wait is still counted
            pass
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]

        def wrap(original, device_type):
            def counted(*args, **kwargs):
                if not self._paused and self.device_type in (None, device_type):
                    self._count("synchronize ")
                return original(*args, **kwargs)

            return counted

        for (owner, name, device_type), (_, _, original) in zip(targets, originals):
            setattr(owner, name, wrap(original, device_type))

        def restore():
            for owner, name, original in originals:
                setattr(owner, name, original)

        return restore
