"""Config checks that turn a user's mistake into one line naming the bad value and the valid ones.

Hydra parses and composes the config; this module only adds what Hydra cannot know: which values
make sense. `check_overrides` runs before Hydra creates any directory (the CLI calls it), so a
typo never leaves a half-made run directory behind. `validate` runs again inside the job, so
`python -m autograd_lab.train` gets the same checks. No torch import here: it must stay fast.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from autograd_lab.config.graph_checks import check_cuda_graph
from autograd_lab.config.keys import (
    LOGGED_METRICS,
    MISSING,
    get_dotted,
    is_int,
    is_num,
    resolved,
    show_value,
)
from autograd_lab.config.targets import check_known_callback
from autograd_lab.errors import UserError, did_you_mean

# The precisions the harness is tested with (tests/test_trainer_node.py); 16-mixed needs CUDA.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")

# key -> (predicate, what is valid). Keys absent from the config (e.g. model.stem for smallnet)
# are skipped, so one table serves every model and data choice.
# Lanczos holds one vector of the model's size per step (ResNet18: 45 MB each) and reorthogonalises
# against all of them: past 1000 steps a probe call takes hours and gigabytes, never what one meant
LANCZOS = "an integer from 1 to 1000 (Lanczos steps: each keeps a vector of the model's size)"

CHECKS: dict[str, tuple] = {
    "seed": (lambda v: is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "resume": (lambda v: isinstance(v, bool), "true or false"),
    "threads": (lambda v: v is None or (is_int(v) and v >= 1), "null or an integer >= 1"),
    "model.activation": (lambda v: v in ("relu", "custom_relu"), "one of: relu, custom_relu"),
    "model.stem": (lambda v: v in ("imagenet", "cifar"), "one of: imagenet, cifar"),
    "model.weights": (lambda v: v in (None, "IMAGENET1K_V1", "DEFAULT"),
                      "one of: null, IMAGENET1K_V1, DEFAULT"),
    "model.num_classes": (lambda v: is_int(v) and v >= 10,
                          "an integer >= 10 (CIFAR-10's labels are 0..9)"),
    "model.weights_path": (lambda v: v is None or isinstance(v, str), "null or a file path"),
    "model.channels_last": (lambda v: isinstance(v, bool), "true or false"),
    "model.compile": (lambda v: isinstance(v, bool), "true or false"),
    "ckpt_path": (lambda v: v is None or (isinstance(v, str) and v != ""),
                  "null or a checkpoint file path"),
    "data.root": (lambda v: isinstance(v, str) and v != "", "a directory path"),
    "data.download": (lambda v: isinstance(v, bool), "true or false"),
    "data.batch_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "data.val_batch_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "data.shuffle": (lambda v: isinstance(v, bool), "true or false"),
    "data.augment": (lambda v: v in ("none", "flip_crop"), "one of: none, flip_crop"),
    "data.subset": (lambda v: v is None or (is_int(v) and v >= 1), "null or an integer >= 1"),
    "data.train_size": (lambda v: is_int(v) and 5 <= v <= 10**7,
                        "an integer in [5, 10000000] (written as 5 batch files, as CIFAR-10)"),
    "data.test_size": (lambda v: is_int(v) and 1 <= v <= 10**7, "an integer in [1, 10000000]"),
    "data.noise": (lambda v: is_num(v) and v >= 0, "a finite number >= 0"),
    "data.synthetic_seed": (lambda v: is_int(v) and 0 <= v < 2**32,
                            "an integer in [0, 2**32)"),
    "optim.lr": (lambda v: is_num(v) and v > 0, "a finite number > 0"),
    "optim.momentum": (lambda v: is_num(v) and 0 <= v < 1, "a finite number in [0, 1)"),
    "optim.weight_decay": (lambda v: is_num(v) and v >= 0, "a finite number >= 0"),
    "optim.nesterov": (lambda v: isinstance(v, bool), "true or false"),
    "optim.betas": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                    and all(is_num(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    # the schedulers' arguments (conf/scheduler/*.yaml): torch checks some only at the first
    # step (StepLR divides by step_size) and none of the ranges that make a learning rate > 0;
    # any other argument's type is checked against the class's signature (check_arguments)
    "scheduler.make.step_size": (lambda v: is_int(v) and v >= 1,
                                 "an integer >= 1 (epochs between two decays)"),
    "scheduler.make.gamma": (lambda v: is_num(v) and v > 0,
                             "a finite number > 0 (the factor every step_size epochs)"),
    "scheduler.make.eta_min": (lambda v: is_num(v) and v >= 0,
                               "a finite number >= 0 (the learning rate at the end)"),
    "scheduler.make.max_lr": (lambda v: is_num(v) and v > 0, "a finite number > 0"),
    "scheduler.make.pct_start": (lambda v: is_num(v) and 0 < v < 1,
                                 "a number in (0, 1): the fraction of the run spent warming up"),
    "train.zero_grad": (lambda v: isinstance(v, bool), "true or false"),
    "train.freeze": (lambda v: isinstance(v, str) or (isinstance(v, (list, tuple))
                     and all(isinstance(p, str) for p in v)),
                     "a list of parameter-name globs, or the preset backbone"),
    "train.freeze_bn_stats": (lambda v: isinstance(v, bool), "true or false"),
    "train.detach_at": (lambda v: v is None or isinstance(v, str), "null or a module name"),
    "eval.grad_mode": (lambda v: v in ("inference", "no_grad", "enabled"),
                       "one of: inference, no_grad, enabled"),
    "trainer.max_epochs": (lambda v: is_int(v) and (v >= 1 or v == -1), "an integer >= 1 or -1"),
    "trainer.max_steps": (lambda v: is_int(v) and (v >= 1 or v == -1), "an integer >= 1 or -1"),
    "trainer.accelerator": (lambda v: v in ("auto", "cpu", "gpu", "cuda", "mps"),
                            "one of: auto, cpu, gpu, cuda, mps"),
    "trainer.devices": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "trainer.strategy": (lambda v: v in ("auto", "ddp"), "auto or ddp (trainer=ddp)"),
    "trainer.deterministic": (lambda v: isinstance(v, bool), "true or false"),
    "trainer.check_val_every_n_epoch": (lambda v: v is None or (is_int(v) and v >= 1),
                                        "an integer >= 1, or null (val_check_interval=N "
                                        "counts batches across epochs)"),
    "trainer.limit_val_batches": (lambda v: (is_int(v) and v >= 0)
                                  or (isinstance(v, float) and 0 <= v <= 1),
                                  "a fraction in [0, 1] or a whole number of batches"),
    "trainer.progress_bar": (lambda v: v in ("auto", True, False), "one of: auto, true, false"),
    "trainer.cuda_graph": (lambda v: isinstance(v, bool), "true or false"),
    "optim.capturable": (lambda v: isinstance(v, bool), "true or false"),
    # the trainer node's other arguments: their types are checked against Lightning's Trainer
    # signature (targets.check_arguments); these ranges and choices without Lightning
    "trainer.precision": (lambda v: v in PRECISIONS, "one of: " + ", ".join(PRECISIONS)),
    "trainer.val_check_interval": (lambda v: v is None or (is_int(v) and v >= 1) or (
        isinstance(v, float) and 0 < v <= 1), "null, a number of training batches >= 1, or a "
                                              "fraction of an epoch in (0, 1]"),
    "trainer.limit_train_batches": (lambda v: v is None or (is_int(v) and v >= 1) or (
        isinstance(v, float) and 0 < v <= 1), "null, a number of batches >= 1, or a fraction "
                                              "in (0, 1]"),
    "trainer.log_every_n_steps": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "trainer.num_nodes": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "probes.every_n_steps": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "probes.histogram_every_n_steps": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "probes.sharpness_every_n_steps": (lambda v: is_int(v) and v >= 0,
                                       "an integer >= 0 (0: off)"),
    "probes.gns_every_n_steps": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: off)"),
    "probes.sharpness_examples": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "probes.sharpness_iters": (lambda v: is_int(v) and 1 <= v <= 1000, LANCZOS),
    "probes.sharpness_batch_size": (lambda v: v is None or (is_int(v) and v >= 1),
                                    "an integer >= 1, or null (the training batch size)"),
    "probes.gns_small_batch_size": (lambda v: v is None or (is_int(v) and v >= 1),
                                    "an integer >= 1, or null (the training batch size)"),
    "probes.gns_batch_size": (lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    "probes.gns_method": (lambda v: v in ("auto", "per_example", "two_batch"),
                          "one of auto, per_example, two_batch"),
    "probes.spectrum_every_n_steps": (lambda v: is_int(v) and v >= 0,
                                      "an integer >= 0 (0: off)"),
    "probes.spectrum_examples": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "probes.spectrum_top_k": (lambda v: is_int(v) and 1 <= v <= 100,
                              "an integer from 1 to 100 (the eigenvalues to follow)"),
    "probes.spectrum_top_iters": (lambda v: is_int(v) and 1 <= v <= 1000, LANCZOS),
    "probes.hutchinson_samples": (lambda v: is_int(v) and 2 <= v <= 10_000,
                                  "an integer from 2 to 10000 (the standard error needs two; "
                                  "each is one Hessian-vector product)"),
    "probes.slq_runs": (lambda v: is_int(v) and 1 <= v <= 100, "an integer from 1 to 100"),
    "probes.slq_iters": (lambda v: is_int(v) and 2 <= v <= 1000, LANCZOS.replace("1 ", "2 ")),
    "probes.spectrum_bins": (lambda v: is_int(v) and 2 <= v <= 10_000,
                             "an integer from 2 to 10000"),
    "profiler.wait": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "profiler.warmup": (lambda v: is_int(v) and v >= 1, "an integer >= 1 (PyTorch recommends "
                        "warming up)"),
    "profiler.active": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "profiler.repeat": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: until the end)"),
    "log.flush_every_s": (lambda v: is_num(v) and v > 0, "a finite number > 0"),
    "log.progress_every_s": (lambda v: is_num(v) and v > 0, "a finite number > 0 (seconds)"),
    "checkpoint.every_n_steps": (lambda v: is_int(v) and v >= 0,
                                 "an integer >= 0 (0: only on a signal and at the end)"),
}


# Trainer arguments that would break the harness's contract: key -> (the values that keep it,
# why). Each is refused in one line before anything runs (exit 2, no run directory).
TRAINER_CONTRACT = {
    "accumulate_grad_batches": (lambda v: v == 1, "must be 1: the step is written out under "
                                "manual optimisation, one optimizer step per batch (Lightning "
                                "accumulates only under automatic optimisation); for a bigger "
                                "batch set data.batch_size"),
    "gradient_clip_val": (lambda v: v in (None, 0), "must be null: Lightning clips only under "
                          "automatic optimisation, and the step here is written out by hand"),
    "enable_checkpointing": (lambda v: v is True, "must be true: checkpoints/last.ckpt is how a "
                             "run resumes; checkpoint.every_n_steps=0 saves only on a signal "
                             "and at the end"),
    "inference_mode": (lambda v: v is False, "must be false: validation runs under "
                       "eval.grad_mode (inference | no_grad | enabled)"),
    "num_sanity_val_steps": (lambda v: v == 0, "must be 0: every validation is a point of the "
                             "run's curves; a sanity check's would be recorded at step 0"),
    "fast_dev_run": (lambda v: v in (False, 0), "must be false: it turns off the loggers and "
                     "checkpoints the run records; use size=quick or trainer.max_steps=N"),
    "barebones": (lambda v: v is False, "must be false: it turns off the logging, callbacks and "
                  "checkpoints the run records"),
    "overfit_batches": (lambda v: v in (0, 0.0), "must be 0: it swaps the validation data for "
                        "training batches; use data.subset=N to train on a few examples"),
    "callbacks": (lambda v: v is None, "must be null: the harness makes the Trainer's callbacks; "
                  "add Lightning callbacks with callbacks=[early_stopping,lr_monitor,...] or "
                  "+callbacks.NAME._target_=CLASS"),
    "logger": (lambda v: v is None, "must be null: the logger group makes the loggers "
               "(logger=tensorboard | csv | [tensorboard,csv])"),
    "plugins": (lambda v: v is None, "must be null: the harness supplies its checkpoint plugin "
                "(atomic writes)"),
    "default_root_dir": (lambda v: v is None, "must be null: the run directory is Hydra's job "
                         "directory (hydra.run.dir=DIR)"),
    "enable_progress_bar": (lambda v: v is None, "must be null: trainer.progress_bar=auto | "
                            "true | false chooses the bar (or plain lines)"),
}


def validate(cfg) -> None:
    """Raise UserError for the first value in `cfg` that is not valid (an interpolation that
    cannot be resolved included)."""
    cfg = resolved(cfg)
    _validate_keys(cfg)
    trainer = cfg.get("trainer") or {}
    if trainer.get("max_epochs") == -1 and trainer.get("max_steps", -1) == -1:
        raise UserError("trainer.max_epochs=-1: with trainer.max_steps=-1 the run never ends; "
                        "set trainer.max_steps=N, or trainer.max_epochs >= 1")
    for key, (ok, why) in TRAINER_CONTRACT.items():
        if key in trainer and not ok(trainer[key]):
            raise UserError(f"trainer.{key}={show_value(trainer[key])}: refused: {why}")
    if trainer.get("cuda_graph") is True:
        check_cuda_graph(cfg, trainer)
    if trainer.get("check_val_every_n_epoch", 1) is None and not isinstance(
            trainer.get("val_check_interval"), int):
        raise UserError("trainer.check_val_every_n_epoch=null: needs trainer.val_check_interval=N "
                        "(validate every N training batches, counted across epochs)")
    _check_val_interval(cfg, trainer)
    if trainer.get("precision") == "16-mixed" and (cfg.get("train") or {}).get(
            "zero_grad") is False:
        raise UserError("trainer.precision=16-mixed with train.zero_grad=false: fp16's loss "
                        "scaler divides the whole .grad by its scale at every step, so .grad "
                        "would not accumulate as the seed's does; use trainer.precision="
                        "bf16-mixed (no scaler) or 32-true")
    _check_paths(cfg)
    if trainer.get("devices", 1) > 1 and trainer.get("strategy") != "ddp":
        raise UserError(f"trainer.devices={trainer.get('devices')}: more than 1 needs trainer=ddp "
                        f"(one process per device); or use trainer.devices=1")
    if trainer.get("strategy") == "ddp" and (cfg.get("profiler") or {}).get("name") == "torch":
        raise UserError("profiler=torch with trainer=ddp: profile a single-device run "
                        "(profiler=torch trainer=default); choices here: profiler=off")
    if trainer.get("profiler") is not None and (cfg.get("profiler") or {}).get("name") == "torch":
        raise UserError(f"trainer.profiler={show_value(trainer['profiler'])} with profiler=torch: "
                        f"one profiler at a time (two would fight over torch.profiler); use "
                        f"profiler=off, or trainer.profiler=null")
    for name, node in (cfg.get("callbacks") or {}).items():
        check_known_callback(f"callbacks.{name}", node)
        monitor = node.get("monitor") if hasattr(node, "get") else None
        if monitor is not None and monitor not in LOGGED_METRICS:
            raise UserError(f"callbacks.{name}.monitor={show_value(monitor)}: no such metric"
                            f"{did_you_mean(monitor, LOGGED_METRICS)}; the run logs: "
                            f"{', '.join(LOGGED_METRICS)}")
    probes = cfg.get("probes") or {}
    model = (cfg.get("model") or {}).get("name")
    if probes.get("gns_method") == "per_example" and model == "resnet18":
        raise UserError("probes.gns_method=per_example with model=resnet18: per-example "
                        "gradients need a model without train-mode BatchNorm; use "
                        "probes.gns_method=two_batch (or auto)")
    if (cfg.get("model") or {}).get("compile") is True and not _cxx_compiler():
        raise UserError("model.compile=true: torch.compile's inductor backend needs a C/C++ "
                        "compiler and none is on PATH (g++, c++, clang++ or $CXX); install "
                        "one, or model.compile=false")
    optim = cfg.get("optim") or {}
    if optim.get("nesterov") and not optim.get("momentum"):
        raise UserError(f"optim.nesterov=true: needs optim.momentum > 0 "
                        f"(got {show_value(optim.get('momentum'))})")


def _cxx_compiler() -> str | None:
    """The C++ compiler inductor would call (its CPU kernels and Triton's launchers need one)."""
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


def _check_val_interval(cfg, trainer) -> None:
    """An int val_check_interval counted within an epoch must fit in one (Lightning refuses it
    only once the fit starts): the epoch's batches from the data sizes, where they are known."""
    interval, data = trainer.get("val_check_interval"), cfg.get("data") or {}
    if not is_int(interval) or trainer.get("check_val_every_n_epoch", 1) is None:
        return
    examples = {"cifar10": 50000, "synthetic": data.get("train_size")}.get(data.get("name"))
    if not is_int(examples) or not is_int(data.get("batch_size")):
        return
    examples = min(examples, data.get("subset") or examples) // max(1, trainer.get("devices", 1))
    batches, limit = -(-examples // data["batch_size"]), trainer.get("limit_train_batches")
    batches = min(batches, limit) if is_int(limit) else int(batches * limit) \
        if isinstance(limit, float) else batches
    if interval > batches:
        raise UserError(f"trainer.val_check_interval={interval}: an epoch has {batches} training "
                        f"batches; give N <= {batches}, or trainer.check_val_every_n_epoch=null "
                        f"to count batches across epochs")


def _check_paths(cfg) -> None:
    """Paths the run reads must be folders (or files) that resolve: a file where a folder
    goes, or a symlink loop, is one line here instead of a traceback deep in a library."""
    for key, kind in (("data.root", "folder"), ("model.weights_path", "file"),
                      ("ckpt_path", "file")):
        value = get_dotted(cfg, key)
        if value is MISSING or not isinstance(value, str) or not value:
            continue
        path = Path(value).expanduser()
        try:
            path.resolve(strict=False)
        except (RuntimeError, OSError) as e:  # Python 3.11: RuntimeError("Symlink loop ...")
            raise UserError(f"{key}={value}: cannot be resolved ({e}); give a real "
                            f"{kind}") from None
        if kind == "folder" and path.exists() and not path.is_dir():
            raise UserError(f"{key}={value}: is a file; give a folder")
        if kind == "file" and path.is_dir():
            raise UserError(f"{key}={value}: is a folder; give a file")


def _validate_keys(cfg) -> None:
    for key, (ok, valid) in CHECKS.items():
        value = get_dotted(cfg, key)
        if value is MISSING:
            continue
        if hasattr(value, "_content") or hasattr(value, "keys"):  # OmegaConf containers
            from omegaconf import OmegaConf

            value = OmegaConf.to_container(value)
        if not ok(value):
            options = valid.split("one of", 1)[1].lstrip(": ").split(", ") \
                if isinstance(value, str) and "one of" in valid else []
            raise UserError(f"{key}={show_value(value)}: must be {valid}"
                            + did_you_mean(value, options))
