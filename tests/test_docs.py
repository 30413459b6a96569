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


# ---- cross-references: "section N" and markdown anchor links ------------------------------------------------

DOC_FILES = ["README.md", "csrc/README.md", "bench/README.md", "python/README.md", "python/RESULTS.md"]
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
HEADING = re.compile(r"^(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$", re.M)
MD_FILE = r"[\w./-]+\.md"
# "docs/math.md, section 6", "[docs/design.md](docs/design.md), section 7", "math.md section 3", bare
# "(section 5)" (this file), and "section 4 of docs/math.md".
SECTION_REF = re.compile(
    rf"(?:\[?`?(?P<before>{MD_FILE})`?\]?(?:\([^)\s]*\))?,?[ \t\n]+)?\bsections?[ \t\n]+(?P<num>\d+(?:\.\d+)*)"
    rf"(?:[ \t\n]+(?:of|in)[ \t\n]+\[?`?(?P<after>{MD_FILE}))?",
    re.I,
)
ANCHOR_LINK = re.compile(r"\]\(\s*(?P<file>[^)\s#]*)#(?P<anchor>[^)\s]+)\s*\)")  # [text](file.md#a), [text](#a)
PLAIN_ANCHOR = re.compile(rf"(?<![\w(/.-])(?P<file>{MD_FILE})#(?P<anchor>[\w-]+)")  # file.md#anchor in prose
HTML_ANCHOR = re.compile(r"""<a\s[^>]*\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.I)


def doc_files() -> list[str]:
    docs = sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
    return DOC_FILES[:1] + docs + DOC_FILES[1:]


def without_code_blocks(text: str) -> str:
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # keeps line numbers


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (links and HTML reduced to text), lowercased, punctuation
    removed (letters, digits, '_', '-' and spaces kept), spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors_of(text: str) -> set[str]:
    """Every anchor a markdown file defines: its headings' slugs (GitHub numbers repeats: x, x-1, x-2, ...)
    and explicit <a id=...> / <a name=...>."""
    seen: dict[str, int] = {}
    anchors = set(HTML_ANCHOR.findall(text))
    for _, title in HEADING.findall(without_code_blocks(text)):
        slug = github_slug(title)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def section_numbers_of(text: str) -> set[str]:
    """The numbers of a file's numbered headings: '## 7. Plans ...' -> '7', '### 4.2 Merge' -> '4.2'."""
    return {m.group(1) for m in re.finditer(r"^#{1,6}[ \t]+(\d+(?:\.\d+)*)\.?[ \t]", without_code_blocks(text), re.M)}


def resolve_md(doc: str, target: str, root: str) -> str | None:
    """A markdown file named in `doc` (repository-relative): relative to doc's folder (how links resolve),
    else to the repository root (how prose names files, e.g. "docs/math.md" in csrc/README.md)."""
    for base in (os.path.dirname(os.path.join(root, doc)), root):
        path = os.path.normpath(os.path.join(base, target))
        if os.path.isfile(path):
            return path
    return None


def broken_cross_references(docs: list[str], root: str = ROOT) -> list[str]:
    broken = []
    texts: dict[str, str] = {}

    def read(path):
        if path not in texts:
            texts[path] = open(path, encoding="utf-8").read()
        return texts[path]

    for doc in docs:
        path = os.path.join(root, doc)
        text = without_code_blocks(read(path))

        def where(pos):
            return f"{doc}:{text.count(chr(10), 0, pos) + 1}"

        for m in SECTION_REF.finditer(text):
            named = m.group("before") or m.group("after")
            target = resolve_md(doc, named, root) if named else path
            if target is None:
                broken.append(f"{where(m.start())}: '{m.group(0).strip()}': no file {named}")
            elif m.group("num") not in section_numbers_of(read(target)):
                broken.append(f"{where(m.start())}: '{' '.join(m.group(0).split())}': "
                              f"{os.path.relpath(target, root)} has no section {m.group('num')}")
        for pattern in (ANCHOR_LINK, PLAIN_ANCHOR):
            for m in pattern.finditer(text):
                file, anchor = m.group("file"), m.group("anchor")
                if re.match(r"[a-z]+://", file) or (file and not file.endswith(".md")):
                    continue  # web pages, and line anchors of source files (#L10)
                target = path if not file else resolve_md(doc, file, root)
                if target is None:
                    broken.append(f"{where(m.start())}: '{m.group(0)}': no file {file}")
                elif anchor not in anchors_of(read(target)):
                    broken.append(f"{where(m.start())}: '{m.group(0)}': {os.path.relpath(target, root)} has no "
                                  f"heading with anchor #{anchor}")
    return broken


def test_section_references_and_anchor_links_resolve():
    docs = doc_files()
    assert "docs/design.md" in docs and "README.md" in docs
    broken = broken_cross_references(docs)
    assert not broken, "broken cross-references (anchors follow GitHub's rules):\n" + "\n".join(broken)


def test_the_cross_reference_check_catches_broken_ones(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text(
        "# Design\n\n## 1. The path of one call\n\n## Plans per device and the compile gate\n\n"
        "## `rrd_loss(x)`: the API\n\n## Notes\n\n## Notes\n\nAs section 1 says (section 2 does not exist).\n"
        "```\n## 9. not a heading: inside a code block\n```\n")
    (tmp_path / "README.md").write_text(
        "See [docs/design.md](docs/design.md), section 7; docs/design.md, section 1.\n"
        "[plans](docs/design.md#plans-per-device-and-the-compile-gate) [api](docs/design.md#rrd_lossx-the-api)\n"
        "[notes](docs/design.md#notes-1) [gone](docs/design.md#notes-2) [self](#readme) [nine](docs/design.md#9-not-a-heading-inside-a-code-block)\n"
        "section 9 of docs/design.md; [missing](docs/nothere.md#x); docs/design.md#the-path-of-one-call\n")
    found = broken_cross_references(["README.md", "docs/design.md"], root=str(tmp_path))
    expected = ["README.md:1: '[docs/design.md](docs/design.md), section 7'", "README.md:3: '](docs/design.md#notes-2)'",
                "README.md:3: '](#readme)'", "README.md:3: '](docs/design.md#9-not-a-heading-inside-a-code-block)'",
                "README.md:4: 'section 9 of docs/design.md'", "README.md:4: '](docs/nothere.md#x)'",
                "README.md:4: 'docs/design.md#the-path-of-one-call'", "docs/design.md:13: 'section 2'"]
    assert sorted(f.split("': ")[0] + "'" for f in found) == sorted(expected), found


def test_github_slugs():
    assert github_slug("7. Plans per device and the compile gate") == "7-plans-per-device-and-the-compile-gate"
    assert github_slug("3. The Triton backend (`rrd_kernels/triton_kernels/`)") == \
        "3-the-triton-backend-rrd_kernelstriton_kernels"
    assert github_slug("Communication per step (per rank, received)") == "communication-per-step-per-rank-received"
    assert github_slug("What has run where") == "what-has-run-where"


# ---- the README's API headings are the real signatures; its python examples run --------------------------------

def heading_signature(name: str) -> list[tuple[str, str, object]]:
    """(name, kind, default) of each parameter in the README heading `## `name(...)``."""
    import ast
    import inspect

    lines = [l for l in open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
             if re.match(rf"^#+\s+`{name}\(", l)]
    assert len(lines) == 1, f"README.md has {len(lines)} headings for {name}(...)"
    params = re.match(rf"^#+\s+`{name}\((.*)\)`\s*$", lines[0]).group(1)
    args = ast.parse(f"def {name}({params}): pass").body[0].args
    out = []
    positional = args.posonlyargs + args.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults)) + args.defaults
    for i, (a, d) in enumerate(zip(positional, defaults)):
        kind = "POSITIONAL_ONLY" if i < len(args.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        out.append((a.arg, kind, d if d is inspect.Parameter.empty else ast.literal_eval(d)))
    if args.vararg:
        out.append((args.vararg.arg, "VAR_POSITIONAL", inspect.Parameter.empty))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        out.append((a.arg, "KEYWORD_ONLY", inspect.Parameter.empty if d is None else ast.literal_eval(d)))
    if args.kwarg:
        out.append((args.kwarg.arg, "VAR_KEYWORD", inspect.Parameter.empty))
    return out


@pytest.mark.parametrize("name", ["rrd_loss", "RRDLoss", "RRDMomentumLoss"])
def test_readme_api_headings_match_the_signatures(name):
    import inspect

    import rrd_kernels

    real = [(p.name, p.kind.name, p.default) for p in inspect.signature(getattr(rrd_kernels, name)).parameters.values()]
    assert heading_signature(name) == real


def test_readme_python_examples_run():
    """Every ```python block of the README runs as written, on whatever device this machine has (the example
    picks it; on CPU it uses the reference backend)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)
    assert blocks
    for n, code in enumerate(blocks):
        assert ".cuda()" not in code, "examples pick the device (device = 'cuda' if ... else 'cpu')"
        namespace = {"__name__": f"readme_example_{n}"}
        exec(compile(code, f"README.md python block {n + 1}", "exec"), namespace)
        assert namespace["loss"].dim() == 0 and bool(namespace["loss"].isfinite())
