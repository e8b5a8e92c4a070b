"""Loss curves as PNG (matplotlib, headless)."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def plot_metrics(runs: dict[str, Path], out: Path, title: str = "loss per target token") -> None:
    """One curve per run for train loss (thin) and validation loss (markers), written atomically to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, path) in enumerate(runs.items()):
        rows = read_metrics(path)
        color = f"C{i}"
        train = [r for r in rows if r.get("train_loss") is not None]
        ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], color=color, alpha=0.4, lw=1,
                label=f"{name} train")
        val = [r for r in rows if r.get("val_loss") is not None]
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color=color, label=f"{name} val")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    atomic_write(Path(out), lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
