import math

import numpy as np
import pytest

from sora_tune.front import (
    compare_to_ladder,
    default_reference,
    hypervolume,
    is_pareto_front,
    select,
)

SCORE_PARAMS = ("maximize", "minimize")


@pytest.mark.parametrize(
    "values, expected",
    [
        # (val_score, params): the third run is worse and bigger than the second.
        ([[0.9, 300], [0.8, 100], [0.7, 200]], [True, True, False]),
        # A tie on score: the one with fewer params wins.
        ([[0.8, 100], [0.8, 150], [0.9, 400]], [True, False, True]),
        # A tie on params: the better score wins.
        ([[0.8, 100], [0.7, 100]], [True, False]),
        # Exact duplicates of a front point are all on the front.
        ([[0.8, 100], [0.8, 100], [0.7, 120]], [True, True, False]),
        # ... and duplicates of a dominated point are all off it.
        ([[0.9, 50], [0.8, 100], [0.8, 100]], [True, False, False]),
    ],
)
def test_front_in_2d(values, expected):
    assert is_pareto_front(np.array(values), SCORE_PARAMS).tolist() == expected


def test_front_in_3d():
    # (val_score, params, train_time_s): the fast run (1) is dominated in 2-D but not in 3-D, and
    # the slower twin (3) of run 0 is on the 2-D front but not on the 3-D one.
    values = np.array([[0.9, 100, 50], [0.85, 100, 10], [0.8, 200, 60], [0.9, 100, 60]])
    directions = ("maximize", "minimize", "minimize")
    assert is_pareto_front(values, directions).tolist() == [True, True, False, False]
    assert is_pareto_front(values[:, :2], SCORE_PARAMS).tolist() == [True, False, False, True]


def test_nan_rows_are_never_on_the_front_and_dominate_nothing():
    values = np.array([[math.nan, 10], [0.9, math.nan], [0.5, 500]])
    assert is_pareto_front(values, SCORE_PARAMS).tolist() == [False, False, True]


@pytest.mark.parametrize("values, expected", [([[0.5, 10]], [True]), (np.empty((0, 2)), [])])
def test_single_and_empty(values, expected):
    assert is_pareto_front(np.array(values), SCORE_PARAMS).tolist() == expected


@pytest.mark.parametrize(
    "values, directions, message",
    [
        ([[1.0, 2.0]], ("maximize", "up"), "directions must be"),
        ([[1.0, 2.0, 3.0]], SCORE_PARAMS, r"shape \(n, 2\)"),
        ([1.0, 2.0], SCORE_PARAMS, r"shape \(n, 2\)"),
    ],
)
def test_bad_input_is_refused(values, directions, message):
    with pytest.raises(ValueError, match=message):
        is_pareto_front(np.array(values), directions)


# Three front points and one dominated run; by hand, sweeping by params (reference 0, 400):
# (0.7, 50) adds 0.7 × 350 = 245, (0.8, 100) adds 0.1 × 300 = 30, (0.9, 300) adds 0.1 × 100 = 10.
HAND = np.array([[0.8, 100], [0.9, 300], [0.7, 50], [0.6, 200]])


def test_hypervolume_by_hand():
    assert hypervolume(HAND, SCORE_PARAMS, (0.0, 400)) == pytest.approx(285.0)


def test_hypervolume_ignores_points_not_beating_the_reference():
    # With the score reference at 0.75 only (0.8, 100) and (0.9, 300) count:
    # 0.05 × 300 + 0.1 × 100 = 25. A params reference at 300 drops (0.9, 300) as well.
    assert hypervolume(HAND, SCORE_PARAMS, (0.75, 400)) == pytest.approx(25.0)
    assert hypervolume(HAND, SCORE_PARAMS, (0.75, 300)) == pytest.approx(0.05 * 200)
    assert hypervolume(HAND, SCORE_PARAMS, (1.0, 400)) == 0.0
    nan_row = np.vstack([HAND, [[math.nan, 10]]])
    assert hypervolume(nan_row, SCORE_PARAMS, (0.0, 400)) == pytest.approx(285.0)
    assert hypervolume(np.empty((0, 2)), SCORE_PARAMS, (0.0, 400)) == 0.0


def test_hypervolume_in_3d_matches_boxes():
    # One point is a box; two points overlap in a box counted once.
    directions = ("maximize", "minimize", "minimize")
    reference = (0.0, 10.0, 10.0)
    one = np.array([[1.0, 5.0, 5.0]])
    assert hypervolume(one, directions, reference) == pytest.approx(1 * 5 * 5)
    two = np.array([[1.0, 5.0, 5.0], [2.0, 8.0, 8.0]])
    assert hypervolume(two, directions, reference) == pytest.approx(25 + 2 * 2 * 2 - 1 * 2 * 2)


@pytest.mark.parametrize(
    "directions, reference, message",
    [
        (("maximize",), (0.0,), "at least 2 objectives"),
        (SCORE_PARAMS, (0.0,), "reference must be 2 numbers"),
        (SCORE_PARAMS, (0.0, math.nan), "without NaN"),
    ],
)
def test_bad_hypervolume_input_is_refused(directions, reference, message):
    with pytest.raises(ValueError, match=message):
        hypervolume(HAND[:, : len(directions)], directions, reference)


def test_default_reference():
    # Score 0, params 10% past the largest; NaN rows are ignored.
    values = np.vstack([HAND, [[math.nan, 5000]]])
    assert default_reference(values, SCORE_PARAMS) == pytest.approx((0.0, 330.0))
    # A front of fully pruned runs still has volume.
    assert default_reference(np.array([[0.6, 0.0]]), SCORE_PARAMS) == (0.0, 1.0)
    with pytest.raises(ValueError, match="without NaN"):
        default_reference(np.array([[math.nan, 1.0]]), SCORE_PARAMS)


# (val_score, params) of a small search: a duplicate pair, two dominated runs (indices 4, 5).
SCORES = np.array([0.70, 0.82, 0.86, 0.86, 0.80, 0.85, 0.87])
PARAMS = np.array([1000, 3000, 6000, 6000, 5000, 9000, 20000])


@pytest.mark.parametrize(
    "rule, index, words",
    [
        ({}, 6, "best val_score"),
        ({"max_params": 6000}, 2, "retained_params <= 6000"),  # duplicates: the first one given
        ({"max_params": 5999}, 1, "retained_params <= 5999"),
        ({"max_params": 1000}, 0, "retained_params <= 1000"),
        ({"min_score": 0.85}, 2, "val_score >= 0.85"),
        ({"min_score": 0.87}, 6, "val_score >= 0.87"),
        ({"min_score": 0.5}, 0, "val_score >= 0.5"),
    ],
)
def test_selection_rules(rule, index, words):
    selection = select(SCORES, PARAMS, **rule)
    assert selection.index == index
    assert words in selection.rule


def test_default_breaks_score_ties_by_fewer_params():
    assert select([0.9, 0.9, 0.9], [300, 100, 100]).index == 1


def test_selection_ignores_nan_rows():
    assert select([math.nan, 0.8, 0.95], [10, 100, math.nan]).index == 1


@pytest.mark.parametrize(
    "rule, message",
    [
        (
            {"max_params": 500},
            r"no run has retained_params <= 500; the smallest has 1000 params \(val_score 0.7\)",
        ),
        ({"min_score": 0.9}, "no run reaches val_score 0.9; best is 0.87 with 20000 params"),
        ({"max_params": 500, "min_score": 0.9}, "at most one of"),
        ({"min_score": 0.9, "knee": True}, "at most one of"),
    ],
)
def test_selection_errors(rule, message):
    with pytest.raises(ValueError, match=message):
        select(SCORES, PARAMS, **rule)


def test_selection_needs_candidates():
    with pytest.raises(ValueError, match="no run with both"):
        select([math.nan], [1.0])
    with pytest.raises(ValueError, match="same length"):
        select([0.5, 0.6], [1.0])


def test_knee_of_an_l_shaped_front():
    # The score jumps up to 0.88 by 2000 params, then barely moves: the corner is the knee.
    scores = [0.50, 0.80, 0.88, 0.885, 0.89, 0.895, 0.70]
    params = [100, 1000, 2000, 10000, 20000, 40000, 30000]
    selection = select(scores, params, knee=True)
    assert (selection.index, selection.rule) == (2, "knee of the front")


@pytest.mark.parametrize(
    "scores, params, index, why",
    [
        ([0.8, 0.9, 0.9], [100, 200, 200], 1, "knee needs 3 distinct front points, got 2"),
        # Increasing returns: every point is below the line between the end points.
        ([0.5, 0.55, 0.9], [100, 500, 600], 2, "no front point above the line"),
    ],
)
def test_knee_falls_back_to_the_best_score(scores, params, index, why):
    selection = select(scores, params, knee=True)
    assert selection.index == index
    assert selection.rule.startswith("best val_score") and why in selection.rule


def test_hypervolume_over_time_counts_every_runs_compute():
    from sora_tune.front import hypervolume_over_time

    directions = ("maximize", "minimize")
    values = np.array([[0.5, 10.0], [0.8, 30.0], [0.7, 5.0]])  # run b has two points (stages)
    timeline = [("a", 60.0), ("stopped", 20.0), ("b", 100.0)]
    curve = hypervolume_over_time(["a", "b", "b"], values, timeline, directions, (0.0, 50.0))
    assert curve[:, 0].tolist() == [60.0, 80.0, 180.0]  # the stopped run's compute counts
    assert curve[0, 1] == pytest.approx(0.5 * 40)
    assert curve[1, 1] == curve[0, 1]  # it added no point
    assert curve[2, 1] == pytest.approx(hypervolume(values, directions, (0.0, 50.0)))
    assert hypervolume_over_time(
        [], np.empty((0, 2)), [("x", 5.0)], directions, (0, 1)
    ).tolist() == [[5.0, 0.0]]


def test_sora_points_are_compared_with_the_lora_ladder_line():
    # The ladder: ranks 1, 2, 4 (params 100, 200, 400), two seeds at rank 1.
    ladder = np.array([[0.70, 100.0], [0.72, 100.0], [0.75, 200.0], [0.80, 400.0]])
    sora = np.array(
        [
            [0.78, 150.0],  # above: the line at 150 is 0.71 + (0.75-0.71)·log(1.5)/log(2)
            [0.75, 200.0],  # on a rung
            [0.74, 400.0],  # below; dominated by ranks 2 and 4 (0.75 at 200, 0.80 at 400)
            [0.60, 50.0],  # below the flat start (0.71), dominated by nothing (fewer params)
        ]
    )
    comparison = compare_to_ladder(sora, ladder)
    assert (comparison.above, comparison.on, comparison.below) == (1, 1, 2)
    assert comparison.dominated == [(2, 2), (3, 2)]
    reference = (0.0, 440.0)  # 1.1 × the largest retained_params of both
    assert comparison.reference == pytest.approx(reference)
    directions = ["maximize", "minimize"]
    assert comparison.hypervolume_ratio == pytest.approx(
        hypervolume(sora, directions, reference) / hypervolume(ladder, directions, reference)
    )


def test_the_ladder_comparison_needs_points_on_both_sides():
    with pytest.raises(ValueError, match="needs"):
        compare_to_ladder(np.empty((0, 2)), np.array([[0.7, 100.0]]))
