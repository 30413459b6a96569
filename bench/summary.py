"""Print the short summary table of finished runs: python -m bench.summary DIR [DIR ...] [--mode MODE]
[--predictions FILE] (bench/predict.py's JSON: the triton and cuda rows of all DIRs beside the cost model's)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .report import prediction_lines, summary_lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.summary")
    p.add_argument("dirs", nargs="+", type=Path, help="output folders of python -m bench (with results.json)")
    p.add_argument("--mode", default="fwd+bwd", choices=["fwd", "bwd", "fwd+bwd"])
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--predictions", type=Path, help="bench/predict.py's output: print the triton and cuda rows beside it")
    args = p.parse_args(argv)
    status = 0
    every_row = []
    for d in args.dirs:
        path = d / "results.json"
        if not path.exists():
            print(f"== {d}: no results.json")
            status = 1
            continue
        doc = json.loads(path.read_text())
        rows = [{k: (math.nan if v is None else v) for k, v in r.items()} for r in doc["rows"]]
        for r in rows:
            r["reason"] = r["reason"] if isinstance(r["reason"], str) else ""
        meta = doc["meta"]
        c = meta.get("ceilings") or {}
        ceil = ""
        if c:
            rates = ", ".join(f"{k} {v:.0f}" for k, v in c["matmul_TFLOPs"].items())
            ceil = f"; copy {c['copy_GBps']:.0f} GB/s, matmul TFLOP/s {rates}"
        part = " (PARTIAL)" if meta.get("partial") else ""
        print(f"== {d}{part}: {meta.get('device')}, torch {meta.get('torch')}, commit {meta.get('git_commit')}{ceil}")
        print("\n".join(summary_lines(rows, mode=args.mode, limit=args.limit)))
        every_row += [{"fp32_matmul_precision": meta.get("fp32_matmul_precision")} | r for r in rows]
    if args.predictions is not None:
        try:
            predictions = json.loads(args.predictions.read_text())
        except (OSError, ValueError) as exc:
            print(f"cost model: cannot read {args.predictions} ({type(exc).__name__})")
            predictions = None
        print("\n".join(prediction_lines(every_row, predictions, mode=args.mode)))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
