"""Two ranks on ONE GPU through torchrun, with a process group that has no CPU backend.

`VUTRAIN_DIST_BACKEND=cuda:gloo` behaves like NCCL for this purpose (a CPU tensor handed to a
collective fails: "No backend type associated with device type cpu") but, unlike NCCL, lets two
ranks share one GPU; `VUTRAIN_DEVICE=cuda:0` puts both ranks there. Per ZeRO stage (1, 2, 3), with
LoRA: train 4 steps with an eval and a checkpoint every 2 steps, then resume to step 6 from the
step-4 checkpoint (the three stages side by side). Every collective of training, eval and
checkpointing must run on CUDA tensors.
Before the GPU-path change rank 1 fell back to the CPU with another backend than rank 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import train_runner as tr


def test_device_and_backend_resolution_and_overrides():
    """CPU-side: the defaults per device and the VUTRAIN_DEVICE / VUTRAIN_DIST_BACKEND overrides."""
    from vutrain.distributed import CUDA_BACKEND, deepspeed_env, resolve_device, resolve_dist_env

    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    if not torch.cuda.is_available():
        assert resolve_device(1, env) == ("cpu", "gloo")
    assert resolve_device(1, dict(env, VUTRAIN_DEVICE="cuda:0")) == ("cuda:0", CUDA_BACKEND)
    assert resolve_device(1, dict(env, VUTRAIN_DEVICE="cuda")) == ("cuda:1", CUDA_BACKEND)
    shared = dict(env, VUTRAIN_DEVICE="cuda:0", VUTRAIN_DIST_BACKEND="cuda:gloo")
    info = resolve_dist_env(shared)
    assert (info.rank, info.device, info.backend) == (1, "cuda:0", "cuda:gloo")
    # DeepSpeed reads LOCAL_RANK as the GPU index (ZeRO-3 places parameters by it): the device's.
    assert deepspeed_env(info)["LOCAL_RANK"] == "0"
    assert deepspeed_env(resolve_dist_env(dict(env, VUTRAIN_DEVICE="cpu")))["LOCAL_RANK"] == "1"
    with pytest.raises(RuntimeError, match="has no CUDA backend"):
        resolve_device(0, dict(env, VUTRAIN_DEVICE="cuda:0", VUTRAIN_DIST_BACKEND="cpu:gloo"))
    with pytest.raises(RuntimeError, match="is not a device"):
        resolve_device(0, dict(env, VUTRAIN_DEVICE="gpu0"))
    # One GPU named for every rank of the node: NCCL refuses two ranks on one GPU, so say so now.
    with pytest.raises(RuntimeError, match="NCCL refuses: set VUTRAIN_DIST_BACKEND=cuda:gloo"):
        resolve_device(1, dict(env, VUTRAIN_DEVICE="cuda:0"), local_world_size=2)
    assert resolve_device(1, dict(env, VUTRAIN_DEVICE="cuda"), local_world_size=2)[0] == "cuda:1"


@pytest.mark.parametrize(
    "backend,cpu,cuda",
    [
        ("cpu:gloo,cuda:nccl", "gloo", "nccl"),  # the default on CUDA
        ("nccl", None, "nccl"),  # NCCL takes CUDA tensors only
        ("cuda:gloo", None, "gloo"),  # two ranks on one GPU: no CPU backend, like NCCL
        ("gloo", "gloo", "gloo"),
    ],
)
def test_collective_backend_per_device_type(monkeypatch, backend, cpu, cuda):
    """The one reading of the group's backend string that the engine (reduce-scatter or not), the
    gather's backward, the tag-label width and the barrier share."""
    import torch.distributed as dist

    from vutrain.distributed import collective_backend

    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    assert (collective_backend("cpu"), collective_backend("cuda")) == (cpu, cuda)


def test_default_device_follows_the_gpus_this_process_sees(monkeypatch):
    """SLURM --gpus-per-task shows each rank one GPU while SLURM_LOCALID counts up: local rank 3
    seeing one GPU is on cuda:0, not on the CPU with another backend than its peers."""
    from vutrain.distributed import CUDA_BACKEND, resolve_device

    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    for gpus, want in [(0, ("cpu", "gloo")), (1, ("cuda:0", CUDA_BACKEND)), (8, ("cuda:3", CUDA_BACKEND))]:
        monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
        assert resolve_device(3, env, local_world_size=4) == want
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match="sees only 2 GPUs"):
        resolve_device(3, env, local_world_size=4)


def test_shared_gpu_message_names_the_ranks_that_share_a_gpu():
    """What the ranks conclude from each other's (host, device, GPU UUID) at start-up."""
    from vutrain.distributed import shared_gpu_message

    own = [("node0", "cuda:0", "GPU-a"), ("node0", "cuda:1", "GPU-b")]
    assert shared_gpu_message(own) is None
    # SLURM --gpus-per-task: every rank on cuda:0, each its own GPU.
    assert shared_gpu_message([("n0", "cuda:0", "GPU-a"), ("n0", "cuda:0", "GPU-b")]) is None
    assert shared_gpu_message([("n0", "cuda:0", None), ("n0", "cuda:0", None)]) is None  # no UUID: no verdict
    # torchrun --nproc_per_node 2 on a second node that has one GPU.
    owners = own + [("node1", "cuda:0", "GPU-c"), ("node1", "cuda:0", "GPU-c")]
    message = shared_gpu_message(owners)
    assert message.startswith("ranks 2 and 3 on node1 both run on one GPU (cuda:0 and cuda:0, UUID GPU-c;")
    assert "2 ranks in all" in message and "VUTRAIN_DIST_BACKEND=cuda:gloo" in message


def _compare_gpus(rank: int, world: int, uuids: list) -> str | None:
    """A rank of a gloo group that believes it runs NCCL on cuda:0 with GPU `uuids[rank]`."""
    import dataclasses

    from vutrain.distributed import CUDA_BACKEND, SharedGPUError, refuse_shared_gpus, resolve_dist_env

    info = dataclasses.replace(resolve_dist_env(), device="cuda:0", backend=CUDA_BACKEND)
    try:
        refuse_shared_gpus(info, uuid_of=lambda device: uuids[rank])
    except SharedGPUError as exc:
        return str(exc)
    return None


@pytest.mark.slow  # spawns 2 rank processes
def test_every_rank_refuses_a_gpu_shared_under_nccl():
    """The comparison runs over the group's CPU backend, and every rank reaches the same verdict
    (so rank 0 alone may print it and none goes on to wait in a collective)."""
    from helpers_dist import run_distributed

    shared = run_distributed(_compare_gpus, 2, ["GPU-a", "GPU-a"])
    assert shared[0] == shared[1] and "ranks 0 and 1 on " in shared[0]
    assert run_distributed(_compare_gpus, 2, ["GPU-a", "GPU-b"]) == [None, None]


STAGES = (1, 2, 3)
GROUP_ENV = {"VUTRAIN_DIST_BACKEND": "cuda:gloo", "VUTRAIN_DEVICE": "cuda:0"}


def _launch(overrides: list[str], log_dir, group_env: dict = GROUP_ENV) -> tuple[subprocess.Popen, list]:
    """torchrun (as `python -m torch.distributed.run`: the GPU host may not put it next to python).
    Output goes to files: three runs side by side must not stall on a full pipe nobody reads."""
    env = dict(tr.env(), **group_env)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(tr.free_port()),
        tr.TRAIN,
        "--config",
        tr.TINY,
        *overrides,
    ]
    logs = [open(log_dir / name, "w+") for name in ("stdout.txt", "stderr.txt")]
    return subprocess.Popen(cmd, stdout=logs[0], stderr=logs[1], text=True, env=env, cwd=tr.REPO), logs


def _finish(launched: tuple[subprocess.Popen, list]) -> subprocess.CompletedProcess:
    proc, logs = launched
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out = []
    for log in logs:
        log.seek(0)
        out.append(log.read())
        log.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, *out)


@pytest.fixture(scope="module")
def stage_runs(synthetic_shards, tmp_path_factory):
    return run_stages(synthetic_shards, tmp_path_factory)


def run_stages(synthetic_shards, tmp_path_factory) -> dict:
    """{stage: (run_dir, first run, resumed run)}: the three stages run side by side (six ranks on
    the one GPU), their resumes too, so a GPU lease spends two launches' time instead of six."""
    overrides, logs = {}, {}
    for stage in STAGES:
        base = tmp_path_factory.mktemp(f"zero{stage}")
        run_dir = str(base / "run")
        logs[stage] = [base / "first", base / "resume"]
        for log_dir in logs[stage]:
            log_dir.mkdir()
        common = dict(
            train__zero_stage=stage,
            model__lora__enabled="true",
            eval__every=2,
            train__checkpoint_every=2,
            train__precision="bf16",
            train__keep_checkpoints=3,
        )
        overrides[stage] = (
            run_dir,
            lambda steps, d=run_dir, c=common: tr.base_overrides(synthetic_shards, d, steps, **c),
        )
    first = {stage: _launch(make(4), logs[stage][0]) for stage, (_, make) in overrides.items()}
    first = {stage: _finish(launched) for stage, launched in first.items()}
    # A stage whose first run failed is not resumed: its test reports the first failure.
    second = {
        stage: _launch(make(6), logs[stage][1])
        for stage, (_, make) in overrides.items()
        if first[stage].returncode == 0
    }
    second = {stage: _finish(launched) for stage, launched in second.items()}
    return {stage: (overrides[stage][0], first[stage], second.get(stage)) for stage in STAGES}


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_one_gpu_cuda_only_group(stage, stage_runs):
    run_dir, first, second = stage_runs[stage]
    assert first.returncode == 0, tr.describe(first)
    log = first.stdout + first.stderr
    assert "world_size=2" in log and "device=cuda:0" in log and "backend=cuda:gloo" in log, log[-3000:]
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_00000004"))

    assert second.returncode == 0, tr.describe(second)
    assert "resuming at step 4" in second.stdout + second.stderr
    rows = tr.metrics(run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    evals = [r for r in rows if "eval/zeroshot_top1" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert evals[-1]["eval/num_samples"] == 96  # every held-out sample scored once across the ranks
    for r in rows:
        if "train/loss" in r:
            assert r["train/loss"] == r["train/loss"], f"non-finite loss at step {r['step']}"
    assert json.load(open(os.path.join(run_dir, "done.json")))["step"] == 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_ranks_on_the_only_gpu_under_nccl_stop_with_one_line(synthetic_shards, tmp_path):
    """torchrun --nproc_per_node 2 where each rank sees the same single GPU: the default group
    (cpu:gloo,cuda:nccl) would fail at its first collective with NCCL's "Duplicate GPU detected";
    instead the run stops at start-up with one line from rank 0 that says what to do."""
    overrides = tr.base_overrides(synthetic_shards, str(tmp_path / "run"), 2)
    launched = _launch(overrides, tmp_path, group_env={"CUDA_VISIBLE_DEVICES": "0"})
    done = _finish(launched)
    assert done.returncode != 0, tr.describe(done)
    lines = [line for line in done.stderr.splitlines() if "both run on one GPU" in line]
    assert len(lines) == 1 and lines[0].startswith("error: ranks 0 and 1 on "), done.stderr[-3000:]
    assert "Duplicate GPU" not in done.stdout + done.stderr
