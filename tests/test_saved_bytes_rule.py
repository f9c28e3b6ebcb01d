"""One rule for the bytes the autograd graph keeps alive for backward: `autograd-lab graph` prints
what run.json's `memory.saved_for_backward_bytes` says for the same config, and both are the
README's hand count (SmallNet, batch 32, a shuffled batch: a gather, so its labels count).

The hand count, tensor by tensor (float32 4 bytes, int64 8):
  conv input 32x3x32x32x4 = 393,216; ReLU output 32x3x28x28x4 = 301,056; max-pool indices
  32x3x14x14x8 = 150,528; Linear input (the pool output, flattened) 32x588x4 = 75,264;
  log-softmax output 32x10x4 = 1,280; the labels 32x8 = 256; NLL's total weight, one float, 4.
With train.detach_at=pool, backward stops at the pool's output: only the last four are unpacked.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import in_process

from autograd_lab.config.compose import compose
from autograd_lab.train import run

CONV_IN, RELU_OUT, POOL_IDX, FC_IN, LOG_SOFTMAX, LABELS, TOTAL_WEIGHT = (
    32 * 3 * 32 * 32 * 4, 32 * 3 * 28 * 28 * 4, 32 * 3 * 14 * 14 * 8, 32 * 588 * 4, 32 * 10 * 4,
    32 * 8, 4)
HEAD = FC_IN + LOG_SOFTMAX + LABELS + TOTAL_WEIGHT
SMALL = ["data=synthetic", "data.train_size=64", "data.test_size=32", "model=smallnet"]


@pytest.mark.parametrize(("variant", "expected"), [
    ([], CONV_IN + RELU_OUT + POOL_IDX + HEAD),
    (["train.detach_at=pool"], HEAD),
])
def test_graph_prints_what_run_json_records(variant, expected, tmp_path, monkeypatch, capsys):
    assert CONV_IN + RELU_OUT + POOL_IDX + HEAD == 921_604  # the README's figure
    data = f"data.root={tmp_path / 'data'}"
    out = in_process(["graph", *SMALL, data, *variant, "--out", str(tmp_path / "g"), "--format",
                      "dot"], tmp_path, monkeypatch, capsys)  # the console script's own main
    assert out.returncode == 0, out.stderr
    printed = re.search(r"saved for backward: (\d+) bytes .* saved_tensors_hooks count (\d+) "
                        r"bytes: agree", out.stdout)
    assert printed, out.stdout

    # the same config trained (in-process: the CLI's train path is tested elsewhere)
    run(compose([*SMALL, data, *variant, "trainer.max_steps=1", "probes=off", "threads=1",
                 "trainer.progress_bar=false"]), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    recorded = record["memory"]["saved_for_backward_bytes"]

    assert int(printed.group(1)) == int(printed.group(2)) == recorded == expected
