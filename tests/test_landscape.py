"""Loss-landscape slices (`autograd-lab landscape`, `al.landscape`) against independent
computations: the line's ends equal the losses of the endpoint weights computed here with a
plain SmallNet and F.cross_entropy, the rebuilt initial weights give the run's own step-0 loss,
filter-normalised directions have the weights' filter norms, a quadratic's plane matches its
closed form, projections recover known coordinates, the run's files stay bitwise the same, and
TensorBoard reads the new event file back. Bad input: one line, exit 2."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import cli, in_process, make_cfg

import autograd_lab.api as al
from autograd_lab.data.loader import ResidentBatches, load_split_tensors, normalize
from autograd_lab.model.networks import SmallNet
from autograd_lab.observe import landscape as L
from autograd_lab.sweep import landscape_files as files_module
from autograd_lab.sweep import landscape_runs as runs_module

STEPS = 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """A 6-step SmallNet run on 64 synthetic images with ModelCheckpoint files at steps 2, 4, 6
    (a trajectory), and its config."""
    from autograd_lab.train import run

    run_dir = tmp_path_factory.mktemp("landscape") / "run"
    cfg = make_cfg("data.train_size=64", "data.test_size=32", f"trainer.max_steps={STEPS}",
                   "trainer.max_epochs=10",
                   "probes=off", "callbacks=[model_checkpoint]",
                   "callbacks.model_checkpoint.every_n_train_steps=2", data_root=data_root)
    run(cfg, run_dir)
    return run_dir, cfg


def _checksums(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _loss_acc(model, x, y):
    """The oracle: a plain forward and F.cross_entropy over every example."""
    with torch.no_grad():
        logits = model.eval()(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def _final_model(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    model = SmallNet()
    model.load_state_dict({k[6:]: v for k, v in ckpt["state_dict"].items()
                           if k.startswith("model.")})
    return model


def test_rebuilt_initial_weights_give_the_runs_step0_loss(trained):
    """Step 0's train/loss is the first batch's loss under the run's true initial weights."""
    from autograd_lab.sweep.landscape import initial_state

    run_dir, cfg = trained
    model = SmallNet()
    L.load_state(model, initial_state(cfg, torch.device("cpu")))
    t = load_split_tensors(cfg.data)
    x, y = next(iter(ResidentBatches(t["train_x"], t["train_y"], cfg.data.batch_size,
                                     cfg.data.shuffle, cfg.seed)))
    recorded = pd.read_parquet(run_dir / "metrics.parquet")
    step0 = recorded[(recorded.name == "train/loss") & (recorded.step == 0)].value.item()
    with torch.no_grad():
        assert F.cross_entropy(model.train()(normalize(x)), y).item() == pytest.approx(step0,
                                                                                    abs=1e-6)
    torch.manual_seed(cfg.seed)  # and they are what the seed alone builds (the oracle below)
    assert all(torch.equal(a, b) for a, b in zip(SmallNet().state_dict().values(),
                                                 model.state_dict().values(), strict=True))


def test_line_and_plane_match_independent_losses_and_change_no_file(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, cfg = trained
    before = _checksums(run_dir)
    line = al.landscape(run_dir, examples=4096)  # more than the splits: every example
    plane = al.landscape(run_dir, plane=True, grid=3, span=0.5, seed=3)
    after = _checksums(run_dir)
    assert {k: v for k, v in after.items() if k in before} == before  # bitwise unchanged
    added = sorted(str(k) for k in set(after) - set(before))
    assert [a for a in added if not a.startswith("landscape/")] == sorted(
        f.name for f in run_dir.glob("events.out.tfevents.*.landscape"))
    assert len(added) == 2 + 3 + 4  # two event files; line: parquet, png, json; plane: + path

    t = load_split_tensors(cfg.data)
    sets = {"train": (normalize(t["train_x"]), t["train_y"]),
            "val": (normalize(t["test_x"]), t["test_y"])}
    torch.manual_seed(cfg.seed)
    ends = {0.0: SmallNet(), 1.0: _final_model(run_dir)}
    f = line.frame
    assert f.alpha.min() == -0.5 and f.alpha.max() == 1.5 and len(f) == 51 + 2  # + 0 and 1
    for alpha, model in ends.items():
        row = f[f.alpha == alpha].iloc[0]
        for split, (x, y) in sets.items():
            loss, acc = _loss_acc(model, x, y)
            assert row[f"{split}_loss"] == pytest.approx(loss, rel=1e-5)
            assert row[f"{split}_acc"] == pytest.approx(acc)
    # the plane's centre is the final weights; the trajectory ends there and starts at step 0
    centre = plane.frame[(plane.frame.x == 0) & (plane.frame.y == 0)].iloc[0]
    assert centre.train_loss == pytest.approx(f[f.alpha == 1].train_loss.item(), rel=1e-5)
    path = plane.trajectory
    # one row per checkpoint state: ModelCheckpoint's step-6 file holds last.ckpt's weights
    sixth = torch.load(next((run_dir / "checkpoints").glob("*step=6*.ckpt")), weights_only=True)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.equal(v, last["state_dict"][k]) for k, v in sixth["state_dict"].items())
    assert list(path.step) == [0, 2, 4, STEPS]
    assert path.x.iloc[-1] == pytest.approx(0, abs=1e-6) and path.off_plane.iloc[-1] == 0
    assert path.train_loss.iloc[0] == pytest.approx(f[f.alpha == 0].train_loss.item(), rel=1e-5)
    stored = pd.read_parquet(run_dir / "landscape" / "interpolation.parquet")
    pd.testing.assert_frame_equal(stored, f)

    board = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    board.Reload()
    assert {"landscape/interpolation", "landscape/plane_random_seed3"} <= set(
        board.Tags()["images"])
    curve = {e.step: e.value for e in board.Scalars("landscape/interpolation/train_loss")}
    assert curve[1000] == pytest.approx(f[f.alpha == 1].train_loss.item(), rel=1e-6)
    assert curve[-500] == pytest.approx(f[f.alpha == -0.5].train_loss.item(), rel=1e-6)


def test_hessian_plane_and_a_line_to_another_run(trained, tmp_path):
    run_dir, _ = trained
    other = tmp_path / "other"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("landscape", "*.landscape"))
    s = al.landscape(run_dir, to=other, points=5, examples=32)
    assert s.name == "interpolation_to_other" and s.meta["barrier"] == pytest.approx(0, abs=1e-6)
    assert np.allclose(s.frame.train_loss, s.frame.train_loss.iloc[0])  # one point: flat
    h = al.landscape(other, directions="hessian", grid=3, examples=32, hessian_iters=8)
    assert h.name == "plane_hessian" and "λ=" in h.meta["axes"][0]
    assert h.trajectory.x.iloc[-1] == pytest.approx(0, abs=1e-6)


def test_filter_normalised_directions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5))
    model[1].running_mean.uniform_()
    weights, kinds = L.model_state(model), L.tensor_kinds(model)
    assert kinds == {"0.weight": "filter", "0.bias": "bias", "1.weight": "norm",
                     "1.bias": "norm", "1.running_mean": "buffer", "1.running_var": "buffer",
                     "4.weight": "filter", "4.bias": "bias"}
    d = L.random_direction(weights, kinds, torch.Generator().manual_seed(1))
    for name in ("0.weight", "4.weight"):
        w, v = weights[name], d[name]
        assert torch.allclose(v.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-5)
        assert not torch.allclose(v, w)  # random, not the weights
    assert all(not d[n].any() for n in kinds if kinds[n] != "filter")
    both = L.random_direction(weights, kinds, torch.Generator().manual_seed(1),
                              moved={"0.weight", "0.bias", "1.weight"}, include_bias=True,
                              include_norm=True)
    assert torch.allclose(both["0.bias"].abs(), weights["0.bias"].abs())
    assert torch.allclose(both["1.weight"].abs(), weights["1.weight"].abs())
    assert torch.equal(both["0.weight"], d["0.weight"])  # the same draws, same seed
    assert not both["4.weight"].any() and not both["1.running_mean"].any()  # not moved


def test_a_quadratic_slice_matches_its_closed_form():
    """f(θ) = ½ θᵀAθ + bᵀθ on the plane c + x d1 + y d2, and on the line c -> e."""
    g = torch.Generator().manual_seed(0)
    n = 7
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    a, b = m @ m.T, torch.randn(n, generator=g, dtype=torch.float64)

    class Quadratic(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def measure(model):
        t = model.theta.detach()
        return {"loss": float(0.5 * t @ a @ t + b @ t)}

    model = Quadratic()
    c, d1, d2, e = ({"theta": torch.randn(n, generator=g, dtype=torch.float64)}
                    for _ in range(4))
    coords = [(x, y) for x in np.linspace(-2, 2, 5) for y in (-1.5, 0.0, 0.25, 3.0)]
    rows = L.on_plane(model, c, d1, d2, coords, measure)
    c_, u, v = c["theta"], d1["theta"], d2["theta"]
    grad = a @ c_ + b
    f0 = float(0.5 * c_ @ a @ c_ + b @ c_)
    for (x, y), row in zip(coords, rows, strict=True):
        exact = (f0 + x * float(grad @ u) + y * float(grad @ v)
                 + 0.5 * (x * x * float(u @ a @ u) + 2 * x * y * float(u @ a @ v)
                          + y * y * float(v @ a @ v)))
        assert row["loss"] == pytest.approx(exact, abs=1e-6, rel=1e-9)
    assert torch.equal(model.theta.detach(), c_)  # left at the centre
    w = e["theta"] - c_
    for row in L.along_line(model, c, e, [-0.5, 0.0, 0.3, 1.0], measure):
        s = row["alpha"]
        exact = f0 + s * float(grad @ w) + 0.5 * s * s * float(w @ a @ w)
        assert row["loss"] == pytest.approx(exact, abs=1e-6, rel=1e-9)


def test_projection_recovers_known_coordinates():
    g = torch.Generator().manual_seed(0)
    c, d1, d2 = ({"w": torch.randn(4, 3, generator=g, dtype=torch.float64)} for _ in range(3))
    onto = [{"w": c["w"] + 0.7 * d1["w"] - 1.2 * d2["w"]}, c]
    xy, off = L.project(onto, c, d1, d2, ["w"])
    assert xy[0] == pytest.approx((0.7, -1.2)) and off[0] == pytest.approx(0, abs=1e-9)
    assert xy[1] == (0.0, 0.0) and off[1] == 0.0


def test_shortcuts_give_the_plain_forward(trained):
    """The evaluation shortcuts (cached input layer, strided max-pool) change no number beyond
    rounding: the same measure with and without them (a measure without `inputs`)."""
    torch.manual_seed(0)
    model, start, end = SmallNet().eval(), None, None
    start = L.model_state(model)
    end = {k: v + 0.1 * torch.randn_like(v) for k, v in start.items()}
    x, y = torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,))
    fast = L.classification_measure({"train": (x, y)}, 16)
    fast_rows = L.along_line(model, start, end, [-0.5, 0.5, 1.0], fast)
    plain_rows = L.along_line(model, start, end, [-0.5, 0.5, 1.0], lambda m: fast(m))
    for p, q in zip(fast_rows, plain_rows, strict=True):
        assert p["train_loss"] == pytest.approx(q["train_loss"], rel=1e-6)
    assert L.InputLayerShortcut.input_layer(model, x[:2])[0] == "conv"  # it was in use
    z = torch.randn(2, 3, 9, 7)
    assert torch.equal(L.strided_max_pool(z, 2), nn.MaxPool2d(2)(z))
    assert "forward" not in vars(model.conv) and "forward" not in vars(model.pool)  # restored


def test_a_sweeps_pairs_are_interpolated_and_tabulated(tmp_path, data_root):
    """--pairs train.zero_grad: one row per seed, the line from the zero_grad=true run's final
    weights to the false one's; its ends are each run's final-weight loss (the oracle: a plain
    SmallNet from each last.ckpt) and the barrier is recomputed from the stored curve. The runs'
    names share a long prefix (a sweep folder inside a folder of runs): each pair has its own
    files all the same."""
    from autograd_lab.train import run

    sweep = tmp_path / "sweep"
    prefix = "zero_grad_study/" + ",".join(f"data.option_{i}=value_{i}" for i in range(8))
    for seed in (0, 1):
        for value in ("true", "false"):
            run(make_cfg("data.train_size=64", "data.test_size=32", "trainer.max_steps=3",
                         "trainer.max_epochs=10", "probes=off", f"train.zero_grad={value}",
                         f"seed={seed}", data_root=data_root),
                sweep / prefix / f"seed={seed},train.zero_grad={value}")
    table = al.landscape(sweep, pairs="train.zero_grad", points=11, examples=64)
    assert sorted(table.seed) == ["0", "1"] and table.file.nunique() == 2  # as typed
    t = load_split_tensors(make_cfg("data.train_size=64", "data.test_size=32",
                                    data_root=data_root).data)
    x, y = normalize(t["train_x"]), t["train_y"]
    for row in table.itertuples():
        assert (row.from_value, row.to_value) == ("true", "false")
        assert row.from_run.endswith(f"seed={row.seed},train.zero_grad=true")
        assert row.loss_from == pytest.approx(
            _loss_acc(_final_model(sweep / row.from_run), x, y)[0], rel=1e-5)
        assert row.loss_to == pytest.approx(
            _loss_acc(_final_model(sweep / row.to_run), x, y)[0], rel=1e-5)
        curve = pd.read_parquet(sweep / "landscape" / row.file)
        inside = curve[(curve.alpha >= 0) & (curve.alpha <= 1)]
        line = (1 - inside.alpha) * row.loss_from + inside.alpha * row.loss_to
        assert row.barrier == pytest.approx((inside.train_loss - line).max(), abs=1e-9)
        assert row.loss_mid == pytest.approx(curve[curve.alpha == 0.5].train_loss.item())
        assert curve[curve.alpha == 0.0].train_loss.item() == pytest.approx(row.loss_from)
    stored = pd.read_parquet(sweep / "landscape" / "pairs.parquet")
    assert list(stored.columns[:6]) == ["key", "from_value", "to_value", "seed", "from_run",
                                        "to_run"] and len(stored) == 2
    assert (sweep / "landscape" / "pairs.png").is_file()


def test_bad_input_is_one_line(trained, tmp_path, monkeypatch, capsys):
    from autograd_lab.disk.lock import RunLock

    run_dir, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    shutil.copy(run_dir / "run.json", empty / "run.json")
    other = tmp_path / "resnet"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "last.ckpt").write_bytes(b"")
    (other / "run.json").write_text((run_dir / "run.json").read_text().replace(
        '"name": "smallnet"', '"name": "resnet18"'))

    def line(*args):
        out = in_process(["landscape", *map(str, args)], tmp_path, monkeypatch, capsys)
        assert out.returncode == 2 and out.stdout == ""
        assert len(out.stderr.splitlines()) == 1, out.stderr
        return out.stderr

    assert "not a run directory" in line(tmp_path)
    assert "no such folder" in line(tmp_path / "nowhere")
    assert "not a folder" in line(copy / "run.json")
    assert "no checkpoint" in line(empty)
    assert "--span 0.0: not a finite number > 0" in line(copy, "--plane", "--span", "0")
    for bad in ("nan", "inf"):
        assert f"--span {bad}: not a finite number > 0" in line(copy, "--plane", "--span", bad)
    assert "a span of 0" in line(copy, "--range", "1", "1")
    assert "--range nan 1: not finite" in line(copy, "--range", "nan", "1")
    assert "--points 1: fewer than 2" in line(copy, "--points", "1")
    assert line(copy, "--points", "nan") == ("autograd-lab: error: --points nan: not a whole "
                                             "number; --points takes a whole number 2..100001\n")
    assert "valid flags: --batch-size" in line(copy, "--spam", "3")
    assert "model.name=\"resnet18\"" in line(copy, "--to", other)
    assert "the run itself" in line(copy, "--to", copy)
    assert "--device bogus: not a device; give cpu, cuda or cuda:N" in line(
        copy, "--device", "bogus")
    if torch.cuda.is_available():
        assert "--device cuda:99: this machine has" in line(copy, "--device", "cuda:99")
    else:
        assert "--device cuda: no CUDA device here; give cpu" in line(copy, "--device", "cuda")
    for flag, value, says in (
            ("--seed", 10**20, "more than 9223372036854775807 (torch's generators"),
            ("--seed", -1, "negative; give 0..9223372036854775807"),
            ("--threads", 100000, f"more than {4 * (os.cpu_count() or 1)} (4 x the"),
            ("--points", 10**9, "more than 100001 (each point evaluates the model"),
            ("--grid", 10**5, "more than 1001"),
            ("--hessian-iters", 10**5, "more than 1000 (Lanczos keeps that many vectors")):
        extra = ["--plane"] * (flag == "--grid") + ["--directions", "hessian"] * (
            flag == "--hessian-iters")
        assert f"{flag} {value}: {says}" in line(copy, flag, value, *extra)
    # options the slice would not use
    assert "--grid 5: applies to a plane; add --plane" in line(copy, "--grid", "5")
    assert "--include-bias: applies to a plane" in line(copy, "--include-bias")
    assert "--points 5: applies to a line" in line(copy, "--plane", "--points", "5")
    assert "--hessian-iters 5: applies to Hessian" in line(copy, "--plane", "--hessian-iters", 5)
    nowhere = tmp_path / "no_data_here"
    assert "--data-root" in line(copy, "--data-root", nowhere) and not nowhere.exists()
    with RunLock(copy):
        assert "a training job is running there" in line(copy)
    # every output of the slice is checked before any point is computed or file written
    shutil.rmtree(copy / "landscape", ignore_errors=True)
    (copy / "landscape").mkdir()
    (copy / "landscape" / "interpolation.png").symlink_to(tmp_path / "elsewhere.png")
    assert "interpolation.png: a symlink" in line(copy, "--points", "2")
    os.mkfifo(copy / "landscape" / "plane_random_seed0.json")
    assert "plane_random_seed0.json: a FIFO" in line(copy, "--plane", "--grid", "2")
    assert sorted(p.name for p in (copy / "landscape").iterdir()) == [
        "interpolation.png", "plane_random_seed0.json"]
    # a folder that cannot be written (as root chmod does not stop writes: mkstemp fails)
    def refused(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    events = sorted(copy.glob("*.landscape"))
    with monkeypatch.context() as m:
        m.setattr(runs_module.tempfile, "mkstemp", refused)
        assert "landscape: cannot write there (Permission denied)" in line(copy, "--name", "x")
    assert sorted(copy.glob("*.landscape")) == events  # no new event file


def test_a_failed_write_and_an_unfinished_run(trained, tmp_path, monkeypatch, capsys):
    """A write the file system refuses after the computation: one line naming the file. A run
    that did not complete: its last checkpoint is labelled so (stdout, json, figure, a note)."""
    import json

    run_dir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("landscape", "*.landscape"))

    def read_only(path, frame):
        raise OSError(30, "Read-only file system", str(path))

    with monkeypatch.context() as m:
        m.setattr(files_module, "write_parquet", read_only)
        out = in_process(["landscape", str(copy), "--points", "2", "--examples", "8"], tmp_path,
                         monkeypatch, capsys)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert f"{copy}/landscape/interpolation.parquet: cannot write (Read-only" in out.stderr
    record = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**record, "status": "interrupted"}))
    out = in_process(["landscape", str(copy), "--points", "2", "--examples", "100"], tmp_path,
                     monkeypatch, capsys)
    label = f"last checkpoint (step {STEPS}; the run did not complete: status 'interrupted')"
    assert out.returncode == 0 and f"to {label};" in out.stdout, out
    assert f"{copy} did not complete (status 'interrupted')" in out.stderr
    assert "--examples 100: a split is smaller; used 64 train, 32 val" in out.stderr
    meta = json.loads((copy / "landscape" / "interpolation.json").read_text())
    assert meta["labels"] == ["initial weights", label]
    assert list(meta["examples"].values()) == [64, 32]


def test_the_console_script(trained, tmp_path, monkeypatch, capsys):
    """In a terminal (a pseudo-terminal made by `script`) the progress bar runs on stderr;
    into a file or a pipe there is none, only the result's lines."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    run_dir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("landscape", "*.landscape"))
    exe = Path(sys.executable).parent / "autograd-lab"
    # a terminal's size as a real one has (tqdm draws nothing on a 0-row terminal)
    command = f"stty rows 40 cols 120; {exe} landscape {copy} --points 3 --examples 16"
    if shutil.which("script"):  # util-linux: the command on a terminal of its own
        out = subprocess.run(["script", "-qec", command, "/dev/null"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    else:
        out = cli("landscape", str(copy), "--points", "3", "--examples", "16", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "interpolation: 5 points" in out.stdout and "written:" in out.stdout
    if shutil.which("script"):
        assert "point/s" in out.stdout  # the bar (a terminal has one stream)
    assert (copy / "landscape" / "interpolation.png").is_file()
    piped = in_process(["landscape", str(copy), "--points", "3", "--examples", "16", "--name",
                        "piped"], tmp_path, monkeypatch, capsys)
    assert piped.returncode == 0 and "piped: 5 points" in piped.stdout, piped
    assert "point/s" not in piped.stderr and "\r" not in piped.stderr, piped  # no bar in a file
