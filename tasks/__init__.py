"""lmforge stages: plain functions behind `python -m tasks.<stage>`."""
