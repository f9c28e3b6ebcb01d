"""summary.md follows its rules, checked against the run records it came from: grouped by the
keys that differ (a group choice, not also the key it sets), n per group, ± only where there is
a spread, plain numbers (powers of ten only where needed), failed runs in their own section
with their error, lines a person can read. The runs are written here, in the run-directory
format, so the test needs no training."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from autograd_lab.sweep.summary import summarize
from autograd_lab.text import fmt_number


def _run(sweep: Path, name: str, variant: str, freeze: list, lr: float, status: str,
         losses: list[float], error: str | None = None) -> dict:
    folder = sweep / name
    folder.mkdir(parents=True)
    record = {"format_version": 1, "status": status, "error": error,
              "config": {"seed": 0, "study": "freeze_study", "optim": {"lr": lr},
                         "data": {"name": "synthetic"},
                         "train": {"freeze": freeze}, "model": {"name": "resnet18"}},
              "choices": {"variant": variant, "data": "synthetic"},
              "final": {"train_loss": losses[-1] if losses else None,
                        "best_train_loss": min(losses) if losses else None,
                        "val_loss": 2.0 if losses else None, "val_acc": 0.25 if losses else None,
                        "steps": len(losses)},
              "seconds_per_step": 0.0123, "images_per_s": 2601.0, "wall_seconds": 12.0,
              "memory": {"grad_bytes": 44_726_568, "saved_for_backward_bytes": 14_588_932},
              "params": {"trainable": 11_181_642, "frozen": 0}}
    (folder / "run.json").write_text(json.dumps(record))
    pd.DataFrame({"step": range(len(losses)), "epoch": [0] * len(losses),
                  "name": ["train/loss"] * len(losses), "value": losses}
                 ).to_parquet(folder / "metrics.parquet")
    return record


def test_summary_md_follows_its_rules(tmp_path):
    sweep = tmp_path / "sweep"
    records = {
        "variant=none": _run(sweep, "variant=none", "none", [], 0.1, "completed",
                             [2.3, 1.1, 0.163]),
        "variant=frozen_backbone": _run(sweep, "variant=frozen_backbone", "frozen_backbone",
                                        ["backbone"], 0.1, "completed", [2.3, 5e6, 1.1e7]),
        "variant=frozen_early": _run(sweep, "variant=frozen_early", "frozen_early",
                                     ["conv1.*"], 0.1, "failed", [],
                                     error="RuntimeError: CUDA out of memory (conv9)"),
    }
    md = (summarize(sweep) / "summary.md").read_text()
    lines = md.splitlines()
    assert max(len(ln) for ln in lines) <= 160
    assert "Grouped by variant." in md  # not also train.freeze, which the variant sets
    assert "train.freeze" not in md and "freeze |" not in md
    results = [ln for ln in lines if ln.startswith("| none ") or ln.startswith("| frozen_")]
    none = next(ln for ln in results if ln.startswith("| none "))
    cells = [c.strip() for c in none.strip("|").split("|")]
    assert cells[:6] == ["none", "1", fmt_number(records["variant=none"]["final"]["train_loss"]),
                         "0.163", "2", "0.25"]  # one run: no "±", plain numbers
    backbone = next(ln for ln in results if ln.startswith("| frozen_backbone "))
    assert "1.1e7" in backbone and "e+" not in md and "±" not in md
    assert fmt_number(1.1e7) == "1.1e7" and fmt_number(0.0001234) == "1.23e-4"
    assert fmt_number(6842.2) == "6,842" and fmt_number(2.1867) == "2.19"
    # the failed run: its own section, with its error, and in no table above it
    section = md.split("## Runs that did not complete")[1]
    assert "variant=frozen_early" in section and "CUDA out of memory (conv9)" in section
    assert not any(ln.startswith("| frozen_early ") for ln in md.split("## Runs that")[0]
                   .splitlines())
    assert "nan" not in md.lower()
    # time and memory per job: MiB from the exact bytes, seconds per step as recorded
    cost = md.split("## Time and memory per job")[1].split("##")[0]
    assert fmt_number(44_726_568 / 2**20) in cost and "0.0123" in cost


def test_loss_figure_marks_each_point_of_a_short_curve_and_not_of_a_long_one(tmp_path):
    """A 3-step curve drawn as a bare line is hard to read (where are the steps?); a 40-step
    one with markers is noise. The figure a notebook gets is the one summarize writes."""
    from autograd_lab.sweep.summary import plot_study

    sweep = tmp_path / "sweep"
    _run(sweep, "variant=none", "none", [], 0.1, "completed", [2.3, 1.1, 0.163])
    _run(sweep, "variant=frozen_backbone", "frozen_backbone", ["backbone"], 0.1, "completed",
         [2.3 - 0.05 * i for i in range(40)])
    loss = next(f for f in plot_study(sweep) if "train/loss" in f.axes[0].get_title())
    lines = {ln.get_label(): ln for ln in loss.axes[0].get_lines()}
    by_points = {len(ln.get_xdata()): ln.get_marker() for ln in lines.values()}
    assert by_points == {3: ".", 40: "None"}, by_points


def test_an_overflowed_value_prints_as_inf():
    """A run can end with a finite training loss and an infinite validation loss (optim.lr=17
    without zero_grad on the tests' data): the end line says inf, where it raised ValueError."""
    from autograd_lab.job.messages import val_text
    from autograd_lab.text import fmt_number

    assert fmt_number(float("inf")) == "inf" and fmt_number(float("-inf")) == "-inf"
    assert val_text({"val_loss": float("inf"), "val_acc": 0.1}) == "val loss inf, val acc 0.1"
