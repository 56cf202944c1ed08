"""lm-eval `process_results` hooks for the benchmark templates (loaded by `!function scoring.<name>`)."""

from lmforge.data.posttrain_data import score


def arith_gen_results(doc: dict, results: list[str]) -> dict:
    """Exact match of the generated answer with the ground truth (text up to the end of the turn, stripped)."""
    return {"exact_match": score(results[0], doc["answer"])}
