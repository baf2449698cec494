"""Benchmark and profiling scripts behind the figures in docs/ (run them as files: `python3 experiments/NAME.py`)."""
