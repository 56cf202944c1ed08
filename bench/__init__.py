"""lmforge's benchmark suite: each figure as a ratio against a baseline or limit measured in the same run.

    python -m bench                      # every row at full size (CPU or CUDA sizes)
    python -m bench --quick              # smallest sizes: checks the machinery in about a minute
    python -m bench --only pretrain tokenizer
    python -m bench --full               # also runs the default lifecycle and the test suite (minutes)

Writes `bench/results/latest.json` (every number, with the date, commit and machine of the run that measured
it) and `docs/benchmarks.md` (`python -m bench --render` rewrites the page alone). With --only, the
rows not re-run are kept. All work happens in a temporary project: the user's `out/` is only read.
"""
