"""Where the tritonserver binary and its Python backend are, and the environment it runs in.

The nvidia-pytriton wheel ships a real tritonserver with the Python backend; the backend's stub
for this Python is assembled once into a private cache (never touching site-packages).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import sysconfig
import tempfile
from pathlib import Path

from ..errors import HygeiaError


class TritonServerError(HygeiaError):
    """tritonserver could not be found, did not start, or a model failed to load."""


def _pytriton_root() -> Path:
    try:
        import pytriton  # type: ignore[import-not-found]
    except ImportError:
        raise TritonServerError("tritonserver not found: install the serving extra "
                                "(pip install 'hygeia[serving]', which brings nvidia-pytriton)") from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise TritonServerError(f"tritonserver not found under {root}")
    return root


def tritonserver_binary() -> Path:
    """Path of the tritonserver executable (env ``HYGEIA_TRITONSERVER`` overrides)."""
    env = os.environ.get("HYGEIA_TRITONSERVER")
    if env:
        return Path(env)
    return _pytriton_root() / "bin" / "tritonserver"


def stub_path(pyver: str | None = None) -> Path:
    """The Python-backend stub the wheel ships for Python ``pyver`` (default: this one)."""
    pyver = pyver or f"{sys.version_info.major}.{sys.version_info.minor}"
    return _pytriton_root() / "python_backend_stubs" / pyver / "triton_python_backend_stub"


def wheel_libs() -> Path:
    """The wheel's bundled libraries (a renamed libcudart the stub links through its RPATH)."""
    return _pytriton_root().parent.parent / "nvidia_pytriton.libs"


def backend_directory() -> Path:
    """A backends folder whose python backend has the stub for this Python (3.x).

    The wheel ships the stubs apart (``python_backend_stubs/3.11/``); Triton expects the stub next
    to ``libtriton_python.so``. We assemble a private copy in the user cache (never touching
    site-packages), once per wheel location and Python version.
    """
    env = os.environ.get("HYGEIA_TRITON_BACKENDS")
    if env:
        return Path(env)
    root = _pytriton_root()
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = stub_path(pyver)
    if not stub.is_file():
        raise TritonServerError(f"no Python backend stub for Python {pyver} in {stub.parent.parent}")
    src = root / "backends" / "python"
    if (src / "triton_python_backend_stub").is_file():
        return root / "backends"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hygeia" / "triton"
    key = f"{hashlib.sha256(str(root).encode()).hexdigest()[:10]}-py{pyver}-{int(stub.stat().st_mtime)}"
    dest = cache / key / "backends"
    if (dest / "python" / "triton_python_backend_stub").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".backends.", dir=dest.parent))
    try:
        (tmp / "python").mkdir()
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / "python" / f.name)
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        try:
            os.replace(tmp, dest)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port, below the OS's ephemeral range where it can (from 20000 up to that range's
    start), so that no outgoing connection takes it between this call and the server's bind (a
    server that boots for seconds, such as RabbitMQ, met that); else one the OS picks."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    pick = random.SystemRandom()
    for _ in range(64 if low > 21000 else 0):
        port = pick.randrange(20000, low)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("", port))  # any address: free for whatever the server binds
            return port
        except OSError:
            continue
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_env(threads: int | None = None) -> dict[str, str]:
    """Environment for tritonserver: this venv's ``bin`` first on PATH (the stub runs its Python)."""
    env = dict(os.environ)
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONNOUSERSITE", "1")
    # The stub links libpython3.X.so: it must load the libpython of the Python that runs us (else
    # e.g. Debian's 3.11.2 libpython meets pyenv's 3.11.7 stdlib and `import ssl` fails), and it
    # finds libcudart through an RPATH relative to the wheel, which our copy of the stub breaks.
    paths = []
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlib = sysconfig.get_config_var("LDLIBRARY") or ""
    if libdir and ldlib and (Path(libdir) / ldlib).exists():
        paths.append(libdir)
    try:
        libs = wheel_libs()
        if libs.is_dir():
            paths.append(str(libs))
    except TritonServerError:
        pass
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (*paths, env.get("LD_LIBRARY_PATH", "")) if p)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


SHM_PREFIX = "triton_python_backend_shm_region_"  # the Python backend's regions in /dev/shm


def shm_regions(folder: str = "/dev/shm", prefixes: tuple[str, ...] = (SHM_PREFIX,)) -> set[str]:
    """Names of the Python backend's shared-memory regions present now (``prefixes``: other
    servers' names too, e.g. PyTriton's ``"pytrtion"``)."""
    try:
        return {f for f in os.listdir(folder) if f.startswith(prefixes)}
    except OSError:
        return set()


def _mapped_regions() -> set[str]:
    """Regions some live process still maps (Linux /proc/*/maps)."""
    names: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps", errors="replace") as f:
                for line in f:
                    i = line.find(SHM_PREFIX)
                    if i >= 0:
                        names.add(line[i:].split()[0])
        except OSError:
            pass
    return names


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies hold no mappings; Linux /proc)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state, _ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if int(pgrp) == pgid and state != "Z":
                return True
    return False


def remove_stale_regions(before: set[str], folder: str = "/dev/shm", min_age_s: float = 0.5,
                         pgid: int | None = None, wait_s: float = 3.0,
                         prefixes: tuple[str, ...] = (SHM_PREFIX,)) -> list[str]:
    """Unlink the regions that appeared since ``before`` and that no live process maps (unchanged
    for ``min_age_s``: a server starting beside this one maps a region as soon as it creates it,
    and this guards that moment). A tritonserver that
    exits cleanly removes its own; one that is killed leaves them, ~2 MB per stub, in RAM-backed
    /dev/shm until reboot. ``pgid``: first wait up to ``wait_s`` for that process group (the
    server's) to finish exiting; once it has, its regions go whatever their age. Returns the
    names removed."""
    import time

    deadline = time.monotonic() + wait_s
    while pgid is not None and time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.05)  # SIGKILLed stubs let go of their regions as they exit
    gone = pgid is not None and not _group_alive(pgid)
    new = shm_regions(folder, prefixes) - before
    if not new:
        return []
    removed, now = [], time.time()  # with the group gone, its regions were last touched before now
    for name in sorted(new - _mapped_regions()):
        path = os.path.join(folder, name)
        try:
            if (now - os.stat(path).st_mtime >= min_age_s) or (gone and os.stat(path).st_mtime <= now):
                os.unlink(path)
                removed.append(name)
        except OSError:
            pass
    return removed


def stub_processes(pgid: int) -> dict[str, set[int]]:
    """Live Python-backend stubs in process group ``pgid`` (a tritonserver's): model -> pids, from
    /proc (zombies have no cmdline, so dead stubs are not listed)."""
    out: dict[str, set[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getpgid(int(d.name)) != pgid:
                continue
            args = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        if args and args[0].endswith(b"triton_python_backend_stub") and len(args) > 1:
            # argv[1] is the model path: <repo>/<model>/1/model.py
            out.setdefault(Path(args[1].decode()).parent.parent.name, set()).add(int(d.name))
    return out
