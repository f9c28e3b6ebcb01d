"""Step-by-step variant differences (sweep.pairs, sweep.diff and their place in the summary):
runs that share the seed and differ in one key, compared step by step against a recomputation
from their metrics.parquet files. custom_relu against relu must be exactly 0 at every step; a
frozen stage changes the first update, so the loss from step 1 on; without zero_grad the first
update is the same (.grad holds one gradient either way) and the second is made with the sum of
two, so the loss differs from step 2 on."""

from __future__ import annotations

import struct

import pandas as pd
import pytest

from autograd_lab import api
from autograd_lab.errors import UserError
from autograd_lab.sweep.diff import (
    diff_bands,
    diff_table,
    figure_diff,
    first_differences,
    step_differences,
)
from autograd_lab.sweep.pairs import pair_runs, reference_value
from autograd_lab.sweep.runs import load_curves, load_runs
from autograd_lab.sweep.summary import _landscape_section, summarize

STEPS = 6
VARIANTS = {"base": [], "custom": ["model.activation=custom_relu"],
            "nozg": ["train.zero_grad=false"], "frozen": ["variant=frozen_early"]}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Four configurations (the default, custom_relu, no zero_grad, SmallNet's conv frozen) at
    two seeds, in one folder; returns it."""
    folder = tmp_path_factory.mktemp("diff") / "sweep"
    data = tmp_path_factory.mktemp("diff_data")
    base = ["data=synthetic", "data.train_size=64", "data.test_size=32", f"data.root={data}",
            f"trainer.max_steps={STEPS}", "trainer.progress_bar=false", "data.batch_size=16",
            "probes=off", "study=diff_check"]
    for seed in (0, 1):
        for name, overrides in VARIANTS.items():
            run = api.run([*base, *overrides, f"seed={seed}"], run_dir=folder / f"{name}_s{seed}")
            assert run.status == "completed"
    return folder


@pytest.fixture(scope="module")
def frames(sweep):
    runs, curves = load_runs(sweep), load_curves(sweep)
    diffs = step_differences(runs, curves)
    return runs, curves, diffs, first_differences(diffs)


def _loss(run_dir) -> pd.Series:
    """The oracle's side: train/loss by step, read from the run's metrics.parquet by pandas."""
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    return frame[frame.name == "train/loss"].set_index("step").value.sort_index()


def _row(firsts, key, seed):
    row = firsts[(firsts.key == key) & (firsts.seed == str(seed))]
    assert len(row) == 1, firsts
    return row.iloc[0]


def test_pairs_and_reference(frames):
    runs = frames[0]
    pairs = pair_runs(runs)
    got = {(r.key, r.reference_value, r.variant_value, r.reference_run, r.variant_run)
           for r in pairs.itertuples()}
    want = {(key, ref, var, f"base_s{s}", f"{name}_s{s}") for s in (0, 1) for key, ref, var, name
            in [("model.activation", "relu", "custom_relu", "custom"),
                ("train.zero_grad", "true", "false", "nozg"),
                ("train.freeze", "[]", "['conv.*']", "frozen")]}
    assert got == want  # the default config's value is the reference; the seed is shared
    assert (pairs.seed == pairs.variant_run.str[-1]).all()
    only = pair_runs(runs, "model.activation")
    assert set(only.key) == {"model.activation"} and len(only) == 2
    # no default among the values: the first in sorted order, numbers numerically
    assert reference_value("optim.lr", [0.2, 0.05, 0.1]) == "0.05"
    assert reference_value("optim.lr", [0.2, 0.001]) == "0.001"  # the default (sgd.yaml)
    with pytest.raises(UserError) as error:
        pair_runs(runs, "optim.lr")
    message = str(error.value)
    assert "\n" not in message and message.startswith("optim.lr: not a swept key")
    assert all(k in message for k in ("model.activation", "train.zero_grad", "train.freeze"))


def test_custom_relu_is_exactly_zero_at_every_step(sweep, frames):
    diffs, firsts = frames[2], frames[3]
    for seed in (0, 1):
        row = _row(firsts, "model.activation", seed)
        assert pd.isna(row.first_step) and row.max_abs == 0.0 and row.steps == STEPS
        ref, var = _loss(sweep / f"base_s{seed}"), _loss(sweep / f"custom_s{seed}")
        assert len(ref) == STEPS and (ref.to_numpy() == var.to_numpy()).all()
    mine = diffs[diffs.key == "model.activation"]
    assert len(mine) == 2 * STEPS and (mine.difference == 0.0).all()


@pytest.mark.parametrize("key, name, first", [("train.freeze", "frozen", 1),
                                              ("train.zero_grad", "nozg", 2)])
def test_first_differing_step(sweep, frames, key, name, first):
    firsts = frames[3]
    for seed in (0, 1):
        row = _row(firsts, key, seed)
        ref, var = _loss(sweep / f"base_s{seed}"), _loss(sweep / f"{name}_s{seed}")
        assert ref[0] == var[0]  # the same initial weights, the same first batch
        assert (ref[:first] == var[:first]).all() and ref[first] != var[first]
        assert row.first_step == first and row.max_abs > 1e-4


def test_table_equals_a_recomputation_from_metrics_files(sweep, frames):
    firsts = frames[3]
    table = diff_table(firsts)
    assert len(firsts) == 6 and len(table) == 6
    for i, row in firsts.iterrows():
        ref, var = _loss(sweep / row.reference_run), _loss(sweep / row.variant_run)
        steps = ref.index.intersection(var.index)
        delta = var[steps] - ref[steps]
        differ = steps[(var[steps] != ref[steps]).to_numpy()]
        first = str(differ[0]) if len(differ) else "never"
        assert table.loc[i, "first differing step"] == first
        assert row.max_abs == pytest.approx(delta.abs().max(), abs=0, rel=1e-12)
        if delta.abs().max() > 0:
            assert row.max_step == delta.abs().idxmax()
            assert table.loc[i, "at step"] == str(delta.abs().idxmax())
        assert table.loc[i, "variant run"] == row.variant_run


def test_figure_has_a_panel_per_key(frames):
    runs, curves = frames[0], frames[1]
    fig = figure_diff(runs, curves, None, "diff_check")
    axes = {ax.get_title(loc="left"): ax for ax in fig.axes}
    assert set(axes) == {"model.activation", "train.zero_grad", "train.freeze"}
    assert axes["train.zero_grad"].get_yscale() == "symlog"  # 0, 1e-5 and 1e-2 all visible
    legend = axes["model.activation"].get_legend().get_texts()[0].get_text()
    assert legend == "custom_relu − relu: exactly 0 at every step"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_summary_has_the_differences(sweep, frames, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    diffs = frames[2]
    (sweep / "landscape").mkdir(exist_ok=True)
    pd.DataFrame({"key": ["train.zero_grad"], "from_value": ["true"], "to_value": ["false"],
                  "seed": ["0"], "from_run": ["a"], "file": ["a__to__b.parquet"],
                  "loss_from": [1.0], "loss_mid": [2.5], "loss_to": [2.0],
                  "barrier": [0.25]}).to_parquet(sweep / "landscape" / "pairs.parquet")
    out = summarize(sweep)
    text = (out / "summary.md").read_text()
    section = text.split("## Step-by-step differences", 1)[1]
    assert "means the variant computes exactly what the reference does" in section
    assert "| model.activation | custom_relu | relu" in section and "| never " in section
    landscape = text.split("## Loss landscape", 1)[1]
    assert "the largest rise of the loss above the straight line" in landscape
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in landscape.splitlines()
            if line.startswith("|")]
    assert rows[0] == ["key", "from", "to", "seed", "loss α=0", "loss α=½", "loss α=1",
                       "barrier"]
    assert rows[2] == ["train.zero_grad", "true", "false", "0", "1", "2.5", "2", "0.25"]
    assert "a__to__b" not in landscape  # the file names stay in pairs.parquet
    written = pd.read_parquet(out / "diff.parquet")
    pd.testing.assert_frame_equal(written.reset_index(drop=True),
                                  diffs.reset_index(drop=True), check_dtype=False)
    png = (out / "diff_check_diff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] > 500
    events = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert "summary/diff_check_diff" in events.Tags()["images"]
    for label, band in diff_bands(diffs).items():
        tag = label.replace(" − ", "-vs-").replace(": ", "=").replace(" ", "")
        got = {e.step: e.value for e in events.Scalars(f"diff/train_loss/{tag}/mean")}
        assert got == pytest.approx(band["mean"].to_dict(), rel=1e-6, abs=1e-9)
    # a landscape file that does not parse: one line in its section, never a crash
    (tmp_path / "landscape").mkdir()
    (tmp_path / "landscape" / "pairs.parquet").write_bytes(b"PAR1 cut short")
    lines = _landscape_section(tmp_path)
    assert lines[0] == "## Loss landscape" and "does not parse" in lines[-2]


def test_a_config_group_called_variant_is_another_key_not_the_variant_side():
    """A sweep of `variant` and `train.zero_grad` (group choices are columns too): the pairs'
    other key `variant` and the step columns never collide."""
    runs = pd.DataFrame({"run": list("abcd"), "status": ["completed"] * 4, "seed": [0] * 4,
                         "variant": ["none", "frozen_early", "none", "none"],
                         "train.zero_grad": [True, True, False, False]})
    runs = runs.iloc[[0, 1, 2]]
    runs.attrs["swept"] = ["variant", "train.zero_grad"]
    values = {"a": [2.0, 1.5, 1.0], "b": [2.0, 1.4, 1.1], "c": [2.0, 1.5, 0.5]}
    curves = pd.DataFrame([{"run": r, "step": k, "epoch": 0, "name": "train/loss", "value": v}
                           for r, vs in values.items() for k, v in enumerate(vs)])
    diffs = step_differences(runs, curves)
    table = diff_table(first_differences(diffs)).set_index("variant run")
    assert table.loc["b", "value"] == "frozen_early" and table.loc["c", "value"] == "false"
    assert "variant" not in table  # the other key: `none` in every pair, a column of no news
    assert table.loc["b", "first differing step"] == "1" and table.loc["c", "at step"] == "2"
    assert table.loc["b", "max abs. diff"] == "0.1"


def test_the_summary_draws_the_spectrum_where_runs_have_density_rows():
    """The wiring of sweep.spectrum.figure_spectrum: `<study>_spectrum.png` where density rows
    exist (probes/hessian_density/center|weight/<bin>), none without."""
    import matplotlib.pyplot as plt

    from autograd_lab.sweep.summary import _figures

    runs = pd.DataFrame({"run": ["a", "b"], "status": ["completed"] * 2, "seed": [0, 0],
                         "study": ["spec"] * 2, "optim.lr": [0.1, 0.2]})
    runs.attrs["swept"] = ["optim.lr"]
    rows = [{"run": r, "step": k, "epoch": 0, "name": "train/loss", "value": 1.0}
            for r in "ab" for k in range(3)]
    plain = pd.DataFrame(rows)
    assert "spec_spectrum.png" not in dict(_figures(runs, plain, None))
    rows += [{"run": r, "step": k, "epoch": 0, "name": f"probes/hessian_density/{kind}/{b}",
              "value": (b - 2.0) if kind == "center" else w}
             for r in "ab" for k in (0, 2) for b, w in enumerate([0.1, 0.2, 0.4, 0.2, 0.1])
             for kind in ("center", "weight")]
    figures = dict(_figures(runs, pd.DataFrame(rows), None))
    assert "spec_spectrum.png" in figures
    for fig in figures.values():
        plt.close(fig)
