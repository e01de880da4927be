"""Export a run to a Hugging Face CLIPModel directory.

    python -m vutrain.export RUN_DIR OUT_DIR [--tag step_00000100]

ZeRO shards (any stage) are consolidated into fp32 weights with DeepSpeed's own
zero_to_fp32 logic, LoRA adapters are merged into the base weights, and the tokenizer and image
processor are saved beside the model, so `CLIPModel.from_pretrained(OUT_DIR)` and
`pipeline("zero-shot-image-classification", model=OUT_DIR)` load it with no vutrain installed.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import sys

import torch
import yaml
from torch import nn

from vutrain import checkpoint as ckpt
from vutrain import config_yaml
from vutrain.config import ConfigError, load_config
from vutrain.model import (
    MAX_LOGIT_SCALE,
    build_model,
    load_pretrained_preprocessing,
    preset_dims,
    preset_image_processor,
    pretrained_context_length,
)

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """Bad input (no run, no usable checkpoint, weights that do not fit the run's model): one line."""


# Training-only keys, set to values that always validate: the run's config must load on the
# exporting machine whatever it said about training. The shards and the ds_config may be gone
# (export reads neither), the checkpoint is read as fp32 whatever the run trained in (so an fp16
# run, which validates only where CUDA is, exports on a CPU-only machine), and a run written
# before a validation rule was added (the schedule, the augmentation) still exports.
EXPORT_OVERRIDES = [
    "train.resume=never",
    "train.ds_config=",
    "train.precision=fp32",
    "train.min_lr_ratio=0",
    "data.random_resized_crop=false",
]


# A preset run's checkpoints are trained on its own BPE token ids: no other tokenizer will do.
RESTORE_TOKENIZER = (
    "the checkpoints' embeddings use that tokenizer's token ids, so restore the folder from a copy "
    "(an earlier export of this run, or the run it was resumed from, holds the same files)"
)


def load_run_tokenizer_and_processor(cfg, run_dir: str, tag_dir: str | None = None):
    """The run's tokenizer and image processor (the pretrained ones, or those the run saved).

    A pretrained tokenizer gets the context length the run trained with as its model_max_length:
    it may allow more tokens (10**30 when saved without a limit) than the text tower has
    positions, and the exported one then let `truncation=True` run past them. A preset's is the
    folder of the run holding the tokenizer the checkpoint in ``tag_dir`` records
    (`recorded_tokenizer_dir`), with the preset's context length as its model_max_length too.
    """
    from transformers import AutoTokenizer

    if cfg.model.name_or_path:
        tokenizer, processor = load_pretrained_preprocessing(cfg.model.name_or_path)
        tokenizer.model_max_length = pretrained_context_length(cfg.model.name_or_path, tokenizer)
        # The run padded on the right (HF CLIP pools at the first eos); a tokenizer saved with
        # left padding exported as it was, and a batched pipeline pooled padded captions at a pad.
        tokenizer.padding_side = "right"
        return tokenizer, processor
    tok_dir = os.path.join(run_dir, "tokenizer")
    if tag_dir is not None:
        tok_dir = recorded_tokenizer_dir(run_dir, tag_dir)
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        raise ExportError(f"{tok_dir}/tokenizer.json not found: {RESTORE_TOKENIZER}")
    damage = ckpt.tokenizer_load_error(tok_dir)  # a truncated tokenizer.json: a JSONDecodeError traceback
    if damage is not None:
        raise ExportError(f"{tok_dir} does not load ({damage}): {RESTORE_TOKENIZER}")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    image_size, context_length = preset_dims(cfg.model)
    # The run cut captions at the context length it trained with (tokenize_batch's max_length), not
    # at the limit saved with the tokenizer: a start that died before its first checkpoint and was
    # restarted with a smaller model.context_length reused the tokenizer saved for the larger one,
    # and the export's `truncation=True` ran past the text tower's positions (a ValueError).
    tokenizer.model_max_length = context_length
    tokenizer.padding_side = "right"
    return tokenizer, preset_image_processor(image_size)


def recorded_tokenizer_dir(run_dir: str, tag_dir: str) -> str:
    """The run's tokenizer folder whose vocabulary the checkpoint's COMPLETE.json records.

    RUN/tokenizer when it matches (or the checkpoint records none: older runs), else a folder
    train.resume=never moved aside (``tokenizer.replaced-*``, newest first) that holds it; the
    export paired the weights with RUN/tokenizer whatever it held (a retrained or wrong copy put
    there by hand: other words under the embeddings' token ids, without a word). ExportError when
    no folder of the run holds it and RUN/tokenizer holds another that loads.
    """
    default = os.path.join(run_dir, "tokenizer")
    marker = ckpt.read_marker(tag_dir) or {}
    expected = marker.get(ckpt.TOKENIZER_KEY)
    if not isinstance(expected, str):
        return default
    folders = [default, *run_tokenizer_asides(run_dir)]
    found = next((d for d in folders if ckpt.tokenizer_fingerprint(d) == expected), None)
    if found is not None:
        if found != default:
            log.warning(
                "checkpoint %s was trained with the tokenizer in %s: exporting that one", tag_dir, found
            )
        return found
    actual = ckpt.tokenizer_fingerprint(default)
    if actual is None:  # missing or unreadable: the caller says so, and to restore it
        return default
    raise ExportError(
        f"{os.path.basename(tag_dir)} was trained with another tokenizer than {default} (vocabulary "
        f"sha256 {expected[:12]} recorded in its {ckpt.MARKER}, {actual[:12]} there) and no tokenizer "
        f"folder of {run_dir} holds it: {RESTORE_TOKENIZER}"
    )


def run_tokenizer_asides(run_dir: str) -> list[str]:
    """The tokenizer folders train.resume=never moved aside in ``run_dir``, newest first."""
    try:
        names = os.listdir(run_dir)
    except OSError:
        return []
    asides = sorted((n for n in names if n.startswith("tokenizer.replaced-")), reverse=True)
    return [os.path.join(run_dir, n) for n in asides]


def consolidated_state_dict(
    ckpt_dir: str, tag: str, module: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Every weight of checkpoint ``tag`` on the CPU: the optimizer's fp32 masters where it kept them.

    DeepSpeed's zero_to_fp32 reads the trainable parameters from the ZeRO optimizer partitions and
    the frozen ones (LoRA's base weights, a locked tower) from fragments the engine saves only when
    it partitions gradients (ZeRO-2/3). ZeRO-0 writes no partitions and ZeRO-1 no frozen
    fragments; both save the whole module in mp_rank_00_model_states.pt, which fills those in.
    A ZeRO-0 run in bf16 or fp16 keeps its fp32 masters unnamed in the optimizer's state; `module`
    (the run's model, built as it trained) names them.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model_file = os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt")
    if not os.path.isfile(model_file):  # ZeRO-3: one zero_pp_rank_R_... file per rank, no whole module
        return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    saved = torch.load(model_file, map_location="cpu", weights_only=False)  # a run dir is trusted
    stage = ((saved.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0)
    module_state = saved["module"]
    if stage == 0:
        masters = zero0_fp32_masters(saved.get("optimizer"), module) if module is not None else {}
        return {**module_state, **masters}
    state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    for name, value in module_state.items():
        state.setdefault(name, value)
    return state


def checkpoint_weights(ckpt_dir: str, tag: str, folder: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """`consolidated_state_dict` of ``folder``, or ExportError in one line when its files do not load.

    The marker checks names and sizes only: bytes a machine crash or a bad disk damaged at the
    listed sizes, or files a run still training pruned during the read, gave a torch.load or
    zero_to_fp32 traceback (RuntimeError, UnpicklingError, ValueError) instead of the advice to
    export another checkpoint.
    """
    try:
        return consolidated_state_dict(ckpt_dir, folder, module)
    except ExportError:
        raise
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        others = [
            t
            for t in ckpt.list_tags(ckpt_dir)
            if t != tag and ckpt.verify_tag(os.path.join(ckpt_dir, t)) is None
        ]
        raise ExportError(
            f"checkpoint {tag} in {ckpt_dir} does not load ({reason}): its files are damaged or were "
            f"removed meanwhile; export another with --tag (complete ones: {', '.join(others) or 'none'})"
        ) from exc


def zero0_fp32_masters(optimizer_state: dict | None, module: nn.Module) -> dict[str, torch.Tensor]:
    """The fp32 masters of a ZeRO-0 run in bf16/fp16, by parameter name ({} in fp32: none kept).

    DeepSpeed's FP16 optimizers save them per optimizer group, in the order of the groups
    `vutrain.optim.param_groups` built: one tensor per parameter (the unfused wrapper, around the
    trainer's torch AdamW) or one flat tensor per group (the fused one, around a ds_config's Adam).
    Without them the export would carry the weights rounded to 16 bits (bf16: about 0.4% off each).
    """
    from vutrain.optim import param_groups

    saved = (optimizer_state or {}).get("fp32_groups") or (optimizer_state or {}).get("fp32_groups_flat")
    if not saved:
        return {}
    ids = {id(param): name for name, param in module.named_parameters()}
    groups = [[ids[id(param)] for param in group["params"]] for group in param_groups(module, 0.0)]
    params = dict(module.named_parameters())
    masters: dict[str, torch.Tensor] = {}
    if len(saved) != len(groups):
        raise ExportError(
            f"the checkpoint's optimizer has {len(saved)} groups, the run's model {len(groups)}"
        )
    for names, values in zip(groups, saved):
        shapes = [params[name].shape for name in names]
        if isinstance(values, torch.Tensor):  # one flat tensor per group
            sizes = [shape.numel() for shape in shapes]
            if values.numel() != sum(sizes):
                raise ExportError(
                    f"the checkpoint's fp32 masters ({values.numel()}) do not fit the model ({sum(sizes)})"
                )
            values = [v.view(shape) for v, shape in zip(values.split(sizes), shapes)]
        if [tuple(v.shape) for v in values] != [tuple(shape) for shape in shapes]:
            raise ExportError(
                "the checkpoint's fp32 masters do not fit the run's model: was it changed since?"
            )
        masters.update({name: value.float() for name, value in zip(names, values)})
    return masters


def keep_pretrained_frozen_weights(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Frozen weights of a pretrained model (LoRA's base layers, a locked tower) as they were loaded.

    A bf16 or fp16 run's checkpoint holds them rounded to 16 bits: DeepSpeed keeps no fp32 master
    of a weight that never trains. `module` was just built from model.name_or_path in fp32, so
    where a saved frozen weight is exactly that weight rounded, `state` takes the original.
    """
    for name, param in module.named_parameters():
        saved = state.get(name)
        if param.requires_grad or saved is None or saved.shape != param.shape:
            continue
        original = param.detach()
        if any(
            torch.equal(original.to(dtype).float(), saved.float())
            for dtype in (torch.bfloat16, torch.float16)
        ):
            state[name] = original.clone()


def check_shapes(module: nn.Module, state: dict[str, torch.Tensor], tag: str) -> None:
    """ExportError when a saved weight's shape differs from the model the run's config builds.

    The config.yaml (a preset, image_size, context_length) or the model.name_or_path directory
    changed since the run: load_state_dict raised its multi-line RuntimeError, a traceback.
    """
    expected = module.state_dict()
    wrong = [
        f"{name} {tuple(value.shape)} vs {tuple(expected[name].shape)}"
        for name, value in state.items()
        if name in expected and value.shape != expected[name].shape
    ]
    if wrong:
        raise ExportError(
            f"checkpoint {tag} does not fit the model its run's config builds ({len(wrong)} weights "
            f"differ, saved vs built: {'; '.join(wrong[:3])}): was config.yaml or model.name_or_path "
            "changed since the run? Restore them as they were when it trained"
        )


def checkpoint_to_export(ckpt_dir: str, tag: str | None) -> tuple[str, str]:
    """(tag, the folder in ``ckpt_dir`` holding it complete): ``tag``, or the newest when None.

    A save killed after its COMPLETE.json but before its rename is complete under ``<tag>.tmp``
    (the next training start publishes it): the export took the checkpoint before it, and
    ``--tag`` of it said the marker was missing. It is read where it is, leaving the run as it is.
    """
    unpublished = ckpt.complete_unpublished(ckpt_dir)
    published = [t for t in ckpt.list_tags(ckpt_dir) if ckpt.verify_tag(os.path.join(ckpt_dir, t)) is None]
    complete = sorted(set(published) | set(unpublished), key=lambda t: int(ckpt.TAG_RE.match(t).group(1)))
    if tag is None:
        if not complete:
            raise FileNotFoundError(
                f"no checkpoint in {ckpt_dir}: train first (train.checkpoint_every, "
                "or let the run finish: it always saves at the end)"
            )
        tag = complete[-1]
    elif tag not in unpublished and not any(
        is_tag_folder(ckpt_dir, name) for name in (tag, tag + ckpt.TMP_SUFFIX)
    ):
        # No folder at all, not even an interrupted save's: verify_tag's "COMPLETE.json is missing
        # (save interrupted...)" sent the user looking for a save that never happened (a typo).
        raise ExportError(
            f"--tag {tag} cannot be exported: {tag}/{ckpt.MARKER} and its folder do not exist: no such "
            f"checkpoint in {ckpt_dir}; complete checkpoints there: {', '.join(complete) or 'none'}"
        )
    elif tag not in unpublished and (problem := ckpt.verify_tag(os.path.join(ckpt_dir, tag))) is not None:
        raise ExportError(
            f"--tag {tag} cannot be exported: {problem}; complete checkpoints in {ckpt_dir}: "
            f"{', '.join(complete) or 'none'}"
        )
    # The unpublished copy is the newer save of its step (a re-save killed before its renames).
    return tag, unpublished.get(tag, tag)


def is_tag_folder(ckpt_dir: str, tag: str) -> bool:
    """Whether ``tag`` names a folder under ``ckpt_dir`` other than ``ckpt_dir`` or one above it.

    `--tag ""` (an unset variable) or `--tag .` named the checkpoints folder, and `--tag ..` the
    run's: each was told its save was interrupted (the folder holds no COMPLETE.json) rather than
    that no such checkpoint exists. `../checkpoints.replaced-S/step_X` is a tag folder.
    """
    path = os.path.realpath(os.path.join(ckpt_dir, tag))
    checkpoints = os.path.realpath(ckpt_dir)
    above = path == checkpoints or checkpoints.startswith(path.rstrip(os.sep) + os.sep)
    return os.path.isdir(path) and not above


def export_overrides(config_path: str) -> list[str]:
    """EXPORT_OVERRIDES, plus the preset-only sizes reset for a pretrained run's config.yaml.

    Since 2026-12-06 `model.image_size` / `model.context_length` beside `model.name_or_path` are a
    config error (the pretrained model always kept its own); a run saved before could hold them,
    and its export would stop on a setting it never used."""
    try:
        with open(config_path, encoding="utf-8-sig") as fh:
            saved = config_yaml.load(fh.read()) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        # A config.yaml that does not parse (a typo made by hand, a write cut short) was a YAML
        # traceback from here; load_config, which reads it next, says where in one line.
        return list(EXPORT_OVERRIDES)
    model = saved.get("model") if isinstance(saved, dict) else None
    if isinstance(model, dict) and model.get("name_or_path"):
        return [*EXPORT_OVERRIDES, "model.image_size=0", "model.context_length=0"]
    return list(EXPORT_OVERRIDES)


def load_trained_module(run_dir: str, tag: str | None = None):
    """(ClipTrainModule with the checkpoint's fp32 weights, tokenizer, image processor, tag)."""
    if not run_dir:
        # `RUN_DIR="$UNSET"`: the current folder was read, and said "config.yaml not found" or, run
        # from inside some other run, exported that one without a word.
        raise ExportError("RUN_DIR is empty (an unset variable?): give the training run's output_dir")
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: RUN_DIR must be a training output_dir")
    cfg = load_config(config_path, export_overrides(config_path))
    ckpt_dir = ckpt.checkpoints_dir(run_dir)
    tag, folder = checkpoint_to_export(ckpt_dir, tag)
    tokenizer, processor = load_run_tokenizer_and_processor(cfg, run_dir, os.path.join(ckpt_dir, folder))
    module = build_model(cfg.model, tokenizer, use_bias=cfg.loss.name == "siglip")
    state = checkpoint_weights(ckpt_dir, tag, folder, module)
    if cfg.model.name_or_path:
        keep_pretrained_frozen_weights(module, state)
    check_shapes(module, state, tag)
    missing, unexpected = module.load_state_dict(state, strict=False)
    # Buffers such as position_ids are rebuilt by the constructor; weights must all be there.
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ExportError(
            f"checkpoint {tag} does not match the run's model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return module.eval(), tokenizer, processor, tag


def to_hf_clip(module) -> transformers.CLIPModel:  # noqa: F821
    """The plain CLIPModel: LoRA merged, HF's scalar logit scale restored (clamped to [0, ln 100])."""
    clip = module.clip
    if hasattr(clip, "peft_config"):
        clip = clip.merge_and_unload()
    # Training clamps the scale in the forward only (model.bounded_logit_scale), so the parameter
    # may sit a little past ln(100); the exported model, which HF uses unclamped, gets the value
    # the run trained with.
    scale = clip.logit_scale.detach().reshape(()).clamp(0.0, MAX_LOGIT_SCALE).clone()
    clip.logit_scale = nn.Parameter(scale)
    if getattr(module, "logit_bias", None) is not None:
        # CLIPModel has no bias parameter: SigLIP's learnt bias rides in config.json, so
        # `CLIPModel.from_pretrained(d).config.logit_bias` gives back sigmoid(s * x.y + b).
        clip.config.logit_bias = float(module.logit_bias.detach().reshape(()))
    elif hasattr(clip.config, "logit_bias"):
        # A SigLIP export fine-tuned with the CLIP loss: its bias was learnt with the old scale and
        # is no part of this model; kept, a later SigLIP fine-tune or any sigmoid(s * x.y + b) used it.
        del clip.config.logit_bias
    for param in clip.parameters():
        param.requires_grad_(True)
    return clip


# Entries an OUT_DIR may already hold: transformers reads none of them and the export writes none,
# so nothing there is loaded with the export or overwritten by it. A fresh ext4 volume holds
# lost+found; a hub repo cloned to push the model (`git clone hf-repo && export RUN hf-repo`)
# holds its git files and model card. Both were refused as "not empty".
NOT_MODEL_FILES = frozenset({"lost+found", ".git", ".gitattributes", ".gitignore", "README.md"})


def model_files_in(out_dir: str) -> list[str]:
    """The entries of the folder ``out_dir`` other than NOT_MODEL_FILES, sorted ([] when it is new)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(name for name in os.listdir(out_dir) if name not in NOT_MODEL_FILES)


def check_out_dir(out_dir: str) -> None:
    """ExportError unless OUT_DIR is new or holds no entry other than NOT_MODEL_FILES.

    save_pretrained adds its files to whatever the folder holds, and from_pretrained reads what it
    finds there: an earlier peft adapter (adapter_config.json) was applied on top of the exported
    weights, silently giving other embeddings. RUN_DIR itself, or a folder above it, is refused too.
    """
    if not out_dir:
        # `OUT_DIR="$UNSET"`: the current folder, filled after the whole consolidation, or refused
        # then as "filled during the export" by the files it already held.
        raise ExportError("OUT_DIR is empty (an unset variable?): give the folder to write the model to")
    if os.path.islink(out_dir) and not os.path.exists(out_dir):
        # found only by the final rename (ENOTDIR), after the whole model was consolidated and written
        raise ExportError(
            f"OUT_DIR {out_dir} is a symlink to {os.readlink(out_dir)}, which does not exist: "
            "create that folder or give a new one"
        )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"OUT_DIR {out_dir} is a file: give a new folder")
    held = model_files_in(out_dir)
    leftovers = [name for name in held if STAGING_RE.fullmatch(name)]
    if leftovers and len(leftovers) == len(held):
        # A mount point (a docker or Kubernetes volume) cannot be removed: "remove the folder"
        # left the user nothing to do. The leftover is not removed here: a pid that no process here
        # runs may be an export on another host or container sharing the folder.
        paths = " ".join(shlex.quote(os.path.join(out_dir, name)) for name in leftovers)
        raise ExportError(
            f"OUT_DIR {out_dir} holds {', '.join(leftovers)}, left by an export that was killed (or "
            f"is still running elsewhere): once no export writes there, remove it (rm -rf {paths}) "
            "and export again, or give a new folder"
        )
    if held:
        shown = ", ".join(held[:5]) + (f", ... ({len(held) - 5} more)" if len(held) > 5 else "")
        raise ExportError(
            f"OUT_DIR {out_dir} is not empty ({len(held)} entries: {shown}): transformers would load "
            "those files with the export's; remove the folder or give a new one, or remove those "
            f"entries from it (a mount point: only {', '.join(sorted(NOT_MODEL_FILES))} may stay)"
        )
    check_writable(out_dir)


# The hidden folder an export stages its files in, inside an existing OUT_DIR (fill_empty_folder).
STAGING_RE = re.compile(r"\.export\.\d+\.incomplete")


def check_writable(out_dir: str) -> None:
    """ExportError unless the export can create its staging folder where it will: inside OUT_DIR
    when it exists, else in the nearest existing folder above it (the parent, or where makedirs
    starts). Found otherwise by that mkdir, after the whole consolidation (minutes for a large
    model): a read-only volume, a folder of another user, a parent path that runs through a file.

    A real mkdir rather than os.access: access() says yes to root whatever the folder's mode, and
    to a file system such as /proc that takes no new entries.
    """
    where = os.path.abspath(out_dir)
    if not os.path.isdir(where):
        where = os.path.dirname(where)
        while not os.path.isdir(where):
            if os.path.lexists(where):  # a file, or a symlink to nothing: no folder can be made under it
                raise ExportError(
                    f"OUT_DIR {out_dir} cannot be created: {where} is not a folder; "
                    "give a path under a folder"
                )
            where = os.path.dirname(where)
    probe = os.path.join(where, f".export.{os.getpid()}.incomplete")
    try:
        os.mkdir(probe)
    except FileExistsError:
        return  # our own pid's leftover (a pid reused in a container): the staging code replaces it
    except OSError as exc:
        raise ExportError(
            f"OUT_DIR {out_dir} cannot be written: no folder can be created in {where} ({exc.strerror}); "
            "give a folder you can write to"
        ) from exc
    os.rmdir(probe)


def write_hf_folder(out_dir: str, clip, tokenizer, processor) -> None:
    """Write model, tokenizer and image processor so that OUT_DIR never holds a half model that loads.

    Written in place, a failure part way (a full disk, a kill) left config.json and the weights
    without the tokenizer or processor: a folder that CLIPModel.from_pretrained loads as complete.
    A new OUT_DIR is written as a hidden sibling and renamed; an existing one (empty, or holding
    only NOT_MODEL_FILES) is filled from a hidden folder inside it, config.json last.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir):
        fill_empty_folder(out_dir, clip, tokenizer, processor)
        return
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    partial = os.path.join(parent, f".{name}.{os.getpid()}.incomplete")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed export that had this pid
    os.mkdir(partial)  # not mkdtemp: its mode 0700 would make the export unreadable to others
    try:
        save_hf_files(partial, clip, tokenizer, processor)
        os.replace(partial, out_dir)  # one created and filled meanwhile fails
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def save_hf_files(folder: str, clip, tokenizer, processor) -> None:
    """Model, tokenizer and image processor into ``folder``, readable like the user's other files."""
    clip.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    share_like_other_files(folder)


def fill_empty_folder(out_dir: str, clip, tokenizer, processor) -> None:
    """Export into the existing folder ``out_dir`` (empty, or holding only NOT_MODEL_FILES, which
    stay as they are): staged inside it, then moved up, config.json last.

    No rename can replace it where it is a mount point (a docker or Kubernetes volume: EBUSY, and
    its sibling lies on another file system), a symlink to a folder (ENOTDIR), or a folder in a
    parent the user may not write (EACCES): the export wrote the whole model beside it and then
    failed. Without config.json, which comes last, transformers loads no model from a part.
    """
    check_still_free(out_dir, model_files_in(out_dir))  # the consolidation took minutes
    staging = os.path.join(out_dir, f".export.{os.getpid()}.incomplete")
    os.mkdir(staging)
    moved: list[str] = []
    try:
        save_hf_files(staging, clip, tokenizer, processor)
        check_still_free(out_dir, [n for n in model_files_in(out_dir) if n != os.path.basename(staging)])
        names = sorted(os.listdir(staging), key=lambda n: n == "config.json")
        clash = sorted(set(names) & set(os.listdir(out_dir)))
        if clash:  # a file the export does not own is never replaced (NOT_MODEL_FILES names none it writes)
            raise ExportError(f"OUT_DIR {out_dir} holds {', '.join(clash)}, which the export would replace")
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
            moved.append(name)
        os.rmdir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for name in moved:  # back to the folder it was
            remove_path(os.path.join(out_dir, name))
        raise


def check_still_free(out_dir: str, written: list[str]) -> None:
    """ExportError when ``written`` (entries another export or a user wrote into OUT_DIR while this
    one ran) is not empty: neither set of files would be whole."""
    if written:
        raise ExportError(
            f"OUT_DIR {out_dir} was filled during the export ({', '.join(written[:5])}): "
            "give a new folder and export again"
        )


def remove_path(path: str) -> None:
    """Remove a file or a folder tree, whichever ``path`` is; nothing when it is gone."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def share_like_other_files(folder: str) -> None:
    """Give the folder's files the mode the umask gives new files (0644 under umask 022).

    safetensors writes model.safetensors with mode 0600 whatever the umask, so on a shared
    machine every other user (a teammate, the serving account) got PermissionError loading it.
    """
    umask = os.umask(0)
    os.umask(umask)  # the only portable way to read it
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)


def export(run_dir: str, out_dir: str, tag: str | None = None) -> str:
    """Export the run's checkpoint ``tag`` (default: newest) as an HF CLIPModel directory."""
    # A `~` the shell left (`OUT="~/exports/a"` quotes it; so does a launcher's argument list) is
    # the home folder, as in the run's config (config.HOME_PATH_KEYS): OUT_DIR was written into a
    # folder named `~` under the current one, and RUN_DIR was "not found".
    run_dir, out_dir = os.path.expanduser(run_dir), os.path.expanduser(out_dir)
    check_out_dir(out_dir)  # before the consolidation, which takes minutes for a large model
    module, tokenizer, processor, tag = load_trained_module(run_dir, tag)
    write_hf_folder(out_dir, to_hf_clip(module), tokenizer, processor)
    log.info("exported %s/%s to %s", run_dir, tag, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m vutrain.export``; returns the process exit code."""
    # The name the user typed: the console script's usage said "python -m vutrain.export".
    console = os.path.basename(sys.argv[0] if sys.argv else "").startswith("vutrain-export")
    prog = "vutrain-export" if console else "python -m vutrain.export"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with torch.no_grad():
            out_dir = export(args.run_dir, args.out_dir, args.tag)
    except (ExportError, ConfigError, OSError) as exc:  # bad input: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
