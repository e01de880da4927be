"""Seventh review of the model and engine build.

A hub name that does not exist on a reachable hub is a one-line config error (transformers' message
spanned two lines). When DeepSpeed packs the parameters without the 16-byte padding, the one-line
warning names what did it and what to change: it always advised upgrading DeepSpeed to >= 0.19,
also on 0.19.x, where the cause was the user's ds_config: ZeRO-1 in bf16 with
data_types.grad_accum_dtype=fp32 runs DeepSpeed's BF16_Optimizer (67 of the tiny preset's 110
weights misaligned), or parameter_alignment set back to false. Real DeepSpeed engines on one gloo
rank, a real HTTP server as the hub."""

from __future__ import annotations

import http.server
import json
import logging
import os
import subprocess
import sys
import threading

import pytest
import torch
from test_param_alignment import _odd_model

from vutrain.config import TrainConfig
from vutrain.engine import build_engine

from inprocess_trainer import DIST_ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def one_rank(single_process):
    from vutrain.distributed import init_distributed, resolve_dist_env

    init_distributed(resolve_dist_env({k: v for k, v in os.environ.items() if k not in DIST_ENV}))
    yield


class _Records(logging.Handler):
    """vutrain's loggers may not propagate to pytest's caplog (logging_setup gives them a handler)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _alignment_warnings(tmp_path, precision: str, ds_config: dict) -> tuple[str, list[str]]:
    """(the engine's optimizer type, the warnings param_alignment logged while the engine was built)."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config))
    cfg = TrainConfig(
        micro_batch_size=2, zero_stage=1, precision=precision, warmup_steps=0, ds_config=str(path)
    )
    records, logger = _Records(), logging.getLogger("vutrain.param_alignment")
    logger.addHandler(records)
    try:
        torch.manual_seed(0)
        engine = build_engine(_odd_model(), cfg, 1, torch.device("cpu"))
    finally:
        logger.removeHandler(records)
    return type(engine.optimizer).__name__, [m for m in records.messages if "aligned" in m]


def test_bf16_optimizer_misalignment_names_grad_accum_dtype_not_an_upgrade(one_rank, tmp_path):
    """ZeRO-1, bf16, data_types.grad_accum_dtype=fp32: one warning that names BF16_Optimizer and the
    key to change, and does not ask for a DeepSpeed the machine already has."""
    kind, warnings = _alignment_warnings(tmp_path, "bf16", {"data_types": {"grad_accum_dtype": "fp32"}})
    assert kind == "BF16_Optimizer"
    assert len(warnings) == 1, warnings
    assert "grad_accum_dtype" in warnings[0] and "train.zero_stage=2" in warnings[0], warnings[0]
    assert "Upgrade deepspeed" not in warnings[0], warnings[0]


def test_alignment_turned_off_in_the_ds_config_is_named(one_rank, tmp_path):
    """ZeRO-1 with zero_optimization.parameter_alignment=false from train.ds_config: the warning
    names that setting instead of asking for a DeepSpeed upgrade."""
    kind, warnings = _alignment_warnings(
        tmp_path, "fp32", {"zero_optimization": {"parameter_alignment": False}}
    )
    assert kind == "DeepSpeedZeroOptimizer"
    assert len(warnings) == 1, warnings
    assert "parameter_alignment to false" in warnings[0], warnings[0]
    assert "Upgrade deepspeed" not in warnings[0], warnings[0]


def test_aligned_zero_1_build_warns_nothing(one_rank, tmp_path):
    """The generated config (parameter_alignment on): no warning, in fp32 and bf16."""
    for precision in ("fp32", "bf16"):
        assert _alignment_warnings(tmp_path, precision, {})[1] == []


class _HubWithoutTheRepo(http.server.BaseHTTPRequestHandler):
    """A reachable hub that holds no repository: 200 for its root, the hub's 404 for every other path."""

    def _answer(self):
        found = self.path == "/"
        self.send_response(200 if found else 404)
        if not found:
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _answer

    def log_message(self, *args):
        pass


CHECK_MODEL = """
from vutrain.config import ConfigError, load_config
from vutrain.model import check_model_config
try:
    check_model_config(load_config("tiny", ["model.name_or_path=acme/no-such-clip"]).model)
except ConfigError as exc:
    print(repr(str(exc)))
"""


def test_hub_name_that_does_not_exist_is_a_one_line_config_error(tmp_path):
    """The hub answers but has no such repository: the config error names the model on one line
    (transformers' message put its advice on private repositories after a newline)."""
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubWithoutTheRepo)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}",
        "PYTHONPATH": REPO,
    }
    for key in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        env.pop(key, None)
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHECK_MODEL], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        hub.shutdown()
        hub.server_close()
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines, f"no ConfigError: {done.stderr[-3000:]}"
    message = eval(lines[-1])  # the repr printed by the child: a str literal
    assert message.startswith("model.name_or_path='acme/no-such-clip' could not be loaded"), message
    assert "not a valid model identifier" in message and "reachable hub name" in message, message
    assert "\n" not in message, message
