"""`autograd-lab <command> ...`: the console entry point.

`train` hands its arguments to the Hydra app unchanged, after checking the overrides with
Hydra's own parser and compose API, so a typo is one line and no run directory is created.
Nothing here imports torch: `autograd-lab train --help` and `--cfg job` stay fast.
"""

from __future__ import annotations

import os
import sys

from autograd_lab.cli.commands import demo, summarize, train
from autograd_lab.cli.landscape import landscape
from autograd_lab.cli.tensorboard import tensorboard
from autograd_lab.errors import UserError, report

COMMANDS = {
    "train": "train a model (Hydra app: overrides, -m sweeps, --cfg job, --help)",
    "demo": "run the seed's zero-grad study (CIFAR-10 when present, else synthetic data)",
    "step-check": "one forward/backward/step; every parameter against its update rule",
    "graph": "[overrides] --out PATH [--tensorboard DIR]: the backward graph, its saved "
             "tensors, DOT, image, TensorBoard graph",
    "summarize": "DIR [--by KEY ...]: summary/ for any folder of runs (tables, curves, plots)",
    "profile": "a short profiled training run (or --op conv1d, the seed's case): op tables",
    "tensorboard": "[DIR ...] [--port N]: TensorBoard on 127.0.0.1 with every step kept",
    "landscape": "RUN_DIR [--to RUN | --plane] | SWEEP --pairs KEY: loss-landscape slices",
}


def main(argv: list[str] | None = None) -> int:
    # before torch is imported: the profiler's C++ start-up lines and c10's warnings stay out of
    # the user's terminal (train.quiet_libraries says which)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(argv)
    except BrokenPipeError:  # `autograd-lab train --help | head`: the reader has gone; end as
        # the shell's own tools do, quietly, with stdout pointed at /dev/null so that Python's
        # final flush does not fail again (the Python documentation's recipe for SIGPIPE)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command its reader left


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0].startswith(("-sc", "--shell-completion")):
        # Hydra's completion script calls the program without a command, and passes the line
        # typed so far in COMP_LINE: complete `autograd-lab train ...` as the train app's line.
        words = os.environ.get("COMP_LINE", "").split(" ")
        if len(words) > 1 and words[1] == "train":
            os.environ["COMP_LINE"] = " ".join(words[:1] + words[2:])
        argv = ["train", *argv]
    command, rest = argv[0], argv[1:]
    try:
        handler = {"train": train, "demo": demo, "summarize": summarize,
                   "tensorboard": tensorboard, "landscape": landscape}.get(command)
        if command in ("step-check", "graph", "profile"):  # torch and the training builders:
            from autograd_lab.cli import tools  # imported for these commands only

            handler = {"step-check": tools.step_check, "graph": tools.graph,
                       "profile": tools.profile}[command]
        if handler is not None:
            return handler(rest)
        raise UserError(f"unknown command {command!r}; commands are: {', '.join(COMMANDS)}")
    except UserError as e:
        report(e)  # several problems: one line each
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training began (a run records its own)
        print("autograd-lab: interrupted", file=sys.stderr)
        return 130


def _usage() -> str:
    lines = ["usage: autograd-lab <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`autograd-lab train --help` lists the config; README.md has the reference."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
