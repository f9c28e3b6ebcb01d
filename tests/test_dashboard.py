"""TensorBoard as the dashboard, checked through a real server started with
`autograd-lab tensorboard`: a 2x2 sweep launched without hydra.sweep.dir shows runs named by
the swept keys alone, HParams with the swept keys as typed columns and run.json's numbers,
the Custom Scalars layout, and the `summary` run's seed bands (recomputed here from
metrics.parquet)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SWEEP = ["-m", "data=synthetic", "data.train_size=256", "data.test_size=64",
         "trainer.max_epochs=2", "seed=0,1", "train.zero_grad=true,false"]
NAMES = ["seed=0,train.zero_grad=false", "seed=0,train.zero_grad=true",
         "seed=1,train.zero_grad=false", "seed=1,train.zero_grad=true"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_root):
    """The 2x2 sweep, run once, in a fresh folder, through the CLI's entry point in this process
    (the server below is the real command): the sweep directory comes from the command."""
    from autograd_lab.cli import main

    cwd = tmp_path_factory.mktemp("dash")
    with pytest.MonkeyPatch.context() as m:
        m.chdir(cwd)
        m.setattr(sys, "argv", list(sys.argv))
        code = main(["train", *SWEEP, f"data.root={data_root}"])
    assert code == 0
    (folder,) = (cwd / "multirun").iterdir()  # multirun/<constant overrides>
    assert folder.name == "data.test_size=64,data.train_size=256,data=synthetic," \
                          "trainer.max_epochs=2"
    return folder


@pytest.fixture(scope="module")
def server(sweep):
    exe = Path(sys.executable).parent / "autograd-lab"
    proc = subprocess.Popen([str(exe), "tensorboard", str(sweep)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=sweep)
    line = proc.stdout.readline()
    assert line.startswith("TensorBoard: http://127.0.0.1:"), (line, proc.stderr.read())
    base = line.split()[1].rstrip("/")

    def get(path, body=None):
        req = urllib.request.Request(base + path, data=None if body is None else
                                     json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    deadline = time.time() + 60  # TensorBoard loads the event files in the background
    while len(get("/data/runs")) < 7 or not get("/data/plugin/hparams/experiment",
                                                 {"experimentName": ""}).get("metricInfos"):
        assert time.time() < deadline, get("/data/runs")
        time.sleep(0.5)
    time.sleep(1)  # the last files' remaining events
    yield get
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0


def _records(sweep: Path) -> dict:
    return {name: json.loads((sweep / name / "run.json").read_text()) for name in NAMES}


def test_runs_are_named_by_the_swept_keys_alone(sweep, server):
    assert sorted(server("/data/runs")) == sorted(
        [*NAMES, "summary", "summary/train.zero_grad=false", "summary/train.zero_grad=true"])
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [*NAMES, "summary"]


def test_hparams_have_the_swept_keys_typed_and_run_json_numbers(sweep, server):
    experiment = server("/data/plugin/hparams/experiment", {"experimentName": ""})
    infos = {h["name"]: h for h in experiment["hparamInfos"]}
    assert infos["train.zero_grad"]["type"] == "DATA_TYPE_BOOL"
    # an integer is a string column: TensorBoard prints a number with 5 significant digits (its
    # prettyPrint: toPrecision(5)), which showed seed 0 as 0.0000
    assert infos["seed"]["type"] == "DATA_TYPE_STRING"
    # the swept keys come first: TensorBoard's table shows the first five columns
    assert [h["name"] for h in experiment["hparamInfos"][:2]] == ["seed", "train.zero_grad"]
    assert {"model", "data", "optim", "variant", "probes", "data.train_size"} <= set(infos)
    assert not {"optim.lr", "checkpoint.every_n_steps", "data.root", "eval.grad_mode"} & set(
        infos), "constants nobody typed are left out (they are in run.json)"
    metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {"train/loss", "val/loss", "val/acc", "whole_run/images_per_s",
            "whole_run/seconds_per_step", "whole_run/trainable_params"} <= metrics
    groups = server("/data/plugin/hparams/session_groups", {
        "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
        "colParams": [], "startIndex": 0, "sliceSize": 10})
    assert groups["totalSize"] == 4
    records = _records(sweep)
    for group in groups["sessionGroups"]:
        record = records[group["name"]]
        hp = group["hparams"]
        assert hp["train.zero_grad"] is record["config"]["train"]["zero_grad"]
        assert hp["seed"] == str(record["config"]["seed"]) and hp["status"] == "completed"
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        final = record["final"]
        assert values["train/loss"] == pytest.approx(final["train_loss"], rel=1e-6)
        assert values["val/acc"] == pytest.approx(final["val_acc"], rel=1e-6)
        assert values["whole_run/steps"] == final["steps"] == 16
        assert values["whole_run/images_per_s"] == pytest.approx(record["images_per_s"],
                                                                 rel=1e-6)
        assert values["whole_run/seconds_per_step"] == pytest.approx(
            record["seconds_per_step"], rel=1e-6)
        assert values["whole_run/trainable_params"] == record["params"]["trainable"]


def test_scalars_start_with_curves_not_single_dots(sweep, server):
    tags = server("/data/plugin/scalars/tags")
    for name in NAMES:
        assert not [t for t in tags[name] if t.startswith("final/")]
        first_groups = sorted({t.split("/")[0] for t in tags[name]})
        assert first_groups.index("whole_run") == len(first_groups) - 1  # single values last


def test_the_layout_puts_seed_bands_and_curves_first(server):
    layout = server("/data/plugin/custom_scalars/layout")
    titles = [c["title"] for c in layout["category"]]
    assert titles[0].startswith("seed bands") and titles[1] == "curves"
    assert titles[2].startswith("probes")
    bands = layout["category"][0]["chart"]
    # written in reverse: TensorBoard's page lays margin charts out reversed (train/loss first)
    assert [c["title"].split(":")[0] for c in bands] == ["val/acc", "val/loss", "train/loss"]
    series = bands[-1]["margin"]["series"][0]
    assert series == {"value": "seed_bands/train/loss/mean",
                      "lower": "seed_bands/train/loss/min", "upper": "seed_bands/train/loss/max"}
    curves = layout["category"][1]["chart"]
    assert curves[0]["multiline"]["tag"] == ["^train/loss$"]
    probes = {c["title"]: c["multiline"]["tag"] for c in layout["category"][2]["chart"]}
    tags = server("/data/plugin/scalars/tags")[NAMES[0]]
    import re

    for stat, (regex,) in probes.items():  # each chart gathers every layer group's tag
        matched = [t for t in tags if re.match(regex, t)]
        assert len(matched) >= 2 and f"probes/{stat}/all" in matched, stat


def test_the_summary_run_has_the_seed_bands_recomputed_from_metrics(sweep, server):
    for zero_grad in ("true", "false"):
        frames = [pd.read_parquet(sweep / f"seed={s},train.zero_grad={zero_grad}" /
                                  "metrics.parquet") for s in (0, 1)]
        for metric in ("train/loss", "val/acc"):
            per_run = pd.concat([f[f.name == metric].set_index("step").value for f in frames],
                                axis=1)
            run = urllib.parse.quote(f"summary/train.zero_grad={zero_grad}")
            got = {}
            for stat in ("mean", "min", "max"):
                tag = urllib.parse.quote(f"seed_bands/{metric}/{stat}", safe="")
                got[stat] = server(f"/data/plugin/scalars/scalars?run={run}&tag={tag}")
            assert [p[1] for p in got["mean"]] == per_run.index.tolist()
            np.testing.assert_allclose([p[2] for p in got["mean"]], per_run.mean(axis=1),
                                       rtol=1e-6)
            np.testing.assert_allclose([p[2] for p in got["min"]], per_run.min(axis=1),
                                       rtol=1e-6)
            np.testing.assert_allclose([p[2] for p in got["max"]], per_run.max(axis=1),
                                       rtol=1e-6)
            assert (per_run.max(axis=1) > per_run.min(axis=1)).any()  # two seeds differ
    images = server("/data/plugin/images/tags")
    assert sorted(images["summary"]) == ["summary/runs_cost", "summary/runs_diff",
                                        "summary/runs_loss"]  # its PNGs


def test_a_loss_that_spans_decades_gets_log10_bands(tmp_path):
    """Custom Scalars has no log axis: a group whose loss blows up is banded as log10 too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from autograd_lab.sweep.board import write_summary_run

    runs = pd.DataFrame({"run": ["a", "b", "c", "d"], "status": ["completed"] * 4,
                         "seed": [0, 1, 0, 1], "train.zero_grad": [True, True, False, False]})
    steps = np.arange(5)
    values = {"a": [2.0, 1.0, 0.5, 0.4, 0.3], "b": [2.1, 1.1, 0.6, 0.5, 0.2],
              "c": [2.0, 40.0, 3e3, 2e5, 1e7], "d": [2.2, 9.0, 80.0, 700.0, 6e3]}
    curves = pd.DataFrame([{"run": r, "step": int(k), "epoch": 0, "name": "train/loss",
                            "value": v[k]} for r, v in values.items() for k in steps])
    write_summary_run(tmp_path, runs, curves, ["seed", "train.zero_grad"])
    acc = EventAccumulator(str(tmp_path / "train.zero_grad=false"),
                           size_guidance={"scalars": 0}).Reload()
    got = [e.value for e in acc.Scalars("seed_bands/train/loss/log10/max")]
    np.testing.assert_allclose(got, np.log10(np.maximum(values["c"], values["d"])), rtol=1e-6)
    mean = [e.value for e in acc.Scalars("seed_bands/train/loss/log10/mean")]
    np.testing.assert_allclose(mean, np.log10((np.array(values["c"]) + values["d"]) / 2),
                               rtol=1e-6)
