"""opdx.data_eval quality statistics on hand-made token sequences whose answers are known."""

import math

import pytest

from opdx.data_eval import completion_stats, repeat_frac


@pytest.mark.parametrize("ids,n,expected", [
    ([], 4, 0.0),
    ([1, 2, 3], 4, 0.0),  # fewer than n tokens
    ([1, 2, 3, 4], 4, 0.0),  # one 4-gram
    ([1, 2, 3, 4, 5, 6, 7], 4, 0.0),  # all distinct
    ([7] * 10, 4, 6 / 7),  # 7 four-grams, 1 distinct
    ([1, 2, 3, 4] * 3, 4, 5 / 9),  # 9 four-grams, 4 distinct (the rotations of 1 2 3 4)
    ([1, 2, 1, 2, 1], 2, 2 / 4),  # (1,2) (2,1) (1,2) (2,1): 2 repeated of 4
    ([5, 6, 5, 7], 1, 1 / 4),  # unigrams: 5 repeats once
])
def test_repeat_frac_known_values(ids, n, expected):
    assert repeat_frac(ids, n=n) == pytest.approx(expected)


def test_repeat_frac_default_is_4_grams_and_accepts_tuples():
    assert repeat_frac((9, 8, 9, 8, 9, 8)) == pytest.approx(1 / 3)  # (9,8,9,8) (8,9,8,9) (9,8,9,8)


def test_repeat_frac_bad_n():
    with pytest.raises(ValueError, match="n must be >= 1"):
        repeat_frac([1, 2, 3], n=0)


def test_completion_stats_known_values():
    eos = 0
    completions = [
        [5, 6, 7, 0],  # stops, no repeats
        [3] * 8,  # runs to the length limit, a repetition loop: 5 four-grams, 1 distinct
        [0],  # stops at once
        [1, 2, 3, 4, 1, 2, 3, 4, 0],  # stops; 6 four-grams, 5 distinct (1 2 3 4 twice)
    ]
    stats = completion_stats(completions, eos)
    assert stats["response_len"] == pytest.approx((4 + 8 + 1 + 9) / 4)
    assert stats["stop_rate"] == pytest.approx(3 / 4)
    assert stats["repeat_frac"] == pytest.approx((0 + 4 / 5 + 0 + 1 / 6) / 4)


def test_completion_stats_several_eos_ids_and_empty_rows():
    stats = completion_stats([[4, 2], [4, 9], [], [1, 3]], [2, 9], n=1)
    assert stats["stop_rate"] == pytest.approx(2 / 4)  # an empty completion did not stop
    assert stats["response_len"] == pytest.approx(6 / 4)
    assert stats["repeat_frac"] == 0.0


def test_completion_stats_no_completions_is_nan():
    assert all(math.isnan(v) for v in completion_stats([], [0]).values())
