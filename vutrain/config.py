"""Run configuration: a tree of small dataclasses, loaded from YAML, overridden by `section.key=value`.

Each field is followed by a one-line docstring; `field_docs()` reads those strings back from the
source so they double as the config reference (`python -m vutrain.config --help`) and the README
table. Everything here is validated before any process group starts (`validate()`), so a typo
fails in a second with a message naming the key and the valid choices instead of after minutes of
start-up on every rank.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import logging
import math
import os
import re
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import yaml

from vutrain import config_yaml

PRESETS = ("tiny", "vit-b-32", "vit-b-16", "vit-l-14")
HIDDEN_ACTS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")  # model.hidden_act; "" = HF's default
PRECISIONS = ("fp32", "bf16", "amp_bf16", "fp16")
ACCUMULATIONS = ("gradcache", "plain")
COMPILE_SCOPES = ("layers", "model")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
LOSSES = ("clip", "siglip", "align_uniform")
BACKENDS = ("torch", "triton", "auto")
POSITIVES = ("pair", "category", "tags")
# loss.<key> -> the loss names it applies to; a non-default value with another loss is an error.
LOSS_KEYS_APPLY_TO = {
    "local_loss": ("clip",),
    "gather_with_grad": ("clip",),
    "positives": ("clip", "siglip"),
    "bidir": ("siglip",),
    "align_weight": ("align_uniform",),
    "uniform_weight": ("align_uniform",),
    "uniform_t": ("align_uniform",),
}


MIN_VOCAB_SIZE = 2 + 256
"""The smallest vocabulary a byte-level BPE has: bos, eos and the 256 byte symbols, no merge."""


class ConfigError(ValueError):
    """A configuration mistake, raised before any process group starts."""


# A user ds_config's "optimizer" of these types is built by DeepSpeed with train.*'s settings.
DS_ADAM_TYPES = ("adam", "adamw")
# What DeepSpeed's torch_autocast.dtype accepts for bfloat16 (train.precision=amp_bf16).
AUTOCAST_BF16_NAMES = ("bfloat16", "bf16", "torch.bfloat16")


@dataclass
class LoraConfig:
    """LoRA adapters on both towers (peft)."""

    enabled: bool = False
    """Wrap both towers with peft LoRA adapters (the base weights stay frozen)."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (effective scale alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names to adapt in both towers (comma-separated on the command line; all-linear: all)."""


@dataclass
class ModelConfig:
    """Architecture or pretrained weights, tokenizer, frozen towers, checkpointing and LoRA."""

    preset: str = "tiny"
    """Random-init architecture: tiny (CPU), vit-b-32, vit-b-16, vit-l-14 (OpenAI's shapes)."""
    name_or_path: str = ""
    """Local HF CLIPModel directory or hub name; wins over preset (pretrained weights and tokenizer)."""
    image_size: int = 0
    """Input resolution for presets; 0 keeps the preset's own (64 for tiny, 224 otherwise)."""
    context_length: int = 0
    """Tokenizer max length for presets; 0 keeps the preset's own (32 for tiny, 77 otherwise)."""
    vocab_size: int = 4096
    """Target vocabulary of the BPE tokenizer trained on the training texts (presets only)."""
    hidden_act: str = ""
    """Preset MLP activation: '' (HF's quick_gelu), gelu (open_clip's from scratch), gelu_pytorch_tanh."""
    lock_image: bool = False
    """Freeze the image tower (LiT-style), its LoRA adapters included."""
    lock_text: bool = False
    """Freeze the text tower, its LoRA adapters included."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    """Shards, loader workers, preprocessing and augmentation, captions and the tokenizer sample."""

    train_shards: str = ""
    """Training shards: brace-expandable tar list; '::' joins several sources."""
    val_shards: str = ""
    """Validation shards for retrieval and zero-shot eval (same syntax); required when eval.every > 0."""
    num_samples: int = 0
    """Samples per epoch; 0 reads the shards' sizes.json / __len__ / *_stats.json."""
    num_workers: int = -1
    """DataLoader worker processes per rank; -1: auto (this rank's share of the cores, less one)."""
    prefetch_factor: int = 2
    """Batches each loader worker prepares ahead (pinned when CUDA is available)."""
    stall_warning_s: float = 300.0
    """Warn when a rank has waited this long for its next batch (again as the wait doubles); 0: off."""
    fast_preprocess: bool = True
    """Workers send uint8 crops, normalised on the device; false: the processor-exact float path on CPU."""
    random_resized_crop: bool = False
    """open_clip's training augmentation on the device: RandomResizedCrop(scale 0.9-1.0), bicubic."""
    shuffle_buffer: int = 1000
    """Sample shuffle buffer size (per worker)."""
    resampled: bool = False
    """Sample shards with replacement (no per-epoch shard split; any shard count works)."""
    caption_template: str = "{title}"
    """Caption built from <key>.json: e.g. '{title}' or '{title}. tags: {tags}'."""
    tokenizer_samples: int = 50000
    """Texts read from the training shards to train the preset tokenizer."""
    allow_missing_shards: bool = False
    """Accept brace ranges that name missing local shards (warns with the count); false: an error."""
    restart_stream: bool = False
    """Resume over changed shards or data settings: keep model, optimizer, step; data from the next epoch."""


@dataclass
class TrainConfig:
    """Steps, batch sizes, ZeRO, precision, optimizer and schedule, checkpoints and logging."""

    max_steps: int = 100
    """Optimizer steps to train."""
    micro_batch_size: int = 32
    """Samples per rank per forward pass."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (see train.accumulation for how their negatives combine)."""
    accumulation: str = "gradcache"
    """gradcache (one loss over the whole step, every sample a negative) or plain (a loss per micro-batch)."""
    global_batch_size: int = 0
    """Samples per step over all ranks; derives grad_accum_steps (keep it 1) for any world size; 0: off."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    precision: str = "fp32"
    """fp32, bf16 (bf16 weights), amp_bf16 (fp32 weights, bf16 autocast) or fp16 (needs a CUDA GPU)."""
    lr: float = 5e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.0
    """Cosine schedule floor as a fraction of lr."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.2
    """AdamW weight decay (never applied to norms, biases, embeddings' gains or the logit scale)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Gradient norm clipping; 0 disables."""
    checkpoint_every: int = 50
    """Save a DeepSpeed checkpoint every N steps (and always at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    resume: str = "auto"
    """auto (newest checkpoint in output_dir, if any), never, or a checkpoint directory path."""
    ds_config: str = ""
    """A DeepSpeed JSON merged over the generated config (e.g. launch/ds_configs/zero3_offload.json)."""
    log_every: int = 1
    """Write a metrics row every N steps and at the last step."""
    max_nonfinite_steps: int = 5
    """Stop with an error after this many non-finite losses in a row (each is skipped)."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""
    compile: bool = False
    """torch.compile both towers, forward and backward (how: train.compile_scope)."""
    compile_backend: str = "inductor"
    """torch.compile backend with train.compile: inductor (fused kernels), aot_eager (capture only), ..."""
    compile_scope: str = "layers"
    """With train.compile: layers (each block; ZeRO reduces during backward) or model (engine.compile)."""
    compile_mode: str = "default"
    """Inductor mode with train.compile: default, reduce-overhead (CUDA graphs), max-autotune, ..."""


@dataclass
class LossConfig:
    """The training objective and how it is computed across ranks."""

    name: str = "clip"
    """clip (softmax InfoNCE), siglip (sigmoid) or align_uniform (alignment + uniformity)."""
    backend: str = "torch"
    """torch, triton (fused kernels) or auto (triton on CUDA)."""
    local_loss: bool = True
    """Score local rows against all gathered columns (O(local x global) memory)."""
    gather_with_grad: bool = True
    """Backpropagate through the feature all-gather (needed for exact gradients with local_loss)."""
    positives: str = "pair"
    """clip/siglip positives: pair (own title only), category (same category_id) or tags (a shared tag)."""
    bidir: bool = False
    """siglip: pass text features around the ring of ranks instead of all-gathering them."""
    align_weight: float = 1.0
    """align_uniform: weight of the alignment term."""
    uniform_weight: float = 1.0
    """align_uniform: weight of the uniformity term."""
    uniform_t: float = 2.0
    """align_uniform: uniformity temperature t in log mean exp(-t ||x - y||^2), > 0."""


@dataclass
class EvalConfig:
    """Periodic evaluation: retrieval, zero-shot and tag metrics."""

    every: int = 0
    """Evaluate every N steps (0 disables periodic eval; eval still runs at the end with val_shards)."""
    zeroshot_field: str = "category_name"
    """<key>.json field whose distinct values are the zero-shot classes."""
    batch_size: int = 64
    """Eval batch size per rank."""
    templates: list = field(
        default_factory=lambda: ["a thumbnail of {}.", "a photo of a {}.", "a video about {}.", "{}"]
    )
    """Zero-shot prompt templates ('{}' is the class name); class embeddings are their mean."""
    tag_vocab_size: int = 1000
    """Multi-label retrieval over the N most frequent validation tags (eval/tags_map, tags_r*); 0: off."""


@dataclass
class RunConfig:
    """A whole run: output, seed and one section per concern."""

    output_dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, checkpoints/, tokenizer/, plots, logs."""
    seed: int = 0
    """Seed for model init, data order and dropout."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- docs


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring that follows each field in the class body, keyed by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def iter_fields(cls: type = RunConfig, prefix: str = ""):
    """Yield (dotted key, type, default, doc) for every leaf field."""
    hints = _hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, getattr(defaults, f.name), field_docs(cls).get(f.name, "")


def reference_markdown() -> str:
    """The config reference as a markdown table (used for the README)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, _, default, doc in iter_fields():
        shown = ",".join(default) if isinstance(default, list) else default
        rows.append(f"| `{key}` | `{shown!s}` | {doc} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- parsing


def _exact_int(value: Any) -> int | None:
    """An integer's text read exactly ("010" is ten, "0x10" sixteen), None for any other text."""
    text = str(value).strip()
    for base in (10, 0):  # base 0 reads 0x/0o/0b but refuses the leading zero of "010"
        try:
            return int(text, base)
        except ValueError:
            pass
    return None


def _refuse_non_ascii_number(key: str, value: Any, kind: str) -> None:
    """ConfigError for number text with a character beyond ASCII: Python's int() and float() read
    any script's digits, so `seed=٣` (Arabic-Indic) was 3 and `train.max_steps=１２` (full-width)
    12, while YAML 1.2, JSON and the shell read them as text. Surrounding whitespace is stripped."""
    if isinstance(value, str) and not value.strip().isascii():
        raise ConfigError(f"{key} must be {kind} written with the ASCII digits 0-9, got {value!r}")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):  # through float, 2**53 + 1 became 2**53
            return value
        _refuse_non_ascii_number(key, value, "an integer")
        exact = _exact_int(value)
        if exact is not None:
            return exact
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if abs(as_float) >= 2**53:
            # A float holds about 16 digits: seed=100000000000000001.0 became 100000000000000000.
            raise ConfigError(
                f"{key} must be an integer, got {value!r}: beyond 2**53 a number with a decimal point "
                "or an exponent loses digits; write the integer's digits alone (no .0, no e)"
            )
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):  # YAML's true: it was the number 1.0
            raise ConfigError(f"{key} must be a number, got {value!r}")
        _refuse_non_ascii_number(key, value, "a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        except OverflowError:  # an integer of 309+ digits: an OverflowError traceback
            raise ConfigError(f"{key} must be a finite number, got an integer beyond 1.8e308") from None
        if not math.isfinite(number):  # nan passed every range check (nan < 0 is False)
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if tp is list:
        if value is None:  # null: no entries (it was the one entry "None")
            return []
        if isinstance(value, dict):  # str() made the one entry "{'a': 1}"
            raise ConfigError(
                f"{key} must be a list, got the mapping {value!r}; write [a, b] or a, b "
                "(quote an entry that holds '{' or ': ')"
            )
        if isinstance(value, (list, tuple)):
            return [_list_entry(key, v) for v in value]
        return [v.strip() for v in str(value).split(",") if v.strip()]
    if tp is str:
        if isinstance(value, (dict, list)):
            # A YAML list of shard specs reads naturally but is not the spec's form.
            hint = (
                "; join several shard specs with '::' (a/{0..9}.tar::b/{0..9}.tar)"
                if key.endswith("_shards")
                else ""
            )
            raise ConfigError(f"{key} must be a string, got {value!r}{hint}")
        return "" if value is None else str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _list_entry(key: str, entry: Any) -> str:
    """One entry of a list key as text. An unquoted `{title}` entry is a YAML mapping whose str()
    is "{'title': None}": refused. The empty `{}` stays "{}", the text as typed."""
    kind = "list" if isinstance(entry, (list, tuple)) else "mapping" if isinstance(entry, dict) else ""
    if kind and entry:
        raise ConfigError(
            f"{key}: the entry {entry!r} is a YAML {kind}, not text; quote it, e.g. '{{title}}'"
        )
    return str(entry)


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    return [k for k, *_ in iter_fields(cls, prefix)]


def _did_you_mean(key: str, value: Any) -> str:
    """' (did you mean KEY?)' for a typo or a key in the wrong section; '' when nothing is close."""
    while isinstance(value, dict) and len(value) == 1:  # an override's whole dotted key
        name, value = next(iter(value.items()))
        key = f"{key}.{name}"
    # Every config key is lower case, and difflib's ratio is not: `Train.LR` or `train.EPS` was
    # too far from anything (LR shares no character with lr) for a suggestion.
    key = key.lower()
    leaves = _valid_keys(RunConfig)
    section, _, last = key.rpartition(".")
    here = [leaf.rpartition(".")[2] for leaf in leaves if leaf.rpartition(".")[0] == section]
    close = [
        f"{section}.{name}" if section else name for name in difflib.get_close_matches(last, here, 1, 0.75)
    ]
    moved = [leaf for leaf in leaves if leaf.rpartition(".")[2] == last]  # right name, wrong section
    sections = sorted({leaf.rpartition(".")[0] for leaf in leaves} - {""})
    close = close or moved or difflib.get_close_matches(key, leaves + sections, n=1, cutoff=0.8)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _apply_mapping(obj: Any, mapping: dict, prefix: str = "") -> None:
    hints = _hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if name not in names:
            _refuse_dotted_run_file_key(obj, name, key)
            raise ConfigError(
                f"unknown config key {key!r}{_did_you_mean(key, value)}; valid keys here: "
                + ", ".join(_valid_keys(type(obj), prefix))
            )
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if value is None:  # `eval:` alone on a line: YAML's null, read as the section's defaults
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; give its keys, e.g. {key}.<name>: value")
            _apply_mapping(getattr(obj, name), value, f"{key}.")
        else:
            value = _coerce(key, tp, value)
            _refuse_unexpanded_variable(key, value)
            setattr(obj, name, _expand_home(key, value))


# Keys that name a local file or folder. No shell expands their `~`: `output_dir=~/runs/a` is one
# word that bash leaves alone (the `=` is not an assignment's), and a run file has no shell at all.
HOME_PATH_KEYS = ("output_dir", "model.name_or_path", "train.resume", "train.ds_config")
SHARD_SPEC_KEYS = ("data.train_shards", "data.val_shards")
# A `~/` or `~user/` that starts the path, or a shard spec's source (its start or right after
# `::`). A `~` alone stays as written: YAML's null on the command line, and text a saved config
# keeps.
_PATH_HOME = re.compile(r"^~[^/]*(?=/)")
_SOURCE_HOME = re.compile(r"(?:^|(?<=::))~[^/:]*(?=/)")


# `$NAME` or `${NAME}`: a shell's variable, which nothing expands in a run file or a quoted override.
_VARIABLE = re.compile(r"\$(?:\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)")


def _refuse_unexpanded_variable(key: str, value: Any) -> None:
    """ConfigError for a path key that names an environment variable (`output_dir: $SCRATCH/a`).

    A run file has no shell, so `$SCRATCH` stayed text: the run trained into a folder named
    `$SCRATCH` under the working directory without a word (train.resume, train.ds_config and
    model.name_or_path failed later as missing, naming the `$` path). Refused rather than expanded
    here: ranks on other nodes need not see the same variables (the deepspeed launcher forwards
    only .deepspeed_env), and an unset one would give each node another path.
    """
    found = _VARIABLE.search(value) if key in HOME_PATH_KEYS and isinstance(value, str) else None
    if found:
        raise ConfigError(
            f"{key}={value!r} names the environment variable {found.group()}, which a run file (or a "
            f"quoted override) does not expand: write the path out, or pass {key}=... unquoted on the "
            "command line for the shell to expand"
        )


def _expand_home(key: str, value: Any) -> Any:
    """A path key's leading `~` (and each shard source's) as the home directory, as the shell does.

    Left as typed, `output_dir: ~/runs/a` trained into a folder named `~` under the working
    directory without a word (and a later `rm -rf ~` to clean it up removes the home directory);
    train.resume, train.ds_config and shards under `~` were refused as missing.
    """
    home = _PATH_HOME if key in HOME_PATH_KEYS else _SOURCE_HOME if key in SHARD_SPEC_KEYS else None
    return value if home is None else home.sub(lambda prefix: os.path.expanduser(prefix.group()), value)


def _refuse_dotted_run_file_key(section: Any, name: Any, key: str) -> None:
    """ConfigError for a run file's `train.max_steps: 5`: a dotted key that names a field.

    Its error was "unknown config key 'train.max_steps' (did you mean train.max_steps?)", the key
    as written, without saying that a run file nests its keys.
    """
    if not isinstance(name, str) or "." not in name or _field_type(section, name.split(".")) is None:
        return
    head, _, tail = name.partition(".")
    raise ConfigError(
        f"{key}: a run file nests its keys, write '{head}:' with '{tail}: ...' indented below it "
        "(dotted keys are the command line's form, e.g. train.max_steps=200)"
    )


def _refuse_key_below_a_leaf(cfg: RunConfig, item: str, parts: list[str]) -> None:
    """ConfigError for an override that names a key below a key (`train.lr.x=1`): its error was
    "train.lr must be a number, got {'x': 1}", a value the user never typed."""
    for depth in range(1, len(parts)):
        tp = _field_type(cfg, parts[:depth])
        if tp is not None and not dataclasses.is_dataclass(tp):
            leaf = ".".join(parts[:depth])
            raise ConfigError(
                f"override {item!r}: {leaf} is a key, not a section, so {'.'.join(parts)} names "
                f"nothing; write {leaf}=value"
            )


def _field_type(cfg: Any, parts: list[str]) -> Any:
    """The type (a section's dataclass included) of the field a dotted key names; None for no field."""
    tp: Any = type(cfg)
    for part in parts:
        if not dataclasses.is_dataclass(tp) or part not in {f.name for f in dataclasses.fields(tp)}:
            return None
        tp = _hints(tp)[part]
    return tp


def _leaf_type(cfg: RunConfig, parts: list[str]) -> Any:
    """The type of the field a dotted key names; None for a section or no field (_apply_mapping says)."""
    tp = _field_type(cfg, parts)
    return None if dataclasses.is_dataclass(tp) else tp


def _refuse_option_form(item: str) -> None:
    """ConfigError for an argument that starts with '-': an option train.py does not have.

    `--seed=1` was read here as seed=1 while train.py's argparse refused it ("unrecognized
    arguments"), so the launch scripts (`--get output_dir`) and the trainer saw different runs.
    """
    if not item.lstrip().startswith("-"):
        return
    name, eq, raw = item.partition("=")
    bare = name.strip().lstrip("-")
    if eq and bare:
        raise ConfigError(
            f"{item!r} is not an option; write the override without dashes: {bare}={raw} "
            "(the only options are --config FILE and --local_rank N)"
        )
    raise ConfigError(
        f"unknown option {item!r}: the only options are --config FILE and --local_rank N; "
        "overrides are section.key=value, e.g. train.max_steps=200"
    )


def _text_override(raw: str, tp: type) -> Any:
    """A string or list key's value as typed: YAML only unquotes it, reads null and a list's [a, b].

    Parsed as YAML, '{title}' was a mapping (an error about sections), 007 the number 7, yes
    True and 'runs/a #1' lost its end as a comment: a string key received another value.
    """
    text = raw.strip()
    brackets = tp is list and text.startswith("[") and text.endswith("]")
    if text in ("null", "Null", "NULL", "~") or text[:1] in ("'", '"') or brackets:
        try:
            value = config_yaml.load(text)
        except yaml.YAMLError:  # e.g. [a {}, b {}]: YAML reads {} as a mapping
            return text[1:-1] if brackets else text
        if value is None or isinstance(value, (str, list)):
            return value
    return text


def apply_override(cfg: RunConfig, item: str) -> None:
    """Apply one `section.key=value` override (value parsed as YAML scalar, then coerced; a string
    or list key takes the text as typed, see _text_override)."""
    _refuse_option_form(item)
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value; e.g. train.max_steps=200")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    _refuse_key_below_a_leaf(cfg, item, parts)
    if dataclasses.is_dataclass(_field_type(cfg, parts)):
        # A run file's `eval:` alone means the section's defaults; an override names one key.
        raise ConfigError(f"override {item!r} must set a single key, not a section; e.g. {key}.<name>=value")
    leaf_type = _leaf_type(cfg, parts)
    if leaf_type in (str, list):
        value = _text_override(raw, leaf_type)
    else:
        try:
            value = config_yaml.load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    if isinstance(value, dict):  # "model={...}" would silently merge; keep overrides to leaves
        raise ConfigError(f"override {item!r} must set a single key, not a section")
    _apply_mapping(cfg, nested)


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
"""The run files shipped inside the package (installed with it), found by name from any directory."""


def shipped_configs() -> list[str]:
    """Names of the run files in CONFIGS_DIR, e.g. ["tiny", "vit-b-32", "vit-b-32-lora"]."""
    if not os.path.isdir(CONFIGS_DIR):
        return []
    return sorted(name[:-5] for name in os.listdir(CONFIGS_DIR) if name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> str:
    """A YAML path as given (`~` as the home directory), or the shipped run file of that name (`tiny`
    or `tiny.yaml`)."""
    name_or_path = os.path.expanduser(name_or_path)  # --config=~/a.yaml: the shell left the ~
    if os.path.isfile(name_or_path):
        return name_or_path
    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    shipped = os.path.join(CONFIGS_DIR, f"{stem}.yaml")
    if "/" not in name_or_path and os.sep not in name_or_path and os.path.isfile(shipped):
        # Even beside a folder of that name, e.g. a run directory named after its run file: the
        # re-run of `--config vit-b-32 output_dir=vit-b-32` failed with "Is a directory".
        return shipped
    if os.path.exists(name_or_path):
        return name_or_path  # a folder or a special file: _read_run_file says it cannot be read
    raise ConfigError(
        f"config file not found: {name_or_path}. Give a YAML path or the name of a shipped "
        f"run file: {', '.join(shipped_configs())}"
    )


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Build a RunConfig from a YAML file (or a shipped run file's name) and dotted overrides, validated."""
    cfg = build_config(path, overrides)
    validate(cfg)
    return cfg


def _read_run_file(path: str) -> Any:
    """The YAML of a run file; ConfigError in one line where it cannot be read or parsed (these were
    tracebacks, one per rank, from the launchers)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        loader = config_yaml.RunFileLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return {}
            _refuse_duplicate_keys(node, path)
            _keys_as_written(node)
            _keep_text_of_text_keys(node, RunConfig)
            return loader.construct_document(node) or {}
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{path} is not valid YAML: {exc.problem or exc.context}{where} (quote values that hold "
            "'{', ': ' or ' #'; indent with spaces)"
        ) from None
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read as YAML: {' '.join(str(exc).split())}") from None


_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _keep_text_of_text_keys(node: Any, cls: type) -> None:
    """Make the plain scalars of string and list keys text as written, in place of YAML's typed value.

    Overrides keep the text as typed (_text_override), but the run file's `output_dir: 2024.10`
    became the float 2024.1 and then the text "2024.1" (another run directory), and
    `model.hidden_act: off` the bool False, then "False". A null (`key:` alone, `~`) stays null.
    """
    if not isinstance(node, yaml.MappingNode):
        return
    hints, names = _hints(cls), {f.name for f in dataclasses.fields(cls)}
    for i, (key_node, value_node) in enumerate(node.value):
        if key_node.tag == _MERGE_TAG:
            # `<<: {output_dir: 2024.10}` or `<<: *defaults`: the merged keys are the section's too.
            node.value[i] = (key_node, _text_keys_of_merged(value_node, cls))
            continue
        name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if name not in names:
            continue  # unknown keys: _apply_mapping names them
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            _keep_text_of_text_keys(value_node, tp)
        elif tp is str:
            node.value[i] = (key_node, _as_text(value_node))
        elif tp is list:
            if isinstance(value_node, yaml.SequenceNode):
                # A new node, not the old one retagged: an alias may share it with a number key.
                value_node = yaml.SequenceNode(
                    value_node.tag,
                    [_as_text(item) for item in value_node.value],
                    value_node.start_mark,
                    value_node.end_mark,
                    value_node.flow_style,
                )
            node.value[i] = (key_node, _as_text(value_node))


def _keys_as_written(node: Any, seen: set | None = None) -> None:
    """Make every plain mapping key text as written, in place (`<<` merge keys stay merges).

    YAML 1.1 reads a key `no:` as False and `yes:` as True: the unknown-key error named
    'False' or 'train.True', a key the user never wrote. Every config key is text, so no valid
    key changes. Runs after _refuse_duplicate_keys (no node holds itself)."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias: the same node, already done
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _keys_as_written(item, seen)
    elif isinstance(node, yaml.MappingNode):
        for i, (key_node, value_node) in enumerate(node.value):
            if isinstance(key_node, yaml.ScalarNode) and not key_node.style and key_node.tag != _MERGE_TAG:
                text = yaml.ScalarNode(_STR_TAG, key_node.value, key_node.start_mark, key_node.end_mark)
                node.value[i] = (text, value_node)  # `~:` too: 'None' was no key the user wrote
            _keys_as_written(value_node, seen)


def _text_keys_of_merged(node: Any, cls: type) -> Any:
    """A merge key's mapping (or list of them) with its text keys kept as text, as copies: an anchor
    may be merged into another section too, where a key of the same name is a number."""
    if isinstance(node, yaml.SequenceNode):
        items = [_text_keys_of_merged(item, cls) for item in node.value]
        return yaml.SequenceNode(node.tag, items, node.start_mark, node.end_mark, node.flow_style)
    if not isinstance(node, yaml.MappingNode):
        return node  # not a mapping: the constructor refuses it
    copy = yaml.MappingNode(node.tag, list(node.value), node.start_mark, node.end_mark, node.flow_style)
    _keep_text_of_text_keys(copy, cls)
    return copy


def _as_text(node: Any) -> Any:
    """A plain (unquoted) scalar that YAML typed as a number, bool or date, as a text scalar."""
    if not isinstance(node, yaml.ScalarNode) or node.style or node.tag in (_STR_TAG, _NULL_TAG):
        return node
    return yaml.ScalarNode(_STR_TAG, node.value, node.start_mark, node.end_mark)


def _refuse_duplicate_keys(node: Any, path: str, prefix: str = "", inside: frozenset = frozenset()) -> None:
    """ConfigError where a mapping of the run file names a key twice, or a node holds itself.

    PyYAML keeps the last of them without a word (YAML 1.2 calls it an error): a second `train:`
    section replaced the whole first one, whose max_steps, zero_stage, ... went back to defaults.
    An alias inside its own anchor (`train: &t {<<: *t}`) was a RecursionError traceback here.
    """
    if id(node) in inside:
        raise ConfigError(
            f"{path}: {prefix.rstrip('.') or 'the file'} holds an alias of its own anchor (anchored at "
            f"line {node.start_mark.line + 1}): a value cannot contain itself; write the keys out"
        )
    inside = inside | {id(node)}
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path, prefix, inside)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
        line = key_node.start_mark.line + 1
        if name is not None and name in first_line:
            raise ConfigError(
                f"{path}: {prefix}{name} appears twice (lines {first_line[name]} and {line}); YAML "
                "would keep only the last and drop the first without a word: merge them into one"
            )
        if name is not None:
            first_line[name] = line
        _refuse_duplicate_keys(value_node, path, f"{prefix}{name}." if name is not None else prefix, inside)


def build_config(path: str | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """The RunConfig of a YAML file and overrides, keys and types checked but not validated: what
    the launch scripts read (`--get`) in a tenth of a second, without importing torch."""
    cfg = RunConfig()
    if path is not None and not path.strip():
        # `--config "$CONFIG"` with CONFIG unset trained the defaults (tiny, runs/default) silently.
        raise ConfigError(
            "--config is empty: give a YAML path or the name of a shipped run file: "
            + ", ".join(shipped_configs())
        )
    if path:
        path = resolve_config_path(path)
        data = _read_run_file(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, data:, train:, ...)")
        _apply_mapping(cfg, _without_anchor_holders(data))
    for item in overrides:
        apply_override(cfg, item)
    _check_repeated_overrides(cfg, overrides)
    return cfg


ANCHOR_HOLDER_PREFIXES = ("x-", "_")
"""A top-level run-file key starting with one of these only holds a YAML anchor for the sections to
merge (`_defaults: &d {...}`, docker compose's `x-common: &c {...}`, then `<<: *d`): ignored."""


def _without_anchor_holders(data: dict) -> dict:
    """The run file's top level without its anchor holders (ANCHOR_HOLDER_PREFIXES).

    A YAML anchor must sit on a value somewhere before its `<<: *name`, and the common idioms put
    it on a key of its own, which was refused as an unknown key (`x-common: {max_steps: 3}` even
    suggested train.max_steps). What a section merges from it is read and checked as that section's.
    """
    return {
        name: value
        for name, value in data.items()
        if not (isinstance(name, str) and name.startswith(ANCHOR_HOLDER_PREFIXES))
    }


def _value_of(cfg: RunConfig, key: str) -> Any:
    """The value of a dotted key that apply_override has set."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_repeated_overrides(cfg: RunConfig, overrides: list[str] | tuple) -> None:
    """Say so where the overrides give one key different values (the last is the one applied).

    The last won without a word: a line pasted twice with another train.lr trained on the one
    the user did not mean, and the shell expands an unquoted `data.train_shards=d/{00000..00015}.tar`
    (or `model.lora.target_modules={q,v}_proj`) into one override per value, so the run trained on
    one shard (or adapted v_proj alone). A shard spec or list key given different values is
    refused; any other key gets a warning, since scripts layer overrides on purpose (a requeue
    appends train.resume=auto after the submitted train.resume=never, the demo its recipe before
    the user's own).
    """
    given: dict[str, list[str]] = {}
    for item in overrides:
        given.setdefault(item.split("=", 1)[0].strip(), []).append(item)
    for key, items in given.items():
        values = {_coerced_value(key, item) for item in items}
        if len(values) < 2:
            continue  # once, or the same value again
        shown = f"{len(items)} times among the overrides with different values ({items[0]!r} first)"
        how = _how_to_give_once(cfg, key, values)
        if how:
            raise ConfigError(
                f"{key} is given {shown}, and only the last, {items[-1]!r}, would be used: {how}"
            )
        _warn_once(
            f"{key} is given {shown}: the last, {items[-1]!r}, is used; remove the others if that "
            "is not the one you meant"
        )


def _how_to_give_once(cfg: RunConfig, key: str, values: set[str]) -> str:
    """How to write a shard spec or list key once, where its values look like the shell's expansion
    of one argument; '' for any other key (a warning then)."""
    # An empty value clears an earlier one (the demo's `data.val_shards=`: no evaluation); the
    # shell's expansion never gives one.
    if len(values - {"''", "[]"}) < 2:
        return ""
    if key in SHARD_SPEC_KEYS:
        return (
            "quote a brace range so the shell does not expand it into one override per shard "
            f"(\"{key}=d/{{00000..00015}}.tar\"), and join several sources with '::'"
        )
    if _leaf_type(cfg, key.split(".")) is list:
        return f'write its entries once, comma-separated, and quote any braces ("{key}=a,b")'
    return ""


@cache
def _warn_once(message: str) -> None:
    """A warning from rank 0 only (every rank builds the same config), once per process: the demo
    builds its run's config several times before it starts the run."""
    from vutrain.logging_setup import process_rank

    if process_rank() == 0:
        logging.getLogger("vutrain.config").warning(message)


def _coerced_value(key: str, item: str) -> str:
    """One override's value of `key` as the config reads it, as its repr (1e-3 and 0.001 are one)."""
    probe = RunConfig()
    apply_override(probe, item)
    return repr(_value_of(probe, key))


def to_dict(cfg: RunConfig) -> dict:
    """The config as nested plain dicts."""
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config as YAML to ``path``."""
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)


# ----------------------------------------------------------------------------- validation


def _choice(key: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


def validate(cfg: RunConfig, cuda_available: bool | None = None) -> None:
    """Reject unknown choices and impossible combinations, naming the key and what to change."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    m, d, t, lo, e = cfg.model, cfg.data, cfg.train, cfg.loss, cfg.eval
    if not m.name_or_path:
        _choice("model.preset", m.preset, PRESETS)
    if m.hidden_act:
        _choice("model.hidden_act", m.hidden_act, HIDDEN_ACTS)
        if m.name_or_path:
            raise ConfigError(
                f"model.hidden_act={m.hidden_act} applies to presets; the pretrained model "
                f"{m.name_or_path} keeps its own activation: unset model.hidden_act"
            )
    _refuse_preset_dims_with_pretrained(m)
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("loss.name", lo.name, LOSSES)
    _choice("loss.backend", lo.backend, BACKENDS)
    _choice("train.accumulation", t.accumulation, ACCUMULATIONS)
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage={t.zero_stage} is not valid; choose one of: 0, 1, 2, 3")
    positive = {
        "train.max_steps": t.max_steps,
        "train.micro_batch_size": t.micro_batch_size,
        "train.grad_accum_steps": t.grad_accum_steps,
        "train.keep_checkpoints": t.keep_checkpoints,
        "train.log_every": t.log_every,
        "train.max_nonfinite_steps": t.max_nonfinite_steps,
        "eval.batch_size": e.batch_size,
        "model.vocab_size": m.vocab_size,
        "data.tokenizer_samples": d.tokenizer_samples,  # 0: a bytes-only tokenizer; < 0: islice's ValueError
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if not m.name_or_path and m.vocab_size < MIN_VOCAB_SIZE:
        # Found here, before any process group; the tokenizer's own check (data/tokenizer.py) came
        # only after the run directory was made.
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is below {MIN_VOCAB_SIZE}, the least a byte-level BPE holds "
            f"(2 special tokens and 256 byte symbols); set model.vocab_size >= {MIN_VOCAB_SIZE}"
        )
    for key, value in {
        "train.checkpoint_every": t.checkpoint_every,
        "eval.every": e.every,
        "eval.tag_vocab_size": e.tag_vocab_size,
        "data.num_samples": d.num_samples,
        "train.warmup_steps": t.warmup_steps,
        "model.image_size": m.image_size,
        "model.context_length": m.context_length,
        "train.lr": t.lr,
        "train.grad_clip": t.grad_clip,
        "train.weight_decay": t.weight_decay,
        "train.global_batch_size": t.global_batch_size,
        "data.shuffle_buffer": d.shuffle_buffer,  # below 2 the stream is not shuffled: -1 said so nowhere
    }.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if 0 < m.context_length < 3:
        # Start and end tokens take two places: with one or two every caption became the same ids.
        raise ConfigError(
            f"model.context_length must be 0 (the preset's) or >= 3 (start, end and at least one token "
            f"of the caption), got {m.context_length}"
        )
    if not -(2**63) <= cfg.seed < 2**64:
        # torch.manual_seed's range: outside it the run failed after the process group had started.
        raise ConfigError(f"seed must be an integer from -2**63 to 2**64 - 1, got {cfg.seed}")
    _validate_schedule(t)
    # torch's AdamW and peft would refuse these too, but only after the process group, the run
    # directory and the model were built (and, for AdamW's betas, from every rank).
    for key, value in {
        "train.beta1": t.beta1,
        "train.beta2": t.beta2,
        "model.lora.dropout": m.lora.dropout,
    }.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if t.eps <= 0:
        raise ConfigError(f"train.eps must be > 0 (AdamW divides by sqrt(v) + eps), got {t.eps}")
    if m.lora.enabled and (m.lora.r < 1 or m.lora.alpha <= 0):
        raise ConfigError(
            f"model.lora.r must be >= 1 and model.lora.alpha > 0, got {m.lora.r}, {m.lora.alpha}"
        )
    if d.random_resized_crop and not d.fast_preprocess:
        # The crop is applied on the device to the uint8 batches of the fast path; the float
        # path's batches went through it untouched, so the run trained without augmentation.
        raise ConfigError(
            "data.random_resized_crop=true needs data.fast_preprocess=true (the crop runs on the "
            "device on the fast path's uint8 batches); set data.fast_preprocess=true or "
            "data.random_resized_crop=false"
        )
    if d.num_workers < -1 or d.prefetch_factor < 1:
        raise ConfigError(
            f"data.num_workers must be >= -1 (-1: auto) and data.prefetch_factor >= 1; got "
            f"{d.num_workers}, {d.prefetch_factor}"
        )
    if d.stall_warning_s < 0:  # NaN and inf are refused as for every float field
        raise ConfigError(
            f"data.stall_warning_s must be >= 0 seconds (0: no warning), got {d.stall_warning_s}"
        )
    if not cfg.output_dir.strip():
        # e.g. output_dir=$RUN_DIR with the variable unset: FileNotFoundError: '' after the
        # process group started.
        raise ConfigError("output_dir is empty; set it to the run directory, e.g. output_dir=runs/my_run")
    if os.path.isfile(cfg.output_dir):
        # Found after the process group started, as a bare "FileExistsError: [Errno 17]" line.
        raise ConfigError(f"output_dir={cfg.output_dir} is a file; give a directory (new or a run's)")
    if not d.train_shards:
        raise ConfigError(
            "data.train_shards is empty; pass data.train_shards=/path/{00000..00009}.tar "
            "(write synthetic ones with python -m vutrain.data.synthetic)"
        )
    _validate_caption_template(d.caption_template)
    if t.precision == "fp16" and not cuda_available:
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; on CPU use train.precision=bf16 or fp32")
    _validate_loss(lo)
    if e.every > 0 and not d.val_shards:
        raise ConfigError("eval.every>0 needs data.val_shards; set it or eval.every=0")
    if m.lock_image and m.lock_text:
        # A locked tower's LoRA adapters are frozen too, so LoRA does not change this.
        raise ConfigError(
            "model.lock_image and model.lock_text together leave only the logit scale to "
            "train (a locked tower's LoRA adapters are frozen too); unlock one tower"
        )
    if m.lora.enabled and not m.lora.target_modules:
        raise ConfigError("model.lora.enabled needs model.lora.target_modules, e.g. q_proj,v_proj")
    if t.resume not in ("auto", "never") and not os.path.isdir(t.resume):
        raise ConfigError(f"train.resume={t.resume!r}: not auto, never, or an existing checkpoint directory")
    if t.ds_config and not os.path.isfile(t.ds_config):
        raise ConfigError(f"train.ds_config={t.ds_config!r} does not exist (templates: launch/ds_configs/)")
    if t.ds_config:
        user_ds = read_user_ds_config(t.ds_config)
        check_user_ds_config(user_ds, t, t.ds_config)
        _check_ds_config_as_start_up_does(user_ds, t)
    if t.compile:
        _validate_compile_backend(t.compile_backend)
        _choice("train.compile_scope", t.compile_scope, COMPILE_SCOPES)
        _choice("train.compile_mode", t.compile_mode, COMPILE_MODES)
        if t.compile_mode != "default" and t.compile_backend != "inductor":
            raise ConfigError(
                f"train.compile_mode={t.compile_mode} is an inductor mode; set "
                f"train.compile_backend=inductor or train.compile_mode=default"
            )
        if t.zero_stage == 3:
            # ZeRO-3 gathers and frees parameters in hooks around every submodule, which the
            # compiled graph does not run (measured: the text tower saw an empty position table).
            raise ConfigError(
                "train.compile=true runs with train.zero_stage 0, 1 or 2; ZeRO-3 needs "
                "train.compile=false (or train.zero_stage=2 where the model fits)"
            )
        accumulates = t.grad_accum_steps > 1 or t.global_batch_size > 0  # the latter: maybe, per world size
        if m.lora.enabled and m.lora.dropout > 0 and t.accumulation == "gradcache" and accumulates:
            # GradCache replays dropout by restoring the RNG state; a compiled no-grad graph and
            # the compiled training graph need not draw the same masks from it.
            raise ConfigError(
                "train.compile=true with GradCache (train.accumulation=gradcache, "
                "train.grad_accum_steps>1) needs model.lora.dropout=0; or set "
                "train.accumulation=plain, or train.compile=false"
            )
    check_templates(list(e.templates))


def _refuse_preset_dims_with_pretrained(m: ModelConfig) -> None:
    """A preset's image size or caption length set beside model.name_or_path: a ConfigError.

    The pretrained model brings its own resolution and text length, so the setting was ignored
    without a word (the run trained at 224 pixels and 77 tokens where 336 and 128 were asked
    for). 0, the default, is "the model's own" and passes.
    """
    if not m.name_or_path:
        return
    for key in ("image_size", "context_length"):
        if getattr(m, key):
            raise ConfigError(
                f"model.{key}={getattr(m, key)} applies to presets; the pretrained model "
                f"{m.name_or_path} keeps its own (its config.json and tokenizer): unset model.{key} "
                "(or set it to 0)"
            )


def check_templates(templates: list[str]) -> None:
    """ConfigError unless every template takes the class name through one '{}'.

    Checked when the run starts: a template str.format cannot fill ("a photo of {name}.") raised
    KeyError at the first eval, after eval.every steps of training, and one without '{}' (what a
    comma inside a template becomes on the command line: "a thumbnail of {}, in HD." is two
    templates) gave every class the same prompt, silently mixed into each class embedding.
    """
    if not templates:
        raise ConfigError("eval.templates is empty: give at least one, e.g. 'a thumbnail of {}.'")
    for template in templates:
        try:
            distinct = template.format("a") != template.format("b")
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"eval.templates: {template!r} must take the class name through one '{{}}' and no other "
                f"field ({type(e).__name__}: {e}); write a literal brace as '{{{{' or '}}}}'"
            ) from None
        if not distinct:
            raise ConfigError(
                f"eval.templates: {template!r} has no '{{}}' for the class name (on the command line a "
                f"comma separates templates, so a template cannot contain one)"
            )


def _validate_caption_template(template: str) -> None:
    """An unknown placeholder or a template str.format cannot fill, as a ConfigError.

    The data pipeline checks it too, but only after the process group and the run directory
    exist: `python -m vutrain.config` passed such a template, and training failed with exit 1
    instead of a config error's 2.

    A template without a placeholder (`title` for `{title}`, or empty) gave every sample the same
    caption, and the run trained on texts that tell no image from another without a word.
    """
    from vutrain.data.captions import template_fields

    try:
        fields = template_fields(template)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not fields:
        raise ConfigError(
            f"data.caption_template {template!r} has no placeholder, so every sample would get the "
            "same caption; write the fields in braces, e.g. '{title}' or '{title}. tags: {tags}'"
        )


def _validate_schedule(t: TrainConfig) -> None:
    """min_lr_ratio is a fraction of the peak; a warm-up as long as the run never decays (a warning)."""
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(
            f"train.min_lr_ratio must be between 0 and 1 (the cosine floor as a fraction of "
            f"train.lr), got {t.min_lr_ratio}"
        )
    if t.warmup_steps >= t.max_steps:
        from vutrain.logging_setup import process_rank

        if process_rank() == 0:  # one line per cause: every rank validates the same config
            logging.getLogger("vutrain.config").warning(
                "train.warmup_steps=%d >= train.max_steps=%d: the LR rises for the whole run and "
                "never decays (cosine to train.min_lr_ratio starts after the warm-up)",
                t.warmup_steps,
                t.max_steps,
            )


def read_user_ds_config(path: str) -> dict:
    """The user's DeepSpeed JSON (train.ds_config); ConfigError when it is not a JSON object."""
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            user = json.load(fh, object_pairs_hook=_object_without_duplicates(path))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"train.ds_config={path}: not valid JSON ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:  # a folder, no permission, not UTF-8: was a traceback
        reason = " ".join(str(exc).split())
        raise ConfigError(f"train.ds_config={path}: cannot be read ({reason}); pass a JSON file") from None
    if not isinstance(user, dict):
        raise ConfigError(f"train.ds_config={path}: not a JSON object ({{...}}); see launch/ds_configs/")
    return user


def _object_without_duplicates(path: str):
    """json.load's object_pairs_hook: a ConfigError where one object names a key twice.

    json keeps the last silently: a second "zero_optimization" section added at the end of a
    template replaced the first, and its offload or bucket settings were dropped without a word.
    """

    def build(pairs: list) -> dict:
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ConfigError(
                    f"train.ds_config={path}: {json.dumps(key)} appears twice in one object; JSON "
                    "readers keep only the last and drop the first without a word: merge them into one"
                )
            seen.add(key)
        return dict(pairs)

    return build


def ds_optimizer_settings(t: TrainConfig) -> dict:
    """optimizer.params of a user ds_config's Adam(W) as train.* gives them (lr: the schedule's peak)."""
    return {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps, "weight_decay": t.weight_decay}


def check_user_ds_config(ds: dict, t: TrainConfig, source: str) -> None:
    """A user's DeepSpeed JSON may bring an optimizer but never a schedule, and its Adam(W)
    settings may not disagree with train.*.

    The trainer owns the schedule: it hands DeepSpeed its warm-up + cosine schedule, which wins
    over a "scheduler" section (ignored before without a word, or used in place of
    train.warmup_steps / min_lr_ratio when the JSON also brought an optimizer). An Adam(W)
    optimizer takes train.lr/beta1/beta2/eps/weight_decay wherever its params leave them out or
    say "auto"; a different value is an error, as a disagreeing batch key is (ds_config.py),
    rather than a silent choice between the two (per-group weight decay would override the
    JSON's anyway: no decay on norms, biases and the logit scale).
    """
    for key in ("zero_optimization", "bf16", "bfloat16", "fp16", "torch_autocast", "optimizer"):
        # An older DeepSpeed form such as "zero_optimization": true was an AttributeError from
        # every rank (the generated section is merged with it key by key).
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(
                f"{source}: {json.dumps(key)} must be a JSON object, got {json.dumps(ds[key])}; write "
                f'e.g. "zero_optimization": {{"stage": {t.zero_stage}}} or leave the section out '
                "(train.* sets it)"
            )
    if "scheduler" in ds:
        raise ConfigError(
            f'{source} has a "scheduler" section, but the trainer owns the LR schedule (linear '
            "warm-up, then cosine): remove the section and set train.lr, train.warmup_steps, "
            "train.min_lr_ratio"
        )
    _refuse_sections_train_decides(ds, source)
    # Keys train.* decides: DeepSpeed would follow the JSON while config.yaml, the logs and the
    # trainer's own precision handling (autocast, the non-finite guard) follow train.*.
    decided = [("gradient_clipping", ds.get("gradient_clipping", "auto"), t.grad_clip, "train.grad_clip")]
    # "bfloat16" is DeepSpeed's older name of "bf16": ignored beside the generated "bf16", so an
    # "enabled" there that disagrees with train.precision was dropped without a word.
    for section, precision in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16")):
        got = _section(ds, section).get("enabled", "auto")
        decided.append((f"{section}.enabled", got, t.precision == precision, "train.precision"))
    # DeepSpeed autocasts the forward wherever this section says so: an fp32 run trained in bf16,
    # an amp_bf16 run in fp16 (no loss scale), while config.yaml and the logs said otherwise.
    autocast, amp = _section(ds, "torch_autocast"), t.precision == "amp_bf16"
    decided.append(("torch_autocast.enabled", autocast.get("enabled", "auto"), amp, "train.precision"))
    dtype = autocast.get("dtype", "auto")
    if amp and dtype not in ("auto", *AUTOCAST_BF16_NAMES):
        decided.append(("torch_autocast.dtype", dtype, "bfloat16", "train.precision"))
    for key, got, want, train_key in decided:
        same = got == want if isinstance(want, (bool, str)) else _same_numbers(got, want)
        if got != "auto" and not same:
            value = getattr(t, train_key.split(".")[1])
            raise ConfigError(
                f"{source} sets {key}={json.dumps(got)} but {train_key}={value}; "
                f'set it to "auto" (or leave it out) or change {train_key}'
            )
    offload = _section(_section(ds, "zero_optimization"), "offload_optimizer").get("device", "none")
    if (
        offload not in ("none", None)
        and "optimizer" not in ds
        and ds.get("zero_force_ds_cpu_optimizer", True)
    ):
        # Without an optimizer section the trainer's own torch AdamW is a "client" optimizer, which
        # DeepSpeed refuses under ZeRO-Offload: a ZeRORuntimeException traceback from every rank,
        # after the process group and the tokenizer were set up.
        raise ConfigError(
            f'{source} offloads the optimizer ({offload}) but has no "optimizer" section: add one '
            '(e.g. {"type": "AdamW", "params": {}}: DeepSpeed\'s CPU Adam, with train.lr and friends) '
            'or set "zero_force_ds_cpu_optimizer": false to keep torch\'s AdamW on the CPU (slow)'
        )
    optimizer = ds.get("optimizer")
    if not isinstance(optimizer, dict):
        return
    _check_optimizer_section(optimizer, source)
    if optimizer["type"].lower() not in DS_ADAM_TYPES:
        return
    params = optimizer.get("params") or {}
    keys = {
        "lr": "train.lr",
        "betas": "train.beta1/2",
        "eps": "train.eps",
        "weight_decay": "train.weight_decay",
    }
    for key, want in ds_optimizer_settings(t).items():
        got = params.get(key, "auto")
        if got != "auto" and not _same_numbers(got, want):
            raise ConfigError(
                f"{source} sets optimizer.params.{key}={json.dumps(got)} but {keys[key]} gives {want}; "
                f'set it to "auto" (or leave it out) or change {keys[key]}'
            )


SECTIONS_TRAIN_DECIDES = {
    "amp": "Apex AMP runs a mixed-precision forward whatever train.precision says: remove it and "
    "set train.precision (bf16, amp_bf16 or fp16)",
    "elasticity": "elastic training picks its own batch size over train.micro_batch_size: remove it "
    "and set train.micro_batch_size, train.grad_accum_steps or train.global_batch_size",
}
"""User ds_config sections refused before start-up. DeepSpeed 0.19 refuses both too, but only when
the engine is built: after the process group, the run directory and the tokenizer, and `python -m
vutrain.config` passed them; older DeepSpeed versions ran them."""


def _check_ds_config_as_start_up_does(user: dict, t: TrainConfig) -> None:
    """Everything build_ds_config refuses (a misspelt or ignored key, an offload the ZeRO stage
    ignores, a stage that disagrees, "auto" without a value, Adagrad under ZeRO, batch keys), at
    the world size the JSON's own batch keys imply.

    Only check_user_ds_config ran here: `python -m vutrain.config` passed a JSON that train.py then
    refused at start-up, on every rank. The world size is not known here, so one the JSON's
    train_batch_size fits is taken; train.py checks the real one.
    """
    from vutrain.ds_config import build_ds_config

    accumulation, world_size = _batch_shape_of_ds_config(user, t)
    build_ds_config(dataclasses.replace(t, grad_accum_steps=accumulation), world_size)


def _batch_shape_of_ds_config(user: dict, t: TrainConfig) -> tuple[int, int]:
    """(accumulation, world size) that the JSON's numeric batch keys agree with, where one exists:
    train.grad_accum_steps (derived from train.global_batch_size, where set) and world 1 otherwise."""

    def number(key: str) -> int:
        value = user.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    accumulation, total = t.grad_accum_steps, number("train_batch_size")
    if t.global_batch_size > 0:
        accumulation = number("gradient_accumulation_steps") or t.grad_accum_steps
        total = t.global_batch_size
        if not number("gradient_accumulation_steps") and t.global_batch_size % t.micro_batch_size == 0:
            accumulation = t.global_batch_size // t.micro_batch_size  # at world 1
    per_rank = t.micro_batch_size * accumulation
    world_size = total // per_rank if total and total % per_rank == 0 else 1
    return accumulation, world_size


def _refuse_sections_train_decides(ds: dict, source: str) -> None:
    for key, why in SECTIONS_TRAIN_DECIDES.items():
        section = ds.get(key)
        # "enabled": false is what DeepSpeed reads as off; only a section that would act is refused
        if section is not None and not (isinstance(section, dict) and section.get("enabled") is False):
            raise ConfigError(f"{source} has an {json.dumps(key)} section, but {why}")


def _check_optimizer_section(optimizer: dict, source: str) -> None:
    """ConfigError unless the "optimizer" section names a type DeepSpeed can build, with params
    as an object.

    Without a "type" DeepSpeed builds no optimizer at all and the first backward failed with an
    AssertionError; a misspelt type failed in engine start-up; a "params" that is not an object
    was an AttributeError here. All three were tracebacks from every rank, the first two only
    after the process group and the tokenizer were set up.
    """
    kind = optimizer.get("type")
    if not isinstance(kind, str) or not kind.strip():
        raise ConfigError(
            f'{source}: its "optimizer" section needs a "type", e.g. "AdamW" (without one DeepSpeed '
            "builds no optimizer); or remove the section to use the trainer's AdamW"
        )
    if not _deepspeed_builds_optimizer(kind):
        raise ConfigError(
            f"{source}: optimizer type {json.dumps(kind)} is neither a DeepSpeed optimizer "
            f"({', '.join(_deepspeed_optimizer_names())}) nor a torch.optim class; fix the type"
        )
    params = optimizer.get("params")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(
            f'{source}: optimizer "params" must be a JSON object, got {json.dumps(params)}; write e.g. '
            '"params": {"lr": "auto"} or leave it out (train.* fills Adam(W)\'s)'
        )


def _deepspeed_optimizer_names() -> list[str]:
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    return list(DEEPSPEED_OPTIMIZERS)


def _deepspeed_builds_optimizer(kind: str) -> bool:
    """DeepSpeed's own rule: one of its optimizers (any case) or a torch.optim class by name."""
    import torch

    return kind.lower() in _deepspeed_optimizer_names() or isinstance(getattr(torch.optim, kind, None), type)


def _section(ds: dict, key: str) -> dict:
    section = ds.get(key)
    return section if isinstance(section, dict) else {}


def _same_numbers(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same_numbers, a, b))
    # A number against train.*'s list (a JSON "betas": 0.9) was a TypeError from math.isclose.
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return numbers and math.isclose(a, b, rel_tol=1e-9)


def _validate_compile_backend(backend: str) -> None:
    """A backend torch.compile knows; named here rather than at the first forward, minutes in."""
    from torch._dynamo import list_backends

    if backend not in set(list_backends(exclude_tags=())) | {"inductor"}:  # debug backends pass too
        shown = dict.fromkeys(["inductor", "aot_eager", *list_backends()])
        _choice("train.compile_backend", backend, tuple(shown))


def _validate_loss(lo: LossConfig) -> None:
    """Choices, keys that do not apply to the chosen loss, and what the triton backend supports."""
    _choice("loss.positives", lo.positives, POSITIVES)
    defaults = LossConfig()
    for key, names in LOSS_KEYS_APPLY_TO.items():
        if lo.name not in names and getattr(lo, key) != getattr(defaults, key):
            raise ConfigError(
                f"loss.{key}={getattr(lo, key)!r} does not apply to loss.name={lo.name} "
                f"(only to {', '.join(names)}); remove it or change loss.name"
            )
    if not lo.uniform_t > 0:
        # Any positive t is exact: the uniformity term is a log-sum-exp (a plain fp32 sum of
        # exp(-t d^2) underflowed above t of about 20, which was refused until 2026-12-06).
        raise ConfigError(f"loss.uniform_t must be > 0 (the paper's is 2), got {lo.uniform_t}")
    if lo.backend == "triton":
        if lo.name == "align_uniform":
            raise ConfigError(
                "loss.backend=triton implements loss.name=clip and siglip only (got "
                "'align_uniform'); use loss.backend=torch or auto"
            )
        if lo.positives != "pair":
            raise ConfigError(
                f"loss.backend=triton does not support loss.positives={lo.positives}; "
                "use loss.backend=torch or loss.positives=pair"
            )
        if lo.bidir:
            raise ConfigError(
                "loss.backend=triton gathers the texts (its kernel never builds the "
                "logits); set loss.bidir=false or loss.backend=torch"
            )


def main(argv: list[str] | None = None) -> None:
    """`python -m vutrain.config [--get KEY] [--config F] [k=v ...]` prints the resolved config, one
    key of it (`--get train.resume`, unvalidated: for the launch scripts), or the reference."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(reference_markdown())
        return
    get = None
    if argv[0] == "--get":
        if len(argv) < 2:
            raise SystemExit("config error: --get needs a key, e.g. output_dir or train.resume")
        get, argv = argv[1], argv[2:]
    path, argv = _take_config_path(argv)
    try:
        if get is None:
            cfg = load_config(path, argv)
        else:
            print(_get_key(build_config(path, argv), get))
            return
    except (ConfigError, OSError) as exc:  # as train.py reports it: one line, exit 2
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _is_config_option(arg: str) -> bool:
    """--config, or a prefix argparse expands to it (--conf), with or without '=FILE'."""
    name = arg.split("=", 1)[0]
    return len(name) >= 3 and "--config".startswith(name)


def _is_local_rank_option(arg: str) -> bool:
    """--local_rank N or --local_rank=N (or --local-rank), which the deepspeed launcher appends.

    train.py accepts it, but here it was refused as "not an option ... (the only options are
    --config FILE and --local_rank N)": a trainer's command line, copied to check it, failed.
    """
    return arg.split("=", 1)[0] in ("--local_rank", "--local-rank")


def _check_local_rank(value: str) -> None:
    """SystemExit unless `value` is what train.py's argparse takes as --local_rank (its int()).

    Until 2026-12-07 any word passed: `--local_rank seed=5` dropped seed=5 here as the rank, while
    train.py refused the command ("invalid int value")."""
    try:
        int(value)
    except ValueError:
        raise SystemExit(f"config error: --local_rank needs a number, got {value!r}") from None


def _take_config_path(argv: list[str]) -> tuple[str | None, list[str]]:
    """The run file and the other arguments, as train.py's argparse reads them: `--config` anywhere
    (`k=v ... --config F` too), as `--config=F` or an abbreviation such as `--conf F`, the last
    one winning.

    Only the first `--config` was read: given twice (a launch script's own, then the user's), the
    launch scripts' `--get output_dir` failed on the second as an override (quietly: an empty
    output_dir there, and no train.resume=auto on a requeue) while train.py trained the last.
    """
    path, rest, i, options_end = None, [], 0, False
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # argparse's end of options, dropped as Python 3.11's argparse drops it
            options_end = True
        elif not options_end and _is_local_rank_option(arg):
            i += "=" not in arg  # its value too: train.py reads it and sets no config key with it
            if i >= len(argv):
                raise SystemExit("config error: --local_rank needs a number")
            _check_local_rank(arg.split("=", 1)[1] if "=" in arg else argv[i])
        elif options_end or not _is_config_option(arg):
            rest.append(arg)
        elif "=" in arg:
            path = arg.split("=", 1)[1]
        elif i + 1 < len(argv):
            i += 1
            path = argv[i]
        else:
            raise SystemExit("config error: --config needs a YAML file")
        i += 1
    return path, rest


def _get_key(cfg: RunConfig, key: str) -> str:
    """The value of a dotted key ("" for None) as the shell reads it."""
    value: Any = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(value) or part not in {f.name for f in dataclasses.fields(value)}:
            raise ConfigError(f"{key} is not a config key; see `python -m vutrain.config` for the list")
        value = getattr(value, part)
    if dataclasses.is_dataclass(value):
        raise ConfigError(f"{key} is a section; name one of its keys")
    return "" if value is None else str(value)


if __name__ == "__main__":
    # Run as `python -m vutrain.config`, this file is __main__, a second copy of the module whose
    # ConfigError is not the class that vutrain.ds_config (and any module importing
    # vutrain.config) raises: main() let those through as tracebacks. The package's main catches both.
    from vutrain.config import main as package_main

    try:
        package_main()
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        # main's own usage errors (`--config` or `--local_rank` without a value, `--get` without a
        # key) carry their line as the code: Python printed it and exited 1, while every other bad
        # input of this command exits 2 with its line, as train.py's argparse does.
        print(exc.code, file=sys.stderr)
        raise SystemExit(2) from None
