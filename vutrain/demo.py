"""`make demo`: the whole job end to end on built-in synthetic data, on CPU or one GPU.

1. write synthetic JPEG shards (24 colour x shape classes, titles and tags, a held-out split);
2. train the tiny preset with DeepSpeed ZeRO-2 through the real `deepspeed` launcher: on 2 CPU
   ranks in fp32, or, when a CUDA GPU is present, on one GPU in bf16 (fp32 before Ampere) with
   the GPU recipe;
3. evaluate (retrieval recall, zero-shot top-1 over the held-out classes) during and after training;
4. export to a Hugging Face CLIPModel directory;
5. classify a held-out thumbnail through `transformers.pipeline("zero-shot-image-classification")`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

from vutrain.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "vutrain", "configs", "tiny.yaml")

# The CPU recipe (tiny.yaml, 2 ranks x 64, 300 steps, fp32) reached 0.49-0.51 on one GPU in bf16:
# one rank sees half the samples and half the negatives per step. On a GPU a larger batch is
# nearly free, so the GPU recipe trains one rank at 256 per step (twice the CPU run's global
# batch) for 600 steps: about 19 passes over the 8192 samples instead of 4.7. On an H200 it
# reached 0.996 in 85 s (2026-12-04; BENCHMARKS.md, "The demo").
GPU_RECIPE = [
    "train.precision=bf16",
    "train.micro_batch_size=256",
    "eval.every=200",
    "train.checkpoint_every=200",
    "data.num_workers=4",
]
GPU_STEPS = 600


def gpu_recipe() -> list[str]:
    """GPU_RECIPE for this machine's GPU: fp32 instead of bf16 where the GPU has no bf16 of its
    own (before Ampere: a T4, a V100). torch emulates bf16 there, slowly, and some cuBLAS
    paths refuse it; the tiny model trains in fp32 in about the same time."""
    if native_bf16():
        return list(GPU_RECIPE)
    return [o if o != "train.precision=bf16" else "train.precision=fp32" for o in GPU_RECIPE]


def native_bf16() -> bool:
    """Whether the first visible GPU has bf16 of its own, asked in a child process: asking here
    would start CUDA in this process, which then waits on the launcher for the whole run holding
    a CUDA context (hundreds of MiB) on the GPU the ranks train on. True if the child fails."""
    code = "import torch; print(torch.cuda.is_bf16_supported(including_emulation=False))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return r.returncode != 0 or r.stdout.strip().splitlines()[-1:] != ["False"]


def use_gpu(device: str) -> bool:
    """--device auto picks the GPU when torch sees one."""
    if device == "cpu":
        return False
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU; use --device cpu")
    return torch.cuda.is_available()


def deepspeed_command(num_ranks: int, gpu: bool = False) -> list[str]:
    """The deepspeed launcher of this interpreter's environment, for `num_ranks` ranks."""
    exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if not os.path.exists(exe):
        exe = shutil.which("deepspeed") or exe
    from vutrain.distributed import free_port

    # A free port rather than the launcher's fixed 29500, so a second run on the machine can start.
    return [exe, *rank_devices(num_ranks, gpu), "--master_port", str(free_port())]


def rank_devices(num_ranks: int, gpu: bool, env: dict | None = None) -> list[str]:
    """The launcher's arguments that place the ranks: the first visible GPUs on a GPU.

    deepspeed given --num_gpus drops CUDA_VISIBLE_DEVICES and runs on GPUs 0..N-1 of the
    machine, so a GPU picked with CUDA_VISIBLE_DEVICES=3 (a shared machine, a scheduler's
    choice) was ignored and the demo trained on GPU 0, perhaps someone else's. --include names
    the visible ones instead. UUID entries (GPU-..., MIG-...) are beyond deepspeed's --include:
    they keep --num_gpus.
    """
    env = os.environ if env is None else env
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if gpu and visible and all(v.isdigit() for v in visible):
        if len(visible) < num_ranks:
            raise SystemExit(
                f"--ranks {num_ranks}: CUDA_VISIBLE_DEVICES={','.join(visible)} shows "
                f"{len(visible)} GPU(s); show more GPUs or ask for fewer ranks"
            )
        return ["--include", "localhost:" + ",".join(visible[:num_ranks])]
    return ["--num_gpus", str(num_ranks)]


DEMO_MARKER = ".vutrain_demo"  # in --out: its data/, run/ and hf_model/ are the demo's to replace
DEMO_FOLDERS = ("data", "run", "hf_model")


def _legacy_demo_output(out: str) -> bool:
    """A folder a demo wrote before the marker existed (2026-12-06): run/config.yaml trains on
    out/data/train, and data/ holds only the demo's train/ and val/."""
    import yaml

    data = os.path.join(out, "data")
    try:
        with open(os.path.join(out, "run", "config.yaml"), encoding="utf-8") as fh:
            shards = str(yaml.safe_load(fh)["data"]["train_shards"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return False
    own = os.path.isdir(data) and set(os.listdir(data)) <= {"train", "val", ".vutrain_synthetic"}
    return own and shards.startswith(os.path.join(data, "train", "{"))


def claim_output(out: str) -> None:
    """Make ``out`` the demo's, or refuse: the demo replaces out/data, out/run and out/hf_model,
    and `--out .` in a project with its own data/ lost it without a word."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:  # a file of that name, no permission: one line, not a traceback
        raise DemoError(f"--out {out} cannot be the demo's folder ({exc}): pass another --out") from exc
    marker = os.path.join(out, DEMO_MARKER)
    if not os.path.exists(marker):
        found = [name for name in DEMO_FOLDERS if os.path.exists(os.path.join(out, name))]
        if found and not _legacy_demo_output(out):
            raise DemoError(
                f"--out {out} already has {', '.join(n + '/' for n in found)} that the demo did not "
                f"write, and the demo replaces them: pass another --out (e.g. --out demo_out)"
            )
        try:
            with open(marker, "w", encoding="utf-8") as fh:
                fh.write("written by python -m vutrain.demo: it replaces data/, run/ and hf_model/ here\n")
        except OSError as exc:  # a read-only or special folder (/proc/...): one line, not a traceback
            raise DemoError(f"--out {out} cannot be written ({exc}): pass another --out") from exc


def say_an_earlier_run_is_replaced(out: str) -> None:
    """One line when ``out`` holds an earlier demo's run or model: a second `make demo` deleted a
    run of minutes (and its exported model) without a word, and a user could expect it to resume."""
    earlier = [name + "/" for name in ("run", "hf_model") if os.path.exists(os.path.join(out, name))]
    if earlier:
        print(
            f"{out} holds an earlier demo's {' and '.join(earlier)}: the demo does not resume, this run "
            "starts fresh and replaces them (to keep a run, give each run its own --out)",
            flush=True,
        )


def write_data(out: str, num_samples: int, val_samples: int, shard_size: int, seed: int) -> tuple[str, str]:
    """Write fresh synthetic train and val shards under ``out/data`` (an output `claim_output`
    made the demo's); returns their shard specs."""
    from vutrain.data.synthetic import write_synthetic

    data = os.path.join(out, "data")
    try:
        if os.path.isdir(data):
            shutil.rmtree(data)
        info = write_synthetic(
            data, num_samples=num_samples, shard_size=shard_size, seed=seed, val_samples=val_samples
        )
    except OSError as exc:  # a full disk, a file named data: one line before training starts
        raise DemoError(
            f"cannot write the synthetic shards to {data} ({exc}): free it or pass another --out"
        ) from exc
    return info["train_shards"], info["val_shards"]


def train_overrides(
    run_dir: str, train_shards: str, val_shards: str, steps: int, extra: list[str]
) -> list[str]:
    """The overrides the training run gets on top of tiny.yaml: the demo's, then the user's (which win)."""
    return [
        f"output_dir={run_dir}",
        f"data.train_shards={train_shards}",
        f"data.val_shards={val_shards}",
        f"train.max_steps={steps}",
        "train.resume=never",
        *extra,
    ]


def training_line(overrides: list[str], steps: int, ranks: int, gpu: bool) -> str:
    """What the training run will do, as the demo prints it, read from tiny.yaml and ``overrides``
    as the run reads them: a user's `train.max_steps=N` wins over --steps (and `train.zero_stage`,
    `train.precision` over the demo's), and the demo printed its --steps all the same. Where the
    overrides do not parse, the demo's own figures: the run then stops naming the bad one."""
    from vutrain.config import ConfigError, build_config

    try:
        t = build_config(TINY_CONFIG, overrides).train
        stage, precision, steps = t.zero_stage, t.precision, t.max_steps
    except ConfigError:
        stage, precision = 2, "fp32"
    where = f"{ranks} GPU rank(s)" if gpu else f"{ranks} CPU ranks"
    return f"training the tiny preset, ZeRO-{stage}, {where}, {precision}, {steps} steps"


DEMO_OWNED_KEYS = {
    "output_dir": "pass --out DIR (the run goes to DIR/run, where the demo reads it back) instead",
    # The run trained on the user's shards while the demo printed that it wrote and used its own.
    "data.train_shards": "it trains on the synthetic shards it writes (size them with --num-samples and "
    "--shard-size); train on your own shards with vutrain/train.py instead",
}


def refuse_demo_owned_overrides(overrides: list[str]) -> None:
    """DemoError for an override of a key the demo sets from its own options: `output_dir=X` sent the
    run to X while the demo read out/run afterwards and said it had no evaluation."""
    for item in overrides:
        key, _, value = (part.strip() for part in item.partition("="))
        if key in DEMO_OWNED_KEYS:
            raise DemoError(f"{item!r}: the demo sets {key} itself; {DEMO_OWNED_KEYS[key]}")
        # `data.val_shards=` (no evaluation) stays the user's; shards of their own met the demo's
        # in the config as one key given twice, a line about quoting a shell's brace expansion.
        if key == "data.val_shards" and value:
            raise DemoError(
                f"{item!r}: the demo evaluates on the held-out split it writes; evaluate your own "
                "shards with vutrain/train.py (data.val_shards=...) instead"
            )


def train(
    run_dir: str,
    train_shards: str,
    val_shards: str,
    ranks: int,
    steps: int,
    extra: list[str],
    gpu: bool = False,
) -> None:
    """Run vutrain/train.py through the deepspeed launcher (CPU ranks unless `gpu`)."""
    cmd = deepspeed_command(ranks, gpu) + [
        os.path.join(REPO, "vutrain", "train.py"),
        "--config",
        TINY_CONFIG,
        *train_overrides(run_dir, train_shards, val_shards, steps, extra),
    ]
    # Quoted as a shell reads it: pasted unquoted, bash expanded data.train_shards=.../{00000..00015}.tar
    # into 16 overrides of the key, of which the last won, and the run trained on one shard.
    print("$ " + shlex.join(cmd), flush=True)
    env = dict(
        os.environ,
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    if not gpu:  # --device cpu on a GPU machine: keep the ranks off the GPU
        env.update(VUTRAIN_DEVICE="cpu", DS_ACCELERATOR="cpu")
    with stop_signals_reach_the_ranks():
        proc = subprocess.run(cmd, env=env, cwd=REPO)
    if proc.returncode != 0:  # the run has said why above; a traceback from here would bury it
        raise DemoError(f"training exited {proc.returncode} (its own message is above)")


class DemoError(RuntimeError):
    """A step of the demo failed; main() prints it as one line and exits with `exit_code`."""

    exit_code = 1


class DemoStopped(DemoError):
    """A stop signal ended the demo; the shell's code for it (128 + signal number)."""

    def __init__(self, signum: int, during: str):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} {during}; run the same command again: the demo starts over")
        self.exit_code = 128 + signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_GRACE_S = 60  # deepspeed's launch.py gives its ranks 30 s after a SIGTERM before it kills them


@contextlib.contextmanager
def stop_signals_reach_the_ranks():
    """While training runs: a stop signal to the demo is passed to every process under it, and the
    demo waits for them to end, then raises DemoStopped.

    deepspeed's runner catches no signal on one machine: a SIGTERM to the demo (`kill`, a scheduler,
    `timeout --foreground`) ended the demo and the runner and left launch.py and its ranks training,
    orphaned, into the run directory that a rerun deletes under them; a Ctrl-C sent to the demo alone
    did the same (subprocess.run SIGKILLs the runner) and ended in a traceback. A second signal kills.
    """
    if threading.current_thread() is not threading.main_thread():  # no handlers outside it
        yield
        return
    import psutil

    received: list[int] = []
    stopping: list[psutil.Process] = []

    def forward(signum, _frame):
        received.append(signum)
        tree = psutil.Process().children(recursive=True)
        stopping.extend(tree)
        for process in tree:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGTERM if len(received) == 1 else signal.SIGKILL)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        _, alive = psutil.wait_procs(stopping, timeout=STOP_GRACE_S)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=10)
        raise DemoStopped(received[0], "during training (its ranks are stopped too)")


def check_one_global_batch(num_samples: int, ranks: int, overrides: list[str]) -> None:
    """DemoError unless an epoch holds one global batch (train.micro_batch_size x ranks).

    `--num-samples 64` on 2 CPU ranks wrote the shards and started the launcher and both ranks,
    then failed in training on "data.num_samples=64", a key the user of the demo never set.
    """
    from vutrain.config import ConfigError, build_config

    try:
        cfg = build_config(TINY_CONFIG, overrides)
    except ConfigError:
        return  # the training run names a bad override in its own words
    batch = cfg.train.micro_batch_size
    need = batch * ranks
    # A user's data.num_samples is the epoch the run reads instead of the shards' count.
    option, epoch = ("--num-samples ", num_samples)
    if cfg.data.num_samples:
        option, epoch = ("data.num_samples=", cfg.data.num_samples)
    if epoch >= need:
        return
    raise DemoError(
        f"{option}{epoch} is smaller than one global batch (train.micro_batch_size {batch} x {ranks} "
        f"rank(s)): pass {option}{need} or more, or a smaller train.micro_batch_size or fewer --ranks"
    )


def check_shard_count(num_samples: int, shard_size: int, ranks: int, overrides: list[str]) -> None:
    """DemoError unless the shards the demo writes are enough for its ranks' loader workers.

    The training stream needs a shard per loader worker of every rank (unless data.resampled):
    `--num-samples 512` (one shard of 512) on 2 CPU ranks failed only after the data was written
    and the ranks had started, with advice about dataset_tools instead of --shard-size.
    """
    from vutrain.config import ConfigError, build_config

    try:
        data = build_config(TINY_CONFIG, overrides).data
    except ConfigError:
        return  # the training run names a bad override in its own words
    workers = max(1, data.num_workers)  # -1 (auto) picks at least one worker per rank
    shards = math.ceil(num_samples / shard_size)
    if data.resampled or shards >= ranks * workers:
        return
    largest = num_samples // (ranks * workers)
    fix = (
        f"pass --shard-size {largest} or less" if largest else f"pass --num-samples {ranks * workers} or more"
    )
    raise DemoError(
        f"--num-samples {num_samples} in shards of --shard-size {shard_size} makes {shards} training "
        f"shard(s), fewer than the {ranks} rank(s) x {workers} loader worker(s) (data.num_workers) "
        f"that each need one: {fix}"
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative(text: str) -> int:
    """An argparse type for --seed: the synthetic writer needs a seed >= 0, and a negative one was a
    ValueError traceback after the demo had claimed --out and deleted its previous data."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; pass a seed >= 0")
    return value


def _fraction(text: str) -> float:
    """An argparse type for --min-top1: a top-1 accuracy threshold in [0, 1]. ``nan`` passed every
    run (no accuracy is below nan) and a threshold above 1 failed every run."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a number") from None
    if not 0.0 <= value <= 1.0:  # also false for nan
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1]")
    return value


def classify_one(model_dir: str, val_shards: str) -> tuple[str, str, float]:
    """(true class, predicted class, score) of the first held-out image through the HF pipeline."""
    import webdataset as wds
    from PIL import Image
    from transformers import pipeline

    from vutrain.data.shards import expand_shards
    from vutrain.data.val import collect_label_values

    classes = collect_label_values(val_shards)
    sample = next(iter(wds.WebDataset(expand_shards(val_shards)[0], shardshuffle=False)))
    image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
    truth = json.loads(sample["json"])["category_name"]
    classifier = pipeline("zero-shot-image-classification", model=model_dir)
    best = classifier(image, candidate_labels=classes, hypothesis_template="a thumbnail of {}.")[0]
    return truth, best["label"], best["score"]


def plot_note(run_dir: str) -> str:
    """Where the run's curves.png is, for the demo's last line, or that it was not written and why.

    The training run draws it as a convenience and only warns when that fails (matplotlib missing
    or broken, a full disk), so the demo printed "plot: .../curves.png" for a file that did not
    exist. A missing plot is drawn again here, from metrics.jsonl, which also gives the reason when
    it fails again; the demo still succeeds (the plot is no part of its result)."""
    path = os.path.join(run_dir, "curves.png")
    if os.path.isfile(path):  # the run directory was emptied before training: it is this run's
        return f"plot: {path}"
    from vutrain.startup_errors import one_line

    try:
        from vutrain.plots import plot_run

        written = plot_run(run_dir)
    except Exception as exc:  # ImportError (no matplotlib) included
        return f"plot not written ({one_line(exc)}); metrics.jsonl holds the curves"
    if written is None:
        return f"plot not written ({run_dir}/metrics.jsonl has no rows)"
    return f"plot: {written}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``make demo``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m vutrain.demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default="demo_out", help="output directory, relative to the current one (default demo_out)"
    )
    parser.add_argument("--num-samples", type=_positive, default=8192)
    parser.add_argument("--val-samples", type=_positive, default=480)
    parser.add_argument("--shard-size", type=_positive, default=512)
    parser.add_argument(
        "--steps", type=_positive, default=None, help=f"default 300 on CPU, {GPU_STEPS} on a GPU"
    )
    parser.add_argument("--ranks", type=_positive, default=None, help="default 2 CPU ranks, or 1 GPU")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: one GPU in bf16 (fp32 before Ampere; GPU recipe) when present, else 2 CPU ranks",
    )
    parser.add_argument(
        "--min-top1", type=_fraction, default=0.6, help="exit non-zero below this zero-shot top-1 (0-1)"
    )
    parser.add_argument("--seed", type=_non_negative, default=0, help="data seed (>= 0)")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value for the training run")
    args = parser.parse_args(argv)
    # Absolute, because the training ranks run in the package's directory: a relative --out named
    # shards there that were written here. Not under the package either: an installed package's
    # directory is site-packages.
    args.out = os.path.abspath(args.out)
    try:
        return run_demo(args)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside training (no child to stop): one line, not a traceback
        print(f"error: {DemoStopped(signal.SIGINT, 'outside training')}", file=sys.stderr)
        return 128 + signal.SIGINT


def run_demo(args: argparse.Namespace) -> int:
    """The five steps of the demo for parsed arguments; returns the exit code."""
    gpu = use_gpu(args.device)
    steps = args.steps or (GPU_STEPS if gpu else 300)
    ranks = args.ranks or (1 if gpu else 2)
    # The recipe first, so the user's own overrides win.
    recipe = gpu_recipe() if gpu else []
    overrides = recipe + list(args.overrides)
    refuse_demo_owned_overrides(overrides)
    check_one_global_batch(args.num_samples, ranks, overrides)
    check_shard_count(args.num_samples, args.shard_size, ranks, overrides)
    start = time.time()
    claim_output(args.out)
    say_an_earlier_run_is_replaced(args.out)
    print(f"[1/5] writing synthetic shards to {args.out}/data", flush=True)
    train_shards, val_shards = write_data(
        args.out, args.num_samples, args.val_samples, args.shard_size, args.seed
    )
    run_dir = os.path.join(args.out, "run")
    model_dir = os.path.join(args.out, "hf_model")
    run_overrides = train_overrides(run_dir, train_shards, val_shards, steps, overrides)
    plan = training_line(run_overrides, steps, ranks, gpu)
    # The previous run's model goes with its data and run: kept, a run that failed later left it
    # beside data it was not trained on, and an export adds its files to whatever is there.
    for previous in (run_dir, model_dir):
        shutil.rmtree(previous, ignore_errors=True)
    print(f"[2/5] {plan}", flush=True)
    train(run_dir, train_shards, val_shards, ranks, steps, overrides, gpu)
    print("[3/5] evaluation (held-out split)", flush=True)
    evals = [r for r in read_metrics(run_dir) if "eval/zeroshot_top1" in r]
    if not evals:
        raise DemoError(
            f"{run_dir}/metrics.jsonl has no zero-shot evaluation: the demo evaluates on its "
            "held-out split; leave data.val_shards and eval.* out of the overrides"
        )
    for row in evals:
        print(
            f"  step {row['step']:>5}: zero-shot top-1 {row['eval/zeroshot_top1']:.3f} "
            f"(chance {row['eval/zeroshot_chance']:.3f}), i2t R@1 {row['eval/i2t_r1']:.3f}, "
            f"t2i R@1 {row['eval/t2i_r1']:.3f}, i2t R@5 {row['eval/i2t_r5']:.3f}"
        )
    final = evals[-1]
    print(f"[4/5] exporting to {model_dir}", flush=True)
    from vutrain.export import export

    export(run_dir, model_dir)
    print("[5/5] classifying a held-out thumbnail with transformers.pipeline", flush=True)
    truth, label, score = classify_one(model_dir, val_shards)
    print(f"  true class: {truth!r}  predicted: {label!r} (score {score:.2f})")
    top1, chance = final["eval/zeroshot_top1"], final["eval/zeroshot_chance"]
    print(
        f"\nzero-shot top-1 on the held-out set: {top1:.3f} (chance {chance:.3f}, "
        f"{int(final['eval/zeroshot_classes'])} classes); {plot_note(run_dir)}; "
        f"{time.time() - start:.0f} s"
    )
    if top1 < args.min_top1:
        print(f"FAIL: zero-shot top-1 {top1:.3f} is below {args.min_top1}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
