"""Checkpoint and resume review: a resume under another ZeRO stage or precision (real DeepSpeed
engines, gloo), and a full disk that fails one rank's checkpoint write (the deepspeed launcher,
2 CPU ranks)."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_modules import TwoLayer

import train_runner as tr
from helpers_dist import run_distributed


def _engine(stage: int, precision: str = "fp32"):
    import deepspeed

    from vutrain.config import TrainConfig
    from vutrain.ds_config import build_ds_config
    from vutrain.optim import build_optimizer

    torch.manual_seed(0)
    module = TwoLayer()
    cfg = TrainConfig(
        max_steps=10, micro_batch_size=2, zero_stage=stage, warmup_steps=2, lr=1e-2, precision=precision
    )
    optimizer, scheduler = build_optimizer(module, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=build_ds_config(cfg, 1)
    )
    return engine


def _run_cases(rank, world, cases):
    """Each (function, args) case in turn in this one process: a spawned process pays seconds of a
    loaded CI core for its torch and DeepSpeed imports, its cases a fraction of one. Returns each
    case's ("ok", result) or ("error", traceback): a failing case fails its own test."""
    import traceback

    outcomes = []
    for fn, args in cases:
        try:
            outcomes.append(("ok", fn(rank, world, *args)))
        except Exception:
            outcomes.append(("error", traceback.format_exc()))
    return outcomes


def _outcome(outcome):
    kind, value = outcome
    if kind == "error":
        pytest.fail(f"the case raised in its spawned process:\n{value}", pytrace=False)
    return value


def _outcomes(outcomes):
    return [_outcome(o) for o in outcomes]


def _save_then_resume_under_other_stages(rank, world, run_dir, saved_stage, resume_stages):
    import deepspeed

    from vutrain import checkpoint as ckpt
    from vutrain.checkpoint_reshape import ResumeShapeError

    deepspeed.init_distributed("gloo")
    engine = _engine(saved_stage)
    for _ in range(2):
        engine.backward(engine(torch.randn(2, 8)))
        engine.step()
    ckpt.save_checkpoint(engine, run_dir, 2, {"step": 2, "data": {}}, rank, keep=1)
    outcomes = {}
    for stage in resume_stages:
        try:
            state = ckpt.load_checkpoint(_engine(stage), *ckpt.resolve_resume("auto", run_dir), rank=rank)
            outcomes[stage] = f"step {state['step']}"
        except ResumeShapeError as exc:
            outcomes[stage] = str(exc)
    return outcomes


def test_resume_under_a_zero_stage_deepspeed_cannot_load_names_the_key(tmp_path):
    """ZeRO-1 and 2 read each other's checkpoints; 0 and 3 only their own. Before, a run resumed
    with train.zero_stage 2 -> 3 (or 3 -> 2) failed inside DeepSpeed with "DeepSpeed could not load
    ...: AssertionError: ; point train.resume at an older checkpoint", advice that fails the same
    way and leads to train.resume=never, throwing the run away."""
    # Both saves in one spawned process: one DeepSpeed import and start-up instead of two.
    from_2, from_3 = _outcomes(
        run_distributed(
            _run_cases,
            1,
            [
                (_save_then_resume_under_other_stages, (str(tmp_path / "z2"), 2, (1, 3))),
                (_save_then_resume_under_other_stages, (str(tmp_path / "z3"), 3, (2,))),
            ],
            init_process_group=False,
        )[0]
    )
    assert from_2[1] == "step 2"
    tag_dir = os.path.join(str(tmp_path / "z2"), "checkpoints", "step_00000002")
    assert from_2[3] == (
        f"{tag_dir} was written with ZeRO stage 2 and this run has train.zero_stage=3: DeepSpeed cannot "
        "load it into that stage; resume with train.zero_stage=1 or 2 (stages 1 and 2 read each "
        "other's checkpoints, 0 and 3 only their own)"
    )
    assert "written with ZeRO stage 3 and this run has train.zero_stage=2" in from_3[2]
    assert "resume with train.zero_stage=3 " in from_3[2]


@pytest.mark.slow
def test_a_full_disk_that_fails_one_ranks_write_is_one_line_per_rank(synthetic_shards, tmp_path):
    """ZeRO-0: rank 0 alone writes the large model file, so a per-file size limit (RLIMIT_FSIZE, as
    tests/test_faults_checkpoint.py makes a full disk) fails its write while rank 1's small files
    go through, as a disk that fills up mid-save does. Before, rank 1, waiting for rank 0 in a
    barrier, printed a 20-line "Connection closed by peer" traceback under rank 0's one line."""
    from test_faults_checkpoint import train_on_a_full_disk

    proc = train_on_a_full_disk(synthetic_shards, str(tmp_path / "run"), train__zero_stage=0)
    assert proc.returncode != 0, tr.describe(proc)
    assert "Traceback" not in proc.stderr, tr.describe(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: rank ")]
    own = [line for line in errors if line.startswith("error: rank 0: ")]
    assert len(own) == 1 and "checkpoint step_00000002 could not be written to " in own[0], errors
    # Rank 1 says its own line, unless the launcher stopped it first.
    assert [line for line in errors if line not in own] in (
        [],
        [
            "error: rank 1: checkpoint step_00000002 was not completed: another rank stopped during "
            "the save (its own error says why); rerun with train.resume=auto, which continues from "
            "the start: no checkpoint was complete"
        ],
    ), errors


def _full_state(engine) -> dict:
    """Every parameter's full fp32 value and Adam moments, the Adam step, LR and global step."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = engine.optimizer
    if hasattr(optimizer, "_hp_optimizer_states_linked"):  # see tests/test_resume_world_size.py
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    out = {
        name: [safe_get_full_fp32_param(p).clone()]
        + [safe_get_full_optimizer_state(p, key).clone() for key in ("exp_avg", "exp_avg_sq")]
        for name, p in engine.module.named_parameters()
    }
    out["_adam_steps"] = sorted({float(s["step"]) for s in engine.optimizer.optimizer.state.values()})
    out["_lr"], out["_global_steps"] = engine.get_lr(), engine.global_steps
    return out


def _resume_under_another_precision(rank, world, run_dir, stage, saved_precision, resumed_precision):
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    engine = _engine(stage, saved_precision)
    torch.manual_seed(1)
    dtype = next(engine.module.parameters()).dtype  # bf16 weights under train.precision=bf16
    for _ in range(3):
        engine.backward(engine(torch.randn(2, 8, dtype=dtype)))
        engine.step()
    ckpt.save_checkpoint(engine, run_dir, 3, {"step": 3, "data": {"position": 7}}, rank, keep=1)
    saved = _full_state(engine)
    resumed = _engine(stage, resumed_precision)
    state = ckpt.load_checkpoint(resumed, *ckpt.resolve_resume("auto", run_dir), rank=rank)
    return saved, _full_state(resumed), state


def _assert_same_state(want: dict, got: dict) -> None:
    """Bit for bit: every tensor of each parameter, and the scalars (keys starting with "_")."""
    assert got.keys() == want.keys()
    for name, values in want.items():
        if name.startswith("_"):
            assert got[name] == values, name
        else:
            for a, b in zip(got[name], values, strict=True):
                assert torch.equal(a, b), name


PRECISION_CASES = [(1, "fp32", "bf16"), (3, "bf16", "fp32")]
ZERO0_PRECISION_CASES = [("bf16", "fp32"), ("fp32", "bf16")]


@pytest.fixture(scope="module")
def single_rank_outcomes(tmp_path_factory):
    """The single-rank resumes of the tests below, each in a run directory of its own, all in one
    spawned process (see _run_cases), keyed by test: one process start instead of five. The full
    disk last: it leaves the process's output on /dev/null."""
    base = tmp_path_factory.mktemp("single_rank")
    cases = {}
    for stage, saved, resumed in PRECISION_CASES:
        run_dir = str(base / f"precision_{stage}_{saved}_{resumed}")
        cases["precision", stage, saved, resumed] = (
            _resume_under_another_precision,
            (run_dir, stage, saved, resumed),
        )
    for saved, resumed in ZERO0_PRECISION_CASES:
        run_dir = str(base / f"zero0_{saved}_{resumed}")
        cases["zero0", saved, resumed] = (_zero0_resume_under_another_precision, (run_dir, saved, resumed))
    cases["full_disk"] = (_resume_under_another_precision_on_a_full_disk, (str(base / "full_disk"),))
    outcomes = run_distributed(_run_cases, 1, list(cases.values()), init_process_group=False)[0]
    return dict(zip(cases, outcomes, strict=True))


@pytest.mark.parametrize("stage,saved,resumed", PRECISION_CASES)
def test_resume_under_another_precision_restores_the_state_exactly(
    single_rank_outcomes, stage, saved, resumed
):
    """train.precision fp32 <-> bf16 (what the non-finite-loss error tells the user to try). DeepSpeed
    names the ZeRO optimizer files by precision and reads only its own: before, every checkpoint
    failed with "FileNotFoundError: .../bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt; point
    train.resume at an older checkpoint". The fp32 weights, Adam moments and step, the LR and the
    step come back bit for bit, and this rank's own data position (no epoch-remainder reshaping)."""
    want, got, state = _outcome(single_rank_outcomes["precision", stage, saved, resumed])
    assert state["step"] == 3 and state["data"] == {"position": 7}
    _assert_same_state(want, got)


def _zero0_state(engine) -> dict:
    """ZeRO-0: each parameter's fp32 master value and Adam moments (by name), Adam step, LR, step."""
    optimizer = engine.optimizer
    wrapped = hasattr(optimizer, "fp32_groups")  # 16-bit: DeepSpeed's wrapper around torch AdamW
    inner = optimizer.optimizer if wrapped else optimizer
    names = {id(p): name for name, p in engine.module.named_parameters()}
    out = {}
    for i, group in enumerate(inner.param_groups):
        module_params = optimizer.fp16_groups[i] if wrapped else group["params"]
        for master, param in zip(group["params"], module_params, strict=True):
            state = inner.state[master]
            out[names[id(param)]] = [master.detach().clone()] + [
                state[key].clone() for key in ("exp_avg", "exp_avg_sq")
            ]
    out["_adam_steps"] = sorted({float(s["step"]) for s in inner.state.values()})
    out["_lr"], out["_global_steps"] = engine.get_lr(), engine.global_steps
    return out


def _zero0_resume_under_another_precision(rank, world, run_dir, saved_precision, resumed_precision):
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    engine = _engine(0, saved_precision)
    torch.manual_seed(1)
    dtype = next(engine.module.parameters()).dtype
    for _ in range(3):
        engine.backward(engine(torch.randn(2, 8, dtype=dtype)))
        engine.step()
    ckpt.save_checkpoint(engine, run_dir, 3, {"step": 3, "data": {"position": 7}}, rank, keep=1)
    saved = _zero0_state(engine)
    resumed = _engine(0, resumed_precision)
    state = ckpt.load_checkpoint(resumed, *ckpt.resolve_resume("auto", run_dir), rank=rank)
    got = _zero0_state(resumed)
    weight_dtype = next(resumed.module.parameters()).dtype
    module_weights = {n: p.detach().clone() for n, p in resumed.module.named_parameters()}
    resumed.backward(resumed(torch.randn(2, 8, dtype=weight_dtype)))  # and it trains on
    resumed.step()
    return saved, got, state, weight_dtype, module_weights


@pytest.mark.parametrize("saved,resumed", ZERO0_PRECISION_CASES)
def test_zero0_resume_under_another_precision_restores_the_state_exactly(
    single_rank_outcomes, saved, resumed
):
    """ZeRO-0 keeps the optimizer in the model-states file in the form of the engine that wrote it
    (a torch AdamW state dict in fp32, DeepSpeed's 16-bit wrapper in bf16): before, a resume under
    the other precision failed with "KeyError: 'param_groups'" (bf16 -> fp32) or
    "'dynamic_loss_scale'" (fp32 -> bf16). The fp32 master weights, Adam moments and step, the LR
    and the step now come back bit for bit, and the module's weights are the masters in its dtype."""
    want, got, state, weight_dtype, module_weights = _outcome(single_rank_outcomes["zero0", saved, resumed])
    assert state["step"] == 3 and state["data"] == {"position": 7}
    _assert_same_state(want, got)
    for name, weight in module_weights.items():
        assert torch.equal(weight, want[name][0].to(weight_dtype)), name


def _resume_under_another_precision_on_a_full_disk(rank, world, run_dir):
    import resource
    import signal

    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    engine = _engine(1, "fp32")
    for _ in range(2):
        engine.backward(engine(torch.randn(2, 8)))
        engine.step()
    ckpt.save_checkpoint(engine, run_dir, 2, {"step": 2, "data": {}}, rank, keep=1)
    resumed = _engine(1, "bf16")
    # A full disk from here on: writes past 100 bytes fail (SIGXFSZ ignored). This process's own
    # output goes to /dev/null, which the limit does not cover (pytest captures it in a file).
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))
    try:
        ckpt.load_checkpoint(resumed, *ckpt.resolve_resume("auto", run_dir, verbose=False), rank=rank)
    except ckpt.CheckpointError as exc:
        tag_dir = os.path.join(run_dir, "checkpoints", "step_00000002")
        return str(exc), sorted(os.listdir(tag_dir))
    finally:  # the result travels back in a file
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    return "loaded", []


def test_a_universal_conversion_that_cannot_write_says_what_to_do(single_rank_outcomes):
    """A resume that needs the universal copy (here another precision) beside a checkpoint on a full
    disk: before, "DeepSpeed could not load ...: RuntimeError: basic_ios::clear: iostream error;
    point train.resume at an older checkpoint" (which fails the same way), and DeepSpeed's
    progress bars on stderr. Now one line with what to do, and no half-written copy left."""
    message, files = _outcome(single_rank_outcomes["full_disk"])
    assert message.startswith("could not write the universal copy of "), message
    assert "older checkpoint" not in message and "\n" not in message
    assert "python -m vutrain.checkpoint_reshape " in message
    assert "resume with the world size and train.precision that wrote it" in message
    assert not any(f.startswith("universal") for f in files), files
