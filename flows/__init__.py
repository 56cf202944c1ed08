"""Prefect flows: orchestration only; stages run through DVC."""
