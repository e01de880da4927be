"""The model: an HF `CLIPModel` (pretrained or a random-init preset), optionally LoRA-wrapped.

`ClipTrainModule` is what DeepSpeed wraps. It returns L2-normalised features and the exponentiated,
clamped logit scale, so every loss sees the same inputs as open_clip's losses do (the clamp keeps
the parameter trainable at the bound, as open_clip's in-place clamp after each step does:
`bounded_logit_scale`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
except ImportError as exc:
    # Hugging Face's `kernels` package (required by transformers>=5.25) has the import name of this
    # repository's `kernels` (the Triton losses): when its metadata is installed, transformers
    # imports ours in its place and fails on a name that only theirs defines.
    if "from 'kernels'" not in str(exc):
        raise
    raise ImportError(
        "transformers imported vutrain's `kernels` package in place of Hugging Face's `kernels` "
        "(same import name): run `pip uninstall kernels` (transformers runs without it) or install "
        "'transformers<5.25'"
    ) from exc

from vutrain.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: exp(scale) never exceeds 100
# The layer types peft's LoRA adapts (its dispatch_default); any other matched module is a ValueError.
LORA_LAYER_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


class _BoundedScale(torch.autograd.Function):
    """Forward: the value clamped to [low, high]. Backward: the gradient passed through, except
    where the parameter is at or past a bound and a descent step would move it further out."""

    @staticmethod
    def forward(ctx, scale: torch.Tensor, low: float, high: float) -> torch.Tensor:
        # Masks, not the parameter: under ZeRO-3 a parameter's storage may be released after forward.
        ctx.save_for_backward(scale.detach() >= high, scale.detach() <= low)
        return scale.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        at_high, at_low = ctx.saved_tensors
        # A descent step moves the parameter by -grad: at the upper bound a negative gradient
        # pushes it up, at the lower bound a positive one pushes it down.
        outward = (at_high & (grad < 0)) | (at_low & (grad > 0))
        return grad.masked_fill(outward, 0), None, None


def bounded_logit_scale(scale: torch.Tensor, high: float = MAX_LOGIT_SCALE) -> torch.Tensor:
    """The logit scale clamped to [0, high] for the forward, with open_clip's training dynamics.

    open_clip clamps the parameter in place after every optimizer step (`clamp_(0, ln 100)`), so
    it sits on the bound and keeps getting gradients. A clamp in the forward alone
    (`clamp(max=...)`) has a zero gradient above the bound: a parameter that crossed it (a
    pretrained CLIP's fp32 ln 100 already does) never moved again. Clamping the parameter itself
    is awkward under ZeRO (flat, partitioned fp32 master copies), so the bound is applied to
    the gradient instead: the forward value is clamped, and the gradient passes through except
    where it would push a parameter at or past a bound further out. The parameter therefore
    stays at the bound while the loss pushes outward (momentum may carry it a few steps' worth
    past, which the clamped value hides) and moves back as soon as the loss pulls it inward.

    Returned in fp32 (or wider), clamped and bound-tested there: bf16 cannot hold ln 100 (its
    neighbours are 4.59375 and 4.625), so a bf16 run's clamp gave 4.59375 and a scale of 99.0 at
    the bound, where export writes 100, and its bound test (4.59375 >= ln 100 in bf16) held it there.
    """
    return _BoundedScale.apply(scale.to(torch.promote_types(scale.dtype, torch.float32)), 0.0, high)


@dataclass(frozen=True)
class Preset:
    """Shapes of a random-init CLIP architecture (both towers, embedding width, context length)."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    embed_dim: int
    context_length: int


# OpenAI's shapes for the ViT presets; tiny is small enough to learn the synthetic task on CPU.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(64, 8, 128, 3, 4, 128, 3, 4, 128, 32),
    "vit-b-32": Preset(224, 32, 768, 12, 12, 512, 12, 8, 512, 77),
    "vit-b-16": Preset(224, 16, 768, 12, 12, 512, 12, 8, 512, 77),
    "vit-l-14": Preset(224, 14, 1024, 24, 16, 768, 12, 12, 768, 77),
}


def preset_dims(cfg: ModelConfig) -> tuple[int, int]:
    """(image_size, context_length) of a preset after the config's overrides."""
    p = PRESETS[cfg.preset]
    return cfg.image_size or p.image_size, cfg.context_length or p.context_length


def preset_clip_config(cfg: ModelConfig, tokenizer) -> CLIPConfig:
    """A CLIPConfig for a preset whose text side matches the trained tokenizer."""
    p = PRESETS[cfg.preset]
    image_size, context_length = preset_dims(cfg)
    special = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if special["eos_token_id"] == 2:  # HF CLIP treats eos id 2 as the legacy "argmax" pooling
        raise ValueError(
            "the tokenizer's eos token id is 2, which HF CLIP pools incorrectly; "
            "retrain the tokenizer with the special tokens first"
        )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=p.text_width,
        num_hidden_layers=p.text_layers,
        num_attention_heads=p.text_heads,
        intermediate_size=4 * p.text_width,
        max_position_embeddings=context_length,
        projection_dim=p.embed_dim,
        **special,
    )
    vision = dict(
        hidden_size=p.vision_width,
        num_hidden_layers=p.vision_layers,
        num_attention_heads=p.vision_heads,
        intermediate_size=4 * p.vision_width,
        image_size=image_size,
        patch_size=p.patch_size,
        projection_dim=p.embed_dim,
    )
    if cfg.hidden_act:  # else HF's default (quick_gelu): what earlier runs of the preset trained with
        text["hidden_act"] = vision["hidden_act"] = cfg.hidden_act
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=p.embed_dim)


def preset_image_processor(image_size: int) -> CLIPImageProcessor:
    """A CLIPImageProcessor for the presets: resize and centre-crop to ``image_size``, OpenAI mean/std."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=OPENAI_MEAN,
        image_std=OPENAI_STD,
    )


def load_pretrained(name_or_path: str):
    """(CLIPModel in fp32, tokenizer, image processor) from a local directory or a hub name."""
    tokenizer, processor = load_pretrained_preprocessing(name_or_path)
    config = pretrained_clip_config(name_or_path)
    source = pretrained_source_kwargs(name_or_path)
    with _clear_load_error(name_or_path):
        # fp32 whatever the files hold (transformers 5 keeps the saved dtype, fp16 for many hub
        # checkpoints): the trainer's fp32 masters and forward; DeepSpeed casts for bf16/fp16 runs.
        model, info = CLIPModel.from_pretrained(
            name_or_path, config=config, dtype=torch.float32, output_loading_info=True, **source
        )
    check_no_missing_weights(name_or_path, info["missing_keys"])
    return model, tokenizer, processor


class IncompleteWeightsError(OSError):
    """model.name_or_path's weight files lack weights of the CLIPModel its config.json describes."""


def check_no_missing_weights(name_or_path: str, missing) -> None:
    """IncompleteWeightsError when the files lack weights of the CLIPModel: transformers initialises them at
    random with a warning, and the run fine-tuned a partly random model as if pretrained."""
    missing = sorted(missing)
    if missing:
        raise IncompleteWeightsError(
            f"model.name_or_path={name_or_path!r} lacks {len(missing)} weights of a CLIPModel "
            f"(first: {', '.join(missing[:3])}), which would start from random values: give a "
            "complete CLIPModel directory (save_pretrained / python -m vutrain.export)"
        )


def load_pretrained_preprocessing(name_or_path: str):
    """(tokenizer, image processor) of a pretrained model, without reading its weights (a ViT-L
    is 1.7 GB: every rank's tokenizer set-up and the export read them a second time)."""
    from transformers import AutoTokenizer

    source = pretrained_source_kwargs(name_or_path)
    with _clear_load_error(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **source)
        # transformers 5 builds a CLIP tokenizer with no vocabulary (its special tokens alone) from
        # a directory without tokenizer files: every caption then became the same few ids.
        if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
            raise OSError(
                f"its tokenizer has no vocabulary ({len(tokenizer)} tokens): save the tokenizer "
                "beside the model (tokenizer.save_pretrained)"
            )
        processor = CLIPImageProcessor.from_pretrained(name_or_path, **source)
    check_tokenizer_fits_text_tower(name_or_path, tokenizer, pretrained_clip_config(name_or_path).text_config)
    return tokenizer, processor


def check_pretrained_tokenizer(name_or_path: str, config: CLIPConfig) -> None:
    """check_tokenizer_fits_text_tower from the tokenizer files and config.json alone, before any
    process group; a model without tokenizer files passes here and is refused when it loads."""
    from transformers import AutoTokenizer

    with _clear_load_error(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **pretrained_source_kwargs(name_or_path))
    if len(tokenizer) > len(set(tokenizer.all_special_ids)):
        check_tokenizer_fits_text_tower(name_or_path, tokenizer, config.text_config)


class TokenizerMismatchError(OSError):
    """model.name_or_path's tokenizer gives ids its text tower cannot embed, or pools at another token."""


def check_tokenizer_fits_text_tower(name_or_path: str, tokenizer, text_config) -> None:
    """TokenizerMismatchError unless every id of ``tokenizer`` is a row of the text tower's embedding
    and the tower pools at the tokenizer's eos.

    A tokenizer with added tokens beyond ``vocab_size`` failed with an IndexError in the embedding at
    the first step, after the process group and the engine. HF CLIP pools at the first
    ``eos_token_id`` of each caption (at the largest id when that is 2, the legacy configs): an
    eos id the tokenizer never writes pooled every caption at its first token, without an error.
    """
    size, vocab = len(tokenizer), text_config.vocab_size
    where = f"model.name_or_path={name_or_path!r}"
    if size > vocab:
        raise TokenizerMismatchError(
            f"{where}: its tokenizer has {size} tokens but its text tower's vocab_size is {vocab}, "
            f"so ids from {vocab} on fail in the token embedding: save the tokenizer the model was "
            "trained with beside it, or resize the model (model.resize_token_embeddings(len(tokenizer))) "
            "and save it again"
        )
    eos, pooled = tokenizer.eos_token_id, text_config.eos_token_id
    legacy = pooled == 2  # transformers' rule: pool at the argmax of the ids
    if eos is None or (eos != size - 1 if legacy else eos != pooled):
        pools_at = f"the largest id ({size - 1})" if legacy else f"eos_token_id {pooled}"
        raise TokenizerMismatchError(
            f"{where}: its text tower pools at {pools_at} but its tokenizer ends captions with "
            f"{tokenizer.eos_token!r} (id {eos}), so every caption would be pooled at another token: "
            f"set text_config.eos_token_id to {eos} in its config.json, or save the tokenizer the "
            "model was trained with beside it"
        )


def pretrained_context_length(name_or_path: str, tokenizer) -> int:
    """Tokens per caption for a pretrained model: the smaller of the tokenizer's limit and the text
    tower's positions. A tokenizer saved without a limit says 10**30, and a model with fewer than
    77 positions then failed in its position embedding at the first step. No cap at CLIP's 77: a
    longer text tower (a vutrain preset export trained with model.context_length=128, a Long-CLIP)
    had every caption cut to 77 tokens without a word, and its re-export's tokenizer said 77."""
    positions = pretrained_clip_config(name_or_path).text_config.max_position_embeddings
    return min(getattr(tokenizer, "model_max_length", None) or positions, positions)


def pretrained_clip_config(name_or_path: str) -> CLIPConfig:
    """The CLIPConfig of a pretrained model (config.json alone: no weights are read)."""
    source = pretrained_source_kwargs(name_or_path)
    with _clear_load_error(name_or_path):
        saved, _ = CLIPConfig.get_config_dict(name_or_path, **source)
        kind = saved.get("model_type", CLIPConfig.model_type)
        # transformers builds a CLIPConfig from any config.json with a warning (a SigLIP's, a vision
        # tower's alone); its weights then loaded in part, or failed after the process group.
        if kind != CLIPConfig.model_type:
            raise NotClipModelError(
                f"model.name_or_path={name_or_path!r} holds a {kind!r} model (config.json "
                f"model_type), not a {CLIPConfig.model_type!r} CLIPModel: give a CLIPModel directory "
                "or hub name (e.g. openai/clip-vit-base-patch32, or an export of python -m vutrain.export)"
            )
        return CLIPConfig.from_pretrained(name_or_path, **source)


class NotClipModelError(OSError):
    """model.name_or_path names a model of another kind than CLIP (its config.json's model_type)."""


HUB_PROBE_TIMEOUT_S = 10.0
"""How long the one request that asks whether the hub answers may take. Without it, every file of
a hub model on a machine with no route to the hub was retried for about 25 s (5 tries with
back-off): a cached model took 200 s to load, an uncached one failed after a minute."""


class PretrainedUnavailableError(OSError):
    """model.name_or_path is a hub name this machine has neither in its cache nor can download."""


def pretrained_source_kwargs(name_or_path: str) -> dict:
    """Keyword arguments for from_pretrained, after one quick look at where the files can come from.

    A local directory or a reachable hub: none (transformers' own rules). A hub that cannot be
    reached (no network, a firewall) but a cache that holds the model: ``local_files_only``, so no
    file is retried. Neither (or HF_HUB_OFFLINE set and nothing cached): PretrainedUnavailableError,
    one line that says what to do.
    """
    from huggingface_hub import constants

    if os.path.isdir(name_or_path) or not _is_hub_name(name_or_path):
        return {}  # not a hub name either: transformers' one-line "Repo id must be..." names it
    cached = _hub_cached(name_or_path)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return {}
        why = "HF_HUB_OFFLINE is set"
    else:
        unreachable = _hub_unreachable(constants.ENDPOINT)
        if unreachable is None:
            return {}
        if cached:
            log.warning("%s: the hub does not answer (%s); using the cached copy", name_or_path, unreachable)
            return {"local_files_only": True}
        why = f"{constants.ENDPOINT} cannot be reached ({unreachable})"
    raise PretrainedUnavailableError(
        f"model.name_or_path={name_or_path!r} is no local directory, is not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}), and {why}: download it where the hub is reachable "
        f"(`hf download {name_or_path}`) into a cache this machine reads (HF_HOME or HF_HUB_CACHE), "
        "or give a local directory written by save_pretrained / python -m vutrain.export"
    )


def _is_hub_name(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


@functools.cache
def _hub_unreachable(endpoint: str) -> str | None:
    """Why the hub at ``endpoint`` does not answer, or None when it does (asked once per process:
    the tokenizer, the config and the weights are three loads)."""
    from huggingface_hub.utils import get_session

    try:
        response = get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as exc:  # whatever the HTTP client raises (DNS, refused, timeout, proxy): no answer
        return " ".join(str(exc).split()) or type(exc).__name__
    # A server error (an outage, a proxy that cannot reach it) fails every download the same way.
    return f"HTTP {response.status_code}" if response.status_code >= 500 else None


@contextmanager
def _clear_load_error(name_or_path: str):
    try:
        yield
    except NotClipModelError:
        raise  # its own line already says what to do
    except OSError as exc:
        # One line: transformers' own messages span lines (a hub name that does not exist: its
        # advice on private repositories after a newline), which a launcher's log splits apart.
        cause = " ".join(str(exc).split())
        raise OSError(
            f"model.name_or_path={name_or_path!r} could not be loaded as a CLIPModel with its "
            f"tokenizer and image processor ({cause}). Give a local directory written by "
            "save_pretrained / python -m vutrain.export, or a reachable hub name."
        ) from exc


def apply_lora(model: CLIPModel, cfg: ModelConfig):
    """Wrap with peft LoRA on the target modules of both towers; the logit scale stays trainable."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, cfg.lora.target_modules)
    frozen_tower = lora_tower_left_frozen(model, cfg)
    # A warning, not a ConfigError: adapting one tower alone is a legitimate choice (tested to build);
    # rank 0 says it once rather than every rank of the job.
    if frozen_tower and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        log.warning(frozen_tower)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=_lora_targets(cfg.lora.target_modules),
        bias="none",
    )
    wrapped = get_peft_model(model, lora)
    base = wrapped.base_model.model
    base.logit_scale.requires_grad_(True)  # peft freezes everything that is not an adapter
    return wrapped


def check_lora_targets(model: nn.Module, names) -> None:
    """ConfigError for a target name that matches no module, or a module LoRA cannot adapt (peft's
    rule for a list of names: the module's full name or its last dotted parts). peft refuses a list
    only when none matches, so `q_proj,vproj` trained q_proj's adapters alone and dropped v_proj's
    without a word; a block such as `mlp` passed this check and failed in peft after the process
    group had started, with the block's whole repr in the message."""
    if _lora_targets(names) == "all-linear":
        return
    if "all-linear" in names:  # peft's special value works alone; in a list it is looked up as a name
        raise ConfigError(
            f"model.lora.target_modules: all-linear adapts every linear layer and must be given alone, "
            f"got {','.join(names)}: set model.lora.target_modules=all-linear, or list module names"
        )
    modules = [(name, module) for name, module in model.named_modules() if name]
    unmatched, unsupported = [], []
    for target in names:
        matched = [module for name, module in modules if name == target or name.endswith("." + target)]
        if not matched:
            unmatched.append(target)
        for module in matched:
            if not isinstance(module, LORA_LAYER_TYPES):
                unsupported.append(f"{target} ({type(module).__name__})")
                break
    if unmatched or unsupported:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in modules if isinstance(m, nn.Linear)})
        problems = []
        if unmatched:
            problems.append(f"{', '.join(unmatched)} matches no module of the model")
        if unsupported:
            problems.append(f"{', '.join(unsupported)} is no layer LoRA can adapt")
        raise ConfigError(
            f"model.lora.target_modules: {'; '.join(problems)}; "
            f"its linear layers are {', '.join(linear)} (or give all-linear)"
        )


TOWER_PREFIXES = {
    "vision": ("vision_model.", "visual_projection"),
    "text": ("text_model.", "text_projection"),
}


def _tower_of(module_name: str) -> str | None:
    bare = module_name.split("base_model.model.", 1)[-1]
    return next((tower for tower, prefixes in TOWER_PREFIXES.items() if bare.startswith(prefixes)), None)


def lora_tower_left_frozen(model: nn.Module, cfg: ModelConfig) -> str | None:
    """Why a tower that is not locked gets no LoRA adapter (None when both get some, or all-linear).

    LoRA freezes every base weight, projections included: `token_embedding` alone (text only) or
    `patch_embedding` alone (vision only) left the other tower entirely frozen, a LiT the config
    never asked for (the README promises adapters in both towers), without a word."""
    names = cfg.lora.target_modules
    if _lora_targets(names) == "all-linear":
        return None
    adapted = {
        _tower_of(name)
        for name, module in model.named_modules()
        if isinstance(module, LORA_LAYER_TYPES) and any(name == t or name.endswith("." + t) for t in names)
    }
    locks = {"vision": ("lock_image", cfg.lock_image), "text": ("lock_text", cfg.lock_text)}
    for tower, (lock, locked) in locks.items():
        if tower in adapted or locked:
            continue
        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and _tower_of(name) == tower
            }
        )
        return (
            f"model.lora.target_modules={','.join(names)} adapts no layer of the {tower} tower, so LoRA "
            f"leaves it entirely frozen: set model.{lock}=true if that is meant, or add a target there "
            f"(its linear layers are {', '.join(linear)})"
        )
    return None


def check_model_config(cfg: ModelConfig) -> None:
    """ConfigError for what the model section names but cannot be built, found from config files
    alone, before any process group: a hub model this machine can neither find nor download, a
    LoRA target that matches no module. Both were found after the process group started (a typo
    cost a cluster start-up); the modules are built on the meta device, with no weights."""
    if cfg.name_or_path:
        try:
            config = pretrained_clip_config(cfg.name_or_path)
            check_pretrained_tokenizer(cfg.name_or_path, config)
        except OSError as exc:
            raise ConfigError(str(exc)) from exc
    else:
        check_image_size_fits_patches(cfg)
        config = preset_clip_config(cfg, _NamesOnlyTokenizer())
    if cfg.lora.enabled:
        with torch.device("meta"):
            check_lora_targets(CLIPModel(config), cfg.lora.target_modules)


def check_image_size_fits_patches(cfg: ModelConfig) -> None:
    """ConfigError unless a preset's image side is a whole number of its patches.

    Smaller than one patch, the patch convolution failed at the first forward. Not a multiple
    (model.image_size=60 with 8-pixel patches), the strided convolution and HF's patch grid both
    round down: every image's last pixel rows and columns never reached the model, without a word.
    """
    patch, (side, _) = PRESETS[cfg.preset].patch_size, preset_dims(cfg)
    if side < patch:
        raise ConfigError(
            f"model.image_size={side} is smaller than the {cfg.preset} preset's {patch}-pixel "
            f"patches; use at least {patch} (a multiple of {patch})"
        )
    if side % patch:
        below = side - side % patch
        raise ConfigError(
            f"model.image_size={side} is not a multiple of the {cfg.preset} preset's {patch}-pixel "
            f"patches, so the last {side % patch} pixel rows and columns of every image would be "
            f"dropped; use {below} or {below + patch}"
        )


class _NamesOnlyTokenizer:
    """What preset_clip_config reads of the tokenizer, for a model built only for its module names
    (which no vocabulary changes): the preset's tokenizer is trained later, on rank 0."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 1

    def __len__(self) -> int:
        return 1000


def _lora_targets(names) -> list[str] | str:
    """peft's special value "all-linear" (every linear layer but the output one) works only as a
    plain string; in a list it is looked for as a module name and not found."""
    names = list(names)
    return names[0] if names == ["all-linear"] else names


def lock_towers(model: nn.Module, cfg: ModelConfig) -> None:
    """Freeze a tower (and its projection), its LoRA adapters included.

    A locked tower is a fixed feature extractor (LiT): with LoRA on, adapters that kept training
    would still change its features, and lock_image would only have frozen the base weights,
    which LoRA freezes anyway.
    """
    prefixes = []
    if cfg.lock_image:
        prefixes += ["vision_model.", "visual_projection."]
    if cfg.lock_text:
        prefixes += ["text_model.", "text_projection."]
    for name, param in model.named_parameters():
        bare = name.split("base_model.model.", 1)[-1]
        if any(bare.startswith(p) for p in prefixes):
            param.requires_grad_(False)


def text_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The mask the text tower needs for a batch: None when every row is padded on the right.

    CLIP's text tower is causal and pools at the end-of-text token, so when pads only follow the
    text, no position up to the pooled one can attend to a pad: the pooled features are the same
    with or without the mask (tested). Passing it anyway costs a host sync per forward on a GPU
    (transformers reads ``mask.sum() == mask.numel()`` on the host to decide whether SDPA can run
    with ``is_causal`` alone). The check here runs on the batch's host copy, before it moves to
    the device; a device tensor, or any row padded elsewhere, keeps its mask.
    """
    if attention_mask.device.type != "cpu":
        return attention_mask
    right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
    return None if right_padded else attention_mask


class ClipTrainModule(nn.Module):
    """The module DeepSpeed wraps: features in, normalised features and logit scale out.

    forward(pixel_values [B,3,S,S] | None, input_ids [B,L] | None, attention_mask [B,L] | None)
      -> (image_features [B,E] | None, text_features [B,E] | None, logit_scale [], logit_bias [] | None)
    Either tower may be skipped (eval encodes class prompts without images).
    """

    def __init__(
        self,
        clip: nn.Module,
        use_bias: bool = False,
        init_scale: float | None = None,
        init_bias: float = -10.0,
    ):
        super().__init__()
        self.clip = clip
        base = self.base
        # DeepSpeed broadcasts parameters viewed as bytes, which fails for 0-dim tensors: keep a
        # 1-element logit scale while training; export turns it back into HF's scalar.
        data = base.logit_scale.data.reshape(1).clone()
        if init_scale is not None:
            data.fill_(init_scale)
        base.logit_scale = nn.Parameter(data)
        self.logit_bias = nn.Parameter(torch.full([1], init_bias)) if use_bias else None

    @property
    def base(self) -> CLIPModel:
        """The CLIPModel itself (inside the peft wrapper when LoRA is on; adapters are injected in place)."""
        clip = self.clip
        return clip.base_model.model if hasattr(clip, "peft_config") else clip

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        """Normalised image and text features (None where not given), the clamped scale and the bias."""
        base = self.base
        image = text = None
        if pixel_values is not None:
            image = F.normalize(base.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
        if input_ids is not None:
            out = base.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            text = F.normalize(out.pooler_output, dim=-1)
        scale = bounded_logit_scale(base.logit_scale).exp().reshape(())
        bias = self.logit_bias.reshape(()) if self.logit_bias is not None else None
        return image, text, scale, bias


def build_model(
    cfg: ModelConfig, tokenizer=None, use_bias: bool = False, init_scale: float | None = None
) -> ClipTrainModule:
    """The trainable module from the config (pretrained weights, or a preset's random init).

    With `use_bias` (SigLIP) the scale starts at `init_scale` and the bias at -10, unless the
    pretrained model was trained with a bias (a vutrain SigLIP export writes ``config.logit_bias``):
    fine-tuning it goes on from its learnt scale and bias, which were reset to ln 10 and -10.
    """
    init_bias = -10.0
    if cfg.name_or_path:
        clip = load_pretrained(cfg.name_or_path)[0]
        saved_bias = getattr(clip.config, "logit_bias", None)
        if use_bias and isinstance(saved_bias, int | float) and not isinstance(saved_bias, bool):
            init_scale, init_bias = None, float(saved_bias)
    else:
        if tokenizer is None:
            raise ValueError("a preset model needs the trained tokenizer to size its vocabulary")
        clip = CLIPModel(preset_clip_config(cfg, tokenizer))
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(clip, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            clip.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        drop_input_grad_hooks(clip)
    if cfg.lora.enabled:
        clip = apply_lora(clip, cfg)
        drop_input_grad_hooks(clip.base_model.model)  # peft adds them again under checkpointing
    lock_towers(clip, cfg)
    return ClipTrainModule(clip, use_bias=use_bias, init_scale=init_scale, init_bias=init_bias)


def drop_input_grad_hooks(clip: CLIPModel) -> None:
    """Remove the hooks that make the embeddings' outputs require grad (``enable_input_require_grads``).

    transformers adds them when checkpointing is enabled and peft when it wraps a checkpointed
    model: reentrant checkpointing needs an input that requires grad. Non-reentrant checkpointing
    (ours) does not, and with them a locked tower (model.lock_image: a LiT's ViT) was recomputed
    and back-propagated every step for no gradient, which without checkpointing it never is.
    """
    if getattr(clip, "_require_grads_hooks", None) or hasattr(clip, "_require_grads_hook"):
        clip.disable_input_require_grads()


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total


def tokenizer_and_processor(
    cfg: ModelConfig,
    run_dir: str,
    train_shards: str,
    caption_template: str,
    tokenizer_samples: int,
    is_main: bool,
    barrier,
) -> tuple:
    """(tokenizer, image processor, context_length).

    Pretrained models bring theirs. For presets the tokenizer is a byte-level BPE trained on the
    training texts, once, on rank 0, and saved in the run directory; the other ranks wait at the
    barrier and load it (a resumed run reuses it, so token ids never change under a checkpoint).
    """
    from transformers import AutoTokenizer

    if cfg.name_or_path:
        tokenizer, processor = load_pretrained_preprocessing(cfg.name_or_path)
        if is_main:
            warn_vocab_size_unused(cfg, len(tokenizer))
        return tokenizer, processor, pretrained_context_length(cfg.name_or_path, tokenizer)
    from vutrain.data.tokenizer import iter_shard_texts, train_bpe_tokenizer

    image_size, context = preset_dims(cfg)
    tok_dir = os.path.join(run_dir, "tokenizer")
    damage = check_saved_tokenizer(tok_dir, run_dir)  # every rank: each must refuse alike
    if is_main and (damage or not os.path.exists(os.path.join(tok_dir, "tokenizer.json"))):
        if damage:
            log.warning("%s does not load (%s); no checkpoint uses it: training it again", tok_dir, damage)
        texts = iter_shard_texts(train_shards, caption_template, limit=tokenizer_samples)
        train_bpe_tokenizer(texts, tok_dir, vocab_size=cfg.vocab_size, max_length=context)
    barrier()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    return tokenizer, preset_image_processor(image_size), context


def warn_vocab_size_unused(cfg: ModelConfig, pretrained_tokens: int) -> None:
    """A warning when model.vocab_size, set beside model.name_or_path, differs from the pretrained
    tokenizer's size: it sizes the BPE tokenizer of presets only, so the run used the model's own
    vocabulary without a word. A warning, not an error like model.image_size: the shipped tiny.yaml
    sets it, and `--config tiny model.name_or_path=DIR` is the ordinary way to fine-tune an export."""
    if cfg.vocab_size in (ModelConfig.vocab_size, pretrained_tokens):  # the default: nothing was asked
        return
    log.warning(
        "model.vocab_size=%d applies to presets only: the pretrained model %s brings its own tokenizer "
        "of %d tokens, which this run uses (unset model.vocab_size to silence this)",
        cfg.vocab_size,
        cfg.name_or_path,
        pretrained_tokens,
    )


def check_saved_tokenizer(tok_dir: str, run_dir: str) -> str | None:
    """Why the run's saved preset tokenizer does not load (None if it loads or is not there);
    a ConfigError when it does not load, or is missing, and checkpoints use it.

    An older version saved it in place, so a rank 0 killed mid-save left a truncated
    tokenizer.json that every later start failed to parse. Without checkpoints it is retrained;
    with them it is refused (ConfigError), because a retrained tokenizer can give other token ids
    than the ones the checkpoints' embeddings were trained on, with no error.
    """
    from vutrain.checkpoint import checkpoints_dir, list_tags, tokenizer_load_error

    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        tags = list_tags(checkpoints_dir(run_dir))
        if tags:  # a deleted folder was trained again without a word, under the checkpoints' ids
            raise ConfigError(
                f"{tok_dir}/tokenizer.json is missing and the checkpoints in {checkpoints_dir(run_dir)} "
                f"({tags[-1]}, ...) use its token ids, which a retrained tokenizer may not reproduce. "
                "Restore that folder from a copy (an export of this run holds the same tokenizer "
                "files), or set train.resume=never to start afresh (the old checkpoints are moved "
                "aside, not deleted)."
            )
        return None
    damage = tokenizer_load_error(tok_dir)
    if damage is None:
        return None
    tags = list_tags(checkpoints_dir(run_dir))
    if tags:
        raise ConfigError(
            f"{tok_dir} does not load ({damage}) and the checkpoints in {checkpoints_dir(run_dir)} "
            f"({tags[-1]}, ...) use its token ids, which a retrained tokenizer may not reproduce. "
            "Restore that folder from a copy (an export of this run holds the same tokenizer files), "
            "or set train.resume=never to start afresh (the old checkpoints and tokenizer are moved "
            "aside, not deleted)."
        )
    return damage
