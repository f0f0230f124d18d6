"""Data: the default corpus, the token cache, packing, local tokenizers, synthetic tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zoo.train import RunConfigError
from zoo.train.config import DataSection
from zoo.train.data import (
    ByteTokenizer,
    PackedTextDataset,
    build_dataset,
    build_token_cache,
    default_corpus_files,
    expand_paths,
    load_tokenizer,
    stdlib_root,
    subset_by_size,
)
from zoo.train.synthetic import MQAR, InductionHeads, SelectiveCopying


def test_default_corpus_is_the_stdlib_source():
    files = default_corpus_files()
    root = stdlib_root()
    assert len(files) > 100 and files == sorted(files)
    assert root / "os.py" in files
    assert all(f.suffix == ".py" and root in f.parents for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_default_corpus_tokenises_deterministically(tmp_path):
    files = subset_by_size(default_corpus_files(), 200_000)
    assert files == subset_by_size(default_corpus_files(), 200_000)
    assert 0 < sum(f.stat().st_size for f in files) <= 200_000
    assert len({f.parent for f in files}) > 1  # a spread of the library, not one folder
    a = build_token_cache(files, ByteTokenizer(), 0.1, tmp_path / "a", progress=False)
    b = build_token_cache(files, ByteTokenizer(), 0.1, tmp_path / "b", progress=False)
    assert a.folder.name == b.folder.name  # the key depends on the inputs only
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert a.meta["train_documents"] > 0 and a.meta["val_documents"] > 0
    assert 0.05 < len(a.val) / len(a.tokens) < 0.2
    # The first document is a training document: its bytes, then the separator.
    first = files[0].read_bytes()
    assert bytes(np.asarray(a.train[: len(first)], dtype=np.uint8)) == first
    assert a.train[len(first)] == ByteTokenizer.eos_id
    # A second build reuses the cache instead of tokenising again.
    stamp = (a.folder / "tokens.bin").stat().st_mtime_ns
    again = build_token_cache(files, ByteTokenizer(), 0.1, tmp_path / "a", progress=False)
    assert again.folder == a.folder and (a.folder / "tokens.bin").stat().st_mtime_ns == stamp


def test_packed_sequences_cover_an_epoch_and_depend_only_on_position(tmp_path):
    files = subset_by_size(default_corpus_files(), 30_000)
    cache = build_token_cache(files, ByteTokenizer(), 0.1, tmp_path, progress=False)
    data = PackedTextDataset(cache, seq_len=32, seed=3, vocab_size=256)
    n = data.num_train
    ids, labels = data.train_batch(np.arange(n))
    assert torch.equal(ids, labels) and ids.shape == (n, 32)
    windows = torch.from_numpy(np.asarray(cache.train[: n * 32]).astype(np.int64)).view(n, 32)
    # One epoch visits every window exactly once, in a shuffled order.
    assert sorted(map(tuple, ids.tolist())) == sorted(map(tuple, windows.tolist()))
    assert not torch.equal(ids, windows)
    again = PackedTextDataset(cache, seq_len=32, seed=3, vocab_size=256)
    assert torch.equal(again.train_batch(np.array([n + 5, 7]))[0],
                       data.train_batch(np.array([n + 5, 7]))[0])


def test_paths_files_folders_and_globs(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha " * 50)
    (tmp_path / "docs" / "b.md").write_text("beta " * 50)
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "c.py").write_text("print('gamma')\n" * 20)
    assert [p.name for p in expand_paths([str(tmp_path / "docs")])] == ["a.txt", "b.md"]
    assert [p.name for p in expand_paths([str(tmp_path / "*.py")])] == ["c.py"]
    with pytest.raises(RunConfigError, match="data.paths entry .*nothing.*matches no file"):
        expand_paths([str(tmp_path / "nothing")])


def _tiny_bpe(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    text = ["def main():\n    return 42\n", "import os\nprint(os.getcwd())\n"] * 20
    tokenizer.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[UNK]", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tokenizer.get_vocab_size() > 256
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return tokenizer, path


def test_local_tokenizer_file_and_directory(tmp_path):
    from transformers import PreTrainedTokenizerFast

    raw, path = _tiny_bpe(tmp_path)
    from_file = load_tokenizer(str(path))
    folder = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>").save_pretrained(folder)
    from_dir = load_tokenizer(str(folder))
    text = "def main():\n    print(42)\n"
    assert from_file.encode(text) == from_dir.encode(text) == raw.encode(text).ids
    assert from_dir.eos_id == raw.token_to_id("</s>")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"f{i}.py").write_text(f"def f{i}():\n    return {i}\n" * 30)
    data = DataSection(paths=[str(corpus)], tokenizer=str(folder), cache_dir=str(tmp_path / "c"),
                       val_fraction=0.2)
    with pytest.raises(RunConfigError, match="set model.overrides.vocab_size="):
        build_dataset(data, seq_len=16, seed=0, model_vocab_size=256, progress=False)
    dataset, tokenizer = build_dataset(data, seq_len=16, seed=0, model_vocab_size=512,
                                       progress=False)
    ids, _ = dataset.train_batch(np.arange(2))
    assert int(ids.max()) < tokenizer.vocab_size and "def" in tokenizer.decode(ids[0].tolist())
    with pytest.raises(RunConfigError, match="data.tokenizer='/no/such'"):
        load_tokenizer("/no/such")


def _answers(labels):
    return labels[labels != -100]


@pytest.mark.parametrize("query_gap_power", [1.0, 0.01])
def test_mqar_answers_are_the_values_of_the_queried_keys(query_gap_power):
    task = MQAR(vocab_size=32, seq_len=40, seed=0, num_kv_pairs=5,
                query_gap_power=query_gap_power)
    ids, labels = task.train_batch(np.arange(8))
    for row, lab in zip(ids.tolist(), labels):
        pairs = dict(zip(row[0:10:2], row[1:10:2]))
        assert all(1 <= k < 16 for k in pairs) and all(16 <= v < 32 for v in pairs.values())
        answer_at = (lab != -100).nonzero().flatten().tolist()
        assert len(answer_at) == 5 and min(answer_at) > 10
        assert sorted(row[t - 1] for t in answer_at) == sorted(pairs)
        assert all(row[t] == pairs[row[t - 1]] for t in answer_at)
    assert torch.equal(task.train_batch(np.arange(8))[0], ids)  # a pure function of position
    assert not torch.equal(task.val_batch(np.arange(8))[0], ids)  # validation is another stream


def _query_slots(task, samples):
    """The slot (pair of positions after the context) of every query in `samples` sequences."""
    _, labels = task.train_batch(np.arange(samples))
    answer_at = (labels != -100).nonzero()[:, 1]
    return ((answer_at - 1 - 2 * task.num_kv_pairs) // 2).numpy()


def test_mqar_query_gaps_follow_zoologys_power_law():
    # zoology's power_a = 0.01: P(slot i) ~ (i + 1)^-0.99, so queries crowd the first slots
    # after the context; 1.0 (the default) spreads them evenly over the 28 slots.
    zoology = MQAR(vocab_size=64, seq_len=64, seed=0, num_kv_pairs=4, query_gap_power=0.01)
    uniform = MQAR(vocab_size=64, seq_len=64, seed=0, num_kv_pairs=4)
    first_quarter = 28 // 4
    crowded = (_query_slots(zoology, 400) < first_quarter).mean()
    spread = (_query_slots(uniform, 400) < first_quarter).mean()
    assert crowded > 0.45 and 0.2 < spread < 0.3, (crowded, spread)
    assert set(_query_slots(zoology, 400)) <= set(range(28))
    with pytest.raises(RunConfigError, match="MQAR query_gap_power=0 must be in"):
        MQAR(vocab_size=64, seq_len=64, seed=0, num_kv_pairs=4, query_gap_power=0)


def test_selective_copying_answers_are_the_scattered_tokens_in_order():
    task = SelectiveCopying(vocab_size=16, seq_len=30, seed=1, num_tokens=4)
    ids, labels = task.train_batch(np.arange(6))
    for row, lab in zip(ids.tolist(), labels):
        region = row[: 30 - 5]
        data = [t for t in region if t != SelectiveCopying.BLANK]
        assert len(data) == 4 and row[25] == SelectiveCopying.SEPARATOR
        assert row[26:] == data and _answers(lab).tolist() == data


def test_induction_heads_answer_follows_the_first_trigger():
    task = InductionHeads(vocab_size=10, seq_len=24, seed=2)
    ids, labels = task.train_batch(np.arange(6))
    for row, lab in zip(ids.tolist(), labels):
        triggers = [t for t, tok in enumerate(row) if tok == InductionHeads.TRIGGER]
        assert len(triggers) == 2 and triggers[1] == 22
        assert _answers(lab).tolist() == [row[triggers[0] + 1]] == [row[23]]


def test_synthetic_settings_that_cannot_fit_are_named():
    with pytest.raises(RunConfigError, match="train.seq_len=16 is too short for "
                                             "data.num_kv_pairs=8"):
        MQAR(vocab_size=64, seq_len=16, seed=0, num_kv_pairs=8)
    with pytest.raises(RunConfigError, match="data.num_kv_pairs=40"):
        MQAR(vocab_size=64, seq_len=400, seed=0, num_kv_pairs=40)
    with pytest.raises(RunConfigError, match="data.vocab_size=512 exceeds"):
        build_dataset(DataSection(source="mqar", vocab_size=512), 64, 0, 256)
