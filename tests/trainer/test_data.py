"""Parallel JSONL validation, grouping, truncation and the token cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import trainer_core.data as data
from trainer_core.config import TrainConfig
from trainer_core.data import DataError, build_samples, epoch_batches, load_or_tokenize, rank_batches, validate_file


def write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    ('{"branches": []}', "'branches' is empty"),
    ('{"branches": ["ok", 3]}', "branch 2 must be a string"),
    ('{"main": 1, "branches": ["x"]}', "'main' must be a string, got a number"),   # JSON's words, not Python's
    ('{"text": null}', "'text' must be a string, got null"),
    ('{"text": ""}', "'text' is empty"),
    ('{"label": "x"}', "no 'main'/'branches' or 'text' key"),
    ('["a"]', "expected a JSON object, got a list"),
    ('{"main": "", "branches": ["", " "]}', "no text at all"),
    ('{"main": "x", "branches": ["", ""]}', "branches are all empty"),
    ('{"main": "x", "branches": ["a", ""]}', "branch 2 is empty"),
    ('{"main": "x", "branches": ["a", "b", " "]}', "branch 3 is only whitespace"),
    # the column is where the line ends, not past its newline (column 1 of the next line)
    ('{"main": "x", "branches": ["a"]', "not valid JSON (Expecting ',' delimiter at column 32)"),
    ('{"main": "x", "branches": ["a', "not valid JSON (Unterminated string starting at column 28)"),   # not "at at"
])
def test_bad_line_is_reported_with_file_and_line(tmp_path, bad_line, message):
    f = write(tmp_path / "d.jsonl", [{"text": "fine"}, {"main": "m", "branches": ["b"]}, bad_line, {"text": "ok"}])
    with pytest.raises(DataError) as e:
        validate_file(f)
    assert e.value.lines[0].startswith(f"{f}:3: ") and message in e.value.lines[0]


def test_every_bad_line_is_listed_and_empty_file_rejected(tmp_path):
    f = write(tmp_path / "d.jsonl", ["{", {"text": "ok"}, "[]"])
    with pytest.raises(DataError) as e:
        validate_file(f)
    # a first line "{" or "[...": a pretty-printed document, of which every line is an error; said first
    assert e.value.lines[0].startswith(f"{f}: one JSON document over many lines (it starts with '{{')")
    assert [ln.split(": ")[0] for ln in e.value.lines[1:]] == [f"{f}:1", f"{f}:3"]
    array = write(tmp_path / "array.json", ["[", {"text": "ok"}, "]"])
    with pytest.raises(DataError, match="starts with '\\['.*one JSON object per line"):
        validate_file(array)
    with pytest.raises(DataError) as e:   # a JSONL file with a bad line is no JSON document
        validate_file(write(tmp_path / "one_bad.jsonl", [{"text": "ok"}, "{"]))
    assert len(e.value.lines) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="empty file"):
        validate_file(empty)
    (tmp_path / "bin.jsonl").write_bytes(b'{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="bin.jsonl:1: not UTF-8"):
        validate_file(tmp_path / "bin.jsonl")


def test_bom_and_crlf_are_read_and_extra_keys_warned_about(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "a", "id": 1}\r\n{"text": "b"}\r\n'
                  b'{"main": "m", "branches": ["c"], "src": 2}\r\n')
    warnings = []
    assert validate_file(f, warnings=warnings) == 3
    assert warnings == [f"{f}: 2 records have keys paratrain ignores: id, src (first on line 1)"]
    # a BOM is the file's mark, not a line's: elsewhere it is still an error; CRLF does not shift columns
    f.write_bytes(b'{"text": "a"}\r\n\xef\xbb\xbf{"text": "b"}\r\n{"text": "c"\r\n')
    with pytest.raises(DataError) as e:
        validate_file(f)
    assert e.value.lines[0].startswith(f"{f}:2: not valid JSON (Unexpected UTF-8 BOM")
    assert e.value.lines[1] == f"{f}:3: not valid JSON (Expecting ',' delimiter at column 13)"


def cfg(model, path, **kw):
    return TrainConfig(base_model=str(model), data_path=str(path), **kw)


def test_text_runs_grouped_fixed_and_dynamic(tmp_path, tiny_model_dir):
    lines = [{"text": f"text number {i}"} for i in range(10)] + [{"main": "m", "branches": ["a", "b"]}] + \
            [{"text": f"tail {i}"} for i in range(3)]
    f = write(tmp_path / "d.jsonl", lines)
    c = cfg(tiny_model_dir, f, branches_per_sample=4)
    ds = load_or_tokenize(c.data_path, c.base_model, c.max_seq_len)
    s = build_samples(ds, c)
    # 10 texts -> 4,4,2; the parallel record; 3 tail texts -> 3 (a run never crosses a parallel record)
    assert [s.num_branches(i) for i in range(len(s))] == [4, 4, 2, 2, 3]
    assert list(s.main >= 0) == [False, False, False, True, False]
    dyn = build_samples(ds, cfg(tiny_model_dir, f, max_branches_per_sample=3, min_branches_per_sample=2))
    counts = [dyn.num_branches(i) for i in range(len(dyn)) if dyn.main[i] < 0]
    assert sum(counts) == 13 and all(1 <= n <= 3 for n in counts)
    assert all(n >= 2 for n in counts[:-1] if n)  # only a run's last group may fall short


def test_dynamic_branch_counts_cover_the_whole_range_min_to_max(tmp_path, tiny_model_dir):
    f = write(tmp_path / "d.jsonl", [{"text": f"text number {i}"} for i in range(300)])
    c = cfg(tiny_model_dir, f, max_branches_per_sample=4, min_branches_per_sample=2)
    s = build_samples(load_or_tokenize(c.data_path, c.base_model, c.max_seq_len), c)
    counts = [s.num_branches(i) for i in range(len(s))]
    assert set(counts[:-1]) == {2, 3, 4}   # both bounds are drawn, nothing outside them


def test_epochs_are_shuffled_differently_and_reproducibly(tmp_path, tiny_model_dir):
    f = write(tmp_path / "d.jsonl", [{"text": f"text number {i}"} for i in range(40)])
    c = cfg(tiny_model_dir, f, branches_per_sample=1, batch_size=4, batch_by_samples=True)
    s = build_samples(load_or_tokenize(c.data_path, c.base_model, c.max_seq_len), c)
    order = [np.concatenate(epoch_batches(s, c, epoch)) for epoch in (0, 1)]
    assert sorted(order[0]) == list(range(40)) and sorted(order[1]) == list(range(40))   # each sample once
    assert list(order[0]) != list(range(40)) and list(order[0]) != list(order[1])
    assert np.array_equal(np.concatenate(epoch_batches(s, c, 0)), order[0])   # every rank computes the same
    other_seed = np.concatenate(epoch_batches(s, c.model_copy(update={"seed": c.seed + 1}), 0))
    assert list(other_seed) != list(order[0])


def test_text_batches_count_a_main_as_a_text(tmp_path, tiny_model_dir):
    """--batch_size in text mode is at least N texts, a main counting as one (the guide's reading)."""
    f = write(tmp_path / "d.jsonl", [{"main": f"main {i}", "branches": ["a b", "c d"]} for i in range(20)])
    c = cfg(tiny_model_dir, f, batch_size=6)
    s = build_samples(load_or_tokenize(c.data_path, c.base_model, c.max_seq_len), c)
    batches = epoch_batches(s, c, 0)
    assert [len(b) for b in batches] == [2] * 10   # 3 texts per sample: two samples make 6 texts


def test_truncation_and_token_cache_reuse(tmp_path, tiny_model_dir, monkeypatch):
    f = write(tmp_path / "d.jsonl", [{"main": "word " * 50, "branches": ["short", "other " * 40]}])
    ds = load_or_tokenize(str(f), str(tiny_model_dir), max_seq_len=16)
    assert max(np.diff(ds.text_offsets)) == 16
    # second run: nothing is tokenised again
    monkeypatch.setattr(data, "_tokenize_to", lambda *a, **k: pytest.fail("tokenised twice"))
    again = load_or_tokenize(str(f), str(tiny_model_dir), max_seq_len=16)
    assert np.array_equal(np.asarray(again.tokens), np.asarray(ds.tokens))
    # a changed file is a new cache entry, so it is tokenised
    write(f, [{"text": "changed"}])
    with pytest.raises(pytest.fail.Exception, match="tokenised twice"):
        load_or_tokenize(str(f), str(tiny_model_dir), max_seq_len=16)


def test_tokenising_a_large_file_reports_its_progress(tmp_path, tiny_model_dir, monkeypatch):
    """A gigabyte tokenises for about ten minutes: the log says how far it is and how long is left."""
    f = write(tmp_path / "d.jsonl", [{"main": f"m {i}", "branches": ["a", "b"]} for i in range(1500)])
    monkeypatch.setattr(data, "PROGRESS_EVERY_S", 0.0)
    lines: list[str] = []
    load_or_tokenize(str(f), str(tiny_model_dir), max_seq_len=16, cache_dir=tmp_path / "cache", log=lines.append)
    assert lines[0].startswith(f"tokenising {f} (cache: ")
    # 3 texts a record, a chunk of TOKENIZE_CHUNK texts at a time: 342 records after the first chunk
    assert lines[1].startswith("tokenising: 342 of 1,500 records (22%), 0:00:0"), lines
    assert "left" in lines[1] and all("records" in ln for ln in lines[1:]), lines


def test_ranks_get_disjoint_equal_shards(tmp_path, tiny_model_dir):
    f = write(tmp_path / "d.jsonl", [{"text": f"t {i}"} for i in range(41)])
    c = cfg(tiny_model_dir, f, branches_per_sample=1, batch_size=2, batch_by_samples=True)
    ds = load_or_tokenize(c.data_path, c.base_model, c.max_seq_len)
    s = build_samples(ds, c)
    batches = epoch_batches(s, c, epoch=0)
    shards = [rank_batches(batches, r, 3) for r in range(3)]
    assert len({len(sh) for sh in shards}) == 1
    seen = [int(x) for sh in shards for b in sh for x in b]
    assert len(seen) == len(set(seen))
    # batch_size counts texts when not batching by samples
    c2 = cfg(tiny_model_dir, f, branches_per_sample=3, batch_size=5)
    s2 = build_samples(ds, c2)
    for b in epoch_batches(s2, c2, 0)[:-1]:
        texts = sum(s2.num_branches(int(i)) for i in b)
        assert 5 <= texts < 5 + 3


def test_total_steps_counts_epochs_only_until_max_steps(tmp_path, tiny_model_dir, monkeypatch):
    """A run of --epochs 1000 --max_steps 2 must not shuffle 1000 epochs before its first step."""
    f = write(tmp_path / "d.jsonl", [{"text": f"t {i}"} for i in range(12)])
    c = cfg(tiny_model_dir, f, branches_per_sample=1, batch_size=2, batch_by_samples=True, epochs=1000)
    s = build_samples(load_or_tokenize(c.data_path, c.base_model, c.max_seq_len), c)
    epochs_counted = []
    counted = data.steps_in_epoch
    monkeypatch.setattr(data, "steps_in_epoch", lambda *a: epochs_counted.append(a[-1]) or counted(*a))
    assert data.total_optimizer_steps(s, c.model_copy(update={"max_steps": 8}), world=1) == 8
    assert epochs_counted == [0, 1]   # 6 steps per epoch: the second epoch reaches 8
    epochs_counted.clear()
    assert data.total_optimizer_steps(s, c.model_copy(update={"epochs": 3}), world=2) == 3 * 3
    assert epochs_counted == [0, 1, 2]


@pytest.mark.parametrize("base_model,expected", [("models/tiny-qwen2/", "tiny-qwen2"), ("Qwen2.5-0.5B", "Qwen2.5-0.5B")])
def test_output_names_use_the_model_directory_name(base_model, expected, tmp_path, monkeypatch):
    assert TrainConfig(base_model=base_model, data_path="d").model_short_name == expected
    monkeypatch.chdir(tmp_path)   # '.' names the directory it is, not '..pth'
    assert TrainConfig(base_model=".", data_path="d").model_short_name == tmp_path.name


class LongestTextSeen:
    """A tokenizer wrapper that records the longest text it was asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, texts, **kw):
        self.longest = max([self.longest] + [len(t) for t in ([texts] if isinstance(texts, str) else texts)])
        return self.tokenizer(texts, **kw)


def test_a_huge_line_is_tokenised_from_a_prefix(tmp_path, tiny_model_dir, monkeypatch):
    """A 2 MB one-word line must not be tokenised whole (20 MB took 4 GB and 25 s) to keep 16 tokens; the
    texts around it, one exactly max_seq_len tokens long, are counted exactly."""
    tokenizer = data.load_tokenizer(str(tiny_model_dir))
    assert len(tokenizer("z" * 16, add_special_tokens=False)["input_ids"]) == 16   # one token per "z"
    seen = LongestTextSeen(tokenizer)
    monkeypatch.setattr(data, "load_tokenizer", lambda _: seen)
    f = write(tmp_path / "d.jsonl", [{"text": "z" * 2_000_000}, {"text": "z" * 16}, {"text": "z" * 17}])
    ds = load_or_tokenize(str(f), str(tiny_model_dir), max_seq_len=16, cache_dir=tmp_path / "cache")
    assert seen.longest < 1000
    expected = tokenizer("z" * 1000, add_special_tokens=False)["input_ids"][:16]
    assert [ds.text(t).tolist() for t in range(3)] == [expected, expected, expected]
    assert ds.text_truncated.tolist() == [True, False, True]


@pytest.mark.parametrize("chars_per_token", [None, 1])
def test_prefix_tokenisation_equals_whole_tokenisation(tmp_path, tiny_model_dir, monkeypatch, chars_per_token):
    """Truncated prefixes give the tokens (and truncation flags) of the whole texts; with 1 char per token
    every long text's prefix is too short at first, so the doubling is what is tested."""
    if chars_per_token is not None:
        monkeypatch.setattr(data, "PREFIX_CHARS_PER_TOKEN", chars_per_token)
    rng = np.random.default_rng(0)
    words = ["the", "branch", "zzzzzzzz", " ", "\n\n", "naïve", "数据", "x=1;", "    "]
    texts = ["".join(rng.choice(words, size=int(n))) + " end" for n in rng.integers(1, 400, size=60)]
    f = write(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    tokenizer = data.load_tokenizer(str(tiny_model_dir))
    whole = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for max_seq_len in (8, 100):
        ds = load_or_tokenize(str(f), str(tiny_model_dir), max_seq_len, cache_dir=tmp_path / str(chars_per_token))
        assert [ds.text(t).tolist() for t in range(len(texts))] == [ids[:max_seq_len] for ids in whole]
        assert ds.text_truncated.tolist() == [len(ids) > max_seq_len for ids in whole]


def test_min_branches_per_sample_without_max_is_refused_not_ignored():
    """Without a maximum the groups are fixed (branches_per_sample): a minimum would silently do nothing."""
    with pytest.raises(ValidationError, match="max_branches_per_sample"):
        TrainConfig(base_model="m", data_path="d", min_branches_per_sample=4)
    TrainConfig(base_model="m", data_path="d", min_branches_per_sample=4, max_branches_per_sample=8)
    TrainConfig(base_model="m", data_path="d", min_branches_per_sample=1)   # the worker's argv passes the default



def sample_index(shape: list[tuple[int, bool]]) -> data.SampleIndex:
    """Samples of (branch count, has a main), text ids consecutive: sample s's texts are numbered after
    sample s-1's, so a sample's first text id tells its place in the file."""
    main, ptr, branches, next_id = [], [0], [], 0
    for count, has_main in shape:
        main.append(next_id if has_main else -1)
        next_id += has_main
        branches += range(next_id, next_id + count)
        next_id += count
        ptr.append(len(branches))
    return data.SampleIndex(np.array(main, dtype=np.int64), np.array(ptr, dtype=np.int64),
                            np.array(branches, dtype=np.int64))


def texts_of(samples: data.SampleIndex, s: int) -> tuple[int, ...]:
    main = [int(samples.main[s])] if samples.main[s] >= 0 else []
    return tuple(main + [int(t) for t in samples.branch_texts[samples.ptr[s]:samples.ptr[s + 1]]])


# a sample has at least one text (build_samples drops the others)
samples_shapes = st.lists(st.tuples(st.integers(0, 5), st.booleans()).filter(lambda c: c[0] > 0 or c[1]),
                          min_size=2, max_size=60)


@given(samples_shapes, st.floats(0.001, 0.9), st.integers(0, 2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_the_validation_split_holds_out_whole_samples_once_each_and_the_same_every_time(shape, ratio, seed):
    samples = sample_index(shape)
    n = len(samples)
    n_val = max(1, round(ratio * n))
    if n_val >= n:   # nothing would be left to train on: said, not trained
        with pytest.raises(DataError, match="none is left to train on"):
            data.split_validation(samples, ratio, seed)
        return
    kept, held_out = data.split_validation(samples, ratio, seed)
    assert (len(kept), len(held_out)) == (n - n_val, n_val)
    parts = [[texts_of(part, s) for s in range(len(part))] for part in (kept, held_out)]
    # every sample lands in exactly one part, whole (its main and all its branches) ...
    assert sorted(parts[0] + parts[1]) == [texts_of(samples, s) for s in range(n)]
    # ... and each part keeps the file's order
    assert all(texts == sorted(texts) for texts in parts)
    # the same split on every rank and every resume
    again = data.split_validation(samples, ratio, seed)[1]
    assert [texts_of(again, s) for s in range(len(again))] == parts[1]


def test_the_validation_split_follows_the_seed_and_takes_at_least_one_sample():
    samples = sample_index([(1, False)] * 100)
    held = {seed: data.split_validation(samples, 0.1, seed)[1].branch_texts.tolist() for seed in (0, 1)}
    assert len(held[0]) == 10 and held[0] != held[1]
    assert len(data.split_validation(samples, 0.001, 0)[1]) == 1   # a ratio that rounds to none still holds out one
