"""The documentation a user needs lives in the repository: nothing points outside it, links resolve, and the
README keeps its set-up commands first."""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", "__pycache__", "build", "dist", "runs", ".ci-venv", ".pytest_cache"}
TEXT_EXT = (".py", ".md", ".txt", ".cu", ".cuh", ".h", ".inl", ".cpp", ".toml", ".sh", ".cfg")
# Places a user of the repository does not have (the design notes the project started from). Spelt in
# pieces so that `git grep` for them finds only real pointers, not this test.
SHARED = "shared"
OUTSIDE = re.compile("|".join(re.escape(p) for p in (
    f"../{SHARED}/", f"/work/{SHARED}", f"{SHARED}/design/", f"{SHARED}/measurements", "rrd" + "-math")))


def repo_files(ext=TEXT_EXT):
    for dirpath, dirnames, files in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for f in files:
            if f.endswith(ext) or f == "run":
                yield os.path.join(dirpath, f)


def test_nothing_points_outside_the_repository():
    hits = []
    for path in repo_files():
        for n, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):
            if OUTSIDE.search(line):
                hits.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert not hits, "pointers to files users do not have:\n" + "\n".join(hits)


@pytest.mark.parametrize("name", ["math.md", "design.md", "measurements.md"])
def test_docs_exist_and_the_readme_links_them(name):
    assert os.path.getsize(os.path.join(ROOT, "docs", name)) > 1000
    assert f"(docs/{name})" in open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_relative_links_in_markdown_resolve():
    broken = []
    for path in repo_files((".md",)):
        text = open(path, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), target))):
                broken.append(f"{os.path.relpath(path, ROOT)} -> {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_starts_with_the_two_commands_then_the_cpu_torch_note():
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    assert lines[0] == "```" and lines[3] == "```"
    assert lines[1].startswith("pip install") and "python/train.py" in lines[1]
    assert lines[2].startswith("pip install") and "pytest" in lines[2]  # what .ci/run runs
    note = "\n".join(lines[4:8])
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in note
