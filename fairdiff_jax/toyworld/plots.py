"""Figures and the markdown report of ``fairdiff demo``: training curves, class frequencies before/after."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(rows: Sequence[Mapping], attributes: Sequence[str], path: str) -> None:
    """Loss terms and the per-batch bias of each attribute against the training step."""
    plt = _pyplot()
    rows = [r for r in rows if "loss" in r]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key, label in (("loss", "total"), ("loss_align", "L_align"), ("loss_img", "L_img")):
        axes[0].plot(steps, [r.get(key, np.nan) for r in rows], label=label)
    axes[0].set_xlabel("step")
    axes[0].set_title("loss")
    axes[0].legend()
    for name in attributes:
        axes[1].plot(steps, [r.get(f"bias/{name}", np.nan) for r in rows], label=f"{name} bias (training batch)")
    axes[1].set_xlabel("step")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("bias of the training batches")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def frequency_bars(metrics: Mapping, attributes: Sequence[str], path: str) -> None:
    """Per-prompt frequency of class 1 (e.g. male) before and after, debiased and held-out, with the target."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(attributes), 1, figsize=(10, 3.2 * len(attributes)), squeeze=False)
    for row, name in enumerate(attributes):
        ax = axes[row, 0]
        labels, before, after = [], [], []
        for split, tag in (("debiased", ""), ("held_out", " (held out)")):
            for prompt, counts in metrics["before_per_prompt"][split].items():
                b = np.asarray(counts[name], float)
                a = np.asarray(metrics["after_per_prompt"][split][prompt][name], float)
                labels.append(prompt.split("a photo of a ", 1)[-1] + tag)
                before.append(b[-1] / max(b.sum(), 1))
                after.append(a[-1] / max(a.sum(), 1))
        x = np.arange(len(labels))
        ax.bar(x - 0.2, before, 0.4, label="before")
        ax.bar(x + 0.2, after, 0.4, label="after")
        ax.axhline(metrics["targets"][name][-1], color="k", ls="--", lw=1, label="target")
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"freq({name} = last class)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_report(metrics: Mapping, attributes: Sequence[str]) -> str:
    """The demo's report.md: bias before/after beside the finite-sample floor, cue accuracy, timings."""
    before, after = metrics["before"], metrics["after"]
    m = metrics["images_per_prompt"]
    lines = [
        "# fairdiff demo — toy world",
        "",
        f"Adaptor: `{metrics['adaptor']}`, {metrics['train_steps']} training steps; evaluation with {m} images per "
        "prompt from fixed noise (the same noise before and after).",
        "",
        "| attribute | target | split | bias before | bias after | fair floor | freq before | freq after "
        "| distance to target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in before["bias"]:  # the attributes, then their intersections (``gender_x_race``)
        target = "/".join(f"{t:.2f}" for t in metrics["targets"][name]) if name in metrics["targets"] else "—"
        for split, b, a in (("debiased", before, after), ("held out", before["held_out"], after["held_out"])):
            freqs = ["/".join(f"{f:.2f}" for f in section["freq"][name]) for section in (b, a)]
            distance = (
                f"{b['target_distance'][name]:.3f} → {a['target_distance'][name]:.3f}"
                if name in a.get("target_distance", {})
                else "—"
            )
            lines.append(
                f"| {name} | {target} | {split} | {b['bias'][name]:.3f}±{b['bias_std'][name]:.3f} | "
                f"{a['bias'][name]:.3f}±{a['bias_std'][name]:.3f} | {after['bias_floor'][name]:.3f} | "
                f"{freqs[0]} | {freqs[1]} | {distance} |"
            )
    lines += [
        "",
        "The fair floor is the expected bias of a perfectly fair generator with this many images per prompt; "
        "freq is the mean class frequency over the split's prompts; distance to target is the mean over prompts of "
        "½ Σ |freq − target| (0 when every prompt follows the target; for a non-uniform target read it, not the "
        "bias, which is not 0 for a perfect model).",
        "",
        "Face terms: " + metrics.get("face_terms", "off") + " (they act on detected faces of real photographs).",
        "",
        f"Occupation-cue accuracy (semantics preserved): {before['cue_accuracy']:.3f} before, "
        f"{after['cue_accuracy']:.3f} after (held out: {before['held_out']['cue_accuracy']:.3f} → "
        f"{after['held_out']['cue_accuracy']:.3f}).",
        "",
        "Mean class frequencies (debiased prompts): "
        + "; ".join(
            f"{n} {[round(f, 3) for f in before['freq'][n]]} → {[round(f, 3) for f in after['freq'][n]]}"
            for n in attributes
        ),
        "",
        "Timings (s): " + ", ".join(f"{k.replace('_seconds', '')} {v:.0f}" for k, v in metrics["timings"].items()),
        "",
        "![training curves](training_curves.png)",
        "",
        "![frequencies](frequencies.png)",
        "",
        f"Before / after, debiased occupations (one row per occupation, bars = predicted {', '.join(attributes)}):",
        "",
        "![before](grid_debiased_before.png) ![after](grid_debiased_after.png)",
        "",
    ]
    return "\n".join(lines)
