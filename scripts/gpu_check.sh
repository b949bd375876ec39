#!/usr/bin/env bash
# What a single-GPU machine can show, offline (the packaged MiniLM and the GLUE TSVs in
# ../shared/data/glue or $SORA_TUNE_DATA_DIR), in an estimated 10 minutes on one H200 (not yet
# timed on a GPU):
#   1. pytest -m gpu: device choice, every precision and base dtype, a resume across devices,
#      two trials on one GPU at 0.5 each, auto shares with caps, a trial over its cap failing
#      alone, bench_step on CUDA;
#   2. scripts/bench_step.py on CUDA: ms per step of SoRA, PEFT LoRA and PEFT AdaLoRA (batch 32,
#      length 128; the paper claims SoRA ~30% faster than AdaLoRA);
#   3. a 4-trial search with --gpus-per-trial 0.5 on full MRPC, 2 epochs, from a fresh folder;
#   4. the memory grid: Llama-3.2-1B, -3.1-8B and -3.1-70B shapes cut to 2 layers, random
#      weights, {bf16, nf4} x checkpointing x lengths {256, 1024} x batches {4, 8}: each step's
#      peak (max_memory_allocated) beside the estimate's tensors, the data to refit the
#      activation constants on CUDA (scripts/bench_memory.py --device cuda);
#   5. six tiny trials (MRPC, 1 epoch, 256 rows) packed onto the GPU with --gpus-per-trial auto,
#      each capped at its share, against the same six one at a time: none may run out of memory;
#   6. with 2 GPUs or more: a 2-trial search of 2-worker trials (--workers-per-trial 2, a GPU
#      each: DDP on nccl), 1 epoch of MRPC (a dry run: 2 CPU workers on gloo).
# Writes JSON for each part and summary.json + summary.md to OUT_DIR.
#
# Usage: scripts/gpu_check.sh [--dry-run] [OUT_DIR]      (OUT_DIR default: ./gpu_check)
#   --dry-run  the same plumbing on the CPU at toy sizes (no CUDA needed): the gpu tests skip,
#              the step benchmark and the search run tiny, and the summary says "dry run".
set -euo pipefail

dry_run=false
if [[ ${1:-} == --dry-run ]]; then
    dry_run=true
    shift
fi
[[ ${1:-} == -h || ${1:-} == --help ]] && { sed -n '2,26p' "$0"; exit 0; }
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)
data=${SORA_TUNE_DATA_DIR:-$repo/../shared/data/glue}
python=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0

die() {
    echo "gpu_check.sh: error: $*" >&2
    exit 2
}
[[ -d $data/MRPC ]] || die "no GLUE data at $data (set SORA_TUNE_DATA_DIR)"
if [[ $dry_run == false ]]; then
    "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' ||
        die "torch sees no CUDA device (use --dry-run to check the plumbing on a CPU)"
fi

if [[ $dry_run == true ]]; then
    device=cpu step_args=(--rounds 1 --steps 1 --batch-size 4 --length 32)
    search_args=(--max-train-samples 64 --max-eval-samples 32 --train-eval-samples 16 --epochs 1
        --max-length 64 --gpus-per-trial 0)
    grid_args=(--shape Llama-3.2-1B --layers 1 --base-dtypes bf16 --batch-sizes 2 --max-lengths 32
        --timed-steps 0)
    packing_args=(--max-train-samples 64 --max-eval-samples 32 --train-eval-samples 16
        --max-length 64 --gpus-per-trial 0)
    workers_args=(--max-train-samples 64 --max-eval-samples 32 --train-eval-samples 16 --epochs 1
        --max-length 64 --gpus-per-trial 0 --cpus-per-trial 0.5)
else
    device=cuda step_args=(--rounds 5 --steps 5 --batch-size 32 --length 128)
    search_args=(--epochs 2 --gpus-per-trial 0.5)
    grid_args=(--shape Llama-3.2-1B --shape Llama-3.1-8B --shape Llama-3.1-70B --layers 2
        --base-dtypes bf16,nf4 --batch-sizes 4,8 --max-lengths 256,1024 --timed-steps 0)
    packing_args=(--max-train-samples 256 --max-eval-samples 128 --gpus-per-trial auto)
    workers_args=(--epochs 1 --gpus-per-trial 1 --cpus-per-trial 1)
fi
gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())')

echo "== 1/6 pytest -m gpu"
start=$SECONDS
set +e
(cd "$repo" && "$python" -m pytest -m gpu -q -p no:cacheprovider --junitxml "$out/gpu_tests.xml") |
    tee "$out/gpu_tests.log"
tests_status=${PIPESTATUS[0]}
set -e
tests_s=$((SECONDS - start))

echo "== 2/6 bench_step.py on $device"
start=$SECONDS
"$python" "$repo/scripts/bench_step.py" --device "$device" "${step_args[@]}" --output "$out/step.json"
step_s=$((SECONDS - start))

echo "== 3/6 a 4-trial search on MRPC, from a fresh folder"
start=$SECONDS
mkdir -p "$out/search"
(cd "$out/search" && "$python" -m sora_tune.cli search --config "$repo/search_spaces/sora_glue.yaml" \
    --task mrpc --data-dir "$data" --num-samples 4 --cpus-per-trial 1 --name gpu-check \
    "${search_args[@]}") | tee "$out/search.log"
search_s=$((SECONDS - start))

echo "== 4/6 the memory grid on $device"
start=$SECONDS
"$python" "$repo/scripts/bench_memory.py" --device "$device" "${grid_args[@]}" \
    --output "$out/memory_grid.json"
grid_s=$((SECONDS - start))

echo "== 5/6 six tiny trials packed onto the GPU, then one at a time"
start=$SECONDS
for concurrent in 6 1; do
    mkdir -p "$out/packing-$concurrent"
    (cd "$out/packing-$concurrent" && "$python" -m sora_tune.cli search \
        --config "$repo/search_spaces/sora_glue.yaml" --task mrpc --data-dir "$data" --epochs 1 \
        --num-samples 6 --max-concurrent "$concurrent" --cpus-per-trial 1 --sampler random \
        --name "packing-$concurrent" "${packing_args[@]}") >"$out/packing-$concurrent.log"
    echo "$concurrent at once: $((SECONDS - start)) s"
done
packing_s=$((SECONDS - start))

workers_s=0
if [[ $dry_run == true || $gpus -ge 2 ]]; then
    echo "== 6/6 2-worker trials (DDP), from a fresh folder"
    start=$SECONDS
    mkdir -p "$out/workers"
    (cd "$out/workers" && "$python" -m sora_tune.cli search --task mrpc --data-dir "$data" \
        --config "$repo/search_spaces/sora_glue.yaml" --num-samples 2 --workers-per-trial 2 \
        --batch-size 32 --name gpu-check-workers "${workers_args[@]}") | tee "$out/workers.log"
    workers_s=$((SECONDS - start))
else
    echo "== 6/6 skipped: 2-worker trials need 2 GPUs, torch sees $gpus"
fi

"$python" - "$out" "$dry_run" "$tests_status" "$tests_s" "$step_s" "$search_s" "$grid_s" \
    "$packing_s" "$workers_s" <<'EOF'
"""summary.json and summary.md from the six parts' outputs."""
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import mlflow

from sora_tune.tracking import DEVICE_TAG, PRECISION_TAG, ROLE_TAG

out, dry_run = Path(sys.argv[1]), sys.argv[2] == "true"
tests_status, tests_s, step_s, search_s, grid_s, packing_s, workers_s = map(int, sys.argv[3:10])
suite = ElementTree.parse(out / "gpu_tests.xml").getroot().find("testsuite")
tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
step = json.loads((out / "step.json").read_text())


def trial_runs(folder: str) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{out / folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sora-mrpc")
    return client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")


def wall_s(runs: list) -> float:
    return (max(r.info.end_time or 0 for r in runs) - min(r.info.start_time for r in runs)) / 1000


def trial_rows(runs: list) -> list[dict]:
    """The trials of a search, in the order they started."""
    return sorted(
        (
            {
                "status": r.info.status,
                "device": r.data.tags.get(DEVICE_TAG),
                "precision": r.data.tags.get(PRECISION_TAG),
                "workers": int(r.data.params.get("workers_per_trial", 1)),
                "val_score": r.data.metrics.get("val_score"),
                "test_score": r.data.metrics.get("test_score"),
                "retained_params": r.data.metrics.get("retained_params"),
                "train_time_s": r.data.metrics.get("train_time_s"),
                "start": r.info.start_time / 1000,
                "end": (r.info.end_time or r.info.start_time) / 1000,
            }
            for r in runs
        ),
        key=lambda t: t["start"],
    )


trials = trial_rows(trial_runs("search"))
workers = trial_rows(trial_runs("workers")) if (out / "workers" / "mlflow.db").exists() else []
grid = json.loads((out / "memory_grid.json").read_text())["results"]
worst = max(grid, key=lambda row: abs(row["ratio"] - 1))
packing = {n: trial_runs(f"packing-{n}") for n in (6, 1)}
overlap = any(b["start"] < a["end"] for a, b in zip(trials, trials[1:]))
summary = {
    "dry_run": dry_run,
    "seconds": {"tests": tests_s, "step": step_s, "search": search_s, "workers": workers_s},
    "gpu_tests": tests | {"exit_code": tests_status},
    "step": {"device": step["machine"]["device"], "precision": step["config"]["precision"]}
    | {"median_ms": step["median_ms"], "ratios": step["ratios"]},
    "search": {"trials": trials, "trials_overlapped": overlap},
    "workers": {"trials": workers},
    "memory_grid": {"cases": len(grid), "worst": worst, "seconds": grid_s},
    "packing": {
        str(n): {
            "finished": sum(r.info.status == "FINISHED" for r in p),
            "failed": [r.data.tags.get("failure_reason") for r in p if r.info.status == "FAILED"],
            "wall_s": wall_s(p),
            "gpu_shares": sorted(r.data.params.get("gpu_share", "0") for r in p),
            "worst_peak_over_estimate": max(
                (
                    r.data.metrics["gpu_memory_peak"] / r.data.metrics["gpu_memory_estimated_tensors"]
                    for r in p
                    if "gpu_memory_peak" in r.data.metrics
                ),
                default=None,
            ),
        }
        for n, p in packing.items()
    }
    | {"seconds": packing_s},
}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
ms = step["median_ms"]
lines = [
    f"# GPU check{' (dry run on the CPU: toy sizes, gpu tests skipped)' if dry_run else ''}",
    "",
    f"Total {tests_s + step_s + search_s + grid_s + packing_s + workers_s} s: tests {tests_s} s, "
    f"step benchmark {step_s} s, search {search_s} s, memory grid {grid_s} s, packing "
    f"{packing_s} s, 2-worker trials {workers_s} s.",
    "",
    f"- `pytest -m gpu`: {tests['tests']} tests, {tests['failures']} failed, {tests['errors']} "
    f"errors, {tests['skipped']} skipped (exit code {tests_status}).",
    f"- Step on {summary['step']['device']} ({summary['step']['precision']}): SoRA "
    f"{ms['sora']:.1f} ms, LoRA {ms['lora']:.1f} ms, AdaLoRA {ms['adalora']:.1f} ms; SoRA/LoRA "
    f"{step['ratios']['sora_over_lora']:.3f}, SoRA/AdaLoRA {step['ratios']['sora_over_adalora']:.3f} "
    "(the paper: ~0.7).",
    f"- Search: {len(trials)} trials, {sum(t['status'] == 'FINISHED' for t in trials)} finished, "
    f"devices {sorted({t['device'] for t in trials})}, precision "
    f"{sorted({t['precision'] for t in trials if t['precision']})}; trials ran side by side: "
    f"{'yes' if overlap else 'no'}.",
    "",
    f"- Memory grid: {len(grid)} steps; the estimate's tensors over the measured peak furthest "
    f"from 1: {worst['ratio']:.3f} ({worst['model']}, {worst['base_dtype']}, batch "
    f"{worst['batch_size']} x {worst['max_length']}, checkpointing "
    f"{worst['gradient_checkpointing']}).",
    *(
        f"- Packing, {n} at once: {summary['packing'][str(n)]['finished']} of {len(p)} finished, "
        f"failed {summary['packing'][str(n)]['failed']}, trials' wall time "
        f"{summary['packing'][str(n)]['wall_s']:.0f} s, shares "
        f"{summary['packing'][str(n)]['gpu_shares']}, worst peak/estimate "
        f"{summary['packing'][str(n)]['worst_peak_over_estimate']}."
        for n, p in packing.items()
    ),
    f"- 2-worker trials: {len(workers)} trials, "
    f"{sum(t['status'] == 'FINISHED' for t in workers)} finished, each one run of "
    f"{sorted({t['workers'] for t in workers})} workers"
    if workers
    else "- 2-worker trials: not run (fewer than 2 GPUs).",
    "",
    "| trial | status | device | val | test | retained params | train s |",
    "|---|---|---|---|---|---|---|",
]
for index, t in enumerate(trials + workers):
    cells = [
        str(index),
        t["status"],
        str(t["device"]),
        *(f"{t[k]:.4f}" if t[k] is not None else "–" for k in ("val_score", "test_score")),
        f"{t['retained_params']:,.0f}" if t["retained_params"] is not None else "–",
        f"{t['train_time_s']:.0f}" if t["train_time_s"] is not None else "–",
    ]
    lines.append("| " + " | ".join(cells) + " |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "wrote $out/summary.json and $out/summary.md"
[[ $tests_status == 0 || $tests_status == 5 ]] || exit 1 # 5: no test ran (a dry run skips them)
