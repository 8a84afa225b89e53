"""Training curves as a PNG: loss (train and held-out) and the growth of the ART memory."""

from pathlib import Path


def plot_training(history: dict, path: str | Path) -> Path:
    """Two panels sharing the step axis: loss in nats/token, and ART categories. Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    fig, (loss_ax, art_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot(history["step"], history["loss"], label="training loss")
    if history.get("eval_step"):
        loss_ax.plot(history["eval_step"], history["eval_loss"], "o-", label="held-out loss")
    loss_ax.set(xlabel="optimizer step", ylabel="loss (nats / token)", title="Language-modelling loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    art_ax.plot(history["step"], history["art_categories"], color="tab:green")
    art_ax.set(xlabel="optimizer step", ylabel="categories", title="ART memory: committed categories")
    art_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    art_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
