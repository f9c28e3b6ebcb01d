"""torch.profiler around training: trace files, op tables, and what TensorBoard shows of them.

`profiler=torch` wraps training in `torch.profiler.profile` with a wait/warmup/active schedule.
Each finished cycle is written by `tensorboard_trace_handler` into the run's `profiler/` folder
(Chrome trace JSON: open it offline in Chromium's built-in chrome://tracing, or in Perfetto,
ui.perfetto.dev; no TensorBoard plugin needed). In TensorBoard, through the run's recorder:

  profiler/phase_ms/<phase>   per profiled step: forward, backward, optimizer, data, logging and
                              other (what no phase covers), ms; profiler/step_ms the whole step
  profiler/op_self_ms/<op>    per profiling cycle: the cycle's top ops by self CPU time, ms per
                              step (profiler/op_self_cuda_ms/<op> by self CUDA time on a GPU)
  Text tab                    profiler/ops, profiler/fwd_bwd (the tables below) and
                              profiler/traces (this attempt's trace files, how to open them)

At the end of the run:

  profile_ops.csv      the seed's table: key averages by self CPU time (+ device columns on GPU),
                       also in TensorBoard's Text tab (`profiler/ops`)
  profile_fwd_bwd.csv  each forward op paired with the backward node autograd made for it
                       (aten::convolution <-> ConvolutionBackward0), matched by the autograd
                       sequence number the profiler records on both; also in the Text tab
  run.json             `profiler`: per-step breakdown (forward, backward, optimizer, data,
                       logging, other) in ms, and the profiler's own overhead on its steps

The phases are marked with `record_function` ranges only while profiling (module.phase).
"""

from __future__ import annotations

import statistics
import time
import warnings
from bisect import bisect_right
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from torch.autograd import DeviceType

from autograd_lab.disk.files import write_csv

PHASES = ("forward", "backward", "optimizer", "data", "logging")

TOP_OPS = 8  # ops per profiling cycle shown as scalars

_NOT_OPS = ("ProfilerStep", "autograd_lab::")  # ranges, not ops: the phases show them


def ops_table(averages) -> pandas.DataFrame:  # noqa: F821
    """The seed's key_averages table as a frame, by self CPU time."""
    import pandas as pd

    rows = []
    for e in averages:
        row = {"name": e.key, "calls": e.count, "self_cpu_us": e.self_cpu_time_total,
               "cpu_total_us": e.cpu_time_total, "cpu_memory_bytes": e.cpu_memory_usage}
        if torch.cuda.is_available():
            row["self_device_us"] = getattr(e, "self_device_time_total", 0.0)
            row["device_total_us"] = getattr(e, "device_time_total", 0.0)
            row["runs_on"] = "host" if _on_host(e) else "device"  # an op, or one of its kernels
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values("self_cpu_us", ascending=False, ignore_index=True)


def fwd_bwd_table(events, step_total_us: float | None = None) -> pandas.DataFrame:  # noqa: F821
    """Pair every forward op with its backward node through the autograd sequence number.

    For one sequence number the profiler shows the forward ops that recorded the node (outermost
    first: aten::conv2d, aten::convolution) and, in backward, `autograd::engine::
    evaluate_function: <Node>` around `<Node>`. The last forward op with the number made the node
    and names the pair; its time and the evaluate_function event's give the two times.
    """
    import pandas as pd

    by_seq: dict[int, list] = defaultdict(list)
    for e in events:
        if e.sequence_nr >= 0:
            by_seq[e.sequence_nr].append(e)
    pairs: dict[tuple[str, str], dict] = {}
    for group in by_seq.values():
        fwd = [e for e in group if not e.name.startswith("autograd::engine")
               and "Backward" not in e.name]
        bwd = [e for e in group if e.name.startswith("autograd::engine::evaluate_function")]
        if not fwd or not bwd:
            continue
        for b in bwd:
            key = (fwd[-1].name, b.name.split(": ", 1)[-1])
            row = pairs.setdefault(key, {"forward_op": key[0], "backward_node": key[1],
                                         "calls": 0, "forward_us": 0.0, "backward_us": 0.0})
            row["calls"] += 1
            # the op that made the node is the last one stamped with its number (ops that make
            # no node, e.g. under a frozen layer, share the number of the next one that does)
            row["forward_us"] += fwd[-1].cpu_time_total
            row["backward_us"] += b.cpu_time_total
    frame = pd.DataFrame(list(pairs.values()),
                         columns=["forward_op", "backward_node", "calls", "forward_us",
                                  "backward_us"])
    frame["backward_over_forward"] = frame.backward_us / frame.forward_us.where(
        frame.forward_us > 0)
    if step_total_us:
        frame["share_of_step"] = (frame.forward_us + frame.backward_us) / step_total_us
    return frame.sort_values("backward_us", ascending=False, ignore_index=True)


def key_averages(events) -> list:
    """`prof.key_averages()` for a part of a cycle's events (EventList's own needs the tree the
    profiler built for all of them)."""
    from torch.autograd.profiler_util import FunctionEventAvg

    stats: dict = defaultdict(FunctionEventAvg)
    for e in events:
        stats[e.key].add(e)
    return list(stats.values())


def _on_host(e) -> bool:
    """An event of the host's timeline (on a GPU, every range also has a device-side copy)."""
    return getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU


def step_events(events) -> list:
    """The profiler's step ranges (`ProfilerStep*`) on the host, in time order."""
    return sorted((e for e in events if e.name.startswith("ProfilerStep") and _on_host(e)),
                  key=lambda e: e.time_range.start)


def step_phases(events) -> list[dict[str, float]]:
    """ms per phase of each profiled step, in time order: the `autograd_lab::<phase>` ranges that
    start inside the step's range, summed; `step` the step's whole time and `other` what no
    phase covers."""
    steps = step_events(events)
    starts = [e.time_range.start for e in steps]
    out = [{**dict.fromkeys(PHASES, 0.0), "step": e.cpu_time_total / 1000} for e in steps]
    for e in events:
        if not e.name.startswith("autograd_lab::") or not _on_host(e):
            continue
        i = bisect_right(starts, e.time_range.start) - 1
        phase = e.name.split("::", 1)[1]
        if i >= 0 and e.time_range.start < steps[i].time_range.end and phase in PHASES:
            out[i][phase] += e.cpu_time_total / 1000
    for v in out:
        v["other"] = max(v["step"] - sum(v[p] for p in PHASES), 0.0)
    return out


def top_ops(ops, steps: int, column: str = "self_cpu_us", n: int = TOP_OPS) -> dict[str, float]:
    """The `n` ops with the most self time in `column` of a cycle's table, in ms per step (ops,
    not the kernels they launch: an op's self device time is its kernels')."""
    ops = ops[~ops.name.str.startswith(_NOT_OPS)]
    if "runs_on" in ops:
        ops = ops[ops.runs_on == "host"]
    top = ops.sort_values(column, ascending=False).head(n)
    return {name: us / 1000 / max(steps, 1) for name, us in zip(top.name, top[column],
                                                                 strict=True) if us > 0}


def traces_text(files: list[Path], run_dir: Path) -> str:
    """The Text tab's list of trace files, with how to open them offline."""
    lines = ["Chrome trace files of this run's profiled steps:", ""]
    for f in files:
        shown = f.relative_to(run_dir) if f.is_relative_to(run_dir) else f
        size = f.stat().st_size / 2**20 if f.exists() else 0.0
        lines.append(f"- `{shown}` ({size:.1f} MiB): `{f.resolve()}`")
    lines += ["", "Open one offline: in Chromium or Chrome go to `chrome://tracing` (built in, no "
              "network) and Load the file; or in Perfetto (https://ui.perfetto.dev, Open trace "
              "file: the file is read in the browser, not uploaded; the page works offline once "
              "loaded). The TensorBoard profiler plugin (`pip install 'autograd-lab"
              "[profiler-plugin]'`, torch-tb-profiler, deprecated) reads the same folder, but its "
              "page needs a script from the internet and stays blank offline."]
    return "\n".join(lines)


def _markdown(frame, limit: int = 40) -> str:
    return frame.head(limit).to_markdown(index=False, floatfmt=".1f")


class TorchProfiler(L.Callback):
    """Profiles training on a schedule; writes traces, tables and the step breakdown, and per
    cycle the phase and op scalars (drained by the recorder with the run's other values)."""

    def __init__(self, run_dir: Path, recorder, wait: int = 1, warmup: int = 1, active: int = 3,
                 repeat: int = 1, record_shapes: bool = True, profile_memory: bool = True,
                 with_stack: bool = False, trace_dir: Path | None = None):
        self.run_dir, self.recorder = Path(run_dir), recorder
        self.trace_dir = Path(trace_dir) if trace_dir is not None else self.run_dir / "profiler"
        self.trace_files: list[Path] = []  # written by this attempt (never an earlier one's)
        self.pending: list[tuple[int, int, dict[str, float]]] = []  # (step, epoch, values)
        self._epochs: dict[int, int] = {}  # profiler step number -> epoch, while profiling
        recorder.sources.append(self)
        self.cycle = wait + warmup + active
        self.schedule = dict(wait=wait, warmup=warmup, active=active, repeat=repeat)
        self.options = dict(record_shapes=record_shapes, profile_memory=profile_memory,
                            with_stack=with_stack)
        self.prof = None
        self.events: list = []
        self.cycle_ops: list = []  # one key_averages table per profiled cycle
        self.step_seconds: dict[str, list[float]] = {"profiled": [], "plain": []}
        self.summary: dict = {}

    def on_train_start(self, trainer, pl_module):
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        # each cycle's events are kept here as it ends (on_trace_ready): not a loss
        warnings.filterwarnings("ignore", message=".*Profiler clears events at the end of each")
        writer = tensorboard_trace_handler(str(self.trace_dir))
        self._first_step = trainer.global_step  # the profiler's step 0

        def on_trace_ready(prof):
            before = set(self.trace_dir.glob("*.pt.trace.json*"))
            writer(prof)
            self.trace_files += sorted(set(self.trace_dir.glob("*.pt.trace.json*")) - before)
            events, averages = prof.events(), None
            # the profiler's number of the cycle's last step range: step() has moved on to the
            # next one when it calls this, stop() has not
            last = prof.step_num - (0 if self._stopping else 1)
            steps = step_events(events)
            if steps and last >= self._step:  # stopped after the last batch: that range ran
                cut = steps[-1].time_range.start  # no batch (only the end of training)
                events = [e for e in events if e.time_range.start < cut]
                averages, last = key_averages(events), last - 1
            self.events.extend(events)
            self.cycle_ops.append(ops_table(averages or prof.key_averages()))
            self._cycle_scalars(events, self.cycle_ops[-1], last)

        self.prof = profile(activities=activities, schedule=schedule(**self.schedule),
                            on_trace_ready=on_trace_ready, **self.options)
        pl_module.profiling = True
        self._stopping = False
        self.prof.start()
        self._step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.prof is None:
            return
        # the step's wall time, filed by whether the profiler was recording it
        position = self._step % self.cycle
        in_cycle = self._step < self.cycle * max(self.schedule["repeat"], 1) or \
            self.schedule["repeat"] == 0
        wait, warmup = self.schedule["wait"], self.schedule["warmup"]
        recording = in_cycle and position >= wait + warmup
        warming = in_cycle and wait <= position < wait + warmup  # neither plain nor recorded
        if self._step >= 1 and not warming:  # the first step pays one-off costs
            self.step_seconds["profiled" if recording else "plain"].append(
                time.perf_counter() - self._t0)
        self._epochs[self._step] = trainer.current_epoch
        self._step += 1
        self.prof.step()

    def _cycle_scalars(self, events, ops, last: int) -> None:
        """Phase ms of each profiled step of the cycle (the last one is the profiler's step
        `last`), at its global step; the cycle's top ops at its last step."""
        phases = step_phases(events)
        for n, values in zip(range(last - len(phases) + 1, last + 1), phases, strict=True):
            row = {f"profiler/phase_ms/{k}": v for k, v in values.items() if k != "step"}
            row["profiler/step_ms"] = values["step"]
            self.pending.append((self._first_step + n, self._epochs.get(n, 0), row))
        if not phases:
            return
        row = {f"profiler/op_self_ms/{k}": v for k, v in top_ops(ops, len(phases)).items()}
        if "self_device_us" in ops:
            row.update({f"profiler/op_self_cuda_ms/{k}": v
                        for k, v in top_ops(ops, len(phases), "self_device_us").items()})
        self.pending.append((self._first_step + last, self._epochs.get(last, 0), row))

    def drain(self) -> list[tuple[int, int, dict[str, float]]]:
        """For the recorder: the scalars of the cycles finished since the last call."""
        out, self.pending = self.pending, []
        return out

    def on_train_end(self, trainer, pl_module):
        self.stop(pl_module)

    def teardown(self, trainer, pl_module, stage):
        self.stop(pl_module)

    def stop(self, pl_module) -> None:
        if self.prof is None:
            return
        self._stopping = True
        self.prof.stop()
        self.prof = None
        pl_module.profiling = False
        self._write()

    def _write(self) -> None:

        if not self.events:
            self.summary = {"error": "no profiled step completed (run more steps than "
                                     "wait + warmup + active)"}
            return
        steps = step_events(self.events)
        step_total = sum(e.cpu_time_total for e in steps)
        pairs = fwd_bwd_table(self.events, step_total)
        import pandas as pd

        cycles = pd.concat(self.cycle_ops, ignore_index=True)  # every cycle, summed by op
        self.ops = cycles.groupby("name", as_index=False).sum(numeric_only=True) \
            .sort_values("self_cpu_us", ascending=False, ignore_index=True)
        write_csv(self.run_dir / "profile_ops.csv", self.ops)
        write_csv(self.run_dir / "profile_fwd_bwd.csv", pairs)
        if self.recorder.writer is not None:
            self.recorder.writer.add_text("profiler/ops", _markdown(self.ops))
            self.recorder.writer.add_text("profiler/fwd_bwd", _markdown(pairs))
            self.recorder.writer.add_text("profiler/traces",
                                          traces_text(self.trace_files, self.run_dir))
        phase_us = defaultdict(float)
        for e in self.events:
            if e.name.startswith("autograd_lab::") and _on_host(e):
                phase_us[e.name.split("::", 1)[1]] += e.cpu_time_total
        n = max(len(steps), 1)
        breakdown = {p: phase_us[p] / n / 1000 for p in PHASES}
        step_ms = step_total / n / 1000
        breakdown["other"] = max(step_ms - sum(breakdown.values()), 0.0)
        plain, profiled = self.step_seconds["plain"], self.step_seconds["profiled"]
        self.summary = {
            "profiled_steps": len(steps), "step_ms": step_ms, "breakdown_ms": breakdown,
            "overhead": (statistics.median(profiled) / statistics.median(plain)
                         if plain and profiled else None),
            "trace_files": [str(p.relative_to(self.run_dir)) if p.is_relative_to(self.run_dir)
                            else str(p) for p in self.trace_files],
        }


def profile_op(op: str = "conv1d", iterations: int = 1000, backward: bool = False):
    """The seed's standalone case: Conv1d(16, 32, 3) on (B, Cin, Ns) = (32, 16, 100)."""
    if op != "conv1d":
        raise ValueError(op)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randn(32, 16, 100, device=device)
    conv1d = torch.nn.Conv1d(16, 32, kernel_size=3).to(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iterations):
            y = conv1d(x)
            if backward:
                y.sum().backward()
    return prof
