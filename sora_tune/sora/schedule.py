"""ξ schedules: how the gate threshold rises over training (the paper's sparsifying scheduler).

Every schedule is a list of stage values. Training runs `dense_epochs` at stage 0 (ξ0; by default
`every` epochs), then moves up one stage every `every` epochs and stays on the last stage.

- ``constant``: one stage, ξ0.
- ``linear`` / ``geometric``: `stages` values from ξ0 to ξ_max, evenly spaced on a linear or a log
  scale.
- ``increment``: Algorithm 1 of the paper, ξ0, ξ0 + δξ, ξ0 + 2δξ, … up to ξ_max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

ScheduleKind = Literal["constant", "linear", "geometric", "increment"]


@dataclass(frozen=True)
class XiSchedule:
    """A stepwise schedule for ξ.

    Args:
        kind: `"constant"`, `"linear"`, `"geometric"` or `"increment"`.
        xi: ξ0, the threshold of the first (dense) stage; ≥ 0 (> 0 for `geometric`).
        xi_max: The last stage's ξ (`linear`, `geometric`, `increment`); > ξ0.
        stages: Number of stages K including the first (`linear`, `geometric`); ≥ 2.
        delta: δξ, the increment per stage (`increment`); > 0.
        every: Epochs per stage after the dense phase; ≥ 1. (A trial with its stages in steps
            builds the schedule in optimizer steps: `every` and `dense_epochs` are then steps.)
        dense_epochs: Epochs at ξ0 before the first raise (train to convergence first); ≥ 0.
            0: no dense phase, training starts at stage 1 and ξ0 only anchors the values.
            `None` means `every`, so ξ0 lasts as long as every other stage.
    """

    kind: ScheduleKind = "constant"
    xi: float = 1e-4  # ξ0; the paper sweeps 1e-5 … 1e-4
    xi_max: float | None = None  # last stage's ξ
    stages: int | None = None  # K, for linear / geometric
    delta: float | None = None  # δξ per stage, for increment
    every: int = 1  # epochs per stage
    dense_epochs: int | None = None  # epochs at ξ0 before the first raise; None: `every`

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "geometric", "increment"):
            raise ValueError(
                f"kind must be constant, linear, geometric or increment: {self.kind!r}"
            )
        if not (math.isfinite(self.xi) and self.xi >= 0):
            raise ValueError(f"xi must be a finite number >= 0, got {self.xi!r}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every!r}")
        if self.dense_epochs is not None and self.dense_epochs < 0:
            raise ValueError(f"dense_epochs must be >= 0, got {self.dense_epochs!r}")
        if self.kind == "constant":
            return
        if self.xi_max is None or not self.xi_max > self.xi:
            raise ValueError(f"xi_max must be > xi ({self.xi}) for a {self.kind} schedule")
        if self.kind == "increment":
            if self.delta is None or not self.delta > 0:
                raise ValueError(f"delta must be > 0 for an increment schedule, got {self.delta!r}")
        elif self.stages is None or self.stages < 2:
            raise ValueError(f"stages must be >= 2 for a {self.kind} schedule, got {self.stages!r}")
        if self.kind == "geometric" and self.xi <= 0:
            raise ValueError("xi must be > 0 for a geometric schedule")

    def values(self) -> list[float]:
        """The ξ of every stage, in order."""
        if self.kind == "constant":
            return [self.xi]
        if self.kind == "linear":
            return np.linspace(self.xi, self.xi_max, self.stages).tolist()
        if self.kind == "geometric":
            return np.geomspace(self.xi, self.xi_max, self.stages).tolist()
        # Count the steps with a tolerance so 1e-4 + k·1e-4 reaches xi_max despite rounding.
        steps = math.floor((self.xi_max - self.xi) / self.delta + 1e-9)
        return [self.xi + k * self.delta for k in range(steps + 1)]

    def stage_at(self, epoch: int) -> int:
        """The stage index in force during `epoch` (0-based)."""
        if epoch < self.dense_phase:
            return 0
        return min((epoch - self.dense_phase) // self.every + 1, len(self.values()) - 1)

    def stage_spans(self, length: int) -> dict[int, range]:
        """`{stage: its units (0-based)}` for the stages that `length` units of training pass
        through, in order; the last one runs to the end. The unit is the schedule's own: epochs,
        or optimizer steps when a trial gives its stages in steps. Every stage boundary of a
        trial (its learning-rate restarts, its ξ per step, the evaluations that end a stage) is
        read from here."""
        last = len(self.values()) - 1
        starts = [0] + [self.dense_phase + (k - 1) * self.every for k in range(1, last + 1)]
        ends = [*starts[1:], length]
        return {
            stage: range(min(start, length), min(end, length))
            for stage, (start, end) in enumerate(zip(starts, ends, strict=True))
            if min(start, length) < min(end, length)
        }

    def xi_at(self, epoch: int) -> float:
        return self.values()[self.stage_at(epoch)]

    @property
    def dense_phase(self) -> int:
        """Epochs (or steps, see `every`) spent at ξ0."""
        return self.every if self.dense_epochs is None else self.dense_epochs

    @property
    def length(self) -> int:
        """Epochs (or steps) to reach the last stage and train one full stage there."""
        return self.dense_phase + (len(self.values()) - 1) * self.every
