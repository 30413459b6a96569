"""The static cost model's prediction (tools/cost_model.py) for benchmarked configurations of the Triton and the
CUDA C++ backends, on the GPU this machine has, written as JSON for the summary to print beside the measured
times (bench/gpu_run.sh: the first GPU runs calibrate the model).

    python -m bench.predict --out predictions.json --row 64 16384 128 float32 --row 4096 262144 128 bfloat16

The model runs on the CPU: it compiles the kernels one call launches with the real Triton for the device's
arch under a stand-in driver and counts their SASS (~5-10 s a row on 2 cores); for the CUDA backend it
compiles csrc/rrd_cuda.cu with nvcc and the build's flags (tools/cuda_cost.py, ~10 s per arch, then cached). It compiles into a Triton
cache of its own, so a benchmark run next to it still compiles (and times) its kernels from scratch. The GPU
is read from torch (or --device-name / --capability): its arch (sm_90 for H100/H200) is what is compiled
for, and its name picks the model's figures (H100, H200, A100; any other GPU gets the H200's, with a note).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_GPUS = ("H200", "H100", "A100")  # tools.cost_model.GPUS; H200 first: "H200" never contains "H100"


def gpu_for(device_name: str) -> tuple[str, str]:
    """(the cost model's GPU for this device, a note when the figures are not the device's own)."""
    upper = device_name.upper()
    for gpu in MODEL_GPUS:
        if gpu in upper:
            if gpu == "H100" and ("PCIE" in upper or "NVL" in upper):
                return gpu, f"{device_name}: the model's H100 is the SXM5 (132 SMs, 3.35 TB/s)"
            return gpu, ""
    return "H200", f"{device_name} is not a GPU the cost model has figures for: H200 figures"


def arch_for(capability: int, max_shared_mem: int = 0, sm_count: int = 1) -> tuple[str | None, str]:
    """(the stand-in arch the model compiles for, a note): the device's own when the stand-in driver has it,
    else the arch of the plan family the device gets (what its plans are checked for); None when none fits."""
    from tools.standin_driver import ARCHS

    own = f"sm_{capability}"
    if own in ARCHS:
        return own, ""
    sys.path.insert(0, str(ROOT))
    from rrd_kernels.triton_kernels.plans import DeviceLimits, family

    fam = family(DeviceLimits(capability, max_shared_mem, sm_count))
    if fam is None or fam not in ARCHS:
        return None, f"compute capability {capability / 10:.1f}: no plan family, no prediction"
    return fam, f"compute capability {capability / 10:.1f}: compiled for {fam}, its plan family"


def _device(args) -> tuple[str, int, int, int]:
    if args.device_name is not None and args.capability is not None:
        return args.device_name, args.capability, args.max_shared_mem, args.sm_count
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench.predict: no CUDA device; give --device-name and --capability")
    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    smem = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
    return (args.device_name or torch.cuda.get_device_name(0), args.capability or 10 * major + minor,
            smem, props.multi_processor_count)


BACKENDS = ("triton", "cuda")  # what the model counts, as bench's provider names


def _predict_row(job: dict) -> dict:
    row = {k: job[k] for k in ("backend", "B", "K", "D", "dtype", "precision")}
    t0 = time.time()
    try:
        from tools import cost_model

        r = cost_model.analyse_backend(job["backend"], arch=job["arch"], dtype=job["dtype"],
                                       precision=job["precision"], D=job["D"], B=job["B"], K=job["K"],
                                       gpu=job["gpu"])
        row.update(predicted_ms=r["predicted_ms"], calibrated_ms=r["calibrated_ms"], bound=r["bound"],
                   bounds_ms=r["bounds_ms"], model_gpu=r["gpu"], error=None)
    except Exception as exc:  # noqa: BLE001 - one row's failure is that row's entry, not the run's end
        row.update(predicted_ms=None, calibrated_ms=None, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    row["seconds"] = round(time.time() - t0, 1)
    return row


def predict(rows: list[tuple[int, int, int, str]], device_name: str, capability: int, max_shared_mem: int = 0,
            sm_count: int = 1, precision: str = "highest", jobs: int = 1, backends=BACKENDS) -> dict:
    """The predictions document for these (B, K, D, dtype) rows of each backend on this device."""
    gpu, gpu_note = gpu_for(device_name)
    arch, arch_note = arch_for(capability, max_shared_mem, sm_count)
    from tools import cost_model

    if arch is not None and arch not in cost_model.DEFAULT_GPU:  # the archs whose SASS the model was made on
        arch_note = "; ".join(n for n in (arch_note, f"the cost model reads sm_80/sm_86/sm_90 SASS; {arch}'s "
                                          "may not count (a row's error says so)") if n)
    doc = dict(device=device_name, capability=capability, gpu=gpu, arch=arch,
               note="; ".join(n for n in (gpu_note, arch_note) if n), precision=precision, rows=[])
    if arch is None:
        return doc
    # the precision matters for fp32 rows only (the model ignores it for fp16/bf16)
    work = [dict(backend=be, B=b, K=k, D=d, dtype=dt, precision=precision, arch=arch, gpu=gpu)
            for be in backends for b, k, d, dt in rows]
    if jobs > 1 and len(work) > 1:
        import concurrent.futures as futures
        import multiprocessing

        # spawn: the parent may have initialised CUDA (reading the device); the workers only compile
        with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            doc["rows"] = list(pool.map(_predict_row, work))
    else:
        doc["rows"] = [_predict_row(w) for w in work]
    for r in doc["rows"]:
        if r["dtype"] != "float32":
            r["precision"] = None
    return doc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--row", nargs=4, action="append", required=True, metavar=("B", "K", "D", "DTYPE"),
                   help="a benchmarked configuration (repeatable)")
    p.add_argument("--matmul-precision", choices=["highest", "high", "medium"], default="highest",
                   help="the bench run's fp32 matmul precision (high/medium: TF32) (default: %(default)s)")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated backends to predict (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="rows compiled at once")
    p.add_argument("--device-name", help="the GPU's name as torch gives it (default: the current device's)")
    p.add_argument("--capability", type=int, help="its compute capability x 10, e.g. 90 (default: the device's)")
    p.add_argument("--max-shared-mem", type=int, default=0, help="with --capability: bytes per block (opt-in)")
    p.add_argument("--sm-count", type=int, default=1, help="with --capability: multiprocessors")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    rows = []
    for b, k, d, dt in args.row:
        if dt not in ("float32", "bfloat16", "float16"):
            p.error(f"--row dtype: float32, bfloat16 or float16, not {dt}")
        rows.append((int(b), int(k), int(d), dt))
    backends = tuple(b for b in args.backends.split(",") if b)
    if not backends or any(b not in BACKENDS for b in backends):
        p.error(f"--backends: a comma-separated subset of {','.join(BACKENDS)}, not {args.backends!r}")
    # A Triton cache of its own, set before triton is imported (the model would take the caller's otherwise,
    # and leave the bench's kernels compiled in it): the bench's first-call times include its compiles.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="rrd-predict-")
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    name, cap, smem, sms = _device(args)
    precision = "high" if args.matmul_precision != "highest" else "highest"
    t0 = time.time()
    doc = predict(rows, name, cap, smem, sms, precision, args.jobs, backends)
    doc["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, args.out)  # whole or absent: the summary may read it at any moment
    print(f"cost model for {name} (compute capability {cap / 10:.1f}): {doc['arch']} on {doc['gpu']}"
          + (f" ({doc['note']})" if doc["note"] else ""))
    for r in doc["rows"]:
        what = (f"predicted {r['predicted_ms']:.3f} ms ({r['bound']}-bound), calibrated {r['calibrated_ms']:.3f} ms"
                if r["error"] is None else r["error"])
        print(f"  {r['backend']} B {r['B']} K {r['K']} D {r['D']} {r['dtype']}: {what} [{r['seconds']} s]")
    print(f"bench.predict: {len(doc['rows'])} rows in {doc['seconds']} s -> {args.out}")
    failed = doc["arch"] is None or any(r["error"] for r in doc["rows"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
