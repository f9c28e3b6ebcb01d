"""data=cifar10 downloads CIFAR-10 when it is missing, as the seed's CIFAR10(download=True): from
a local HTTP server on 127.0.0.1 serving a small archive in the real on-disk format (the URL is
AUTOGRAD_LAB_CIFAR10_URL); offline, one line with the URL and the folder, within seconds."""

from __future__ import annotations

import functools
import http.server
import socket
import tarfile
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import cli, make_cfg
from test_data import write_fake_cifar10

from autograd_lab.config.resources import unreachable
from autograd_lab.data.loader import load_split_tensors

NO_PROXY = "127.0.0.1,localhost"  # a proxy in the environment must not take the local server's


@pytest.fixture
def served(tmp_path):
    """(url, arrays written): a local HTTP server whose /cifar-10-python.tar.gz is a small
    archive of CIFAR-10's real layout; the requests it got are in `server.paths`."""
    source = tmp_path / "source"
    written = write_fake_cifar10(source)
    public = tmp_path / "public"
    public.mkdir()
    with tarfile.open(public / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    paths = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            paths.append((self.command, self.path))

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(public)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"
    try:
        yield url, written, paths
    finally:
        server.shutdown()
        server.server_close()


def test_missing_cifar10_is_downloaded_md5_checked_and_read(served, tmp_path, monkeypatch):
    """The archive is fetched into data.root (no temporary file left), checked against
    torchvision's md5 (patched: a small archive cannot match the real one), extracted and read
    by the safe reader: the arrays are the ones served."""
    url, written, paths = served
    monkeypatch.setenv("AUTOGRAD_LAB_CIFAR10_URL", url)
    monkeypatch.setenv("no_proxy", NO_PROXY)
    root = tmp_path / "data"
    cfg = make_cfg("data=cifar10", f"data.root={root}", small=False).data
    assert cfg.download is True  # the default, as the seed's CIFAR10(download=True)
    checked = []

    def md5_check(path, md5=None):
        checked.append((Path(path).name, md5))
        return True

    with mock.patch("torchvision.datasets.cifar.check_integrity", side_effect=md5_check):
        tensors = load_split_tensors(cfg)
    data, labels = written["train"][0]
    assert torch.equal(tensors["train_x"][:20], torch.from_numpy(data.reshape(20, 3, 32, 32)))
    assert tensors["test_y"].tolist() == written["test"][0][1]
    assert (root / "cifar-10-python.tar.gz").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py",
                                                      "cifar-10-python.tar.gz"]
    assert ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a") in checked
    assert ("GET", "/cifar-10-python.tar.gz") in paths


def test_the_preflight_lets_a_reachable_download_through(served, tmp_path):
    """Through the CLI with the URL reachable: no preflight error, the run starts, says it
    downloads and fetches the archive, which then fails torchvision's md5 check (it is not the
    real CIFAR-10): one line, and the file is not kept for the next run to trust."""
    url, _, paths = served
    out = cli("train", "data=cifar10", "trainer.max_steps=1", "trainer.progress_bar=false",
              cwd=tmp_path, env={"AUTOGRAD_LAB_CIFAR10_URL": url, "no_proxy": NO_PROXY})
    assert ("GET", "/cifar-10-python.tar.gz") in paths, out.stderr
    assert (f"autograd-lab: CIFAR-10 is not in data.root={(tmp_path / 'data').resolve()}: "
            f"downloading {url} (170 MB; data.download=false turns this off)") in out.stderr
    assert (f"the archive downloaded from {url} does not match torchvision's md5") in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "data" / "cifar-10-python.tar.gz").exists()
    assert not list((tmp_path / "data").glob(".*.part"))
    assert out.returncode != 0


def test_offline_is_one_line_with_the_url_and_the_folder(tmp_path):
    """A closed port on 127.0.0.1: one line naming the URL, the folder and what to do; exit 2;
    nothing created (checked before any run directory exists)."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"
    out = cli("train", cwd=tmp_path, env={"AUTOGRAD_LAB_CIFAR10_URL": url, "no_proxy": NO_PROXY},
              timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"autograd-lab: error: data=cifar10: CIFAR-10 is not in data.root="
        f"{(tmp_path / 'data').resolve()} and cannot be downloaded from {url} (Connection "
        f"refused); put cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) there, "
        f"or use data=synthetic (runs offline)"]
    assert list(tmp_path.iterdir()) == []


def test_a_host_that_never_answers_is_given_up_on_in_seconds(monkeypatch):
    """A server that accepts the connection and never answers: the probe gives up after its
    timeout (not the minutes a socket without one would wait)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)  # the kernel completes the handshake; nobody ever reads or answers
        url = f"http://127.0.0.1:{s.getsockname()[1]}/cifar-10-python.tar.gz"
        monkeypatch.setenv("no_proxy", NO_PROXY)
        start = time.monotonic()
        why = unreachable(url, timeout=1.0)
        waited = time.monotonic() - start
    assert why in ("timed out", "no answer within 1 s"), why
    assert waited < 30  # generous under load; unbounded, this call would wait for ever
