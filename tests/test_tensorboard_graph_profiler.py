"""The backward graph and the profiler inside TensorBoard, read back through a real TensorBoard
server (started by `autograd-lab tensorboard` on 127.0.0.1), and the saved-bytes counting rule,
each against an independent count.

One module-scoped board: the runs are trained in-process first, then one server serves them.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import make_cfg

TINY = ("data.train_size=64", "data.test_size=32", "probes=off")
PROFILED = ("data.train_size=160", "data.test_size=32", "probes=off", "profiler=torch",
            "profiler.wait=0", "profiler.warmup=1", "profiler.active=2", "profiler.repeat=2")
STALE = "stale_host_1.1.pt.trace.json"  # an earlier attempt's trace


class Board:
    def __init__(self, root: Path, url: str):
        self.root, self.url = root, url

    def get(self, path: str, **query):
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(query)}",
                                    timeout=30) as r:
            return r.read().decode()

    def run_name(self, folder: str) -> str:
        """TensorBoard's run name for a run folder (wherever in it the events are)."""
        runs = json.loads(self.get("data/runs"))
        return next(r for r in runs if r.split("/")[0] == folder)

    def graph(self, folder: str) -> dict[str, dict]:
        """The run's graph from the Graphs plugin: node name -> {op, inputs, attrs}."""
        from google.protobuf import text_format
        from tensorboard.compat.proto.graph_pb2 import GraphDef

        gdef = text_format.Parse(self.get("data/plugin/graphs/graph",
                                          run=self.run_name(folder)), GraphDef())
        return {n.name: {"op": n.op, "inputs": list(n.input),
                         "param": n.attr["param"].s.decode() if "param" in n.attr else None,
                         "saved_bytes": n.attr["saved_bytes"].i,
                         "graph_saved_bytes": n.attr["graph_saved_bytes"].i} for n in gdef.node}


@pytest.fixture(scope="module")
def board(tmp_path_factory, data_root):
    import lightning as L

    import autograd_lab.observe.graph_view as graph_module
    from autograd_lab.cli import main as cli_main
    from autograd_lab.train import run

    root = tmp_path_factory.mktemp("board")

    def train(folder, *overrides):
        return run(make_cfg(*overrides, data_root=data_root), root / folder)

    captured = {}

    class Capture(L.Callback):  # the model and the graph writer, for a look after the run
        def on_train_end(self, trainer, pl_module):
            writer = next(c for c in trainer.callbacks
                          if isinstance(c, graph_module.TensorBoardGraph))
            captured["resnet"] = (pl_module.model, writer)

    train("plain", *TINY)
    run(make_cfg(*TINY, "model=resnet18", data_root=data_root), root / "resnet",
        callbacks=[Capture()])
    with pytest.MonkeyPatch.context() as mp:  # the same run with the graph writer switched off
        mp.setattr(graph_module.TensorBoardGraph, "on_train_batch_start", lambda *a: None)
        train("resnet_nograph", *TINY, "model=resnet18")
    train("frozen", *TINY, "model=resnet18", "variant=frozen_backbone")
    train("detached", *TINY, "variant=detach_shallow")
    (root / "profiled" / "profiler").mkdir(parents=True)
    (root / "profiled" / "profiler" / STALE).write_text('{"traceEvents": []}')
    train("profiled", *PROFILED)
    # `autograd-lab graph` for the detached run's config, as a run of its own
    assert cli_main(["graph", f"data.root={data_root}", *TINY, "variant=detach_shallow",
                     "--out", str(root.parent / "cli_graph" / "net"), "--format", "dot",
                     "--tensorboard", str(root / "cli")]) == 0

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "autograd-lab"
    proc = subprocess.Popen([str(exe), "tensorboard", str(root), f"--port={port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("TensorBoard: http://127.0.0.1:"), (line, proc.stderr.read())
        b = Board(root, line.split()[1])
        b.captured = captured
        deadline = time.time() + 60
        while time.time() < deadline:  # TensorBoard loads the runs in the background
            info = json.loads(b.get("data/plugin/graphs/info"))
            if len(info) >= 6:
                break
            time.sleep(0.2)
        yield b
    finally:  # SIGTERM: the command's own handler stops it, whatever SIGINT's disposition
        proc.send_signal(signal.SIGTERM)  # (Ctrl-C itself: test_tensorboard_server.py)
        proc.wait(30)


def _reachable(graph: dict, start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack += graph[name]["inputs"]
    return seen


def _root(graph: dict) -> str:
    """The loss's node: nothing takes it as input."""
    used = {i for n in graph.values() for i in n["inputs"]}
    (root,) = [name for name in graph if name not in used]
    return root


def test_every_run_has_its_backward_graph_grouped_by_module(board):
    info = json.loads(board.get("data/plugin/graphs/info"))
    with_graph = {run.split("/")[0] for run, v in info.items() if v["run_graph"]}
    assert with_graph == {"plain", "resnet", "frozen", "detached", "profiled", "cli"}
    g = board.graph("plain")
    leaves = {n["param"]: name for name, n in g.items() if n["op"] == "AccumulateGrad"}
    assert leaves == {"conv.weight": "conv/weight", "conv.bias": "conv/bias",
                      "fc.weight": "fc/weight", "fc.bias": "fc/bias"}
    assert g["conv/ConvolutionBackward0"]["inputs"] == ["conv/weight", "conv/bias"]
    assert "pool/MaxPool2DWithIndicesBackward0" in g and "fc/AddmmBackward0" in g
    assert _reachable(g, _root(g)) == set(g)  # one graph, from the loss down to every leaf
    root = _root(g)  # the loss node carries the graph's total; the nodes' shares add up to it
    assert g[root]["op"] == "NllLossBackward0"
    assert g[root]["graph_saved_bytes"] == sum(n["saved_bytes"] for n in g.values()) > 0


def test_a_frozen_backbone_has_no_leaf_for_its_parameters(board):
    g = board.graph("frozen")
    record = json.loads((board.root / "frozen" / "run.json").read_text())
    frozen = set(record["params"]["frozen_names"])
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer4.1.bn2.bias"} <= frozen
    leaves = {n["param"] for n in g.values() if n["op"] == "AccumulateGrad"}
    assert leaves == {"fc.weight", "fc.bias"} and not leaves & frozen
    assert all(name.startswith("fc/") or "/" not in name for name in g)  # no backbone node


def test_a_detach_cuts_the_path_to_conv_weight(board):
    plain, detached = board.graph("plain"), board.graph("detached")
    assert "conv/weight" in _reachable(plain, _root(plain))  # the control: reachable without
    reached = _reachable(detached, _root(detached))
    assert reached == set(detached)
    assert not any(name.startswith("conv/") for name in reached)
    assert {n["param"] for n in detached.values() if n["param"]} == {"fc.weight", "fc.bias"}


def test_the_graph_command_writes_the_same_graph_as_the_run(board):
    run, command = board.graph("detached"), board.graph("cli")
    assert {k: (v["op"], v["inputs"]) for k, v in run.items()} == \
        {k: (v["op"], v["inputs"]) for k, v in command.items()}


def test_writing_the_graph_leaves_the_curve_unchanged(board):
    """ResNet18 with and without the graph writer: every loss, and the validation that reads
    the BatchNorm running statistics, bitwise equal."""
    def curve(folder):
        frame = pd.read_parquet(board.root / folder / "metrics.parquet")
        frame = frame[frame.name.isin(["train/loss", "val/loss", "val/acc"])]
        return frame.sort_values(["name", "step"]).reset_index(drop=True)

    with_graph, without = curve("resnet"), curve("resnet_nograph")
    assert len(with_graph) == 4  # two steps and one validation
    pd.testing.assert_frame_equal(with_graph, without, check_exact=True)


def test_the_graph_writer_leaves_no_hook_or_mode_behind(board):
    """The first step's module hooks and TorchFunctionMode are gone after it; the walk and write
    took `seconds` (ResNet18)."""
    model, graph_cb = board.captured["resnet"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch._C._len_torch_function_stack() == 0
    assert graph_cb.seconds is not None and graph_cb.seconds > 0


def _graph_events(run_dir: Path) -> int:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sum(e.HasField("graph_def") for f in run_dir.rglob("events.out.tfevents.*")
               for e in EventFileLoader(str(f)).Load())


def test_a_resumed_run_does_not_write_the_graph_again(tmp_path, data_root):
    import os

    import lightning as L

    from autograd_lab.train import run

    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    cfg = make_cfg("data.train_size=96", "data.test_size=32", "probes=off", data_root=data_root)
    with pytest.raises(SystemExit):
        run(cfg, tmp_path / "run", callbacks=[Stop()])
    assert _graph_events(tmp_path / "run") == 1
    record = run(cfg, tmp_path / "run")
    assert record["status"] == "completed" and record["resumed"]["from_step"] == 1
    assert _graph_events(tmp_path / "run") == 1


def test_saved_bytes_leave_out_the_resident_labels_and_agree_with_hooks():
    """A SmallNet step's graph keeps alive, counted by hand from the shapes: the conv input,
    the ReLU output (also the pool's input), the pool's indices and output (the flattened fc
    input), the log-softmax output and the loss's total weight. The labels are a view of the
    resident label array (alive anyway) and the weights are parameters: neither counts."""
    from autograd_lab.model.networks import SmallNet
    from autograd_lab.observe.graph import saved_bytes_by_hooks, walk

    torch.manual_seed(0)
    model = SmallNet()
    resident_x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    resident_y = torch.randint(0, 10, (64,))
    b = 32
    x, y = resident_x[:b].float().div(255), resident_y[:b]  # y: a view, as sliced batches are
    by_hand = 4 * b * (3 * 32 * 32 + 3 * 28 * 28 + 3 * 14 * 14 + 10) + 8 * b * 3 * 14 * 14 + 4
    loss, backward = saved_bytes_by_hooks(lambda: F.cross_entropy(model(x), y),
                                          exclude=[resident_x, resident_y])
    g = walk(loss, dict(model.named_parameters()), resident=[resident_x, resident_y])
    hooked = backward()
    assert g.saved_bytes == hooked == by_hand
    assert g.total_bytes == by_hand + resident_y.nbytes + model.conv.weight.nbytes + \
        model.fc.weight.nbytes  # what the old rule counted
    nll = next(n for n in g.nodes if n["name"] == "NllLossBackward0")
    assert "(resident data, not counted)" in nll["saved"] and nll["saved_bytes"] == 4 * b * 10 + 4
    # ResNet18: its BatchNorm buffers are saved by backward too, and left out on both sides
    import torchvision

    net = torchvision.models.resnet18(num_classes=10).train()
    buffers = dict(net.named_buffers())
    loss, backward = saved_bytes_by_hooks(lambda: F.cross_entropy(net(x[:2]), y[:2]),
                                          exclude=list(buffers.values()))
    g = walk(loss, dict(net.named_parameters()), buffers)
    assert g.saved_bytes == backward() < g.total_bytes


def test_summary_writer_takes_a_graph_def(tmp_path):
    """write_graph uses torch SummaryWriter's private _get_file_writer(): the graph must come
    back from the event file exactly."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.graph_pb2 import GraphDef
    from torch.utils.tensorboard import SummaryWriter

    from autograd_lab.observe.graph import walk
    from autograd_lab.observe.graph_view import graph_def, write_graph

    w = torch.ones(2, requires_grad=True)
    gdef = graph_def(walk((w * 3).sum(), {"w": w}))
    writer = SummaryWriter(str(tmp_path))
    write_graph(writer, gdef)
    writer.close()
    (events,) = tmp_path.glob("events.out.tfevents.*")
    graphs = [e.graph_def for e in EventFileLoader(str(events)).Load() if e.HasField("graph_def")]
    assert [GraphDef.FromString(g) for g in graphs] == [gdef]
    assert {n.op for n in gdef.node} == {"SumBackward0", "MulBackward0", "AccumulateGrad"}


def _trace_phases(trace: Path) -> dict[int, dict[str, float]]:
    """ms per phase of each ProfilerStep#N in a Chrome trace, summed from its own events."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    steps = {int(e["name"].split("#")[1]): (e["ts"], e["ts"] + e["dur"]) for e in events
             if e["name"].startswith("ProfilerStep#")}
    out = {n: {} for n in steps}
    for e in events:
        if e["name"].startswith("autograd_lab::"):
            n = next(n for n, (a, z) in steps.items() if a <= e["ts"] < z)
            phase = e["name"].split("::")[1]
            out[n][phase] = out[n].get(phase, 0.0) + e["dur"] / 1000
    return out


def test_a_profiled_run_shows_phases_ops_and_traces_in_tensorboard(board):
    run_dir, run = board.root / "profiled", board.run_name("profiled")
    traces = sorted((run_dir / "profiler").glob("*.pt.trace.json"))
    assert STALE not in {t.name for t in traces}  # a fresh start removes an earlier attempt's
    assert len(traces) == 2  # two cycles
    tags = json.loads(board.get("data/plugin/scalars/tags"))[run]

    def points(tag):
        return {p[1]: p[2] for p in json.loads(board.get("data/plugin/scalars/scalars",
                                                         run=run, tag=tag))}

    # steps 1-2 (cycle 1: warmup 0) and 4 (cycle 2: warmup 3; step 5 never ran a batch)
    from_traces = {}
    for t in traces:
        from_traces.update(_trace_phases(t))
    for phase in ("forward", "backward", "optimizer", "data"):
        shown = points(f"profiler/phase_ms/{phase}")
        assert sorted(shown) == [1, 2, 4]
        for step, value in shown.items():  # float32 in TensorBoard
            assert value == pytest.approx(from_traces[step][phase], rel=1e-3, abs=2e-3)
    assert sorted(points("profiler/step_ms")) == [1, 2, 4]
    assert {"profiler/phase_ms/logging", "profiler/phase_ms/other"} <= set(tags)
    ops = {t for t in tags if t.startswith("profiler/op_self_ms/")}
    assert "profiler/op_self_ms/aten::convolution_backward" in ops and 0 < len(ops) <= 16
    for tag in ops:
        assert set(points(tag)) <= {2, 4}  # at each cycle's last step

    text = json.loads(board.get("data/plugin/text/text", run=run,
                                tag="profiler/traces/text_summary"))
    assert len(text) == 1
    html = text[0]["text"]
    assert all(t.name in html for t in traces) and STALE not in html
    assert "chrome://tracing" in html and "ui.perfetto.dev" in html
    record = json.loads((run_dir / "run.json").read_text())
    assert record["profiler"]["trace_files"] == [f"profiler/{t.name}" for t in traces]


def test_the_profiler_plugin_is_an_optional_extra():
    """torch-tb-profiler (deprecated; its page needs the internet) is never required."""
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert not any("tb-profiler" in d for d in project["dependencies"])
    assert project["optional-dependencies"]["profiler-plugin"] == ["torch-tb-profiler"]
