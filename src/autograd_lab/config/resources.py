"""What a run needs from the machine, checked before it starts: memory for the data, CIFAR-10
on disk or reachable for download. Torch-free."""

from __future__ import annotations

import os
from pathlib import Path

from autograd_lab.config.keys import is_int, is_num

# torchvision's CIFAR10.url (what the seed's CIFAR10(download=True) fetches)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

PROBE_TIMEOUT_S = 5.0  # how long data.download waits to learn that the host cannot be reached


def cifar10_present(root: Path) -> bool:
    """Whether CIFAR-10 is in `root`: its archive, or the folder the archive extracts to."""
    return (root / "cifar-10-batches-py").is_dir() or (root / "cifar-10-python.tar.gz").is_file()


def cifar10_url() -> str:
    """Where data.download fetches cifar-10-python.tar.gz: torchvision's URL, or a mirror named
    by the environment variable AUTOGRAD_LAB_CIFAR10_URL (the tests point it at a local server).
    The archive is checked against torchvision's md5 wherever it comes from."""
    return os.environ.get("AUTOGRAD_LAB_CIFAR10_URL") or CIFAR10_URL


_probed: dict[str, tuple[float, str | None]] = {}


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why `url` cannot be downloaded (asked with an HTTP HEAD request), or None. Bounded by
    `timeout` seconds in all: the name lookup, which no socket timeout covers, runs in a thread
    that is not waited for beyond it. One answer per URL a minute (a sweep checks every job)."""
    import threading
    import time
    import urllib.error
    import urllib.parse
    import urllib.request

    if url in _probed and time.monotonic() - _probed[url][0] < 60:
        return _probed[url][1]
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        return "not an http(s) URL"
    answer: list = []

    def connect() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout):
                answer.append(None)
        except urllib.error.HTTPError as e:  # a server that does not answer HEAD may still GET
            answer.append(None if e.code in (405, 501) else f"HTTP {e.code} {e.reason}")
        except urllib.error.URLError as e:
            reason = e.reason
            answer.append(getattr(reason, "strerror", None) or str(reason))
        except (OSError, ValueError) as e:  # time-outs, a malformed URL
            answer.append(getattr(e, "strerror", None) or str(e) or type(e).__name__)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    why = answer[0] if answer else f"no answer within {timeout:g} s"
    _probed[url] = (time.monotonic(), why)
    return why


def cannot_download(root: Path, url: str, why: str) -> str:
    """The one line for CIFAR-10 missing where it cannot be downloaded."""
    return (f"data=cifar10: CIFAR-10 is not in data.root={root.resolve()} and cannot be "
            f"downloaded from {url} ({why}); put cifar-10-python.tar.gz (or its extracted "
            f"cifar-10-batches-py/) there, or use data=synthetic (runs offline)")


# What a synthetic data set needs in memory, per 3x32x32 image: data.make_synthetic builds a
# split as float32 images with up to four whole-split temporaries alive at once (4 x 12,288 B;
# measured: 1.9 GB at the peak for 40,000 images); reading it back holds the uint8 images
# (3,072 B) beside the decode cache's two serialised copies. Plus the process itself (torch,
# Lightning, the model): about half a GiB.
SYNTHETIC_WRITE_BYTES = 4 * 4 * 3 * 32 * 32

SYNTHETIC_READ_BYTES = 3 * 3 * 32 * 32

PROCESS_BYTES = 2**29


def synthetic_key(data) -> str:
    """The folder name (under data.root/synthetic/) of a synthetic data set: its sizes, noise
    and seed; data.write_synthetic writes it there once."""
    import hashlib

    text = (f"{data['train_size']}-{data['test_size']}-{float(data['noise'])}-"
            f"{data['synthetic_seed']}-v2")
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def available_memory() -> int | None:
    """Bytes this process can still allocate: the kernel's MemAvailable, or less where a
    cgroup (a container, a SLURM job) sets a lower limit; None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def memory_problems(cfg) -> list[str]:
    """A synthetic data set larger than this machine's free memory: one line with what it
    needs, what is available and the largest size that fits, instead of an allocation failure
    (or the OOM killer) once the run has started."""
    data = cfg.get("data") or {}
    train, test = data.get("train_size"), data.get("test_size")
    if data.get("name") != "synthetic" or not (is_int(train) and is_int(test)
                                               and is_num(data.get("noise"))):
        return []
    available = available_memory()
    if available is None:
        return []
    root = Path(str(data.get("root") or ".")).expanduser()
    written = (root / "synthetic" / synthetic_key(data) / "cifar-10-batches-py" /
               "manifest.json").is_file()
    write = 0 if written else SYNTHETIC_WRITE_BYTES * max(train, test)
    need = PROCESS_BYTES + max(write, SYNTHETIC_READ_BYTES * (train + test))
    if need <= available:
        return []
    key, size = ("data.train_size", train) if train >= test else ("data.test_size", test)
    other = test if key == "data.train_size" else train
    room = available - PROCESS_BYTES
    fits = min(room // SYNTHETIC_READ_BYTES - other,
               room // SYNTHETIC_WRITE_BYTES if not written else room)
    how = ("written as float32 images, 48 KiB each at the peak" if write >= SYNTHETIC_READ_BYTES
           * (train + test) else "held as uint8 images beside the decode cache's copies")
    advice = (f"give {key} <= {max(fits, 0):,}" if fits >= 5 else
              "free memory or use a machine with more")
    return [f"{key}={size}: the synthetic data set needs about {need / 2**30:.1f} GiB of "
            f"memory ({how}) and this machine has {available / 2**30:.1f} GiB available; "
            f"{advice}"]


def data_problems(cfg) -> list[str]:
    """CIFAR-10 missing from data.root: with data.download (the default) a problem only when
    its URL cannot be reached within a few seconds (the run downloads it otherwise)."""
    data = cfg.get("data") or {}
    if data.get("name") != "cifar10" or not isinstance(data.get("root"), str):
        return []
    root = Path(str(data.get("root") or ".")).expanduser()
    if cifar10_present(root):
        return []
    if data.get("download"):
        url = cifar10_url()
        why = unreachable(url)
        return [] if why is None else [cannot_download(root, url, why)]
    return [f"data=cifar10: CIFAR-10 not found in data.root={root.resolve()}; put "
            f"cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) there, set "
            f"data.download=true, or use data=synthetic (runs offline)"]
