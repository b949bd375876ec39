import pytest

from sora_tune.sora import XiSchedule


def test_constant():
    schedule = XiSchedule(xi=1e-4)
    assert schedule.values() == [1e-4]
    assert [schedule.xi_at(e) for e in range(3)] == [1e-4] * 3


def test_linear_stages_and_dense_phase():
    schedule = XiSchedule("linear", xi=1e-5, xi_max=1e-4, stages=4, every=2, dense_epochs=3)
    assert schedule.values() == pytest.approx([1e-5, 4e-5, 7e-5, 1e-4])
    stages = [schedule.stage_at(e) for e in range(12)]
    assert stages == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3]
    assert schedule.length == 3 + 3 * 2


def test_geometric_is_even_on_a_log_scale():
    schedule = XiSchedule("geometric", xi=1e-5, xi_max=1e-3, stages=3)
    assert schedule.values() == pytest.approx([1e-5, 1e-4, 1e-3])
    # Without a dense phase, ξ0 lasts one stage like the others.
    assert [schedule.xi_at(e) for e in range(4)] == pytest.approx([1e-5, 1e-4, 1e-3, 1e-3])


def test_increment_rule_of_algorithm_1():
    schedule = XiSchedule("increment", xi=1e-4, delta=1e-4, xi_max=5e-4, every=2, dense_epochs=4)
    assert schedule.values() == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4, 5e-4])
    assert schedule.xi_at(3) == pytest.approx(1e-4)
    assert schedule.xi_at(4) == pytest.approx(2e-4)
    assert schedule.xi_at(6) == pytest.approx(3e-4)
    assert schedule.xi_at(100) == pytest.approx(5e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "cosine"}, "kind must be"),
        ({"xi": -1e-4}, "xi must be"),
        ({"kind": "linear", "xi": 1e-4, "xi_max": 1e-5, "stages": 3}, "xi_max must be"),
        ({"kind": "linear", "xi_max": 1e-3, "stages": 1}, "stages must be"),
        ({"kind": "increment", "xi_max": 1e-3}, "delta must be"),
        ({"kind": "geometric", "xi": 0.0, "xi_max": 1e-3, "stages": 3}, "xi must be > 0"),
        ({"every": 0}, "every must be"),
        ({"dense_epochs": -1}, "dense_epochs must be"),
    ],
)
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        XiSchedule(**kwargs)


def test_stage_spans_are_the_epochs_of_every_stage_trained():
    schedule = XiSchedule("linear", xi=1e-5, xi_max=1e-4, stages=4, every=2, dense_epochs=3)
    assert schedule.stage_spans(8) == {
        0: range(0, 3),
        1: range(3, 5),
        2: range(5, 7),
        3: range(7, 8),
    }
    # the last stage runs to the end; stages the epochs never reach are left out
    assert schedule.stage_spans(12)[3] == range(7, 12)
    assert schedule.stage_spans(4) == {0: range(0, 3), 1: range(3, 4)}
