"""The runs a loss-landscape slice reads, checked before torch is imported: a run directory's
config and checkpoints, whether two runs are of one model, and a shared lock on the run while
it is read (a training job in it refuses the slice in one line; the slice changes no file of
the run: not even the lock file's contents). Torch-free: `autograd-lab landscape` checks its
input with it first."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from pathlib import Path

from autograd_lab.disk.formats import CHECKPOINT
from autograd_lab.disk.lock import (
    LOCK_NAME,
    InUse,
    check_entries,
    check_free,
    foreign,
    open_own,
)
from autograd_lab.errors import UserError
from autograd_lab.job.rundir import read_run_json

# keys of the model node that do not change the architecture (where its start came from)
_NOT_ARCHITECTURE = ("weights_path", "weights", "weights_files")


def run_config(run_dir: Path) -> dict:
    """The resolved config of the run in `run_dir` (run.json's, else the one Hydra saved in
    .hydra/config.yaml); a UserError when `run_dir` is no run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: {folder_problem(run_dir)}; give a run directory (runs/..., "
                        f"a job folder of a sweep)")
    check_entries(run_dir)
    record, problem = read_run_json(run_dir)
    config = (record or {}).get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        return config
    hydra = run_dir / ".hydra" / "config.yaml"
    if hydra.is_file():
        from omegaconf import OmegaConf

        try:
            config = OmegaConf.to_container(OmegaConf.load(hydra), resolve=True)
        except Exception as e:  # a half-written file, an interpolation only the app resolves
            raise UserError(f"{run_dir}: its config ({hydra}) cannot be read ({e}); "
                            f"nothing to rebuild the model from") from None
        if isinstance(config, dict) and isinstance(config.get("model"), dict):
            return config
    why = f" ({problem})" if problem else ""
    raise UserError(f"{run_dir}: not a run directory (no run.json with a config{why}, no "
                    f".hydra/config.yaml); give a run directory, or a sweep folder with --pairs")


def _step_in_name(path: Path) -> int:
    found = re.search(r"step=(\d+)", path.name)
    return int(found.group(1)) if found else -1


def run_checkpoints(run_dir: Path) -> tuple[Path, list[Path]]:
    """(the final weights' checkpoint, the other checkpoints in the order they were written):
    checkpoints/last.ckpt (the harness's own, written at the end) and the files of Lightning's
    ModelCheckpoint (`callbacks=[model_checkpoint]`, checkpoints/<epoch>-<step>.ckpt). A
    UserError when the run has none."""
    folder = Path(run_dir) / "checkpoints"
    files = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    files = [f for f in files if f.is_file() and not f.is_symlink()]
    last = Path(run_dir) / CHECKPOINT
    if not files:
        raise UserError(f"{run_dir}: no checkpoint ({CHECKPOINT} is missing: the run was killed "
                        f"before its first save, or it diverged); nothing to slice")
    others = sorted((f for f in files if f != last),
                    key=lambda f: (_step_in_name(f), f.stat().st_mtime))
    if last in files:
        return last, others
    return others[-1], others[:-1]


def architecture(config: dict) -> dict:
    """The part of a run's config that decides the model's parameters and their shapes."""
    model = {k: v for k, v in config["model"].items() if k not in _NOT_ARCHITECTURE}
    return model


def check_same_model(a: Path, config_a: dict, b: Path, config_b: dict) -> None:
    """Two runs can be interpolated only when their models are one architecture."""
    ma, mb = architecture(config_a), architecture(config_b)
    if ma == mb:
        return
    keys = sorted(k for k in ma.keys() | mb.keys() if ma.get(k) != mb.get(k))
    key = "name" if "name" in keys else keys[0]
    raise UserError(f"{b}: a run of another model (model.{key}={json.dumps(mb.get(key))}, "
                    f"{a} has model.{key}={json.dumps(ma.get(key))}); a slice between two runs "
                    f"needs the same model")


@contextlib.contextmanager
def reading(run_dir: Path):
    """Hold a shared lock on the run while it is read: a training job running there (it holds
    the exclusive lock) refuses the slice in one line, and none can start in it until the slice
    is read. The lock file is opened read-only and never written (RunLock would write its holder
    into it): the run's files stay bitwise as they were. A run without a lock file (made by no
    process that locked it) is read as it is."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = open_own(path)  # read-only; a symlink, FIFO or folder there: one line
    except FileNotFoundError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                check_free(run_dir)  # the holder's words: pid, host, since
            except InUse as e:
                raise InUse(f"{str(e).split(';')[0]}; a training job is running there: "
                            f"slice it once it has ended") from None
            raise InUse(f"{run_dir} is in use by another autograd-lab process; slice it once "
                        f"that has ended") from None
        yield
    finally:
        os.close(fd)  # releases the shared lock


def output_folder(base: Path) -> Path:
    """<base>/landscape, checked: a symlink or file of that name would take the outputs
    elsewhere (refused in one line, nothing written)."""
    folder = Path(base) / "landscape"
    if (error := foreign(folder, folder=True)) is not None:
        raise error
    return folder


def safe_name(text: str) -> str:
    """A file-name part from a run's name or a value: letters, digits, `-_.=` kept."""
    cleaned = re.sub(r"[^A-Za-z0-9._=-]+", "_", str(text)).strip("_.")
    return cleaned[:80] or "run"


def folder_problem(path: Path) -> str:
    """Why `path` is no folder, in words: "no such folder" or "not a folder (a file)"."""
    return "not a folder (a file)" if Path(path).exists() else "no such folder"


def unfinished(run_dir: Path) -> str | None:
    """None when the run completed (run.json's status), else why its last checkpoint is not
    its final weights: "status 'failed'", "no run.json", ..."""
    record, problem = read_run_json(run_dir)
    if record is None:
        return problem or "no run.json"
    status = record.get("status")
    return None if status == "completed" else f"status {status!r}"


def end_label(run_dir: Path, step) -> str:
    """What the run's last checkpoint is called in a slice's line, json and figure."""
    why = unfinished(run_dir)
    if why is None:
        return f"final weights (step {step})"
    return f"last checkpoint (step {step}; the run did not complete: {why})"


def default_name(to: Path | None, plane: bool, directions: str, seed: int) -> str:
    """A slice's output name when --name is not given."""
    if plane:
        return "plane_hessian" if directions == "hessian" else f"plane_random_seed{seed}"
    return "interpolation" if to is None else f"interpolation_to_{safe_name(Path(to).name)}"


def slice_files(folder: Path, name: str, trajectory: bool) -> list[Path]:
    """The files a slice writes in `folder`: .parquet, .png, .json (and the trajectory)."""
    files = [folder / f"{name}{ext}" for ext in (".parquet", ".png", ".json")]
    return files + [folder / f"{name}_trajectory.parquet"] * trajectory


def check_targets(files: list[Path]) -> None:
    """Every file a slice will write is a plain file or nothing (a symlink, FIFO or folder at
    any of them: one line, before the first is written)."""
    for path in files:
        if (error := foreign(path)) is not None:
            raise error


def writable_folder(base: Path, board: bool = True) -> Path:
    """<base>/landscape made and a probe file written and removed in it (and in <base> itself
    when the TensorBoard event file goes there): a folder that cannot be written is one line
    before any point is computed."""
    folder = output_folder(base)
    for where in (folder, Path(base))[: 1 + board]:
        try:
            where.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=where, prefix=".landscape-probe.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UserError(f"{where}: cannot write there ({e.strerror or e}); give a run "
                            f"directory this user can write into") from None
    return folder


def check_device(device: str | None) -> None:
    """--device is cpu, cuda or cuda:N, and the CUDA device exists here (torch is imported
    only for a CUDA device)."""
    if device is None or device == "cpu":
        return
    found = re.fullmatch(r"cuda(?::(\d+))?", device)
    if found is None:
        raise UserError(f"--device {device}: not a device; give cpu, cuda or cuda:N")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"--device {device}: no CUDA device here; give cpu")
    if found.group(1) is not None and int(found.group(1)) >= count:
        raise UserError(f"--device {device}: this machine has {count} CUDA device(s); give "
                        f"cpu, cuda or cuda:0..cuda:{count - 1}")
