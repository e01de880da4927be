"""ClipLoss(backend="triton") equals backend="torch" in a real 2-process gloo group.

Each rank runs the Triton kernels through the Triton interpreter (CPU, no GPU):
TRITON_INTERPRET=1 is set here and inherited by the spawned workers, which start
fresh Pythons, so the interpreter is active there even if this process imported
Triton earlier. Expected runtime: ~20 s on 2 CPU cores.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # inherited by the spawned workers

import pytest
import torch.nn.functional as F

from kernels.runtime import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")

LOCAL_BATCH, DIM = 24, 40


def _features(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(world_size * LOCAL_BATCH, DIM, generator=g), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(world_size * LOCAL_BATCH, DIM, generator=g), dim=-1)
    return img, txt


def _loss_and_grads(rank: int, world_size: int, local_loss: bool, backend: str) -> dict:
    from vutrain.losses import ClipLoss

    img, txt = _features(world_size)
    sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    img_l = img[sl].clone().requires_grad_()
    txt_l = txt[sl].clone().requires_grad_()
    scale = torch.tensor(30.0, requires_grad=True)
    loss_fn = ClipLoss(
        local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world_size, backend=backend
    )
    loss = loss_fn(img_l, txt_l, scale)
    loss.backward()
    return {"loss": loss.detach().float(), "img": img_l.grad, "txt": txt_l.grad, "scale": scale.grad}


def _worker(rank: int, world_size: int, local_loss: bool) -> dict:
    import kernels.runtime

    # The comparison is only meaningful if the triton backend really ran the kernels.
    assert kernels.runtime.use_triton(torch.empty(1)), "Triton interpreter not active in the worker"
    return {
        backend: _loss_and_grads(rank, world_size, local_loss, backend) for backend in ("torch", "triton")
    }


@pytest.mark.parametrize("local_loss", [True, False])
def test_clip_loss_triton_backend_matches_torch_two_ranks(local_loss):
    from helpers_dist import run_distributed

    results = run_distributed(_worker, 2, local_loss, timeout_s=300)
    for rank, res in enumerate(results):
        ref, ours = res["torch"], res["triton"]
        for key in ("loss", "img", "txt", "scale"):
            torch.testing.assert_close(ours[key], ref[key], rtol=1e-4, atol=1e-5, msg=f"rank {rank} {key}")
    # Ranks see different shards, so their local losses differ under local_loss.
    if local_loss:
        assert not torch.equal(results[0]["triton"]["loss"], results[1]["triton"]["loss"])
