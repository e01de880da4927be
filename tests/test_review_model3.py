"""Third review of the model: a hub model on a machine that cannot reach the hub loads from the
cache at once or fails in one line (no minutes of retries), and the model section (a hub model, the
LoRA targets) is checked from config files alone, before any process group."""

from __future__ import annotations

import json
import os
import socketserver
import subprocess
import sys
import threading

import pytest

from vutrain.config import ConfigError, load_config
from vutrain.model import check_model_config, preset_clip_config, preset_image_processor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from vutrain.data.tokenizer import train_bpe_tokenizer

    texts = [f"a {c} {s} video" for c in ("red", "green", "blue") for s in ("circle", "square")] * 20
    return train_bpe_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=300, max_length=32)


def _cache_hub_model(hf_home, repo_id: str, tokenizer) -> None:
    """A tiny CLIP in the Hugging Face cache layout that `hf download` writes (snapshot + refs/main)."""
    from transformers import CLIPModel

    from vutrain.config import ModelConfig

    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    CLIPModel(preset_clip_config(ModelConfig(preset="tiny"), tokenizer)).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    preset_image_processor(64).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


class _ClosingHub(socketserver.ThreadingTCPServer):
    """A hub endpoint that never answers: it records each request line and hangs up."""

    daemon_threads = True

    def __init__(self):
        self.requests: list[str] = []

        class Handler(socketserver.StreamRequestHandler):
            def handle(handler):
                self.requests.append(handler.rfile.readline().decode(errors="replace").strip())

        super().__init__(("127.0.0.1", 0), Handler)


LOAD_BOTH = """
import json, sys
from vutrain.model import load_pretrained
result = {"cached": type(load_pretrained("acme/tiny-clip")[0]).__name__}
try:
    load_pretrained("acme/not-downloaded")
except OSError as exc:
    result["missing"] = str(exc)
print(json.dumps(result))
"""


def test_hub_model_without_a_reachable_hub_loads_from_cache_or_fails_in_one_line(tokenizer, tmp_path):
    """No route to the hub (a compute node): transformers retried every file 5 times with back-off,
    so a cached model took 200 s to load and an uncached one failed after a minute, a message about
    the internet. Now the hub is asked once: the cached model loads from the cache, the uncached one
    is one line naming the cache and what to do."""
    hf_home = tmp_path / "hf"
    _cache_hub_model(hf_home, "acme/tiny-clip", tokenizer)
    hub = _ClosingHub()
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}",
        "PYTHONPATH": REPO,
    }
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_HUB_CACHE", None)
    try:
        # The limit only stops the old behaviour's minutes of retries; the load takes seconds.
        done = subprocess.run(
            [sys.executable, "-c", LOAD_BOTH], env=env, capture_output=True, text=True, timeout=150
        )
    finally:
        hub.shutdown()
        hub.server_close()
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cached"] == "CLIPModel"
    message = result["missing"]
    assert message.startswith("model.name_or_path='acme/not-downloaded' is no local directory, is not in ")
    assert str(hf_home / "hub") in message and "cannot be reached" in message
    assert "`hf download acme/not-downloaded`" in message and "\n" not in message
    # One probe, not every file of both models 5 times (the hub client's own calls aside).
    assert [r for r in hub.requests if "acme" in r] == [], hub.requests
    assert hub.requests.count("HEAD / HTTP/1.1") == 1, hub.requests


def _lora_model_config(*overrides: str):
    return load_config("tiny", ["model.lora.enabled=true", *overrides]).model


def test_lora_targets_are_checked_from_the_config_alone(tokenizer, tmp_path):
    """A LoRA target typo was found only when the model was built, after the process group started
    (a cluster start-up per typo). check_model_config finds it from the preset's shapes or the
    pretrained config.json alone (no weights, no tokenizer files needed)."""
    with pytest.raises(ConfigError, match=r"^model\.lora\.target_modules: vproj matches no module"):
        check_model_config(
            _lora_model_config("model.preset=vit-l-14", "model.lora.target_modules=q_proj,vproj")
        )
    check_model_config(_lora_model_config("model.preset=vit-l-14", "model.lora.target_modules=q_proj,v_proj"))
    check_model_config(_lora_model_config("model.lora.target_modules=all-linear"))

    config_only = tmp_path / "pretrained"
    config_only.mkdir()
    config = preset_clip_config(load_config("tiny", []).model, tokenizer)
    config.save_pretrained(config_only)
    assert os.listdir(config_only) == ["config.json"]
    pretrained = f"model.name_or_path={config_only}"
    check_model_config(_lora_model_config(pretrained, "model.lora.target_modules=fc1,out_proj"))
    with pytest.raises(
        ConfigError, match="fc3 matches no module of the model; its linear layers are fc1, fc2"
    ):
        check_model_config(_lora_model_config(pretrained, "model.lora.target_modules=fc1,fc3"))


def test_model_check_refuses_an_uncached_hub_model_offline(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE set and the model not cached: a config error before any process group,
    naming the cache looked in (transformers said to check the internet connection)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = load_config("tiny", ["model.name_or_path=openai/clip-vit-base-patch32"]).model
    with pytest.raises(ConfigError) as err:
        check_model_config(cfg)
    assert str(err.value) == (
        "model.name_or_path='openai/clip-vit-base-patch32' is no local directory, is not in the Hugging "
        f"Face cache ({tmp_path}), and HF_HUB_OFFLINE is set: download it where the hub is reachable "
        "(`hf download openai/clip-vit-base-patch32`) into a cache this machine reads (HF_HOME or "
        "HF_HUB_CACHE), or give a local directory written by save_pretrained / python -m vutrain.export"
    )


def test_a_lora_target_typo_stops_training_before_the_process_group(tiny_shards, tmp_path, capsys):
    """`model.lora.target_modules=q_proj,vproj` was refused only inside the Trainer, after the process
    group had started (a cluster start-up per typo, every other rank waiting on the first): now
    train.main refuses it with the other config errors, before any process group, exit 2."""
    import torch.distributed as dist

    from vutrain import train

    from inprocess_trainer import overrides

    run_dir = tmp_path / "run"
    args = overrides(
        tiny_shards,
        str(run_dir),
        steps=1,
        **{"model.lora.enabled": "true", "model.lora.target_modules": "q_proj,vproj", "eval.every": 0},
    )
    assert train.main(["--config", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert "config error: model.lora.target_modules: vproj matches no module" in err, err
    assert not dist.is_initialized() and not run_dir.exists()
