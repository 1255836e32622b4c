"""The architecture holds: import contracts, one tensor description, the plugin shape, no history in docs."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if p.is_dir() and p.name.startswith("hygeia_"))
SOURCES = [p for part in ("sdk", "plugins", "integrations") for p in (ROOT / part).rglob("*.py")]


def test_import_contracts():
    """`lint-imports` keeps every contract in pyproject.toml (core -> nothing, lab -> core, ...)."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is not installed (the test extra installs it)"
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "Contracts: " in r.stdout and " broken" in r.stdout and "0 broken" in r.stdout


def test_import_contracts_catch_a_violation(tmp_path):
    """The contracts are not vacuous: a core module importing the lab breaks the 'core' contract."""
    from importlinter.application.use_cases import create_report  # noqa: F401  (installed)

    bad = ROOT / "sdk" / "hygeia" / "_architecture_probe.py"
    bad.write_text("import hygeia_lab  # noqa: F401\n")
    try:
        exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
        r = subprocess.run([exe, "--no-cache", "--contract", "core"], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    finally:
        bad.unlink()
    assert r.returncode != 0 and "hygeia._architecture_probe -> hygeia_lab" in r.stdout


@pytest.mark.parametrize("pkg", PLUGINS, ids=lambda p: p.name)
def test_plugin_shape(pkg):
    """Every built-in plugin has the one shape: __init__ (registration only), model, plugin, train, weights."""
    for name in ("__init__.py", "model.py", "plugin.py", "train.py"):
        assert (pkg / name).is_file(), f"{pkg.name}/{name} missing"
    assert (pkg / "weights").is_dir(), f"{pkg.name}/weights missing"
    extra = {p.name for p in pkg.glob("*.py")} - {"__init__.py", "model.py", "plugin.py", "train.py"}
    assert all(n.startswith("_") for n in extra), f"{pkg.name}: modules outside the shape: {sorted(extra)}"
    tree = ast.parse((pkg / "__init__.py").read_text())
    for node in tree.body:
        ok = (isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef))
              or (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)))
        assert ok, f"{pkg.name}/__init__.py line {node.lineno}: registration only (imports and hook functions)"
        if isinstance(node, ast.FunctionDef):
            assert any("hookimpl" in ast.unparse(d) for d in node.decorator_list), \
                f"{pkg.name}/__init__.py: {node.name} is not a hook implementation"


def test_served_tensor_table_in_docs():
    """docs/serving.md shows the table generated from hygeia.tensors, unchanged."""
    from hygeia import tensors

    assert tensors.markdown_table() in (ROOT / "docs" / "serving.md").read_text()


def test_no_history_in_docs_or_code():
    """History lives in CHANGELOG.md; docs and code describe the system as it is."""
    assert (ROOT / "CHANGELOG.md").is_file()
    pattern = re.compile(r"session[ -][0-9]", re.IGNORECASE)
    files = [*SOURCES, *(ROOT / "docs").rglob("*.md"), *(ROOT / "tests").rglob("*.py"),
             *(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "plugins").rglob("model_card.json"), ROOT / "README.md"]
    hits = [f"{f.relative_to(ROOT)}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits


# Functions allowed over 80 lines ("path:name"); none today, and a new one must be named here.
KNOWN_LONG: set[str] = set()


def test_files_and_functions_stay_small():
    """No project file over 400 lines, no function over 80 (tests and benchmarks aside; KNOWN_LONG listed)."""
    long_files = [f"{f.relative_to(ROOT)} ({n})" for f in SOURCES if (n := len(f.read_text().splitlines())) > 400]
    assert not long_files, long_files
    long_fns = []
    for f in SOURCES:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80 and f"{f.relative_to(ROOT)}:{node.name}" not in KNOWN_LONG:
                    long_fns.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({n})")
    assert not long_fns, long_fns
