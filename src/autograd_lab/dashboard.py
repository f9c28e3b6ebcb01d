"""TensorBoard as the researcher's dashboard: HParams that compare a sweep, a Custom Scalars
layout that puts the curves first, and the `summary` run with seed bands.

Each run writes, into its own TensorBoard run (its directory):
- HParams (TensorBoard's hparams plugin protos, written directly: torch's `add_hparams` makes a
  sub-run per call and stores booleans as numbers): the keys that identify the run (its config
  group choices, the keys typed or swept on the command line) with their real types (an
  integer as text: TensorBoard prints numbers with 5 significant digits, seed 0 as 0.0000), and
  metrics read from the run's own scalars: `train/loss`, `val/loss`, `val/acc` (their last
  values: the final ones) and the whole-run values under `whole_run/` (best loss, images/s,
  seconds per step, memory, parameter counts, steps). Those sort after `train/` and `val/` in
  Scalars and Time Series, so single dots never fill the top of either.
- a Custom Scalars layout (`custom_scalars` plugin): the curves first, then one chart per probe
  statistic with every layer group in it, then time and the profiler.

When a sweep ends (and on `autograd-lab summarize DIR`) `write_summary_run` writes DIR/summary/
as a TensorBoard run of its own: for each group of several runs that differ only in `seed`,
the per-step mean of train/loss, val/loss and val/acc with its min and max over the seeds, as
Custom Scalars margin charts (TensorBoard itself cannot band across runs), and the summary
PNGs as images. Those events files are built in memory (thousands of groups: seconds) and
renamed into place whole.
"""

from __future__ import annotations

import math
from pathlib import Path

# HParams metrics: (tag, what the column shows). The first three are the run's own curves:
# HParams shows a tag's last value, which is the final one.
HPARAM_METRICS = (
    ("train/loss", "final train loss"),
    ("val/loss", "final val loss"),
    ("val/acc", "final val accuracy"),
    ("whole_run/best_train_loss", "best train loss"),
    ("whole_run/images_per_s", "images/s"),
    ("whole_run/seconds_per_step", "seconds per step"),
    ("whole_run/saved_for_backward_bytes", "bytes saved for backward"),
    ("whole_run/grad_bytes", "gradient bytes"),
    ("whole_run/optimizer_state_bytes", "optimizer state bytes"),
    ("whole_run/param_bytes", "parameter bytes"),
    ("whole_run/val_saved_bytes", "validation graph bytes"),
    ("whole_run/trainable_params", "trainable parameters"),
    ("whole_run/frozen_params", "frozen parameters"),
    ("whole_run/steps", "optimizer steps"),
    ("whole_run/val_step", "step of the final val loss"),  # = steps unless it validated earlier
)

# The config groups whose choice names a run (HParams columns even when nobody typed them).
GROUPS = ("model", "data", "optim", "variant", "experiment", "probes", "profiler", "scheduler")

BANDS = "seed bands: mean and min-max over seeds (the summary run, written when a sweep ends)"
BAND_METRICS = ("train/loss", "val/loss", "val/acc")


def _file_writer(writer):
    # torch's SummaryWriter has no public way to add a raw Summary proto; _get_file_writer()
    # is what its own add_custom_scalars/add_hparams use. test_dashboard reads the result back
    # through a real TensorBoard server, so a change in torch fails there.
    return writer._get_file_writer()


def _hparam_type(value):
    """An HParams column's type. An integer (a seed, a size) is a string column: TensorBoard's
    HParams table prints every number with 5 significant digits (seed 0 as 0.0000), and a
    string as it is."""
    from tensorboard.plugins.hparams import api_pb2

    if isinstance(value, bool):
        return api_pb2.DATA_TYPE_BOOL
    if isinstance(value, float):
        return api_pb2.DATA_TYPE_FLOAT64
    return api_pb2.DATA_TYPE_STRING


def identifying_hparams(cfg, choices: dict, overrides: list[str]) -> dict:
    """What names a run: its config-group choices (model, data, optim, variant, experiment,
    probes, profiler, scheduler) and every key typed or swept on the command line, with its
    real type (lists as strings); keys that do not change results are left out. Outside Hydra
    (called from Python) the groups are read from the config's own names."""
    from omegaconf import OmegaConf

    from .config import is_result_key

    out: dict = {}
    if choices:
        for group in GROUPS:
            if choices.get(group) is not None:
                out[group] = str(choices[group])
    else:
        for group, key in (("model", "model.name"), ("data", "data.name"),
                           ("optim", "optim.name"), ("experiment", "study"),
                           ("probes", "probes.mode"), ("profiler", "profiler.name"),
                           ("scheduler", "scheduler.name")):
            value = OmegaConf.select(cfg, key, default=None)
            if value is not None:
                out[group] = str(value)
    for text in overrides:
        key = text.split("=", 1)[0].lstrip("+~")
        if "=" not in text or key.startswith("hydra") or not is_result_key(key):
            continue
        if key in GROUPS or key in (choices or {}):
            out[key] = str((choices or {}).get(key, text.split("=", 1)[1]))
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if value is None:
            value = "null"
        if isinstance(value, int) and not isinstance(value, bool) and not _integer_key(key):
            value = float(value)  # `optim.lr=1` in a sweep with 0.5: one number column
        out[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def _integer_key(key: str) -> bool:
    """Whether the schema's checks (config.CHECKS) take `key` as an integer (seed, sizes), or
    do not know it; a number key (optim.lr) given as `1` is a number, not an integer."""
    from .config import CHECKS

    check = CHECKS.get(key)
    return check is None or "integer" in check[1]


def whole_run_metrics(recorder, extra: dict) -> dict:
    """The whole-run HParams metrics (tag -> value) this run has."""
    final = recorder.final_metrics()
    steps = final["steps"]
    values = {"whole_run/best_train_loss": final["best_train_loss"],
              "whole_run/images_per_s": recorder.images_per_s or None,
              "whole_run/seconds_per_step": recorder.seconds_per_step,
              "whole_run/steps": steps,
              "whole_run/val_step": final["val_step"],  # where the final val/loss was measured
              **{f"whole_run/{k}": v for k, v in recorder.memory.items()},
              **{f"whole_run/{k}": v for k, v in extra.items()}}
    return {k: float(v) for k, v in values.items()
            if v is not None and math.isfinite(float(v))}


def _hparams_summary(tag: str, **plugin_data):
    """A Summary holding HParams plugin data (what tensorboard.plugins.hparams.summary builds,
    without the TensorFlow it imports)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    meta = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(**plugin_data))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def write_hparams(writer, hparams: dict, metrics: dict, step: int, status: str,
                  differs=()) -> None:
    """HParams for one run: the experiment (columns), the session's hparams, the whole-run
    metric values as scalars at `step`, and the session's end with its status. The keys in
    `differs` (what the sweep varies) are marked so: TensorBoard lists them first, and its
    table shows the first five columns by default."""
    import time

    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    hparams = {**hparams, "status": status}
    infos = [api_pb2.HParamInfo(name=k, type=_hparam_type(v), differs=k in differs)
             for k, v in hparams.items()]
    present = {"train/loss", "val/loss", "val/acc", *metrics}
    metric_infos = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=shown)
                    for tag, shown in HPARAM_METRICS if tag in present]
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for k, v in hparams.items():
        if isinstance(v, bool):  # before numbers: a bool is an int to Python
            start.hparams[k].bool_value = v
        elif isinstance(v, float):  # an int is shown as typed: a string (_hparam_type)
            start.hparams[k].number_value = v
        else:
            start.hparams[k].string_value = str(v)
    end = plugin_data_pb2.SessionEndInfo(
        status=api_pb2.STATUS_SUCCESS if status == "completed" else api_pb2.STATUS_FAILURE,
        end_time_secs=time.time())
    file_writer = _file_writer(writer)
    file_writer.add_summary(_hparams_summary(metadata.EXPERIMENT_TAG, experiment=api_pb2.Experiment(
        hparam_infos=infos, metric_infos=metric_infos, time_created_secs=time.time())))
    file_writer.add_summary(_hparams_summary(metadata.SESSION_START_INFO_TAG,
                                             session_start_info=start))
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)
    file_writer.add_summary(_hparams_summary(metadata.SESSION_END_INFO_TAG,
                                             session_end_info=end))
    writer.flush()


def layout(probe_stats=(), profiler: bool = False, in_sweep: bool = False,
           sharpness: bool = False, noise_scale: bool = False) -> dict:
    """The Custom Scalars layout of a run, as torch's add_custom_scalars takes it: categories in
    order, each {chart title: [kind, [tag regexes]]}."""
    curves = {"train/loss (every optimizer step)": ["Multiline", [r"^train/loss$"]],
              "val/loss": ["Multiline", [r"^val/loss$"]],
              "val/acc": ["Multiline", [r"^val/acc$"]],
              "learning rate": ["Multiline", [r"^lr$"]]}
    out = {}
    if in_sweep:  # the summary run fills it in; here it only fixes the category's place
        out[BANDS] = {}
    out["curves"] = curves
    second_order = {}
    if sharpness:
        second_order["sharpness and the stability limit (2/lr)"] = [
            "Multiline", [r"^probes/(sharpness|stability_limit)$"]]
    if noise_scale:
        second_order["gradient noise scale B_simple"] = ["Multiline",
                                                         [r"^probes/grad_noise_scale$"]]
        second_order["noise scale parts: tr(Sigma), |G|^2"] = ["Multiline", [r"^probes/gns_"]]
    if second_order:
        out["training dynamics"] = second_order
    if probe_stats:
        out["probes (one chart per statistic, every layer group)"] = {
            stat: ["Multiline", [rf"^probes/{stat}(/.*)?$"]] for stat in probe_stats}
    timing = {"validation seconds": ["Multiline", [r"^time/val_seconds$"]]}
    if profiler:
        timing["profiler: ms per phase"] = ["Multiline", [r"^profiler/phase_ms/.*"]]
        timing["profiler: top ops' self time (ms)"] = ["Multiline", [r"^profiler/op_self_ms/.*"]]
    out["time"] = timing
    return out


def write_layout(writer, layout_dict: dict) -> None:
    """A Custom Scalars layout: {category: {chart title: ("Multiline", [tag regexes]) or
    ("Margin", [(value tag, lower tag, upper tag), ...])}}, categories and charts in order; a
    category may be empty (it keeps its place when TensorBoard merges the runs' layouts)."""
    _file_writer(writer).add_summary(layout_summary(layout_dict))


def layout_summary(layout_dict: dict):
    """write_layout's Summary proto (the custom_scalars plugin's layout)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.compat.proto.types_pb2 import DT_STRING
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    proto = layout_pb2.Layout()
    for title, charts in layout_dict.items():
        category = proto.category.add(title=title)
        for name, (kind, tags) in charts.items():
            chart = category.chart.add(title=name)
            if kind == "Multiline":
                chart.multiline.tag.extend(tags)
            else:
                for value, lower, upper in tags:
                    chart.margin.series.add(value=value, lower=lower, upper=upper)
    tensor = TensorProto(dtype=DT_STRING, string_val=[proto.SerializeToString()],
                         tensor_shape=TensorShapeProto())
    meta = SummaryMetadata.FromString(metadata.create_summary_metadata().SerializeToString())
    return Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, metadata=meta,
                                        tensor=tensor)])


# ---------------------------------------------------------------- the summary run
def band_tag(metric: str, stat: str) -> str:
    return f"seed_bands/{metric}/{stat}"


def _text(value) -> str:
    """A key's value as typed on a command line (true, not True)."""
    if isinstance(value, bool) or str(value) in ("True", "False"):
        return str(value).lower()
    return str(value)


def band_frames(runs, curves, by: list[str]) -> dict:
    """{group label: {metric: frame indexed by step with mean, min, max, n}} over the runs of
    each group (the runs that differ only in seed), completed or diverged runs only. The
    label is the group's keys as `key=value,...` ("all runs" when only the seed differs)."""
    import numpy as np
    import pandas as pd

    from .summary import group_curves

    keys = [k for k in by if k != "seed"]
    done = runs[runs.status.isin(["completed", "diverged"])]
    out: dict = {}
    stats_names = ("mean", "min", "max", "n")
    for metric in BAND_METRICS:
        stats = group_curves(done, curves, keys, metric)
        if not stats:
            continue
        steps = stats["mean"].index.to_numpy()
        arrays = [stats[stat].to_numpy(dtype=float) for stat in stats_names]
        for j, column in enumerate(stats["mean"].columns):  # numpy: thousands of groups
            block = np.column_stack([a[:, j] for a in arrays])
            keep = ~np.isnan(block[:, 0])
            if not keep.any():
                continue
            key = stats["keys"][column]
            label = ",".join(f"{k}={v}" for k, v in zip(keys, key, strict=True)) or "all runs"
            out.setdefault(label, {})[metric] = pd.DataFrame(
                block[keep], index=pd.Index(steps[keep], name="step"), columns=stats_names)
    return dict(sorted(out.items()))


# The summary run's event files have one fixed name each: a new summary replaces the file by a
# rename (never half-written), and no earlier summary's events stay beside it.
EVENTS = "events.out.tfevents.0.autograd_lab_summary"


def _crc32c_table():
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): the checksum of TensorBoard's
    records, one entry a byte value."""
    import numpy as np

    table = np.zeros(256, dtype=np.uint32)
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table[byte] = crc
    return table


_CRC_TABLE = None


def masked_crc32c_many(chunks: list[bytes]) -> list[int]:
    """TensorBoard's masked CRC-32C of each chunk, as tensorboard's own masked_crc32c (pure
    Python, byte by byte) computes it, but for many chunks at once: chunks of one length go
    through numpy together, byte position by byte position (a summary's thousands of records
    take milliseconds, not a minute). Long chunks (an image) use tensorboard's function."""
    import numpy as np
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    global _CRC_TABLE
    if _CRC_TABLE is None:
        _CRC_TABLE = _crc32c_table()
    out = [0] * len(chunks)
    by_length: dict = {}
    for i, chunk in enumerate(chunks):
        if len(chunk) > 4096:
            out[i] = masked_crc32c(chunk)
        else:
            by_length.setdefault(len(chunk), []).append(i)
    for length, where in by_length.items():
        data = np.frombuffer(b"".join(chunks[i] for i in where), dtype=np.uint8)
        data = data.reshape(len(where), length)
        crc = np.full(len(where), 0xFFFFFFFF, dtype=np.uint32)
        for column in range(length):
            crc = _CRC_TABLE[(crc ^ data[:, column]) & 0xFF] ^ (crc >> np.uint32(8))
        crc ^= np.uint32(0xFFFFFFFF)
        masked = ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)
        for i, value in zip(where, masked.tolist(), strict=True):
            out[i] = value
    return out


class _Events:
    """A TensorBoard events file built in memory, in the record format every TensorBoard reads
    (tensorboard's RecordWriter: length, its masked CRC-32C, the Event proto, its masked CRC),
    and written in one atomic rename: no writer thread, no partial file."""

    def __init__(self):
        import time

        from tensorboard.compat.proto.event_pb2 import Event

        self._event, self._time = Event, time.time()
        self._bodies = [Event(wall_time=self._time, file_version="brain.Event:2")
                        .SerializeToString()]

    def add_summary(self, summary, step: int = 0) -> None:
        self._bodies.append(self._event(wall_time=self._time, step=int(step), summary=summary)
                            .SerializeToString())

    def add_serialized_summary(self, summary: bytes, step: int) -> None:
        """add_summary for a Summary already serialised: Event{wall_time = 1 (double), step = 2
        (varint), summary = 5 (message)} in protobuf's wire format."""
        import struct

        step_field = b"\x10" + _varint(step) if step else b""  # proto3 leaves out a 0
        self._bodies.append(b"\x09" + struct.pack("<d", self._time) + step_field
                            + b"\x2a" + _varint(len(summary)) + summary)

    def data(self) -> bytes:
        return _Events.data_many([self])[0]

    @staticmethod
    def data_many(files: list) -> list[bytes]:
        """The bytes of several events files, their records checksummed in one batch."""
        import struct

        bodies = [body for events in files for body in events._bodies]
        headers = [struct.pack("<Q", len(body)) for body in bodies]
        crcs = iter(masked_crc32c_many(headers + bodies))
        header_crcs = [next(crcs) for _ in headers]
        records = iter([header + struct.pack("<I", crc) + body + struct.pack("<I", next(crcs))
                        for header, crc, body in zip(headers, header_crcs, bodies,
                                                     strict=True)])
        return [b"".join(next(records) for _ in events._bodies) for events in files]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _scalar_value_prefix(tag: str) -> bytes:
    """The start of a Summary.Value{tag, simple_value} in protobuf's wire format (field 1, the
    tag, a string; then field 2's key, simple_value, a 32-bit float that follows)."""
    raw = tag.encode()
    return b"\x0a" + _varint(len(raw)) + raw + b"\x15"


def _band_events(metrics: dict, log_metrics: set) -> _Events:
    """One group's seed-band run: one event a step, every band value of that step in it. The
    Summary protos are serialised here directly (Summary{repeated Value value = 1}, Value{tag =
    1, simple_value = 2}: protobuf's wire format, what Summary(...).SerializeToString() gives):
    hundreds of thousands of protobuf objects would take most of a summary's time.
    test_summary_scale reads the values back with TensorBoard's EventAccumulator."""
    import struct

    events = _Events()
    at_step: dict = {}  # step -> [serialised Summary.Value, ...]
    for metric, frame in metrics.items():
        for stat in ("mean", "min", "max"):
            prefix = _scalar_value_prefix(band_tag(metric, stat))
            log_prefix = _scalar_value_prefix(band_tag(f"{metric}/log10", stat))
            for step, value in zip(frame.index.tolist(), frame[stat].tolist(), strict=True):
                values = at_step.setdefault(int(step), [])
                value_bytes = prefix + struct.pack("<f", value)
                values.append(b"\x0a" + _varint(len(value_bytes)) + value_bytes)
                if metric in log_metrics and value > 0:
                    value_bytes = log_prefix + struct.pack("<f", math.log10(value))
                    values.append(b"\x0a" + _varint(len(value_bytes)) + value_bytes)
    for step in sorted(at_step):
        events.add_serialized_summary(b"".join(at_step[step]), step)
    return events


def _scalars(values: dict):
    """One Summary holding several scalars (tag -> value) of one step."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=tag, simple_value=float(v))
                          for tag, v in values.items()])


def _png_summary(tag: str, png: bytes):
    """A Summary holding an encoded PNG as an image (its size read from the PNG header: never
    decoded, whatever its size)."""
    import struct

    from tensorboard.compat.proto.summary_pb2 import Summary

    width, height = struct.unpack(">II", png[16:24])
    return Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
        height=height, width=width, colorspace=4 if png[25] == 6 else 3,
        encoded_image_string=png))])


def _put_run(folder: Path, data: bytes, durable: bool = True) -> None:
    """folder/EVENTS holds `data`, replaced whole: the file is written in a hidden `.tmp`
    folder beside, which becomes `folder` by a rename when there is none yet (a folder appears
    complete), or whose file replaces folder/EVENTS by a rename; the events files of earlier
    summaries in it are removed after. A kill leaves the old run or the new one (and at worst a
    `.tmp` folder, removed by the next summary). `durable`: fsync first (the seed-band runs,
    derived from metrics.parquet and written by the thousand, skip it: a kill cannot tear them
    either way)."""
    import os
    import shutil
    import tempfile

    from .lock import foreign

    refused = foreign(folder, folder=True) or foreign(folder / EVENTS)
    if refused is not None:  # a symlink or FIFO where our run goes: never written through
        raise refused
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name[:100]}.",
                                    suffix=".tmp"))
    try:
        with open(staging / EVENTS, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(staging / EVENTS, 0o666 & ~_umask())
        if folder.is_dir():
            os.replace(staging / EVENTS, folder / EVENTS)
            staging.rmdir()
            for old in folder.glob("events.out.tfevents.*"):
                if old.name != EVENTS:
                    old.unlink(missing_ok=True)
        else:
            os.chmod(staging, 0o777 & ~_umask())
            os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_summary_run(folder: Path, runs, curves, by: list[str], pngs=()) -> None:
    """folder (a sweep's summary/) as TensorBoard runs: `summary` (the layout and the summary
    PNGs as images) and one `summary/<group>` run per group of several seeds, holding the
    per-step mean, min and max over the seeds (`seed_bands/<metric>/mean|min|max`):
    TensorBoard colours a chart's lines by run, so each group gets its own colour and name. A
    group of one run has no band (its run is the line). Each run's events file is written whole
    and renamed into place, so a kill leaves the old summary run or the new one; the group
    runs of an earlier summary that this one has not are removed after."""
    import shutil

    import numpy as np
    import pandas as pd

    from .config import path_safe

    folder = Path(folder)
    keys = [k for k in by if k != "seed"]
    done = runs[runs.status.isin(["completed", "diverged"])]
    size = done.groupby([done[k].map(_text) for k in keys])["run"].transform("size") if keys \
        else pd.Series(len(done), index=done.index)
    bands = {label: metrics for label, metrics in band_frames(done[size > 1], curves,
                                                              by).items()
             if any(frame["n"].max() > 1 for frame in metrics.values())}
    # a loss that spans more than two decades (a run that blows up) is shown as log10: Custom
    # Scalars has no log axis, and on a linear one the blow-up flattens every other curve
    log_metrics = set()
    for metric in BAND_METRICS:
        frames = [m[metric] for m in bands.values() if metric in m]
        if not frames or not metric.endswith("loss"):
            continue
        lows = np.concatenate([f["min"].to_numpy() for f in frames])
        highs = np.concatenate([f["max"].to_numpy() for f in frames])
        if (lows > 0).any() and highs.max() > 100 * lows[lows > 0].min():
            log_metrics.add(metric)
    written = set()
    labels = list(bands)
    for first in range(0, len(labels), 100):  # 100 runs' records checksummed together
        batch = {}
        for label in labels[first:first + 100]:
            batch[path_safe(label)] = _band_events(bands[label], log_metrics)
        for name, data in zip(batch, _Events.data_many(list(batch.values())), strict=True):
            _put_run(folder / name, data, durable=False)
            written.add(name)
    seeds = max((int(f.n.max()) for m in bands.values() for f in m.values()), default=0)
    present = [m for m in BAND_METRICS if any(m in metrics for metrics in bands.values())]
    charts = {}
    for metric in present:
        shown = f"{metric}/log10" if metric in log_metrics else metric
        title = (f"{metric}, log10 (it spans decades)" if metric in log_metrics else metric)
        spread = f"mean over seeds, band min-max (up to {seeds} seeds a group)"
        charts[f"{title}: {spread}"] = (
            "Margin", [tuple(band_tag(shown, s) for s in ("mean", "min", "max"))])
    # TensorBoard 2.21's Custom Scalars page lays a category's margin charts out in reverse
    # order (seen in headless Chromium): written reversed, they read train/loss first
    charts = dict(reversed(list(charts.items())))
    events = _Events()
    events.add_summary(layout_summary({BANDS: charts}))
    for png in pngs:
        events.add_summary(_png_summary(f"summary/{Path(png).stem}", Path(png).read_bytes()))
    from .files import atomic_write_bytes

    atomic_write_bytes(folder / EVENTS, events.data())  # the `summary` run, replaced whole
    for old in folder.glob("events.out.tfevents.*"):  # an earlier summary's, other names
        if old.name != EVENTS:
            old.unlink(missing_ok=True)
    for old in folder.iterdir():  # group runs of an earlier summary (other groups, one seed)
        if old.is_dir() and not old.is_symlink() and old.name not in written and \
                any(old.glob("events.out.tfevents.*")) and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
