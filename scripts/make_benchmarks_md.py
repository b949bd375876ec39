"""Write docs/benchmarks.md from the benchmark JSON files under docs/bench/.

Every table in docs/benchmarks.md comes from a script's JSON output, with the command that made
it and the machine it ran on; nothing is typed by hand. Rerun a benchmark, then this script.

    python scripts/make_benchmarks_md.py --bench-dir docs/bench --output docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _padding(data: dict) -> list[str]:
    config = data["config"]
    rows = [
        [
            task,
            str(entry["train_rows"]),
            batch_size,
            f"{r['dynamic']:.1%}",
            f"{r['group_by_length']:.1%}",
            f"{r['pad_to_max']:.1%}",
        ]
        for task, entry in data["results"].items()
        for batch_size, r in entry["padding_ratio"].items()
    ]
    return [
        f"Share of padded token slots in one epoch of the training split, max_length "
        f"{config['max_length']}: shuffled batches padded to their longest row (the trial "
        "default), the same with `--group-by-length`, and every row padded to max_length.",
        "",
        *_table(
            ["task", "train rows", "batch", "dynamic", "group-by-length", "pad to max_length"],
            rows,
        ),
    ]


def _inference(data: dict) -> list[str]:
    config, medians = data["config"], data["median_ms"]
    labels = {
        "base": "bare base model",
        "pruned_merged": "pruned SoRA, merged",
        "pruned": "pruned SoRA, unmerged",
        "rmax": "unpruned SoRA (r_max), unmerged",
    }
    samples = data["samples_ms"]
    # The minimum is the least disturbed by other jobs on a shared CPU.
    rows = [
        [
            labels.get(name, name),
            f"{ms:.1f}",
            f"{min(samples[name]):.1f}",
            f"{max(samples[name]):.1f}",
            f"{ms / medians['base']:.3f}",
            f"{min(samples[name]) / min(samples['base']):.3f}",
        ]
        for name, ms in medians.items()
    ]
    adapter = data["adapter"]
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in data["logits_max_abs_diff_vs_rmax"].items())
    return [
        f"Milliseconds per forward pass (eval mode, no_grad), batch {config['batch_size']} × "
        f"{config['length']} tokens, {config['torch_threads']} threads, median of "
        f"{config['rounds']} interleaved rounds × {config['steps']}. The adapter keeps "
        f"{adapter['rank_sum_pruned']} of {adapter['rank_sum_rmax']} ranks over "
        f"{adapter['modules']} modules. Another job may have shared the CPU.",
        "",
        *_table(["variant", "median ms", "min", "max", "median ÷ base", "min ÷ base min"], rows),
        "",
        f"Pruned ÷ unpruned (both unmerged), medians: {data['ratios']['pruned_over_rmax']:.3f}; "
        f"minima: {min(samples['pruned']) / min(samples['rmax']):.3f}. "
        f"Largest logit difference from the unpruned adapter: {diffs}.",
    ]


def _search(data: dict) -> list[str]:
    config, wall = data["config"], data["wall_s"]
    rows = [["training (`train_time_s`)", f"{data['train_time_s']:.1f}"]]
    rows += [[name.removesuffix("_s"), f"{s:.1f}"] for name, s in data["parts"].items()]
    rows = [[*row, f"{float(row[1]) / wall:.1%}"] for row in rows]
    notes = [f"- `{k}`: {v}" for k, v in data["notes"].items()]
    return [
        f"A search of {len(data['trials'])} trials ({config['task']}, "
        f"{config['max_train_samples']} training rows, {config['epochs']} epoch(s), batch "
        f"{config['batch_size']}, length {config['max_length']}, {config['cpus_per_trial']:g} "
        f"CPUs per trial): wall {wall:.1f} s, overhead 1 − Σ train time ÷ wall = "
        f"**{data['overhead']:.1%}** (target ≤ 5%), {data['overhead_without_ray_start']:.1%} "
        "without the Ray start. Another job may have shared the CPU.",
        "",
        *_table(["part", "seconds", "share of wall"], rows),
        "",
        *notes,
    ]


def _hypervolume(data: dict) -> list[str]:
    config, summary = data["config"], data["summary"]
    n, scale = summary["budget"], data["hv_all_trials"] or 1.0
    studies = data["studies"]
    seeds = len(next(iter(studies.values())))

    def share(hv: float) -> str:
        return f"{hv / scale:.1%}"

    lines = [
        f"Hypervolume of the (val_score ↑, retained_params ↓) front after n trials, as a share of "
        f"that of all {sum(len(s['trials']) for b in studies.values() for s in b.values())} "
        f"trials of the run (reference point {tuple(data['reference'] or ())}). Each study is "
        f"Optuna ask/tell with the search's sampler over `{Path(config['space']).name}` for 2N = "
        f"{2 * n} trials, {seeds} seed(s) per sampler; trials: {config['task']}, "
        f"{config['max_train_samples']} training rows, {config['epochs']} epoch(s), length "
        f"{config['max_length']}, {config['max_eval_samples']} val rows. "
        f"{data['trials_failed']} trial(s) failed; {data['trials_trained']} were trained, the "
        "others repeated the parameters of an earlier trial and reused its result.",
    ]
    startup = config["sampler_startup_trials"].get("tpe")
    if startup:
        lines[0] += (
            f" TPE's first {startup} trials are random draws, the same as random search's with "
            "the same seed."
        )
    for sampler, comparison in summary["comparisons"].items():
        base = summary["baseline"]
        rows = [
            [
                seed,
                share(e["hv_at_n"]),
                share(e["baseline_at_n"]),
                share(e["baseline_at_2n"]),
                share(e["hv_at_2n"]),
                "yes" if e["reached"] else "no",
            ]
            for seed, e in comparison["per_seed"].items()
        ]
        mean = comparison["mean"]
        rows.append(
            [
                "**mean**",
                *(share(mean[k]) for k in ("hv_at_n", "baseline_at_n", "baseline_at_2n")),
                share(mean["hv_at_2n"]),
                f"{comparison['seeds_reached']} of {comparison['seeds']}",
            ]
        )
        lines += [
            "",
            f"Does {sampler} after N = {n} reach {base} after 2N = {2 * n}?",
            "",
            *_table(
                [
                    "seed",
                    f"{sampler} N",
                    f"{base} N",
                    f"{base} 2N",
                    f"{sampler} 2N",
                    f"{sampler} N ≥ {base} 2N",
                ],
                rows,
            ),
        ]
    rows = [
        [sampler]
        + [f"{share(curve['mean'][i])} ± {share(curve['std'][i])}" for i in (n - 1, 2 * n - 1)]
        for sampler, curve in summary["curves"].items()
    ]
    header = ["sampler", f"N = {n}, mean ± std", f"2N = {2 * n}, mean ± std"]
    lines += ["", *_table(header, rows)]
    if data.get("plot"):
        lines += ["", f"![Mean hypervolume curves](bench/{data['plot']})"]
    return lines


def _generic(data: dict) -> list[str]:
    medians = data.get("median_ms", {})
    rows = [[name, f"{ms:.1f}"] for name, ms in medians.items()]
    ratios = [f"- {k}: {v:.3f}" for k, v in data.get("ratios", {}).items()]
    return [*_table(["variant", "median ms"], rows), "", *ratios] if rows else []


RENDERERS: dict[str, tuple[str, Callable[[dict], list[str]]]] = {
    "padding": ("Padding", _padding),
    "inference": ("Inference latency", _inference),
    "search": ("Search overhead", _search),
    "hypervolume": ("Search efficiency", _hypervolume),
}


def render(bench_dir: Path) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python scripts/make_benchmarks_md.py` from the JSON files in "
        "`docs/bench/`; do not edit by hand.",
    ]
    loaded = [(path, json.loads(path.read_text())) for path in sorted(bench_dir.glob("*.json"))]
    order = list(RENDERERS)  # the known benchmarks in a fixed order, then any others by name
    loaded.sort(key=lambda item: order.index(k) if (k := item[1].get("benchmark")) in order else 99)
    for path, data in loaded:
        kind = data.get("benchmark", path.stem)
        title, renderer = RENDERERS.get(kind, (path.stem, _generic))
        machine = data.get("machine", {})
        command = data.get("command", f"(no command recorded in {path.name})")
        lines += [
            "",
            f"## {title}",
            "",
            "```bash",
            command.strip(),
            "```",
            "",
            f"Machine: {machine.get('platform', '?')}, {machine.get('cpus', '?')} CPUs. "
            f"Data: [`docs/bench/{path.name}`](bench/{path.name}).",
            "",
            *renderer(data),
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bench-dir", default=str(REPO / "docs" / "bench"), help="folder of benchmark JSON files"
    )
    parser.add_argument(
        "--output", default=str(REPO / "docs" / "benchmarks.md"), help="the Markdown file written"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    text = render(Path(args.bench_dir))
    Path(args.output).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
