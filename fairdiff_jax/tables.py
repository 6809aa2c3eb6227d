"""Markdown tables in the layout of the paper's Table 1."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fairdiff_jax.semantic_metrics import SEMANTIC_COLUMNS


def format_table(rows: Mapping[str, Mapping], columns: Sequence[str]) -> str:
    """A markdown table in the layout of the paper's Table 1: one row per model, ``mean±std`` bias cells.

    ``CLIP-T`` / ``CLIP-I`` / ``DINO`` columns read ``metrics["clip_t"|"clip_i"|"dino"]``; "—" where not computed.
    Their ± is the std over all images (the paper's spread is too large to be one over per-prompt means); the
    bias ± is the std over prompts.
    """
    header = "| model | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    lines = []
    for model, metrics in rows.items():
        cells = []
        for column in columns:
            if column in metrics.get("bias", {}):
                cells.append(f"{metrics['bias'][column]:.2f}±{metrics['bias_std'][column]:.2f}")
            elif column in SEMANTIC_COLUMNS:
                entry = metrics.get(SEMANTIC_COLUMNS[column])
                cells.append("—" if entry is None else f"{entry['mean']:.2f}±{entry['std_images']:.2f}")
            else:
                value = metrics.get(column)
                cells.append("—" if value is None else f"{value:.2f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    floor = next(iter(rows.values())).get("bias_floor", {})
    note = ", ".join(f"{k} {v:.3f}" for k, v in floor.items())
    return (
        header
        + "\n".join(lines)
        + f"\n\nBias ± is the std over prompts; CLIP/DINO ± is the std over images. Bias of a perfectly fair "
        f"generator with these sample sizes: {note}.\n"
    )
