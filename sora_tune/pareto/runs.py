"""Choose a SoRA adapter from what a search recorded in MLflow.

`load_trial_runs` reads the trial runs of a search (or of a whole experiment) and says which runs
were left out and why; `pareto_report` finds the val_score-vs-retained_params Pareto front of the
SoRA runs, chooses one run by a stated rule and writes the front back: `pareto.csv`, `pareto.png`,
a `pareto` tag on every run, and both files on the search's parent run.

LoRA and AdaLoRA runs of the same search are baselines: they are drawn and listed for reference
but are never on the front and never chosen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Experiment, Metric, Run
from mlflow.exceptions import MlflowException

from ..front import OBJECTIVES as SEARCH_OBJECTIVES
from ..front import (
    LadderComparison,
    compare_to_ladder,
    default_reference,
    hypervolume,
    hypervolume_over_time,
    is_pareto_front,
    select,
    test_score_text,
)
from ..tracking import FAILURE_TAG, ROLE_TAG, STAGE_PREFIX, STOPPED_TAG
from ..uris import existing_store

FRONT_METHOD = "sora"
LADDER_METHOD = "lora"  # LoRA runs at several ranks: the ladder SoRA's front is compared with
# The search's objectives, and training time as an optional third.
OBJECTIVES = SEARCH_OBJECTIVES | {"train_time_s": "minimize"}
REQUIRED_METRICS = ("val_score", "retained_params")
METRICS = ("val_score", "retained_params", "test_score", "nonzero_rank", "train_time_s")
COLUMNS = ("run_id", "run_name", "method", "r_max", "stage", *METRICS)
BASELINE_MARKERS = {"lora": "s", "adalora": "^"}  # other methods: "D"
# A SoRA point pruned to rank 0 is a head-only model: it exported no adapter, so `register`
# could not serve it. It is a candidate nowhere: not here, not on Optuna's front
# (`tune.outcome.candidate_points`).
NO_ADAPTER = "pruned every rank: no adapter to register"


@dataclass(frozen=True)
class LeftOut:
    """A run that is not a candidate, and why (`failed: <failure_reason>`, `unfinished
    (RUNNING)`, `stopped early at epoch 1`, `missing metric val_score`, ...), with the run's name
    and its Ray trial id, if any."""

    run_id: str
    reason: str
    run_name: str = ""
    trial_id: str | None = None


@dataclass
class TrialRuns:
    """The finished trials of one search or experiment.

    Attributes:
        table: One row per candidate: every finished run with a method and finite val_score and
            retained_params, and for a front-tracing run one row per stage (`stage` 0, 1, …; NA
            for a run's own final point): `COLUMNS`, the `METRICS` NaN when not logged, sorted
            by retained_params, then run id and stage.
        left_out: The other trial runs, each with its reason.
        experiment_name: The MLflow experiment.
        parent_run_id: The search's parent run: the one asked for, or the only search run of the
            experiment; `None` when the experiment holds several searches or none.
        tracking_uri: Where the runs were read from (and where tags are written back).
        note: Which search of the experiment was read when none was named (the newest), and how
            many it holds when more than one.
        stopped: The trials a scheduler stopped early, with the epoch they stopped at. They are
            left out, but for the completed stages of a front-tracing trial, which are candidates.
        timeline: Every trial run, candidate or not, in the order it ended: `run_id`, `end_time`
            (seconds since the epoch), `train_time_s` (its compute, NaN if none was logged),
            for the hypervolume against compute (`hypervolume_history`), and its `status`.
    """

    table: pd.DataFrame
    left_out: list[LeftOut]
    experiment_name: str
    parent_run_id: str | None
    tracking_uri: str
    timeline: pd.DataFrame
    note: str | None = None
    stopped: dict[str, float] = field(default_factory=dict)


@dataclass
class ParetoResult:
    """What `pareto_report` found and wrote.

    Attributes:
        table: Every finished run (SoRA and baselines) with the columns of `TrialRuns.table` plus
            `on_front` and `selected`, sorted by retained_params. Also written as `pareto.csv`.
        selected_run_id: The chosen SoRA run.
        selected_stage: The chosen stage of a front-tracing run; `None` for a run's final point.
        rule: The rule that chose it, in words.
        hypervolume: Of the SoRA runs in `objectives`, bounded by `reference`.
        reference: The reference point, one value per objective.
        objectives: The objectives of the front.
        left_out: Runs that are not in `table`, with reasons.
        csv_path: `pareto.csv`.
        png_path: `pareto.png`.
        history: `hypervolume_history` of the runs, with the same reference.
        history_path: `pareto_history.png`, the hypervolume against the compute spent.
        note: `TrialRuns.note`: which search was read when none was named.
        ladder: SoRA's candidates against the LoRA runs (`front.compare_to_ladder`); `None`
            when the runs hold no LoRA run.
    """

    table: pd.DataFrame
    selected_run_id: str
    selected_stage: int | None
    rule: str
    hypervolume: float
    reference: tuple[float, ...]
    objectives: tuple[str, ...]
    left_out: list[LeftOut]
    csv_path: Path
    png_path: Path
    history: pd.DataFrame
    history_path: Path
    note: str | None = None
    ladder: LadderComparison | None = None

    @property
    def front(self) -> pd.DataFrame:
        """The runs on the front, by retained_params."""
        return self.table[self.table["on_front"]]

    @property
    def selected(self) -> pd.Series:
        """The chosen run's row."""
        return self.table[self.table["selected"]].iloc[0]


def load_trial_runs(
    *,
    experiment_name: str | None = None,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> TrialRuns:
    """Read the trial runs of a search (`parent_run_id`) or of an experiment.

    A search's parent run (tag `sora_tune.role` = `search`) is never a trial. A trial is a
    candidate when it FINISHED, has a `method` param and finite `val_score` and
    `retained_params`; every other trial is left out with its reason.

    Args:
        experiment_name: The trials of this experiment's newest search (`TrialRuns.note` says
            which, and how many searches there are); of all its runs when it holds no search
            (trials of `sora-tune train --mlflow-uri`).
        parent_run_id: The runs nested under this search run.
        tracking_uri: The MLflow tracking URI; `None`: MLflow's current one. The global MLflow
            setting is not changed.

    Raises:
        ValueError: not exactly one of `experiment_name` and `parent_run_id`, or an experiment
            or parent run that does not exist.
        FileNotFoundError: a local store (sqlite file, folder) that does not exist.
    """
    if (experiment_name is None) == (parent_run_id is None):
        raise ValueError("give exactly one of experiment_name and parent_run_id")
    client = MlflowClient(existing_store(tracking_uri or mlflow.get_tracking_uri()))
    if parent_run_id is not None:
        experiment, runs = _search_trials(client, parent_run_id)
        note = None
    else:
        experiment, runs, parent_run_id, note = _newest_search_trials(client, experiment_name)
    trials = [run for run in runs if run.data.tags.get(ROLE_TAG) != "search"]

    rows, left_out, stopped = [], [], {}
    for run in trials:
        if STOPPED_TAG in run.data.tags:
            stopped[run.info.run_id] = float(run.data.tags[STOPPED_TAG])
        reason = _left_out_reason(run)
        if reason is None:
            points = _stage_rows(client, run) if _traces_front(run) else [_row(run)]
        elif run.info.run_id in stopped and _traces_front(run) and run.info.status == "FINISHED":
            # A front-tracing trial stopped early: the stages it completed are complete points,
            # the same as those stages of a trial that went on.
            points = _stage_rows(client, run)
            left_out.append(_left_out(run, f"{reason}; its completed stages are candidates"))
        else:
            left_out.append(_left_out(run, reason))
            continue
        for point in points:
            if point["method"] == FRONT_METHOD and point["nonzero_rank"] == 0:
                where = "" if point["stage"] is None else f"stage {point['stage']}: "
                left_out.append(_left_out(run, where + NO_ADAPTER))
            else:
                rows.append(point)
    return TrialRuns(
        table=_candidate_table(rows),
        left_out=left_out,
        experiment_name=experiment.name,
        parent_run_id=parent_run_id,
        tracking_uri=client.tracking_uri,
        timeline=_timeline(trials),
        note=note,
        stopped=stopped,
    )


def _search_trials(client: MlflowClient, parent_run_id: str) -> tuple[Experiment, list[Run]]:
    """The experiment of the search run `parent_run_id` and the runs nested under it."""
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as err:
        raise ValueError(f"no MLflow run with id {parent_run_id!r}") from err
    experiment = client.get_experiment(parent.info.experiment_id)
    runs = _search_runs(
        client, experiment.experiment_id, f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    return experiment, runs


def gpu_memory_line(tracking_uri: str, parent_run_id: str) -> str | None:
    """The worst ratio of a trial's measured peak GPU memory to its estimate among the trials
    of the search `parent_run_id` (their `gpu_memory_peak` and `gpu_memory_estimated_tensors`,
    `tune.resources.GpuMemoryPlan`); `None` when no trial measured one (no GPU)."""
    _, runs = _search_trials(MlflowClient(tracking_uri), parent_run_id)
    ratios = [
        (metrics["gpu_memory_peak"] / metrics["gpu_memory_estimated_tensors"], run)
        for run in runs
        if "gpu_memory_peak" in (metrics := run.data.metrics)
        and metrics.get("gpu_memory_estimated_tensors")
    ]
    if not ratios:
        return None
    ratio, run = max(ratios, key=lambda pair: pair[0])
    return (
        f"GPU memory: measured peak / estimate (tensors) at most {ratio:.2f}, in "
        f"{run.info.run_name} (of {len(ratios)} trials measured)"
    )


def _newest_search_trials(
    client: MlflowClient, experiment_name: str
) -> tuple[Experiment, list[Run], str | None, str | None]:
    """The experiment `experiment_name`, the trials of its newest search (never a mix of
    searches; every run when it holds no search), that search's run id and a note saying which
    search was read."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(
            f"no MLflow experiment named {experiment_name!r} in {client.tracking_uri}; "
            f"it has {', '.join(map(repr, names)) or 'no experiment'}"
        )
    runs = _search_runs(client, experiment.experiment_id)
    searches = sorted(
        (r for r in runs if r.data.tags.get(ROLE_TAG) == "search"),
        key=lambda r: r.info.start_time or 0,
    )
    if not searches:
        return experiment, runs, None, None
    newest = searches[-1]
    parent_run_id = newest.info.run_id
    note = (
        f"using the newest search of {experiment_name!r}: {newest.info.run_name} ({parent_run_id})"
    )
    if len(searches) > 1:
        note += (
            f"; the experiment holds {len(searches)} searches, pass --parent-run-id "
            "(parent_run_id) to choose another"
        )
    runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_run_id]
    return experiment, runs, parent_run_id, note


def _candidate_table(rows: list[dict]) -> pd.DataFrame:
    """`TrialRuns.table` of the candidate rows."""
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table["r_max"] = pd.to_numeric(table["r_max"], errors="coerce").astype("Int64")
    table["stage"] = pd.to_numeric(table["stage"], errors="coerce").astype("Int64")
    return table.sort_values(["retained_params", "run_id", "stage"], ignore_index=True)


def _timeline(trials: list[Run]) -> pd.DataFrame:
    """`TrialRuns.timeline` of every trial run, candidate or not."""
    timeline = pd.DataFrame(
        [
            {
                "run_id": run.info.run_id,
                "end_time": (run.info.end_time or run.info.start_time or 0) / 1000,
                "train_time_s": run.data.metrics.get("train_time_s", math.nan),
                "status": run.info.status,
            }
            for run in trials
        ],
        columns=["run_id", "end_time", "train_time_s", "status"],
    )
    return timeline.sort_values("end_time", ignore_index=True)


def _search_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list[Run]:
    # `mlflow.search_runs` pages for us but always reads the global tracking URI.
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _left_out_reason(run: Run) -> str | None:
    status, tags = run.info.status, run.data.tags
    if status in ("FAILED", "KILLED"):
        return f"{status.lower()}: {tags.get(FAILURE_TAG, f'no {FAILURE_TAG} tag')}"
    if status != "FINISHED":
        return f"unfinished ({status})"
    if STOPPED_TAG in tags:  # its scores are of a smaller budget than the others'
        return f"stopped early at epoch {tags[STOPPED_TAG]}"
    if "method" not in run.data.params:
        return "no method param (not a sora-tune trial)"
    for name in REQUIRED_METRICS:
        value = run.data.metrics.get(name)
        if value is None:
            return f"missing metric {name}"
        if math.isnan(value):
            return f"metric {name} is NaN"
    return None


def _row(run: Run) -> dict:
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "method": run.data.params["method"],
        "r_max": run.data.params.get("r_max"),
        "stage": None,
        # `data.metrics` holds each metric's value at its highest step: the last epoch, which is
        # also what the trial logs as final.
        **{name: run.data.metrics.get(name, math.nan) for name in METRICS},
    }


def _left_out(run: Run, reason: str) -> LeftOut:
    return LeftOut(
        run.info.run_id,
        reason,
        run_name=run.info.run_name or "",
        trial_id=run.data.tags.get("ray_trial_id"),
    )


def _traces_front(run: Run) -> bool:
    """A front-tracing trial (`TrialConfig.traces_front`): it logged a point per stage."""
    return f"{STAGE_PREFIX}val_score" in run.data.metrics


def _stage_rows(client: MlflowClient, run: Run) -> list[dict]:
    """One row per stage of a front-tracing run, from its `stage_<key>` metric histories."""
    by_stage: dict[int, dict[str, float]] = {}
    for name in METRICS:
        for metric in client.get_metric_history(run.info.run_id, f"{STAGE_PREFIX}{name}"):
            by_stage.setdefault(metric.step, {})[name] = metric.value
    base = _row(run)
    return [
        base | {"stage": stage} | {name: values.get(name, math.nan) for name in METRICS}
        for stage, values in sorted(by_stage.items())
    ]


def pareto_report(
    runs: TrialRuns,
    *,
    objectives: Sequence[str] = ("val_score", "retained_params"),
    max_params: float | None = None,
    min_score: float | None = None,
    knee: bool = False,
    reference: Sequence[float] | None = None,
    output_dir: str | os.PathLike,
    log_to_parent: bool = True,
) -> ParetoResult:
    """Find the Pareto front of the SoRA runs, choose one run, and write the front back.

    The chosen run is on the (val_score, retained_params) front and is picked by `select`'s
    rules, which never look at test_score. With `train_time_s` as a third objective, the front
    (and `on_front`, the tags and the hypervolume) also counts faster runs.

    Writes `pareto.csv` and `pareto.png` to `output_dir`, tags every run of the table
    `pareto=true|false` and, when `log_to_parent` and there is a parent run, logs both files to it
    and tags it with `pareto_selected_run_id`. Nothing is written when no run meets the rule.

    Args:
        runs: From `load_trial_runs`.
        objectives: `("val_score", "retained_params")`, optionally followed by `"train_time_s"`.
        max_params: Choose the best val_score with at most this many retained params.
        min_score: Choose the fewest retained params reaching this val_score.
        knee: Choose the knee of the front.
        reference: The hypervolume reference point, one value per objective; `None`:
            `default_reference` of the SoRA runs.
        output_dir: Where `pareto.csv` and `pareto.png` go (created if needed).
        log_to_parent: Log both files to the search's parent run.

    Raises:
        ValueError: bad `objectives` or `reference`, no SoRA candidate, more than one rule, or no
            run meeting the rule (see `select`).
    """
    objectives = tuple(objectives)
    if objectives[:2] != REQUIRED_METRICS or not set(objectives) <= set(OBJECTIVES):
        raise ValueError(
            "objectives must be ('val_score', 'retained_params'), optionally followed by "
            f"'train_time_s', got {objectives}"
        )
    table, left_out = _candidates(runs, objectives)
    values, selection = _front_and_choice(table, objectives, max_params, min_score, knee)
    directions = [OBJECTIVES[name] for name in objectives]
    reference = tuple(reference) if reference is not None else default_reference(values, directions)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    chosen = table[table["selected"]].iloc[0]
    result = ParetoResult(
        table=table,
        selected_run_id=chosen["run_id"],
        selected_stage=None if pd.isna(chosen["stage"]) else int(chosen["stage"]),
        rule=selection.rule,
        hypervolume=hypervolume(values, directions, reference),
        reference=reference,
        objectives=objectives,
        left_out=left_out,
        csv_path=output_dir / "pareto.csv",
        png_path=output_dir / "pareto.png",
        history=hypervolume_history(runs, reference, objectives),
        history_path=output_dir / "pareto_history.png",
        note=runs.note,
        ladder=_ladder_comparison(table),
    )
    table.to_csv(result.csv_path, index=False)
    _plot(result, result.png_path, title=runs.experiment_name)
    _plot_history(result, result.history_path, title=runs.experiment_name)
    _record(result, runs, log_to_parent=log_to_parent)
    return result


def _candidates(runs: TrialRuns, objectives: tuple[str, ...]) -> tuple[pd.DataFrame, list]:
    """The rows with every objective, and the left-out runs, now with those missing one.

    Raises:
        ValueError: no SoRA candidate.
    """
    table = runs.table.copy()
    incomplete = table[list(objectives)].isna().any(axis=1)
    left_out = runs.left_out + [
        LeftOut(run_id, f"missing metric {', '.join(objectives[2:])}")
        for run_id in table.loc[incomplete, "run_id"]
    ]
    table = table[~incomplete].reset_index(drop=True)
    if not (table["method"] == FRONT_METHOD).any():
        raise ValueError(
            f"no finished {FRONT_METHOD} run to build a front from in "
            f"{runs.experiment_name!r} ({len(table)} baseline runs, {len(left_out)} left out)"
        )
    return table, left_out


def _front_and_choice(
    table: pd.DataFrame,
    objectives: tuple[str, ...],
    max_params: float | None,
    min_score: float | None,
    knee: bool,
):
    """Mark the SoRA rows on the front (`on_front`) and the chosen one (`selected`); returns the
    SoRA rows' objective values and the `Selection`."""
    is_sora = table["method"] == FRONT_METHOD
    values = table.loc[is_sora, list(objectives)].to_numpy(dtype=float)
    table["on_front"] = False
    table.loc[is_sora, "on_front"] = is_pareto_front(
        values, [OBJECTIVES[name] for name in objectives]
    )
    front = table[table["on_front"]]
    # Only val_score and retained_params reach `select`: test_score is read after the choice.
    selection = select(
        front["val_score"].to_numpy(),
        front["retained_params"].to_numpy(),
        max_params=max_params,
        min_score=min_score,
        knee=knee,
    )
    table["selected"] = table.index == front.index[selection.index]
    return values, selection


def _record(result: ParetoResult, runs: TrialRuns, *, log_to_parent: bool) -> None:
    """Tag every run `pareto=true|false` and log the files to the search's parent run."""
    client = MlflowClient(runs.tracking_uri)
    for run_id, on_front in result.table.groupby("run_id")["on_front"].any().items():
        client.set_tag(run_id, "pareto", "true" if on_front else "false")
    if log_to_parent and runs.parent_run_id is not None:
        for path in (result.csv_path, result.png_path, result.history_path):
            client.log_artifact(runs.parent_run_id, str(path))
        client.set_tag(runs.parent_run_id, "pareto_selected_run_id", result.selected_run_id)
        client.log_batch(runs.parent_run_id, metrics=search_metrics(result, runs))


def search_metrics(result: ParetoResult, runs: TrialRuns) -> list[Metric]:
    """The search's numbers, for its parent run, so that MLflow's experiment table can sort and
    compare searches: `hypervolume` after each trial ended (one step a trial, stamped with its
    end time, so MLflow draws the history and logging it again adds nothing), and at the last
    step `front_size`, `trials_finished`, `trials_stopped`, `trials_failed`, `compute_s` (the
    trials' summed training time), `best_val_score` and the chosen point's `chosen_val_score`
    and `chosen_retained_params`."""
    ended = dict(zip(runs.timeline["run_id"], runs.timeline["end_time"], strict=True))
    metrics = [
        Metric("hypervolume", float(row.hypervolume), int(ended[row.run_id] * 1000), step)
        for step, row in enumerate(result.history.itertuples(), 1)
    ]
    last = (int(runs.timeline["end_time"].max() * 1000), len(runs.timeline))
    status = runs.timeline["status"]
    stopped = runs.timeline["run_id"].isin(list(runs.stopped))
    sora = result.table[result.table["method"] == FRONT_METHOD]
    chosen = result.table[result.table["selected"]].iloc[0]
    values = {
        "front_size": int(result.table["on_front"].sum()),
        "trials_finished": int(((status == "FINISHED") & ~stopped).sum()),
        "trials_stopped": int(stopped.sum()),
        "trials_failed": int((status == "FAILED").sum()),
        "compute_s": float(runs.timeline["train_time_s"].fillna(0.0).sum()),
        "best_val_score": float(sora["val_score"].max()),
        "chosen_val_score": float(chosen["val_score"]),
        "chosen_retained_params": float(chosen["retained_params"]),
    }
    return metrics + [Metric(name, value, *last) for name, value in values.items()]


def hypervolume_history(
    runs: TrialRuns,
    reference: Sequence[float],
    objectives: Sequence[str] = REQUIRED_METRICS,
) -> pd.DataFrame:
    """The hypervolume of the SoRA candidates known after each trial run ended, against the
    compute spent by then: the summed `train_time_s` of every trial run that had ended, whether
    it became a candidate or not (a stopped or failed trial's compute counts too).

    Returns:
        One row per trial run, in the order they ended: `run_id`, `compute_s`, `hypervolume`.
    """
    sora = runs.table[runs.table["method"] == FRONT_METHOD]
    curve = hypervolume_over_time(
        sora["run_id"].tolist(),
        sora[list(objectives)].to_numpy(dtype=float),
        list(zip(runs.timeline["run_id"], runs.timeline["train_time_s"].fillna(0.0), strict=True)),
        [OBJECTIVES[name] for name in objectives],
        reference,
    )
    return pd.DataFrame(
        {"run_id": runs.timeline["run_id"], "compute_s": curve[:, 0], "hypervolume": curve[:, 1]}
    )


def _plot_history(result: ParetoResult, path: Path, title: str) -> None:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    history = result.history
    ax.step(history["compute_s"] / 60, history["hypervolume"], where="post", color="C0")
    ax.scatter(history["compute_s"] / 60, history["hypervolume"], color="C0", s=12)
    ax.set_xlabel("compute spent: summed trial training time (min)")
    ax.set_ylabel(f"hypervolume ({', '.join(result.objectives)})")
    ax.set_title(f"{title}: the front as the search went on")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def _plot(result: ParetoResult, path: Path, title: str) -> None:
    """val_score against retained_params: SoRA runs grey, the front as a staircase with each
    point labelled `r=<r_max>, <total rank>`, baselines with their own markers, the choice circled."""
    # A bare Figure draws with Agg and leaves pyplot's global state alone.
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    table = result.table
    sora = table[table["method"] == FRONT_METHOD]
    ax.scatter(
        sora["retained_params"], sora["val_score"], color="0.65", s=18, label=f"sora ({len(sora)})"
    )
    # Between two front points, the best score reachable is the left one's: a post step. The
    # running maximum keeps the line on the 2-D front when train_time_s adds members below it.
    front = result.front
    ax.plot(
        front["retained_params"],
        front["val_score"].cummax(),
        drawstyle="steps-post",
        color="C0",
    )
    ax.scatter(
        front["retained_params"],
        front["val_score"],
        color="C0",
        s=30,
        zorder=3,
        label=f"Pareto front ({len(front)}, {', '.join(result.objectives)})",
    )
    for row in front.itertuples():
        label = f"r={row.r_max}" + ("" if pd.isna(row.stage) else f" s{row.stage}")
        if not math.isnan(row.nonzero_rank):
            label += f", {row.nonzero_rank:.0f}"
        ax.annotate(
            label,
            (row.retained_params, row.val_score),
            xytext=(5, -11),
            textcoords="offset points",
            fontsize=7,
        )
    baselines = table[table["method"] != FRONT_METHOD]
    for color, (method, runs) in enumerate(baselines.groupby("method"), start=1):
        ax.scatter(
            runs["retained_params"],
            runs["val_score"],
            marker=BASELINE_MARKERS.get(method, "D"),
            color=f"C{color}",
            s=36,
            label=f"{method} baseline ({len(runs)})",
        )
        if method == LADDER_METHOD:  # the ladder's line: its mean score at every rank
            line = runs.groupby("retained_params")["val_score"].mean()
            ax.plot(line.index, line.to_numpy(), color=f"C{color}", linewidth=1.2)
    chosen = result.selected
    ax.scatter(
        [chosen["retained_params"]],
        [chosen["val_score"]],
        s=260,
        facecolors="none",
        edgecolors="C3",
        linewidths=1.8,
        label=f"selected: {result.rule}",
    )
    # Runs pruned to zero params have no place on a log axis.
    ax.set_xscale("log" if (table["retained_params"] > 0).all() else "symlog")
    ax.set_xlabel("retained adapter parameters (labels: r=r_max [s=stage], total rank kept)")
    ax.set_ylabel("val_score")
    ax.set_title(f"{title}: hypervolume {result.hypervolume:.4g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=120)


def format_table(result: ParetoResult) -> str:
    """A terminal table of every run (`*` marks the chosen one), then the hypervolume, the choice
    and the left-out runs with their reasons."""
    header = (
        f"  {'run':8}  {'method':7}  {'r_max':>5}  {'stage':>5}  {'val_score':>9}  "
        f"{'retained_params':>15}  {'test_score':>10}  front"
    )
    lines = [header]
    for row in result.table.itertuples():
        lines.append(
            f"{'*' if row.selected else ' '} {row.run_id[:8]:8}  {row.method:7}  "
            f"{_cell(row.r_max, 'd'):>5}  {_cell(row.stage, 'd'):>5}  {_cell(row.val_score, '.4f'):>9}  "
            f"{_cell(row.retained_params, '.0f'):>15}  {_cell(row.test_score, '.4f'):>10}  "
            f"{'yes' if row.on_front else ''}"
        )
    chosen = result.selected
    reference = ", ".join(
        f"{name}={value:.4g}"
        for name, value in zip(result.objectives, result.reference, strict=True)
    )
    lines += [
        "",
        f"hypervolume {result.hypervolume:.6g} (reference {reference})",
        f"selected {chosen['run_id']}{_stage_name(result.selected_stage)} by {result.rule}: "
        f"val_score {chosen['val_score']:.4f}, "
        f"retained_params {chosen['retained_params']:.0f}, "
        f"test_score {test_score_text(chosen['test_score'])}",
    ]
    lines += ladder_lines(result)
    if result.left_out:
        lines += ["", f"left out ({len(result.left_out)}):"]
        lines += [f"  {run.run_id[:8]}  {run.reason}" for run in result.left_out]
    return "\n".join(lines)


def _ladder_comparison(table: pd.DataFrame) -> LadderComparison | None:
    ladder = table[table["method"] == LADDER_METHOD]
    if ladder.empty:
        return None
    sora = table[table["method"] == FRONT_METHOD]
    columns = list(SEARCH_OBJECTIVES)
    return compare_to_ladder(sora[columns].to_numpy(float), ladder[columns].to_numpy(float))


def ladder_lines(result: ParetoResult, *, name_by: str = "run_id") -> list[str]:
    """How SoRA's points compare with the LoRA ladder, for a terminal; none without a ladder.
    SoRA points are named as the table above them names runs: by `run_id` (its first 8
    characters, as `format_table`) or by `run_name` (the Ray trial, as the end of a search)."""
    ladder = result.ladder
    if ladder is None:
        return []
    table = result.table
    sora = table[table["method"] == FRONT_METHOD].reset_index(drop=True)
    rungs = table[table["method"] == LADDER_METHOD].reset_index(drop=True)
    reference = ", ".join(
        f"{name} {value:.4g}"
        for name, value in zip(SEARCH_OBJECTIVES, ladder.reference, strict=True)
    )
    lines = [
        "",
        f"against the LoRA ladder ({len(rungs)} runs, ranks "
        f"{', '.join(str(r) for r in sorted(set(rungs['r_max'].astype(int))))}):",
        # Not the hypervolume above, of SoRA's points alone: the ladder's largest rank may have
        # more params than any SoRA point, so both are measured from one reference of all.
        f"  hypervolume SoRA / ladder {ladder.hypervolume_ratio:.3f}, both from one reference of "
        f"SoRA's and the ladder's points ({reference}), not the one above of SoRA's alone",
        f"  SoRA points above the ladder's line {ladder.above}, on it {ladder.on}, below it "
        f"{ladder.below}",
    ]
    for i in sorted({i for i, _ in ladder.dominated}):
        rung = rungs.iloc[i]
        beaten = [sora.iloc[j] for k, j in ladder.dominated if k == i]
        names = ", ".join(
            f"{p[name_by][:8] if name_by == 'run_id' else p[name_by]}"
            f"{'' if pd.isna(p['stage']) else f' s{int(p.stage)}'}"
            for p in beaten[:6]
        )
        lines.append(
            f"  LoRA r={int(rung['r_max'])} ({rung['val_score']:.4f}, "
            f"{rung['retained_params']:,.0f}) dominates {len(beaten)} SoRA point(s): {names}"
            + (", …" if len(beaten) > 6 else "")
        )
    return lines


def _stage_name(stage: int | None) -> str:
    return "" if stage is None else f" stage {stage}"


def _cell(value: float, spec: str) -> str:
    return "-" if pd.isna(value) else format(value, spec)
