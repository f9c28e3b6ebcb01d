"""`hydra/launcher=slurm` reaches Hydra through its public plugin API only: importing the
launcher writes nothing into Hydra's registry and imports neither torch nor pandas (Hydra's
plugin scan imports it at every start), and Hydra's own `instantiate_launcher` makes the
harness's launcher from conf/hydra/launcher/slurm.yaml. tests/test_packaging.py checks that the
scan itself finds it in a wheel install; tests/test_slurm.py runs it on a real cluster."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def python(code: str, tmp_path) -> dict:
    """Run `code` in a fresh interpreter (Hydra's registry is a process-wide singleton) and
    return the JSON object it prints last."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


IMPORT_TWICE = """
import importlib, json, sys
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher

plugins = Plugins.instance()  # Hydra's scan (a wheel install imports the plugin module here)
# class_name_to_class is Hydra's private registry, the dict the launcher's import used to
# write; the test wraps it to see writes. If Hydra renames it, this line fails: look again.
assert isinstance(plugins.class_name_to_class, dict)
writes = []
class Recording(dict):
    def __setitem__(self, key, value):
        writes.append(key)
        super().__setitem__(key, value)
plugins.class_name_to_class = Recording(plugins.class_name_to_class)
before = [f"{c.__module__}.{c.__name__}" for c in plugins.discover(Launcher)]

import autograd_lab.sweep.slurm_launcher as code
import hydra_plugins.autograd_lab_slurm_launcher as entry
heavy = sorted(m for m in ("torch", "lightning", "pandas", "matplotlib") if m in sys.modules)
importlib.reload(code)   # whether or not the scan imported them: run their module code again
importlib.reload(entry)
after = [f"{c.__module__}.{c.__name__}" for c in plugins.discover(Launcher)]
print(json.dumps({"writes": writes, "before": before, "after": after, "heavy": heavy}))
"""


def test_importing_the_launcher_registers_nothing_and_stays_light(tmp_path):
    """Importing (and re-importing) the launcher's modules writes no key into Hydra's registry
    (the old module wrote `Plugins.instance().class_name_to_class` on import) and changes
    nothing Hydra's public `discover` lists; torch, Lightning, pandas and matplotlib stay
    unimported, so the plugin scan at every Hydra start stays quick."""
    seen = python(IMPORT_TWICE, tmp_path)
    assert seen["writes"] == []
    assert seen["after"] == seen["before"]
    assert seen["heavy"] == []


MAKE_LAUNCHER = """
import json
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext
from hydra.utils import instantiate

from autograd_lab.config.compose import compose

cfg = compose(["data=synthetic", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
               "hydra.launcher.max_requeues=5"], return_hydra_config=True)
plugins = Plugins.instance()
scanned = [f"{c.__module__}.{c.__name__}" for c in plugins.discover(Launcher)]
# the launcher's callback, as Hydra's multirun calls it before making its launcher
instantiate(cfg.hydra.callbacks.slurm_launcher).on_multirun_start(config=cfg)
listed = [f"{c.__module__}.{c.__name__}" for c in plugins.discover(Launcher)]
launcher = plugins.instantiate_launcher(
    hydra_context=HydraContext(config_loader=None, callbacks=None), task_function=print,
    config=cfg)
print(json.dumps({"target": cfg.hydra.launcher._target_, "scanned": scanned, "listed": listed,
                  "class": f"{type(launcher).__module__}.{type(launcher).__name__}",
                  "bases": [f"{c.__module__}.{c.__name__}" for c in type(launcher).__mro__],
                  "wait": launcher.wait, "max_requeues": launcher.max_requeues,
                  "partition": launcher.params["partition"]}))
"""


def test_hydra_makes_the_launcher_from_the_config_through_its_public_api(tmp_path):
    """Hydra's public Plugins.instantiate_launcher, given the composed slurm.yaml, returns the
    harness's launcher (with its own keys and submitit's) under the config's `_target_`, after
    the launcher's callback ran as a multirun runs it. Where the scan listed the class (a
    wheel install) the callback leaves the list as it was; where it did not (the editable dev
    install) the callback added exactly that class through Plugins.register."""
    seen = python(MAKE_LAUNCHER, tmp_path)
    target = "hydra_plugins.autograd_lab_slurm_launcher.SlurmLauncher"
    assert seen["target"] == target and seen["class"] == target
    assert "autograd_lab.sweep.slurm_launcher.SlurmLauncher" in seen["bases"]
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in \
        seen["bases"]
    assert (seen["wait"], seen["max_requeues"], seen["partition"]) == (True, 5, "gpu")
    if target in seen["scanned"]:
        assert seen["listed"] == seen["scanned"]
    else:
        assert seen["listed"] == [*seen["scanned"], target]


def test_the_plugin_package_is_a_namespace_portion():
    """src/hydra_plugins has no __init__.py: it shares the `hydra_plugins` namespace with
    Hydra's own launcher plugins (an __init__.py would hide them, or be hidden)."""
    assert not (REPO / "src" / "hydra_plugins" / "__init__.py").exists()
    assert (REPO / "src" / "hydra_plugins" / "autograd_lab_slurm_launcher" /
            "__init__.py").is_file()
