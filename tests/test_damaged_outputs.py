"""Damaged outputs: a run counts as completed only if its files parse. A re-run of the same
command runs a damaged run again; summaries list it as broken, with what is wrong, and summarise
every other run as usual; no shape of run.json makes anything raise.

The runs are real (made in-process, or by the installed `autograd-lab`); the damage is done to
their files on disk: metrics.parquet cut to half its bytes, run.json replaced by other JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli, in_process, losses, make_cfg
from omegaconf import OmegaConf

from autograd_lab.job.rundir import check_run_dir, finished_record
from autograd_lab.sweep.runs import load_curves, load_runs
from autograd_lab.sweep.summary import SummaryCallback, summarize
from autograd_lab.text import fmt_number

SMALL = ["data=synthetic", "data.train_size=256", "data.test_size=128", "trainer.max_epochs=1",
         "probes=off"]

# run.json contents that are no run record, and the words the summary gives for each
RUN_JSON = {
    "list": ("[1, 2]", "holds a JSON list"),
    "string": ('"text"', "holds a JSON string"),
    "null": ("null", "holds a JSON null"),
    "number": ("3", "holds a JSON number"),
    "empty": ("", "does not parse (it is empty)"),
    "binary": (b"\x80\x00\xff\xfe junk \x00" * 50, "does not parse (truncated or not JSON)"),
    "deep": ("[" * 100_000, "does not parse (truncated or not JSON)"),
    "fields": (json.dumps({"format_version": 1, "status": "completed", "config": [1],
                           "final": "x"}), "its config is a JSON list"),
    "no status": (json.dumps({"format_version": 1, "final": {}}), "it has no status"),
    "version": (json.dumps({"format_version": "1", "status": "completed"}),
                "format_version is not a number"),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory, data_root) -> dict[str, tuple[Path, dict]]:
    """Two real runs that differ in a swept key: {name: (run_dir, resolved config)}."""
    from autograd_lab.train import run

    base = tmp_path_factory.mktemp("made")
    out = {}
    for lr in ("0.01", "0.05"):
        cfg = make_cfg(*SMALL, f"optim.lr={lr}", data_root=data_root)
        run(cfg, base / f"optim.lr={lr}")
        out[lr] = base / f"optim.lr={lr}", OmegaConf.to_container(cfg, resolve=True)
    return out


def _copy(made, lr: str, dest: Path) -> Path:
    shutil.copytree(made[lr][0], dest)
    return dest


def _truncate(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


def _write(path: Path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def test_finished_record_needs_every_output_to_parse(made, tmp_path):
    intact = _copy(made, "0.01", tmp_path / "intact")
    config = made["0.01"][1]
    assert finished_record(intact, config) == _record(intact)
    assert finished_record(intact, made["0.05"][1]) is None  # another config: run it

    damaged = {}
    half = damaged["metrics half"] = _copy(made, "0.01", tmp_path / "half")
    _truncate(half / "metrics.parquet")
    gone = damaged["metrics missing"] = _copy(made, "0.01", tmp_path / "gone")
    (gone / "metrics.parquet").unlink()
    other = damaged["metrics other columns"] = _copy(made, "0.01", tmp_path / "other")
    pd.DataFrame({"x": [1.0]}).to_parquet(other / "metrics.parquet", index=False)
    short = damaged["metrics fewer rows"] = _copy(made, "0.01", tmp_path / "short")
    frame = pd.read_parquet(short / "metrics.parquet")
    frame.iloc[:3].to_parquet(short / "metrics.parquet", index=False)
    for name, (content, _) in RUN_JSON.items():
        damaged[name] = _copy(made, "0.01", tmp_path / name.replace(" ", "_"))
        _write(damaged[name] / "run.json", content)
    cut = damaged["run.json half"] = _copy(made, "0.01", tmp_path / "cut")
    _truncate(cut / "run.json")

    for name, run_dir in damaged.items():
        assert finished_record(run_dir, config) is None, name
        check_run_dir(run_dir)  # no AttributeError/TypeError: a broken run is written anew


@pytest.mark.parametrize("name", sorted(RUN_JSON))
def test_no_shape_of_run_json_raises(name, made, tmp_path):
    """Every reader treats a run.json that is no run record as a broken run."""
    content, words = RUN_JSON[name]
    folder = tmp_path / "runs"
    run_dir = _copy(made, "0.01", folder / "bad")
    _write(run_dir / "run.json", content)
    check_run_dir(run_dir)
    assert finished_record(run_dir, made["0.01"][1]) is None
    runs = load_runs(folder)
    assert list(runs.status) == ["broken"] and words in runs.error[0]
    assert len(load_curves(folder)) == len(pd.read_parquet(run_dir / "metrics.parquet"))
    out = summarize(folder)
    md = (out / "summary.md").read_text()
    assert "## Broken runs" in md and "| bad " in md and words in md
    assert list(pd.read_csv(out / "runs.csv").status) == ["broken"]


def test_summary_lists_broken_runs_and_summarises_the_rest(made, tmp_path):
    folder = tmp_path / "sweep"
    good = {lr: _copy(made, lr, folder / f"optim.lr={lr}") for lr in made}
    half = _copy(made, "0.01", folder / "metrics_half")
    _truncate(half / "metrics.parquet")
    broken = {"metrics_half": "metrics.parquet does not parse (truncated?)"}
    for name in ("list", "string", "null"):
        _write(_copy(made, "0.05", folder / f"json_{name}") / "run.json", RUN_JSON[name][0])
        broken[f"json_{name}"] = RUN_JSON[name][1]

    out = summarize(folder)
    runs = load_runs(folder)
    assert runs.attrs["swept"] == ["optim.lr"]  # runs without a known config change nothing
    table = pd.read_csv(out / "runs.csv")
    assert pd.read_parquet(out / "runs.parquet").run.tolist() == table.run.tolist()
    by_run = table.set_index("run")
    for name, words in broken.items():
        assert by_run.status[name] == "broken" and words in by_run.error[name], name
    assert "run.json says completed" in by_run.error["metrics_half"]
    for lr, run_dir in good.items():
        final = _record(run_dir)["final"]
        row = by_run.loc[run_dir.name]
        assert row.status == "completed"
        for key in ("train_loss", "best_train_loss", "val_loss", "val_acc", "steps"):
            assert row[key] == final[key], (lr, key)

    md = (out / "summary.md").read_text()
    head, section = md.split("## Broken runs")
    assert "6 runs: 2 completed, 4 broken. Grouped by optim.lr." in head
    for run_dir in good.values():  # one run in each group: its own numbers, no "±"
        final = _record(run_dir)["final"]
        assert f" {fmt_number(final['val_loss'])} " in head
        assert f" {fmt_number(final['val_acc'])} " in head
    assert "±" not in head
    assert not any(name in head for name in broken)  # not in the table, not "did not complete"
    lines = [ln for ln in section.splitlines() if ln.startswith("| ") and "problem" not in ln]
    assert len(lines) == len(broken)
    for name, words in broken.items():
        assert any(ln.startswith(f"| {name} ") and words in ln for ln in lines), name

    curves = pd.read_parquet(out / "curves.parquet")
    assert "metrics_half" not in set(curves.run)
    for run_dir in good.values():
        mine = curves[(curves.run == run_dir.name) & (curves.name == "train/loss")]
        assert mine.value.tolist() == losses(run_dir)
    assert (out / "runs_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_after_a_truncated_metrics_file_is_not_skipped(tmp_path, data_root, monkeypatch,
                                                              capsys):
    """The same command again: not "already completed"; it continues from the run's final
    checkpoint and writes the same metrics.parquet; a third time, it is skipped. (Each command
    through the entry point in this process.)"""
    run_dir = tmp_path / "run"
    args = ["train", *SMALL, "trainer.progress_bar=false", f"data.root={data_root}",
            f"hydra.run.dir={run_dir}"]
    first = in_process(args, tmp_path, monkeypatch, capsys)
    assert first.returncode == 0, first.stderr
    reference = pd.read_parquet(run_dir / "metrics.parquet")
    reference_losses = losses(run_dir)
    _truncate(run_dir / "metrics.parquet")

    again = in_process(args, tmp_path, monkeypatch, capsys)
    assert again.returncode == 0, again.stderr
    assert "already completed" not in again.stderr and "skip " not in again.stderr
    assert "Traceback" not in again.stderr
    assert losses(run_dir) == reference_losses
    assert pd.read_parquet(run_dir / "metrics.parquet").equals(reference)  # every row
    record = _record(run_dir)
    assert record["status"] == "completed"
    assert record["final"]["train_loss"] == reference_losses[-1]
    # what the code does: it continues from the final checkpoint, whose rows are the curve
    assert record["resumed"]["from_step"] == len(reference_losses)

    third = in_process(args, tmp_path, monkeypatch, capsys)
    assert third.returncode == 0 and "already completed" in third.stderr


def test_summarize_command_reports_the_broken_run_and_exits_0(made, tmp_path):
    folder = tmp_path / "runs"
    _copy(made, "0.01", folder / "good_run")
    _truncate(_copy(made, "0.05", folder / "cut_run") / "metrics.parquet")
    out = cli("summarize", str(folder), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    broken = [ln for ln in out.stdout.splitlines() if ln.startswith("| cut_run ")]
    assert len(broken) == 1 and "metrics.parquet does not parse (truncated?)" in broken[0]
    runs = pd.read_csv(folder / "summary" / "runs.csv").set_index("run")
    assert runs.status.to_dict() == {"cut_run": "broken", "good_run": "completed"}


def _end_of_sweep(sweep: Path):
    SummaryCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))


def test_end_of_sweep_lists_a_broken_run_and_exits_1(made, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _copy(made, "0.01", sweep / "good")
    _end_of_sweep(sweep)  # all intact: no exit
    assert "summary: " in capsys.readouterr().out

    _write(_copy(made, "0.05", sweep / "bad") / "run.json", "null")
    with pytest.raises(SystemExit) as stop:
        _end_of_sweep(sweep)
    assert stop.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["broken: bad: run.json is not a run record (it holds a JSON null, not an "
                   "object)"]
    assert "| bad " in (sweep / "summary" / "summary.md").read_text()


def test_a_summary_that_cannot_be_written_is_an_error(made, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _copy(made, "0.01", sweep / "good")
    (sweep / "summary").write_text("in the way")  # the summary folder cannot be made
    with pytest.raises(SystemExit) as stop:
        _end_of_sweep(sweep)
    assert stop.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("autograd-lab: error: ")
    assert str(sweep / "summary") in err[0] and "Traceback" not in err[0]
    assert (sweep / "summary").read_text() == "in the way"
