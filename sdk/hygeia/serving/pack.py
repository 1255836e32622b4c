"""A Triton repository that runs unchanged in NVIDIA's stock container (``hygeia triton build --target container``).

The stock ``tritonserver`` image has its own Python (3.10 in release 24.10) and a Python-backend
stub built for it, while Hygeia runs on this Python (3.11). Triton's Python backend supports
exactly this case with two files in the repository:

- ``EXECUTION_ENV_PATH`` (a config parameter): a tarball that Triton unpacks once and activates
  before it starts each stub (``source ENV/bin/activate``, ``ENV/lib`` on ``LD_LIBRARY_PATH``);
- ``triton_python_backend_stub`` in a model's folder: used instead of the backend's own stub.

:func:`pack_repository` writes both: the stub nvidia-pytriton ships for this Python and the same
Triton release, copied into every model folder, and ``hygeia-python3.X.tar.gz`` at the repository
root holding this interpreter (``bin/python3.X``, ``lib/libpython3.X.so.1.0``, the standard library)
and the packages the models import. What they import is measured, not guessed: a child process
builds each model as its stub would (:func:`probe_model`) and reports its modules, so a frozen
diagnoser (ONNX Runtime) packs without torch. Every packed ELF file's glibc symbol versions are
checked against the container's (glibc 2.35 in 24.10, Ubuntu 22.04), and the system libraries the
interpreter and its extension modules load (OpenSSL, libffi, ...) must be ones the container's
own Python brings (:data:`CONTAINER_LIBS`): a pack that would not run there is refused.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any, Callable

from ..errors import HygeiaError
from ..outputs import atomic_path

PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"
ENV_FILE = f"hygeia-python{PYVER}.tar.gz"
ENV_VALUE = f"$$TRITON_MODEL_DIRECTORY/../{ENV_FILE}"
STUB = "triton_python_backend_stub"
CONTAINER_GLIBC = (2, 35)
"""glibc of the stock ``tritonserver:24.10-py3`` image (Ubuntu 22.04), the release tested here."""
_BASE_LIBS = ("linux-vdso", "ld-linux", "libc.so", "libm.so", "libdl.so", "libpthread.so", "librt.so",
              "libutil.so", "libgcc_s.so", "libstdc++.so", "libcrypt.so.1")
"""Libraries every Ubuntu image has (glibc, the C++ runtime, libcrypt1, which is essential there):
never packed. This system's libcrypt needs glibc 2.36 and the container's own serves (XCRYPT_2.0)."""
CONTAINER_LIBS = {
    "libbz2.so.1.0", "libcrypto.so.3", "libssl.so.3", "libexpat.so.1", "libffi.so.8", "liblzma.so.5",
    "libmpdec.so.3", "libncursesw.so.6", "libpanelw.so.6", "libtinfo.so.6", "libnsl.so.2", "libreadline.so.8",
    "libsqlite3.so.0", "libtirpc.so.3", "libuuid.so.1", "libz.so.1", "libgssapi_krb5.so.2", "libkrb5.so.3",
    "libk5crypto.so.3", "libkrb5support.so.0", "libcom_err.so.2", "libkeyutils.so.1", "libresolv.so.2",
    "libdb-5.3.so", "libgdbm.so.6", "libgdbm_compat.so.4"}
"""Sonames of the Ubuntu 22.04 packages that the container's Python 3.10 standard library depends on
(libpython3.10-stdlib: libssl3, libffi8, libsqlite3-0, libtirpc3 with Kerberos, ...): the packed
3.11 standard library's extension modules find the same sonames there."""
_STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "site-packages",
                "__pycache__", f"config-{PYVER}-x86_64-linux-gnu"}
_ACTIVATE = """# Activates the Python environment packed by `hygeia triton build --target container`.
_hygeia_env="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$_hygeia_env/bin:$PATH"
export PYTHONHOME="$_hygeia_env"
export PYTHONNOUSERSITE=1
unset PYTHONPATH VIRTUAL_ENV
"""


class PackError(HygeiaError):
    """The execution environment cannot be packed (or would not run in the container)."""


@dataclass
class PackResult:
    path: Path
    size_bytes: int = 0
    files: int = 0
    modules: list[str] = field(default_factory=list)
    distributions: list[str] = field(default_factory=list)
    system_libs: list[str] = field(default_factory=list)
    glibc: tuple[int, int] = (0, 0)


def probe_model(model_dir: str | os.PathLike[str]) -> list[str]:
    """Build the model in ``model_dir`` as its stub does (frozen runner or plugin) and return the
    top-level modules then imported. Run in a child process (:func:`imported_modules`)."""
    from .adapter import TritonPythonModel
    from .runtime import config_params

    d = Path(model_dir)
    params = config_params(d / "config.pbtxt")
    config = {"name": d.name, "parameters": {k: {"string_value": v} for k, v in params.items()}}
    model = TritonPythonModel()
    model.configure({"model_config": json.dumps(config), "model_name": d.name, "model_repository": str(d),
                     "model_version": "1"})
    model._build()
    _exercise(model)
    return sorted({m.partition(".")[0] for m in list(sys.modules)})


def _exercise(model: Any) -> None:
    """One small request straight to the built plugin, so what it imports only when called (RDKit
    for molecules, say) is seen too. A request this generic may be refused (a conditioner's
    vocabulary, say): what was imported up to then still counts."""
    import numpy as np

    p = model.plugin
    try:
        if model.kind == "diagnoser":
            p.diagnose(np.zeros((1, model.channels, *model.size), np.float32))
        elif model.kind == "generator":
            p.generate(1, seed=0)
        else:
            p.encode([None])
    except Exception:  # noqa: BLE001,S110  (see the docstring)
        pass


def imported_modules(model_dir: Path) -> list[str]:
    """:func:`probe_model` in a fresh interpreter (this one has imported everything already)."""
    code = ("import json, sys; from hygeia.serving.pack import probe_model; "
            "print('HYGEIA-MODULES ' + json.dumps(probe_model(sys.argv[1])))")
    r = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    line = next((x for x in r.stdout.splitlines() if x.startswith("HYGEIA-MODULES ")), None)
    if r.returncode != 0 or line is None:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise PackError(f"model {model_dir.name} cannot be built outside Triton to see what it imports: {last}")
    return list(json.loads(line.split(" ", 1)[1]))


def _site_packages() -> list[Path]:
    """This environment's site-packages folders, resolved."""
    return [Path(p).resolve() for p in dict.fromkeys((sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]))]


def _module_origin(name: str) -> Path | None:
    """Where an imported top-level module lives (its package folder or file); None for built-ins."""
    mod = sys.modules.get(name)
    if mod is None:
        import importlib

        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001  (probed in the child; absent here means nothing to copy)
            return None
    path = getattr(mod, "__path__", None)
    if path:
        return Path(list(path)[0])
    f = getattr(mod, "__file__", None)
    return Path(f) if f else None


def _editable_dists(origin: Path) -> list[str]:
    """The distributions whose editable install (a ``.pth`` file or a setuptools finder) points at
    ``origin`` or its folder: their ``.dist-info`` carries the entry points and version."""
    from importlib.metadata import distributions

    found = []
    for dist in distributions():
        for f in dist.files or []:
            if f.name.startswith("__editable__") and f.suffix in (".pth", ".py"):
                text = Path(str(dist.locate_file(f))).read_text(errors="replace")
                if f"'{origin}'" in text or str(origin.parent) in text.split():
                    found.append(dist.metadata["Name"])
                    break
    return found


def _copy_site(modules: list[str], dest: Path) -> list[str]:
    """Copy what ``modules`` need into ``dest`` (site-packages): every file of each installed
    distribution that provides one (its ``.libs`` folders and ``.dist-info`` included), and
    modules that live outside site-packages (an editable install) as folders. Returns the
    distributions."""
    from importlib.metadata import distribution

    site = _site_packages()
    by_module = packages_distributions()
    dists: set[str] = set()
    for name in modules:
        if name in sys.stdlib_module_names or name in sys.builtin_module_names:
            continue
        origin = _module_origin(name)
        if origin is None:
            continue
        inside = any(origin.resolve().is_relative_to(s) for s in site)
        dists.update(by_module.get(name, []) or ([] if inside else _editable_dists(origin)))
        if not inside:  # an editable install: the source folder itself
            target = dest / origin.name
            if origin.is_dir():
                shutil.copytree(origin, target, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
            elif origin.suffix in (".py", ".so"):
                shutil.copy2(origin, target)
    for dname in sorted(dists):
        dist = distribution(dname)
        for f in dist.files or []:
            src = Path(str(dist.locate_file(f))).resolve()
            rel = next((src.relative_to(s) for s in site if src.is_relative_to(s)), None)
            if rel is None or "__pycache__" in rel.parts or rel.name.startswith("__editable__") \
                    or not src.is_file():
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return sorted(dists)


def _copy_python(env: Path) -> None:
    """This interpreter, its shared libpython and its standard library (without tests and GUI)."""
    base = Path(sys.base_prefix)
    (env / "bin").mkdir(parents=True)
    exe = base / "bin" / f"python{PYVER}"
    shutil.copy2(exe if exe.is_file() else Path(sys.executable).resolve(), env / "bin" / f"python{PYVER}")
    for alias in ("python3", "python"):
        (env / "bin" / alias).symlink_to(f"python{PYVER}")
    (env / "bin" / "activate").write_text(_ACTIVATE)
    lib = env / "lib"
    lib.mkdir()
    libdir, ldlib = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not libdir or not ldlib or not (Path(libdir) / ldlib).is_file():
        raise PackError(f"this Python ({sys.executable}) has no shared libpython{PYVER}: the Triton stub "
                        "links it; use a Python built with --enable-shared")
    shutil.copy2(Path(libdir) / ldlib, lib / ldlib)
    std = Path(sysconfig.get_paths()["stdlib"])
    shutil.copytree(std, lib / f"python{PYVER}", symlinks=False,
                    ignore=lambda d, names: [n for n in names if n in _STDLIB_SKIP or n.endswith(".pyc")]
                    if Path(d) == std else [n for n in names if n in ("__pycache__", "test", "tests")
                                            or n.startswith("_tkinter")])
    (lib / f"python{PYVER}" / "site-packages").mkdir()


def _elf_files(root: Path) -> list[Path]:
    out = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and (".so" in p.name or p.parent.name == "bin"):
            with open(p, "rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    out.append(p)
    return out


def _system_libs(env: Path) -> list[str]:
    """The shared libraries that the interpreter and the standard library's extension modules load
    from the system (OpenSSL, libffi, zlib, ...), as ``ldd`` resolves them. They are not packed
    (this system's builds need a newer glibc than the container's); each must be one the
    container's own Python 3.10 brings (:data:`CONTAINER_LIBS`). Wheels bundle theirs (``*.libs``)."""
    lib = env / "lib"
    targets = [env / "bin" / f"python{PYVER}", *lib.glob("libpython*"),
               *(lib / f"python{PYVER}" / "lib-dynload").glob("*.so")]
    needed: set[str] = set()
    for t in targets:
        out = subprocess.run(["ldd", str(t)], capture_output=True, text=True,
                             env={**os.environ, "LD_LIBRARY_PATH": str(lib)}).stdout
        for m in re.finditer(r"^\s*(\S+) => (/\S+)", out, re.M):
            name, path = m.groups()
            if not name.startswith(_BASE_LIBS) and not Path(path).resolve().is_relative_to(env.resolve()):
                needed.add(name)
    missing = sorted(needed - CONTAINER_LIBS)
    if missing:
        raise PackError(f"the packed Python needs system libraries the container may lack: {', '.join(missing)}")
    return sorted(needed)


def glibc_needed(files: list[Path]) -> tuple[tuple[int, int], Path | None]:
    """The newest ``GLIBC_2.N`` symbol version any of ``files`` names, and the file naming it."""
    best, where = (0, 0), None
    pat = re.compile(rb"GLIBC_2\.(\d+)")
    for f in files:
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            found = set(pat.findall(data))
        for m in found:
            v = (2, int(m))
            if v > best:
                best, where = v, f
    return best, where


def _stub_source() -> Path:
    from .binary import stub_path

    stub = stub_path()
    if not stub.is_file():
        raise PackError(f"nvidia-pytriton ships no Python backend stub for Python {PYVER} ({stub})")
    return stub


def _copy_stub_libs(stub: Path, lib: Path) -> None:
    """The libraries the stub finds through its RPATH into the wheel (``nvidia_pytriton.libs``:
    a renamed libcudart), which a copy of the stub elsewhere cannot reach: Triton puts ``ENV/lib``
    on the stub's ``LD_LIBRARY_PATH``."""
    from .binary import wheel_libs

    libs = wheel_libs().resolve()
    out = subprocess.run(["ldd", str(stub)], capture_output=True, text=True).stdout
    for m in re.finditer(r"^\s*(\S+) => (/\S+)", out, re.M):
        if Path(m.group(2)).resolve().parent == libs:
            shutil.copy2(m.group(2), lib / m.group(1))


def pack_repository(repo: str | os.PathLike[str], models: list[str] | None = None,
                    glibc: tuple[int, int] = CONTAINER_GLIBC,
                    progress: Callable[[str], Any] | None = None) -> PackResult:
    """Make ``repo`` (written by :func:`hygeia.serving.repository.build_repository` with the
    ``EXECUTION_ENV_PATH`` parameter) run in the stock container: the stub in every model folder and
    the packed environment at the root. ``models``: the model folders (default: every one)."""
    say = progress or (lambda _m: None)
    root = Path(repo)
    names = models if models is not None else sorted(
        d.name for d in root.iterdir() if (d / "config.pbtxt").is_file() and not d.name.startswith("."))
    stub = _stub_source()
    with tempfile.TemporaryDirectory(prefix="hygeia-pack-") as tmp:
        env = Path(tmp) / "env"
        modules: set[str] = set()
        for m in names:
            say(f"{m}: building it as its stub would, to see what it imports")
            modules.update(imported_modules(root / m))
        say(f"copying Python {PYVER} and the packages of {len(modules)} top-level modules")
        _copy_python(env)
        dists = _copy_site(sorted(modules), env / "lib" / f"python{PYVER}" / "site-packages")
        libs = _system_libs(env)
        _copy_stub_libs(stub, env / "lib")
        elves = [*_elf_files(env), stub]
        need, where = glibc_needed(elves)
        if need > glibc:
            raise PackError(f"{where.name if where else '?'} needs glibc {need[0]}.{need[1]}, newer than the "
                            f"container's {glibc[0]}.{glibc[1]}: build on an older system (e.g. the container)")
        say(f"writing {ENV_FILE}")
        files = sum(1 for p in env.rglob("*") if p.is_file())
        with atomic_path(root / ENV_FILE) as part, tarfile.open(part, mode="w:gz", compresslevel=1) as tar:
            tar.add(env, arcname=".")
    for m in names:
        dst = root / m / STUB
        if not dst.is_file() or dst.stat().st_size != stub.stat().st_size:
            shutil.copy2(stub, dst)
            dst.chmod(0o755)
    return PackResult(root / ENV_FILE, (root / ENV_FILE).stat().st_size, files, sorted(modules), dists, libs, need)
