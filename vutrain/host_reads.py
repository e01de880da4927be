"""Counting host reads of tensor values: the device syncs of a training step.

Every ``.item()``, ``bool(t)``, ``float(t)`` or ``int(t)`` of a tensor dispatches
``aten._local_scalar_dense``; on a GPU each one waits for the device queue to drain, and so does
``torch.equal`` or ``torch.allclose``, which answer a Python bool. So do, with no
read in sight, an op whose output size depends on the values (``nonzero``, ``x[mask]``,
``masked_select``, ``unique``, ``repeat_interleave`` with tensor repeats, ``bincount``: the host
must learn the size before it allocates), a blocking copy to the host (``.cpu()``, ``.tolist()``,
``.to("cpu")`` without ``non_blocking``). A step that reads nothing on the host lets the CPU run
ahead and keep the GPU fed, which is what issue 9's "lean step" asks for. :class:`HostReads` is a
dispatch mode that counts all of these by call site (the innermost frames outside torch),
optionally only for tensors on one device type:

    with HostReads("cuda") as reads:
        trainer.train_step()
    reads.total, reads.sites

Sites are prefixed with what waits: nothing for a value read, ``size of`` for a data-dependent
size, ``copy to host`` for a blocking copy. A CPU run counts the data-dependent ops of CPU tensors
too (``device_type=None``): nothing waits there, but the same code on a GPU would.

Explicit waits count too: ``torch.cuda.synchronize`` and DeepSpeed's accelerator
``synchronize`` (its throughput timer called it twice a step) are counted while the mode is
active, at their callers' sites, prefixed ``synchronize``. With ``device_type="cuda"`` on a GPU,
torch's own sync detector (``torch.cuda.set_sync_debug_mode("warn")``) backs the list up: a sync
it reports that no rule above counted is counted, prefixed ``sync`` (a sync in a CUDA backward
op, run in the autograd engine's own thread, at the ``backward()`` call, where the engine hands
its thread's warnings back).

Used by ``tests/test_train_step.py`` (nothing from forward to backward on CPU ranks) and by
``python -m vutrain.bench --compare open_clip`` (``host_reads_per_step`` of one extra, untimed
step of each side). The mode adds Python work to every op: never inside a timed region.
"""

from __future__ import annotations

import os
import threading
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READ = torch.ops.aten._local_scalar_dense.default
_aten = torch.ops.aten
# Ops that answer a Python bool from the values: a read like ``.item()``, but done inside the op's
# own kernel, where no ``_local_scalar_dense`` reaches this mode (a CPU run counted none of them).
_VALUE_READS = {_READ, _aten.equal.default, _aten.allclose.default}
# Ops whose output size is read from the values on the host (a GPU waits for them to be computed).
_DATA_DEPENDENT_SIZE = {
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten._unique.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.bincount.default,
}
_BOOL_INDEXED = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}
_SYNC_WARNING = "called a synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode("warn")


def _wait_kind(func, args, kwargs) -> tuple[str, torch.Tensor] | None:
    """(site prefix, tensor whose device waits) when ``func(*args, **kwargs)`` makes the host wait."""
    if func in _VALUE_READS:
        return "", args[0]
    if func in _DATA_DEPENDENT_SIZE:
        return "size of ", args[0]
    if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "size of ", args[0]
    if func in _BOOL_INDEXED and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
    ):
        return "size of ", args[0]
    if func is _aten._to_copy.default:  # .cpu(), .to("cpu"): blocking unless non_blocking
        target = kwargs.get("device")
        if target is not None and torch.device(target).type == "cpu" and not kwargs.get("non_blocking"):
            if args[0].device.type != "cpu":
                return "copy to host ", args[0]
    if func is _aten.copy_.default:  # a host tensor filled from a device one
        dst, src = args[0], args[1]
        non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
        if dst.device.type == "cpu" and src.device.type != "cpu" and not (non_blocking and dst.is_pinned()):
            return "copy to host ", src
    return None


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

    def _site(self) -> str:
        outside = [
            f
            for f in traceback.extract_stack()[:-2]
            if f"{os.sep}torch{os.sep}" not in f.filename and f.filename not in (__file__, warnings.__file__)
        ]
        return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in outside[-self.frames :])

    def _count(self, prefix: str = "", where: str | None = None) -> str:
        where = self._site() if where is None else where
        self.sites[prefix + where] += 1
        return where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        wait = None if self._paused else _wait_kind(func, args, kwargs)
        if wait is None or self.device_type not in (None, wait[1].device.type):
            return func(*args, **kwargs)
        # torch's sync detector must not count this wait a second time. Its report of a sync inside
        # the op reaches Python only when the call that started the op returns, after this method
        # (the Python binding flushes the C++ warnings then): it is matched by the site instead.
        self._rule_sites.add(self._count(wait[0]))
        return func(*args, **kwargs)

    def __enter__(self):
        self._counted = 0
        self._rule_sites: set[str] = set()
        restores = [self._count_synchronize(), self._count_tolist(), self._count_sync_warnings()]
        self._restore = lambda: [restore() for restore in reversed(restores)]
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._restore()

    def _count_sync_warnings(self) -> Callable[[], None]:
        """With ``device_type="cuda"``: count the syncs torch's detector reports that no rule counted.
        The detector is switched on only where CUDA is; the hook is installed either way."""
        if self.device_type != "cuda":
            return lambda: None
        caught = warnings.catch_warnings()
        caught.__enter__()
        warnings.filterwarnings("always", message=_SYNC_WARNING)
        shown = warnings.showwarning

        owner = threading.get_ident()

        def hook(message, category, filename, lineno, file=None, line=None):
            if _SYNC_WARNING not in str(message):
                return shown(message, category, filename, lineno, file, line)
            # Only this thread's waits (a loader's pin-memory thread does not hold up the step).
            if not self._paused and not self._counted and threading.get_ident() == owner:
                where = self._site()
                if where not in self._rule_sites:  # else the wait a rule counted at this site
                    self._count("sync ", where)

        warnings.showwarning = hook
        mode = None
        if torch.cuda.is_available():
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")

        def restore():
            if mode is not None:
                torch.cuda.set_sync_debug_mode(mode)
            caught.__exit__(None, None, None)

        return restore

    def _count_tolist(self) -> Callable[[], None]:
        """``Tensor.tolist`` of a host tensor dispatches nothing (of a GPU tensor, a copy the
        dispatch rules count): counted in a CPU run as the host read it stands for."""
        original = torch.Tensor.tolist

        def tolist(tensor, *args, **kwargs):
            if not self._paused and self.device_type is None and tensor.device.type == "cpu":
                self._count("copy to host ")
            return original(tensor, *args, **kwargs)

        torch.Tensor.tolist = tolist

        def restore():
            torch.Tensor.tolist = original

        return restore

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
                # _counted: inside a wait counted already (DeepSpeed's CUDA accelerator's
                # synchronize is torch.cuda.synchronize: one wait, not two)
                if self._paused or self._counted or self.device_type not in (None, device_type):
                    return original(*args, **kwargs)
                self._count("synchronize ")
                self._counted += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    self._counted -= 1

            return counted

        for (owner, name, device_type), (_, _, original) in zip(targets, originals):
            setattr(owner, name, wrap(original, device_type))

        def restore():
            for owner, name, original in originals:
                setattr(owner, name, original)

        return restore
