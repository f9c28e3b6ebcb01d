"""What a loss-landscape slice writes: <folder>/landscape/<name>.parquet (its points), .png (a
line plot, or contour plots with the run's trajectory), .json (how it was made), and the same
image and the 1-D curve as a new TensorBoard event file in the run directory (tags under
landscape/<name>/). Every file is written whole (disk.files): the event file is made in a
temporary folder and moved in; no existing file of the run is touched."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.ticker import MaxNLocator

from autograd_lab.disk.files import atomic_write_bytes, write_json, write_parquet
from autograd_lab.errors import UserError
from autograd_lab.sweep.figures import pyplot
from autograd_lab.sweep.landscape_runs import check_targets, slice_files

# TensorBoard's scalar step for a point of a line: 1000 x α (step 0: the start, 1000: the end)
ALPHA_STEP = 1000


def _examples(examples: dict) -> str:
    return ", ".join(f"{n} {k}" for k, n in examples.items())


def line_figure(frame: pd.DataFrame, title: str, labels, examples: dict):
    """Loss (left) and accuracy (right) against α, train solid and val dashed; the two ends
    (α = 0 and 1) marked and named."""
    fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    for split, style in (("train", "-"), ("val", "--")):
        ax_loss.plot(frame.alpha, frame[f"{split}_loss"], style, marker=".", ms=4,
                     label=f"{split} loss")
        ax_acc.plot(frame.alpha, frame[f"{split}_acc"], style, marker=".", ms=4,
                    label=f"{split} accuracy")
    loss = frame[["train_loss", "val_loss"]].to_numpy()
    if np.nanmin(loss) > 0 and np.nanmax(loss) / np.nanmin(loss) > 20:
        ax_loss.set_yscale("log")
    for ax in (ax_loss, ax_acc):
        for alpha, text in ((0.0, "α=0: start"), (1.0, "α=1: end")):
            ax.axvline(alpha, color="0.6", lw=0.8, zorder=0)
            ax.text(alpha, 1.01, text, transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=8, color="0.3")
        ax.set_xlabel("α  (weights = (1-α)·start + α·end)")
        ax.grid(alpha=0.3)
    ax_loss.set_ylabel("mean cross-entropy")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_loss.legend(loc="best", fontsize=8)
    ax_acc.legend(loc="best", fontsize=8)
    fig.suptitle(f"{title}\nstart: {labels[0]}; end: {labels[1]}\n(eval mode; running "
                 f"statistics interpolated with the weights; fixed examples: "
                 f"{_examples(examples)})", fontsize=9)
    fig.tight_layout()
    return fig


def pairs_figure(curves: list[tuple[str, pd.DataFrame]], title: str):
    """Every pair's line in one figure: train loss (left) and val loss (right) against α,
    one colour per pair."""
    fig, panels = pyplot().subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, split in zip(panels, ("train", "val"), strict=True):
        for label, frame in curves:
            ax.plot(frame.alpha, frame[f"{split}_loss"], marker=".", ms=3, label=label)
        for alpha in (0.0, 1.0):
            ax.axvline(alpha, color="0.6", lw=0.8, zorder=0)
        ax.set_xlabel("α  (0: the reference run's final weights, 1: the variant's)")
        ax.set_title(f"{split} loss", fontsize=10)
        ax.grid(alpha=0.3)
    values = np.concatenate([f[["train_loss", "val_loss"]].to_numpy().ravel() for _, f in curves])
    if np.nanmin(values) > 0 and np.nanmax(values) / np.nanmin(values) > 20:
        panels[0].set_yscale("log")
    panels[0].set_ylabel("mean cross-entropy")
    panels[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plane_figure(frame: pd.DataFrame, trajectory: pd.DataFrame, title: str, axes, examples,
                 centre: str | None = None):
    """Filled contours of the train (left) and val (right) loss over the plane (log-spaced
    levels), the final weights at the centre, the run's checkpoints projected onto the plane
    as its trajectory (those beyond the plotted square drawn at its edge, hollow)."""
    xs, ys = np.sort(frame.x.unique()), np.sort(frame.y.unique())
    fig, panels = pyplot().subplots(1, 2, figsize=(12, 5.4))
    lo = max(float(np.nanmin(frame[["train_loss", "val_loss"]].to_numpy())), 1e-8)
    hi = float(np.nanmax(frame[["train_loss", "val_loss"]].to_numpy()))
    levels = np.geomspace(lo, max(hi, lo * 1.01), 25)
    span = float(xs.max())
    for ax, split in zip(panels, ("train", "val"), strict=True):
        z = frame.pivot(index="y", columns="x", values=f"{split}_loss").loc[ys, xs].to_numpy()
        filled = ax.contourf(xs, ys, z, levels=levels, norm=LogNorm(lo, levels[-1]),
                             cmap="viridis", extend="both")
        ax.contour(xs, ys, z, levels=levels[::3], colors="white", linewidths=0.4, alpha=0.6)
        fig.colorbar(filled, ax=ax, label=f"{split} loss (mean cross-entropy)", format="%.3g")
        _trajectory(ax, trajectory, span, centre)
        ax.set_xlabel(axes[0])
        ax.set_ylabel(axes[1])
        ax.set_title(f"{split} loss", fontsize=10)
        ax.set_aspect("equal")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(5))
    panels[0].legend(loc="upper left", fontsize=7, framealpha=0.8)
    far = int(((trajectory.x.abs() > span) | (trajectory.y.abs() > span)).sum())
    note = f"; {far} checkpoint(s) beyond the square, drawn hollow at its edge" if far else ""
    off = float(trajectory.off_plane.iloc[0]) if len(trajectory) else 0.0
    fig.suptitle(f"{title}\nred: the run's checkpoints projected onto the plane (least "
                 f"squares; {off:.2%} of the initial weights' distance from the final ones lies "
                 f"off it){note}; fixed examples: {_examples(examples)}", fontsize=9)
    fig.tight_layout()
    return fig


def _trajectory(ax, trajectory: pd.DataFrame, span: float, centre: str | None) -> None:
    x = trajectory.x.to_numpy()
    y = trajectory.y.to_numpy()
    cx, cy = np.clip(x, -span, span), np.clip(y, -span, span)
    inside = (np.abs(x) <= span) & (np.abs(y) <= span)
    ax.plot(cx, cy, "-", color="red", lw=1.2, alpha=0.9)
    ax.scatter(cx[inside], cy[inside], s=18, color="red", zorder=3,
               label="checkpoints (projected)")
    if (~inside).any():
        ax.scatter(cx[~inside], cy[~inside], s=30, facecolors="none", edgecolors="red",
                   zorder=3, label="beyond the square")
    ax.scatter([cx[0]], [cy[0]], marker="s", s=50, color="orange", zorder=4,
               label="initial weights (step 0)")
    ax.scatter([0], [0], marker="*", s=140, color="white", edgecolors="black", zorder=5,
               label=centre or f"final weights (step {int(trajectory.step.iloc[-1])})")


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    pyplot().close(fig)
    return buf.getvalue()


def write_slice(folder: Path, name: str, frame: pd.DataFrame, fig, meta: dict,
                trajectory: pd.DataFrame | None = None) -> list[Path]:
    """<folder>/<name>.parquet, .png, .json (and <name>_trajectory.parquet); the paths, PNG
    second. Every target is checked before the first is written (landscape_runs.check_targets);
    a write the file system refuses is one line naming the file."""
    files = slice_files(folder, name, trajectory is not None)
    check_targets(files)
    with cannot_write(folder):
        write_parquet(files[0], frame)
        atomic_write_bytes(files[1], png_bytes(fig))
        write_json(files[2], meta)
        if trajectory is not None:
            write_parquet(files[3], trajectory)
    return files


def write_pairs(folder: Path, table: pd.DataFrame, fig) -> None:
    """<folder>/pairs.parquet and pairs.png, both checked first."""
    check_targets([folder / "pairs.parquet", folder / "pairs.png"])
    with cannot_write(folder):
        write_parquet(folder / "pairs.parquet", table)
        atomic_write_bytes(folder / "pairs.png", png_bytes(fig))


@contextlib.contextmanager
def cannot_write(folder: Path):
    """An OSError while writing a slice's outputs: one line naming the file (UserError)."""
    try:
        yield
    except OSError as e:
        raise UserError(f"{e.filename or folder}: cannot write ({e.strerror or e}); the slice "
                        f"was computed but not saved: free the place and run it again") from None


def write_board(run_dir: Path, name: str, png: Path, frame: pd.DataFrame | None,
                step: int | None) -> Path:
    """A new TensorBoard event file in the run directory: the image (Images tab,
    landscape/<name>, at the checkpoint's global step), for a line its curves (Scalars tab,
    landscape/<name>/<split>_loss|acc, at step 1000·α: 0 is the start, 1000 the end) and a
    note saying so (Text tab). Made in a temporary folder, then written whole."""
    from torch.utils.tensorboard import SummaryWriter

    tag = f"landscape/{name}"
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp, filename_suffix=".landscape")
        image = pyplot().imread(io.BytesIO(png.read_bytes()))[..., :3]
        writer.add_image(tag, image, global_step=step or 0, dataformats="HWC")
        about = (f"Loss-landscape slice `{name}`: the image is {png.name} (files in "
                 f"landscape/ beside the run).")
        if frame is not None:
            about += (f" Scalars {tag}/<split>_loss and _acc: the step is {ALPHA_STEP}·α "
                      f"(0 = the start of the line, {ALPHA_STEP} = its end, negative and "
                      f"beyond {ALPHA_STEP}: extrapolated).")
            for row in frame.itertuples(index=False):
                at = int(round(ALPHA_STEP * row.alpha))
                for col in ("train_loss", "val_loss", "train_acc", "val_acc"):
                    writer.add_scalar(f"{tag}/{col}", getattr(row, col), at)
        writer.add_text(f"{tag}/about", about, global_step=step or 0)
        writer.close()
        (made,) = Path(tmp).glob("events.out.tfevents.*")
        target = Path(run_dir) / made.name
        with cannot_write(run_dir):
            atomic_write_bytes(target, made.read_bytes())
    return target
