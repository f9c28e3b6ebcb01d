"""The TensorBoard `summary` run of a sweep: seed bands per group (mean and min/max) and the
sweep's figures, written as event files directly (the protobuf records and their masked
CRC-32C) because thousands of runs must summarise in seconds."""

from __future__ import annotations

import math
from pathlib import Path

from autograd_lab.config.keys import path_safe
from autograd_lab.disk.files import atomic_write_bytes
from autograd_lab.disk.lock import foreign
from autograd_lab.job.board import BAND_METRICS, BANDS, band_tag, layout_summary
from autograd_lab.sweep.figures import group_curves
from autograd_lab.text import as_typed


def band_frames(runs, curves, by: list[str]) -> dict:
    """{group label: {metric: frame indexed by step with mean, min, max, n}} over the runs of
    each group (the runs that differ only in seed), completed or diverged runs only. The
    label is the group's keys as `key=value,...` ("all runs" when only the seed differs)."""
    import numpy as np
    import pandas as pd


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

DIFFS = "step-by-step differences: variant − reference of the same seed (mean, min-max)"


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


def band_events(metrics: dict, log_metrics: set) -> _Events:
    """One group's seed-band run: one event a step, every band value of that step in it."""
    events = _Events()
    at_step = band_values(metrics, log_metrics)
    for step in sorted(at_step):
        events.add_serialized_summary(b"".join(at_step[step]), step)
    return events


def band_values(metrics: dict, log_metrics: set, tag=band_tag) -> dict:
    """{step: [serialised Summary.Value]} of bands ({metric: frame of mean, min, max by step}),
    tagged `tag(metric, stat)`. The Summary protos are serialised here directly (Summary{repeated
    Value value = 1}, Value{tag = 1, simple_value = 2}: protobuf's wire format, what
    Summary(...).SerializeToString() gives): hundreds of thousands of protobuf objects would
    take most of a summary's time. test_summary_scale reads them back with EventAccumulator."""
    import struct

    at_step: dict = {}  # step -> [serialised Summary.Value, ...]
    for metric, frame in metrics.items():
        for stat in ("mean", "min", "max"):
            prefix = _scalar_value_prefix(tag(metric, stat))
            log_prefix = _scalar_value_prefix(tag(f"{metric}/log10", stat))
            for step, value in zip(frame.index.tolist(), frame[stat].tolist(), strict=True):
                values = at_step.setdefault(int(step), [])
                value_bytes = prefix + struct.pack("<f", value)
                values.append(b"\x0a" + _varint(len(value_bytes)) + value_bytes)
                if metric in log_metrics and value > 0:
                    value_bytes = log_prefix + struct.pack("<f", math.log10(value))
                    values.append(b"\x0a" + _varint(len(value_bytes)) + value_bytes)
    return at_step


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


def write_summary_run(folder: Path, runs, curves, by: list[str], pngs=(), diffs=None) -> None:
    """folder (a sweep's summary/) as TensorBoard runs: `summary` (the layout and the summary
    PNGs as images) and one `summary/<group>` run per group of several seeds, holding the
    per-step mean, min and max over the seeds (`seed_bands/<metric>/mean|min|max`):
    TensorBoard colours a chart's lines by run, so each group gets its own colour and name. A
    group of one run has no band (its run is the line). Each run's events file is written whole
    and renamed into place, so a kill leaves the old summary run or the new one; the group
    runs of an earlier summary that this one has not are removed after. `diffs`: ({step:
    [serialised Summary.Value]}, {chart: ...}) of sweep.diff.tensorboard_diffs, in `summary`."""
    import shutil

    import numpy as np
    import pandas as pd


    folder = Path(folder)
    keys = [k for k in by if k != "seed"]
    done = runs[runs.status.isin(["completed", "diverged"])]
    size = done.groupby([done[k].map(as_typed) for k in keys])["run"].transform("size") if keys \
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
            batch[path_safe(label)] = band_events(bands[label], log_metrics)
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
    diff_values, diff_charts = diffs or ({}, {})
    events.add_summary(layout_summary({BANDS: charts, **({DIFFS: diff_charts} if diff_charts
                                                         else {})}))
    for png in pngs:
        events.add_summary(_png_summary(f"summary/{Path(png).stem}", Path(png).read_bytes()))
    for step in sorted(diff_values):
        events.add_serialized_summary(b"".join(diff_values[step]), step)

    atomic_write_bytes(folder / EVENTS, events.data())  # the `summary` run, replaced whole
    for old in folder.glob("events.out.tfevents.*"):  # an earlier summary's, other names
        if old.name != EVENTS:
            old.unlink(missing_ok=True)
    for old in folder.iterdir():  # group runs of an earlier summary (other groups, one seed)
        if old.is_dir() and not old.is_symlink() and old.name not in written and \
                any(old.glob("events.out.tfevents.*")) and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
