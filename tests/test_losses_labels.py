"""Multi-positive labels and SigLIP's neighbour exchange, against plain references (fp64).

Labels in the three accepted forms (class ids [N], id sets [N, T] padded with -1 whose width
differs per rank, multi-hot [N, L]) are checked at world 1, 2 and 4 on real gloo process groups:
* ClipLoss, every (local_loss, gather_with_grad): the same per-rank criteria as test_losses.py
  (mean over ranks == the one-process loss, feature grads / W == its slice; open_clip's
  detached-keys semantics for local_loss without gather_with_grad).
* SigLipLoss, gather and bidir: each rank's loss is its rows against all texts with +1 on every
  positive; mean == global, grads / W == global slice.
* bidir without labels: same values and gradients as the gathered form to 1e-9.
One spawn per world size. Expected runtime: ~20 s on 2 CPU cores.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from spawn_scenarios import results_by_rank, run_in_turn

from vutrain.losses import ClipLoss, SigLipLoss
from vutrain.losses.positives import positive_mask

from helpers_dist import run_distributed

B, D = 3, 8
SCALE, BIAS = 7.0, -2.0
TOL = dict(rtol=1e-9, atol=1e-11)
COMBOS = list(itertools.product((False, True), (False, True)))  # (local_loss, gather_with_grad)
KINDS = ("class", "idset", "multihot")


# -- labels and plain references ----------------------------------------------------------------


def make_labels(kind: str, world: int) -> list[torch.Tensor]:
    """Per-rank labels. Classes 0..2 with an unlabelled -1; id sets of rank-dependent width."""
    n = world * B
    g = torch.Generator().manual_seed(1)
    if kind == "class":
        lab = torch.randint(0, 3, (n,), generator=g)
        lab[1] = -1  # unlabelled: a positive of itself only
        return list(lab.split(B))
    if kind == "multihot":
        lab = torch.rand(n, 4, generator=g) < 0.4
        lab[0] = False  # no tag at all
        return list(lab.split(B))
    parts = []
    for r in range(world):  # rank r uses width r + 1; ids drawn from a small pool so sets overlap
        ids = torch.randint(100, 106, (B, r + 1), generator=g)
        ids[0, -1] = -1
        parts.append(ids)
    return parts


def label_sets(parts: list[torch.Tensor]) -> list[set]:
    out = []
    for lab in parts:
        for row in lab:
            if lab.dtype == torch.bool:
                out.append({i for i, v in enumerate(row.tolist()) if v})
            elif lab.dim() == 1:
                out.append({int(row)} if int(row) >= 0 else set())
            else:
                out.append({int(v) for v in row.tolist() if v >= 0})
    return out


def pos_matrix(sets: list[set]) -> torch.Tensor:
    n = len(sets)
    return torch.tensor(
        [[float(i == j or bool(sets[i] & sets[j])) for j in range(n)] for i in range(n)], dtype=torch.float64
    )


def clip_multi_reference(img, txt, scale, pos, rows=None, detach_keys=False):
    """Soft-target CE both directions over `rows` (default all), uniform over each row's positives."""
    rows = slice(None) if rows is None else rows
    keys_t, keys_i = (txt.detach(), img.detach()) if detach_keys else (txt, img)
    target = (pos / pos.sum(1, keepdim=True))[rows]
    per_image = scale * img[rows] @ keys_t.T
    per_text = scale * txt[rows] @ keys_i.T
    ce = lambda lg: -(target * F.log_softmax(lg, dim=1)).sum(1).mean()  # noqa: E731
    return (ce(per_image) + ce(per_text)) / 2


def siglip_multi_reference(img, txt, scale, bias, pos, rows=None):
    rows = slice(None) if rows is None else rows
    logits = scale * img[rows] @ txt.T + bias
    return -F.logsigmoid((2 * pos[rows] - 1) * logits).sum() / logits.shape[0]


def make_batch(world, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + 0.8 * torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=1)
    return img, txt


def grads_of(loss_fn, *xs, **kw):
    args = [x.detach().clone().requires_grad_(True) for x in xs]
    loss = loss_fn(*args, **kw)
    loss.backward()
    return loss.detach(), [a.grad for a in args]


def _slice(x, r):
    return x[r * B : (r + 1) * B]


# -- per-rank worker ------------------------------------------------------------------------------


def _rank_results(rank, world, img_all, txt_all, labels_by_kind):
    torch.set_default_dtype(torch.float64)
    img, txt = _slice(img_all, rank), _slice(txt_all, rank)
    scale, bias = torch.tensor(SCALE), torch.tensor(BIAS)
    out = {}
    for kind in KINDS:
        lab = labels_by_kind[kind][rank]
        for local_loss, gwg in COMBOS:
            mod = ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=world)
            out[("clip", kind, local_loss, gwg)] = grads_of(mod, img, txt, scale, labels=lab)
        for bidir in (False, True):
            mod = SigLipLoss(rank=rank, world_size=world, bidir=bidir)
            out[("siglip", kind, bidir)] = grads_of(mod, img, txt, scale, bias, labels=lab)
    for bidir in (False, True):
        out[("siglip", None, bidir)] = grads_of(
            SigLipLoss(rank=rank, world_size=world, bidir=bidir), img, txt, scale, bias
        )
    return out


def _rank_runs(rank, world, img_all, txt_all, labels_by_kind):
    """This rank's runs on the module's batch: {"labels": _rank_results, and at world 4
    "strided": _rank_siglip_strided_texts}, or the traceback of the first that raised (later ones
    are not run: the ranks may be out of step after it)."""
    runs = {"labels": lambda: _rank_results(rank, world, img_all, txt_all, labels_by_kind)}
    if world == 4:  # world 4 runs both ring exchanges: one spawn of 4 ranks paid ~30 s of imports
        runs["strided"] = lambda: _rank_siglip_strided_texts(rank, world, img_all, txt_all)
    return run_in_turn(runs, lambda name: runs[name]())


@functools.cache
def spawn_once(world):
    img, txt = make_batch(world)
    labels = {k: make_labels(k, world) for k in KINDS}
    res = run_distributed(_rank_runs, world, img, txt, labels, env={"TRITON_INTERPRET": "0"})
    return img, txt, labels, res


def rank_results(world, name):
    """Run `name`'s results by rank from `spawn_once(world)`; a run that raised (or was not
    reached) fails the test with the rank's traceback."""
    return results_by_rank(spawn_once(world)[3], name)


# One worker of pytest-xdist runs them all: each world size's ranks are spawned once per process.
pytestmark = pytest.mark.xdist_group("losses_labels")


# -- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_world1_matches_reference(kind):
    img, txt = make_batch(2)  # 6 rows on one rank
    lab = torch.cat(make_labels(kind, 2)) if kind != "idset" else make_labels(kind, 1)[0].repeat(2, 1)
    pos = pos_matrix(label_sets([lab]))
    assert 0 < pos.sum() - pos.diagonal().sum()  # some off-diagonal positives, or the test is moot
    s, b = torch.tensor(SCALE, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64)
    got, got_g = grads_of(ClipLoss(), img, txt, s, labels=lab)
    ref, ref_g = grads_of(lambda i, t, sc: clip_multi_reference(i, t, sc, pos), img, txt, s)
    torch.testing.assert_close(got, ref, **TOL)
    for a, c in zip(got_g, ref_g):
        torch.testing.assert_close(a, c, **TOL)
    got, got_g = grads_of(SigLipLoss(), img, txt, s, b, labels=lab)
    ref, ref_g = grads_of(lambda *a: siglip_multi_reference(*a, pos), img, txt, s, b)
    torch.testing.assert_close(got, ref, **TOL)
    for a, c in zip(got_g, ref_g):
        torch.testing.assert_close(a, c, **TOL)


def test_distinct_labels_equal_the_plain_loss_and_labels_change_it():
    img, txt = make_batch(2)
    s, b = torch.tensor(SCALE, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64)
    distinct = torch.arange(img.shape[0])
    assert ClipLoss()(img, txt, s, labels=distinct).item() == pytest.approx(
        ClipLoss()(img, txt, s).item(), rel=1e-12
    )
    assert SigLipLoss()(img, txt, s, b, labels=distinct).item() == pytest.approx(
        SigLipLoss()(img, txt, s, b).item(), rel=1e-12
    )
    same = torch.zeros(img.shape[0], dtype=torch.long)  # all one class: every pair positive
    assert abs(ClipLoss()(img, txt, s, labels=same).item() - ClipLoss()(img, txt, s).item()) > 1e-3


def test_positive_mask_forms_and_self():
    ids = torch.tensor([[5, -1], [7, 5], [-1, -1]])
    assert positive_mask(ids, ids).tolist() == [
        [True, True, False],
        [True, True, False],
        [False, False, True],
    ]
    assert positive_mask(torch.tensor([-1, -1]), torch.tensor([-1, -1])).tolist() == [
        [True, False],
        [False, True],
    ]
    hot = torch.tensor([[True, False], [True, True]])
    assert positive_mask(hot[:1], hot, offset=None).tolist() == [[True, True]]


@pytest.mark.parametrize(
    "backend,width_device",
    [("cpu:gloo,cuda:nccl", "cpu"), ("gloo", "cpu"), ("nccl", "meta"), ("cuda:gloo", "meta")],
)
def test_id_set_width_is_agreed_on_the_host_when_the_group_can(monkeypatch, backend, width_device):
    """Id sets of device labels (the meta device stands in for a GPU) are padded to the widest T
    of all ranks. Making that width on the device and reading it back cost two waits for the GPU
    queue per micro-batch; a group with a CPU backend agrees on it between hosts, a CUDA-only
    group (which refuses CPU tensors) still gets a device tensor."""
    import torch.distributed as dist

    from vutrain.losses.positives import gather_labels

    seen = []

    def all_reduce(t, op=None):
        seen.append(t.device.type)
        if t.device.type == "cpu":
            t.fill_(5)  # another rank's labels are wider

    def all_gather(parts, x):
        seen.append(x.device.type)

    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    labels = torch.zeros(3, 2, dtype=torch.long, device="meta")
    if width_device == "meta":  # a device width is read back on the host: a meta tensor cannot be
        with pytest.raises((NotImplementedError, RuntimeError)):
            gather_labels(labels, 2)
        assert seen == ["meta"]
        return
    out = gather_labels(labels, 2)
    assert seen == ["cpu", "meta"]  # the width on the host, the labels on their device
    assert out.device.type == "meta" and out.shape == (6, 5)


@pytest.mark.parametrize(
    "backend,device,sends",
    [
        ("cpu:gloo,cuda:nccl", "cuda", True),
        ("nccl", "cuda", True),
        ("cuda:gloo", "cuda", False),  # two ranks on one GPU (README): gloo reads a device pointer
        ("gloo", "cuda", False),
        ("gloo", "cpu", True),
    ],
)
def test_p2p_supported_only_where_the_backend_sends_the_device(monkeypatch, backend, device, sends):
    import torch.distributed as dist

    from vutrain.losses.exchange import p2p_supported

    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    assert p2p_supported(torch.device(device)) is sends


def test_siglip_bidir_gathers_where_the_group_cannot_send(monkeypatch, caplog):
    """bidir on a group without point-to-point for the features' device (gloo with CUDA tensors)
    takes the all-gather, which gives the same values; the ring exchange handed CUDA tensors to
    gloo's send. World 2 in one process: the collectives are stand-ins (rank 1 mirrors rank 0)."""
    from vutrain.losses import siglip

    def no_exchange(*args):
        raise AssertionError("neighbour exchange on a group that cannot send this device")

    monkeypatch.setattr(siglip, "check_group", lambda rank, world: None)

    def two_ranks(x, check_shapes=True):  # a stand-in gather: one process has no shapes to agree
        return torch.cat([x, x.flip(0)])

    monkeypatch.setattr(siglip, "all_gather_with_grad", two_ranks)
    monkeypatch.setattr(siglip, "neighbour_exchange_bidir", no_exchange)
    monkeypatch.setattr(siglip, "neighbour_exchange", no_exchange)
    monkeypatch.setattr(siglip, "p2p_supported", lambda device: False)
    g = torch.Generator().manual_seed(0)
    img, txt = (F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1) for _ in "it")
    s, b = torch.tensor(SCALE, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="vutrain.losses.siglip"):
        got = SigLipLoss(rank=0, world_size=2, bidir=True)(img, txt, s, b)
    want = SigLipLoss(rank=0, world_size=2)(img, txt, s, b)
    torch.testing.assert_close(got, want, **TOL)
    assert "all-gathering the texts instead" in caplog.text


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_clip_labels_distributed(world, kind):
    img, txt, labels, _ = spawn_once(world)
    res = rank_results(world, "labels")
    pos = pos_matrix(label_sets(labels[kind]))
    s = torch.tensor(SCALE, dtype=torch.float64)
    glob, (g_img, g_txt, g_s) = grads_of(lambda i, t, sc: clip_multi_reference(i, t, sc, pos), img, txt, s)
    for local_loss, gwg in COMBOS:
        per_rank = [res[r][("clip", kind, local_loss, gwg)] for r in range(world)]
        torch.testing.assert_close(torch.stack([p[0] for p in per_rank]).mean(), glob, **TOL)
        torch.testing.assert_close(torch.stack([p[1][2] for p in per_rank]).mean(), g_s, **TOL)
        for r, (loss, (gi, gt, _)) in enumerate(per_rank):
            rows = slice(r * B, (r + 1) * B)
            if local_loss:
                ref, ref_g = grads_of(
                    lambda i, t, sc: clip_multi_reference(i, t, sc, pos, rows, detach_keys=not gwg),
                    img,
                    txt,
                    s,
                )
                torch.testing.assert_close(loss, ref, **TOL)
            else:
                torch.testing.assert_close(loss, glob, **TOL)
            if gwg:
                torch.testing.assert_close(gi / world, _slice(g_img, r), **TOL)
                torch.testing.assert_close(gt / world, _slice(g_txt, r), **TOL)
            elif not local_loss:
                torch.testing.assert_close(gi, _slice(g_img, r), **TOL)
                torch.testing.assert_close(gt, _slice(g_txt, r), **TOL)
            else:
                torch.testing.assert_close(gi, _slice(ref_g[0], r), **TOL)
                torch.testing.assert_close(gt, _slice(ref_g[1], r), **TOL)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", (*KINDS, None))
def test_siglip_gather_and_bidir_distributed(world, kind):
    img, txt, labels, _ = spawn_once(world)
    res = rank_results(world, "labels")
    pos = pos_matrix(label_sets(labels[kind])) if kind else torch.eye(world * B, dtype=torch.float64)
    s, b = torch.tensor(SCALE, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64)
    glob, grads = grads_of(lambda *a: siglip_multi_reference(*a, pos), img, txt, s, b)
    for bidir in (False, True):
        per_rank = [res[r][("siglip", kind, bidir)] for r in range(world)]
        torch.testing.assert_close(torch.stack([p[0] for p in per_rank]).mean(), glob, **TOL)
        for k in (2, 3):  # scale and bias: averaged over ranks
            torch.testing.assert_close(torch.stack([p[1][k] for p in per_rank]).mean(), grads[k], **TOL)
        for r, (loss, g) in enumerate(per_rank):
            rows = slice(r * B, (r + 1) * B)
            torch.testing.assert_close(loss, siglip_multi_reference(img, txt, s, b, pos, rows), **TOL)
            torch.testing.assert_close(g[0] / world, _slice(grads[0], r), **TOL)
            torch.testing.assert_close(g[1] / world, _slice(grads[1], r), **TOL)
            gathered = res[r][("siglip", kind, False)]
            if bidir:  # the ring gives the gathered form's values and gradients
                torch.testing.assert_close(loss, gathered[0], **TOL)
                for a, c in zip(g, gathered[1]):
                    torch.testing.assert_close(a, c, **TOL)


def _rank_siglip_strided_texts(rank, world, img_all, txt_all):
    """bidir and gather on text features with transposed strides (same values), id-set labels."""
    torch.set_default_dtype(torch.float64)
    img, txt = _slice(img_all, rank), _slice(txt_all, rank).T.contiguous().T
    assert not txt.is_contiguous()
    lab = make_labels("idset", world)[rank]
    s, b = torch.tensor(SCALE), torch.tensor(BIAS)
    return {
        bidir: grads_of(SigLipLoss(rank=rank, world_size=world, bidir=bidir), img, txt, s, b, labels=lab)
        for bidir in (False, True)
    }


def test_siglip_bidir_takes_non_contiguous_features():
    """Features the gather accepts (a transposed view) also go around the ring: the receive
    buffers were made with empty_like, which kept the strides, and recv raised "input tensor has
    to be contiguous". World 4 runs both exchanges (the bidirectional one and the last hop)."""
    res = rank_results(4, "strided")  # on the batch of make_batch(4), in spawn_once(4)'s ranks
    for r in range(4):
        gathered, ring = res[r][False], res[r][True]
        torch.testing.assert_close(ring[0], gathered[0], **TOL)
        for a, c in zip(ring[1], gathered[1]):
            torch.testing.assert_close(a, c, **TOL)


def test_triton_backend_rejects_labels_clearly():
    img, txt = make_batch(1)
    s, b = torch.tensor(SCALE, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64)
    with pytest.raises(ValueError, match="multi-positive labels"):
        ClipLoss(backend="triton")(img, txt, s, labels=torch.arange(B))
    with pytest.raises(ValueError, match="multi-positive labels"):
        SigLipLoss(backend="triton")(img, txt, s, b, labels=torch.arange(B))
    with pytest.raises(ValueError, match="LongTensor"):
        ClipLoss()(img, txt, s, labels=torch.zeros(B))  # float labels
    with pytest.raises(ValueError, match="rows"):
        ClipLoss()(img, txt, s, labels=torch.arange(B + 1))
    with pytest.raises(ValueError, match="bidir"):
        SigLipLoss(backend="triton", bidir=True)


# -- SigLIP on the Triton kernel (kernels.sigmoid_loss, written on another branch) -----------------


def _has_sigmoid_kernel() -> bool:
    try:
        import kernels
    except ImportError:
        return False
    return hasattr(kernels, "sigmoid_loss")


def test_siglip_triton_without_kernel_fails_clearly():
    if _has_sigmoid_kernel():
        pytest.skip("kernels.sigmoid_loss exists; the parity tests below cover it")
    img, txt = make_batch(1)
    s, b = torch.tensor(SCALE, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64)
    with pytest.raises((NotImplementedError, ImportError), match="sigmoid_loss|kernels"):
        SigLipLoss(backend="triton")(img, txt, s, b)


def _rank_siglip_triton(rank, world, img_all, txt_all):
    img, txt = _slice(img_all, rank).float(), _slice(txt_all, rank).float()
    scale, bias = torch.tensor(SCALE), torch.tensor(BIAS)
    return {
        backend: grads_of(SigLipLoss(rank=rank, world_size=world, backend=backend), img, txt, scale, bias)
        for backend in ("torch", "triton")
    }


@pytest.mark.parametrize("world", [1, 2])
def test_siglip_triton_matches_torch(world):
    """SigLipLoss(backend="triton") == torch (fp32; rank offsets at world 2), interpreter on CPU."""
    if not _has_sigmoid_kernel():
        pytest.skip("kernels.sigmoid_loss is not on this branch yet")
    img, txt = make_batch(world)
    if world == 1:
        res = [_rank_siglip_triton(0, 1, img, txt)]
    else:
        res = run_distributed(_rank_siglip_triton, world, img, txt)
    for r in res:
        torch.testing.assert_close(r["triton"][0], r["torch"][0], rtol=1e-5, atol=1e-6)
        for a, c in zip(r["triton"][1], r["torch"][1]):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
