"""`sora-tune`: a thin shell over the Python API, one parser/command pair per verb.

The flags of a trial's settings (`train`, `sparsify`, `search`, `estimate`) are generated from
`TrialConfig`, and the search's own from `SearchConfig` (`sora_tune.flags`): a setting's name,
type, default, choices and help are written once, in its dataclass. Known failures end with one
line on stderr and exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .config import TrialConfig
from .flags import add_dataclass_flags, flag, given
from .front import NO_TEST_SCORE, test_score_text
from .quiet import quiet_this_process
from .tune.config import SEARCH_GROUPS, SearchConfig
from .uris import check_tracking_uri, default_tracking_uri, resolve_tracking_uri

TRIAL_FIELDS = tuple(f.name for f in dataclasses.fields(TrialConfig))


def add_trial_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "trial", "settings of every trial: the same names in search spaces and MLflow params"
    )
    add_dataclass_flags(group, TrialConfig)


def trial_values(args: argparse.Namespace) -> dict[str, Any]:
    """The trial flags the user gave (the rest keep TrialConfig's defaults)."""
    return given(args, TRIAL_FIELDS)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"sora-tune {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error, not one line"
    )


def add_tracking_flag(parser: argparse._ActionsContainer, help: str) -> None:
    parser.add_argument(
        "--mlflow-uri",
        default=default_tracking_uri(),
        type=resolve_tracking_uri,
        help=f"{help}; a relative sqlite file or folder is taken from the current folder "
        "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )


# ---- train ----


def train_command_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="fine-tune one SoRA (or baseline) trial")
    add_common_flags(parser)
    parser.add_argument(
        "--output-dir", required=True, help="folder for checkpoints, adapter/ and metrics.json"
    )
    tracking = parser.add_argument_group("tracking")
    tracking.add_argument(
        "--mlflow-uri", type=resolve_tracking_uri, help="log the run to this MLflow tracking URI"
    )
    tracking.add_argument(
        "--experiment-name",
        help="MLflow experiment, with --mlflow-uri (default: sora-<task or file stem>)",
    )
    add_trial_flags(parser)
    parser.set_defaults(command=train_command)


def train_command(args: argparse.Namespace) -> int:
    if args.mlflow_uri:  # a dead server stops here, before torch is imported
        check_tracking_uri(args.mlflow_uri)
    config = TrialConfig.from_dict(trial_values(args))
    from .models import check_targets
    from .train import train_trial

    check_targets(config)  # before the data are read

    if args.mlflow_uri:
        from .tracking import create_trial_run, tracked_trial

        experiment = args.experiment_name or f"sora-{config.data_name}"
        run_id = create_trial_run(args.mlflow_uri, experiment)
        result = tracked_trial(
            config,
            run_id=run_id,
            tracking_uri=args.mlflow_uri,
            output_dir=args.output_dir,
            progress=True,
            report=_print_epoch,
        )
    else:
        result = train_trial(config, output_dir=args.output_dir, progress=True, report=_print_epoch)
    print(_summary(result))
    print(
        f"adapter: {Path(args.output_dir) / 'adapter'}  metrics: {Path(args.output_dir) / 'metrics.json'}"
    )
    return 0 if result["status"] == "finished" else 1


def _summary(result: dict[str, Any]) -> str:
    keys = (
        "status",
        "epoch",
        "train_loss",
        "train_score",
        "val_score",
        "test_score",
        "retained_params",
        "head_params",
        "train_time_s",
        "precision",
        "base_dtype",
    )
    lines = [
        f"{k:>16}: {result[k]:.4g}"
        if isinstance(result.get(k), float)
        else f"{k:>16}: {result.get(k)}"
        for k in keys
    ]
    ranks = result.get("rank_pattern") or {}
    if ranks:
        lines.append(f"{'ranks':>16}: " + " ".join(str(r) for r in ranks.values()))
    return "\n".join(lines)


def _print_epoch(metrics: dict[str, Any], checkpoint: str) -> None:
    print(
        f"epoch {metrics['epoch']}: loss {metrics['train_loss']:.4f} train {metrics['train_score']:.4f} "
        f"val {metrics['val_score']:.4f} test {test_score_text(metrics.get('test_score'))} "
        f"params {metrics['retained_params']} ({metrics['epoch_time_s']:.0f} s)",
        flush=True,
    )


# ---- sparsify ----


def sparsify_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sparsify",
        help="the paper's sparsifying scheduler: raise ξ stage by stage and trace the curve",
        description="Runs the xi schedule for exactly its length (leave --epochs out); "
        "--xi-schedule defaults to geometric here.",
    )
    add_common_flags(parser)
    parser.add_argument(
        "--output-dir", required=True, help="folder for the curve (CSV, PNG) and the rank heatmap"
    )
    add_trial_flags(parser)
    parser.set_defaults(command=sparsify_command)


def sparsify_command(args: argparse.Namespace) -> int:
    values = trial_values(args)
    values.setdefault("xi_schedule", "geometric")
    config = TrialConfig.for_schedule(values)
    from .sparsify import run_sparsify

    rows = run_sparsify(config, args.output_dir, progress=True)
    print(f"{'stage':>5} {'xi':>9} {'params':>9} {'train':>7} {'val':>7} {'test':>7}")
    for row in rows:
        print(
            f"{row['stage']:>5} {row['xi']:>9.2e} {row['retained_params']:>9} {row['train_score']:>7.4f} "
            f"{row['val_score']:>7.4f} {test_score_text(row.get('test_score')):>7}"
        )
    print(f"wrote {Path(args.output_dir) / 'sparsify.csv'}, sparsify.png, ranks.png")
    return 0


# ---- search ----

RESUMABLE = ("address",)  # what --resume applies; every other flag belongs to the search


def search_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "search",
        help="search SoRA settings with Ray Tune + Optuna, every trial in MLflow",
        description="--resume PATH finishes an interrupted search as it was started: it takes "
        "--address (where Ray runs now) and refuses every other flag, whose value the search "
        "already has.",
    )
    add_common_flags(parser)
    search = parser.add_argument_group("search")
    search.add_argument(
        "--config",
        help="search-space YAML: a path, or a shipped space's name (quickstart, sora_glue, trace)",
    )
    search.add_argument(
        "--resume",
        metavar="PATH",
        help="finish the interrupted search in this folder (<storage-path>/<name>); takes "
        "--address only",
    )
    for title, fields in SEARCH_GROUPS.items():
        group = search if title == "search" else parser.add_argument_group(title)
        add_dataclass_flags(group, SearchConfig, fields)
    add_trial_flags(parser)
    parser.set_defaults(command=search_command)


SEARCH_FIELDS = tuple(name for fields in SEARCH_GROUPS.values() for name in fields)


def search_command(args: argparse.Namespace) -> int:
    settings = given(args, SEARCH_FIELDS)
    if args.resume:
        ignored = sorted(
            flag(name) for name in [*settings, *trial_values(args)] if name not in RESUMABLE
        ) + (["--config"] if args.config else [])
        if ignored:
            raise ValueError(
                f"--resume finishes the search as it was started: {', '.join(ignored)} cannot "
                "change it; leave them out (only --address applies)"
            )
        from .tune import resume_search

        search = resume_search(args.resume, address=settings.get("address"))
    else:
        if not args.config:
            raise ValueError("search needs --config FILE (or --resume PATH)")
        from .tune.space import load_search_space

        space = load_search_space(args.config).with_fixed(trial_values(args))
        config = SearchConfig(space=space, **settings)
        # A dead server or a password in a URI stops here, within seconds: before torch is
        # imported and Ray started (run_search checks again, for callers of the Python API).
        check_tracking_uri(config.mlflow_uri)
        from .tune import run_search

        search = run_search(config)
    print(search_summary(search))
    if search.interrupted:
        print(
            f"search interrupted ({search.interrupted}); finish it with: "
            f"sora-tune search --resume {search.config.path}"
        )
        return 130
    return 0


def search_summary(search) -> str:
    """What a search found, at its end: where it is recorded, the front with the point the
    default rule chooses, the trials that stopped or failed and why, and the next commands."""
    import pandas as pd

    from .pareto.runs import gpu_memory_line, ladder_lines
    from .registry import choose_trial

    config = search.config
    local = "://" not in config.storage_path
    lines = [
        f"search {config.name}: MLflow experiment {config.experiment_name!r}, parent run "
        f"{search.parent_run_id}",
    ]
    memory = gpu_memory_line(config.mlflow_uri, search.parent_run_id)
    lines += [memory] if memory else []
    # The next commands name the store only when it is not the one they find by default.
    store = ""
    if config.mlflow_uri != resolve_tracking_uri(default_tracking_uri()):
        store = f" --mlflow-uri {config.mlflow_uri}"
    flags = f"--experiment {config.experiment_name} --parent-run-id {search.parent_run_id}{store}"
    try:
        report = choose_trial(
            experiment_name=config.experiment_name,
            parent_run_id=search.parent_run_id,
            tracking_uri=config.mlflow_uri,
            output_dir=config.path if local else f"pareto-{config.name}",
        )
    except ValueError as err:  # no finished SoRA trial: no front to show
        return "\n".join([*lines, f"no front: {err}"])
    front = report.front.sort_values("retained_params")
    lines += ["", "front (val_score up, retained_params down; * the default rule's choice):"]
    lines.append(f"  {'trial':<22}{'stage':>6}{'val_score':>11}{'retained':>11}{'rank':>6}")
    for row in front.itertuples():
        stage = "-" if pd.isna(row.stage) else str(row.stage)
        lines.append(
            f"{'*' if row.selected else ' '} {row.run_name:<22}{stage:>6}{row.val_score:>11.4f}"
            f"{row.retained_params:>11,.0f}{row.nonzero_rank:>6.0f}"
        )
    reference = ", ".join(
        f"{name} {value:.4g}"
        for name, value in zip(report.objectives, report.reference, strict=True)
    )
    if report.front["test_score"].isna().all():
        lines.append(f"test_score: {NO_TEST_SCORE}: give --test-file to score the trials on one")
    lines += ["", f"hypervolume {report.hypervolume:.6g} (reference {reference})"]
    lines += ladder_lines(report, name_by="run_name")  # the front table's names
    if report.left_out:
        lines += ["", "stopped, failed or left out:"]
        for left in report.left_out:
            log = ""
            error_file = Path(config.path) / f"trial_{left.trial_id}" / "error.txt"
            if local and left.trial_id and error_file.exists():
                log = f"  (log: {error_file})"
            lines.append(f"  {left.run_name or left.run_id:<22}{left.reason}{log}")
    lines += [
        "",
        f"wrote {report.png_path} (and {report.csv_path.name}, {report.history_path.name})",
        "",
        "next:",
        f"  sora-tune pareto {flags} [--max-params N | --min-score S | --knee]",
        f"  sora-tune register {flags} --name {config.experiment_name}",
        f"  sora-tune predict --model models:/{config.experiment_name}@champion --input rows.csv"
        f"{store}",
    ]
    return "\n".join(lines)


# ---- estimate ----


def estimate_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "estimate",
        help="the memory one trial needs, part by part, from the model's configuration alone",
        description="Builds the model on the meta device (no weights read) and adds up its "
        "frozen weights at --base-dtype, the adapter and head with their gradients and AdamW "
        "states, the activations of a step at --batch-size × --max-length, and on a GPU the "
        "CUDA context and the allocator's slack.",
    )
    add_common_flags(parser)
    estimate = parser.add_argument_group("estimate")
    estimate.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="where the trial would run (default: cuda; auto dtypes are bf16 on a GPU that is "
        "not here)",
    )
    estimate.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="also say how many such trials one GPU of this memory holds, e.g. 24GiB or 80GB",
    )
    estimate.add_argument("--json", action="store_true", help="print one JSON object")
    add_trial_flags(parser)
    parser.set_defaults(command=estimate_command)


def estimate_command(args: argparse.Namespace) -> int:
    from .memory import estimate_memory, format_bytes, memory_size  # torch only when estimating

    gpu_bytes = memory_size(args.gpu_memory) if args.gpu_memory is not None else None
    config = TrialConfig.from_dict(trial_values(args))
    estimate = estimate_memory(config, device=args.device)
    if args.json:
        print(json.dumps(estimate.to_dict(gpu_bytes)))
        return 0
    print(
        f"one trial of {config.model or 'the packaged MiniLM'} on {estimate.device}: base "
        f"{estimate.base_dtype}, precision {estimate.precision}"
    )
    for part in estimate.parts:
        print(f"  {part.name:<16}{format_bytes(part.bytes):>12}  {part.detail}")
    print(f"  {'total':<16}{format_bytes(estimate.total_bytes):>12}")
    if gpu_bytes is not None:
        print(f"trials per GPU of {format_bytes(gpu_bytes)}: {estimate.trials_per_gpu(gpu_bytes)}")
    return 0


# ---- pareto, register, predict ----


def add_selection_flags(parser: argparse.ArgumentParser) -> None:
    selection = parser.add_argument_group("selection")
    selection.add_argument("--experiment", required=True, help="MLflow experiment of the search")
    selection.add_argument(
        "--parent-run-id",
        help="the trials of this search run (default: the experiment's newest search, or every "
        "run of an experiment that holds no search)",
    )
    selection.add_argument(
        "--objectives",
        default="val_score,retained_params",
        help="objectives of the front and hypervolume: val_score,retained_params[,train_time_s]",
    )
    rule = selection.add_mutually_exclusive_group()
    rule.add_argument(
        "--max-params", type=float, help="choose the best val_score with at most N retained params"
    )
    rule.add_argument(
        "--min-score", type=float, help="choose the fewest retained params reaching this val_score"
    )
    rule.add_argument("--knee", action="store_true", help="choose the knee of the front")
    selection.add_argument(
        "--output-dir", default=".", help="folder for pareto.csv and pareto.png (default: .)"
    )
    add_tracking_flag(selection, "MLflow tracking URI of the search")


def selection_values(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `choose_trial` and `register` from the selection flags."""
    return {
        "experiment_name": args.experiment,
        "parent_run_id": args.parent_run_id,
        "tracking_uri": args.mlflow_uri,
        "objectives": tuple(args.objectives.split(",")),
        "max_params": args.max_params,
        "min_score": args.min_score,
        "knee": args.knee,
        "output_dir": args.output_dir,
    }


def pareto_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "pareto", help="the val_score-vs-retained_params front of a search, and one chosen run"
    )
    add_common_flags(parser)
    add_selection_flags(parser)
    parser.set_defaults(command=pareto_command)


def _print_note(note: str | None) -> None:
    """Which search was read, on stderr: a warning when the experiment holds several."""
    if note:
        kind = "warning" if "searches" in note else "note"
        print(f"sora-tune: {kind}: {note}", file=sys.stderr)


def pareto_command(args: argparse.Namespace) -> int:
    from .pareto import format_table
    from .registry import choose_trial

    result = choose_trial(**selection_values(args))
    _print_note(result.note)
    print(format_table(result))
    print(f"wrote {result.csv_path}, {result.png_path} and {result.history_path}")
    return 0


def register_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "register",
        help="register the chosen run's adapter as an MLflow model; alias champion moves to it",
    )
    add_common_flags(parser)
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept an adapter stored only as a pickled adapter_model.bin (trusted sources only: "
        "loading a pickle can run code)",
    )
    add_selection_flags(parser)
    parser.set_defaults(command=register_command)


def register_command(args: argparse.Namespace) -> int:
    from .registry import CHAMPION, register

    registered = register(name=args.name, allow_pickle=args.allow_pickle, **selection_values(args))
    _print_note(registered.note)
    print(
        f"registered {registered.name} version {registered.version} from run {registered.run_id}: "
        f"val_score {registered.val_score:.4f}, retained_params {registered.retained_params}, "
        f"test_score {test_score_text(registered.test_score)}"
    )
    print(f"models:/{registered.name}@{CHAMPION}")
    return 0


def predict_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="predict every row of a file with a registered model (CSV on stdout)"
    )
    add_common_flags(parser)
    parser.add_argument(
        "--model", required=True, help="model URI, e.g. models:/NAME@champion or models:/NAME/2"
    )
    parser.add_argument(
        "--input",
        required=True,
        help="CSV, TSV, JSONL or Parquet file with the model's text columns; - reads JSON Lines "
        "from stdin",
    )
    parser.add_argument(
        "--precision",
        help="trial (the precision of the model's recorded scores), bf16, fp16 or fp32; "
        "default: the trial's on a GPU that runs it natively, else fp32",
    )
    parser.add_argument(
        "--base-dtype",
        help="how to store the base model: trial, auto, fp32, bf16, fp16, int8 or nf4; "
        "default: trial (as the trial stored it, e.g. 4-bit for an nf4 trial)",
    )
    add_tracking_flag(parser, "MLflow tracking (and registry) URI")
    parser.set_defaults(command=predict_command)


def predict_command(args: argparse.Namespace) -> int:
    from .registry import predict_file

    predictions = predict_file(
        args.model,
        args.input,
        tracking_uri=args.mlflow_uri,
        precision=args.precision,
        base_dtype=args.base_dtype,
    )
    print(predictions.to_csv(index=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sora-tune", description="Find the best SoRA adapters.")
    parser.add_argument("--version", action="version", version=f"sora-tune {__version__}")
    subparsers = parser.add_subparsers(title="commands", required=True)
    train_command_parser(subparsers)
    sparsify_command_parser(subparsers)
    search_command_parser(subparsers)
    estimate_command_parser(subparsers)
    pareto_command_parser(subparsers)
    register_command_parser(subparsers)
    predict_command_parser(subparsers)
    return parser


def known_failures() -> tuple[type[BaseException], ...]:
    """Errors that are the input's or the environment's, not a bug: one line, exit code 2.
    Bad input, a missing file, an unreachable server or Hub (`GlueDataUnavailableError` is a
    `ConnectionError`, so are Ray's start-up failures), MLflow's own errors."""
    failures: list[type[BaseException]] = [ValueError, FileNotFoundError, ConnectionError]
    if "mlflow" in sys.modules:  # MLflow raised only if it was imported
        from mlflow.exceptions import MlflowException

        failures.append(MlflowException)
    return tuple(failures)


# Their output is the product (a table, a registered version, predictions): no library chatter.
READ_COMMANDS = (estimate_command, pareto_command, register_command, predict_command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in READ_COMMANDS and not args.debug:
        quiet_this_process()
    try:
        return args.command(args)
    except known_failures() as err:
        if args.debug:
            raise
        message = getattr(err, "message", None) or str(err)
        print(
            f"sora-tune: error: {message.splitlines()[0] if message else type(err).__name__}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
