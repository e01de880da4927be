"""`vutrain.host_reads.HostReads`: what it counts (host reads of tensor values), where, and when not."""

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
