"""README.md is checked: every command and Python example in its code blocks runs, in a quick
form, or is marked in the README as not run, with the reason; sample output marked as such is
compared line by line.

A small Markdown-aware collector (no plugin needed). It reads the fenced code blocks in order
and the HTML comments just above each (invisible on GitHub):

  <!-- not run: REASON -->             the block is not run (the reason is required)
  <!-- not run `PREFIX`: REASON -->    its commands that start with PREFIX are not run
  <!-- output: exact -->               `$ command` lines, each followed by exactly what it prints
                                       (the test's folder shown as /home/me/autograd-lab)
  <!-- output: not checked: REASON --> `$ command` lines run; what follows them is not compared
  <!-- quick: OVERRIDES -->            the overrides that make this block's runs quick (instead
                                       of QUICK below)
  <!-- quick: OLD => NEW -->           in a Python block: run it with the text OLD replaced by NEW

Commands run in one temporary folder, in README order (a later block reads what an earlier
one wrote), against the installed console script (`.venv` is linked into the folder, so
`.venv/bin/...` works as written), one torch thread, offline. Training commands get the quick
overrides appended (tiny synthetic data, a few steps), so the folders they make are named
differently from the README's: after each run the README's name for it (what the CLI makes
for the command as written) is linked to it, so `summarize DIR`, `ckpt_path=runs/...` and the
Python examples find it by the README's name (and fail if the README names a folder the CLI
does not make). `make X` is checked with `make -n X` in the repo, and the `autograd-lab` lines
of its recipe run in the quick form. A comment `# ... exits N` on a command gives its exit code.
Python blocks run as written (or with their quick markers applied), each in a fresh interpreter.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO

README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent
SHOWN_ROOT = "/home/me/autograd-lab"  # how sample output shows the user's clone
QUICK = ["data=synthetic", "data.train_size=64", "data.test_size=32", "data.batch_size=16",
         "data.val_batch_size=32", "trainer.max_steps=4", "trainer.progress_bar=false"]
MARKER = re.compile(r"<!--\s*(.*?)\s*-->", re.S)


@dataclass
class Command:
    line: int  # README line number
    text: str  # as written (continuation lines joined)
    words: list[str]
    comment: str = ""
    output: list[str] | None = None  # the sample output shown under a `$ command`


@dataclass
class Block:
    line: int  # README line number of the opening fence
    lang: str
    body: list[str]
    markers: list[str] = field(default_factory=list)

    @property
    def skipped_all(self) -> str | None:
        return next((m.split(":", 1)[1].strip() for m in self.markers
                     if re.match(r"not run\s*:", m)), None)

    def skipped(self, command: Command) -> str | None:
        for m in self.markers:
            hit = re.match(r"not run\s+`([^`]+)`\s*:\s*(.*)", m, re.S)
            if hit and command.text.startswith(hit.group(1)):
                return hit.group(2)
        return self.skipped_all

    @property
    def output_mode(self) -> str | None:
        m = next((m for m in self.markers if m.startswith("output:")), None)
        return None if m is None else m.split(":", 1)[1].strip().split(":")[0].strip()

    @property
    def quick(self) -> list[str]:
        m = next((m for m in self.markers if m.startswith("quick:") and " => " not in m), None)
        return QUICK if m is None else shlex.split(m.split(":", 1)[1])

    @property
    def replacements(self) -> list[tuple[str, str]]:
        return [tuple(m.split(":", 1)[1].strip().split(" => ", 1)) for m in self.markers
                if m.startswith("quick:") and " => " in m]

    def commands(self) -> list[Command]:
        """Shell command lines (a `$ ` prompt in output blocks), `\\` continuations joined,
        each with its trailing comment; in output blocks, the lines under each command."""
        out: list[Command] = []
        prompt = self.output_mode is not None
        i = 0
        while i < len(self.body):
            start, raw = i, self.body[i]
            i += 1
            if prompt and not raw.startswith("$ "):
                if out and out[-1].output is not None:
                    out[-1].output.append(raw)
                continue
            text = raw[2:] if prompt else raw
            while text.rstrip().endswith("\\") and i < len(self.body):
                text = text.rstrip()[:-1] + " " + self.body[i].strip()
                i += 1
            if not text.strip():
                continue
            lexer = shlex.shlex(text, posix=True, punctuation_chars=False)
            lexer.whitespace_split, lexer.commenters = True, "#"
            words = list(lexer)
            comment = text.split(" #", 1)[1].strip() if " #" in text else ""
            out.append(Command(self.line + 1 + start, text.split(" #", 1)[0].strip(), words,
                               comment, [] if prompt else None))
        return out


def parse(path: Path = README) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        markers, k = [], i - 1  # the comments just above the fence (blank lines between ok)
        while k >= 0 and (not lines[k].strip() or lines[k].strip().endswith("-->")):
            if lines[k].strip():
                start = k
                while "<!--" not in lines[start]:
                    start -= 1
                markers[:0] = MARKER.findall("\n".join(lines[start:k + 1]))
                k = start
            k -= 1
        blocks.append(Block(i + 1, fence.group(1), lines[i + 1:j], markers))
        i = j + 1
    return blocks


BLOCKS = parse()


# ------------------------------------------------------------------ running commands
def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg", PATH=f"{VENV_BIN}:{env.get('PATH', '')}")
    return env


def _run(argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _where(command: Command, argv: list[str]) -> str:
    return f"README.md line {command.line}: `{command.text}` (run as: {shlex.join(argv)})"


def _is_override(word: str) -> bool:
    return "=" in word and not word.startswith("-")


def _readme_folder(words: list[str]) -> str | None:
    """The folder the CLI makes for `autograd-lab train <words>` as written: a sweep's
    (SweepPlan.sweep_dir) or a run's (runs/ + Hydra's override_dirname, path_safe)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from autograd_lab.config.keys import NON_RESULT_KEYS, path_safe
    from autograd_lab.config.preflight import check_overrides

    overrides = [w for w in words if _is_override(w)]
    if any(w.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for w in overrides):
        return None
    if "-m" in words or "--multirun" in words:
        return check_overrides(overrides, multirun=True, files=False).sweep_dir()
    parsed = OverridesParser.create().parse_overrides(overrides)
    lines = sorted(o.input_line for o in parsed if o.key_or_group not in NON_RESULT_KEYS)
    return f"runs/{path_safe(','.join(lines))}"


def _quick(words: list[str], block: Block) -> list[str]:
    """The quick form of a command: training commands get the block's quick overrides."""
    if words[:1] == ["python"] and words[1:3] == ["-m", "autograd_lab.train"]:
        return [str(VENV_BIN / "python"), *words[1:], *block.quick]
    if words[0].endswith("autograd-lab") and len(words) > 1:
        exe = str(VENV_BIN / "autograd-lab")
        sub, rest = words[1], words[2:]
        fast = any(w in ("--help", "-h", "--hydra-help", "--cfg", "-c") for w in rest)
        if sub in ("train", "demo") and not fast:
            return [exe, sub, *rest, *block.quick]
        if sub in ("profile", "step-check", "graph") and "--op" not in rest:
            return [exe, sub, *rest, *[q for q in block.quick if q.startswith("data.")]]
        if sub == "profile":  # the seed's Conv1d case: 10 iterations, not 1000
            return [exe, sub, *rest, "--iterations", "10"]
        return [exe, sub, *rest]
    return words


def _expected_exit(command: Command) -> int:
    hit = re.search(r"exits (\d+)", command.comment)
    if hit:
        return int(hit.group(1))
    if command.output and any(line.startswith("autograd-lab: error:")
                              for line in command.output):
        return 2
    return 0


def _server(argv: list[str], command: Command, cwd: Path) -> None:
    """`autograd-lab tensorboard ...`: it prints its URL, then stops on Ctrl-C with exit 0."""
    proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the URL line, or nothing if it exits
        assert line.startswith("TensorBoard: http://127.0.0.1:"), (
            f"{_where(command, argv)}: printed {line!r}; stderr: {proc.stderr.read()[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"{_where(command, argv)}: exit {proc.returncode}: {err[-2000:]}"


def _check(command: Command, block: Block, argv: list[str], rc: int, text: str,
           cwd: Path) -> None:
    """A command's exit code, and its output where the README shows it as exact."""
    text = text.replace(str(cwd), SHOWN_ROOT)
    assert rc == _expected_exit(command), (
        f"{_where(command, argv)}: exit {rc}, expected {_expected_exit(command)}:\n"
        f"{text[-3000:]}")
    if block.output_mode == "exact":
        got = [ln for ln in text.splitlines() if ln.strip()]
        assert got == [ln for ln in command.output if ln.strip()], (
            f"{_where(command, argv)}: the README shows\n" + "\n".join(command.output)
            + "\nbut it printed\n" + "\n".join(got))


@dataclass
class Step:
    """One command as it runs: the README's command, its argv, and for training commands the
    README's folder name to link to the folder the quick form made."""
    command: Command
    block: Block
    argv: list[str]
    link: tuple[str, str] | None = None

    @property
    def grouped(self) -> bool:
        """Run with the others in one process (cli.main, the console script's function): one
        torch import for all of them. Not: exact output (run as the console script itself),
        servers, `python -m` and the make dry-runs."""
        return (self.block.output_mode != "exact" and self.argv[0].endswith("bin/autograd-lab")
                and self.argv[1] != "tensorboard")


def steps(command: Command, block: Block, cwd: Path) -> list[Step]:
    """What running a README command means (a make target: its recipe's autograd-lab lines)."""
    words = command.words
    if words[:1] == ["."]:  # `. .venv/bin/activate`: the commands here use the venv already
        assert (cwd / words[1]).is_file(), _where(command, words)
        return []
    if words[0] == "make":
        dry = _run(["make", "-n", *words[1:]], cwd=REPO)
        assert dry.returncode == 0, f"{_where(command, words)}: make -n: {dry.stderr[-2000:]}"
        out = []
        for line in dry.stdout.splitlines():  # the recipe's own autograd-lab commands
            if line.startswith(".venv/bin/autograd-lab "):
                recipe = Command(command.line, line, ["autograd-lab", *shlex.split(line)[1:]],
                                 command.comment)
                out += steps(recipe, block, cwd)
        return out
    known = (words[0].endswith("autograd-lab") or words[:3] == ["python", "-m",
                                                                 "autograd_lab.train"])
    assert known, (f"{_where(command, words)}: not a command this collector knows how to run; "
                   f"mark the block <!-- not run: REASON --> in the README")
    # exact output is the command's own: run as written (these fail before anything trains)
    argv = [str(VENV_BIN / "autograd-lab"), *words[1:]] if block.output_mode == "exact" \
        else _quick(words, block)
    step = Step(command, block, argv)
    if argv[-len(block.quick):] == block.quick and len(words) > 1 and words[1] in ("train",
                                                                                  "demo"):
        full = words[2:] if words[1] == "train" else ["-m", "experiment=zero_grad_study",
                                                      "data=synthetic", *words[2:]]
        written, made = _readme_folder(full), _readme_folder([*full, *block.quick])
        if written and written != made:
            step.link = (written, made)
    return [step]


def _link(step: Step, cwd: Path) -> None:
    """The README's folder name for the command, linked to the folder its quick form made."""
    if step.link is None or not (cwd / step.link[1]).exists():
        return
    link = cwd / step.link[0]
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(cwd / step.link[1], link.parent),
                        target_is_directory=True)


# Runs the grouped commands one after the other through autograd_lab.cli.main (what the
# console script calls), each one's stdout and stderr captured at the file descriptors.
RUNNER = """
import json, os, sys
from pathlib import Path
from autograd_lab.cli import main
jobs_file, results_file = sys.argv[1:3]
jobs = json.loads(Path(jobs_file).read_text())
results = []
for job in jobs:
    out = open(job["out"], "w")
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(out.fileno(), 1); os.dup2(out.fileno(), 2)
    sys.argv = [job["exe"], *job["argv"]]
    try:
        rc = main(job["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        import traceback
        traceback.print_exc()
        rc = 99
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    os.close(saved[0]); os.close(saved[1]); out.close()
    results.append(rc)
    for written, made in job["links"]:
        if (Path(made)).exists() and not Path(written).exists():
            Path(written).parent.mkdir(parents=True, exist_ok=True)
            Path(written).symlink_to(os.path.relpath(made, Path(written).parent),
                                     target_is_directory=True)
Path(results_file).write_text(json.dumps(results))
"""


def run_grouped(all_steps: list[Step], cwd: Path) -> dict[int, tuple[int, str]]:
    """Run the grouped steps in one process, in README order; {id(step): (exit, output)}."""
    import json

    group = [s for s in all_steps if s.grouped]
    logs = cwd.parent / f"{cwd.name}-logs"
    logs.mkdir(exist_ok=True)
    jobs = [{"exe": s.argv[0], "argv": s.argv[1:], "out": str(logs / f"{i}.txt"),
             "links": [] if s.link is None else [[str(cwd / s.link[0]), str(cwd / s.link[1])]]}
            for i, s in enumerate(group)]
    (logs / "jobs.json").write_text(json.dumps(jobs))
    out = _run([str(VENV_BIN / "python"), "-c", RUNNER, str(logs / "jobs.json"),
                str(logs / "results.json")], cwd, timeout=1800)
    assert out.returncode == 0, f"the runner failed: {(out.stdout + out.stderr)[-3000:]}"
    codes = json.loads((logs / "results.json").read_text())
    return {id(s): (rc, (logs / f"{i}.txt").read_text()) for i, (s, rc)
            in enumerate(zip(group, codes, strict=True))}


def run_step(step: Step, cwd: Path, grouped: dict) -> None:
    if step.grouped:
        rc, text = grouped[id(step)]
        return _check(step.command, step.block, step.argv, rc, text, cwd)
    if step.argv[1:2] == ["tensorboard"]:
        return _server(step.argv, step.command, cwd)
    out = _run(step.argv, cwd)
    _check(step.command, step.block, step.argv, out.returncode, out.stdout + out.stderr, cwd)
    _link(step, cwd)


def run_python(block: Block, cwd: Path) -> None:
    code = "\n".join(block.body)
    for old, new in block.replacements:  # the quick form the README's marker states
        assert old in code, f"README.md line {block.line}: quick marker: {old!r} not in the code"
        code = code.replace(old, new)
    out = _run([str(VENV_BIN / "python"), "-c", code], cwd)
    assert out.returncode == 0, (f"README.md line {block.line}: the Python example failed:\n"
                                 f"{(out.stdout + out.stderr)[-3000:]}")


# ------------------------------------------------------------------ the tests
def _block_steps(block: Block, cwd: Path) -> list[Step]:
    if block.skipped_all or block.lang == "python":
        return []
    commands = block.commands()
    assert commands, f"README.md line {block.line}: no command in the block; mark it not run"
    return [s for c in commands if block.skipped(c) is None for s in steps(c, block, cwd)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The user's clone, as the README's commands see it (empty but for the venv), and every
    block's steps with the grouped ones already run (in README order, in one process)."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / ".venv").symlink_to(REPO / ".venv", target_is_directory=True)
    plan: dict = {}
    for b in BLOCKS:  # a block the collector cannot read fails its own test, not the others
        try:
            plan[b.line] = _block_steps(b, folder)
        except (AssertionError, ValueError) as e:
            plan[b.line] = e
    grouped = run_grouped([s for b in BLOCKS if isinstance(plan[b.line], list)
                           for s in plan[b.line]], folder)
    return folder, plan, grouped


def test_the_collector_finds_the_readme_blocks():
    assert len(BLOCKS) >= 15
    langs = {b.lang for b in BLOCKS}
    assert {"bash", "python"} <= langs
    # every marker is one the collector reads, and every "not run" gives a reason
    for block in BLOCKS:
        for m in block.markers:
            assert re.match(r"(not run( `[^`]+`)?\s*:\s*\S|output:\s*(exact|not checked:\s*\S)|"
                            r"quick:)", m), f"README.md line {block.line}: marker {m!r}"


RUN = [b for b in BLOCKS if not b.skipped_all]  # a block marked "not run" has its reason, checked
# above; it is no test of its own (nothing of it runs)


@pytest.mark.parametrize("block", RUN, ids=[f"line{b.line}" for b in RUN])
def test_readme_block_runs(block, workspace):
    """Each block's commands (the grouped ones ran in the fixture: here their results are
    checked, the others run now, in order); a Python block runs in a fresh interpreter."""
    cwd, plan, grouped = workspace
    if block.lang == "python":
        return run_python(block, cwd)
    if isinstance(plan[block.line], Exception):
        raise plan[block.line]
    for step in plan[block.line]:
        run_step(step, cwd, grouped)
