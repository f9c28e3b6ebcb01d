"""The profiler: Chrome traces, op tables consistent with them, Text tab, an unchanged curve."""

from __future__ import annotations

import json

import pandas as pd
from conftest import cli, in_process, losses

PROFILE = ("profiler=torch", "profiler.wait=1", "profiler.warmup=1", "profiler.active=3")


def test_traces_tables_and_text_tab(train_run):
    record, run_dir = train_run(*PROFILE, "model.activation=custom_relu")
    assert record["status"] == "completed"
    traces = list((run_dir / "profiler").glob("*.pt.trace.json"))
    assert len(traces) == 1 and record["profiler"]["trace_files"] == [f"profiler/{traces[0].name}"]
    events = json.loads(traces[0].read_text())["traceEvents"]  # Chrome trace JSON
    names = [e.get("name", "") for e in events]
    assert names.count("aten::convolution") == 3  # one forward conv per profiled step
    assert any("ConvolutionBackward0" in n for n in names)

    ops = pd.read_csv(run_dir / "profile_ops.csv")
    conv = ops[ops.name == "aten::convolution"].iloc[0]
    assert conv.calls == names.count("aten::convolution")  # the table and the trace agree
    trace_us = sum(e["dur"] for e in events if e.get("name") == "aten::convolution")
    assert abs(conv.cpu_total_us - trace_us) <= 0.05 * trace_us
    assert list(ops.self_cpu_us) == sorted(ops.self_cpu_us, reverse=True)

    pairs = pd.read_csv(run_dir / "profile_fwd_bwd.csv")
    paired = set(zip(pairs.forward_op, pairs.backward_node, strict=True))
    assert ("aten::convolution", "ConvolutionBackward0") in paired
    assert ("aten::addmm", "AddmmBackward0") in paired
    assert ("CustomReLUFunction", "CustomReLUFunctionBackward") in paired
    assert set(pairs[pairs.forward_op == "aten::convolution"].calls) == {3}
    assert 0 < pairs.share_of_step.sum() <= 1.0

    breakdown = record["profiler"]["breakdown_ms"]
    assert set(breakdown) == {"forward", "backward", "optimizer", "data", "logging", "other"}
    assert breakdown["forward"] > 0 and breakdown["backward"] > 0 and breakdown["optimizer"] > 0
    assert abs(sum(breakdown.values()) - record["profiler"]["step_ms"]) < 1e-6
    assert record["profiler"]["profiled_steps"] == 3 and record["profiler"]["overhead"] > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("profiler/fwd_bwd/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "ConvolutionBackward0" in text and "CustomReLUFunctionBackward" in text
    assert "aten::convolution" in acc.Tensors("profiler/ops/text_summary")[0] \
        .tensor_proto.string_val[0].decode()


def test_profiling_never_changes_the_curve(train_run):
    _, plain = train_run("seed=2")
    _, profiled = train_run("seed=2", *PROFILE)
    assert losses(plain) == losses(profiled)


def test_a_frozen_backbone_leaves_no_convolution_backward(train_run):
    _, run_dir = train_run(*PROFILE, "train.freeze=[conv.*]")
    pairs = pd.read_csv(run_dir / "profile_fwd_bwd.csv")
    assert "ConvolutionBackward0" not in set(pairs.backward_node)  # autograd skips it
    assert "AddmmBackward0" in set(pairs.backward_node)


def test_profile_command_prints_both_tables(tmp_path, data_root, monkeypatch, capsys):
    """The installed script profiles a run; the seed's single-op mode through the same entry
    point in this process."""
    out = cli("profile", f"data.root={data_root}", "data.train_size=256", "data.test_size=128",
              f"hydra.run.dir={tmp_path / 'p'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ops by self CPU time" in out.stdout and "ConvolutionBackward0" in out.stdout
    assert (tmp_path / "p" / "profile_fwd_bwd.csv").is_file()
    seed = in_process(["profile", "--op", "conv1d", "--iterations", "20", "--backward"],
                      tmp_path, monkeypatch, capsys)
    assert seed.returncode == 0, seed.stderr
    assert "Self CPU time total" in seed.stdout and "aten::conv1d" in seed.stdout
    assert "ConvolutionBackward0" in seed.stdout


def test_the_sweep_summary_compares_step_time_breakdowns(tmp_path, data_root, monkeypatch,
                                                        capsys):
    """`train -m` through its entry point in this process (test_cli runs the real script)."""
    sweep = tmp_path / "sweep"
    out = in_process(["train", "-m", "data=synthetic", f"data.root={data_root}",
                      "data.train_size=256", "data.test_size=128", "trainer.max_epochs=1",
                      *PROFILE, "variant=none,frozen_backbone", f"hydra.sweep.dir={sweep}"],
                     tmp_path, monkeypatch, capsys)
    assert out.returncode == 0, out.stderr
    runs = pd.read_csv(sweep / "summary" / "runs.csv")
    records = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/run.json")}
    for _, row in runs.iterrows():
        expected = records[row.run]["profiler"]["breakdown_ms"]["backward"]
        assert row["profiler.breakdown_ms.backward"] == expected
    md = (sweep / "summary" / "summary.md").read_text()
    from autograd_lab.text import fmt_number

    assert "backward ms" in md and "frozen_backbone" in md
    for name, record in records.items():  # one run a variant: its own number, as formatted
        variant = record["choices"]["variant"]
        line = [ln for ln in md.splitlines() if ln.startswith(f"| {variant} ")][-1]  # cost
        assert fmt_number(record["profiler"]["breakdown_ms"]["backward"]) in line, name
