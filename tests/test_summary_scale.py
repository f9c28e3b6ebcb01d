"""Summaries at scale, through `autograd-lab summarize` (its entry point in-process; a real
process where it is killed) on a few hundred synthetic run directories in the harness's format
(scripts/bench_summary.py's make_runs): figures of normal
size with a bounded legend (a numeric swept key as a colour scale and an x-axis), seed-band
runs only for groups of several seeds, one configuration counted once however its folders are
named, a sweep without jobs yet, and nothing half-written, even when a summary is killed."""

from __future__ import annotations

import json
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import in_process

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_summary import make_runs  # noqa: E402

EXE = Path(sys.executable).parent / "autograd-lab"
N = 240  # a few hundred runs, one learning rate each


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def _events_complete(path: Path) -> int:
    """The number of records in a TensorBoard events file, each checked whole (length, CRCs):
    a half-written file fails."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data, at, records = path.read_bytes(), 0, 0
    while at < len(data):
        assert at + 12 <= len(data), f"{path}: cut in a record header"
        (length,) = struct.unpack("<Q", data[at:at + 8])
        assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(data[at:at + 8])
        body = data[at + 12:at + 12 + length]
        assert len(body) == length and at + 16 + length <= len(data), f"{path}: cut short"
        crc = struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0]
        assert crc == masked_crc32c(body), f"{path}: a damaged record"
        at, records = at + 16 + length, records + 1
    return records


def _check_summary(summary: Path) -> dict:
    """Every file of a summary folder parses whole; returns {"pngs": {name: (w, h)}, "groups":
    [seed-band run folders]}."""
    assert not [p for p in summary.rglob("*") if p.name.endswith(".tmp")], "a .tmp leftover"
    pngs = {}
    for path in summary.rglob("*"):
        if path.suffix == ".parquet":
            pd.read_parquet(path)
        elif path.suffix == ".csv":
            pd.read_csv(path)
        elif path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                image.verify()
            pngs[path.name] = _png_size(path)
        elif "tfevents" in path.name:
            assert _events_complete(path) >= 2, path  # the version record and some data
    groups = [d for d in summary.iterdir() if d.is_dir()]
    for group in groups:  # a seed-band run is one complete events file
        assert [p.name for p in group.iterdir() if "tfevents" in p.name], group
    return {"pngs": pngs, "groups": groups}


@pytest.fixture(scope="module")
def _lr_sweep_cache() -> dict:
    return {}


@pytest.fixture
def lr_sweep(_lr_sweep_cache, tmp_path_factory, monkeypatch, capsys) -> Path:
    """N runs at N learning rates (one seed each), summarised once a module through the CLI's
    entry point (in-process)."""
    if "folder" not in _lr_sweep_cache:
        folder = tmp_path_factory.mktemp("scale") / "lr_sweep"
        make_runs(folder, N, steps=60)
        with monkeypatch.context() as m:
            out = in_process(["summarize", str(folder)], folder.parent, m, capsys)
        assert out.returncode == 0, out.stderr[-2000:]
        _lr_sweep_cache["folder"] = folder
    return _lr_sweep_cache["folder"]


def test_figures_keep_a_normal_size_and_a_bounded_legend(lr_sweep):
    found = _check_summary(lr_sweep / "summary")
    assert set(found["pngs"]) == {"lr_study_loss.png", "lr_study_cost.png"}
    for name, (width, height) in found["pngs"].items():
        assert width < 4000 and height < 4000, (name, width, height)
    from autograd_lab.sweep.figures import MAX_LEGEND
    from autograd_lab.sweep.summary import plot_study

    for fig in plot_study(lr_sweep):  # the same figures, as a notebook gets them
        for ax in fig.axes:
            legend = ax.get_legend()
            assert legend is None or len(legend.get_texts()) <= MAX_LEGEND
    loss = next(f for f in plot_study(lr_sweep) if "train/loss" in f.axes[0].get_title())
    labels = {ax.get_ylabel() for ax in loss.axes} | {ax.get_xlabel() for ax in loss.axes}
    assert "optim.lr" in labels  # the swept number: a colour bar and an x-axis


def test_groups_of_one_run_get_no_seed_band_runs(lr_sweep):
    summary = lr_sweep / "summary"
    assert _check_summary(summary)["groups"] == []
    md = (summary / "summary.md").read_text()
    table = md.split("## Results (completed runs)")[1].split("##")[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert len(rows) == N and all(ln.split("|")[2].strip() == "1" for ln in rows)
    assert f"{N} runs: {N} completed." in md


def test_seed_bands_only_for_groups_of_several_seeds(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "sweep"
    made = make_runs(folder, 30, steps=20, seeds=2)  # 15 learning rates x 2 seeds
    for run in made[:6]:  # 3 of them keep one seed
        if run.name.endswith("seed=1"):
            shutil.rmtree(run)
    out = in_process(["summarize", str(folder)], tmp_path, monkeypatch, capsys)
    assert out.returncode == 0, out.stderr[-2000:]
    groups = _check_summary(folder / "summary")["groups"]
    assert len(groups) == 12, [g.name for g in groups]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {r.name: r for r in made}
    group = sorted(groups)[-1]  # optim.lr=1.0: its two seeds' losses, recomputed here
    frames = [pd.read_parquet(runs[f"optim.lr=1.0,seed={s}"] / "metrics.parquet")
              for s in (0, 1)]
    per_run = pd.concat([f[f.name == "train/loss"].set_index("step").value for f in frames],
                        axis=1)
    acc = EventAccumulator(str(group), size_guidance={"scalars": 0}).Reload()
    got = [e.value for e in acc.Scalars("seed_bands/train/loss/max")]
    assert got == pytest.approx(per_run.max(axis=1).tolist(), rel=1e-6)


def test_one_configuration_is_counted_once_whatever_its_folder_is_called(tmp_path, monkeypatch,
                                                                         capsys):
    """`train.zero_grad=true/` and `seed=0,train.zero_grad=true/` holding the same resolved
    configuration are one run: n=1, not seed 0 pooled twice; the completed one is counted."""
    folder = tmp_path / "sweep"
    made = make_runs(folder, 4, steps=20)
    first = made[0]
    twin = folder / f"seed=0,{first.name}"
    shutil.copytree(first, twin)
    record = json.loads((twin / "run.json").read_text())
    record.update(status="interrupted", error="killed")  # the same config, interrupted
    (twin / "run.json").write_text(json.dumps(record))
    out = in_process(["summarize", str(folder)], tmp_path, monkeypatch, capsys)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = pd.read_csv(folder / "summary" / "runs.csv")
    assert dict(zip(runs.run, runs.status, strict=True))[twin.name] == "duplicate"
    assert (runs.status == "completed").sum() == 4
    md = (folder / "summary" / "summary.md").read_text()
    assert "5 runs: 4 completed, 1 duplicate." in md
    table = md.split("## Results (completed runs)")[1].split("##")[0]
    assert [ln.split("|")[2].strip() for ln in table.splitlines()[4:] if ln.startswith("|")] \
        == ["1"] * 4
    assert "Runs that did not complete" not in md  # the interrupted twin is that run


def test_a_sweep_without_jobs_yet_summarises_as_no_runs_yet(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")  # Hydra's first file
    out = in_process(["summarize", str(folder)], tmp_path, monkeypatch, capsys)
    assert out.returncode == 0, out.stderr
    assert "No runs yet" in (folder / "summary" / "summary.md").read_text()
    assert "No runs yet" in out.stdout
    from autograd_lab.sweep.runs import load_runs

    assert len(load_runs(folder)) == 0


def test_a_summary_killed_at_any_moment_leaves_whole_files(tmp_path, monkeypatch, capsys):
    """SIGKILL at random moments of `summarize` (a folder with seed bands and an earlier
    summary): every file left parses whole and every band run is complete; the next summary
    is whole and has no leftovers."""
    folder = tmp_path / "sweep"
    make_runs(folder, 120, steps=40, seeds=2)
    out = in_process(["summarize", str(folder)], tmp_path, monkeypatch, capsys)
    assert out.returncode == 0, out.stderr[-2000:]
    rng, start = random.Random(7), time.perf_counter()
    for _ in range(4):
        proc = subprocess.Popen([str(EXE), "summarize", str(folder)], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 8.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        summary = folder / "summary"
        kept = [p for p in summary.rglob("*") if ".tmp" not in str(p.relative_to(summary))]
        for path in kept:  # whatever a kill left in place parses whole (.tmp: never read)
            if path.suffix == ".parquet":
                pd.read_parquet(path)
            elif path.suffix == ".csv":
                pd.read_csv(path)
            elif "tfevents" in path.name:
                _events_complete(path)
        assert len([d for d in summary.iterdir() if d.is_dir() and ".tmp" not in d.name]) == 60
        assert time.perf_counter() - start < 400, "bounded in time"
    out = in_process(["summarize", str(folder)], tmp_path, monkeypatch, capsys)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(_check_summary(folder / "summary")["groups"]) == 60


def test_band_events_are_what_protobuf_itself_serialises():
    """The seed-band runs' events are serialised by hand (speed): byte for byte what the
    Summary and Event protos give, and their records' checksums are tensorboard's own."""
    import numpy as np
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    from autograd_lab.sweep.board import band_events, masked_crc32c_many

    frame = pd.DataFrame({"mean": [1.5, 2.0], "min": [1.0, 0.5], "max": [2.0, 300.0],
                          "n": [2.0, 2.0]}, index=[0, 200])
    events = band_events({"train/loss": frame}, {"train/loss"})
    for body, step in zip(events._bodies[1:], (0, 200), strict=True):
        values = []
        for stat in ("mean", "min", "max"):
            value = float(frame.at[step, stat])
            values += [Summary.Value(tag=f"seed_bands/train/loss/{stat}", simple_value=value),
                       Summary.Value(tag=f"seed_bands/train/loss/log10/{stat}",
                                     simple_value=float(np.log10(value)))]
        want = Event(wall_time=events._time, step=step, summary=Summary(value=values))
        assert body == want.SerializeToString()
    chunks = [bytes(range(n % 256)) * (n // 256 + 1) for n in (0, 1, 7, 8, 300, 5000)]
    assert masked_crc32c_many(chunks) == [masked_crc32c(c) for c in chunks]
