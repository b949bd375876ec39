"""`sora_tune.experiments.measure_speed`: a trial's speed, as a budget is sized from it."""

import pytest
import torch

from sora_tune.config import TrialConfig
from sora_tune.experiments import measure_speed
from sora_tune.train import prepare_data


@pytest.mark.parametrize("method", ["sora", "lora"])
def test_a_trial_is_timed_as_it_trains(tiny_trial, method):
    torch.set_num_threads(1)
    config = TrialConfig.from_dict(tiny_trial | {"method": method})
    data = prepare_data(config)
    speed = measure_speed(config, data, steps=2, warmup=1, device="cpu")
    assert speed.step_s > 0 and speed.eval_row_s > 0 and speed.setup_s > 0
    # The trial's own batches: its training split at its batch size, and every row it scores.
    assert speed.steps_per_epoch == -(-len(data["train"]) // config.batch_size)
    assert speed.eval_rows == len(data["train_eval"]) + len(data["val"]) + len(data["test"])
