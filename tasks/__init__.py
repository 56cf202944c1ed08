"""lmforge's stages, one module each, as dvc.yaml lists them: `python -m tasks.<stage>`."""
