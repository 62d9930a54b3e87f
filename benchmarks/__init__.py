"""Kernel and end-to-end benchmarks of grpo-scale; `python benchmarks/run.py --help` is the entry point."""
