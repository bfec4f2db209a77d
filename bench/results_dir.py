"""Where the bench writes its results.

bench/results/ holds the full run, which the README shows. `bench/run.py --quick` sets SQUASH_BENCH_RESULTS to
bench/results/quick/ for every part it starts, so a quick run (fewer rows and repeats) never overwrites the full
run's tables.
"""
import os
from pathlib import Path

FULL = Path(__file__).resolve().parent / "results"
QUICK = FULL / "quick"
RESULTS = Path(os.environ.get("SQUASH_BENCH_RESULTS") or FULL)
