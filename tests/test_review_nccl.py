"""What runs differently under NCCL than in the CPU gloo tests, checked with CPU stand-ins.

* Device placement: with the default device set to `meta`, a tensor made without `device=` lands
  off the compute device, as a CPU tensor does on a GPU run (where NCCL refuses it in a
  collective). Every collective of the non-finite guard, the eval and the losses must get tensors
  of the compute device only.
* A survivor's view of a dead peer: NCCL raises `ncclRemoteError` where gloo says "Connection
  closed by peer"; the start-up report must treat both as the peer's failure.
"""

import contextlib
import io

import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers_dist import run_distributed

# A survivor's error under NCCL over InfiniBand when a peer died (torch's DistBackendError text; the
# "Last error" line is the transport's and names no socket failure).
NCCL_REMOTE_ERROR = (
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.cpp:77, remote process exited or "
    "there was a network error, NCCL version 2.26.2\nncclRemoteError: A call failed possibly due to a "
    "network error or a remote process exiting prematurely.\nLast error:\nNET/IB : Got completion from "
    "peer 10.0.0.2<40321> with status=12 opcode=0 len=0 vendor err 129 (Recv)"
)
OWN_ERROR = "data.train_shards: no shard matches /data/train-{0000..0099}.tar"
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter_tensor", "broadcast")


def _record_collective_devices(seen: list) -> None:
    """Wrap torch.distributed's tensor collectives to note the devices of the tensors they get."""
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            tensors = [a for a in args if torch.is_tensor(a)]
            tensors += [t for a in args if isinstance(a, list) for t in a if torch.is_tensor(t)]
            seen.append((_name, sorted({str(t.device) for t in tensors})))
            return _original(*args, **kwargs)

        setattr(dist, name, wrapped)


def _losses_eval_and_guard_off_the_default_device(rank: int, world: int) -> list:
    from vutrain.evaluate import _lockstep, feature_recall_at_k, gather_rows
    from vutrain.losses import AlignUniformLoss, ClipLoss, SigLipLoss
    from vutrain.nonfinite import NonFiniteGuard

    seen: list = []
    _record_collective_devices(seen)
    torch.set_default_device("meta")  # not the compute device, as the CPU is not on a GPU run
    cpu = torch.device("cpu")
    guard = NonFiniteGuard(torch.nn.Linear(2, 2, device=cpu), cpu, world)
    guard.agree(torch.tensor(float("nan") if rank else 1.0, device=cpu))
    gather_rows(torch.randn(rank + 1, 4, device=cpu))  # uneven row counts: padded
    _lockstep([{}] * (rank + 1), lambda batch: batch, cpu)  # rank 0 runs out first
    feature_recall_at_k(*(F.normalize(torch.randn(6, 4, device=cpu), dim=-1),) * 2)
    img = F.normalize(torch.randn(4, 8, device=cpu), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(4, 8, device=cpu), dim=-1).requires_grad_()
    scale, bias = torch.tensor(10.0, device=cpu), torch.tensor(-5.0, device=cpu)
    labels = (
        None,
        torch.randint(0, 3, (4,), device=cpu),  # a class per sample
        torch.randint(0, 3, (4, 2 + rank), device=cpu),  # tag ids, a width per rank
        torch.rand(4, 5, device=cpu) > 0.5,  # multi-hot
    )
    for lab in labels:
        for local_loss in (False, True):
            ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world)(
                img, txt, scale, labels=lab
            ).backward()
        for bidir in (False, True):
            SigLipLoss(rank=rank, world_size=world, bidir=bidir)(img, txt, scale, bias, labels=lab).backward()
    AlignUniformLoss(rank=rank, world_size=world)(img, txt, scale).backward()
    return seen


def test_collectives_of_guard_eval_and_losses_get_compute_device_tensors_only():
    """On a GPU run a tensor made without `device=` is a CPU tensor, which an NCCL collective refuses
    ("No backend type associated with device type cpu"): 3 gloo ranks whose default device is `meta`
    run the guard's agreement, the eval's row gather and lock-step, and every loss (class, tag-id and
    multi-hot labels, SigLIP's ring) with gradients; every collective saw CPU tensors only."""
    per_rank = run_distributed(_losses_eval_and_guard_off_the_default_device, 3)
    assert all(len(seen) == len(per_rank[0]) > 20 for seen in per_rank)  # every rank, the same calls
    off_device = {(name, tuple(devices)) for seen in per_rank for name, devices in seen if devices != ["cpu"]}
    assert not off_device, off_device


def _report_a_dead_peer(rank: int, world: int) -> str:
    from vutrain import startup_errors

    if rank == 1:  # the rank that failed, with its own message
        exc: BaseException = ValueError(OWN_ERROR)
    else:  # the survivor: its NCCL collective with rank 1 failed
        exc = dist.DistBackendError(NCCL_REMOTE_ERROR)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        startup_errors.report(exc, rank, world)
    return stderr.getvalue()


def test_a_survivors_nccl_remote_error_is_the_peers_failure():
    """Under NCCL a rank whose peer died gets ncclRemoteError, not gloo's "Connection closed by
    peer": rank 0 printed that NCCL text as its own error instead of the failed rank's line. Rank 0
    now prints rank 1's message, once, and nothing of NCCL."""
    from vutrain.startup_errors import is_peer_failure

    assert is_peer_failure(dist.DistBackendError(NCCL_REMOTE_ERROR))
    printed = run_distributed(_report_a_dead_peer, 2)
    lines = [line for out in printed for line in out.splitlines() if line.strip()]
    assert lines == [
        "error: rank 1: ValueError: data.train_shards: no shard matches /data/train-{0000..0099}.tar"
    ]
