"""Pareto fronts, hypervolume and the choice of one run, as pure numpy on arrays of objectives.

The objectives of a search and their directions (`OBJECTIVES`) are defined here, once: the
search tells them to Optuna and to its early-stopping scheduler, selection builds its front on
them. This module knows nothing of runs, Ray or MLflow, so both can use it.

Objectives come as an `(n, k)` array with one direction per column, `"maximize"` or `"minimize"`.
Inside, every column is turned into a loss (maximised columns are negated), so dominance is
"no worse everywhere, strictly better somewhere" on losses.

Rows with NaN in any objective are never on the front and dominate nothing: callers filter them
out and report them. Identical rows do not dominate each other, so when such a point is
non-dominated, every copy of it is on the front.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DIRECTIONS = ("maximize", "minimize")
# The objectives of a multi-objective search, in order, and their directions. Selection reads
# only these two (never test_score).
OBJECTIVES = {"val_score": "maximize", "retained_params": "minimize"}
# What the commands print for the test score of trials without a test set (no test file): no
# number is invented.
NO_TEST_SCORE = "none (no test set)"
_SELECTION_DIRECTIONS = tuple(OBJECTIVES.values())


def _signs(directions: Sequence[str]) -> np.ndarray:
    """-1 for maximised and +1 for minimised objectives: multiplying turns values into losses."""
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad:
        raise ValueError(f"directions must be 'maximize' or 'minimize', got {bad}")
    return np.array([-1.0 if d == "maximize" else 1.0 for d in directions])


def _to_loss(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """`values` as losses (lower is better), checked against `directions`."""
    signs = _signs(directions)
    if values.ndim != 2 or values.shape[1] != len(directions):
        raise ValueError(
            f"values must have shape (n, {len(directions)}) for {len(directions)} directions, "
            f"got {values.shape}"
        )
    return values * signs


# Rows compared with all others at once: O(block · n · k) memory for the comparison.
DOMINANCE_BLOCK = 1024


def _dominators(loss: np.ndarray) -> np.ndarray:
    """`(n, n)` booleans: `[i, j]` when row `j` is no worse than row `i` everywhere and better
    somewhere (dominates it), for rows of losses without NaN."""
    dominated = np.empty((len(loss), len(loss)), dtype=bool)
    for start in range(0, len(loss), DOMINANCE_BLOCK):
        rows = loss[start : start + DOMINANCE_BLOCK]
        no_worse = np.ones((len(rows), len(loss)), dtype=bool)
        better = np.zeros((len(rows), len(loss)), dtype=bool)
        for column in range(loss.shape[1]):  # a few objectives: one (block, n) pass each
            others, own = loss[None, :, column], rows[:, column, None]
            no_worse &= others <= own
            better |= others < own
        dominated[start : start + DOMINANCE_BLOCK] = no_worse & better
    return dominated


def is_pareto_front(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Which rows are on the Pareto front.

    Args:
        values: `(n, k)` objective values, one row per run.
        directions: `"maximize"` or `"minimize"` for each of the `k` columns.

    Returns:
        A boolean mask of length `n`. Exact duplicates of a non-dominated point are all on the
        front; rows with NaN in any objective never are. One row is its own front; no rows give
        an empty mask.

    Raises:
        ValueError: an unknown direction, or `values` not of shape `(n, len(directions))`.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        _signs(directions)
        return np.zeros(len(values), dtype=bool)
    loss = _to_loss(values, directions)
    finite = ~np.isnan(loss).any(axis=1)
    # O(n²·k) time and O(n²) memory: searches have thousands of runs, not millions.
    on_front = np.zeros(len(loss), dtype=bool)
    on_front[finite] = ~_dominators(loss[finite]).any(axis=1)
    return on_front


def nondominated_ranks(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Non-dominated sorting: 0 for the rows on the Pareto front, 1 for the front of what
    remains without them, and so on; `inf` for rows with NaN.

    Raises:
        ValueError: as `is_pareto_front`.
    """
    values = np.asarray(values, dtype=float)
    ranks = np.full(len(values), np.inf)
    if values.size == 0:
        _signs(directions)
        return ranks
    loss = _to_loss(values, directions)
    finite = np.flatnonzero(~np.isnan(loss).any(axis=1))
    dominators = _dominators(loss[finite])
    # Peel the fronts: a row is on the next one when no row still left dominates it.
    left = np.ones(len(finite), dtype=bool)
    count = dominators.sum(axis=1)
    rank = 0
    while left.any():
        front = left & (count == 0)
        ranks[finite[front]] = rank
        left &= ~front
        count -= dominators[:, front].sum(axis=1)
        rank += 1
    return ranks


def epsilon_net_order(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """The rows of one front from first to last in the ε-net order of Salinas et al. 2021, as
    that paper and syne-tune's docstrings describe it: the best row on the first objective first,
    then again and again the row farthest from those already taken, with every objective min-max
    scaled. Ties go to the lexicographically better row, so the order of distinct rows depends on
    their values only, never on the order they come in (a copy of a taken row is at distance 0,
    so copies come after every distinct row).

    Not syne-tune 0.16's code (`compute_epsilon_net`), which measures distances on raw values:
    there, retained_params (hundreds of thousands) outweighs val_score (at most 1), so the order
    spreads sizes only; and it returns each row's rank where its caller expects an order, and
    breaks ties by arrival. `tune.schedulers` lists these deviations and why."""
    loss = _to_loss(np.asarray(values, dtype=float), directions)
    if len(loss) == 0:
        return np.zeros(0, dtype=int)
    spread = np.ptp(loss, axis=0)
    scaled = (loss - loss.min(axis=0)) / np.where(spread > 0, spread, 1.0)
    # Value order (first objective first): breaks every tie below by value, not by position.
    by_value = np.lexsort(scaled.T[::-1])
    order = [int(by_value[0])]
    distance = np.linalg.norm(scaled - scaled[order[0]], axis=1)
    distance[order[0]] = -np.inf
    for _ in range(len(loss) - 1):
        farthest = by_value[np.argmax(distance[by_value])]  # the first maximum in value order
        order.append(int(farthest))
        distance = np.minimum(distance, np.linalg.norm(scaled - scaled[farthest], axis=1))
        distance[farthest] = -np.inf  # the rows taken before stay -inf through the minimum
    return np.array(order)


def hypervolume_over_time(
    candidate_runs: Sequence[str],
    values: np.ndarray,
    timeline: Sequence[tuple[str, float]],
    directions: Sequence[str],
    reference: Sequence[float],
) -> np.ndarray:
    """How the hypervolume grew as a search spent compute.

    Args:
        candidate_runs: The run of each row of `values` (a run may have several: its stages).
        values: `(n, k)` objective values of the candidates.
        timeline: `(run, compute)` for every run, candidate or not, in the order the runs ended.
        directions, reference: As for `hypervolume`.

    Returns:
        `(len(timeline), 2)`: after each run ended, the compute spent so far (the sum of the
        runs' compute) and the hypervolume of the candidates of the runs ended by then.
    """
    values = np.asarray(values, dtype=float)
    owners = np.asarray(candidate_runs, dtype=object)
    ended: set[str] = set()
    curve, compute = [], 0.0
    for run, spent in timeline:
        compute += spent
        ended.add(run)
        known = values[[owner in ended for owner in owners]] if len(owners) else values[:0]
        curve.append((compute, hypervolume(known, directions, reference) if len(known) else 0.0))
    return np.array(curve, dtype=float).reshape(-1, 2)


def default_reference(values: np.ndarray, directions: Sequence[str]) -> tuple[float, ...]:
    """A reference point for `hypervolume`: 0 for maximised objectives, 10% past the worst value
    seen for minimised ones.

    For (val_score, retained_params) that is (0.0, 1.1 × the largest retained_params): a score of 0
    is the floor of accuracy and F1 and chance level for MCC and correlations, so runs at or below
    it add nothing, and the largest runs still add a sliver of volume. The second coordinate depends
    on the runs: to compare the hypervolumes of two searches, pass both the same reference.

    Raises:
        ValueError: no row without NaN, or bad `values` / `directions` (see `is_pareto_front`).
    """
    loss = _to_loss(np.asarray(values, dtype=float), directions)
    loss = loss[~np.isnan(loss).any(axis=1)]
    if len(loss) == 0:
        raise ValueError("default_reference needs at least one row without NaN")
    reference = []
    for column, direction in zip(loss.T, directions, strict=True):
        worst = float(column.max())
        if direction == "maximize":
            reference.append(0.0)
        else:
            # A margin of 1 when the worst is 0 (every rank pruned), so such runs still count.
            reference.append(worst + 0.1 * abs(worst) if worst != 0 else 1.0)
    return tuple(reference)


def hypervolume(values: np.ndarray, directions: Sequence[str], reference: Sequence[float]) -> float:
    """The volume dominated by `values` and bounded by `reference` (exact).

    Only points strictly better than `reference` in every objective add volume; rows with NaN
    add nothing. Two objectives are a sort and a sweep; more are sliced along the last objective
    into (k-1)-dimensional problems, exact but O(n^(k-1) log n), which is fine for the three
    objectives (val_score, retained_params, train_time_s) of a search of a few hundred runs.

    Args:
        values: `(n, k)` objective values, `k >= 2`.
        directions: `"maximize"` or `"minimize"` for each column.
        reference: The worst corner of the measured box, one value per objective (see
            `default_reference`).

    Raises:
        ValueError: fewer than 2 objectives, a reference of the wrong length or with NaN, or bad
            `values` / `directions` (see `is_pareto_front`).
    """
    if len(directions) < 2:
        raise ValueError(f"hypervolume needs at least 2 objectives, got {len(directions)}")
    if len(reference) != len(directions) or np.isnan(reference).any():
        raise ValueError(
            f"reference must be {len(directions)} numbers without NaN, got {tuple(reference)}"
        )
    ref = np.asarray(reference, dtype=float) * _signs(directions)
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return 0.0
    loss = _to_loss(values, directions)
    # NaN compares False, so rows with NaN drop out here too.
    return _hypervolume(loss[np.all(loss < ref, axis=1)], ref)


def _hypervolume(loss: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume of losses that are all strictly below `ref`."""
    if len(loss) == 0:
        return 0.0
    if loss.shape[1] == 2:
        return _hypervolume_2d(loss, ref)
    # Between two consecutive values of the last objective, the covered cross-section is the
    # (k-1)-dimensional hypervolume of the points at or below the lower value.
    loss = loss[np.argsort(loss[:, -1], kind="stable")]
    levels = np.append(loss[:, -1], ref[-1])
    volume = 0.0
    for i in range(len(loss)):
        height = levels[i + 1] - levels[i]
        if height > 0:
            volume += height * _hypervolume(loss[: i + 1, :-1], ref[:-1])
    return volume


def _hypervolume_2d(loss: np.ndarray, ref: np.ndarray) -> float:
    # Left to right, each point that lowers the best second loss so far adds the strip between
    # the two second losses, reaching from its first loss to the reference.
    loss = loss[np.lexsort((loss[:, 1], loss[:, 0]))]
    volume, best = 0.0, ref[1]
    for first, second in loss:
        if second < best:
            volume += (ref[0] - first) * (best - second)
            best = second
    return float(volume)


@dataclass(frozen=True)
class Selection:
    """The chosen run: its `index` in the arrays given to `select`, and the `rule` that chose it
    (in words, including any fallback)."""

    index: int
    rule: str


def select(
    scores: np.ndarray,
    params: np.ndarray,
    *,
    max_params: float | None = None,
    min_score: float | None = None,
    knee: bool = False,
) -> Selection:
    """Choose one run from the (val_score, retained_params) Pareto front by one stated rule.

    Only val_score and retained_params are looked at: report the chosen run's test_score after
    the choice, never use it to make it. Rules:

    - default: the best val_score, ties broken by fewer params;
    - `max_params=N`: the best val_score among runs with retained_params <= N;
    - `min_score=S`: the fewest params among runs with val_score >= S;
    - `knee=True`: with both axes min-max scaled over the front, the front point that lies
      farthest above the straight line between the front's two end points (the point of
      diminishing returns). With fewer than 3 distinct front points, or none above that line,
      the default rule is used and `Selection.rule` says so.

    Exact duplicates resolve to the first one given.

    Args:
        scores: val_score of each run (NaN: not a candidate).
        params: retained_params of each run (NaN: not a candidate).
        max_params: Parameter budget.
        min_score: Score to reach.
        knee: Choose the knee of the front.

    Returns:
        The chosen run's index in `scores` / `params` and the rule that chose it.

    Raises:
        ValueError: more than one rule, arrays of different lengths, no run with both values, or
            no run satisfying the rule (the message names the closest run).
    """
    if (max_params is not None) + (min_score is not None) + bool(knee) > 1:
        raise ValueError("choose at most one of max_params, min_score and knee")
    scores, params = np.asarray(scores, dtype=float), np.asarray(params, dtype=float)
    front = _front_by_params(scores, params)
    best = front[np.argmax(scores[front])]
    if max_params is not None:
        return _best_within(front, scores, params, max_params)
    if min_score is not None:
        return _fewest_reaching(front, scores, params, min_score, best=best)
    if knee:
        return _knee(front, scores, params, fallback=best)
    return Selection(int(best), "best val_score")


def _front_by_params(scores: np.ndarray, params: np.ndarray) -> np.ndarray:
    """The indices of the (val_score, retained_params) front, by params (see `select`)."""
    if scores.shape != params.shape or scores.ndim != 1:
        raise ValueError(
            f"scores and params must be 1-D of the same length, got {scores.shape} and "
            f"{params.shape}"
        )
    front = np.flatnonzero(
        is_pareto_front(np.column_stack([scores, params]), _SELECTION_DIRECTIONS)
    )
    if len(front) == 0:
        raise ValueError("no run with both a val_score and a retained_params to select from")
    # Along the front, fewer params means a lower score; a stable sort keeps duplicates in input
    # order, so argmax and [0] pick the first copy.
    return front[np.argsort(params[front], kind="stable")]


def _best_within(
    front: np.ndarray, scores: np.ndarray, params: np.ndarray, max_params: float
) -> Selection:
    within = front[params[front] <= max_params]
    if len(within) == 0:
        raise ValueError(
            f"no run has retained_params <= {max_params:.0f}; the smallest has "
            f"{params[front[0]]:.0f} params (val_score {scores[front[0]]:.4g})"
        )
    return Selection(
        int(within[np.argmax(scores[within])]),
        f"best val_score with retained_params <= {max_params:.0f}",
    )


def _fewest_reaching(
    front: np.ndarray, scores: np.ndarray, params: np.ndarray, min_score: float, *, best: int
) -> Selection:
    within = front[scores[front] >= min_score]
    if len(within) == 0:
        raise ValueError(
            f"no run reaches val_score {min_score:.4g}; best is {scores[best]:.4g} with "
            f"{params[best]:.0f} params"
        )
    return Selection(int(within[0]), f"fewest retained_params with val_score >= {min_score:.4g}")


def _knee(front: np.ndarray, scores: np.ndarray, params: np.ndarray, fallback: int) -> Selection:
    """The knee of a front sorted by params (see `select`)."""
    distinct = np.unique(np.column_stack([scores[front], params[front]]), axis=0)
    if len(distinct) < 3:
        return Selection(
            int(fallback),
            f"best val_score (knee needs 3 distinct front points, got {len(distinct)})",
        )
    # The front rises from (fewest params, lowest score) to (most params, best score); after
    # scaling both to [0, 1] the end points are (0, 0) and (1, 1), and y - x is proportional to
    # the distance above the line between them.
    x = (params[front] - params[front[0]]) / (params[front[-1]] - params[front[0]])
    y = (scores[front] - scores[front[0]]) / (scores[front[-1]] - scores[front[0]])
    above = y - x
    if above.max() <= 0:
        return Selection(
            int(fallback), "best val_score (no front point above the line between its end points)"
        )
    return Selection(int(front[np.argmax(above)]), "knee of the front")


# What separates a SoRA point from the LoRA ladder's line when it is "on" it: half a point of a
# score in [0, 1], below the seed-to-seed spread of the reproduction's small-data runs.
LADDER_TOLERANCE = 0.005


@dataclass(frozen=True)
class LadderComparison:
    """SoRA's (val_score, retained_params) points against a LoRA rank ladder's.

    Attributes:
        hypervolume_ratio: The hypervolume of SoRA's points over the ladder's, both measured from
            `reference`: above 1, SoRA's front buys more score per parameter.
        reference: The reference point of both (`default_reference` of all the points).
        above, on, below: How many SoRA points lie above, on (within `LADDER_TOLERANCE`) or below
            the ladder's line: its mean score per rank, linear in log(retained_params) between
            rungs and flat beyond its ends.
        dominated: `(ladder row, SoRA row)` pairs where the ladder point scores at least as well
            with at most as many parameters, and does better in one.
    """

    hypervolume_ratio: float
    reference: tuple[float, ...]
    above: int
    on: int
    below: int
    dominated: list[tuple[int, int]]


def compare_to_ladder(
    sora: np.ndarray, ladder: np.ndarray, *, tolerance: float = LADDER_TOLERANCE
) -> LadderComparison:
    """Compare SoRA's points with a LoRA ladder's, both `(n, 2)` arrays of (val_score,
    retained_params) without NaN (see `LadderComparison`).

    Raises:
        ValueError: either array is empty or not of shape `(n, 2)`.
    """
    sora, ladder = np.asarray(sora, dtype=float), np.asarray(ladder, dtype=float)
    if min(len(sora), len(ladder)) == 0 or sora.shape[1:] != (2,) or ladder.shape[1:] != (2,):
        raise ValueError("compare_to_ladder needs (n, 2) arrays of SoRA and ladder points")
    directions = list(OBJECTIVES.values())
    reference = default_reference(np.vstack([sora, ladder]), directions)
    ladder_volume = hypervolume(ladder, directions, reference)
    ratio = hypervolume(sora, directions, reference) / ladder_volume if ladder_volume else np.inf
    sizes, inverse = np.unique(ladder[:, 1], return_inverse=True)
    line = np.bincount(inverse, weights=ladder[:, 0]) / np.bincount(inverse)  # mean per rank
    log_sizes = np.log(np.maximum(sizes, 1.0))
    expected = np.interp(np.log(np.maximum(sora[:, 1], 1.0)), log_sizes, line)
    gap = sora[:, 0] - expected
    ladder_loss, sora_loss = _to_loss(ladder, directions), _to_loss(sora, directions)
    dominated = [
        (i, j)
        for i, point in enumerate(ladder_loss)
        for j, other in enumerate(sora_loss)
        if np.all(point <= other) and np.any(point < other)
    ]
    return LadderComparison(
        hypervolume_ratio=float(ratio),
        reference=reference,
        above=int(np.sum(gap > tolerance)),
        on=int(np.sum(np.abs(gap) <= tolerance)),
        below=int(np.sum(gap < -tolerance)),
        dominated=dominated,
    )


def test_score_text(value: float | None) -> str:
    """A test score as the commands print it: 4 decimals, or `NO_TEST_SCORE` when the trial had
    no test set (not logged: `None` or NaN)."""
    return NO_TEST_SCORE if value is None or value != value else f"{value:.4f}"
