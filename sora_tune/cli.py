"""`sora-tune`: a thin shell over the Python API, one parser/command pair per verb."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from .uris import check_tracking_uri, default_tracking_uri, resolve_tracking_uri

# Trial flags: field of TrialConfig -> (type, help). The defaults live in TrialConfig.
TRIAL_FLAGS: dict[str, tuple[Any, str]] = {
    "task": (str, "GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, mnli-mm, qnli, rte, wnli"),
    "data_dir": (
        str,
        "folder in the GLUE layout (<dir>/<TASK>/{train,dev}.tsv); default: $SORA_TUNE_DATA_DIR, else the Hub",
    ),
    "model": (str, "backbone name or path (default: the packaged all-MiniLM-L6-v2)"),
    "method": (str, "sora, or a baseline: lora, adalora"),
    "r_max": (int, "adapter rank before pruning (default 8)"),
    "alpha": (float, "scaling numerator, the update is scaled by alpha/r_max (default 16)"),
    "dropout": (float, "adapter input dropout (default 0)"),
    "target_modules": (
        str,
        "comma-separated module names, or a regular expression over full names (default: every encoder linear)",
    ),
    "gate_init": (str, "gate initialisation: normal (authors' code) or ones"),
    "gate_mode": (
        str,
        "official (AdamW on the gate, threshold xi) or paper (eq. 10, xi = eta*lam)",
    ),
    "xi": (float, "gate threshold ξ, official mode (default 1e-4)"),
    "eta": (float, "gate step size η (default 0.1)"),
    "lam": (float, "ℓ1 strength λ (default 0.1)"),
    "xi_schedule": (str, "constant, linear, geometric or increment"),
    "xi_max": (float, "last stage's ξ of a rising schedule"),
    "xi_stages": (int, "number of ξ stages (linear, geometric)"),
    "xi_delta": (float, "ξ increment per stage (increment)"),
    "xi_every": (int, "epochs per ξ stage (default 1)"),
    "dense_epochs": (int, "epochs at the first ξ before raising it (default: xi-every)"),
    "lr": (float, "AdamW learning rate of adapter and head (default 8e-4)"),
    "weight_decay": (float, "AdamW weight decay (default 0.1)"),
    "warmup_ratio": (float, "share of steps of linear warm-up (default 0.06)"),
    "max_grad_norm": (float, "gradient clipping norm, 0 disables (default 1.0)"),
    "batch_size": (int, "training batch size (default 8)"),
    "eval_batch_size": (int, "evaluation batch size (default 64)"),
    "epochs": (int, "training epochs (default 3)"),
    "max_length": (int, "tokens per sequence (default 128)"),
    "max_train_samples": (int, "seeded subsample of the training split"),
    "max_eval_samples": (int, "seeded cap on the val and test splits"),
    "val_size": (
        float,
        "hold-out of the training file used for selection: fraction, or rows if > 1 (default 0.1)",
    ),
    "train_eval_samples": (int, "training rows scored for memorization (default 512)"),
    "seed": (int, "random seed (default 0)"),
    "cache_dir": (str, "tokenisation cache folder"),
    "adalora_target_r": (int, "AdaLoRA target average rank (default 2/3 of r_max)"),
}


def add_tracking_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mlflow-uri",
        default=default_tracking_uri(),
        type=resolve_tracking_uri,
        help="MLflow tracking URI; a relative sqlite file or folder is taken from the current "
        "folder (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )


def parse_target_modules(value: str) -> str | list[str]:
    """A regular expression if it has regex syntax, else a comma-separated list of names."""
    return value if re.search(r"[*\\\[\](|^$+?]", value) else value.split(",")


def add_trial_arguments(parser: argparse.ArgumentParser) -> None:
    for field, (kind, help_text) in TRIAL_FLAGS.items():
        parser.add_argument(
            "--" + field.replace("_", "-"),
            dest=field,
            type=kind,
            default=argparse.SUPPRESS,
            help=help_text,
        )
    parser.add_argument(
        "--group-by-length",
        dest="group_by_length",
        action="store_true",
        default=argparse.SUPPRESS,
        help="batch sequences of similar length together (less padding)",
    )


def trial_values(args: argparse.Namespace) -> dict[str, Any]:
    """The trial flags the user gave (the rest keep TrialConfig's defaults)."""
    values = {k: v for k, v in vars(args).items() if k in TRIAL_FLAGS or k == "group_by_length"}
    if "target_modules" in values:
        values["target_modules"] = parse_target_modules(values["target_modules"])
    return values


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


def train_command_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="fine-tune one SoRA (or baseline) trial")
    add_trial_arguments(parser)
    parser.add_argument(
        "--output-dir", required=True, help="folder for checkpoints, adapter/ and metrics.json"
    )
    parser.add_argument(
        "--mlflow-uri", type=resolve_tracking_uri, help="log the run to this MLflow tracking URI"
    )
    parser.add_argument(
        "--experiment-name", default="sora-tune", help="MLflow experiment (with --mlflow-uri)"
    )
    parser.set_defaults(command=train_command)


def train_command(args: argparse.Namespace) -> int:
    if args.mlflow_uri:  # a dead server stops here, before torch is imported
        check_tracking_uri(args.mlflow_uri)
    from .config import TrialConfig
    from .train import train_trial

    config = TrialConfig.from_dict(trial_values(args))
    if args.mlflow_uri:
        from .tracking import create_trial_run, tracked_trial

        run_id = create_trial_run(args.mlflow_uri, args.experiment_name)
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


def _print_epoch(metrics: dict[str, Any], checkpoint: str) -> None:
    print(
        f"epoch {metrics['epoch']}: loss {metrics['train_loss']:.4f} train {metrics['train_score']:.4f} "
        f"val {metrics['val_score']:.4f} test {metrics['test_score']:.4f} "
        f"params {metrics['retained_params']} ({metrics['epoch_time_s']:.0f} s)",
        flush=True,
    )


def sparsify_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sparsify",
        help="the paper's sparsifying scheduler: raise ξ stage by stage and trace the curve",
    )
    add_trial_arguments(parser)
    parser.add_argument(
        "--output-dir", required=True, help="folder for the curve (CSV, PNG) and the rank heatmap"
    )
    parser.set_defaults(command=sparsify_command)


def sparsify_command(args: argparse.Namespace) -> int:
    from .config import TrialConfig
    from .sparsify import run_sparsify

    values = trial_values(args)
    values.setdefault("xi_schedule", "geometric")
    config = TrialConfig.for_schedule(values)
    rows = run_sparsify(config, args.output_dir, progress=True)
    print(f"{'stage':>5} {'xi':>9} {'params':>9} {'train':>7} {'val':>7} {'test':>7}")
    for row in rows:
        print(
            f"{row['stage']:>5} {row['xi']:>9.2e} {row['retained_params']:>9} {row['train_score']:>7.4f} "
            f"{row['val_score']:>7.4f} {row['test_score']:>7.4f}"
        )
    print(f"wrote {Path(args.output_dir) / 'sparsify.csv'}, sparsify.png, ranks.png")
    return 0


def search_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "search", help="search SoRA settings with Ray Tune + Optuna, every trial in MLflow"
    )
    parser.add_argument("--config", help="search-space YAML (see search_spaces/)")
    parser.add_argument(
        "--resume", help="finish the interrupted search in this Ray experiment folder"
    )
    parser.add_argument("--num-samples", type=int, default=8, help="number of trials (default 8)")
    parser.add_argument("--sampler", default="tpe", help="Optuna sampler: tpe, nsga2, gp, random")
    parser.add_argument(
        "--objective",
        default="multi",
        help="multi (max val_score, min retained_params) or val_score (single objective)",
    )
    parser.add_argument(
        "--asha", action="store_true", help="ASHA early stopping (single objective)"
    )
    parser.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    parser.add_argument(
        "--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)"
    )
    parser.add_argument(
        "--gpus-per-trial", type=float, default=0.0, help="GPUs per trial; fractions share a GPU"
    )
    parser.add_argument(
        "--address", help="Ray cluster: auto or ray://host:port (default: a local Ray)"
    )
    parser.add_argument(
        "--storage-path", help="Ray experiment storage; shared (NFS, s3://, gs://) on a cluster"
    )
    parser.add_argument("--name", help="Ray experiment name (default: <experiment-name>-<time>)")
    add_tracking_argument(parser)
    parser.add_argument("--experiment-name", default="sora-tune", help="MLflow experiment")
    parser.add_argument("--sampler-seed", type=int, default=0, help="seed of the Optuna sampler")
    parser.add_argument("--max-failures", type=int, default=1, help="retries of a crashed trial")
    add_trial_arguments(parser)
    parser.set_defaults(command=search_command)


def search_command(args: argparse.Namespace) -> int:
    if args.mlflow_uri and not args.resume:
        # A dead server or a password in a URI stops here, within seconds: before torch is
        # imported and Ray started (run_search checks again, for callers of the Python API).
        check_tracking_uri(args.mlflow_uri)
    from .tune import SearchConfig, load_search_space, resume_search, run_search

    if args.resume:
        search = resume_search(args.resume, address=args.address)
    else:
        if not args.config:
            raise ValueError("search needs --config FILE (or --resume PATH)")
        space = load_search_space(args.config).with_fixed(trial_values(args))
        config = SearchConfig(
            space=space,
            num_samples=args.num_samples,
            sampler=args.sampler,
            objective=args.objective,
            asha=args.asha,
            max_concurrent=args.max_concurrent,
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
            address=args.address,
            storage_path=args.storage_path,
            name=args.name,
            mlflow_uri=args.mlflow_uri,
            experiment_name=args.experiment_name,
            seed=args.sampler_seed,
            max_failures=args.max_failures,
        )
        search = run_search(config)
    print(_trials_table(search))
    if search.interrupted:
        print(
            f"search interrupted ({search.interrupted}); finish it with: "
            f"sora-tune search --resume {search.config.path}"
        )
        return 130
    return 0


def _trials_table(search) -> str:
    from .tune.outcome import outcome

    lines = [
        f"{'trial':<16}{'status':<12}{'val_score':>10}{'test_score':>11}{'retained':>10}{'r_max':>6}{'train s':>9}"
    ]
    for result in search.results:
        metrics = result.metrics or {}
        status = outcome(metrics, error=result.error is not None)
        if metrics.get("trial_id") in search.interrupted_trials:
            status = "interrupted"
        lines.append(
            f"{metrics.get('trial_id', '?'):<16}{status:<12}{metrics.get('val_score', float('nan')):>10.4f}"
            f"{metrics.get('test_score', float('nan')):>11.4f}{metrics.get('retained_params', float('nan')):>10.0f}"
            f"{result.config.get('r_max', '?')!s:>6}{metrics.get('train_time_s', float('nan')):>9.1f}"
        )
    return "\n".join(lines)


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, help="MLflow experiment of the search")
    parser.add_argument(
        "--parent-run-id", help="only the trials of this search run (default: every trial)"
    )
    parser.add_argument(
        "--objectives",
        default="val_score,retained_params",
        help="objectives of the front and hypervolume: val_score,retained_params[,train_time_s]",
    )
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument(
        "--max-params", type=float, help="choose the best val_score with at most N retained params"
    )
    rule.add_argument(
        "--min-score", type=float, help="choose the fewest retained params reaching this val_score"
    )
    rule.add_argument("--knee", action="store_true", help="choose the knee of the front")
    parser.add_argument(
        "--output-dir", default=".", help="folder for pareto.csv and pareto.png (default: .)"
    )
    add_tracking_argument(parser)


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
    add_selection_arguments(parser)
    parser.set_defaults(command=pareto_command)


def pareto_command(args: argparse.Namespace) -> int:
    from .pareto import format_table
    from .registry import choose_trial

    result = choose_trial(**selection_values(args))
    print(format_table(result))
    print(f"wrote {result.csv_path} and {result.png_path}")
    return 0


def register_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "register",
        help="register the chosen run's adapter as an MLflow model; alias champion moves to it",
    )
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept an adapter stored only as a pickled adapter_model.bin (trusted sources only: "
        "loading a pickle can run code)",
    )
    add_selection_arguments(parser)
    parser.set_defaults(command=register_command)


def register_command(args: argparse.Namespace) -> int:
    from .registry import CHAMPION, register

    registered = register(name=args.name, allow_pickle=args.allow_pickle, **selection_values(args))
    print(
        f"registered {registered.name} version {registered.version} from run {registered.run_id}: "
        f"val_score {registered.val_score:.4f}, retained_params {registered.retained_params}, "
        f"test_score {registered.test_score:.4f}"
    )
    print(f"models:/{registered.name}@{CHAMPION}")
    return 0


def predict_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="predict every row of a file with a registered model (CSV on stdout)"
    )
    parser.add_argument(
        "--model", required=True, help="model URI, e.g. models:/NAME@champion or models:/NAME/2"
    )
    parser.add_argument(
        "--input",
        required=True,
        help="CSV, TSV or JSONL file with the task's text columns; - reads JSON Lines from stdin",
    )
    add_tracking_argument(parser)
    parser.set_defaults(command=predict_command)


def predict_command(args: argparse.Namespace) -> int:
    from .registry import predict_file

    predictions = predict_file(args.model, args.input, tracking_uri=args.mlflow_uri)
    print(predictions.to_csv(index=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sora-tune", description="Find the best SoRA adapters.")
    subparsers = parser.add_subparsers(title="commands", required=True)
    train_command_parser(subparsers)
    sparsify_command_parser(subparsers)
    search_command_parser(subparsers)
    pareto_command_parser(subparsers)
    register_command_parser(subparsers)
    predict_command_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.command(args)
    # Bad input, a missing file, an unreachable server or Hub (GlueDataUnavailableError).
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"sora-tune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
