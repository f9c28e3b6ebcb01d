"""Per-job memory and time figures (memory.MemoryFigures, RunRecorder.seconds_per_step): exact
byte counts that do not depend on what ran before in the process, checked against counts made
here by hand, and a time per step that leaves the warm-up out."""

from __future__ import annotations

import time

import lightning as L
import pytest

TINY = ["data.train_size=32", "data.test_size=32", "trainer.max_steps=1",
        "trainer.limit_val_batches=1", "probes=off"]
FREEZE = ["none", "frozen_backbone", "frozen_early"]


def test_freeze_study_figures_do_not_depend_on_the_order_jobs_ran_in(train_run):
    """freeze_study's three ResNet18 variants in one order, then in the reverse order, in this
    one process: every figure is identical (peak RSS, which only grows, would not be)."""
    first = {v: train_run("model=resnet18", f"variant={v}", *TINY)[0]["memory"] for v in FREEZE}
    again = {v: train_run("model=resnet18", f"variant={v}", *TINY)[0]["memory"]
             for v in reversed(FREEZE)}
    assert first == again
    none, backbone = first["none"], first["frozen_backbone"]
    assert set(none) == {"param_bytes", "trainable_param_bytes", "grad_bytes",
                         "optimizer_state_bytes", "saved_for_backward_bytes", "val_saved_bytes"}
    for key in ("grad_bytes", "optimizer_state_bytes", "saved_for_backward_bytes"):
        assert backbone[key] < first["frozen_early"][key] < none[key], key
    # the head alone: fc's weight and bias (512 x 10 + 10 floats), momentum buffers the same
    assert backbone["grad_bytes"] == backbone["optimizer_state_bytes"] == (512 * 10 + 10) * 4
    assert none["grad_bytes"] == none["param_bytes"] == 11_181_642 * 4  # ResNet18, 10 classes


def test_smallnet_saved_for_backward_bytes_equal_a_count_by_hand(train_run):
    """SmallNet at batch 32: conv(3->3, 5x5) -> ReLU -> MaxPool(2) -> flatten -> Linear(588, 10)
    -> cross_entropy. What backward keeps, storage by storage (parameters and the resident data
    set left out; the ReLU output that MaxPool saves again counts once)."""
    record, _ = train_run(*TINY)
    b = 32
    by_hand = {
        "conv input (the batch, gathered from the data set)": b * 3 * 32 * 32 * 4,
        "ReLU output (ReluBackward0; MaxPool's input is the same storage)": b * 3 * 28 * 28 * 4,
        "MaxPool indices (int64)": b * 3 * 14 * 14 * 8,
        "Linear input (AddmmBackward0's mat1, the flattened pool output)": b * 588 * 4,
        "log_softmax output (LogSoftmaxBackward0)": b * 10 * 4,
        "labels (NllLossBackward0's target, gathered)": b * 8,
        "NllLossBackward0's total_weight (one float)": 4,
    }
    assert record["memory"]["saved_for_backward_bytes"] == sum(by_hand.values()) == 921_604
    assert record["memory"]["param_bytes"] == (3 * 3 * 5 * 5 + 3 + 588 * 10 + 10) * 4


@pytest.mark.parametrize("mode, graph", [("inference", False), ("no_grad", False),
                                         ("enabled", True)])
def test_validation_graph_bytes_follow_the_grad_mode(train_run, mode, graph):
    record, _ = train_run(f"eval.grad_mode={mode}", *TINY)
    val = record["memory"]["val_saved_bytes"]
    if graph:  # the same graph as training's, minus the labels (a slice of the resident set)
        assert val == record["memory"]["saved_for_backward_bytes"] - 32 * 8
    else:
        assert val == 0


class _Slow(L.Callback):
    """Sleeps 0.3 s in each of the first two steps (a warm-up) and 20 ms in every later one."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(0.3 if trainer.global_step <= 2 else 0.02)


def test_seconds_per_step_is_the_median_after_the_warm_up(train_run):
    record, _ = train_run("data.train_size=640", "trainer.max_epochs=1", "probes=off",
                          callbacks=[_Slow()])
    assert 0.02 <= record["seconds_per_step"] < 0.1  # the 0.3 s warm-up steps left out
    assert record["seconds_per_step_mean"] > record["seconds_per_step"]
    assert record["final"]["steps"] == 20
