"""The PNG written at the end of a run: training loss and the eval curves."""

from __future__ import annotations

import os

from vutrain.metrics import read_metrics

RETRIEVAL_KEYS = ("eval/zeroshot_top1", "eval/i2t_r1", "eval/t2i_r1", "eval/i2t_r5", "eval/t2i_r5")


def _eval_curve_keys(evals: list[dict]) -> list[str]:
    """The eval keys drawn: zero-shot and retrieval, then the multi-label ones the rows hold
    (eval/tags_map, eval/tags_r{k} by k; eval/tags_vocab is a count, not a score). A run with tags
    in its validation shards logged them, but curves.png left them out."""
    present = {key for row in evals for key in row}
    tag_recalls = sorted(
        (key for key in present if key.startswith("eval/tags_r") and key[len("eval/tags_r") :].isdigit()),
        key=lambda key: int(key[len("eval/tags_r") :]),
    )
    tag_keys = (["eval/tags_map"] if "eval/tags_map" in present else []) + tag_recalls
    return [key for key in RETRIEVAL_KEYS if key in present] + tag_keys


def plot_run(run_dir: str, out_name: str = "curves.png") -> str | None:
    """Plot the loss and eval curves to ``run_dir/out_name``; returns its path (None without metrics)."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    # A Figure of its own, not pyplot's: `matplotlib.use("Agg")` switched the backend of the
    # process, and a notebook or script that trained and then plotted lost its own backend
    # (inline plots stopped showing). A bare Figure draws with Agg and touches no global state.
    from matplotlib.figure import Figure

    train = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    axes[0].plot([r["step"] for r in train], [r["train/loss"] for r in train], lw=1)
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    for key in _eval_curve_keys(evals):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=key.split("/", 1)[1])
    if evals and "eval/zeroshot_chance" in evals[-1]:
        axes[1].axhline(evals[-1]["eval/zeroshot_chance"], ls="--", c="grey", label="zero-shot chance")
    axes[1].set(title="evaluation", xlabel="step", ylim=(0, 1))
    if evals:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(run_dir, out_name)
    fig.savefig(path, dpi=100)
    return path
