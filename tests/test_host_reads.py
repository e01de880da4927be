"""`vutrain.host_reads.HostReads`: what it counts (host reads of tensor values), where, and when not."""

import pytest
import torch

from vutrain.host_reads import HostReads


def _reads_three(x: torch.Tensor) -> None:
    x.sum().item()
    bool(x.any())
    float(x.max())


def test_counts_host_reads_by_call_site_and_device():
    x = torch.arange(4.0)
    with HostReads() as reads:
        _reads_three(x)
        y = x * 2  # device work without a read is not counted
        with reads.paused():
            y.sum().item()
        reads.pause_during(lambda: y.max().item())()
    assert reads.total == 3 and len(reads.sites) == 3
    assert all("test_host_reads.py" in site for site in reads.sites)
    with HostReads("cuda") as gpu_only:  # the syncs of a GPU run: CPU tensors are not among them
        _reads_three(x)
    assert gpu_only.total == 0


def test_counts_explicit_device_waits():
    """DeepSpeed's throughput timer waited for the device twice a step with no tensor read: the
    accelerator's (and torch.cuda's) synchronize count as the syncs they are."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    with HostReads() as reads:
        accelerator.synchronize()
        with reads.paused():
            accelerator.synchronize()
    assert reads.total == 1 and all(site.startswith("synchronize ") for site in reads.sites)
    accelerator.synchronize()  # after the block: no longer counted
    assert reads.total == 1
    with HostReads("cuda") as gpu_only:  # the CPU accelerator's wait is not a GPU sync
        accelerator.synchronize()
    assert gpu_only.total == (1 if accelerator.device_name() == "cuda" else 0)


def _waits_without_a_read(x: torch.Tensor) -> None:
    x[x > 2]  # a boolean mask: the result's size is the number of True values
    torch.nonzero(x)
    torch.unique(x)
    torch.repeat_interleave(x, torch.ones(4, dtype=torch.long))
    x.tolist()


def test_counts_data_dependent_sizes_and_copies_to_host():
    """No `.item()` in sight, yet each of these makes a GPU's host wait: the output's size comes from
    the values, or the values come to the host. Counted on CPU tensors as well when no device type
    is given: nothing waits there, but the same step on a GPU would. Ops whose size is known up
    front (a given `output_size`, `nonzero_static`, three-argument `where`, integer indexing, a
    copy between host tensors) are not counted."""
    x = torch.arange(4.0)
    with HostReads() as reads:
        _waits_without_a_read(x)
        torch.repeat_interleave(x, torch.ones(4, dtype=torch.long), output_size=4)
        x.nonzero_static(size=2)
        torch.where(x > 2, x, 0.0)
        x[torch.tensor([0, 2])]
        torch.empty(4).copy_(x)
        x.to(torch.float64)
    assert reads.total == 5
    kinds = sorted(site.split(" ")[0] for site in reads.sites.elements())
    assert kinds == ["copy", "size", "size", "size", "size"], reads.sites
    assert len(reads.sites) == 5 and all(
        _innermost(site).startswith("test_host_reads.py:") for site in reads.sites
    )
    with HostReads("cuda") as gpu_only:
        _waits_without_a_read(x)
    assert gpu_only.total == 0


def test_counts_syncs_torch_reports_once():
    """With `device_type="cuda"` torch's sync detector backs the rules up (on a GPU it is switched
    on for the block): a sync it reports that no rule counted is counted once at its caller,
    never a wait a rule already counted, never inside `paused()`, and other warnings still show."""
    import warnings

    with HostReads("cuda") as reads:
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # what torch's detector emits
        with reads.paused():
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        with pytest.warns(UserWarning, match="unrelated"):
            warnings.warn("unrelated", stacklevel=1)
    assert [site.split(" ")[0] for site in reads.sites] == ["sync"], reads.sites
    assert _innermost(next(iter(reads.sites))) == f"test_host_reads.py:{_line_of('what torch')}"
    if torch.cuda.is_available():  # a real detector: the read is counted by its rule alone
        with HostReads("cuda") as reads:
            torch.ones(2, device="cuda").sum().item()
        assert list(reads.sites) and not any(site.startswith("sync ") for site in reads.sites)
        assert torch.cuda.get_sync_debug_mode() == 0, "the detector is switched off after the block"


def _innermost(site: str) -> str:
    return site.split(" <- ")[-1].split(" ")[-1]


def _line_of(text: str) -> int:
    import inspect

    lines = inspect.getsource(test_counts_syncs_torch_reports_once).splitlines()
    first = test_counts_syncs_torch_reports_once.__code__.co_firstlineno
    return first + next(i for i, line in enumerate(lines) if text in line)


def test_sync_reports_of_other_threads_are_not_the_steps():
    """A sync torch reports from another thread (a data loader's pin-memory thread) does not hold up
    the step that HostReads watches: not counted."""
    import threading
    import warnings

    with HostReads("cuda") as reads:
        other = threading.Thread(
            target=lambda: warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        )
        other.start()
        other.join()
    assert reads.total == 0, reads.sites
