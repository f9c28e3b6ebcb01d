"""May this checkpoint continue this run? Read safely and compared key by key with the run's
config; the refusal names the first differing key. Torch is imported only to read a file."""

from __future__ import annotations

from pathlib import Path

from autograd_lab.config.compose import compose
from autograd_lab.config.keys import flatten, resume_comparable
from autograd_lab.disk.files import load_tensor_file
from autograd_lab.disk.formats import CHECKPOINT_FORMAT
from autograd_lab.errors import UserError


def load(path: Path, map_location=None) -> dict:
    """Read a checkpoint safely; a damaged or refused file is a one-line error naming it."""
    ckpt = load_tensor_file(path, f"checkpoint {path}", map_location or "cpu",
                            hint="delete it (or run with resume=false) to start over")
    if isinstance(ckpt, dict) and "autograd_lab" in (ckpt.get("callbacks") or {}).get(
            "Checkpointer", {}):
        raise UserError(f"checkpoint {path} is from an older autograd-lab format (steps run in "
                        f"chunks); it cannot continue here: resume=false starts the run over")
    if not isinstance(ckpt, dict) or "autograd_lab" not in ckpt:
        raise UserError(f"checkpoint {path} was not written by autograd-lab; delete it or run "
                        f"with resume=false to start over")
    return ckpt


def check_resumable(path: Path, config: dict, explicit: bool = False) -> dict:
    """The checkpoint if this run can continue from it, else a UserError that says which
    setting differs. Keys that change no curve (config.keys.RESUME_FREE_KEYS: an added logger, an LR
    monitor, ModelCheckpoint files, progress settings) may differ. `explicit`: the user gave it
    (ckpt_path=), so the advice is about that file, not about this run directory."""
    ckpt = load(path)
    meta = ckpt["autograd_lab"]
    version = meta.get("format", 0)
    if version > CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} has format={version}, newer than this "
                        f"autograd-lab reads (up to {CHECKPOINT_FORMAT}); upgrade autograd-lab "
                        f"or run with resume=false")
    theirs, ours = resume_comparable(meta["config"]), resume_comparable(config)
    diffs = _diff(theirs, ours)  # dotted keys; a key missing on one side counts as null
    if diffs:
        key = "model.name" if "model.name" in diffs else next(
            (k for k in diffs if k.startswith("model.")), diffs[0])
        what = "another model" if key.startswith("model.") else "another config"
        others = [k for k in diffs if k != key]
        also = (f"; also {', '.join(others[:3])}{' and more' if len(others) > 3 else ''}"
                if others else "")
        if explicit:  # the file is the user's choice: nothing in this run directory is at stake
            raise UserError(f"ckpt_path={path}: the checkpoint is from {what} ({key}="
                            f"{flatten(theirs).get(key)!r}, this run has {key}="
                            f"{flatten(ours).get(key)!r}{also}); continue it with its config "
                            f"({key}={_typed(flatten(theirs).get(key))}), or give a checkpoint "
                            f"this config wrote (ckpt_path=null: none)")
        if _completed(path):  # never advise a step that deletes a finished result
            advice = ("it is a completed run: give this one another run directory "
                      "(hydra.run.dir=...)")
        else:
            advice = "use another run directory, or resume=false to discard it and start over"
        raise UserError(f"checkpoint {path} is from {what} ({key}={flatten(theirs).get(key)!r}, "
                        f"this run has {key}={flatten(ours).get(key)!r}{also}); {advice}")
    return ckpt


def _typed(value) -> str:
    """A config value as it is typed on the command line (0.1, true, null, text)."""
    import json

    return value if isinstance(value, str) else json.dumps(value)


def numerics() -> dict:
    """What changes floating-point results without being a config key: a run continued under
    other values is not bitwise equal to an uninterrupted one."""
    import torch

    return {"threads": torch.get_num_threads(), "torch": str(torch.__version__)}


def numerics_changed(ckpt: dict) -> dict:
    """{name: [then, now]} for each numerics() value that differs from the checkpoint's."""
    then = ckpt["autograd_lab"].get("numerics") or {}
    now = numerics()
    return {k: [then[k], now[k]] for k in now if k in then and then[k] != now[k]}


def _completed(path: Path) -> bool:
    import json

    try:
        record = json.loads((Path(path).parent.parent / "run.json").read_text())
        return isinstance(record, dict) and record.get("status") == "completed"
    except (OSError, ValueError):
        return False


def _diff(a: dict, b: dict) -> list[str]:
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def check_ckpt_path_override(overrides: list[str]) -> None:
    """A checkpoint given as ckpt_path= must be one this config can continue from: refused in
    one line naming the difference before Hydra makes the run directory (the CLI and the Hydra
    app's preflight call it; the run checks it again as it loads it)."""
    from omegaconf import OmegaConf


    cfg = compose(overrides)
    if not cfg.get("ckpt_path") or not Path(cfg.ckpt_path).expanduser().is_file():
        return  # none, or missing: the run says so in its own words
    check_resumable(Path(cfg.ckpt_path).expanduser(), OmegaConf.to_container(cfg, resolve=True),
                    explicit=True)
