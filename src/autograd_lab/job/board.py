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

from autograd_lab.config.keys import GROUPS, is_result_key
from autograd_lab.config.schema import CHECKS
from autograd_lab.job.rundir import final_metrics

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

    check = CHECKS.get(key)
    return check is None or "integer" in check[1]


def whole_run_metrics(recorder, extra: dict) -> dict:
    """The whole-run HParams metrics (tag -> value) this run has."""
    final = final_metrics(recorder.frame())
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
           sharpness: bool = False, noise_scale: bool = False, spectrum: bool = False) -> dict:
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
    if spectrum:
        second_order["Hessian trace per layer group (Hutchinson)"] = [
            "Multiline", [r"^probes/hessian_trace/"]]
        second_order["Hessian trace standard errors"] = [
            "Multiline", [r"^probes/hessian_trace_se/"]]
        second_order["Hessian top-k eigenvalues (Lanczos)"] = [
            "Multiline", [r"^probes/hessian_top/"]]
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
    """write_layout's Summary proto (the custom_scalars plugin's layout).

    Written here, not by torch's add_custom_scalars / summary.custom_scalars: the `summary` run
    (sweep/board.py) writes this proto without importing torch (summarize stays torch-free), and
    its margin charts hold a series per tuple, where torch's take exactly three tags.
    TensorBoard's own custom_scalar.summary.pb needs TensorFlow."""
    from tensorboard.compat.proto.summary_pb2 import Summary
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
    return Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor,
                                        metadata=metadata.create_summary_metadata())])


# ---------------------------------------------------------------- the summary run
def band_tag(metric: str, stat: str) -> str:
    return f"seed_bands/{metric}/{stat}"
