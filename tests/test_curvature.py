"""The Hessian trace, top eigenvalues and spectral density (observe/curvature.py, the spectrum
probe) against the exact Hessian formed in the test (torch.func.hessian of the loss of the flattened
parameters, float64, of a tiny MLP whose two layers are two groups): Hutchinson within 3 of its
standard errors of the exact traces, per group and whole; Lanczos's top-k equal to eigvalsh's;
the quadrature's first two moments equal to tr(H)/n and tr(H^2)/n within their statistical
tolerance; frozen and detached parameters absent. Then one real run: TensorBoard's scalars and
histogram read back by TensorBoard's own reader, metrics.parquet's density rows, and a resume
that continues the probe's random draws exactly."""

from __future__ import annotations

import math
import re
import signal

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_resume import SendSignal

from autograd_lab.observe.curvature import (
    HessianBlock,
    hutchinson_trace,
    slq_density,
    slq_nodes,
    top_eigenpairs,
)


class Net(nn.Module):
    """Two groups, `a` and `b`; `cut` detaches a's output, so a's parameters never reach the
    loss."""

    def __init__(self, cut: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        self.cut = cut

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h.detach() if self.cut else h)


def _data(n: int = 40):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                              generator=g)


def _batches(x, y, size=16):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def _exact(model, x, y, names) -> torch.Tensor:
    """The Hessian of the mean cross-entropy over the named parameters, formed whole."""
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in names]

    def loss_of(flat):
        chunks = [c.view_as(params[n]) for c, n in zip(flat.split(sizes), names, strict=True)]
        out = torch.func.functional_call(model, {**params, **dict(zip(names, chunks,
                                                                      strict=True))}, (x,))
        return F.cross_entropy(out, y)

    return torch.func.hessian(loss_of)(torch.cat([params[n].detach().reshape(-1)
                                                  for n in names]))


def _blocks(model, names):
    """{group: slice of the flat vector} in the names' order."""
    out, lo = {}, 0
    for n in names:
        size = dict(model.named_parameters())[n].numel()
        g = n.split(".")[0]
        start = out[g].start if g in out else lo
        out[g] = slice(start, lo + size)
        lo += size
    return out


def test_hutchinson_trace_per_group_is_within_three_standard_errors_of_the_exact_one():
    model = Net().double()
    x, y = _data()
    names = [n for n, _ in model.named_parameters()]
    h = _exact(model, x, y, names)
    exact = {g: float(torch.trace(h[s, s])) for g, s in _blocks(model, names).items()}
    exact["all"] = float(torch.trace(h))
    block = HessianBlock(model, _batches(x, y))
    assert block.groups == ["a", "b"] and block.n == h.shape[0] == 43
    mean, se = hutchinson_trace(block, 300, torch.Generator().manual_seed(5))
    for i, g in enumerate(["a", "b", "all"]):
        assert abs(float(mean[i]) - exact[g]) < 3 * float(se[i]), (g, mean[i], se[i], exact[g])
    # the test can tell a group's block from the whole: the tolerance is far below the gaps
    assert 3 * float(se.max()) < min(abs(exact["a"] - exact["all"]), abs(exact["b"] -
                                                                         exact["all"]))
    # the standard error is the sample std / sqrt(m): m = 300 draws of z^T H z, z Rademacher,
    # Var = 2 (|H|_F^2 - sum H_ii^2) for the whole block (Hutchinson 1990)
    var = 2 * (float(h.square().sum()) - float(h.diagonal().square().sum()))
    assert float(se[2]) == pytest.approx(math.sqrt(var / 300), rel=0.25)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched


def test_top_k_lanczos_values_and_vectors_equal_eigh_of_the_exact_hessian():
    model = Net().double()
    x, y = _data()
    names = [n for n, _ in model.named_parameters()]
    values_exact, vectors_exact = torch.linalg.eigh(_exact(model, x, y, names))
    values, vectors = top_eigenpairs(model, _batches(x, y), k=5, iters=43,
                                     generator=torch.Generator().manual_seed(2))
    top = values_exact.flip(0)[:5]
    assert torch.allclose(values, top, rtol=1e-4, atol=0)
    assert list(values) == sorted(values.tolist(), reverse=True)
    assert [sorted(v) for v in vectors] == [sorted(names)] * 5
    assert all(v[n].shape == p.shape for v in vectors for n, p in model.named_parameters())
    for i in range(2):  # the top two are well separated: their Ritz vectors are the eigenvectors
        flat = torch.cat([vectors[i][n].reshape(-1) for n in names])
        assert abs(float(flat @ vectors_exact[:, -1 - i])) == pytest.approx(1, abs=1e-6)
    # fewer iterations than the size: the extreme value converges first
    few, _ = top_eigenpairs(model, _batches(x, y), k=1, iters=25,
                            generator=torch.Generator().manual_seed(2))
    assert float(few[0]) == pytest.approx(float(top[0]), rel=1e-4)


def test_slq_moments_equal_trace_over_n_within_their_statistical_tolerance():
    """Each run's quadrature with m nodes integrates polynomials of degree < 2m exactly, so its
    first two moments are v^T H v and v^T H^2 v for its unit start vector v, uniform on the
    sphere: E = tr(A)/n, Var = 2 (tr(A^2) - tr(A)^2/n) / (n (n+2)) for A = H, H^2. The mean over
    R runs is within 3 sqrt(Var/R) of tr(A)/n (a 3-sigma band; the draws are seeded)."""
    model = Net().double()
    x, y = _data()
    names = [n for n, _ in model.named_parameters()]
    h = _exact(model, x, y, names)
    n, runs = h.shape[0], 60
    block = HessianBlock(model, _batches(x, y))
    nodes, weights = slq_nodes(block, runs, 8, torch.Generator().manual_seed(7))
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    for power in (1, 2):
        a = torch.linalg.matrix_power(h, power)
        tr, tr2 = float(torch.trace(a)), float(torch.trace(a @ a))
        tolerance = 3 * math.sqrt(2 * (tr2 - tr * tr / n) / (n * (n + 2)) / runs)
        moment = float(weights @ nodes ** power)
        assert abs(moment - tr / n) < tolerance, (power, moment, tr / n, tolerance)
        assert tolerance < 0.5 * tr / n  # the band is narrow enough to mean something
    # one run of n steps recovers the whole spectrum as its nodes; the grid keeps the mean
    one = slq_density(block, 1, n, 50, torch.Generator().manual_seed(8))
    assert torch.allclose(one["nodes"].sort().values, torch.linalg.eigvalsh(h), atol=1e-8)
    assert float(one["mass"].sum()) == pytest.approx(1.0)
    assert float(one["mass"] @ one["centres"]) == pytest.approx(
        float(one["weights"] @ one["nodes"]), abs=float(one["sigma"]))


def test_frozen_and_detached_parameters_have_no_block():
    x, y = _data()
    frozen = Net().double()
    frozen.a.requires_grad_(False)
    cut = Net(cut=True).double()
    for model in (frozen, cut):
        block = HessianBlock(model, _batches(x, y))
        assert block.names == ["b.weight", "b.bias"] and block.groups == ["b"]
        h = _exact(model, x, y, block.names)
        mean, se = hutchinson_trace(block, 200, torch.Generator().manual_seed(3))
        assert mean.shape == (2,)  # b and all: no column for a
        assert abs(float(mean[1]) - float(torch.trace(h))) < 3 * float(se[1])
        values, vectors = top_eigenpairs(model, _batches(x, y), 2, 18,
                                         torch.Generator().manual_seed(4))
        assert torch.allclose(values, torch.linalg.eigvalsh(h).flip(0)[:2], rtol=1e-4, atol=0)
        assert all(set(v) == {"b.weight", "b.bias"} for v in vectors)
    everything = Net().double().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        HessianBlock(everything, _batches(x, y))


SPECTRUM = ["data.train_size=64", "data.test_size=32", "data.batch_size=16",
            "trainer.max_steps=8", "trainer.max_epochs=2", "log.flush_every_s=1000", "probes=full",
            "probes.every_n_steps=4", "probes.histogram_every_n_steps=100",
            "probes.sharpness_every_n_steps=0", "probes.gns_every_n_steps=0",
            "probes.spectrum_every_n_steps=3", "probes.spectrum_examples=32",
            "probes.hutchinson_samples=3", "probes.spectrum_top_k=3", "probes.spectrum_top_iters=4",
            "probes.slq_runs=2", "probes.slq_iters=5", "probes.spectrum_bins=12"]


def test_a_run_writes_the_spectrum_to_tensorboard_and_parquet_and_resumes_it_exactly(
        train_run, cfg_factory, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    from autograd_lab.train import run

    record, run_dir = train_run(*SPECTRUM)
    assert record["status"] == "completed", record["error"]
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    spectrum = frame[frame.name.str.startswith("probes/hessian")]
    assert sorted(set(spectrum.step)) == [0, 3, 6]
    names = set(spectrum.name)
    scalars = {f"probes/hessian_trace/{g}" for g in ("conv", "fc", "all")} | \
        {f"probes/hessian_trace_se/{g}" for g in ("conv", "fc", "all")} | \
        {f"probes/hessian_top/{i}" for i in (1, 2, 3)}
    density = {f"probes/hessian_density/{k}/{b}" for k in ("center", "weight") for b in range(12)}
    assert names == scalars | density | {"probes/hessian_density/size"}
    for _, rows in spectrum.groupby("step"):
        values = dict(zip(rows.name, rows.value, strict=True))
        weights = [values[f"probes/hessian_density/weight/{b}"] for b in range(12)]
        centres = [values[f"probes/hessian_density/center/{b}"] for b in range(12)]
        assert sum(weights) == pytest.approx(1.0) and centres == sorted(centres)
        assert values["probes/hessian_trace/all"] == pytest.approx(
            values["probes/hessian_trace/conv"] + values["probes/hessian_trace/fc"])
        assert values["probes/hessian_top/1"] >= values["probes/hessian_top/3"]

    acc = EventAccumulator(str(run_dir), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert scalars <= set(tags["scalars"])
    assert not any(t.startswith("probes/hessian_density") for t in tags["scalars"])
    for tag in scalars:  # TensorBoard's values are the parquet's (float32 there)
        tb = {e.step: e.value for e in acc.Scalars(tag)}
        assert tb == pytest.approx(dict(zip(spectrum[spectrum.name == tag].step,
                                            spectrum[spectrum.name == tag].value,
                                            strict=True)), rel=1e-6)
    histograms = acc.Histograms("probes/hessian_density")
    assert [h.step for h in histograms] == [0, 3, 6]
    first = spectrum[spectrum.step == 0].set_index("name").value
    hist = histograms[0].histogram_value
    size = first["probes/hessian_density/size"]
    assert hist.num == size and list(hist.bucket) == pytest.approx(
        [first[f"probes/hessian_density/weight/{b}"] * size for b in range(12)])
    # the Custom Scalars layout has the trace and top-k charts, and their regexes match the tags
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    for title, tag in [("Hessian trace per layer group (Hutchinson)", "probes/hessian_trace/fc"),
                       ("Hessian top-k eigenvalues (Lanczos)", "probes/hessian_top/2")]:
        assert any(re.search(r, tag) for r in charts[title])

    # killed after step 4 and resumed: the probe's generator continues where it was
    resumed_dir = tmp_path / "resumed"
    with pytest.raises(SystemExit):
        run(cfg_factory(*SPECTRUM), resumed_dir, callbacks=[SendSignal(4, "train",
                                                                       signal.SIGTERM)])
    resumed = run(cfg_factory(*SPECTRUM), resumed_dir)
    assert resumed["status"] == "completed" and resumed["resumed"]["from_step"] == 4
    again = pd.read_parquet(resumed_dir / "metrics.parquet")
    again = again[again.name.str.startswith("probes/hessian")]
    pd.testing.assert_frame_equal(again.sort_values(["step", "name"]).reset_index(drop=True),
                                  spectrum.sort_values(["step", "name"]).reset_index(drop=True),
                                  check_exact=True)


def _density_rows(run: str, step: int, centres, weights) -> list[dict]:
    rows = [{"run": run, "step": step, "epoch": 0, "name": f"probes/hessian_density/{k}/{b}",
             "value": float(v)} for k, vs in (("center", centres), ("weight", weights))
            for b, v in enumerate(vs)]
    return rows + [{"run": run, "step": step, "epoch": 0, "name": "train/loss", "value": 1.0}]


def test_the_spectrum_figure_averages_seeds_per_group_and_goes_log_for_outliers(tmp_path):
    """Two seeds of lr=0.1 and one of lr=0.2: two panels; lr=0.1's line at a step is the mean of
    its two runs' densities (share per unit eigenvalue), computed here by interpolation; a bulk
    with a far outlier of tiny weight puts the density axis on a log scale."""
    import numpy as np

    from autograd_lab.sweep.spectrum import figure_spectrum

    centres = np.linspace(-1, 9, 11)  # width 1
    bulk = np.exp(-0.5 * (centres / 0.5) ** 2)
    bulk[-1] = 1e-4  # an outlier at 9 with a tiny share
    a, b = bulk / bulk.sum(), np.roll(bulk / bulk.sum(), 1)
    rows = (_density_rows("r0", 0, centres, a) + _density_rows("r1", 0, centres, b)
            + _density_rows("r0", 10, centres, b) + _density_rows("r1", 10, centres, b)
            + _density_rows("r2", 0, centres, a))
    rows.append({"run": "r2", "step": 0, "epoch": 0, "name": "probes/stability_limit",
                 "value": 10.0})  # 2/lr: a dashed line in r2's panel only
    curves = pd.DataFrame(rows)
    runs = pd.DataFrame({"run": ["r0", "r1", "r2"], "optim.lr": [0.1, 0.1, 0.2],
                         "seed": [0, 1, 0], "study": "stability_study",
                         "data.name": "synthetic"})
    fig = figure_spectrum(runs, curves, ["optim.lr", "seed"])
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2 and "lr=0.1" in panels[0].get_title()
    assert "mean over 2 seeds" in fig.get_suptitle()
    lines = {line.get_label(): line for line in panels[0].get_lines()}
    assert set(lines) == {"step 0", "step 10"}
    x, y = lines["step 0"].get_data()
    expected = (np.interp(x, centres, a) + np.interp(x, centres, b)) / 2  # width 1: share/unit
    assert np.allclose(y, expected)
    assert panels[0].get_yscale() == "log"
    limit = [line for line in panels[1].get_lines() if line.get_label().startswith("stability")]
    assert len(limit) == 1 and list(limit[0].get_xdata()) == [10.0, 10.0]
    assert not any(line.get_label().startswith("stability") for line in panels[0].get_lines())
    fig.savefig(tmp_path / "spectrum.png")
    assert figure_spectrum(runs, curves[~curves.name.str.startswith("probes/hessian")],
                           ["optim.lr"]) is None
