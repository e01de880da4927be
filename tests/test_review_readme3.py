"""README.md against the code at HEAD: options, config keys, recipes, limits and the file map.

test_review_readme2 checks the `--help` texts the README quotes, test_config the generated config
table. These read the rest of the README as a user would copy it: every `--option` of a command
line it shows is an option of that command's parser (and a value from its choices), every
`--option` named in prose belongs to some project parser or to a named outside tool, every
dotted config key outside the table is a key, every training recipe in a code block passes the
config's validation, the gpu_bench.sh limits it quotes are the script's, and its repository map
names the files that exist (it said train.py was ~130 lines, which it was not, and left out
data_wait.py). The Tests table has a row naming each tests/test_*.py file in full (15 had none).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import shlex
import sys

import pytest

from slurm_cluster import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
LINES = README.splitlines()

# (module or script, argv that picks the parser) for every command the README runs.
TOOLS = {
    "vutrain.train": ("vutrain.train", ()),
    "vutrain.bench": ("vutrain.bench", ()),
    "vutrain.bench --compare open_clip": ("vutrain.bench", ("--compare", "open_clip")),
    "vutrain.bench data": ("vutrain.bench", ("data",)),
    "vutrain.demo": ("vutrain.demo", ()),
    "vutrain.export": ("vutrain.export", ()),
    "vutrain.plots": ("vutrain.plots", ()),
    "vutrain.checkpoint_reshape": ("vutrain.checkpoint_reshape", ()),
    "vutrain.gradcache_bench": ("vutrain.gradcache_bench", ()),
    "vutrain.data.synthetic": ("vutrain.data.synthetic", ()),
    "kernels.bench": ("kernels.bench", ()),
    "kernels.compile_check": ("kernels.compile_check", ()),
    "dataset_tools.bench": ("dataset_tools.bench", ()),
    "dataset_tools": ("dataset_tools.cli", ()),
    "tools/count_step_ops.py": ("tools/count_step_ops.py", ()),
    "tools/host_python_time.py": ("tools/host_python_time.py", ()),
    "tools/profile_step.py": ("tools/profile_step.py", ()),
    "tools/lock_versions.py": ("tools/lock_versions.py", ()),
}

# Options the README names that belong to programs outside the project, by program.
OUTSIDE_OPTIONS = {
    "deepspeed": {"--num_gpus", "--include", "--hostfile", "--no_ssh", "--node_rank", "--master_addr"},
    "deepspeed runner": {"--master_port", "--save_pid"},
    "torchrun": {"--nproc_per_node"},
    "sbatch / srun / scancel": {
        "--batch",
        "--cpus-per-task",
        "--exclusive",
        "--gpus",
        "--gpus-per-node",
        "--gpus-per-task",
        "--kill-on-bad-exit",
        "--label",
        "--mpi",
        "--ntasks-per-node",
        "--open-mode",
        "--requeue",
        "--signal",
        "--time",
    },
    "pip": {"--no-deps"},
    "ruff format": {"--check"},
    "pytest-xdist": {"--dist"},
    "yt-dlp": {"--dump-json"},
    "img2dataset": {"--encode_format"},
    "open_clip's trainer": {"--local-loss", "--gather-with-grad", "--torchcompile"},
}
# Options of project programs that read their arguments without argparse: the file must handle them.
HAND_PARSED = {"--get": "vutrain/config.py", "--no-extras": "tools/check_core_install.sh"}

COMMAND_START = re.compile(
    r"python3? -m (?P<mod>[\w.]+)(?P<sub> --compare open_clip| data)?"
    r"|python3? (?P<script>[\w/]+\.py)"
    r"|(?P<console>vutrain-(?:train|export|dataset))\b"
)
OPTION = re.compile(r"(?<![\w-])(--[a-zA-Z][\w-]*)(?![\w-]|\.\w)")


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _load(name: str):
    if name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(os.path.basename(name)[:-3], REPO / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(name)


def collect_parsers() -> dict[str, argparse.ArgumentParser]:
    """Each tool's real parser, caught where its main() parses (nothing runs past that point)."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    originals = {
        name: getattr(argparse.ArgumentParser, name)
        for name in ("parse_args", "parse_known_args", "parse_known_intermixed_args", "parse_intermixed_args")
    }

    def catch(self, *args, **kwargs):
        raise _Captured(self)

    sys.path.insert(0, str(REPO / "tools"))  # the tools import their scratch_dirs helper
    for name in originals:
        setattr(argparse.ArgumentParser, name, catch)
    found = {}
    try:
        for key, (name, argv) in TOOLS.items():
            module = _load(name)
            sys.argv = [name, *argv]
            try:
                try:
                    module.main(list(argv))
                except TypeError:  # lock_versions.main() reads sys.argv
                    module.main()
            except _Captured as caught:
                found[key] = caught.parser
            assert key in found, f"{name}'s main() returned without parsing its arguments"
    finally:
        for name, method in originals.items():
            setattr(argparse.ArgumentParser, name, method)
        sys.argv, sys.path[:] = saved_argv, saved_path
    return found


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    return collect_parsers()


def option_actions(parser: argparse.ArgumentParser, sub: str | None = None) -> dict[str, argparse.Action]:
    """Option string -> action; with `sub`, that subcommand's parser's options."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and sub in action.choices:
            return option_actions(action.choices[sub])
    return {option: action for action in parser._actions for option in action.option_strings}


def every_option(parsers) -> set[str]:
    out = set()
    for parser in parsers.values():
        out |= set(option_actions(parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    out |= set(option_actions(sub))
    return out


def readme_commands() -> list[tuple[int, str]]:
    """(line, command text) of every project command in a code block (continued lines joined,
    comment cut) or an inline `code` span."""
    found, in_code, i = [], False, 0
    while i < len(LINES):
        line = LINES[i]
        if line.startswith("```"):
            in_code, i = not in_code, i + 1
            continue
        if in_code:
            end = i
            while line.endswith("\\") and end + 1 < len(LINES):
                end += 1
                line = line[:-1] + " " + LINES[end]
            line = re.split(r"\s#\s|&&|;|\|", line.split("   #")[0])[0]
            found += [(i + 1, line[m.start() :]) for m in COMMAND_START.finditer(line)]
            i = end + 1
            continue
        for span in re.findall(r"`([^`]+)`", line):
            found += [(i + 1, span[m.start() :]) for m in COMMAND_START.finditer(span)]
        i += 1
    return found


def tool_of(command: str) -> tuple[str, str | None] | None:
    """(TOOLS key, dataset_tools subcommand) of a README command, None for an outside program."""
    m = COMMAND_START.match(command)
    if m["console"]:
        key = {"vutrain-train": "vutrain.train", "vutrain-export": "vutrain.export"}.get(
            m["console"], "dataset_tools"
        )
    elif m["script"]:
        key = "vutrain.train" if m["script"].endswith("train.py") else m["script"]
    else:
        key = m["mod"] + (m["sub"] or "")
        if key not in TOOLS:
            return None  # python -m pytest, deepspeed's runner
    sub = None
    if key == "dataset_tools":
        rest = command[m.end() :].split()
        sub = rest[0] if rest and rest[0].isidentifier() else None
    return key, sub


def check_options(parser, sub, words: list[str], where: str) -> list[str]:
    """Unknown options among `words`, and values outside an option's choices."""
    actions = option_actions(parser, sub)
    wrong = []
    for j, word in enumerate(words):
        for option in OPTION.findall(word.split("=")[0]) if word.startswith("--") else []:
            if option not in actions:
                wrong.append(f"{where}: {option} is not an option")
                continue
            choices = actions[option].choices
            value = word.split("=", 1)[1] if "=" in word else (words[j + 1] if j + 1 < len(words) else "")
            placeholder = value.upper() == value  # N, T, DIR
            if choices and value.isidentifier() and not placeholder and value not in choices:
                wrong.append(f"{where}: {option} {value} is not one of {sorted(choices)}")
    return wrong


def test_readme_commands_use_options_their_parser_has(parsers):
    """`python -m vutrain.bench --compare open_clip --rounds 3`, `python -m dataset_tools build
    --shard-size 1000`, ...: each option of a command the README shows is one that command's
    parser takes, with a value from its choices (a renamed or removed flag fails here)."""
    commands = [(line, text, tool_of(text)) for line, text in readme_commands()]
    checked = {tool[0] for _, _, tool in commands if tool}
    assert {"vutrain.train", "vutrain.bench --compare open_clip", "kernels.bench", "dataset_tools"} <= checked
    wrong = []
    for line, text, tool in commands:
        if tool is None:
            continue
        words = [w.strip("[]") for w in text.replace("`", " ").split()]
        wrong += check_options(parsers[tool[0]], tool[1], words, f"README line {line}: {text[:60]}")
    assert not wrong, "\n".join(wrong)


def test_gpu_bench_dry_run_options_are_the_steps_tools_options(parsers):
    """The README's gpu_bench.sh dry run appends COMPARE_EXTRA etc. to each step's tool: each of
    their options is one that tool takes (a bad one failed only when the script was run)."""
    start = README.index("GPU_SETUP=/dev/null PYTHON=.venv/bin/python")
    block = README[start : README.index("```", start)].replace("\\\n", " ")
    step_tool = {
        "COMPARE_EXTRA": "vutrain.bench --compare open_clip",
        "COMPILE_EXTRA": "vutrain.bench --compare open_clip",
        "DATA_EXTRA": "vutrain.bench data",
        "DEMO_EXTRA": "vutrain.demo",
        "E2E_EXTRA": "vutrain.bench",
        "PROFILE_EXTRA": "tools/profile_step.py",
        "KERNELS_ARGS": "kernels.bench",
    }
    values = dict(re.findall(r"\b([A-Z0-9_]+)=(\"[^\"]*\"|\S+)", block))
    assert set(step_tool) <= set(values), sorted(values)
    wrong = []
    for variable, tool in step_tool.items():
        words = shlex.split(values[variable])
        wrong += check_options(parsers[tool], None, words, f"{variable} ({tool})")
    assert not wrong, "\n".join(wrong)


def test_every_option_the_readme_names_belongs_to_some_program(parsers):
    """An option named in prose (`--rounds` (default 3), `--backward-schedule one_pass`) is an
    option of a project parser, of a project script that reads it by hand, or of a named outside
    program: a flag removed from the code fails here wherever the README mentions it."""
    ours = every_option(parsers)
    outside = set().union(*OUTSIDE_OPTIONS.values())
    unknown = {}
    for number, line in enumerate(LINES, 1):
        for option in OPTION.findall(line):
            if option in ours or option in outside:
                continue
            if option in HAND_PARSED and option in (REPO / HAND_PARSED[option]).read_text():
                continue
            if option == "--conf" and "--config".startswith(option):  # the abbreviation the README shows
                continue
            unknown.setdefault(option, []).append(number)
    assert not unknown, unknown
    assert not (ours & outside), ours & outside  # a project option listed as outside: drop it there


def config_keys() -> set[str]:
    from vutrain.config import reference_markdown

    return set(re.findall(r"^\| `([^`]+)` \|", reference_markdown(), re.M))


def test_config_keys_the_readme_names_exist():
    """`train.accumulation`, `data.stall_warning_s`, ...: every dotted key in the README's prose is a
    key of the config (the generated table is checked by test_config); module names
    (`train.py`, `data.synthetic`) and the refused examples the README quotes are not keys."""
    keys = config_keys()
    sections = sorted({k.split(".")[0] for k in keys if "." in k})
    table = README[README.index("## Config reference") : README.index("## Data pipeline")]
    prose = README.replace(table, "")
    not_keys = {
        "train.zero_stag",  # the misspelt key whose error the README shows
        "train.lr.x",  # an override below a key, refused
        "train.preset",  # a key in the wrong section, which the error message corrects
        "train.main",  # the function
        "data.samples.lost_and_ignored",
        "model.check_model_config",
        "data.tokenizer.train_bpe_tokenizer",
        "model.safetensors",
    }
    modules = re.compile(r"\.(py|synthetic|webdataset)$")
    unknown = {}
    for m in re.finditer(rf"(?<![\w./-])((?:{'|'.join(sections)})\.[a-z_][\w.]*[a-z_0-9])", prose):
        key = m.group(1)
        if key in keys or key in not_keys or modules.search(key):
            continue
        unknown.setdefault(key, []).append(prose[: m.start()].count("\n") + 1)
    assert not unknown, unknown


def trainer_recipes() -> list[tuple[int, str | None, list[str]]]:
    """(line, --config, overrides) of each code-block command that starts training."""
    recipes = []
    for line, text in readme_commands():
        if not re.match(r"python3? vutrain/train\.py|vutrain-train", text):
            continue
        words = shlex.split(text)
        config = words[words.index("--config") + 1] if "--config" in words else None
        if config == "...":  # `srun python vutrain/train.py --config ...`
            continue
        overrides = [w for w in words if re.match(r"[a-z_][\w.]*=", w)]
        recipes.append((line, config, overrides))
    # The sbatch worked examples hand their arguments to train.py the same way.
    for block in re.finditer(r"```[^\n]*\n(.*?)```", README, re.S):
        for m in re.finditer(r"launch/slurm/\w+\.sbatch ((?:\\\n|[^\n])+)", block.group(1)):
            words = shlex.split(m.group(1).replace("\\\n", " "))
            overrides = [w for w in words if re.match(r"[a-z_][\w.]*=", w)]
            line = README[: block.start(1) + m.start()].count("\n") + 1
            recipes.append((line, words[words.index("--config") + 1], overrides))
    return recipes


def test_training_recipes_in_the_readme_pass_validation(monkeypatch):
    """Each training command the README gives (`--config vutrain/configs/tiny.yaml
    loss.name=align_uniform loss.uniform_weight=1.5`, the 4-node ZeRO-3 example) resolves and
    validates as the trainer's start-up does (shards need not exist here; placeholders such as
    `...` are left out); only the misspelt-key example is meant to fail."""
    from vutrain.config import ConfigError, load_config

    monkeypatch.chdir(REPO)  # the paths in the recipes are the checkout's
    recipes = trainer_recipes()
    assert len(recipes) >= 5, recipes
    failures, misspelt = [], 0
    for line, config, overrides in recipes:
        overrides = [o for o in overrides if "..." not in o and "<" not in o]
        if not any(o.startswith("data.train_shards=") for o in overrides):
            overrides.append("data.train_shards=/data/{00000..00001}.tar")
        try:
            load_config(str(REPO / config) if config and "/" in config else config, overrides)
        except ConfigError as exc:
            misspelt += "unknown config key 'train.zero_stag'" in str(exc)
            if "unknown config key 'train.zero_stag'" not in str(exc):
                failures.append(f"README line {line}: {exc}")
    assert not failures, "\n".join(failures)
    assert misspelt == 1  # the README's example of a refused key is still refused


def test_gpu_bench_limits_the_readme_quotes_are_the_scripts():
    """`TESTS_S=150`, ..., `TOTAL_S=540`, `SETUP_S=120` in the README's gpu_bench section are
    the script's defaults (`${TESTS_S:-150}`)."""
    script = (REPO / "launch" / "gpu_bench.sh").read_text()
    start = README.index("### All GPU checks in one go")
    section = README[start : README.index("\n## ", start)]
    quoted = dict(re.findall(r"`([A-Z0-9]+_S)=(\d+)`", section))
    assert {"TESTS_S", "COMPARE_S", "TOTAL_S", "SETUP_S"} <= set(quoted), quoted
    for name, value in quoted.items():
        defaults = set(re.findall(rf"\$\{{{name}:-(\d+)\}}", script))
        assert defaults == {value}, (name, value, defaults)


def repository_map() -> str:
    start = README.index("## Repository map")
    block = README.index("```", start)
    return README[block : README.index("```", block + 3)]


def test_repository_map_names_the_files_there_are():
    """Every .py file the map names exists in the folders it maps, and every module of vutrain/,
    its data/ and losses/, kernels/, dataset_tools/ and tools/ is named (data_wait.py was not)."""
    text = repository_map()
    named = set(re.findall(r"\b(\w+\.py)\b", text))
    folders = ["vutrain", "vutrain/data", "vutrain/losses", "kernels", "dataset_tools", "tools"]
    present = {f for d in folders for f in os.listdir(REPO / d) if f.endswith(".py")}
    assert named <= present, sorted(named - present)
    unnamed = {
        f"{d}/{f}"
        for d in folders
        for f in os.listdir(REPO / d)
        if f.endswith(".py") and f not in ("__init__.py", "__main__.py") and f not in named
    }
    assert not unnamed, sorted(unnamed)
    for shell in re.findall(r"\b(\w+\.(?:sh|sbatch))\b", text):
        assert list(REPO.glob(f"**/{shell}")), shell


def test_repository_map_line_count_of_train_py_is_near():
    """The map gives train.py's size: within a third of the file's lines (it said ~130 at 320)."""
    said = int(re.search(r"train\.py\s+entry point \(~(\d+) lines\)", repository_map()).group(1))
    lines = len((REPO / "vutrain" / "train.py").read_text().splitlines())
    assert abs(said - lines) <= lines / 3, (said, lines)


def tests_table_files() -> list[set[str]]:
    """The test files each row of the README's Tests table names in its first cell."""
    start = README.index("\n## Tests\n")
    section = README[start : README.index("\n## ", start + 1)]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [set(re.findall(r"`([^`]+\.py)`", row.split(" | ")[0])) for row in rows]


def test_every_test_file_has_a_row_in_the_tests_table():
    """Every tests/test_*.py on disk is named in full in the first cell of a Tests table row, and
    every name there is a file that exists: 15 files were covered only by a pattern
    (`test_data_*.py`) or a shortened name (`_fetch.py`), and a row for a removed file would stay
    (`test_kernels_gpu.py` (`-m gpu`): only the `....py` names of the cell count)."""
    rows = tests_table_files()
    assert len(rows) > 100, len(rows)  # the table was found
    named = set().union(*rows)
    on_disk = {path.name for path in (REPO / "tests").glob("test_*.py")}
    assert on_disk - named == set(), f"test files without a row: {sorted(on_disk - named)}"
    assert named - on_disk == set(), f"rows naming no test file: {sorted(named - on_disk)}"
