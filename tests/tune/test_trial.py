"""A trial's device: what Ray assigned it, never what the node merely has."""

import pytest

from sora_tune.tune.trial import trial_device


@pytest.mark.parametrize(
    "gpu_ids, visible, device",
    [
        ([], None, "cpu"),
        ([], "0,1", "cpu"),  # a GPU node: Ray no longer hides its GPUs from 0-GPU trials
        (["1"], "1", "cuda:0"),  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU
        (["3", "1"], "3,1", "cuda:0"),
        (["1"], "0,1", "cuda:1"),  # two trials at 0.5 each may see both
        ([2], None, "cuda:2"),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: ids as is
    ],
)
def test_trial_device(gpu_ids, visible, device):
    assert trial_device(gpu_ids, visible) == device


def test_an_unlisted_gpu_name_is_an_error():
    with pytest.raises(RuntimeError, match="does not list"):
        trial_device(["GPU-8f2c"], "0")
