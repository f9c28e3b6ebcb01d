"""The package's structure, read from its source with `ast` (scripts/architecture.py): no import
circles, package imports at the top of each module but in the entry points, dependencies
pointing one way between the layers, no module over 350 lines, a docstring first in each
module, one home for each list of config keys, and docs/architecture.md's diagram up to date."""

from __future__ import annotations

import ast
import importlib.util
import itertools
import subprocess
import sys

from conftest import REPO

spec = importlib.util.spec_from_file_location("architecture", REPO / "scripts" / "architecture.py")
arch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(arch)

EDGES = arch.imports()


def test_the_reader_sees_the_imports_it_must_see():
    """The oracle for the checks below: imports known to exist, at the top and inside a
    function, are found (a reader that found nothing would pass every check)."""
    pairs = {(a, b): lazy for a, b, _, lazy in EDGES}
    assert pairs[("autograd_lab.job.recorder", "autograd_lab.job.board")] is False
    assert pairs[("autograd_lab.cli", "autograd_lab.cli.tools")] is True  # lazy, an entry
    assert len(arch.modules()) > 40 and len(EDGES) > 100
    # and a circle is a circle: the same reader on a made-up pair
    assert arch.circles([("a", "b", 1, False), ("b", "a", 2, True)]) == [["a", "b"]]


def test_no_import_circles_counting_imports_inside_functions():
    assert arch.circles(EDGES) == []


def test_package_imports_sit_at_the_top_but_in_the_entry_points():
    lazy = [f"{a} line {line}: imports {b} inside a function" for a, b, line, inside in EDGES
            if inside and not arch.is_entry_point(a)]
    assert lazy == []


def test_dependencies_point_one_way_between_the_layers():
    upward = [f"{a} -> {b}" for a, b, *_ in EDGES
              if arch.layer(b) > arch.layer(a)
              or (arch.layer(b) == arch.layer(a) and arch.part(a) != arch.part(b)
                  and arch.layer(a) not in (0, len(arch.LAYERS) - 1))]
    assert upward == []


def test_no_module_over_350_lines_and_each_says_what_it_is_for():
    for name, path in arch.modules().items():
        text = path.read_text()
        assert len(text.splitlines()) <= arch.MAX_LINES, f"{name}: {len(text.splitlines())} lines"
        doc = ast.get_docstring(ast.parse(text))
        assert doc and len(doc) > 40 and "TODO" not in doc, f"{name}: no docstring saying what for"


def _string_collections():
    """Every module-level tuple, list, set or frozenset of 3+ strings: name -> set of strings."""
    found = {}
    for name, path in arch.modules().items():
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
                continue
            value = node.value
            if isinstance(value, ast.Call) and value.args:  # frozenset({...})
                value = value.args[0]
            if not isinstance(value, (ast.Tuple, ast.List, ast.Set)):
                continue
            items = [e.value for e in value.elts if isinstance(e, ast.Constant)
                     and isinstance(e.value, str)]
            if len(items) >= 3 and len(items) == len(value.elts):
                target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                found[f"{name}.{ast.unparse(target)}"] = set(items)
    return found


def test_each_list_of_keys_has_one_home():
    """Two modules with lists that share most of their names (the group names, the non-result
    keys) is one fact kept twice: they drift (they did: the summary's and the HParams' group
    names disagreed on scheduler, size and trainer)."""
    lists = _string_collections()
    assert "autograd_lab.config.keys.GROUPS" in lists and len(lists) > 10
    # two facts that share names: the config nodes closed to added keys are named like the
    # groups that fill them, but the sets differ by what they are for (train, eval, log, ...)
    different = {("autograd_lab.config.keys.GROUPS", "autograd_lab.config.preflight.CLOSED_NODES")}
    twice = []
    for (a, xs), (b, ys) in itertools.combinations(lists.items(), 2):
        shared = xs & ys
        if (a.rsplit(".", 1)[0] != b.rsplit(".", 1)[0] and (a, b) not in different
                and len(shared) >= 0.5 * min(len(xs), len(ys))):
            twice.append(f"{a} and {b} share {sorted(shared)}")
    assert twice == []


def test_no_module_is_named_like_a_function_of_the_package():
    """`al.run(...)` in a notebook: a subpackage `autograd_lab.run`, once imported (training
    imports it), would replace the package's `run` function with the module."""
    import autograd_lab

    names = {name.split(".")[1] for name in arch.modules() if name.count(".") >= 1}
    assert "train" in names and "sweep" in names  # the reader sees the package's parts
    assert set(autograd_lab.__all__) & names == set()


def test_the_architecture_page_shows_the_code_as_it_is():
    assert subprocess.run([sys.executable, str(REPO / "scripts" / "architecture.py"), "--check"],
                          capture_output=True, text=True).returncode == 0, \
        "docs/architecture.md is out of date: run `make docs`"


def test_the_lower_layers_import_no_torch():
    """The config checks, file safety, leaves, the console script, the Hydra app's module and
    the sweep's preflight callback run before a job imports torch (`--help`, `--cfg job`, bad
    input in one line, fast)."""
    light = [n for n in arch.modules() if arch.part(n) in ("config", "disk", "errors", "text",
                                                             "cli", "train")]
    light.remove("autograd_lab.cli.tools")  # step-check, graph, profile: imported for them only
    light.append("autograd_lab.sweep.callbacks")
    code = ("import importlib, sys\n"
            f"for name in {light!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in ('torch', 'lightning', 'pandas', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
