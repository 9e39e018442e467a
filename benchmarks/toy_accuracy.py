"""Held-out accuracy of the shipped toy LLaVA, unpruned and per pruning strategy x budget (CPU, offline).

    python benchmarks/toy_accuracy.py --samples 300 --budgets 192,128,64 --json toy_accuracy.json

Same as `vtokprune bench-toy`. Prints a markdown table and writes the raw results as JSON.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vtokprune.toyworld.cli import bench_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_main(sys.argv[1:]))
