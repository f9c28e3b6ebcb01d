"""The `autograd-lab` console script finds the top-level conf/ (installed as the package
autograd_lab.conf) from any working directory: in the editable install of the dev venv, and in a
wheel built offline and installed into a fresh venv that reuses the dev venv's dependencies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli, project_copy

CONF = REPO / "conf"
WHERE = ("import autograd_lab; from autograd_lab.config.keys import CONF_DIR; "
         "print(autograd_lab.__file__); print(CONF_DIR)")


def run(*cmd, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run a command with no PYTHONPATH, so imports come from the install under test only."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)


def conf_file(group: str, name: str) -> dict:
    return yaml.safe_load((CONF / group / f"{name}.yaml").read_text())


# ------------------------------------------------------------------ the editable install
def test_editable_console_script_composes_from_the_repo_conf_in_any_directory(tmp_path):
    """From a directory with no conf/ in it, `autograd-lab train --cfg job` composes the repo's
    conf/ (the resnet18 and synthetic files, key for key) and creates nothing there."""
    out = cli("train", "--cfg", "job", "data=synthetic", "model=resnet18", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"] == conf_file("model", "resnet18")
    assert cfg["model"]["name"] == "resnet18" and cfg["model"]["stem"] == "imagenet"
    assert cfg["data"] == conf_file("data", "synthetic")
    assert list(tmp_path.iterdir()) == []


def test_editable_conf_dir_is_the_top_level_conf_folder(tmp_path):
    """In the dev venv, autograd_lab comes from src/ and CONF_DIR is the repo's top-level conf/."""
    out = run(sys.executable, "-c", WHERE, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    module, conf_dir = (Path(line) for line in out.stdout.split())
    assert module == REPO / "src" / "autograd_lab" / "__init__.py"
    assert conf_dir == CONF and (conf_dir / "train.yaml").is_file()


# ------------------------------------------------------------------ a wheel in a fresh venv
@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(wheel, venv, site-packages): the project's wheel, built offline, installed into a new
    venv whose .pth file puts the dev venv's site-packages (torch, hydra, ...) after its own.

    The wheel is built from a copy of the sources: pip builds a local directory in place, which
    would leave build/ and egg-info behind in the repo."""
    root = tmp_path_factory.mktemp("packaging")
    source = project_copy(root / "source")

    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "--no-index", "--disable-pip-version-check", "-w", root / "dist", source,
                cwd=root)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (root / "dist").glob("autograd_lab-*.whl")

    venv = root / "venv"
    made = run(sys.executable, "-m", "venv", venv, cwd=root)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                    cwd=root).stdout.strip())
    assert site.is_relative_to(venv)
    shared = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "_dev_venv_dependencies.pth").write_text("\n".join(shared) + "\n")

    # --ignore-installed: pip sees the dev venv's (editable) autograd-lab through the .pth file
    # and must not try to uninstall it.
    installed = run(venv / "bin" / "pip", "install", "--no-deps", "--no-index",
                    "--ignore-installed", "--disable-pip-version-check", wheel, cwd=root)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return wheel, venv, site


def test_wheel_carries_every_config_under_autograd_lab_conf(wheel_venv):
    """The wheel holds conf/ as autograd_lab/conf (train.yaml, every group file, __init__.py),
    byte for byte, and installs no top-level `conf` package."""
    wheel, _, _ = wheel_venv
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "autograd_lab/conf/train.yaml" in names
        assert "autograd_lab/conf/model/resnet18.yaml" in names
        assert "autograd_lab/conf/__init__.py" in names
        expected = {f"autograd_lab/conf/{p.relative_to(CONF).as_posix()}"
                    for p in CONF.rglob("*.yaml")}
        assert expected <= names, sorted(expected - names)
        for name in expected:
            assert zf.read(name) == (CONF / name.removeprefix("autograd_lab/conf/")).read_bytes()
        assert not [n for n in names if n.split("/")[0] in ("conf", "src")]
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "autograd-lab = autograd_lab.cli:main" in zf.read(entry_points).decode()


def test_wheel_install_resolves_inside_the_new_venv(wheel_venv, tmp_path):
    """In the new venv, autograd_lab and CONF_DIR are the wheel's files in its own
    site-packages, not the repo's src/ or conf/; torch etc. come from the dev venv unreinstalled."""
    _, venv, site = wheel_venv
    out = run(venv / "bin" / "python", "-c", WHERE, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    module, conf_dir = (Path(line) for line in out.stdout.split())
    assert module == site / "autograd_lab" / "__init__.py"
    assert conf_dir == site / "autograd_lab" / "conf" and (conf_dir / "train.yaml").is_file()
    assert not conf_dir.is_relative_to(REPO)
    assert not (site / "torch").exists() and not (site / "hydra").exists()
    script = venv / "bin" / "autograd-lab"
    assert str(venv / "bin" / "python") in "".join(script.read_text().splitlines()[:3])


def test_wheel_console_script_composes_from_the_installed_conf(wheel_venv, tmp_path):
    """The new venv's `autograd-lab train --cfg job data=synthetic`, run from an empty
    directory, prints the composed config, and a config file added to the installed conf/ (and
    only there) becomes a choice: Hydra reads the venv's copy, not the repo's."""
    _, venv, site = wheel_venv
    exe = venv / "bin" / "autograd-lab"
    out = run(exe, "train", "--cfg", "job", "data=synthetic", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["data"] == conf_file("data", "synthetic")
    assert cfg["model"] == conf_file("model", "smallnet")
    assert list(tmp_path.iterdir()) == []

    probe = site / "autograd_lab" / "conf" / "model" / "installed_probe.yaml"
    assert not (CONF / "model" / probe.name).exists()
    # a model node is a `_target_` node (conf/model/*.yaml)
    probe_cfg = {"_target_": "autograd_lab.model.networks.SmallNet", "name": "installed_probe"}
    probe.write_text(yaml.safe_dump(probe_cfg))
    try:
        out = run(exe, "train", "--cfg", "job", "data=synthetic", "model=installed_probe",
                  cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert yaml.safe_load(out.stdout)["model"] == probe_cfg
    finally:
        probe.unlink()


def test_wheel_help_and_errors_list_the_installed_groups(wheel_venv, tmp_path):
    """Both ways the harness reads configs work from the wheel: Hydra's pkg:// search path
    (`--help` lists the groups) and CONF_DIR (a bad choice fails in one line naming the choices,
    before any run directory exists)."""
    _, venv, _ = wheel_venv
    exe = venv / "bin" / "autograd-lab"
    helped = run(exe, "train", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "model: resnet18, smallnet" in helped.stdout
    assert "data: cifar10, synthetic" in helped.stdout
    bad = run(exe, "train", "data=synthetic", "model=nope", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("autograd-lab: error: model=nope: no such model; "
                                  "choices are: resnet18, smallnet")
    assert list(tmp_path.iterdir()) == []


SCAN = ("import json, sys; from hydra.core.plugins import Plugins; "
        "from hydra.plugins.launcher import Launcher; "
        "found = [c for c in Plugins.instance().discover(Launcher) "
        "if c.__module__ == 'hydra_plugins.autograd_lab_slurm_launcher']; "
        "print(json.dumps({'found': [f'{c.__module__}.{c.__name__}' for c in found], "
        "'file': sys.modules['hydra_plugins.autograd_lab_slurm_launcher'].__file__, "
        "'heavy': [m for m in ('torch', 'lightning', 'pandas') if m in sys.modules]}))")


def test_wheel_hydra_plugin_scan_finds_the_slurm_launcher(wheel_venv, tmp_path):
    """The wheel installs hydra_plugins/autograd_lab_slurm_launcher (and no hydra_plugins/
    __init__.py, which would shadow Hydra's own launcher plugins); in the new venv Hydra's
    plugin scan alone lists its SlurmLauncher, from the venv's copy, and importing it for the
    scan pulls in no torch, Lightning or pandas; `hydra/launcher=slurm` composes to that class."""
    wheel, venv, site = wheel_venv
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert "hydra_plugins/autograd_lab_slurm_launcher/__init__.py" in names
    assert "hydra_plugins/__init__.py" not in names
    out = run(venv / "bin" / "python", "-c", SCAN, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["found"] == ["hydra_plugins.autograd_lab_slurm_launcher.SlurmLauncher"]
    assert Path(seen["file"]) == site / "hydra_plugins" / "autograd_lab_slurm_launcher" / \
        "__init__.py"
    assert seen["heavy"] == []
    info = run(venv / "bin" / "autograd-lab", "train", "--info", "plugins", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert "hydra_plugins.autograd_lab_slurm_launcher " in info.stdout  # the scan's own table
    composed = run(venv / "bin" / "autograd-lab", "train", "--cfg", "hydra",
                   "hydra/launcher=slurm", "data=synthetic", cwd=tmp_path)
    assert composed.returncode == 0, composed.stderr
    launcher = yaml.safe_load(composed.stdout)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.autograd_lab_slurm_launcher.SlurmLauncher"
    assert list(tmp_path.iterdir()) == []
