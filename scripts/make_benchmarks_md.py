"""Write docs/benchmarks.md from the benchmark JSON files under docs/bench/.

Every table in docs/benchmarks.md comes from a script's JSON output, with the command that made
it and the machine it ran on; nothing is typed by hand. Rerun a benchmark, then this script.

    python scripts/make_benchmarks_md.py --bench-dir docs/bench --output docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def _trace_budget(trace: dict) -> str:
    """How a front-tracing arm's trials spent their epochs: stages in steps, or (JSON written
    before stages could be counted in steps) in epochs."""
    if "xi_every_steps" in trace:
        return (
            f"{trace['epochs']} ({trace['dense_steps']} dense steps, then stages of "
            f"{trace['xi_every_steps']} steps, a point per stage)"
        )
    return f"{trace['epochs']} ({trace['dense_epochs']} dense, then a stage per epoch, a point per stage)"


def _hypervolume(data: dict) -> list[str]:
    analysis, config = data["analysis"], data["config"]
    arms, proxy = analysis["arms"], config["proxy"]
    seeds = len(arms.get("random", {}).get("seeds", []))

    def share(value: float | None) -> str:
        return "never" if value is None else f"{value:.0%}"

    lines = [
        "Every arm is a real `run_search` (Ray, `OptunaSearch`, MLflow) on a "
        f"{proxy['task']} proxy ({proxy['max_train_samples']} training rows, length "
        f"{proxy['max_length']}, {proxy['max_eval_samples']} val rows), {seeds} sampler seed(s). "
        "Compute is the summed training time of the trials, stopped ones included; every arm is "
        "read at random search's total compute (its budget) on the same seed. Hypervolume of "
        "the (val_score ↑, retained_params ↓) candidates, reference "
        f"{tuple(round(x, 4) for x in analysis['reference'])} for all. Constant-ξ trials run "
        f"{config['constant']['epochs']} epochs; front-tracing trials {_trace_budget(config['trace'])}.",
        "",
        *_table(
            [
                "arm",
                "trials",
                "stopped early",
                "hypervolume at the budget",
                "compute to random's final hypervolume",
                "candidate points per trial-hour",
            ],
            [
                [
                    arm,
                    str(sum(r["trials"] for r in entry["seeds"])),
                    str(sum(r["stopped"] for r in entry["seeds"])),
                    f"{entry['hv_at_budget']:.4g}",
                    ", ".join(share(r["share_of_budget"]) for r in entry["seeds"]),
                    "–"
                    if entry["points_per_trial_hour"] is None
                    else f"{entry['points_per_trial_hour']:.0f}",
                ]
                for arm, entry in arms.items()
            ],
        ),
        "",
        "Compute to random's final hypervolume is per seed, as a share of random's compute.",
    ]
    goals = data.get("goals", {})
    if "both_reaches_random_with_a_third" in goals:
        goal = goals["both_reaches_random_with_a_third"]
        seeds = len(goal["shares"])
        lines.append(
            "- Goal: TPE + both reaches random search's final hypervolume with at most a third of "
            "its compute on at least 4 of 5 seeds"
            + ("" if seeds == 5 else f" (here {goal.get('needed', 4)} of the {seeds} run)")
            + f": {'met' if goal['met'] else 'not met'} "
            f"({', '.join(share(s) for s in goal['shares'])})."
        )
    if "trace_points_per_hour_ratio" in goals:
        goal = goals["trace_points_per_hour_ratio"]
        lines.append(
            f"- Goal: front-tracing trials give at least 5× the candidate points per trial-hour of "
            f"constant-ξ trials at equal or better hypervolume: {'met' if goal['met'] else 'not met'} "
            f"({goal['ratio']:.1f}×; hypervolume at the budget {goal['hv_trace']:.4g} against "
            f"{goal['hv_tpe']:.4g})."
        )
    if data.get("plot"):
        lines += ["", f"![Mean hypervolume against compute](bench/{data['plot']})"]
    return lines


def _data_sharing(data: dict) -> list[str]:
    results = data["results"]
    rows = [
        [
            variant,
            str(r["rows"]["train"]),
            f"{r['after_prepare_mib']:.0f}",
            f"{r['peak_mib']:.0f}",
            f"{r['peak_mib'] - r['after_prepare_mib']:.0f}",
            f"{r['share_s']:.1f}",
        ]
        for variant, r in results.items()
    ]
    return [
        f"Peak resident memory of the search's driver (ru_maxrss) sharing the whole "
        f"{data['config']['task']} task with the trials: `arrow` keeps the rows in Arrow (what "
        "the search does), `python` turns them into Python lists and back (what it did before).",
        "",
        *_table(
            [
                "variant",
                "train rows",
                "after tokenising, MiB",
                "peak, MiB",
                "added by sharing, MiB",
                "share s",
            ],
            rows,
        ),
    ]


def _data_file(data: dict) -> list[str]:
    results = data["results"]
    rows = [
        [
            variant,
            str(r["file_rows"]),
            f"{r['load_s']:.1f}",
            f"{r['prepare_s']:.1f}",
            f"{r['total_s']:.1f}",
            f"{r['after_ray_init_mib']:.0f}",
            f"{r['after_load_mib']:.0f}",
            f"{r['peak_mib']:.0f}",
        ]
        for variant, r in results.items()
    ]
    return [
        f"The search's driver on a generated CSV of {data['config']['file_rows']:,} rows (a "
        "question, a reply and a string label): `load` reads and checks it (`load_own_data`: "
        "digest, UTF-8, columns, empty cells, labels), `prepare` also splits and tokenises it "
        "and `total` also puts it in Ray's object store. `cold`: empty `datasets` and "
        "tokenisation caches; `warm`: what every later search on the same file does. Memory is "
        "the driver's peak resident memory (ru_maxrss), Ray's own start included.",
        "",
        *_table(
            [
                "variant",
                "rows",
                "load s",
                "prepare s",
                "total s",
                "after ray.init, MiB",
                "after load, MiB",
                "peak, MiB",
            ],
            rows,
        ),
    ]


def _concurrency(data: dict) -> list[str]:
    rows = [
        [
            row["sampler"],
            str(row["num_samples"]),
            str(row["concurrent"]) + (" (default)" if row["default"] else ""),
            f"{row['hv_mean']:.0f} ± {row['hv_sem']:.0f}",
        ]
        for row in data["rows"]
    ]
    return [
        "Hypervolume (mean ± standard error over "
        f"{data['config']['seeds']} sampler seeds) of a search of N simulated trials, c at a "
        "time, trials ending out of order; a synthetic objective on the usual space (see the "
        "script), so it measures the samplers, not a task. `(default)` marks "
        "`default_max_concurrent`.",
        "",
        *_table(["sampler", "trials N", "at once c", "hypervolume"], rows),
    ]


def _curves(data: dict) -> list[str]:
    design, analysis = data["config"], data["analysis"]
    fixed, searched = design["space"]["fixed"], design["space"]["distributions"]

    def rho(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}"

    seeds = analysis["seed_agreement"]
    return [
        f"A Latin hypercube of {design['configurations']} configurations over "
        f"{', '.join(searched)} × {len(design['seeds'])} seeds on a {fixed['task']} proxy "
        f"({fixed['max_train_samples']} training rows, {fixed['epochs']} epochs at batch "
        f"{fixed['batch_size']}, length {fixed['max_length']}, {fixed['max_eval_samples']} val "
        f"rows, an evaluation every {fixed['eval_steps']} steps): {data['recorded']} of "
        f"{data['planned']} trials recorded, {analysis['trials']} finished. A trial took "
        f"{analysis['mean_trial_s']:.0f} s on average, {analysis['mean_threshold_s']:.0f} s of it "
        f"scoring {len(design['threshold_quantiles'])} post-hoc gate thresholds every "
        f"{design['threshold_every']} evaluations and at the last. The table: "
        f"[`docs/bench/{data['table']}`](bench/{data['table']}).",
        "",
        "Spearman's ρ between each evaluation's value and the final one, across the finished "
        "trials:",
        "",
        *_table(
            ["step", "epoch", "ρ val_score", "ρ retained_params"],
            [
                [str(r["step"]), str(r["epoch"]), rho(r["val_score"]), rho(r["retained_params"])]
                for r in analysis["rows"]
            ],
        ),
        "",
        analysis["summary"],
        "",
        f"Two seeds of the same configuration rank their final val_score with ρ = "
        f"{rho(seeds['val_score'])} ({seeds['configurations']} configurations).",
    ]


def _tracing(data: dict) -> list[str]:
    comparison, staged = data["comparison"], data["config"]["staged"]
    ways, clock = comparison["ways"], comparison["clock"]
    stages = staged["xi_stages"] - 1
    gains = comparison["dense_minus_constant_val_score"]

    def p_value(value: float | None) -> str:
        return "–" if value is None else f"{value:.2g}"

    names = {
        "stages": f"(a) {stages} stages of {staged['xi_every_steps']} steps, lr continuing",
        "thresholds": "(b) post-hoc thresholds",
    }
    return [
        f"The two ways a front-tracing trial can go on once it has trained as the constant trial "
        f"(issue #28 §4), on {len(comparison['pairs'])} trials of the recorded design (its first "
        f"{len({pair['config'] for pair in comparison['pairs']})} configurations, both seeds). (a) trains on through {stages} stages of "
        f"{staged['xi_every_steps']} steps, ξ per gate step rising linearly from the constant "
        f"trial's to {staged['xi_max']}, the learning rate decaying once over the whole trial "
        f"(`stage_lr continue`): [`docs/bench/{data['table']}`](bench/{data['table']}). "
        "(b) zeroes the finished constant trial's gates up to each of 4 quantiles of |g|, without "
        "training (the thresholds of "
        "[`docs/bench/curves.jsonl`](bench/curves.jsonl)). Points with no rank left are not "
        "counted. Cost: the constant trial plus what each way adds, on the replay's clock (the "
        f"constant trials' medians: {clock['per_evaluation_s']:.2f} s an evaluation, a threshold "
        f"point's time, and {clock['per_step_s']:.2f} s a step, the rest of an interval), so that "
        "the load other jobs put on the machine does not enter. Hypervolume from one reference "
        "for both.",
        "",
        *_table(
            [
                "way",
                "points",
                "trial-hours",
                "hypervolume of all points",
                "per trial-hour",
                "points per trial-hour",
                "median hypervolume per trial",
            ],
            [
                [
                    names[way],
                    str(e["points"]),
                    f"{e['trial_hours']:.2f}",
                    f"{e['pooled_hypervolume']:.5g}",
                    f"{e['pooled_hypervolume_per_trial_hour']:.5g}",
                    f"{e['points_per_trial_hour']:.1f}",
                    f"{statistics.median(e['hypervolume']):.5g}",
                ]
                for way, e in ways.items()
            ],
        ),  # fmt: skip
        "",
        f"Paired by trial (Wilcoxon signed-rank, two-sided): hypervolume p = "
        f"{p_value(comparison['p_hypervolume'])}, hypervolume per trial-hour p = "
        f"{p_value(comparison['p_hypervolume_per_trial_hour'])}. At the end of its dense phase "
        f"(the constant trial's {data['config']['space']['fixed']['epochs']} epochs), (a) scores "
        f"{statistics.median(gains):+.3f} val_score (median over trials) against the constant trial, "
        "whose learning rate has decayed to zero there.",
        "",
        f"Better per trial-hour: {names[comparison['better']]}. It is the default of the shipped "
        "`trace` search space.",
    ]


def _memory(data: dict) -> list[str]:
    config, rows = data["config"], data["results"]
    mib = 2**20
    gpu = config["device"] == "cuda"

    def row(r: dict) -> list[str]:
        return [
            r["model"],
            r["base_dtype"],
            f"{r['batch_size']} × {r['max_length']}",
            "yes" if r["gradient_checkpointing"] else "no",
            f"{r['frozen_bytes'] / mib:.0f}",
            f"{r['peak_bytes'] / mib:.0f}",
            f"{r['estimated_bytes'] / mib:.0f}",
            f"{r['ratio']:.2f}",
            "–" if r["step_seconds"] is None else f"{r['step_seconds']:.2f}",
        ]

    lines = [
        f"One SoRA training step (r_max {config['r_max']}, every row full) "
        + (
            "on the GPU, its peak read from the caching allocator, beside the estimate's tensors "
            "(`sora-tune estimate` without the CUDA context and the allocator's slack)"
            if gpu
            else "on this CPU, one thread, its peak the model's own bytes plus what the step "
            "added to the resident memory, beside the estimate (`sora-tune estimate --device cpu`)"
        )
        + ", measured in a fresh process (`sora_tune.peak_memory`), with the frozen base's "
        f"bytes and the median time of {config['timed_steps']} steps after it. MiB.",
        "",
        *_table(
            [
                "model",
                "base",
                "batch",
                "checkpointing",
                "frozen",
                "peak",
                "estimate",
                "est./peak",
                "step s",
            ],
            [row(r) for r in rows],
        ),  # fmt: skip
    ]
    fp32 = {
        r["model"]: r["frozen_bytes"]
        for r in rows
        if r["base_dtype"] == "fp32" and not r["gradient_checkpointing"]
    }
    shares = [
        f"{r['model']} {r['base_dtype']} {r['frozen_bytes'] / fp32[r['model']]:.2f}×"
        for r in rows
        if r["model"] in fp32 and r["base_dtype"] != "fp32" and not r["gradient_checkpointing"]
    ]
    if shares:
        lines += ["", "Frozen bytes against fp32: " + ", ".join(dict.fromkeys(shares)) + "."]
    return lines


def _replay(data: dict) -> list[str]:
    table, clock = data["table"], data["clock"]
    intervals = ", ".join(
        f"{key} {sum(seconds):.0f} s" for key, seconds in sorted(clock["evaluations"].items())
    )

    def share(value: float | None) -> str:
        return "never" if value is None else f"{value:.2f}"

    def p_value(entry: dict, other: str, key: str) -> str:
        p = entry["wilcoxon"].get(other, {}).get(key)
        return "–" if p is None else f"{p:.2g}"

    rows = [
        [
            str(setting["budget"]),
            str(setting["workers"]),
            arm,
            str(entry["seeds"]),
            f"{entry['trials']:.0f}",
            f"{entry['stopped']:.0f}",
            f"{entry['hv_at_budget']:.5g}",
            "never"
            if entry["median_time_share"] == float("inf")
            else f"{entry['median_time_share']:.2f}",
            f"{entry['within_third']}/{entry['seeds']}",
            f"{entry['points_per_trial_hour']:.0f}",
            p_value(entry, "tpe", "hv_at_budget"),
            p_value(entry, "tpe", "time_share"),
        ]
        for setting in data["settings"].values()
        for arm, entry in setting["arms"].items()
    ]
    lines = [
        f"Searches replayed on a simulated clock through the search's real MO-ASHA scheduler "
        f"and Ray's `OptunaSearch` with sora-tune's samplers (`sora_tune.tune.replay`), in "
        f"`TuneController`'s call order, on the first {table['trials']} trials of "
        f"[`docs/bench/{table['name']}`](bench/{table['name']}) ({table['configurations']} "
        "configurations). A suggestion replays the recorded configuration nearest to it in the "
        "design's unit cube with the same r_max, with a recorded seed drawn from the replay's "
        f"seed. Clock: the median recorded interval by adapter width (a whole trial: "
        f"{intervals}), {clock['setup_s']:.1f} s of set-up, {clock['threshold_point_s']:.1f} s "
        "a post-hoc threshold point. Random search runs the budget's trials; its end is every "
        "other arm's time budget on that seed. A front-tracing trial is replayed as its constant "
        "trial plus that trial's post-hoc gate-threshold points at its end (§4's option (b)); "
        "stages trained on are not replayed. Hypervolume from the reference "
        f"({data['reference'][0]:g}, {data['reference'][1]:.6g}) for all.",
        "",
        *_table(
            [
                "trials",
                "workers",
                "arm",
                "seeds",
                "trials run",
                "stopped",
                "hypervolume at the budget",
                "median time to random's final hypervolume",
                "seeds within 1/3",
                "points per trial-hour",
                "p (HV vs tpe)",
                "p (time vs tpe)",
            ],
            rows,
        ),
        "",
        "Time to random's final hypervolume is a share of random's time on the same seed; p "
        "values are two-sided Wilcoxon signed-rank tests paired by seed.",
    ]
    shares = [s["arms"]["random"]["median_time_share"] for s in data["settings"].values()]
    trial_s = min(sum(seconds) for seconds in clock["evaluations"].values()) + clock["setup_s"]
    points = len(data["design"]["threshold_quantiles"])
    ceiling = (1 + points) * trial_s / (trial_s + points * clock["threshold_point_s"])
    lines += [
        "",
        f"Random search itself reaches its final hypervolume at a median {min(shares):.2f}–"
        f"{max(shares):.2f} of its time: on a table of {table['configurations']} configurations "
        "every search finds the table's own front early, so these shares say how fast a search "
        "covers the table, not how it would fare on a space it cannot exhaust. A replayed "
        f"front-tracing trial gives at most 1 + {points} points (its threshold quantiles) for "
        f"{points} more evaluations, at most {ceiling:.1f}× the points per trial-hour of a "
        "constant trial, so 5× cannot be met with the recorded thresholds.",
    ]
    for key, goal in data["goals"].items():
        budget, workers = key.split("|")
        third = ", ".join(
            f"{arm} {g['seeds']}/{g['needed']} needed ({'met' if g['met'] else 'not met'})"
            for arm, g in goal["within_third"].items()
        )
        trace = "; ".join(
            f"{name}: {g['ratio']:.1f}× at hypervolume {g['hv']:.5g} against {g['hv_without']:.5g} "
            f"({'met' if g['met'] else 'not met'})"
            for name, g in goal["trace_points"].items()
        )
        lines += [
            "",
            f"- {budget} trials, {workers} workers. Random's final hypervolume within a third of "
            f"its time: {third}. Front-tracing, 5× the points per trial-hour at equal or better "
            f"hypervolume: {trace}.",
        ]
    return lines + ["", f"![Anytime hypervolume, bootstrap bands](bench/{data['plot']})"]


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
    "concurrency": ("Trials at once and model-based samplers", _concurrency),
    "data_sharing": ("Data shared with the trials", _data_sharing),
    "data_file": ("Your own data file at scale", _data_file),
    "curves": ("Recorded learning curves", _curves),
    "tracing": ("Front-tracing: stages against thresholds", _tracing),
    "memory": ("A trial's memory at each base_dtype", _memory),
    "replay": ("Replayed searches", _replay),
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
