"""Benchmark suite for rrd_kernels: times the RRD loss of several providers (eager PyTorch, torch.compile,
the Triton and CUDA backends) against a measured floor, after checking each against a float64 oracle.

Run ``python -m bench --help``; see bench/README.md. Importing this package imports neither torch nor
triton, so the command line can set TRITON_INTERPRET before they load.
"""
