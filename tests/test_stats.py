"""The paired bootstrap that marks gains beyond noise."""

import pytest

from lmforge.stats import describe, paired_gain


def test_clear_gain_is_beyond_noise():
    g = paired_gain([0.0] * 100, [1.0] * 60 + [0.0] * 40)
    assert g["gain"] == 0.6 and 0.45 < g["lo"] < 0.6 < g["hi"] < 0.75 and g["beyond_noise"] and g["n"] == 100
    assert describe(g).startswith("+0.600 [") and "noise" not in describe(g)


def test_small_gain_on_few_items_is_within_noise():
    before = [1.0, 0.0] * 10
    after = [1.0, 0.0] * 9 + [1.0, 1.0]  # one item of 20 flips
    g = paired_gain(before, after)
    assert g["gain"] == 0.05 and g["lo"] <= 0 and not g["beyond_noise"]
    assert describe(g).endswith("(within noise)")


def test_losses_and_bad_input():
    g = paired_gain([1.0] * 50, [0.0] * 30 + [1.0] * 20)
    assert g["gain"] == -0.6 and g["hi"] < 0 and g["beyond_noise"]
    assert paired_gain([], [])["gain"] is None and describe(paired_gain([], [])) == "–"
    with pytest.raises(ValueError, match="same items"):
        paired_gain([1.0], [1.0, 0.0])


def test_seeded_so_reproducible_and_sensible_when_every_item_agrees():
    before, after = [1.0, 0.0, 0.0] * 30, [1.0, 1.0, 0.0] * 30
    g = paired_gain(before, after)
    assert g == paired_gain(before, after) and g["lo"] < g["gain"] == 0.3333 < g["hi"]
    same = paired_gain([0.0] * 40, [0.0] * 40)  # a tiny model scoring 0 before and after: no nan, no claim
    assert (same["gain"], same["lo"], same["hi"], same["beyond_noise"]) == (0.0, 0.0, 0.0, False)
    one = paired_gain([0.0], [1.0])
    assert one["lo"] == one["hi"] == one["gain"] == 1.0
