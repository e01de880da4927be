"""open_clip's own training step, for `python -m vutrain.bench --compare open_clip`.

The step is the one of `open_clip_train/train.py::train_one_epoch` with `accum_freq=1` and no
gradient clipping (open_clip's defaults): cosine LR, `optimizer.zero_grad()`, the forward and
`ClipLoss` under `torch.amp.autocast(bf16)` (`--precision amp_bf16`), `backward`,
`optimizer.step()`, then the logit scale clamped to [0, ln 100]. The optimizer is AdamW with
open_clip's two parameter groups (gains, biases and the logit scale without weight decay). The
model is open_clip's `CLIP` class, random init, built exactly as `open_clip.create_model` builds it
for an `amp_*` precision (`CLIP(**model_cfg, cast_dtype=None)` moved to the device), from a model
config with the same shapes as the vutrain preset it is compared with.

Loading open_clip: `import open_clip` when it works (the GPU host has torchvision). Its package
`__init__` imports torchvision (transforms) and ftfy (tokenizer), which the CPU development
machine cannot install beside its torch build, so otherwise only the modules the step needs
(`model`, `transformer`, `loss`, and what they import) are loaded from the installed
open_clip_torch distribution under a private package name, without running its `__init__`. One
of those, `open_clip/utils.py`, imports torchvision's `FrozenBatchNorm2d` at the top but uses it
only to freeze ResNet batch norms; while that one file executes, a placeholder stands in for it
(and is removed again, so nothing else in the process sees a torchvision).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import os
import sys
import types
from dataclasses import dataclass

import torch

PRIVATE_PACKAGE = "_vutrain_open_clip"
"""The name open_clip's modules are loaded under when `import open_clip` fails."""

OPENCLIP_MODEL_NAMES = {"vit-b-32": "ViT-B-32", "vit-b-16": "ViT-B-16", "vit-l-14": "ViT-L-14"}
"""vutrain preset -> open_clip's built-in model config with the same shapes."""


@dataclass
class OpenClipModules:
    """The pieces of open_clip the benchmark uses, and where they came from."""

    CLIP: type
    ClipLoss: type
    cosine_lr: object
    package_dir: str
    version: str
    source: str
    """'package' (import open_clip) or 'modules' (model/transformer/loss loaded without __init__)."""


class _FrozenBatchNorm2dUnavailable(torch.nn.Module):
    """Placeholder for torchvision's FrozenBatchNorm2d: only ResNet towers with frozen BN use it."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            "open_clip's FrozenBatchNorm2d needs torchvision; install it to lock "
            "ResNet batch norms (the ViT benchmark never does)"
        )


@contextlib.contextmanager
def _torchvision_placeholder():
    """Let `from torchvision.ops.misc import FrozenBatchNorm2d` succeed while one module executes."""
    names = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
    saved = {name: sys.modules.get(name) for name in names}
    modules = {name: types.ModuleType(name) for name in names}
    modules["torchvision"].ops = modules["torchvision.ops"]
    modules["torchvision.ops"].misc = modules["torchvision.ops.misc"]
    modules["torchvision.ops.misc"].FrozenBatchNorm2d = _FrozenBatchNorm2dUnavailable
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _distribution_dir() -> str:
    """The installed open_clip package directory, found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"open_clip_torch is not installed: {INSTALL_OPEN_CLIP} "
            "(or pip install '.[bench]' where torchvision works)"
        )
    return list(spec.submodule_search_locations)[0]


def _load_without_init(package_dir: str) -> types.ModuleType:
    """open_clip's model and loss modules under PRIVATE_PACKAGE, skipping its package __init__."""
    if PRIVATE_PACKAGE not in sys.modules:
        import transformers  # noqa: F401  (hf_model imports it; import it before the placeholder exists)

        package = types.ModuleType(PRIVATE_PACKAGE)
        package.__path__ = [package_dir]
        package.__package__ = PRIVATE_PACKAGE
        sys.modules[PRIVATE_PACKAGE] = package
        with _torchvision_placeholder():
            importlib.import_module(f"{PRIVATE_PACKAGE}.utils")
        for name in ("transformer", "model", "loss", "version"):
            importlib.import_module(f"{PRIVATE_PACKAGE}.{name}")
    return sys.modules[PRIVATE_PACKAGE]


INSTALL_OPEN_CLIP = "pip install -c .venv/torch-constraint.txt --no-deps 'open_clip_torch>=3.0'"
"""setup.py's bench extra, held to the installed torch (open_clip_torch's torchvision pulls its own)."""


class OpenClipTooOld(ImportError):
    """The installed open_clip_torch has no ``open_clip_train`` (the training code the step copies)."""


def _cosine_lr(version: str):
    """open_clip_train's cosine LR schedule. An open_clip_torch without open_clip_train failed with a
    bare "No module named 'open_clip_train'", naming neither the version needed nor how to get it."""
    try:
        from open_clip_train.scheduler import cosine_lr
    except ImportError as exc:
        if exc.name not in ("open_clip_train", "open_clip_train.scheduler"):
            raise
        raise OpenClipTooOld(
            f"open_clip_torch {version} installs no open_clip_train (its training code, whose step and "
            f"cosine LR schedule the comparison runs); the comparison needs open_clip_torch>=3.0: "
            f"{INSTALL_OPEN_CLIP}"
        ) from None
    return cosine_lr


def load_open_clip() -> OpenClipModules:
    """open_clip's CLIP, ClipLoss and cosine LR schedule: the package if it imports, else its modules.

    Raises ImportError with the install command when open_clip_torch is not installed at all.
    """
    try:
        import open_clip

        return OpenClipModules(
            open_clip.CLIP,
            open_clip.ClipLoss,
            _cosine_lr(open_clip.__version__),
            os.path.dirname(open_clip.__file__),
            open_clip.__version__,
            "package",
        )
    except OpenClipTooOld:  # loading its modules instead would not add the missing package
        raise
    except (ImportError, RuntimeError) as exc:  # RuntimeError: a torchvision built for another torch
        if isinstance(exc, ImportError) and exc.name == "open_clip":
            raise ImportError(f"{exc}. Install it: {INSTALL_OPEN_CLIP}") from None
        package_dir = _distribution_dir()
        for name in [n for n in sys.modules if n == "open_clip" or n.startswith("open_clip.")]:
            del sys.modules[name]  # what the failed import left half-initialised
    package = _load_without_init(package_dir)
    # open_clip_train's __init__ is empty and its scheduler is plain Python: a normal import works.
    return OpenClipModules(
        package.model.CLIP,
        package.loss.ClipLoss,
        _cosine_lr(package.version.__version__),
        package_dir,
        package.version.__version__,
        "modules",
    )


def openclip_activation(preset_name: str, modules: OpenClipModules) -> str:
    """open_clip's MLP activation for `preset_name`, as a vutrain ``model.hidden_act``.

    Its built-in config's ``quick_gelu`` flag decides (ViT-B-32 from scratch has none: ``nn.GELU``,
    exact, which is HF's ``gelu``); a preset without a built-in gets CLIP's default, off. vutrain's
    presets default to HF's ``quick_gelu``: without this the two sides would compare different
    MLPs (``quick_gelu`` is three kernels forward where ``gelu`` is one).
    """
    name = OPENCLIP_MODEL_NAMES.get(preset_name)
    path = os.path.join(modules.package_dir, "model_configs", f"{name}.json") if name else ""
    quick = False
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            quick = bool(json.load(fh).get("quick_gelu", False))
    return "quick_gelu" if quick else "gelu"


def model_config(
    preset_name: str, image_size: int, vocab_size: int, context_length: int, modules: OpenClipModules
) -> dict:
    """open_clip's model config dict with the shapes of vutrain's preset `preset_name`.

    Vocabulary and context length follow vutrain's tokenizer so both models read the same token
    ids. For a preset with an open_clip built-in (vit-b-32 -> ViT-B-32) the built-in JSON is the
    base and every shape is checked against the preset, so a drift between the two fails loudly.
    """
    from vutrain.model import PRESETS

    preset = PRESETS[preset_name]
    vision = {
        "image_size": image_size,
        "layers": preset.vision_layers,
        "width": preset.vision_width,
        "patch_size": preset.patch_size,
        "head_width": preset.vision_width // preset.vision_heads,
    }
    text = {
        "context_length": context_length,
        "vocab_size": vocab_size,
        "width": preset.text_width,
        "heads": preset.text_heads,
        "layers": preset.text_layers,
    }
    cfg = {"embed_dim": preset.embed_dim, "vision_cfg": vision, "text_cfg": text}
    name = OPENCLIP_MODEL_NAMES.get(preset_name)
    path = os.path.join(modules.package_dir, "model_configs", f"{name}.json") if name else ""
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            builtin = json.load(fh)
        # The built-in's embed_dim is kept below (dict(builtin, ...)): a preset whose towers project
        # to another size would have been compared with a different open_clip model, silently.
        if builtin.get("embed_dim") != preset.embed_dim:
            raise ValueError(
                f"open_clip {name} embed_dim={builtin.get('embed_dim')} differs from "
                f"the vutrain preset's {preset.embed_dim}"
            )
        builtin_vision = dict(builtin["vision_cfg"], head_width=builtin["vision_cfg"].get("head_width", 64))
        for key, value in vision.items():
            if key != "image_size" and builtin_vision.get(key) != value:  # the size may be overridden
                raise ValueError(
                    f"open_clip {name} vision_cfg.{key}={builtin_vision.get(key)} differs from "
                    f"the vutrain preset's {value}"
                )
        for key in ("width", "heads", "layers"):
            if builtin["text_cfg"][key] != text[key]:
                raise ValueError(
                    f"open_clip {name} text_cfg.{key}={builtin['text_cfg'][key]} differs from "
                    f"the vutrain preset's {text[key]}"
                )
        cfg = dict(
            builtin,
            vision_cfg=dict(builtin["vision_cfg"], **vision),
            text_cfg=dict(builtin["text_cfg"], **text),
        )
    return cfg


class OpenClipStep:
    """open_clip's model, optimizer, loss and training step (see the module docstring).

    `step(batch)` takes the vutrain batch dict (`pixel_values`, `input_ids`) and trains on it as
    `train_one_epoch` does: images to the device as float (open_clip's dataloader hands it
    normalised fp32 images; `input_dtype` is None under amp), texts as token ids.
    """

    def __init__(
        self,
        modules: OpenClipModules,
        model_cfg: dict,
        device: torch.device,
        precision: str,
        grad_checkpointing: bool = False,
        compile_backend: str | None = None,
        compile_mode: str = "default",
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup: int = 10,
        total_steps: int = 10_000,
    ):
        self.device = device
        self.precision = precision
        self.model = modules.CLIP(**model_cfg, cast_dtype=None, output_dict=True).to(device)
        self.model.set_grad_checkpointing(grad_checkpointing)
        self.model.train()
        if compile_backend:  # open_clip_train/main.py --torchcompile: the whole model, after set-up
            from vutrain.engine import compile_kwargs

            self.model = torch.compile(self.model, backend=compile_backend, **compile_kwargs(compile_mode))
        # open_clip_train/main.py: gains, biases and the logit scale are not decayed.
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
            ],
            lr=lr,
            betas=betas,
            eps=eps,
        )
        self.scheduler = modules.cosine_lr(self.optimizer, lr, warmup, total_steps)
        self.loss = modules.ClipLoss(
            local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1
        )
        self.steps = 0

    def _autocast(self):
        if self.precision in ("amp_bf16", "amp_bfloat16"):
            return torch.amp.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        if self.precision == "amp":
            return torch.amp.autocast(device_type=self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One training step; returns the loss tensor (not read on the host: open_clip logs every N steps)."""
        self.scheduler(self.steps)
        images = batch["pixel_values"].to(device=self.device, non_blocking=True)
        texts = batch["input_ids"].to(device=self.device, non_blocking=True)
        self.optimizer.zero_grad()
        with self._autocast():
            out = self.model(images, texts)
            losses = self.loss(**out, output_dict=True)
            total = sum(losses.values())
        total.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        self.steps += 1
        return total.detach()

    def close(self) -> None:
        """Drop the model and optimizer state so the next configuration starts from empty memory."""
        self.optimizer.zero_grad(set_to_none=True)
        del self.model, self.optimizer, self.loss, self.scheduler
