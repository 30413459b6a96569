"""What `pip install .` (and its extras) declares is what the code imports; a plain install works and leaves
the checkout as it was.

Offline and quick: setup.py's requirements are read by running it with setuptools.setup replaced, the
imports by parsing the sources, and the install goes to a temporary --target folder without dependencies.
"""
from __future__ import annotations

import ast
import os
import re
import runpy
import shutil
import subprocess
import sys

import pytest
import setuptools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import name -> distribution name, for every third-party module the repository imports
DISTRIBUTION = {"torch": "torch", "numpy": "numpy", "triton": "triton", "tqdm": "tqdm", "sklearn": "scikit-learn",
                "matplotlib": "matplotlib", "pytest": "pytest", "setuptools": "setuptools"}
# The repository's own modules, including the dev tools (tools/) and csrc/'s scripts that tests load.
LOCAL = {"rrd_kernels", "bench", "models", "rrdtrain", "conftest", "tools"} | {
    f[:-3] for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith(".py")}


@pytest.fixture(scope="module")
def declared(tmp_path_factory):
    """setup()'s keyword arguments, from running setup.py with setup() captured (no build)."""
    captured = {}
    old_setup, old_cwd = setuptools.setup, os.getcwd()
    old_skip = os.environ.get("RRD_SKIP_CUDA_BUILD")
    setuptools.setup = lambda **kw: captured.update(kw)
    os.environ["RRD_SKIP_CUDA_BUILD"] = "1"
    try:
        os.chdir(ROOT)
        runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="setup_under_test")
    finally:
        setuptools.setup = old_setup
        os.chdir(old_cwd)
        if old_skip is None:
            os.environ.pop("RRD_SKIP_CUDA_BUILD")
        else:
            os.environ["RRD_SKIP_CUDA_BUILD"] = old_skip
    return captured


def names(requirements) -> set[str]:
    """Distribution names of requirement strings ("numpy<2.3; marker" -> "numpy")."""
    return {re.match(r"[A-Za-z0-9_.-]+", r).group().lower() for r in requirements}


def third_party_imports(folder: str) -> set[str]:
    """Top-level names of the non-stdlib, non-local modules imported anywhere under folder."""
    found = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in files:
            if f.endswith(".py"):
                tree = ast.parse(open(os.path.join(dirpath, f), encoding="utf-8").read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        found |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        found.add(node.module.split(".")[0])
    local = LOCAL | {f[:-3] for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py")}
    return found - set(sys.stdlib_module_names) - local


def test_core_requirements(declared):
    core = names(declared["install_requires"])
    # torch warns "Failed to initialize NumPy" on every import without numpy, and Triton's interpreter needs it.
    assert {"torch", "numpy"} <= core
    # No pin of numpy in the core: only the test extra (Triton 3.6's interpreter) needs numpy < 2.3.
    assert not any(r.startswith("numpy") and "<" in r for r in declared["install_requires"])


@pytest.mark.parametrize(
    "folder,extras,optional",
    [
        ("rrd_kernels", [], {"triton"}),  # the triton backend is imported lazily; backend_status() says if absent
        ("python", ["train"], set()),
        ("bench", ["bench"], {"triton"}),
        ("tests", ["test"], set()),
    ],
)
def test_every_import_is_declared(declared, folder, extras, optional):
    have = names(declared["install_requires"])
    for extra in extras:
        have |= names(declared["extras_require"][extra])
    missing = {m for m in third_party_imports(folder) - optional if DISTRIBUTION.get(m, m).lower() not in have}
    missing -= {"setuptools"}  # present wherever pip builds the package
    assert not missing, f"{folder}/ imports {sorted(missing)}, not declared in setup.py ({extras or 'core'})"


def test_test_extra_includes_the_app_and_the_bench(declared):
    extras = declared["extras_require"]
    test = names(extras["test"])
    assert names(extras["train"]) <= test and names(extras["bench"]) <= test
    assert "numpy<2.3" in extras["test"]  # Triton 3.6's CPU interpreter fails with newer numpy


def _git_status():
    if shutil.which("git") is None:
        return None
    out = subprocess.run(["git", "status", "--porcelain", "--ignored=no"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


@pytest.mark.slow  # a pip install
def test_plain_install_declares_its_dependencies_and_leaves_the_checkout_clean(tmp_path):
    """pip install . (no dependencies, no network, no CUDA build) into a folder: the installed package imports
    from there, its metadata requires torch and numpy, and `git status` is as before."""
    pytest.importorskip("pip")
    before = _git_status()
    target = tmp_path / "site"
    env = dict(os.environ, RRD_SKIP_CUDA_BUILD="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
         "--target", str(target), ROOT],
        capture_output=True, text=True, env=env, timeout=300,
    )
    if proc.returncode != 0 and "No module named" in proc.stderr and "wheel" in proc.stderr:
        pytest.skip(f"pip cannot build here without isolation: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = (
        "import importlib.metadata as md, rrd_kernels\n"
        "print(rrd_kernels.__file__)\n"
        "print(sorted(r for r in md.requires('rrd_kernels') if 'extra ==' not in r))\n"
        "print(rrd_kernels.available_backends())\n"
    )
    run_env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=run_env)
    assert out.returncode == 0, out.stderr
    where, requires, backends = out.stdout.splitlines()[-3:]
    assert where.startswith(str(target)), where
    assert "'numpy'" in requires and "torch" in requires, requires
    assert "torch" in backends
    for sub in ("triton_kernels",):  # subpackages are installed too (find_packages)
        assert (target / "rrd_kernels" / sub / "__init__.py").is_file()
    if before is not None:
        assert _git_status() == before, "installing changed tracked or unignored files in the checkout"
