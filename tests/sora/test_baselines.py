import torch

from sora_tune.sora import (
    SoRAConfig,
    add_adalora,
    add_sora,
    after_optimizer_step,
    head_params,
    lora_config,
    rank_pattern,
    retained_params,
    sora_layers,
)
from tests.sora.test_model import BERT_LAYER_LINEARS


def test_lora_baseline_is_the_same_layer_with_a_fixed_unit_gate(tiny_model):
    config = lora_config(SoRAConfig(r_max=4))
    add_sora(tiny_model, config)
    layers = sora_layers(tiny_model).values()
    assert all(
        torch.equal(m.sora_gate, torch.ones(4)) and not m.sora_gate.requires_grad for m in layers
    )
    # 2 layers × (3 × (32+32) attention q/k/v + 32+32 output + 32+64 + 64+32 FFN) × r 4
    assert retained_params(tiny_model) == 4 * 2 * (4 * 64 + 96 + 96)


def test_adalora_allocates_its_budget_when_the_harness_steps_it(tiny_model, minilm_batch):
    total_steps = 40
    model = add_adalora(tiny_model, SoRAConfig(r_max=6), total_steps=total_steps, target_r=2)
    assert set(rank_pattern(model)) == {
        f"bert.encoder.layer.{i}.{name}" for i in range(2) for name in BERT_LAYER_LINEARS
    }
    # AdaLoRA starts its singular values E at zero: nothing is retained before training.
    assert sum(rank_pattern(model).values()) == 0
    assert head_params(model) == (32 * 2 + 2) + (32 * 32 + 32)  # classifier + pooler
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 1, 0, 1])
    for step in range(total_steps):
        loss = model(**minilm_batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        after_optimizer_step(model, step)
        optimizer.zero_grad()
        if step == 0:
            assert sum(rank_pattern(model).values()) == 12 * 6  # dense during tinit
    assert 0 < sum(rank_pattern(model).values()) <= 12 * 2  # the target budget
