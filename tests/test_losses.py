"""vutrain.losses against single-process references, over real gloo process groups.

What "correct" means across ranks (W ranks, local batch B, L = loss of one process on the
concatenated global batch, feat_r = rank r's slice):
* gather_with_grad=True (and SigLIP, align_uniform): mean_r loss_r == L and the gradient on
  rank r's features, divided by W (the DDP/DeepSpeed gradient average), equals dL/dfeat_r.
* ClipLoss gather_with_grad=False, local_loss=False: every rank's loss is L and its own slice
  gets exactly dL/dfeat_r (open_clip's local-slot trick; remote slices are constants).
* ClipLoss gather_with_grad=False, local_loss=True: open_clip's semantics, the gathered keys
  are constants: the gradient is that of the local loss with detached keys.
The logit_scale (and logit_bias) gradient averaged over ranks equals dL/ds in every case.

One spawn per world size (2 and 4); everything for that world size is checked from it.
Expected runtime: ~20-40 s on 2 CPU cores.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from vutrain.losses import AlignUniformLoss, ClipLoss, SigLipLoss, build_loss

from helpers_dist import run_distributed

B, D = 3, 8  # local batch, feature dim
SCALE, BIAS = 7.0, -2.0
TOL = dict(rtol=1e-9, atol=1e-11)  # fp64 throughout
COMBOS = list(itertools.product((False, True), (False, True)))  # (local_loss, gather_with_grad)


# -- independent references (open_clip's formulas written out plainly) -------------------------


def clip_reference(img, txt, scale, bias=None):
    """open_clip ClipLoss on one process: CE of logits_per_image and of logits_per_text."""
    per_image = scale * img @ txt.T
    per_text = scale * txt @ img.T
    if bias is not None:
        per_image, per_text = per_image + bias, per_text + bias
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def clip_local_detached_reference(img, txt, scale, rank):
    """open_clip local_loss=True without gather_with_grad: rank's rows vs constant columns."""
    rows = slice(rank * B, (rank + 1) * B)
    labels = torch.arange(B) + rank * B
    per_image = scale * img[rows] @ txt.detach().T
    per_text = scale * txt[rows] @ img.detach().T
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def siglip_pair_loss(img, txt, scale, bias, negative_only):
    """open_clip SigLipLoss._loss."""
    logits = scale * img @ txt.T + bias
    labels = -torch.ones_like(logits)
    if not negative_only:
        labels = 2 * torch.eye(img.shape[0], dtype=img.dtype) + labels
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


def siglip_reference(img, txt, scale, bias, rank=0, world=1):
    """open_clip SigLipLoss on `rank`: local pairs plus every other rank's texts as negatives."""
    chunk = lambda x, r: x[r * B : (r + 1) * B] if world > 1 else x  # noqa: E731
    loss = siglip_pair_loss(chunk(img, rank), chunk(txt, rank), scale, bias, False)
    for r in range(world):
        if r != rank:
            loss = loss + siglip_pair_loss(chunk(img, rank), chunk(txt, r), scale, bias, True)
    return loss


def align_uniform_reference(img, txt, t=2.0):
    """Wang & Isola terms: align over pairs, uniformity over all non-matching image-text pairs."""
    align = (img - txt).norm(dim=1).pow(2).mean()
    sq = torch.cdist(img, txt).pow(2)
    off = ~torch.eye(img.shape[0], dtype=torch.bool)
    uniform = torch.exp(-t * sq[off]).mean().log()
    return align, uniform


def make_batch(world, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + 0.8 * torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=1)
    return img, txt


def leaves(*xs):
    return [x.detach().clone().requires_grad_(True) for x in xs]


def grads_of(loss_fn, img, txt, *extra):
    """Value and grads of loss_fn(img, txt, *extra) w.r.t. every argument."""
    args = leaves(img, txt, *extra)
    loss = loss_fn(*args)
    loss.backward()
    return loss.detach(), [a.grad for a in args]


# -- per-rank worker: one spawn checks everything for a world size -------------------------------


def _rank_results(rank, world, img_all, txt_all):
    torch.set_default_dtype(torch.float64)
    rows = slice(rank * B, (rank + 1) * B)
    img, txt = img_all[rows], txt_all[rows]
    scale, bias = torch.tensor(SCALE), torch.tensor(BIAS)
    out = {}
    for local_loss, gwg in COMBOS:
        loss_mod = ClipLoss(
            local_loss=local_loss, gather_with_grad=gwg, cache_labels=True, rank=rank, world_size=world
        )
        out[("clip", local_loss, gwg)] = grads_of(loss_mod, img, txt, scale)
        # second call: cached labels must give the same value
        out[("clip_again", local_loss, gwg)] = loss_mod(img, txt, scale).detach()
    if world == 2:
        clip = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        out["clip_bias"] = grads_of(clip, img, txt, scale, bias)
        out["siglip"] = grads_of(SigLipLoss(rank=rank, world_size=world), img, txt, scale, bias)
        au = AlignUniformLoss(rank=rank, world_size=world, align_weight=0.5, uniform_weight=2.0)
        out["align_uniform"] = grads_of(au, img, txt)
        out["align_uniform_terms"] = dict(au.last_terms)
        factory = build_loss("clip", rank=rank, world_size=world)
        out["factory_clip"] = grads_of(factory, img, txt, scale)
        for local_loss, gwg in COMBOS:  # the kernels' dispatch (torch fallback on CPU, fp64)
            tri = ClipLoss(
                local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=world, backend="triton"
            )
            out[("triton", local_loss, gwg)] = grads_of(tri, img, txt, scale)
    return out


def _rank_triton_interpreted(rank, world, img_all, txt_all):
    """torch vs triton backend in fp32 with the Triton interpreter really running the kernels."""
    from kernels.runtime import interpreting

    assert interpreting(), "TRITON_INTERPRET=1 did not activate the Triton interpreter"
    rows = slice(rank * B, (rank + 1) * B)
    img, txt = img_all[rows].float(), txt_all[rows].float()
    scale = torch.tensor(SCALE)
    out = {}
    for local_loss, gwg in COMBOS:
        for backend in ("torch", "triton"):
            mod = ClipLoss(
                local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=world, backend=backend
            )
            out[(backend, local_loss, gwg)] = grads_of(mod, img, txt, scale)
    return out


@functools.cache
def spawn_once(world):
    """(world, img, txt, per-rank results): one spawn per world size for the whole module."""
    img, txt = make_batch(world)
    # The interpreter off: these workers check the dispatch through the kernels' torch fallback
    # (fp64, exact); the interpreted kernels are covered by test_clip_triton_kernels_interpreted_world2.
    return world, img, txt, run_distributed(_rank_results, world, img, txt, env={"TRITON_INTERPRET": "0"})


def _slice(x, r):
    return x[r * B : (r + 1) * B]


def test_clip_world1_matches_reference():
    img, txt = make_batch(1)
    for local_loss, gwg in COMBOS:  # flags are no-ops on one rank
        mod = ClipLoss(local_loss=local_loss, gather_with_grad=gwg, cache_labels=True)
        got, got_g = grads_of(mod, img, txt, torch.tensor(SCALE, dtype=torch.float64))
        ref, ref_g = grads_of(clip_reference, img, txt, torch.tensor(SCALE, dtype=torch.float64))
        torch.testing.assert_close(got, ref, **TOL)
        for a, b in zip(got_g, ref_g):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("world_size", [2, 4])
def test_clip_distributed_matches_global_batch(world_size):
    world, img, txt, res = spawn_once(world_size)
    s = torch.tensor(SCALE, dtype=torch.float64)
    glob, (g_img, g_txt, g_s) = grads_of(clip_reference, img, txt, s)
    for local_loss, gwg in COMBOS:
        per_rank = [res[r][("clip", local_loss, gwg)] for r in range(world)]
        losses = torch.stack([p[0] for p in per_rank])
        torch.testing.assert_close(losses.mean(), glob, **TOL)
        torch.testing.assert_close(torch.stack([p[1][2] for p in per_rank]).mean(), g_s, **TOL)
        for r, (loss, (gi, gt, _)) in enumerate(per_rank):
            torch.testing.assert_close(res[r][("clip_again", local_loss, gwg)], loss, **TOL)
            if local_loss:
                ref_loss, ref_g = grads_of(
                    lambda i, t, sc: clip_local_detached_reference(i, t, sc, r), img, txt, s
                )
                torch.testing.assert_close(loss, ref_loss, **TOL)
            else:
                torch.testing.assert_close(loss, glob, **TOL)
            if gwg:  # DDP average of W ranks' summed gradients == global gradient
                torch.testing.assert_close(gi / world, _slice(g_img, r), **TOL)
                torch.testing.assert_close(gt / world, _slice(g_txt, r), **TOL)
            elif not local_loss:  # own loss, own slice: exact gradient of L
                torch.testing.assert_close(gi, _slice(g_img, r), **TOL)
                torch.testing.assert_close(gt, _slice(g_txt, r), **TOL)
            else:  # open_clip semantics: keys are constants
                torch.testing.assert_close(gi, _slice(ref_g[0], r), **TOL)
                torch.testing.assert_close(gt, _slice(ref_g[1], r), **TOL)
                # ... which really is a different gradient from the exact one
                assert not torch.allclose(gi / world, _slice(g_img, r))


def _check_avg(world, per_rank, glob, glob_grads, n_features=2):
    """mean loss == global; feature grads / W == global slice; scalar grads averaged == global."""
    torch.testing.assert_close(torch.stack([p[0] for p in per_rank]).mean(), glob, **TOL)
    for r, (_, grads) in enumerate(per_rank):
        for g, ref in zip(grads[:n_features], glob_grads[:n_features]):
            torch.testing.assert_close(g / world, _slice(ref, r), **TOL)
    for k in range(n_features, len(glob_grads)):
        avg = torch.stack([p[1][k] for p in per_rank]).mean()
        torch.testing.assert_close(avg, glob_grads[k], **TOL)


def test_clip_bias_and_factory():
    world, img, txt, res = spawn_once(2)
    s, b = torch.tensor(SCALE, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64)
    glob, grads = grads_of(clip_reference, img, txt, s, b)
    _check_avg(world, [res[r]["clip_bias"] for r in range(world)], glob, grads)
    glob, grads = grads_of(clip_reference, img, txt, s)
    _check_avg(world, [res[r]["factory_clip"] for r in range(world)], glob, grads)


def test_siglip_world1_and_distributed():
    world, img, txt, res = spawn_once(2)
    s, b = torch.tensor(SCALE, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64)
    glob, grads = grads_of(SigLipLoss(), img, txt, s, b)
    ref, ref_grads = grads_of(siglip_reference, img, txt, s, b)
    torch.testing.assert_close(glob, ref, **TOL)
    for a, c in zip(grads, ref_grads):
        torch.testing.assert_close(a, c, **TOL)
    per_rank = [res[r]["siglip"] for r in range(world)]
    for r in range(world):  # open_clip's per-rank value (local pairs + remote negatives)
        torch.testing.assert_close(per_rank[r][0], siglip_reference(img, txt, s, b, r, world), **TOL)
    _check_avg(world, per_rank, glob, grads)


def test_align_uniform_world1_and_distributed():
    world, img, txt, res = spawn_once(2)
    mod = AlignUniformLoss(align_weight=0.5, uniform_weight=2.0)
    glob, grads = grads_of(mod, img, txt)
    align, uniform = align_uniform_reference(img, txt)
    torch.testing.assert_close(glob, 0.5 * align + 2.0 * uniform, **TOL)
    # device tensors, read on the host only when the trainer logs (no sync at every micro-batch)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in mod.last_terms.values())
    terms = {k: float(v) for k, v in mod.last_terms.items()}
    assert terms == pytest.approx({"align": float(align), "uniform": float(uniform)}, rel=1e-9)
    _, ref_grads = grads_of(
        lambda i, t: 0.5 * align_uniform_reference(i, t)[0] + 2.0 * align_uniform_reference(i, t)[1], img, txt
    )
    for a, c in zip(grads, ref_grads):
        torch.testing.assert_close(a, c, **TOL)
    _check_avg(world, [res[r]["align_uniform"] for r in range(world)], glob, grads)
    for r in range(world):  # global terms, identical on every rank
        assert {k: float(v) for k, v in res[r]["align_uniform_terms"].items()} == pytest.approx(
            terms, rel=1e-9
        )


def test_uniformity_pushes_apart():
    """Sanity of the sign: spread-out features have lower (better) uniformity than clumped ones."""
    img, txt = make_batch(4)
    clumped = F.normalize(torch.ones_like(img) + 0.05 * img, dim=1)
    mod = AlignUniformLoss()
    mod(img, img)
    spread = mod.last_terms["uniform"]
    mod(clumped, clumped)
    assert spread < mod.last_terms["uniform"]
    assert mod.last_terms["align"] == 0.0


def _rank_maybe_fail(rank, world, fail_rank):
    import torch.distributed as dist

    assert dist.get_rank() == rank and dist.get_world_size() == world
    if rank == fail_rank:
        raise RuntimeError(f"boom on rank {rank}")
    return {"rank": rank, "t": torch.full((2,), float(rank))}


def test_run_distributed_results_by_rank_and_worker_errors():
    res = run_distributed(_rank_maybe_fail, 2, -1)
    assert [r["rank"] for r in res] == [0, 1] and res[1]["t"].tolist() == [1.0, 1.0]
    with pytest.raises(Exception, match="boom on rank 1"):
        run_distributed(_rank_maybe_fail, 2, 1)


# -- errors ----------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    img, txt = make_batch(1)
    s = torch.tensor(SCALE, dtype=torch.float64)
    with pytest.raises(ValueError, match="torch, triton, auto"):
        ClipLoss(backend="cuda")
    with pytest.raises(ValueError, match="clip, siglip, align_uniform"):
        build_loss("infonce", rank=0, world_size=1)
    with pytest.raises(ValueError, match="only a torch implementation"):
        build_loss("align_uniform", rank=0, world_size=1, backend="triton")
    with pytest.raises(ValueError, match="logit_bias"):
        ClipLoss(backend="triton")(img, txt, s, torch.tensor(0.0))
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(img, txt, s, None)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="shift")
    with pytest.raises(ValueError, match="bidir=True and dist_impl"):
        SigLipLoss(dist_impl="gather", bidir=True)
    with pytest.raises(ValueError, match="rank"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(RuntimeError, match="not initialised"):
        ClipLoss(rank=0, world_size=2)(img, txt, s)


def test_factory_builds_each_loss_with_last_terms():
    for name, cls in (("clip", ClipLoss), ("siglip", SigLipLoss), ("align_uniform", AlignUniformLoss)):
        loss = build_loss(name, rank=0, world_size=1)
        assert isinstance(loss, cls) and isinstance(loss.last_terms, dict)
    assert build_loss("clip", rank=0, world_size=1).local_loss is True
    # "auto" on CPU features is the torch path (so a logit_bias is fine)
    img, txt = make_batch(1)
    s, bias = torch.tensor(SCALE, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64)
    torch.testing.assert_close(
        ClipLoss(backend="auto")(img, txt, s, bias), clip_reference(img, txt, s, bias), **TOL
    )


def test_clip_triton_backend_dispatch_matches_torch():
    """backend="triton" wires rank offsets and gathers into kernels.* the same way (CPU fallback)."""
    world, _, _, res = spawn_once(2)
    for r, (local_loss, gwg) in itertools.product(range(world), COMBOS):
        got, want = res[r][("triton", local_loss, gwg)], res[r][("clip", local_loss, gwg)]
        torch.testing.assert_close(got[0], want[0], **TOL)
        for a, c in zip(got[1], want[1]):
            torch.testing.assert_close(a, c, **TOL)


def test_clip_triton_kernels_interpreted_world2():
    """The real Triton kernels (CPU interpreter) inside the distributed ClipLoss, fp32."""
    pytest.importorskip("triton")
    img, txt = make_batch(2)
    res = run_distributed(_rank_triton_interpreted, 2, img, txt, env={"TRITON_INTERPRET": "1"})
    for r, (local_loss, gwg) in itertools.product(range(2), COMBOS):
        got, want = res[r][("triton", local_loss, gwg)], res[r][("torch", local_loss, gwg)]
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        for a, c in zip(got[1], want[1]):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_triton_backend_matches_torch_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    kernels = pytest.importorskip("kernels")
    img, txt = (x.float().cuda() for x in make_batch(2))
    s = torch.tensor(SCALE, device="cuda")
    ref, ref_g = grads_of(ClipLoss(backend="torch"), img, txt, s)
    got, got_g = grads_of(ClipLoss(backend="triton"), img, txt, s)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for a, c in zip(got_g, ref_g):
        torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-4)
    assert hasattr(kernels, "clip_loss")
