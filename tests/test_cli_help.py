"""`--help` of both command lines is complete: every option of python/train.py's parser and of the benchmark's
parser (python -m bench) has a help text, and the texts that stand for preset values say what they are.
The parsers are built and inspected; no job runs."""
from __future__ import annotations

import argparse
import importlib.util
import os

import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(REPO, "python", "train.py")
if REPO not in sys.path:  # bench/ is not an installed package: import it from the checkout
    sys.path.insert(0, REPO)


def train_app():
    spec = importlib.util.spec_from_file_location("rrd_train_app_help", APP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_parser() -> argparse.ArgumentParser:
    from bench.cli import parser

    return parser()


def options_without_help(p: argparse.ArgumentParser) -> list[str]:
    missing = []
    for action in p._actions:  # argparse keeps no public list of its actions
        if not action.option_strings:  # positionals: neither CLI has any
            missing.append(f"positional {action.dest}")
            continue
        text = (action.help or "").strip()
        if not text or text == argparse.SUPPRESS:
            missing.append("/".join(action.option_strings))
    return missing


def rendered_help(p: argparse.ArgumentParser) -> dict[str, str]:
    """option string -> its help text as --help prints it (with %(default)s and friends expanded)."""
    formatter = p._get_formatter()
    return {action.option_strings[-1]: formatter._expand_help(action)
            for action in p._actions if action.option_strings and action.help}


@pytest.mark.parametrize("which", ["train", "bench"])
def test_every_option_has_a_help_text(which):
    p = train_app().build_parser() if which == "train" else bench_parser()
    assert len(p._actions) > 10
    assert options_without_help(p) == []
    p.format_help()  # every %(...)s in a help text expands


def test_the_check_finds_an_option_without_help():
    p = argparse.ArgumentParser()
    p.add_argument("--fine", help="documented")
    p.add_argument("--bare", type=int)
    p.add_argument("--blank", help="  ")
    assert options_without_help(p) == ["--bare", "--blank"]


def test_train_help_names_choices_and_the_resolved_schedule():
    app = train_app()
    texts = rendered_help(app.build_parser())
    for option in ("--teacher", "--student"):
        assert all(name in texts[option] for name in app.MODELS), option
    assert "auto" in texts["--device"] and "cuda" in texts["--device"]
    decay = texts["--lr-decay-epochs"]
    for name, preset in app.PRESETS.items():
        resolved = ",".join(map(str, app.scaled_milestones(preset["epochs"])))
        assert f"{resolved} on {name} ({preset['epochs']} epochs)" in decay, decay
    assert "19,22,26 on digits" in decay and "150,180,210 on cifar100" in decay


def test_bench_help_gives_defaults():
    from bench.config import PRESETS

    texts = rendered_help(bench_parser())
    for option in ("--device", "--seed", "--cpu-threads", "--summary-rows", "--preset", "--matmul-precision"):
        assert "default: " in texts[option], option
    assert "default: auto" in texts["--device"] and "default: 0" in texts["--seed"]
    for option, key in (("--min-reps", "min_reps"), ("--max-reps", "max_reps"), ("--warmup", "warmup")):
        for name, preset in PRESETS.items():
            assert f"{name} {preset[key]}" in texts[option], (option, texts[option])
    assert "default" in texts["--no-plots"] and "default" in texts["--no-progress"]
