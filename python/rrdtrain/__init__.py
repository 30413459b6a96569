"""Internals of the reference training app (python/train.py): data, training loop, checkpoints, reports."""
