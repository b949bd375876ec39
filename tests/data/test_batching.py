import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from sora_tune.data import (
    EpochSampler,
    make_dataloader,
    padding_ratio,
    shard_loader,
    tokenize_splits,
)
from sora_tune.data import batching as batching_module

MAX_LENGTH = 20  # truncates a few of the longest pairs
SENTENCE = "the quick brown fox jumps over a lazy dog while seven tired cats watch"


def _splits(n: int = 160, regression: bool = False) -> DatasetDict:
    """Sentence pairs of 2 to 19 words, so token lengths vary from row to row.

    160 rows make 4 length-grouping mega-batches of 5 x 8 rows in the sampler.
    """
    words = SENTENCE.split()
    rng = np.random.default_rng(0)
    first = [" ".join(words[: 1 + i % len(words)]) for i in range(n)]
    second = [" ".join(rng.permutation(words)[: 1 + i % 5]) for i in range(n)]
    labels = np.linspace(0, 5, n).tolist() if regression else [i % 2 for i in range(n)]
    data = Dataset.from_dict({"sentence1": first, "sentence2": second, "label": labels})
    return DatasetDict(train=data, test=data.select(range(8)))


@pytest.fixture
def tokenized(tokenizer, tmp_path) -> DatasetDict:
    return tokenize_splits(_splits(), "mrpc", tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path)


# --- tokenize_splits ------------------------------------------------------------------------


def test_tokenize_adds_model_columns_without_padding(tokenized):
    train = tokenized["train"]
    assert train.column_names == ["input_ids", "token_type_ids", "attention_mask", "labels"]
    lengths = [len(ids) for ids in train["input_ids"]]
    assert max(lengths) == MAX_LENGTH  # truncated
    assert min(lengths) < 8  # not padded
    assert all(sum(mask) == len(mask) for mask in train["attention_mask"])
    assert train.features["labels"].dtype == "int64"
    assert train["labels"][:4] == [0, 1, 0, 1]


def test_tokenize_regression_labels_are_float32(tokenizer, tmp_path):
    splits = tokenize_splits(_splits(regression=True), "stsb", tokenizer, cache_dir=tmp_path)
    assert splits["train"].features["labels"].dtype == "float32"
    assert splits["train"]["labels"][-1] == pytest.approx(5.0)
    batch = next(iter(make_dataloader(splits["train"], tokenizer, batch_size=4, shuffle=False)))
    assert batch["labels"].dtype == torch.float32


def test_tokenize_cache_is_reused(tokenizer, tmp_path, monkeypatch):
    first = tokenize_splits(_splits(), "mrpc", tokenizer, max_length=16, cache_dir=tmp_path)
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert [name.rsplit("-", 1)[0] for name in entries] == ["mrpc-test", "mrpc-train"]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cached splits were tokenized again")

    monkeypatch.setattr(type(tokenizer), "__call__", no_tokenizing)
    again = tokenize_splits(_splits(), "mrpc", tokenizer, max_length=16, cache_dir=tmp_path)
    for name in ("train", "test"):
        assert again[name]._fingerprint == first[name]._fingerprint
        assert again[name].to_dict() == first[name].to_dict()
        cache_file = again[name].cache_files[0]["filename"]
        assert cache_file.startswith(str(tmp_path / f"mrpc-{name}-"))
    assert sorted(p.name for p in tmp_path.iterdir()) == entries  # nothing written


@pytest.mark.parametrize(
    "change",
    ["max_length", "content", "task"],
)
def test_tokenize_cache_key_changes_with_inputs(tokenizer, tmp_path, change):
    tokenize_splits(_splits(), "mrpc", tokenizer, max_length=16, cache_dir=tmp_path)
    splits, task, max_length = _splits(), "mrpc", 16
    if change == "max_length":
        max_length = 8
    elif change == "content":
        splits["test"] = splits["train"].select(range(1, 9))
    else:
        task = "rte"
    tokenize_splits(splits, task, tokenizer, max_length=max_length, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == (3 if change == "content" else 4)


def test_tokenize_cache_dir_from_environment(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv(batching_module.CACHE_ENV, str(tmp_path / "env-cache"))
    tokenize_splits(_splits(), "mrpc", tokenizer)
    assert len(list((tmp_path / "env-cache").iterdir())) == 2


def test_crashed_writer_leaves_no_cache_entry(tokenizer, tmp_path, monkeypatch):
    def crash(self, path, **kwargs):
        (tmp_path / "partial").mkdir(exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(Dataset, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        tokenize_splits(_splits(), "mrpc", tokenizer, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["partial"]  # no entry, no temporary folder
    monkeypatch.undo()
    tokenize_splits(_splits(), "mrpc", tokenizer, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("mrpc-*"))) == 2


def test_tokenize_rejects_bad_input(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="max_length"):
        tokenize_splits(_splits(), "mrpc", tokenizer, max_length=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"'train' lacks column\(s\) \['question', 'sentence'\]"):
        tokenize_splits(_splits(), "qnli", tokenizer, cache_dir=tmp_path)


# --- make_dataloader ------------------------------------------------------------------------


def _order(loader) -> list[list[int]]:
    return [batch["input_ids"][:, 1].tolist() + batch["labels"].tolist() for batch in loader]


def test_batches_are_padded_to_their_longest_row(tokenized, tokenizer):
    loader = make_dataloader(tokenized["train"], tokenizer, batch_size=8, shuffle=False)
    batches = list(loader)
    assert len(batches) == 20
    widths = set()
    for batch in batches:
        assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
        width = batch["input_ids"].shape[1]
        assert batch["attention_mask"].sum(dim=1).max() == width
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
        widths.add(width)
    assert len(widths) > 1
    assert torch.cat([b["labels"] for b in batches]).tolist() == tokenized["train"]["labels"]


def test_shuffle_is_deterministic_per_seed_and_epoch(tokenized, tokenizer):
    def loader(seed: int):
        return make_dataloader(tokenized["train"], tokenizer, batch_size=8, shuffle=True, seed=seed)

    first, same, other = loader(1), loader(1), loader(2)
    assert _order(first) == _order(same)
    assert _order(first) != _order(other)
    epoch0 = _order(first)
    first.sampler.set_epoch(1)
    same.sampler.set_epoch(1)
    assert _order(first) == _order(same) != epoch0


def test_group_by_length_yields_every_row_in_similar_length_batches(tokenized, tokenizer):
    train = tokenized["train"]

    def batch_lengths(group_by_length: bool) -> list[torch.Tensor]:
        loader = make_dataloader(
            train, tokenizer, batch_size=8, shuffle=True, group_by_length=group_by_length
        )
        return [batch["attention_mask"].sum(dim=1) for batch in loader]

    def median_spread(batches: list[torch.Tensor]) -> float:
        return float(np.median([(lengths.max() - lengths.min()).item() for lengths in batches]))

    grouped = batch_lengths(True)
    assert sorted(torch.cat(grouped).tolist()) == sorted(len(ids) for ids in train["input_ids"])
    assert median_spread(grouped) < median_spread(batch_lengths(False)) / 2


def test_eval_order_grouped_by_length_is_longest_first(tokenized, tokenizer):
    loader = make_dataloader(
        tokenized["train"], tokenizer, batch_size=8, shuffle=False, group_by_length=True
    )
    lengths = [n for batch in loader for n in batch["attention_mask"].sum(dim=1).tolist()]
    assert lengths == sorted(lengths, reverse=True)


def test_dataloader_rejects_bad_input(tokenized, tokenizer):
    with pytest.raises(ValueError, match="batch_size"):
        make_dataloader(tokenized["train"], tokenizer, batch_size=0, shuffle=False)
    with pytest.raises(ValueError, match="tokenize_splits"):
        make_dataloader(_splits()["train"], tokenizer, batch_size=4, shuffle=False)


# --- padding_ratio --------------------------------------------------------------------------


@pytest.mark.parametrize(("shuffle", "group_by_length"), [(False, False), (True, True)])
def test_padding_ratio_matches_the_loader(tokenized, tokenizer, shuffle, group_by_length):
    options = {"shuffle": shuffle, "seed": 4, "group_by_length": group_by_length}
    loader = make_dataloader(tokenized["train"], tokenizer, batch_size=8, **options)
    masks = [batch["attention_mask"] for batch in loader]
    measured = 1 - sum(m.sum().item() for m in masks) / sum(m.numel() for m in masks)
    assert padding_ratio(tokenized["train"], 8, **options) == pytest.approx(measured)


def test_dynamic_padding_beats_padding_to_max_length(tokenized):
    train = tokenized["train"]
    to_max = padding_ratio(train, 8, pad_to=MAX_LENGTH)
    dynamic = padding_ratio(train, 8, shuffle=True)
    grouped = padding_ratio(train, 8, shuffle=True, group_by_length=True)
    assert grouped < dynamic < to_max
    lengths = np.array([len(ids) for ids in train["input_ids"]])
    assert to_max == pytest.approx(1 - lengths.sum() / (MAX_LENGTH * len(lengths)))


def test_padding_ratio_checks_pad_to(tokenized):
    with pytest.raises(ValueError, match="pad_to=8 is shorter than the longest row \\(20\\)"):
        padding_ratio(tokenized["train"], 8, pad_to=8)


def test_padding_ratio_of_hand_made_lengths():
    split = Dataset.from_dict({"input_ids": [[1] * 2, [1] * 4, [1] * 3, [1] * 3]})
    # Batches [2, 4] and [3, 3]: 8 + 6 = 14 slots for 12 tokens.
    assert padding_ratio(split, 2) == pytest.approx(2 / 14)


def test_epoch_sampler_without_shuffle_keeps_order():
    assert list(EpochSampler([3, 1, 2], 2, shuffle=False)) == [0, 1, 2]


# --- shard_loader (a trial's data-parallel workers) ------------------------------------------


def _rows(batch: dict[str, torch.Tensor]) -> list[tuple[tuple[int, ...], int]]:
    """A batch's rows without their padding: (token ids, label), in order."""
    if not batch:  # a worker's empty share of a short last batch
        return []
    return [
        (tuple(ids[mask.bool()].tolist()), int(label))
        for ids, mask, label in zip(
            batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True
        )
    ]


def test_worker_shards_are_the_one_process_batches_row_for_row(tmp_path, tokenizer):
    """An own CSV with quotes, tabs, "NA" and unicode, read and tokenised as a trial reads it:
    the workers' slices of each training batch, put together, are that batch, row for row and
    label for label; their whole evaluation batches, interleaved, are the one-process batches;
    and an epoch of training batches is every training row once."""
    import csv

    from sora_tune.config import TrialConfig
    from sora_tune.train import prepare_data

    texts = [
        'She said "fine", then left.',
        "tab\tinside a cell",
        "NA",
        "naïve café — 東京 🙂",
        "None of the above",
        "plain words here",
        'quote " alone',
        "null",
    ]
    path = tmp_path / "rows.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(40):
            writer.writerow([f"{texts[i % len(texts)]} {i}", "yes" if i % 3 else "no"])
    config = TrialConfig(train_file=str(path), val_size=8, max_length=32, cache_dir=str(tmp_path))
    data = prepare_data(config, tokenizer)
    train = make_dataloader(data["train"], tokenizer, batch_size=5, shuffle=True, seed=3)
    val = make_dataloader(data["val"], tokenizer, batch_size=3, shuffle=False)
    one_process = [_rows(batch) for batch in train]
    expected = sorted(
        (tuple(ids), label)
        for ids, label in zip(data["train"]["input_ids"], data["train"]["labels"], strict=True)
    )
    assert sorted(row for batch in one_process for row in batch) == expected
    for workers in (2, 3, 4):
        shards = [shard_loader(train, rank, workers) for rank in range(workers)]
        for batch, *parts in zip(one_process, *shards, strict=True):
            assert [row for part in parts for row in _rows(part)] == batch
        scored = [
            list(shard_loader(val, rank, workers, whole_batches=True)) for rank in range(workers)
        ]
        interleaved = [scored[i % workers][i // workers] for i in range(len(val))]
        assert [_rows(b) for b in interleaved] == [_rows(b) for b in val]
