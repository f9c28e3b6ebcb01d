"""summary/ of a sweep or any folder of runs, written whole: runs.parquet, runs.csv,
curves.parquet, summary.md, the PNG figures and the TensorBoard summary run. SummaryCallback
writes it when a multirun ends."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback

from autograd_lab.config.keys import path_safe
from autograd_lab.disk.files import atomic_write_bytes, write_csv, write_parquet
from autograd_lab.disk.lock import RunLock
from autograd_lab.errors import UserError, clip, error_text
from autograd_lab.job.messages import sweep_table, tensorboard_hint
from autograd_lab.sweep.board import write_summary_run
from autograd_lab.sweep.diff import (
    READING,
    diff_bands,
    diff_table,
    figure_diff,
    first_differences,
    step_differences,
    tensorboard_diffs,
)
from autograd_lab.sweep.figures import figure_cost, figure_curves, figure_stability
from autograd_lab.sweep.runs import load_curves, load_runs
from autograd_lab.sweep.spectrum import figure_spectrum
from autograd_lab.sweep.tables import (
    COST,
    RESULTS,
    group_table,
    study_of,
)
from autograd_lab.text import fmt_number


def summarize(path, by: list[str] | None = None) -> Path:
    """Write path/summary/ and return it."""
    return summarize_runs(path, by)[0]


def _summary_lock(path: Path):
    """One writer for a summary folder too (two `summarize` calls, or one beside a sweep's end):
    a second gets the lock's one-line error. A folder that cannot be made is left to the
    writes below, which report it."""
    import contextlib


    try:
        (path / "summary").mkdir(parents=True, exist_ok=True)
    except OSError:
        return contextlib.nullcontext()
    return RunLock(path / "summary")


def summarize_runs(path, by: list[str] | None = None) -> tuple[Path, pd.DataFrame]:
    """Write path/summary/; return it and the runs table written there. Runs whose files do
    not parse are listed as broken (status `broken`, what is wrong as the error) and left out of
    the grouped table and the plots; the others are summarised as usual. A summary that cannot
    be written is a UserError."""

    path = Path(path)
    runs = load_runs(path)
    with _summary_lock(path):
        return _write_summary(path, runs, by)


def _remove_leftovers(out: Path) -> None:
    """The temporary files and folders (`.NAME.tmp`) a killed summary left in `out`: never
    read, removed before this summary writes its own."""
    import shutil

    for entry in out.glob(".*.tmp"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, disable_numparse=True)  # our numbers, as formatted


def _write_summary(path: Path, runs, by) -> tuple[Path, pd.DataFrame]:

    curves = load_curves(path)
    for name, problem in curves.attrs.get("broken", {}).items():  # a footer that parsed, data
        at = runs.index[(runs.run == name) & (runs.status != "broken")]  # that did not
        runs.loc[at, "error"] = [f"{problem} (run.json says {s})" for s in runs.status[at]]
        runs.loc[at, "status"] = "broken"
    by = list(by) if by else runs.attrs["swept"]
    unknown = [k for k in by if k not in runs]
    if unknown:
        raise UserError(f"--by {unknown[0]}: no such key in these runs; swept keys are: "
                        f"{', '.join(runs.attrs['swept']) or '(none)'}")
    running = runs[runs.status == "running"]  # SLURM still has them: no result yet
    intact = runs[~runs.status.isin(["broken", "running", "duplicate"])]
    broken = runs[runs.status == "broken"]
    duplicate = runs[runs.status == "duplicate"]
    failed = intact[intact.status != "completed"]
    studies = ', '.join(sorted(study_of(runs).unique()))
    text = [f"# Summary: {studies}" if studies else "# Summary", "", f"`{path}`", ""]
    counts = runs.status.value_counts()
    if runs.empty:
        text += ["No runs yet: the sweep has not started a job. Summarize again (or let the "
                 "sweep end) when its jobs have run.", ""]
    text += [] if runs.empty else [f"{len(runs)} runs: " + ", ".join(
        f"{counts[s]} {s}" for s in ("completed", "running", "diverged", "failed",
                                      "interrupted", "broken", "duplicate") if s in counts)
        + ". "
        f"Grouped by {', '.join(k for k in by if k != 'seed') or 'nothing (one group)'}"
        f"{'; seeds pooled (n runs a group)' if 'seed' in by else ''}. Every run's every "
        f"column: runs.csv; curves: curves.parquet.", ""]
    results, cost = group_table(intact, by, RESULTS), group_table(intact, by, COST)
    if len(results) and any(h in results for _, h, _ in RESULTS):
        text += ["## Results (completed runs)", "", _markdown(results), ""]
    elif not runs.empty:
        text += ["No run completed: nothing to average.", ""]
    if len(cost) and any(h in cost for _, h, _ in COST):
        text += ["## Time and memory per job", "",
                 "Figures that belong to each job, whatever ran before it in the process "
                 "(exact bytes, in MiB; seconds per step is the median after a warm-up).", "",
                 _markdown(cost), ""]
    diffs = step_differences(intact, curves, by)
    if len(diffs):
        text += ["## Step-by-step differences", "", READING, "",
                 _markdown(diff_table(first_differences(diffs))), ""]
    text += _landscape_section(path)
    if len(failed):
        shown = failed.assign(error=failed.error.fillna("").astype(str).map(
            lambda e: clip(e, 110)))
        text += ["## Runs that did not complete", "",
                 "Not in the tables above. Re-running the same command continues an interrupted "
                 "run from its checkpoint.", "",
                 _markdown(shown[["run", "status", "error"]]), ""]
    if len(running):
        text += ["## Runs still with SLURM", "",
                 "Not in the tables above yet: summarize again when they end.", "",
                 _markdown(running[["run", "error"]].rename(columns={"error": "state"})), ""]
    if len(duplicate):
        text += ["## Runs of a configuration already counted", "",
                 "Each has the same result-relevant configuration as a run above (its folder "
                 "was named by another spelling of the overrides): counted once, as that run.",
                 "", _markdown(duplicate[["run", "error"]].rename(columns={"error": "same as"})),
                 ""]
    if len(broken):
        text += ["## Broken runs", "",
                 "Their files do not parse, so they are not in the tables above. Re-running the "
                 "command that made one runs it again (or continues it from its checkpoint).", "",
                 broken.rename(columns={"error": "problem"})[["run", "problem"]]
                 .to_markdown(index=False), ""]
    out = path / "summary"
    try:
        out.mkdir(exist_ok=True)
        _remove_leftovers(out)
        write_parquet(out / "runs.parquet", runs.astype({c: str for c in runs.columns
                                                         if runs[c].dtype == object}))
        write_csv(out / "runs.csv", runs)
        write_parquet(out / "curves.parquet", curves)
        atomic_write_bytes(out / "summary.md", "\n".join(text).encode())
        if len(diffs):
            write_parquet(out / "diff.parquet", diffs)
        elif (out / "diff.parquet").is_file():  # an earlier summary's, of other runs
            (out / "diff.parquet").unlink()
        pngs = plot_curves(intact, curves[curves.run.isin(intact.run)], by, out)
        for old in out.glob("*.png"):  # an earlier summary's figure this one does not draw
            if old not in pngs and old.is_file() and not old.is_symlink():
                old.unlink()

        # the TensorBoard run `summary`: seed bands and these PNGs
        write_summary_run(out, intact, curves, by, pngs,
                          diffs=tensorboard_diffs(diff_bands(diffs)))
    except OSError as e:
        where = e.filename or out
        raise UserError(f"cannot write the summary: {where}: "
                        f"{e.strerror or type(e).__name__}") from None
    return out, runs


def _landscape_section(path: Path) -> list[str]:
    """summary.md's lines for path/landscape/pairs.parquet (`autograd-lab landscape SWEEP
    --pairs KEY`): a row per pair, the train loss at both ends and the midpoint, and the
    barriers; [] without the file, one line when it does not parse."""
    file = path / "landscape" / "pairs.parquet"
    if not file.is_file():
        return []
    head = ["## Loss landscape", "", "The straight line between the final weights of each pair "
            "of runs (same seed, every other key equal), α = 0 the reference run, 1 the "
            "variant: the train loss at α = 0, ½ and 1, and the **barrier**, the largest rise "
            "of the loss above the straight line between its two ends over α in [0, 1] (0: "
            "nothing between the two solutions is worse than the chord; large: two separate "
            "valleys). Curves and images: `landscape/` (`autograd-lab landscape SWEEP --pairs "
            "KEY`).", ""]
    names = {"key": "key", "from_value": "from", "to_value": "to", "seed": "seed",
             "loss_from": "loss α=0", "loss_mid": "loss α=½", "loss_to": "loss α=1",
             "barrier": "barrier", "val_barrier": "val barrier"}
    try:
        frame = pd.read_parquet(file)
        shown = frame[[c for c in names if c in frame]].rename(columns=names)
        table = shown.astype(object).where(shown.notna(), "").map(
            lambda v: v if isinstance(v, str) else fmt_number(v)
            if isinstance(v, float) else str(v))
    except Exception as e:  # pyarrow's ArrowInvalid, OSError, a column pandas cannot show
        return head + [f"{file.name} does not parse: {clip(error_text(e), 160)}", ""]
    return head + [_markdown(table) if len(table) else "No pairs in it.", ""]


class SummaryCallback(Callback):
    """When a multirun ends: write summary/, say where things are, list runs that failed, were
    killed or whose files do not parse (broken), and exit non-zero if any did (a diverged run is
    a result, not a failure). A summary that cannot be written is an error: one line, exit 1."""

    def on_multirun_end(self, config, **kwargs) -> None:

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            out, runs = summarize_runs(sweep_dir)
        except Exception as e:  # UserError (unwritable, a newer run inside), or a bug
            print(f"autograd-lab: error: no summary written for {sweep_dir}: "
                  f"{clip(error_text(e), 10_000)}",
                  file=sys.stderr)
            sys.exit(1)

        print(f"\n{sweep_table(runs, runs.attrs.get('swept', []))}")
        files = ["runs.csv", "runs.parquet", "curves.parquet",
                 *["diff.parquet"] * (out / "diff.parquet").is_file(),
                 *(p.name for p in sorted(out.glob("*.png")))]
        print(f"\nsummary: {out / 'summary.md'} ({', '.join(files)})")
        print(f"tensorboard: {tensorboard_hint(sweep_dir)}")
        bad = runs[runs.status.isin(["failed", "interrupted", "broken"])]
        for _, row in bad.iterrows():
            print(f"{row.status}: {row.run}: {row.error}", file=sys.stderr)
        if len(bad):
            sys.exit(1)


def plot_study(runs, curves: pd.DataFrame | None = None, by: list[str] | None = None) -> list:
    """The summary's figures, for a notebook: per study, the loss curves (and the per-job cost
    figure where there is one to compare, and sharpness against 2/lr where it was measured).
    `runs`: a sweep or run folder, or load_runs' frame (then pass `curves`). The same figures
    `summarize` writes as PNGs."""
    return [fig for _, fig in _figures(runs, curves, by)]


def _figures(runs, curves=None, by=None) -> list:
    """[(file name, Figure)] for plot_study and the summary."""
    if not isinstance(runs, pd.DataFrame):
        path = runs
        runs, curves = load_runs(path), load_curves(path)
    by = runs.attrs.get("swept", []) if by is None else list(by)
    intact = runs[runs.status.isin(["completed", "diverged", "interrupted"])]
    out = []
    studies = study_of(intact)
    for study in sorted(studies.unique()):
        subset = intact[studies == study]
        mine = curves[curves.run.isin(subset.run)]
        name = path_safe(study, limit=200)  # a file name, whatever the study is called
        out.append((f"{name}_loss.png", figure_curves(subset, mine, by, study)))
        cost = figure_cost(subset, by, study)
        if cost is not None:
            out.append((f"{name}_cost.png", cost))
        diff = figure_diff(subset, mine, by, study)  # variant − reference, same seed
        if diff is not None:
            out.append((f"{name}_diff.png", diff))
        spectrum = figure_spectrum(subset, mine, by)  # the Hessian's density over training
        if spectrum is not None:
            out.append((f"{name}_spectrum.png", spectrum))
        if (mine.name == "probes/sharpness").any():  # sharpness against each run's 2/lr

            out.append((f"{name}_sharpness.png", figure_stability(subset, mine)))
    return out


def plot_curves(runs: pd.DataFrame, curves: pd.DataFrame, by: list[str], out: Path) -> list[Path]:
    """Write the summary's figures (plot_study's) into `out` as PNGs; returns their paths."""
    import io

    import matplotlib.pyplot as plt


    written = []
    for name, fig in _figures(runs, curves, by):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out / name, buf.getvalue())
        written.append(out / name)
    return written
