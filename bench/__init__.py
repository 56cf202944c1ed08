"""lmforge's benchmark suite: each figure as a ratio against a baseline or limit, measured in one run.

    python -m bench                      # every row at the sizes of the brief (CPU or CUDA)
    python -m bench --quick              # smallest sizes: checks the machinery in about a minute
    python -m bench --only pretrain tokenizer
    python -m bench --full               # also runs the default lifecycle and the test suite (minutes)

Writes `bench/results/latest.md` (a table for the README) and `latest.json` (every number, the
machine and the versions). All work happens in a temporary project: the user's `out/` is only read.
"""
