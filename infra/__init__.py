"""The team stack: `python -m infra up | down | status | remote` (see infra/stack.py)."""
