"""The notebooks run top to bottom in a real Jupyter kernel, and the Python API they use.

Each notebook is executed once (module-scoped fixtures) and every assertion about it reads that one
execution: the tour; sweep_analysis without parameters (it runs its own two small sweeps); and
sweep_analysis through papermill's command line with `-p SWEEP_DIR` pointed at a tiny sweep this
module makes with `autograd_lab.multirun`. The oracles are the kernel's own outputs (errors,
stderr, the figures' titles in the display metadata, the tour's printed count of its checks) and
the runs' own files (run.json, metrics.parquet) and the CLI itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from conftest import in_process
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TOUR = REPO / "notebooks" / "autograd_tour.ipynb"
SWEEP = REPO / "notebooks" / "sweep_analysis.ipynb"
BIN = Path(sys.executable).parent
# lines libraries print that must not reach a notebook: torch's profiler from C++, Lightning's info
NOISE = re.compile(r"(USDT|STAGE|ERROR|WARNING):\d{4}-|\.cpp:\d+\]|GPU available|TPU available|"
                   r"LOCAL_RANK|HPU available|Trainer\.fit|\[HYDRA\]|UserWarning|Warning:")
TINY = ["data=synthetic", "data.train_size=256", "data.test_size=128", "data.val_batch_size=128",
        "trainer.max_epochs=1", "probes.every_n_steps=2"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _execute(path: Path, cwd: Path):
    """Run the notebook in a real kernel. The kernel's TMPDIR is `cwd` (pytest's own folder):
    the notebooks put their runs and data in tempfile folders (half a GB for sweep_analysis),
    which pytest then cleans up with its other old folders instead of leaving them in /tmp."""
    nb = nbformat.read(path, as_version=4)
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(cwd)  # the kernel process inherits it when it starts
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(cwd)}}).execute()  # raises on error
    finally:
        if before is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = before
    return nb


def _outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _text(nb, stream: str = "stdout") -> str:
    return "".join(o.get("text", "") for o in _outputs(nb)
                   if o.output_type == "stream" and o.name == stream)


def _images(nb) -> list[tuple[str, str]]:
    """(mime type, title from the display metadata) of every image the notebook shows."""
    found = []
    for o in _outputs(nb):
        for mime in ("image/png", "image/svg+xml"):
            if mime in o.get("data", {}):
                found.append((mime, o.get("metadata", {}).get(mime, {}).get("title", "")))
    return found


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    return _execute(TOUR, tmp_path_factory.mktemp("tour"))


@pytest.fixture(scope="module")
def sweep_default(tmp_path_factory):
    return _execute(SWEEP, tmp_path_factory.mktemp("sweep_default"))


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    import autograd_lab as al

    root = tmp_path_factory.mktemp("tiny")
    return al.multirun(None, [*TINY, f"data.root={root / 'data'}", "train.zero_grad=true,false"],
                       root=root / "multirun")


@pytest.fixture(scope="module")
def sweep_papermill(tiny_sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("papermill") / "out.ipynb"
    proc = subprocess.run([str(BIN / "papermill"), str(SWEEP), str(out), "-p", "SWEEP_DIR",
                           str(tiny_sweep.sweep_dir), "-p", "KEYS", "train.zero_grad",
                           "-k", "python3", "--cwd", str(out.parent), "--no-progress-bar"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return nbformat.read(out, as_version=4)


# ------------------------------------------------------------------------ stored notebooks
def test_the_two_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["autograd_tour.ipynb", "sweep_analysis.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs_or_hydra_plumbing(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, path.name
            assert not re.search(r"hydra|GlobalHydra|initialize_config|compose\(", cell.source), \
                cell.source[:200]
    assert "papermill" not in nb.metadata, "stored with papermill's execution metadata"
    # valid against its own nbformat version's schema, as stored (a cell id in a 4.4 notebook
    # makes nbconvert and papermill print "Notebook JSON is invalid")
    nbformat.validate(nbformat.reads(path.read_text(), as_version=nbformat.NO_CONVERT))


def test_sweep_notebook_has_a_parameters_cell():
    nb = nbformat.read(SWEEP, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert "SWEEP_DIR = None" in tagged[0].source and "KEYS = None" in tagged[0].source


# --------------------------------------------------------------------- executed notebooks
def test_tour_ran_every_check_and_says_how_many(tour):
    text = _text(tour)
    counted = re.findall(r"^(\d+) checks passed$", text, flags=re.M)
    assert len(counted) == 1, text[-500:]
    ticks = re.findall(r"^✓ ", text, flags=re.M)
    source = "\n".join(c.source for c in tour.cells if c.cell_type == "code")
    call_sites = len(re.findall(r"^\s*check\(", source, flags=re.M))
    assert int(counted[0]) == len(ticks) >= call_sites >= 50


def test_tour_explains_the_seed_bugs_and_shows_the_zero_grad_study(tour):
    text = _text(tour)
    assert text.count("backward is wrong (gradcheck fails") == 2
    assert text.count("Hidden by all-ones") == 2
    assert "with grad_output = 0 backward still returns 2" in text  # the quadratic's escaped + 2
    assert "backward ignores grad_output" in text  # the ReLU's dropped grad_output
    assert "the seed's quadratic gives 11" in text
    assert re.search(r"^✓ its legend is the seed's", text, flags=re.M)
    assert re.search(r"^✓ its loss axis is logarithmic", text, flags=re.M)
    assert "Self CPU" in text and "aten::conv1d" in text  # the profiler table


@pytest.mark.parametrize("which", ["tour", "sweep_default", "sweep_papermill"])
def test_no_errors_and_no_library_noise(which, request):
    nb = request.getfixturevalue(which)
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    assert _text(nb, "stderr") == ""
    noisy = [line for line in _text(nb).splitlines() if NOISE.search(line)]
    assert not noisy, noisy[:5]


@pytest.mark.parametrize("which, pngs, graphs", [("tour", 2, 3), ("sweep_default", 14, 0),
                                                 ("sweep_papermill", 5, 0)])
def test_every_figure_has_a_title(which, pngs, graphs, request):
    import shutil

    images = _images(request.getfixturevalue(which))
    assert [m for m, _ in images].count("image/png") == pngs
    assert [m for m, _ in images].count("image/svg+xml") == (graphs if shutil.which("dot") else 0)
    assert all(title for _, title in images), images


def test_tour_figure_titles(tour):
    titles = [t for _, t in _images(tour)]
    assert any(t.startswith("zero_grad_study on synthetic: train/loss per step") for t in titles)
    assert "SmallNet, batch 32: what backward keeps alive" in titles
    assert any(t.startswith("SmallNet: 1-D slices of the loss through w") for t in titles)


def test_sweep_analysis_without_parameters_runs_three_studies_that_differ(sweep_default):
    text = _text(sweep_default)
    assert re.search(r"^sweep \S+/zero_grad_study/\S+: 4 jobs run, 0 skipped$", text, flags=re.M)
    assert re.search(r"^sweep \S+/freeze_study/\S+: 3 jobs run, 0 skipped$", text, flags=re.M)
    assert re.search(r"^sweep \S+/stability_study/\S+: 3 jobs run, 0 skipped$", text, flags=re.M)
    assert "freeze_study: 3 runs, compared by variant" in text
    assert "zero_grad_study: 4 runs, compared by train.zero_grad" in text
    assert "stability_study: 3 runs, compared by optim.lr" in text
    titles = [t for _, t in _images(sweep_default)]
    # loss, step-by-step difference (variants only), cost, probe; the spectrum for stability
    for study in ("zero_grad_study", "freeze_study", "stability_study"):
        assert sum(t.startswith(f"{study} on synthetic:") for t in titles) == 4, titles
    assert any(t.startswith("stability_study on synthetic: Hessian spectral density")
               for t in titles)
    assert any(t.startswith("Sharpness against the stability limit") for t in titles)
    # the interpolation between each seed's zero_grad on and off runs: two pairs, two seeds
    assert any(t.startswith("train.zero_grad: the straight line between") for t in titles)
    tables = [o["data"]["text/plain"] for o in _outputs(sweep_default)
              if "barrier" in o.get("data", {}).get("text/plain", "")]
    assert len(tables) == 1, tables
    for seed in (0, 1):  # a row per seed: key, from, to, seed
        assert re.search(rf"^{seed}\s+train\.zero_grad\s+true\s+false\s+{seed}\s", tables[0],
                         flags=re.M), tables[0]


def test_sweep_analysis_through_papermill_reads_the_given_sweep(sweep_papermill, tiny_sweep):
    injected = [c for c in sweep_papermill.cells
                if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and str(tiny_sweep.sweep_dir) in injected[0].source
    text = _text(sweep_papermill)
    assert f"{tiny_sweep.sweep_dir}: 2 runs, studies: runs" in text
    assert "runs: 2 runs, compared by train.zero_grad" in text
    assert "jobs run" not in text  # it ran no sweep of its own
    titles = [t for _, t in _images(sweep_papermill)]
    assert any("train/loss per step" in t for t in titles)
    assert any("per-job time and memory" in t for t in titles)
    assert any("probes/update_ratio/all per step" in t for t in titles)


# ------------------------------------------------------------------------------ the API
def test_multirun_names_and_skips_jobs_as_the_cli_does(tiny_sweep):
    import autograd_lab as al

    root = tiny_sweep.sweep_dir.parent
    name = ("data.test_size=128,data.train_size=256,data.val_batch_size=128,data=synthetic,"
            "probes.every_n_steps=2,trainer.max_epochs=1")  # the constant overrides, sorted
    assert tiny_sweep.sweep_dir == root / name
    assert (tiny_sweep.returncode, tiny_sweep.launched, tiny_sweep.skipped) == (0, 2, 0)
    runs = tiny_sweep.runs
    assert sorted(runs.run) == ["train.zero_grad=false", "train.zero_grad=true"]
    assert (runs.status == "completed").all()
    assert (tiny_sweep.sweep_dir / "summary" / "summary.md").is_file()
    again = al.multirun(None, [*TINY, f"data.root={root.parent / 'data'}",
                               "train.zero_grad=true,false"], root=root)
    assert (again.sweep_dir, again.launched, again.skipped) == (tiny_sweep.sweep_dir, 2, 2)


def test_multirun_bad_override_is_the_cli_one_line_error(tmp_path):
    import autograd_lab as al
    from autograd_lab.errors import UserError

    with pytest.raises(UserError, match=r"^model=vgg: no such model; choices are: resnet18, "
                                        r"smallnet$"):
        al.multirun("zero_grad_study", ["model=vgg"], root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_run_returns_run_json_and_metrics_parquet_and_the_cli_finds_it(tmp_path, monkeypatch,
                                                                       capsys):
    import autograd_lab as al

    monkeypatch.chdir(tmp_path)
    overrides = [*TINY, "data.root=data", "trainer.max_steps=4"]
    result = al.run(overrides)  # run_dir: what `autograd-lab train <overrides>` would use
    assert result.run_dir == Path("runs") / ("data.test_size=128,data.train_size=256,"
                                             "data.val_batch_size=128,data=synthetic,"
                                             "probes.every_n_steps=2,trainer.max_epochs=1,"
                                             "trainer.max_steps=4")
    assert result.status == "completed" and not result.skipped
    assert result.record == json.loads((result.run_dir / "run.json").read_text())
    written = pd.read_parquet(result.run_dir / "metrics.parquet")
    pd.testing.assert_frame_equal(result.curves().drop(columns="run"), written)
    loss = written[written.name == "train/loss"]
    assert result.loss().tolist() == loss.value.tolist() and result.loss().index.tolist() == \
        [0, 1, 2, 3]
    stamp = (result.run_dir / "run.json").stat().st_mtime_ns
    # the CLI (its entry point, in this process), given the same overrides in the same folder,
    # finds this run and skips it
    cli = in_process(["train", *overrides], tmp_path, monkeypatch, capsys)
    assert cli.returncode == 0, cli.stderr
    assert "skip" in cli.stderr + cli.stdout
    again = al.run(overrides)
    assert again.skipped and again.record == result.record
    assert (result.run_dir / "run.json").stat().st_mtime_ns == stamp


def test_run_bad_override_is_the_cli_one_line_error(tmp_path):
    import autograd_lab as al
    from autograd_lab.errors import UserError

    with pytest.raises(UserError, match=r"^seed: a comma list or sweep needs -m"):
        al.run(["seed=0,1"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_show_refuses_an_untitled_figure_and_quiet_keeps_real_errors(capfd):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import autograd_lab as al

    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="no title"):
        al.show(fig)
    ax.set_title("loss per step")
    assert al.show(fig) == "loss per step"  # outside a notebook: one line, the title
    with al.quiet():
        os.write(2, b"USDT:2026-12-04 17:54:10 12839:12839 SyncActivityProfilerHandler.cpp:39] "
                    b"profiler_start\n")
        os.write(2, b"a real error\n")
    captured = capfd.readouterr()
    assert "figure: loss per step" in captured.out
    assert captured.err == "a real error\n"
