"""CUDA-only paths, checked on CPU where a CPU stand-in fails the same way (else marked `gpu`)."""

import warnings

import pytest
import torch

from vutrain import host_reads
from vutrain.host_reads import HostReads

# A C++ warning (TORCH_WARN) that a CPU kernel raises inside a dispatched op, as the CUDA sync
# detector's "called a synchronizing CUDA operation" is raised inside `.item()`'s copy to the host.
_KERNEL_WARNING = "indexing with dtype torch.uint8 is now deprecated"


def _uint8_mask_index(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask]


def test_a_sync_the_detector_reports_after_the_op_is_not_counted_twice(monkeypatch):
    """torch hands a C++ warning raised inside an op to Python when the Python call that started the
    op returns, after `__torch_dispatch__` returned. On a GPU every wait a rule counts (`.item()`,
    `.tolist()`, a boolean mask, ...) is then counted a second time as a `sync` by the detector's
    hook (by reading; no GPU here): `host_reads_per_step` of `bench --compare open_clip` doubles.
    Stand-in: a CPU kernel's own TORCH_WARN, taken for the detector's message, and the rules
    counting CPU tensors."""
    x, mask = torch.arange(4.0), torch.tensor([1, 0, 1, 0], dtype=torch.uint8)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        _uint8_mask_index(x, mask)
    if not any(_KERNEL_WARNING in str(w.message) for w in shown):
        pytest.skip("this torch no longer warns on uint8 mask indexing")
    monkeypatch.setattr(host_reads, "_SYNC_WARNING", _KERNEL_WARNING)
    with HostReads("cuda") as reads:  # "cuda": the detector's hook is installed
        reads.device_type = None  # and the rules count this CPU tensor as a GPU one
        _uint8_mask_index(x, mask)
        warnings.warn(_KERNEL_WARNING, stacklevel=1)  # a sync no rule counted, elsewhere: counted
    kinds = sorted(site.split(" ")[0] for site in reads.sites.elements())
    assert kinds == ["size", "sync"], reads.sites


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_each_gpu_read_is_counted_once():
    """Unverified here (no GPU): each of these waits once, counted by its rule and not again as a
    `sync` from torch's detector."""
    x = torch.arange(4.0, device="cuda")
    with HostReads("cuda") as reads:
        x.sum().item()
        x.tolist()
        x[x > 1]
        bool(x.any())
    assert reads.total == 4 and not any(site.startswith("sync ") for site in reads.sites), reads.sites


def test_the_accelerators_synchronize_is_one_wait_when_it_calls_torchs(monkeypatch):
    """DeepSpeed's CUDA accelerator's `synchronize` is `torch.cuda.synchronize(...)`, and HostReads
    wraps both: on a GPU every DeepSpeed wait is counted twice (ZeRO-3's, overlap_comm's), and
    `test_host_reads.py`'s `gpu_only.total == 1` for the accelerator would fail there. Stand-in: a
    no-op `torch.cuda.synchronize` and an accelerator whose synchronize calls it, as CUDA's does."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(
        accelerator, "synchronize", lambda device_index=None: torch.cuda.synchronize(device_index)
    )
    with HostReads() as reads:
        accelerator.synchronize()
        torch.cuda.synchronize()
    assert reads.total == 2 and all(site.startswith("synchronize ") for site in reads.sites), reads.sites
