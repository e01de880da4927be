"""Tile configurations per kernel, shape class and GPU architecture, chosen at launch.

Every kernel launch asks ``select(kind, n, m, d, device)`` for its ``TileConfig``:

1. a forced config (``forced(...)``, used by the autotune sweep in ``kernels.bench``);
2. a tuned table written by ``python -m kernels.bench --autotune`` on a GPU, read from
   the JSON file named by ``KERNELS_TILE_CONFIGS`` (or ``kernels/tuned_configs.json``
   when that file exists);
3. the built-in ``TABLE`` below, keyed by (architecture, kernel kind, shape class);
4. under the Triton interpreter, always ``INTERPRET_CONFIG``: one config, because the
   interpreter runs programs serially (large tiles only cost time) and fails
   ``triton.autotune`` with more than one config.

Each built-in entry says where it comes from: ``measured`` entries are the best configs
of the tile sweep recorded in ``shared/gpu/README.md`` (H100, triton 3.6, 2026-11-24, at
the shapes named there); ``unmeasured`` entries are defaults nobody has timed yet.

Kinds: ``ce_fwd`` (softmax LSE forward), ``ce_grad`` (softmax gradient tiles),
``sig_fwd`` / ``sig_grad`` (sigmoid loss). Shape classes (``shape_class``):
``gathered`` (N < M: local rows against gathered columns), ``large`` (N >= M and
N * M >= 8192^2: the big square problems) and ``small`` (the rest).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kernels.provenance import distribution_version

KINDS = ("ce_fwd", "ce_grad", "sig_fwd", "sig_grad")
SHAPE_CLASSES = ("gathered", "large", "small")
ARCHES = ("sm_90", "sm_80", "fallback")
# The arches a tuned table may name: the table's, and the one a sweep under the Triton interpreter
# records (its rows never apply to a GPU launch, but the file is a valid table).
INTERPRETER_ARCH = "interpreter"
TUNED_ARCHES = (*ARCHES, INTERPRETER_ARCH)
# The input dtypes a tuned row may name, as ``dtype_name`` spells a launch's (and `kernels.bench --dtype`).
TUNED_DTYPES = ("bfloat16", "float16", "float32")
TUNED_ENV = "KERNELS_TILE_CONFIGS"
TUNED_DEFAULT = Path(__file__).with_name("tuned_configs.json")
LARGE_ELEMENTS = 8192 * 8192
# Shared memory one block may use (the opt-in maximum, bytes) per table arch: H100/H200 227 KiB,
# A100 163 KiB, the 99 KiB of sm_86/sm_89 otherwise. A launch fits the device's own figure
# (``device_shared_memory``); these stand in where no device is at hand (``choose`` in tests).
SHARED_MEMORY = {"sm_90": 232_448, "sm_80": 166_912, "fallback": 101_376}


@dataclass(frozen=True)
class TileConfig:
    """Block sizes of the score tile ``S[BM, BN]``, reduced over D in ``BD`` steps."""

    BM: int
    BN: int
    BD: int
    num_warps: int
    num_stages: int

    def as_list(self) -> list[int]:
        """``[BM, BN, BD, num_warps, num_stages]`` (the JSON and CLI form)."""
        return [self.BM, self.BN, self.BD, self.num_warps, self.num_stages]


@dataclass(frozen=True)
class Entry:
    """A table entry: the config, where it comes from (measured or not), and for a tuned entry the
    input dtype (``"bfloat16"``...), Triton version and compute capability (``"8.9"``) it was timed
    with (None: any)."""

    config: TileConfig
    source: str
    dtype: str | None = None
    triton: str | None = None
    capability: str | None = None


# Compiled Triton needs every tl.dot dimension >= 16; the interpreter would accept less,
# so this keeps >= 16 too, and stays small so tests of ragged shapes cross several tiles.
INTERPRET_CONFIG = TileConfig(BM=32, BN=32, BD=32, num_warps=4, num_stages=1)

_SWEEP = "measured: shared/gpu/README.md tile sweep, H100 bf16, triton 3.6, 2026-11-24"
_SQUARE_BEST = Entry(TileConfig(128, 256, 64, 8, 3), _SWEEP + ", best fwd+bwd at 32768x32768x768 (25.9 ms)")
_GATHERED_BEST = Entry(TileConfig(128, 128, 64, 8, 3), _SWEEP + ", best fwd at 4096x32768x768 (1.94 ms)")
# The config every kernel used before per-shape tables, measured in the same README's main table.
# ptxas on sm_90 (python -m kernels.compile_check): no spills, but for the sigmoid gradient
# tile's 68 bytes since it also sums the loss.
_PREVIOUS = TileConfig(128, 128, 32, 8, 3)
_UNMEASURED_64 = Entry(TileConfig(128, 128, 64, 8, 3), "unmeasured: BD=64 tensor-core default")
_UNMEASURED_32 = Entry(_PREVIOUS, "unmeasured: the pre-table default")

TABLE: dict[tuple[str, str, str], Entry] = {
    **{("sm_90", kind, "large"): _SQUARE_BEST for kind in ("ce_fwd", "ce_grad")},
    **{("sm_90", kind, "gathered"): _GATHERED_BEST for kind in ("ce_fwd", "ce_grad")},
    **{("sm_90", kind, "small"): _UNMEASURED_64 for kind in KINDS},
    **{
        ("sm_90", kind, cls): _UNMEASURED_64
        for kind in ("sig_fwd", "sig_grad")
        for cls in ("large", "gathered")
    },
    # A100: 164 KiB shared memory holds 3 stages of 128x64 + 64x128 bf16 slabs (96 KiB).
    **{("sm_80", kind, cls): _UNMEASURED_64 for kind in KINDS for cls in SHAPE_CLASSES},
    **{("fallback", kind, cls): _UNMEASURED_32 for kind in KINDS for cls in SHAPE_CLASSES},
}

TunedKey = tuple[str, str, str, str | None]
"""(arch, kernel kind, shape class, input dtype or None): where a tuned entry applies."""


class TunedTable(dict):
    """A tuned table as read: (arch, kind, shape class) -> Entry, the form tables had before they
    kept dtypes apart (where a location has several dtypes, the last row read), and ``rows``:
    every entry under its ``TunedKey``. Keyed without the dtype, a sweep for fp32 after one for
    bf16 replaced the bf16 entries, and the bf16 launches went back to the built-in configs."""

    def __init__(self, rows: dict[TunedKey, Entry]):
        super().__init__((key[:3], entry) for key, entry in rows.items())
        self.rows = rows


_FORCED: dict[str, TileConfig] = {}
log = logging.getLogger(__name__)


def shape_class(n: int, m: int) -> str:
    """``gathered`` (N < M), ``large`` (N * M >= 8192^2) or ``small``."""
    if n < m:
        return "gathered"
    return "large" if n * m >= LARGE_ELEMENTS else "small"


def arch_of(device: torch.device) -> str:
    """``sm_90`` (Hopper and newer), ``sm_80`` (Ampere and Ada) or ``fallback``. ROCm GPUs report
    CUDA-like capabilities (MI300: 9.4) but are no NVIDIA architecture: ``fallback``."""
    if torch.version.hip is not None:
        return "fallback"
    return table_arch(torch.cuda.get_device_capability(device)[0])


def table_arch(major: int) -> str:
    """The table's arch for NVIDIA compute capability ``major.x`` (one rule for launches and
    ``kernels.compile_check``)."""
    return "sm_90" if major >= 9 else ("sm_80" if major == 8 else "fallback")


# ROCm reports no opt-in limit: LDS is 64 KiB per workgroup, 160 KiB on CDNA4 (gfx950).
_ROCM_SHARED_MEMORY = {"gfx950": 160 * 1024}


def device_shared_memory(device: torch.device, arch: str) -> int:
    """Shared memory one block may use on this very device (bytes). The arch names are families
    whose members differ: sm_86/sm_89 (RTX 30xx/40xx) and sm_120 (RTX 50xx) allow 99 KiB, not
    the 163/227 KiB of the A100/H100 they share a table with, so the family's figure would let a
    config through that fails at launch with OutOfResources."""
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip is not None:
        return _ROCM_SHARED_MEMORY.get(getattr(props, "gcnArchName", "").split(":")[0], 64 * 1024)
    return getattr(props, "shared_memory_per_block_optin", None) or SHARED_MEMORY[arch]


@contextlib.contextmanager
def forced(kind: str, config: TileConfig) -> Iterator[None]:
    """Use ``config`` for every ``kind`` launch inside the block (the autotune sweep)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; one of {KINDS}")
    previous = _FORCED.get(kind)
    _FORCED[kind] = config
    try:
        yield
    finally:
        if previous is None:
            _FORCED.pop(kind, None)
        else:
            _FORCED[kind] = previous


def _fit_bd(config: TileConfig, d: int) -> TileConfig:
    """Narrow BD for small D (a 64-wide slab on D = 24 would be mostly padding); >= 16 for tl.dot."""
    bd = max(16, min(config.BD, 1 << max(0, (d - 1).bit_length())))
    return (
        config
        if bd == config.BD
        else TileConfig(config.BM, config.BN, bd, config.num_warps, config.num_stages)
    )


# Compute capabilities whose compiled shared memory was measured to keep ``num_stages - 1`` slabs
# (tests/test_review_kernels13.py): A100, RTX 30xx, Jetson Orin (8.7) and RTX 40xx/L4/L40S (8.9),
# which take the same Ampere mma path in Triton 3.9 and compile to the same bytes, bf16 and fp32.
AMPERE_PIPELINE = ("8.0", "8.6", "8.7", "8.9")
# Hopper pipelines its wgmma operands (16-bit, TF32) ``num_stages`` deep, but an exact-fp32 ("ieee")
# dot is no wgmma: it keeps ``num_stages - 1`` there too (tests/test_review_kernels14.py).
HOPPER = "9.0"
# The kinds whose kernels write their [BM, BN] gradient tile to memory (``out_ptr``).
TILE_WRITING_KINDS = ("ce_grad", "sig_grad")


def pipelined_slabs(config: TileConfig, capability: str | None = None, precision: str | None = None) -> int:
    """How many copies of the [BM, BD] and [BN, BD] operand slabs Triton 3.9 keeps in shared memory
    for these kernels on an NVIDIA card of compute ``capability`` ("8.6"), compiled, with fp32
    inputs at ``tl.dot`` ``precision`` (``runtime.dot_precision``; None: not known): ``num_stages``
    for Hopper's wgmma (sm_90, 16-bit or TF32 inputs), ``num_stages - 1`` (at least one) for
    Ampere's mma, whose cp.async pipeline keeps one stage in registers (``AMPERE_PIPELINE``,
    sm_87/sm_89 too), and for exact fp32 ("ieee") on sm_90. Other cards (None, sm_100+, ROCm) count
    ``num_stages``: the most, so the estimate is never under."""
    fewer = capability in AMPERE_PIPELINE or (capability == HOPPER and precision == "ieee")
    return max(1, config.num_stages - 1) if fewer else config.num_stages


def epilogue_bytes(config: TileConfig, element_size: int, kind: str | None = None) -> int:
    """Shared memory the gradient kernels (``TILE_WRITING_KINDS``) take after their D loop: the
    [BM, BN] tile they store leaves the dot's accumulator layout for a coalesced one through
    shared memory, the whole tile at most (Triton may do it in rounds of fewer bytes: on sm_80/89
    at BN = 256, or for exact fp32). The loop's slabs are free by then and Triton reuses their
    bytes, so this adds nothing where the slabs are larger; where it is (128x128x32, 2 stages,
    bf16 on an A100: 32768 B against 16384 B of slabs) it is what the launch needs. Other kinds
    (None: the operand slabs only, the count before kinds were told apart) store row vectors."""
    return config.BM * config.BN * element_size if kind in TILE_WRITING_KINDS else 0


def shared_memory_bytes(
    config: TileConfig,
    element_size: int,
    capability: str | None = None,
    kind: str | None = None,
    precision: str | None = None,
) -> int:
    """Shared memory a ``kind`` kernel compiled for ``capability`` needs: the pipelined operand
    slabs, ``pipelined_slabs`` copies of a [BM, BD] and a [BN, BD] tile (147456 B for 128x256x64,
    3 stages, bf16 on sm_90; 98304 B on sm_80), or the gradient tile's ``epilogue_bytes`` where
    that is larger. Without ``capability``: ``num_stages`` copies, the most any card takes (the
    estimate may be over a card's compiled size, never under it)."""
    slab_bytes = (config.BM + config.BN) * config.BD * element_size
    slabs = pipelined_slabs(config, capability, precision) * slab_bytes
    return max(slabs, epilogue_bytes(config, element_size, kind))


def fit_shared_memory(
    config: TileConfig,
    element_size: int,
    limit: int,
    capability: str | None = None,
    kind: str | None = None,
    precision: str | None = None,
) -> TileConfig:
    """Shrink a config until a ``kind`` kernel fits ``limit`` bytes of shared memory on a card of
    compute ``capability`` (None: any card, counted as the largest) at fp32 ``precision``: BD
    first (down to 32), then stages (down to 2), then the larger of BM and BN; the tile first
    where the gradient tile alone is over (narrower slabs would not help). The tables are sized for
    16-bit inputs; fp32 ones (4 bytes) need twice the bytes, e.g. 288 KiB for the square best config
    on sm_90, where the launch would fail with OutOfResources."""
    while shared_memory_bytes(config, element_size, capability, kind, precision) > limit:
        bm, bn, bd, warps, stages = config.as_list()
        tile_over = epilogue_bytes(config, element_size, kind) > limit
        if bd > 32 and not tile_over:
            bd //= 2
        elif stages > 2 and not tile_over:
            stages -= 1
        elif max(bm, bn) > 16:
            bm, bn = (bm // 2, bn) if bm >= bn else (bm, bn // 2)
        else:
            break
        config = TileConfig(bm, bn, bd, warps, stages)
    return config


def select(
    kind: str,
    n: int,
    m: int,
    d: int,
    device: torch.device,
    interpreting: bool,
    element_size: int = 2,
    dtype: torch.dtype | None = None,
    precision: str | None = None,
) -> TileConfig:
    """The tile config for one launch of ``kind`` on an N x M x D problem of ``element_size``-byte
    inputs of ``dtype`` (None: any tuned entry fits) whose ``tl.dot`` runs at ``precision``
    (``runtime.dot_precision``; None: counted as the one taking the most shared memory)."""
    if kind in _FORCED:
        return _FORCED[kind]
    if interpreting:
        return INTERPRET_CONFIG
    arch = arch_of(device)
    limit = device_shared_memory(device, arch)
    return choose(arch, kind, n, m, d, element_size, limit, dtype, capability_of(device), precision)


def capability_of(device: torch.device) -> str:
    """``"8.9"``: the compute capability a tuned row records and a launch compares."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def choose(
    arch: str,
    kind: str,
    n: int,
    m: int,
    d: int,
    element_size: int = 2,
    shared_memory: int | None = None,
    dtype: torch.dtype | None = None,
    capability: str | None = None,
    precision: str | None = None,
) -> TileConfig:
    """The table's config for ``arch``, narrowed to D and fitted to ``shared_memory`` bytes per
    block (default: the arch's, ``SHARED_MEMORY``) as Triton compiles the ``kind`` kernel for a
    card of compute ``capability`` (None: the largest any card takes, ``shared_memory_bytes``) at
    fp32 ``precision``."""
    limit = shared_memory or SHARED_MEMORY[arch]
    entry = lookup(arch, kind, n, m, dtype, capability)
    # ROCm cards report CUDA-like capabilities (MI300: 9.4) but take the fallback rows: an unknown card.
    nvidia = capability if arch != "fallback" else None
    return fit_shared_memory(_fit_bd(entry.config, d), element_size, limit, nvidia, kind, precision)


def lookup(
    arch: str, kind: str, n: int, m: int, dtype: torch.dtype | None = None, capability: str | None = None
) -> Entry:
    """The table entry for ``kind`` on an N x M problem of ``dtype`` inputs on a card of compute
    ``capability`` ("8.9"; None: any): tuned file (its entry for this dtype, Triton version and
    card), then built-in, then fallback."""
    key = (arch, kind, shape_class(n, m))
    path = tuned_path()
    tuned = tuned_for(load_tuned(path), key, dtype)
    if tuned is not None and tuned_entry_applies(tuned, dtype, path, key, capability):
        return tuned
    return TABLE.get(key) or TABLE[("fallback", kind, key[2])]


def tuned_for(table: dict, key: tuple[str, str, str], dtype: torch.dtype | None) -> Entry | None:
    """``table``'s entry at ``key`` for ``dtype`` inputs: the one tuned for that dtype, else one of
    unrecorded dtype (it applies to all), else any (``tuned_entry_applies`` then says why it is
    not used)."""
    rows = getattr(table, "rows", {})
    if dtype is not None:
        for tuned_dtype in (dtype_name(dtype), None):
            if key + (tuned_dtype,) in rows:
                return rows[key + (tuned_dtype,)]
    return table.get(key)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the tuned table's and ``kernels.bench --dtype``'s form)."""
    return str(dtype).removeprefix("torch.")


@functools.cache
def triton_version() -> str | None:
    """The installed Triton's version, read without importing Triton, also where it ships as
    torch's ``pytorch-triton*`` (None: not installed)."""
    return distribution_version("triton")


_SKIPPED: set[tuple] = set()


def tuned_entry_applies(
    entry: Entry, dtype: torch.dtype | None, path: str | None, key: tuple, capability: str | None = None
) -> bool:
    """Whether a tuned entry was timed under this launch's conditions. A config tuned with another
    Triton version may fail to compile there or spill, one tuned for 16-bit inputs says nothing
    about fp32 ones (or the reverse), and one timed on an RTX 4090 (8.9) says nothing about an A100
    (8.0), though both launch the ``sm_80`` rows; so such an entry gives way to the built-in table,
    with one logged line per entry and launch saying how to re-tune. Entries that record none of
    these (tables written before 2026-12) apply everywhere, as they always did."""
    launch = dtype_name(dtype) if dtype is not None else None
    installed = triton_version()
    recorded = (entry.dtype, entry.triton, entry.capability)
    if all(r is None or now is None or r == now for r, now in zip(recorded, (launch, installed, capability))):
        return True
    if (path, key, launch, capability) not in _SKIPPED:
        _SKIPPED.add((path, key, launch, capability))
        arch, kind, cls = key
        log.warning(
            "%s: the %s/%s/%s entry was tuned for %s inputs with triton %s on compute capability %s, this "
            "launch has %s inputs and triton %s on %s: using the built-in config; re-tune on this card with "
            "`python -m kernels.bench --autotune --dtype %s` (or unset %s)",
            path, arch, kind, cls, entry.dtype, entry.triton, entry.capability, launch or "any", installed,
            capability or "any", launch or entry.dtype, TUNED_ENV,
        )  # fmt: skip
    return False


def tuned_path() -> str | None:
    """The tuned table's path: ``$KERNELS_TILE_CONFIGS``, else the packaged file if present."""
    env = os.environ.get(TUNED_ENV)
    if env:
        return env
    return str(TUNED_DEFAULT) if TUNED_DEFAULT.exists() else None


@functools.lru_cache(maxsize=8)
def load_tuned(path: str | None) -> TunedTable:
    """Read a tuned table (``write_tuned``'s format); a missing or malformed file is an error."""
    if path is None:
        return TunedTable({})
    try:
        rows: dict[TunedKey, Entry] = {}
        numbers: dict[TunedKey, int] = {}
        for number, row in enumerate(_entries(_read_json(path)), start=1):
            key = _row_key(row, number)
            config = _row_config(row, number)
            entry = Entry(config, _row_source(row, number, path), *_conditions(row, number))
            tuned_key = key + (entry.dtype,)
            # Which of two rows for one launch would win is an accident of their order in the file
            # (a hand merge of two sweeps): refuse it and let the user keep the one they mean.
            if tuned_key in numbers:
                raise ValueError(
                    f"entries {numbers[tuned_key]} and {number} are both for {'/'.join(key)} "
                    f"with dtype {entry.dtype or 'any'}; keep one"
                )
            numbers[tuned_key] = number
            rows[tuned_key] = entry
        table = TunedTable(rows)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} is not a tile-config table written by `python -m kernels.bench --autotune` ({e}); "
            f"fix or delete it, or unset {TUNED_ENV}"
        ) from e
    return table


def _read_json(path: str) -> object:
    """The file's JSON. A key given twice in one object (a hand merge: two ``"entries"`` lists, or
    two ``"config"`` in one row) kept only the last, silently dropping the other's rows or config;
    a file nested past Python's recursion limit raised RecursionError, no ValueError."""

    def refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
        keys = [key for key, _ in pairs]
        for key in keys:
            if keys.count(key) > 1:
                raise ValueError(f"key {key!r} appears twice in one object; keep one")
        return dict(pairs)

    try:
        return json.loads(Path(path).read_text(), object_pairs_hook=refuse_duplicates)
    except RecursionError:
        raise ValueError("nested too deeply to be a table") from None


def _entries(doc: object) -> list:
    """The document's row list. ``{"entries": {}}`` or ``"entries": ""`` iterated as no rows and
    loaded as an empty table: the user's tuning silently unused."""
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise ValueError('wants an object {"entries": [...]} holding a list of rows')
    for number, row in enumerate(doc["entries"], start=1):
        if not isinstance(row, dict):
            raise ValueError(f"entry {number} is {row!r:.80}, not an object")
        missing = [name for name in ("arch", "kind", "shape_class", "config") if name not in row]
        if missing:
            raise ValueError(f"entry {number} lacks {', '.join(map(repr, missing))}")
    return doc["entries"]


def _row_config(row: dict, number: int) -> TileConfig:
    """A row's ``config``: five integers compiled Triton can build. JSON ``true`` is an int to
    Python, so ``[64, 64, 32, true, true]`` loaded as ``num_warps=True``."""
    values = row["config"]
    if not isinstance(values, list) or len(values) != 5 or any(isinstance(v, bool) for v in values):
        wants = "[BM, BN, BD, num_warps, num_stages]"
        raise ValueError(f"entry {number} has config {values!r:.80}; wants {wants}, five integers")
    config = TileConfig(*values)
    try:
        check_compilable(config)
    except ValueError as e:
        raise ValueError(f"entry {number}: {e}") from None
    return config


def _row_source(row: dict, number: int, path: str) -> str:
    """A row's ``source`` (reports print it as text), else the file it came from."""
    source = row.get("source", f"tuned: {path}")
    if not isinstance(source, str):
        raise ValueError(f"entry {number} has source {source!r}; wants a string")
    return source


def _row_key(row: dict, number: int) -> tuple[str, str, str]:
    """A row's (arch, kind, shape class), each one of its known names. A misspelled arch
    ("sm90", "sm_100": launches on sm_100 take the sm_90 rows) loaded fine and never applied."""
    key = (row["arch"], row["kind"], row["shape_class"])
    for name, value, valid in zip(("arch", "kind", "shape_class"), key, (TUNED_ARCHES, KINDS, SHAPE_CLASSES)):
        if value not in valid:
            raise ValueError(f"entry {number} has {name} {value!r}; one of {', '.join(valid)}")
    return key


def _conditions(row: dict, number: int) -> tuple[str | None, str | None, str | None]:
    """A row's ``dtype``, ``triton`` and ``capability`` (absent in tables written before they were
    recorded)."""
    dtype, triton, capability = row.get("dtype"), row.get("triton"), row.get("capability")
    for name, value in (("dtype", dtype), ("triton", triton), ("capability", capability)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string; got {value!r} in {row}")
    # Launches look rows up by torch's name: a hand-written "bf16" loaded and never applied.
    if dtype is not None and dtype not in TUNED_DTYPES:
        raise ValueError(f"entry {number} has dtype {dtype!r}; one of {', '.join(TUNED_DTYPES)}")
    return dtype, triton, capability


def parse_config(text: str) -> TileConfig:
    """``"BM,BN,BD,num_warps,num_stages"`` (the CLI form) as a config compiled Triton can build;
    otherwise a ValueError whose one line names ``text`` (the caller prefixes its option)."""
    parts = text.split(",")
    try:
        # int(), not str.isdigit(): "²" is a digit to isdigit() and a ValueError to int().
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(parts) != 5 or len(numbers) != 5:
        raise ValueError(f"wants BM,BN,BD,num_warps,num_stages (five integers); got {text!r}")
    config = TileConfig(*numbers)
    try:
        check_compilable(config)
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None
    return config


MAX_WARPS = 32  # 32 threads each: CUDA's limit of 1024 threads per block


def check_compilable(config: TileConfig) -> None:
    """Compiled Triton needs power-of-two blocks of at least 16 (tl.arange, tl.dot) and a
    power-of-two warp count of at most 32 (CUDA's 1024 threads per block); the interpreter accepts
    others, so a hand-edited table would only fail at its first launch on the GPU, deep inside
    Triton's compiler or the driver."""

    def integer(x: object) -> bool:
        # bool is an int subclass: True would pass as 1 warp or stage.
        return isinstance(x, int) and not isinstance(x, bool)

    def pow2(x: int) -> bool:
        return integer(x) and x > 0 and x & (x - 1) == 0

    if not all(pow2(b) and b >= 16 for b in (config.BM, config.BN, config.BD)):
        raise ValueError(f"BM, BN and BD must be powers of two >= 16; got {config.as_list()}")
    warps_ok = pow2(config.num_warps) and config.num_warps <= MAX_WARPS
    if not warps_ok or not (integer(config.num_stages) and config.num_stages >= 1):
        raise ValueError(
            f"num_warps must be a power of two <= {MAX_WARPS} and num_stages >= 1; got {config.as_list()}"
        )


def write_tuned(path: str | Path, entries: dict[tuple, Entry]) -> None:
    """Write a tuned table that ``load_tuned`` reads back. Keys are (arch, kind, shape class) or a
    ``TunedKey`` (``TunedTable.rows``: one entry per dtype); each entry's own ``dtype`` is written."""
    ordered = sorted(entries.items(), key=lambda item: (item[0][:3], item[1].dtype or ""))
    rows = [
        {"arch": a, "kind": k, "shape_class": c, "config": e.config.as_list(), "source": e.source}
        | {
            name: value
            for name, value in (("dtype", e.dtype), ("triton", e.triton), ("capability", e.capability))
            if value is not None
        }
        for (a, k, c, *_), e in ordered
    ]
    body = ",\n".join("  " + json.dumps(r) for r in rows)  # one entry per line: readable diffs
    # Through a temporary file and a rename: a sweep killed mid-write (its time limit) must leave
    # the previous table, not a truncated one that every later launch refuses.
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text('{"entries": [\n' + body + "\n]}\n")
    os.replace(tmp, path)
    load_tuned.cache_clear()


def describe(entry: Entry) -> dict:
    """The entry as a plain dict (for JSON reports)."""
    return {
        "config": asdict(entry.config),
        "source": entry.source,
        "dtype": entry.dtype,
        "triton": entry.triton,
        "capability": entry.capability,
    }
