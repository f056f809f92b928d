"""PNG of a diarization result: per speaker slot, the activity probability over time and its segments."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from clients.sortformer_client.results import Result
from sortformer_triton.presets import N_SPEAKERS

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def plot_result(result: Result, path: os.PathLike | str, title: Optional[str] = None,
                threshold: float = 0.5) -> None:
    """Write a PNG with one row per speaker slot: probability curve, onset threshold, segment bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = np.asarray(result.probs, np.float32).reshape(-1, N_SPEAKERS)
    frames = probs.shape[0]
    t = np.arange(frames) * result.frame_seconds
    duration = max(result.duration_s, frames * result.frame_seconds, 1e-3)
    width = float(np.clip(duration / 6.0, 8.0, 40.0))
    fig, axes = plt.subplots(N_SPEAKERS, 1, figsize=(width, 1.1 * N_SPEAKERS + 1.0), sharex=True,
                             squeeze=False)
    for k in range(N_SPEAKERS):
        ax = axes[k, 0]
        color = COLORS[k % len(COLORS)]
        for seg in result.segments_of(k):
            ax.axvspan(seg.start, seg.end, ymin=0.0, ymax=1.0, color=color, alpha=0.18, linewidth=0)
            ax.hlines(1.04, seg.start, seg.end, colors=color, linewidth=4)
        if frames:
            ax.step(t, probs[:, k], where="post", color=color, linewidth=0.9)
        ax.axhline(threshold, color="0.5", linewidth=0.6, linestyle="--")
        ax.set_ylim(-0.02, 1.1)
        ax.set_xlim(0.0, duration)
        ax.set_yticks([0.0, 0.5, 1.0])
        ax.set_ylabel(result.label(k), rotation=0, ha="right", va="center", fontsize=9)
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel("time (s)")
    n_seg = len(result.segments)
    head = title or "diarization"
    fig.suptitle(f"{head} - preset {result.preset}, {duration:.1f} s, {n_seg} segments", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
