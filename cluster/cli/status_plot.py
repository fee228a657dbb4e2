"""Per-node expert-warmth heat map (``python -m cluster status --plot heat.png``)."""

from __future__ import annotations

from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_heat(heat: Mapping[str, np.ndarray], path: str) -> None:
    """One panel per node: layers (rows) by experts (columns), colour = recency-weighted heat."""
    names = sorted(heat)
    if not names:
        raise ValueError("no node has reported its warmth yet")
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 1.2 + 1.4 * len(names)), squeeze=False)
    vmax = max(float(np.max(heat[n])) for n in names) or 1.0
    for ax, name in zip(axes[:, 0], names):
        im = ax.imshow(heat[name], aspect="auto", cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("layer")
    axes[-1, 0].set_xlabel("expert")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="heat")
    fig.savefig(path, dpi=110)
    plt.close(fig)
