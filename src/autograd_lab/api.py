"""The Python API for notebooks: one run, one sweep, their frames and figures; no Hydra plumbing.

    import autograd_lab as al

    r = al.run(["data=synthetic", "trainer.max_epochs=1"])       # runs/data=synthetic,.../
    r.record["final"]["train_loss"], r.run_dir                   # run.json, and where it is
    r.curves()                                                   # metrics.parquet as a frame
    r.loss()                                                     # train/loss by optimizer step

    s = al.multirun("zero_grad_study", ["data=synthetic", "size=quick", "seed=0,1"])
    s.sweep_dir, s.runs, s.curves()                              # multirun/zero_grad_study/...
    for fig in s.figures(): al.show(fig)                         # the summary's figures

`run` composes the config exactly as `autograd-lab train` does (`config.compose.compose`) and
trains in this process (`train.run`): extra Lightning callbacks can watch it. `multirun` runs the
CLI itself (`autograd-lab train -m ...`) in a child process, so its jobs are named, skipped and
summarised exactly as on the command line, and Hydra's logging set-up stays out of the
notebook's process. (It is not called `sweep`: `autograd_lab.sweep` is the module of the sweep
glue, and a function of that name would be replaced by the module when it is imported.)
Both are quiet: what Lightning and the profiler's C++ side print goes nowhere (`quiet`); our own
one-line results and every real error still show.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from autograd_lab.cli.landscape import compute as landscape_compute
from autograd_lab.config.compose import compose
from autograd_lab.config.preflight import check_overrides
from autograd_lab.config.schema import validate
from autograd_lab.config.stacking import stack_overrides
from autograd_lab.errors import UserError
from autograd_lab.job.messages import skipped_line
from autograd_lab.job.rundir import finished_record, read_run_json
from autograd_lab.sweep.runs import load_curves, load_runs
from autograd_lab.sweep.summary import plot_study
from autograd_lab.text import console_script
from autograd_lab.train import run as train_run

# what torch's profiler (kineto) prints from C++ at start and stop, straight to file descriptor 2
_NATIVE_NOISE = re.compile(r"^(USDT|STAGE|INFO|WARNING|ERROR):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
                           r"\d+:\d+ \w+\.cpp:\d+\]")


@contextlib.contextmanager
def quiet():
    """Keep library noise out of notebook outputs: lines that C++ code writes straight to the
    process's stderr (torch's profiler says `profiler_start`, `profiler_stop` and, without a GPU,
    `gpuGetDeviceCount failed`) are dropped; anything else written there is passed on when the
    block ends, so a real error still shows. Lightning's info lines are silenced by `train.run`.

        with al.quiet():
            prof = profile_op("conv1d")
    """
    sys.stderr.flush()
    try:
        fd = sys.__stderr__.fileno() if sys.__stderr__ is not None else 2
    except (AttributeError, OSError, ValueError):
        fd = 2
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            _flush_c_stdio()
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            kept = [line for line in text.splitlines() if not _NATIVE_NOISE.match(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


def _flush_c_stdio() -> None:
    """Flush C's stdio buffers, so what C code wrote inside `quiet` lands in its sink."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no libc to ask (not Linux/macOS): nothing buffered
        pass


# ------------------------------------------------------------------------------------ one run
@dataclass
class Run:
    """One training run: its record (run.json) and where its files are."""

    run_dir: Path
    record: dict
    skipped: bool = False  # it had completed with this config already: nothing was trained

    @property
    def status(self) -> str:
        return self.record.get("status", "unknown")

    def curves(self, name: str | None = None):
        """metrics.parquet as a frame (run, step, epoch, name, value); `name` picks one
        series, e.g. "train/loss" or "probes/grad_norm/all"."""

        frame = _plain(load_curves(self.run_dir))
        return frame if name is None else frame[frame.name == name].reset_index(drop=True)

    def loss(self):
        """train/loss by optimizer step (a Series indexed by step): the seed's loss_history."""
        frame = self.curves("train/loss")
        return frame.set_index("step")["value"].rename("train/loss")

    def figures(self, by: list[str] | None = None) -> list:
        """The summary's figures for this run (sweep.summary.plot_study)."""

        return plot_study(self.run_dir, by=by)

    def landscape(self, **options):
        """A loss-landscape slice of this run, written to run_dir/landscape/ and its
        TensorBoard: `landscape(self.run_dir, **options)` (see `landscape`)."""
        return landscape(self.run_dir, **options)

    def __repr__(self) -> str:
        final = self.record.get("final") or {}
        loss = final.get("train_loss")
        shown = f", train_loss={loss:.4g}" if isinstance(loss, (int, float)) else ""
        return f"Run({self.run_dir}, status={self.status}{shown}{', skipped' * self.skipped})"


def run(overrides=(), run_dir=None, *, callbacks=(), threads: int | None = None,
        progress_bar: bool = False) -> Run:
    """Train one configuration in this process and return its record and paths.

    `overrides` are the command line's (`["model=resnet18", "optim.lr=0.01"]`); `run_dir`
    defaults to the one `autograd-lab train <overrides>` would use (`runs/<overrides>`, relative
    to the current folder). As on the command line, a run that already completed with the same
    config is not trained again (its record is returned, `skipped=True`; `resume=false` trains
    it again) and an interrupted one continues from its checkpoint. `callbacks` are extra
    Lightning callbacks. A bad override raises UserError with the CLI's one-line message.
    """
    from omegaconf import OmegaConf


    overrides = [str(o) for o in overrides]
    check_overrides(overrides, multirun=False)
    if run_dir is None:
        run_dir = compose(overrides, return_hydra_config=True).hydra.run.dir
    cfg = compose(overrides)
    validate(cfg)
    run_dir = Path(run_dir)
    if cfg.resume:
        done = finished_record(run_dir, OmegaConf.to_container(cfg, resolve=True))
        if done is not None:

            print(skipped_line(run_dir))  # the CLI's words
            return Run(run_dir, done, skipped=True)

    # a progress bar is wanted live: in a terminal it shares the stderr `quiet` holds back
    with quiet() if not progress_bar else contextlib.nullcontext():
        record = train_run(cfg, run_dir, progress_bar=progress_bar, callbacks=callbacks,
                           threads=threads)
    written, _ = read_run_json(run_dir)  # the file is the record (JSON types, no private keys)
    if written is None:
        written = {k: v for k, v in record.items() if not k.startswith("_")}
    return Run(run_dir, written)


def landscape(path, **options):
    """`autograd-lab landscape` from Python: a line from a run's initial to its final weights
    (or `to` another run's final weights), a plane through its final weights (`plane=True`;
    `directions="hessian"`: the top-2 Hessian eigenvectors), or with `pairs=KEY` on a sweep
    folder the line between each seed's runs that differ in KEY. The options are the command's
    flags, named and defaulted as in `autograd_lab.cli.landscape.DEFAULTS` (to, plane,
    directions, alphas, points, grid, span, examples, batch_size, seed, include_bias,
    include_bn, hessian_iters, pairs, name, progress, device, data_root, threads). Returns the
    slice (`.frame`: its points, `.trajectory`, `.files`) or, for `pairs`, the pairs table. A
    bad option raises UserError with the CLI's one-line message."""
    return landscape_compute(path, **options)


# ----------------------------------------------------------------------------------- a sweep
@dataclass
class Sweep:
    """A multirun's folder and what the CLI said while running it."""

    sweep_dir: Path
    returncode: int
    output: str = field(repr=False, default="")  # the CLI's stdout and stderr, in order
    launched: int = 0  # jobs Hydra launched (skipped ones included)
    skipped: int = 0  # jobs that had completed with the same config already

    @property
    def runs(self):
        """One row per job (sweep.runs.load_runs): swept keys, status, metrics, time, memory."""

        return load_runs(self.sweep_dir)

    def curves(self, name: str | None = None):
        """Every job's metrics.parquet, long format, with a `run` column (load_curves)."""

        frame = _plain(load_curves(self.sweep_dir))
        return frame if name is None else frame[frame.name == name].reset_index(drop=True)

    def figures(self, by: list[str] | None = None) -> list:
        """The same figures as the sweep's summary PNGs (sweep.summary.plot_study)."""

        return plot_study(self.sweep_dir, by=by)

    @property
    def failed(self) -> list[str]:
        """The CLI's lines about jobs that failed, were killed or whose files do not parse."""
        return [line for line in self.output.splitlines()
                if line.startswith(("failed:", "interrupted:", "broken:"))]


def cli_command() -> list[str]:
    """This environment's `autograd-lab` (the console script beside this Python)."""

    if (script := console_script()) is not None:
        return [str(script)]
    return [sys.executable, "-c", "import sys; from autograd_lab.cli import main; "
            "sys.exit(main())"]


def multirun(study: str | None = None, overrides=(), *, root="multirun",
             verbose: bool = False) -> Sweep:
    """Run `autograd-lab train -m [experiment=<study>] <overrides>` and return its sweep.

    The sweep folder is `<root>/<study>/<constant overrides>/` and each job's folder is named by
    the swept keys, as on the command line (root `multirun`, relative to the current folder);
    running the same sweep again skips its completed jobs and continues an interrupted one.
    Prints one line (jobs run, skipped, failed); `verbose=True` shows the CLI's output as it
    comes. A bad override raises UserError with the CLI's one-line message; a sweep in which
    some job failed returns normally (see `.failed` and each run's status).
    """

    args = stack_overrides(([f"experiment={study}"] if study else [])
                           + [str(o) for o in overrides], multirun=True)
    plan = check_overrides(args, multirun=True)  # one line for a bad override, before any job
    given = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.sweep.dir=")), None)
    if given is not None:
        sweep_dir = Path(given.strip("'\""))
    else:
        root = Path(root)
        if any(c in str(root) for c in "'\\$"):
            raise UserError(f"root={root}: a folder name with quotes, backslashes or $ cannot "
                            f"be passed to Hydra; choose another folder")
        sweep_dir = Path(plan.sweep_dir(str(root)))
        args.append(f"hydra.sweep.dir='{sweep_dir}'")
    started = time.time()  # the child takes seconds to start: no run.json of this call is older
    proc = subprocess.Popen([*cli_command(), "train", "-m", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if verbose:
            print(line, end="")
    returncode = proc.wait()
    output = "".join(lines)
    if returncode == 2:  # the CLI's error lines for bad input (one per mistake)
        said = [ln.removeprefix("autograd-lab: error:").strip() for ln in lines
                if ln.startswith("autograd-lab: error:")]
        raise UserError("\n".join(said) or (lines[-1].strip() if lines else "exit code 2"))
    if returncode not in (0, 1):  # 1: some job failed (listed); anything else: it broke
        tail = "".join(lines[-20:])
        raise RuntimeError(f"autograd-lab train -m exited {returncode}:\n{tail}")
    # Hydra logs one "#<n> : <overrides>" line per job it launches; a job that ran wrote its
    # run.json during this call, a skipped one did not
    launched = sum(1 for ln in lines if re.search(r"\[HYDRA\]\s+#\d+ :", ln))
    ran = sum(1 for p in sweep_dir.rglob("run.json") if p.stat().st_mtime >= started)
    result = Sweep(sweep_dir, returncode, output, launched=launched,
                   skipped=max(launched - ran, 0))
    failed = f", {len(result.failed)} failed" if result.failed else ""
    print(f"sweep {sweep_dir}: {result.launched - result.skipped} jobs run, "
          f"{result.skipped} skipped{failed}")
    return result


# ---------------------------------------------------------------------------------- figures
def title_of(fig) -> str:
    """A figure's title: its suptitle, else its axes' titles joined ('' when it has none)."""
    sup = getattr(fig, "_suptitle", None)
    if sup is not None and sup.get_text().strip():
        return sup.get_text().strip()
    return " | ".join(t for t in (ax.get_title().strip() for ax in fig.axes) if t)


def show(fig) -> str:
    """Display a figure in a notebook with its title in the output's metadata
    (`metadata[mime]["title"]`, which tests and tools can read), and close it. A matplotlib
    figure, or a graphviz graph (its `label` is its title; without graphviz's `dot` binary its
    DOT source is printed). A figure without a title is refused: a reader must know what it
    shows. Returns the title."""
    import io
    import shutil

    is_graph = hasattr(fig, "pipe") and hasattr(fig, "graph_attr")
    title = (fig.graph_attr.get("label") or "").strip() if is_graph else title_of(fig)
    if not title:
        raise ValueError("this figure has no title: set one (ax.set_title, fig.suptitle, or a "
                         "graph's label) so a reader knows what it shows")
    if is_graph:
        if shutil.which("dot") is None:
            print(f"{title}: graphviz's dot binary is not installed; the DOT source:\n"
                  f"{fig.source}")
            return title
        mime, data = "image/svg+xml", fig.pipe(format="svg").decode()
    else:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        mime, data = "image/png", buf.getvalue()
    try:
        from IPython import get_ipython
        from IPython.display import SVG, Image, display
    except ImportError:  # plain Python: nothing to display on
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        print(f"figure: {title}")
        return title
    shown = SVG(data=data) if mime == "image/svg+xml" else Image(data=data, format="png")
    display(shown, metadata={mime: {"title": title}})
    return title


def _plain(frame):
    """load_curves keeps `run` and `name` categorical (thousands of runs fit in memory); a
    notebook gets them as strings, as metrics.parquet holds them (no unobserved categories in
    a groupby, comparisons as with any column of text)."""
    return frame.astype({c: "string" for c in ("run", "name") if c in frame.columns})
