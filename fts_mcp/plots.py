"""Loss curve PNG from logged progress points (matplotlib, no torch)."""

from __future__ import annotations

import io
from typing import Any


def loss_curve_png(points: list[dict[str, Any]], title: str = "") -> bytes:
    """Plot training (and eval) loss by step. Later points for a step win, so a resumed run draws once."""
    import matplotlib  # lazy: only the loss.png resource and the worker draw

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for p in points:
        if p.get("loss") is not None and p.get("step") is not None and p.get("logged"):
            train[int(p["step"])] = float(p["loss"])
        if p.get("eval_loss") is not None and p.get("step") is not None:
            evals[int(p["step"])] = float(p["eval_loss"])
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    if train:
        steps = sorted(train)
        ax.plot(steps, [train[s] for s in steps], label="train loss", color="#1f77b4")
    if evals:
        steps = sorted(evals)
        ax.plot(steps, [evals[s] for s in steps], "o-", label="eval loss", color="#d62728")
    if not train and not evals:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
