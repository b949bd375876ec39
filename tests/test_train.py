import contextlib
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from sora_tune.train import REPORT_KEYS, TrialConfig, latest_checkpoint, lr_lambda, train_trial
from tests.conftest import stop_after


def test_short_run_learns_and_reports_every_key(tiny_trial, tmp_path):
    # STS-B: a regression's loss falls visibly on the tiny model, where MRPC's stays at log 2.
    reports = []
    result = train_trial(
        tiny_trial | {"epochs": 4, "task": "stsb"},
        report=lambda m, c: reports.append((m, c)),
        output_dir=tmp_path / "run",
    )
    assert len(reports) == 4
    for metrics, checkpoint in reports:
        assert set(REPORT_KEYS) <= set(metrics)
        assert {"val_pearson", "val_spearman", "test_pearson", "test_spearman"} <= set(metrics)
        assert checkpoint.startswith(str(tmp_path / "run"))
    losses = [m["train_loss"] for m, _ in reports]
    assert losses[-1] < losses[0]
    assert result["status"] == "finished"
    assert [m["epoch"] for m, _ in reports] == [m["evaluation"] for m, _ in reports] == [1, 2, 3, 4]
    assert result["retained_params"] == reports[-1][0]["retained_params"] > 0
    assert sum(result["rank_pattern"].values()) == result["nonzero_rank"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epoch"] == 4
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    last = reports[-1][0]["step"]
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == [f"checkpoint-step{last}"]


def test_resume_equals_uninterrupted(tiny_trial, tmp_path):
    full = train_trial(tiny_trial, output_dir=tmp_path / "full")

    class Stop(Exception):
        pass

    def stop_after_first_epoch(metrics, checkpoint):
        if metrics["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        train_trial(tiny_trial, report=stop_after_first_epoch, output_dir=tmp_path / "resumed")
    resumed = train_trial(tiny_trial, output_dir=tmp_path / "resumed")
    for key in ("train_loss", "val_score", "test_score", "retained_params", "nonzero_rank"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-6, abs=1e-9), key
    assert resumed["rank_pattern"] == full["rank_pattern"]


def test_stsb_regression(tiny_trial, tmp_path):
    result = train_trial(tiny_trial | {"task": "stsb", "epochs": 1}, output_dir=tmp_path)
    assert {"val_pearson", "val_spearman"} <= set(result)
    assert result["val_score"] == result["val_pearson"]


def test_evaluations_in_steps_resume_inside_an_epoch_as_if_never_stopped(tiny_trial, tmp_path):
    """eval_steps scores, checkpoints and reports inside an epoch; a trial stopped there goes on
    with that epoch's data order where it stopped, and ends as an uninterrupted one."""
    settings = tiny_trial | {"eval_steps": 2, "epochs": 2}
    reports = []
    full = train_trial(settings, report=lambda m, c: reports.append(m), output_dir=tmp_path / "a")
    per_epoch = reports[-1]["step"] // 2
    assert per_epoch % 2 == 1, "the tiny data should give an odd number of steps per epoch"
    steps = [m["step"] for m in reports]
    assert steps == sorted({*range(2, 2 * per_epoch + 1, 2), 2 * per_epoch})
    assert reports[0]["epoch"] == 2 / per_epoch

    class Stop(Exception):
        pass

    def stop_inside_the_second_epoch(metrics, checkpoint):
        if per_epoch < metrics["step"] < 2 * per_epoch:
            raise Stop

    with pytest.raises(Stop):
        train_trial(settings, report=stop_inside_the_second_epoch, output_dir=tmp_path / "b")
    resumed = train_trial(settings, output_dir=tmp_path / "b")
    assert [m["step"] for m in resumed["history"]] == steps
    for key in ("train_loss", "val_score", "test_score", "retained_params"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-6, abs=1e-9), key


def test_a_trace_with_stages_in_steps_leaves_an_adapter_per_stage(tiny_trial, tmp_path):
    settings = tiny_trial | {
        "epochs": 2,
        "lr": 2e-2,
        "xi_schedule": "linear",
        "xi_total": 0.0,
        "xi_max": 0.9,
        "xi_stages": 3,
        "xi_every_steps": 2,
        "dense_steps": 3,
    }
    result = train_trial(settings, output_dir=tmp_path)
    ends = [(m["step"], m["stage"]) for m in result["history"] if m["stage_end"]]
    total = result["history"][-1]["step"]
    assert ends == [(3, 0), (5, 1), (total, 2)]
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == [
        "stage-0", "stage-1", "stage-2"
    ]  # fmt: skip
    # Every stage end is scored, besides the epochs' ends.
    assert {3, 5} <= {m["step"] for m in result["history"]}


def test_stages_in_steps_that_the_epochs_never_reach_are_refused(tiny_trial, tmp_path):
    settings = tiny_trial | {
        "epochs": 1,
        "xi_schedule": "linear",
        "xi_total": 0.0,
        "xi_max": 0.9,
        "xi_stages": 3,
        "xi_every_steps": 1000,
    }
    with pytest.raises(ValueError, match="the xi schedule needs 3000 steps"):
        train_trial(settings, output_dir=tmp_path)


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_baselines_run_and_export_a_peft_adapter(tiny_trial, tiny_model_dir, method, tmp_path):
    result = train_trial(tiny_trial | {"method": method, "epochs": 1}, output_dir=tmp_path)
    assert result["status"] == "finished"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    assert isinstance(PeftModel.from_pretrained(base, tmp_path / "adapter"), PeftModel)
    if method == "lora":
        assert result["retained_params"] == 4 * 2 * (4 * 64 + 96 + 96)


def test_exported_adapter_reproduces_the_trial_scores(tiny_trial, tiny_model_dir, tmp_path):
    from sora_tune.data import make_dataloader
    from sora_tune.models import load_tokenizer
    from sora_tune.train import TrialConfig, evaluate, prepare_data

    result = train_trial(tiny_trial | {"epochs": 2}, output_dir=tmp_path)
    config = TrialConfig.from_dict(tiny_trial)
    tokenizer = load_tokenizer(config)
    data = prepare_data(config, tokenizer)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    loader = make_dataloader(data["test"], tokenizer, batch_size=16, shuffle=False)
    assert evaluate(model, loader, "mrpc", torch.device("cpu"))["score"] == pytest.approx(
        result["test_score"]
    )


def test_divergence_stops_with_a_status(tiny_trial, tmp_path):
    result = train_trial(tiny_trial | {"lr": 1e30, "epochs": 3}, output_dir=tmp_path)
    assert result["status"] == "diverged"
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"task": "imdb"}, "Unknown GLUE task"),
        ({"method": "dora"}, "method must be"),
        ({"gate_mode": "paper", "xi": 1e-4}, "xi is derived"),
        ({"lam": -0.1}, "lam must be"),
        ({"r_max": 0}, "r_max must be"),
        ({"xi_schedule": "linear"}, "xi_max must be"),
        ({"epochs": 0}, "epochs must be"),
        ({"learning_rate": 1e-3}, "unknown trial parameter"),
    ],
)
def test_bad_trial_config_is_refused_before_any_work(values, message):
    with pytest.raises(ValueError, match=message):
        TrialConfig.from_dict(values)


def three_stages(**settings) -> TrialConfig:
    """4 epochs: 2 dense, then 2 stages of 1 epoch with ξ rising."""
    schedule = {"xi_schedule": "linear", "xi": 1e-5, "xi_max": 1e-4, "xi_stages": 3}
    return TrialConfig(epochs=4, dense_epochs=2, **schedule, **settings)


def test_lr_schedule_restarts_at_every_xi_stage():
    config = three_stages(warmup_ratio=0.0)
    factor = lr_lambda(config, steps_per_epoch=10)
    # stage 0: epochs 0-1 (steps 0-19), stage 1: epoch 2, stage 2: epoch 3
    assert factor(0) == pytest.approx(1.0)
    assert factor(19) == pytest.approx(1 / 19)  # decays over the 19 steps after warm-up
    assert factor(20) == pytest.approx(1.0)  # restarted, not decayed to zero
    assert factor(30) == pytest.approx(1.0)
    assert factor(39) == pytest.approx(1 / 9)


def test_lr_schedule_continues_through_the_stages_with_stage_lr_continue():
    config = three_stages(warmup_ratio=0.1, stage_lr="continue")
    factor = lr_lambda(config, steps_per_epoch=10)
    # one warm-up over 4 of the 40 steps, then one decay to 0 at the trial's end
    assert [factor(step) for step in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factor(20) == pytest.approx(20 / 36)  # stage 1 starts where stage 0 left off
    assert factor(30) == pytest.approx(10 / 36)
    assert factor(39) == pytest.approx(1 / 36)


# 40 training rows in batches of 8 over 6 epochs: 30 steps. AdaLoRA's budget is final from step
# 24 (tfinal = 20% of the steps): a stop after epoch 5 resumes with the pattern fixed, one after
# epoch 2 while it still allocates.
@pytest.mark.parametrize("stop_epoch", [2, 5])
def test_adalora_resume_equals_uninterrupted(tiny_trial, tmp_path, stop_epoch):
    trial = tiny_trial | {"method": "adalora", "epochs": 6, "lr": 2e-2}
    full = train_trial(trial, output_dir=tmp_path / "full")
    Stop, report = stop_after(stop_epoch)
    with pytest.raises(Stop):
        train_trial(trial, report=report, output_dir=tmp_path / "resumed")
    resumed = train_trial(trial, output_dir=tmp_path / "resumed")
    assert resumed["rank_pattern"] == full["rank_pattern"]
    assert resumed["retained_params"] == full["retained_params"] < 4 * 2 * (4 * 64 + 96 + 96)
    for key in ("train_loss", "val_score", "test_score"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("method", ["sora", "lora", "adalora"])
def test_exported_adapter_has_the_trained_models_logits(
    tiny_trial, tiny_model_dir, method, tmp_path
):
    """The adapter PEFT loads from `adapter/` computes what the trained model computed: the
    trained tensors are in the last checkpoint."""
    from sora_tune.models import build_model, load_tokenizer
    from sora_tune.sora import load_adapter

    trial = tiny_trial | {"method": method, "epochs": 3, "lr": 2e-2, "xi": 0.05}
    if method != "sora":
        trial.pop("xi")
    result = train_trial(trial, output_dir=tmp_path)
    config = TrialConfig.from_dict(trial)
    trained = build_model(config, total_steps=15).eval()
    load_adapter(trained, latest_checkpoint(tmp_path) / "adapter.safetensors")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    exported = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = load_tokenizer(config)(
        ["red blue green", "small large quick slow"], ["red blue green", "dark"],
        padding=True, return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        expected, got = trained(**batch).logits, exported(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    if method != "lora":
        assert sum(result["rank_pattern"].values()) < 12 * 4, "something was pruned"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes_on_the_cpu(tiny_trial, tmp_path, precision):
    trial = tiny_trial | {"precision": precision, "epochs": 2}
    full = train_trial(trial, output_dir=tmp_path / "full")
    assert full["status"] == "finished" and full["precision"] == precision
    Stop, report = stop_after(1)
    with pytest.raises(Stop):
        train_trial(trial, report=report, output_dir=tmp_path / "resumed")
    resumed = train_trial(trial, output_dir=tmp_path / "resumed")
    for key in ("train_loss", "val_score", "retained_params"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-6, abs=1e-9), key
    state = torch.load(latest_checkpoint(tmp_path / "full") / "trainer_state.pt", weights_only=True)
    assert bool(state["scaler"]) == (precision == "fp16")  # the loss scale is checkpointed


def test_auto_precision_is_fp32_on_the_cpu(tiny_trial, tmp_path):
    from sora_tune.train import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
    result = train_trial(tiny_trial | {"epochs": 1}, output_dir=tmp_path)
    assert result["precision"] == "fp32"


def test_official_gate_lr_follows_the_lr_schedule(tiny_trial):
    """The gates' AdamW learning rate is lr (or eta), warmed up and decayed with lr's schedule;
    paper mode's η stays constant."""
    from sora_tune.models import build_model
    from sora_tune.train import configure_optimization

    def lrs(values, steps=12):
        config = TrialConfig.from_dict(tiny_trial | {"warmup_ratio": 0.25} | values)
        model = build_model(config, total_steps=steps)
        optimization = configure_optimization(
            model, config, steps_per_epoch=4, device=torch.device("cpu"), precision="fp32"
        )
        seen = []
        for _ in range(steps):
            gate_lr = optimization.gate_optimizer.param_groups[0]["lr"]
            seen.append((optimization.adamw.param_groups[0]["lr"], gate_lr))
            for scheduler in optimization.schedulers:
                scheduler.step()
        return seen

    default = lrs({"lr": 1e-3})
    assert [gate for _, gate in default] == pytest.approx([lr for lr, _ in default])
    assert default[0][0] < default[2][0] and default[-1][0] < default[4][0]  # warm-up, decay
    own = lrs({"lr": 1e-3, "eta": 1e-2})
    assert [gate for _, gate in own] == pytest.approx([10 * lr for lr, _ in own])
    paper = lrs({"lr": 1e-3, "gate_mode": "paper", "eta": 0.1})
    assert {gate for _, gate in paper} == {0.1}


@pytest.mark.parametrize("native, expected", [(False, "fp32"), (True, "bf16")])
def test_auto_precision_counts_only_native_bf16(native, expected, monkeypatch):
    """A T4 or V100 emulates bf16, slowly: `auto` gives it fp32; an Ampere GPU gets bf16. The
    capability query is stubbed, so this runs without a GPU (tests/test_gpu.py asks a real one)."""
    from sora_tune.train import resolve_precision

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or including_emulation  # every CUDA GPU emulates bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    assert resolve_precision("auto", torch.device("cuda:0")) == expected
    assert resolve_precision("bf16", torch.device("cuda:0")) == "bf16"  # asked for: as asked
