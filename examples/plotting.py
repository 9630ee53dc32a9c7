"""Loss-curve plot shared by the examples."""

from __future__ import annotations

from pathlib import Path


def loss_history(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, training loss) pairs from a Trainer's `state.log_history`."""
    return [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]


def plot_loss(losses: list[tuple[int, float]], path: Path, title: str = "ReFT training loss") -> Path | None:
    """Write the loss curve as a PNG; returns the path, or None if matplotlib is missing or there is nothing to plot."""
    if not losses:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss plot (pip install matplotlib)")
        return None
    steps, values = zip(*losses)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, marker="o", markersize=3)
    # a log scale shows a falling loss best; DPO/GRPO losses can be zero or negative
    ax.set(xlabel="step", ylabel="training loss", title=title, yscale="log" if min(values) > 0 else "linear")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
