"""`make setup` installs the project without setuptools' "Package would be ignored" warnings:
every conf/ subfolder is a declared package (pyproject.toml), checked by a real editable install
into a fresh venv (offline, no dependencies: the dev venv's are put on its path). `make
notebooks` runs its kernel without the kernel's own log lines in the output."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO, project_copy


def test_every_conf_folder_is_a_declared_package():
    from setuptools.config.pyprojecttoml import read_configuration

    packages = read_configuration(REPO / "pyproject.toml")["tool"]["setuptools"]["packages"]
    folders = {"autograd_lab.conf." + ".".join(p.relative_to(REPO / "conf").parts)
               for p in (REPO / "conf").rglob("*") if p.is_dir() and p.name != "__pycache__"}
    assert folders <= set(packages), sorted(folders - set(packages))


def test_editable_install_prints_no_setuptools_warnings(tmp_path):
    """`pip install -e .` of a copy of the project into a new venv: exit 0, no "Package would
    be ignored" (15 multi-line warnings, about 600 lines, before), and the console script's
    config folder is the copy's conf/."""
    source = project_copy(tmp_path / "source")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path("
                                "'purelib'))"], capture_output=True, text=True,
                               check=True).stdout.strip())
    (site / "_dev_venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                          "--no-index", "--ignore-installed", "--disable-pip-version-check",
                          "-e", str(source)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "would be ignored" not in text, text[:3000]
    assert len(text.splitlines()) < 60, text[:3000]
    where = subprocess.run([python, "-c", "from autograd_lab.config.keys import CONF_DIR; "
                            "print(CONF_DIR)"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    assert Path(where.stdout.strip()) == source / "conf", where.stderr


def test_the_notebook_kernel_adds_no_log_lines_to_make_notebooks(tmp_path):
    """The project's kernel, made by the Makefile's own rule (as `make notebooks` makes it),
    executes a notebook through nbconvert with nothing of the kernel's in the output: neither
    ipykernel 7's "running over TCP without encryption" warning at every start nor the
    "[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel" that jupyter_client's interrupt
    before shutdown (SIGINT) makes a kernel log when it lands inside a message handler."""
    import nbformat

    kernel = ".venv/share/jupyter/kernels/autograd-lab/kernel.json"
    # -o: never re-run the set-up from here (pip), even where pyproject.toml is newer
    made = subprocess.run(["make", "-o", ".venv/.installed", kernel], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    notebook = tmp_path / "n.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")]),
                   notebook)
    out = subprocess.run([Path(sys.executable).parent / "jupyter", "nbconvert", "--to",
                          "notebook", "--execute", "--ExecutePreprocessor.kernel_name=autograd-lab",
                          "--output-dir", str(tmp_path / "out"), str(notebook)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    executed = nbformat.read(tmp_path / "out" / "n.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "42\n"
    assert "[IPKernelApp]" not in out.stderr, out.stderr
