"""Parallel JSONL: validation, tokenisation (cached on disk), grouping into samples, batching.

A line is either `{"main": str, "branches": [str, ...]}` (one sample) or `{"text": str}`; runs of
consecutive text records are grouped into samples whose branches are those texts (no main).

Files are streamed line by line and never held in memory whole. Tokens live in a flat int32 file
(memory-mapped) with an offsets index, cached under a key of (file content, tokenizer, max_seq_len),
so a second run over the same data does not tokenise again. Only a prefix of a long text is tokenised
(see `encode_truncated`), so one huge line costs memory in proportion to max_seq_len, not to its size.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import numpy as np

from trainer_core.config import TrainConfig
from trainer_core.layout import PackedBatch, SampleLayout, build_sample_layout, collate_rows, row_plan

MAX_REPORTED_ERRORS = 50
TOKENIZE_CHUNK = 1024
PROGRESS_EVERY_S = 10.0  # a progress line while tokenising a large file (about ten minutes per GB)
# the validation split's random stream: derived from the seed, apart from its other uses (grouping, order)
VAL_SPLIT_STREAM = 7919
CACHE_VERSION = "2"  # 2: index.npz holds `text_truncated`
# A text is tokenised from a prefix of PREFIX_CHARS_PER_TOKEN * max_seq_len characters, doubled while it
# gives too few tokens: tokenising a 20 MB line whole took 4 GB only to keep its first max_seq_len tokens.
PREFIX_CHARS_PER_TOKEN = 8
# Tokens past max_seq_len a cut prefix must give before it is trusted: the cut changes only the tokens
# next to it (a word split in two), not the first max_seq_len.
PREFIX_MARGIN_TOKENS = 16
# The keys each record shape reads; others next to them are ignored (and counted by `validate_file`).
PARALLEL_KEYS = frozenset({"main", "branches"})
TEXT_KEYS = frozenset({"text"})


class DataError(ValueError):
    """Bad input (the dataset, the model directory, a config this model cannot take): `lines` are
    `FILE:LINE: what is wrong` or `--flag value: what is wrong` messages, ready to show a user."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass
class Record:
    line: int
    main: str | None = None            # main+branches record
    branches: list[str] | None = None
    text: str | None = None            # text record
    ignored_keys: frozenset[str] = frozenset()


# --- reading and validation ----------------------------------------------------------------------

def iter_raw_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) for every non-blank line, streamed. The line terminator is cut off
    (JSON error columns then point into the line, not past it), and so is a UTF-8 BOM that starts the
    file (editors on Windows write one)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if raw.strip():
                yield lineno, raw


JSON_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
                   bool: "true/false", type(None): "null"}


def json_type(value: object) -> str:
    """What a JSON value is, in JSON's words ("a number", "null"), not Python's ("int", "NoneType")."""
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def parse_line(raw: bytes) -> Record | str:
    """A Record, or a message saying what is wrong with the line."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return f"not UTF-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        # json's own message may end in "at" ("Unterminated string starting at")
        return f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {json_type(obj)}"
    if "branches" in obj or "main" in obj:
        if "text" in obj:
            return "has both 'text' and 'branches'/'main'; use one shape per line"
        main = obj.get("main", "")
        branches = obj.get("branches")
        if not isinstance(main, str):
            return f"'main' must be a string, got {json_type(main)}"
        if branches is None:
            return "'main' without 'branches'; add a 'branches' list (or use {\"text\": ...})"
        if not isinstance(branches, list):
            return f"'branches' must be a list of strings, got {json_type(branches)}"
        if not branches:
            return "'branches' is empty"
        for i, b in enumerate(branches):
            if not isinstance(b, str):
                return f"branch {i + 1} must be a string, got {json_type(b)}"
        # An empty branch would silently vanish from training (it has no tokens); one of whitespace only
        # is no text either, as for a text record.
        if not any(b.strip() for b in branches):
            if not main.strip():
                return "no text at all (main and every branch are empty)"
            return "branches are all empty (a record needs at least one branch to train on)"
        for i, b in enumerate(branches):
            if not b.strip():
                return f"branch {i + 1} is {'empty' if not b else 'only whitespace'}"
        return Record(line=0, main=main, branches=branches, ignored_keys=frozenset(obj) - PARALLEL_KEYS)
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            return f"'text' must be a string, got {json_type(text)}"
        if not text.strip():
            return "'text' is empty"
        return Record(line=0, text=text, ignored_keys=frozenset(obj) - TEXT_KEYS)
    keys = ", ".join(sorted(obj)) or "none"
    return f"no 'main'/'branches' or 'text' key (keys: {keys})"


def iter_records(path: str | os.PathLike) -> Iterator[Record]:
    """Valid records of a file already checked by `validate_file`."""
    for lineno, raw in iter_raw_lines(path):
        rec = parse_line(raw)
        if isinstance(rec, str):
            raise DataError([f"{path}:{lineno}: {rec}"])
        rec.line = lineno
        yield rec


def validate_file(path: str | os.PathLike, max_errors: int = MAX_REPORTED_ERRORS,
                  warnings: list[str] | None = None, max_lines: int | None = None) -> int:
    """Check every line (the first `max_lines` only, if given); return the record count or raise DataError
    listing `FILE:LINE: ...` problems. `warnings` gets a line about valid records with keys paratrain ignores
    (a typo'd key would otherwise go unnoticed)."""
    p = Path(path)
    if not p.exists():
        raise DataError([f"{path}: file not found"])
    if p.is_dir():
        raise DataError([f"{path}: is a directory, expected a Parallel JSONL file"])
    errors: list[str] = []
    n_errors = 0
    records = 0
    ignored: set[str] = set()
    ignoring_records = first_ignoring = 0
    read_all = True
    first_line = None
    for lineno, raw in iter_raw_lines(p):
        if max_lines is not None and lineno > max_lines:
            read_all = False
            break
        first_line = raw.strip() if first_line is None else first_line
        rec = parse_line(raw)
        if isinstance(rec, str):
            n_errors += 1
            if len(errors) < max_errors:
                errors.append(f"{path}:{lineno}: {rec}")
        else:
            records += 1
            if rec.ignored_keys:
                ignored |= rec.ignored_keys
                ignoring_records += 1
                first_ignoring = first_ignoring or lineno
    if n_errors > len(errors):
        errors.append(f"{path}: ... and {n_errors - len(errors)} more bad lines")
    if errors and first_line is not None and (first_line.startswith(b"[") or first_line == b"{"):
        # every line of it is an error, none saying why: a JSON array, or one object pretty-printed
        errors.insert(0, f"{path}: one JSON document over many lines (it starts with {first_line[:1].decode()!r}); "
                         "Parallel JSONL is one JSON object per line, e.g. {\"main\": \"...\", \"branches\": [...]}")
    if not errors and records == 0 and read_all:
        errors.append(f"{path}:1: empty file (no records)")
    if errors:
        raise DataError(errors)
    if ignoring_records and warnings is not None:
        have = "record has" if ignoring_records == 1 else "records have"
        warnings.append(f"{path}: {ignoring_records} {have} keys paratrain ignores: {', '.join(sorted(ignored))}"
                        f" (first on line {first_ignoring})")
    return records


# --- tokenizer ---------------------------------------------------------------------------------------

def local_model_dir(base_model: str) -> str:
    """`base_model` as a local directory: a directory as given, or else a hub repo id (`Qwen/Qwen2.5-0.5B`)
    whose snapshot is already in the local HuggingFace cache, as the guide's command lines name models.
    Nothing is downloaded; anything not found comes back unchanged for the caller's own error."""
    if os.path.isdir(base_model):
        return base_model
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(base_model, local_files_only=True)
    except (HFValidationError, LocalEntryNotFoundError, OSError):
        return base_model


def has_tokenizer_files(model_dir: str | os.PathLike) -> bool:
    """A local directory with tokenizer files (transformers would take anything else for a hub repo id)."""
    return any(Path(model_dir).glob("tokenizer*"))


def load_tokenizer(model_dir: str):
    """The model's tokenizer. A tokenizer that declares itself a plain PreTrainedTokenizerFast is loaded as
    such: AutoTokenizer would otherwise swap in the model family's own pre-tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    model_dir = local_model_dir(model_dir)
    cfg_file = Path(model_dir) / "tokenizer_config.json"
    cls = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.exists() else None
    if cls == "PreTrainedTokenizerFast":
        return PreTrainedTokenizerFast.from_pretrained(model_dir)
    return AutoTokenizer.from_pretrained(model_dir)


def _fingerprint_tokenizer(model_dir: str) -> str:
    model_dir = local_model_dir(model_dir)
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model"):
        f = Path(model_dir) / name
        if f.exists():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The file's content hash, computed once per process for an unchanged file (the token cache key and
    a checkpoint's record of its data both need it; large datasets take seconds per GB)."""
    st = os.stat(path)
    return _sha256_of(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- tokenised dataset -------------------------------------------------------------------------------

@dataclass
class TokenizedDataset:
    """All texts of a file as token ids.

    Text t has tokens `tokens[text_offsets[t]:text_offsets[t+1]]`. Record r owns texts
    `record_texts[r]:record_texts[r+1]`; for a main+branches record (`record_is_parallel[r]`) the first of
    them is the main (possibly empty), for a text record it is the single text. `text_truncated[t]`: text
    t had more than max_seq_len tokens.
    """

    tokens: np.ndarray
    text_offsets: np.ndarray
    text_truncated: np.ndarray
    record_texts: np.ndarray
    record_is_parallel: np.ndarray
    record_lines: np.ndarray

    @property
    def num_records(self) -> int:
        return len(self.record_lines)

    def text(self, t: int) -> np.ndarray:
        return self.tokens[self.text_offsets[t]:self.text_offsets[t + 1]]

    def text_len(self, t: int) -> int:
        return int(self.text_offsets[t + 1] - self.text_offsets[t])


def default_cache_dir() -> Path:
    return Path(os.environ.get("PARATRAIN_CACHE", Path.home() / ".cache" / "paratrain")) / "tokens"


def cache_key(data_path: str, tokenizer_dir: str, max_seq_len: int) -> str:
    h = hashlib.sha256()
    for part in (CACHE_VERSION, file_sha256(data_path), _fingerprint_tokenizer(tokenizer_dir), str(max_seq_len)):
        h.update(part.encode())
    return h.hexdigest()[:24]


def prepare_tokens(data_path: str, tokenizer_dir: str, max_seq_len: int,
                   cache_dir: str | os.PathLike | None = None, log=None, warnings: list[str] | None = None) -> Path:
    """Validate, then tokenise `data_path` once; return the cache directory (`open_tokens` reads it).
    Later calls with the same file, tokenizer and max_seq_len find the cache and tokenise nothing.
    `warnings`: as for `validate_file`."""
    records = validate_file(data_path, warnings=warnings)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / cache_key(data_path, tokenizer_dir, max_seq_len)
    if not (target / "index.npz").exists():
        if log:
            log(f"tokenising {data_path} (cache: {target})")
        _tokenize_to(target, data_path, tokenizer_dir, max_seq_len, progress=Progress(records, log) if log else None)
    elif log:
        log(f"using cached tokens {target}")
    return target


def load_or_tokenize(data_path: str, tokenizer_dir: str, max_seq_len: int,
                     cache_dir: str | os.PathLike | None = None, log=None,
                     warnings: list[str] | None = None) -> TokenizedDataset:
    return open_tokens(prepare_tokens(data_path, tokenizer_dir, max_seq_len, cache_dir, log, warnings))


def encode_truncated(tokenizer, texts: list[str], max_seq_len: int) -> list[tuple[list[int], bool]]:
    """Each text's first `max_seq_len` token ids, and whether it has more tokens than that.

    Only a prefix of each text is tokenised: PREFIX_CHARS_PER_TOKEN * max_seq_len characters in one batched
    call (a text shorter than that, the usual case, is tokenised whole), doubled for the rare text whose
    prefix gives fewer than max_seq_len + PREFIX_MARGIN_TOKENS tokens. A prefix that stops short of the text
    gave more than max_seq_len tokens, so the text is truncated; otherwise the whole text was counted."""
    chars = PREFIX_CHARS_PER_TOKEN * max_seq_len
    enough = max_seq_len + PREFIX_MARGIN_TOKENS
    encoded = tokenizer([t[:chars] for t in texts], add_special_tokens=False)["input_ids"]
    result = []
    for text, ids in zip(texts, encoded):
        prefix = chars
        while len(ids) < enough and len(text) > prefix:
            prefix *= 2
            ids = tokenizer(text[:prefix], add_special_tokens=False)["input_ids"]
        result.append((ids[:max_seq_len], len(ids) > max_seq_len))
    return result


class Progress:
    """`tokenising: 12,288 of 88,486 records (14%), 0:00:10, about 0:01:02 left`, at most every PROGRESS_EVERY_S
    (`what` and `unit` name the work: "validating", "batches")."""

    def __init__(self, total: int, log, what: str = "tokenising", unit: str = "records"):
        self.total, self.log, self.every_s, self.what, self.unit = total, log, PROGRESS_EVERY_S, what, unit
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s or not 0 < done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed * (self.total - done) / done
        self.log(f"{self.what}: {done:,} of {self.total:,} {self.unit} ({100 * done // self.total}%), "
                 f"{timedelta(seconds=round(elapsed))}, about {timedelta(seconds=round(left))} left")


def _tokenize_to(target: Path, data_path: str, tokenizer_dir: str, max_seq_len: int,
                 progress: Progress | None = None) -> None:
    tokenizer = load_tokenizer(tokenizer_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    text_lengths: list[int] = []
    text_truncated: list[bool] = []
    record_texts = [0]
    record_is_parallel: list[bool] = []
    record_lines: list[int] = []
    try:
        with open(tmp / "tokens.bin", "wb") as out:
            pending: list[str] = []

            def flush() -> None:
                if not pending:
                    return
                for ids, truncated in encode_truncated(tokenizer, pending, max_seq_len):
                    text_lengths.append(len(ids))
                    text_truncated.append(truncated)
                    out.write(np.asarray(ids, dtype=np.int32).tobytes())
                pending.clear()

            for rec in iter_records(data_path):
                texts = [rec.main or ""] + rec.branches if rec.branches is not None else [rec.text]
                pending.extend(texts)
                record_texts.append(record_texts[-1] + len(texts))
                record_is_parallel.append(rec.branches is not None)
                record_lines.append(rec.line)
                if len(pending) >= TOKENIZE_CHUNK:
                    flush()
                    if progress:
                        progress.update(len(record_lines))
            flush()
        np.savez(tmp / "index.npz",
                 text_offsets=np.concatenate([[0], np.cumsum(text_lengths, dtype=np.int64)]),
                 text_truncated=np.asarray(text_truncated, dtype=bool),
                 record_texts=np.asarray(record_texts, dtype=np.int64),
                 record_is_parallel=np.asarray(record_is_parallel, dtype=bool),
                 record_lines=np.asarray(record_lines, dtype=np.int64))
        try:
            os.rename(tmp, target)
        except OSError:  # another process (rank) finished the same cache first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_tokens(target: Path) -> TokenizedDataset:
    index = np.load(target / "index.npz")
    n_tokens = int(index["text_offsets"][-1])
    tokens = (np.memmap(target / "tokens.bin", dtype=np.int32, mode="r", shape=(n_tokens,))
              if n_tokens else np.zeros(0, dtype=np.int32))
    return TokenizedDataset(tokens=tokens, text_offsets=index["text_offsets"], text_truncated=index["text_truncated"],
                            record_texts=index["record_texts"],
                            record_is_parallel=index["record_is_parallel"], record_lines=index["record_lines"])


# --- samples -------------------------------------------------------------------------------------------

@dataclass
class SampleIndex:
    """Sample s has main text `main[s]` (-1: none) and branch texts `branch_texts[ptr[s]:ptr[s+1]]`."""

    main: np.ndarray
    ptr: np.ndarray
    branch_texts: np.ndarray

    def __len__(self) -> int:
        return len(self.main)

    def num_branches(self, s: int) -> int:
        return int(self.ptr[s + 1] - self.ptr[s])

    def take(self, which: np.ndarray) -> SampleIndex:
        """The samples `which` (indices, in that order) as an index of their own."""
        counts = np.diff(self.ptr)[which]
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # branch j of the new index is branch (j - ptr[k]) of old sample which[k]
        starts = np.repeat(self.ptr[which] - ptr[:-1], counts)
        return SampleIndex(main=self.main[which], ptr=ptr,
                           branch_texts=self.branch_texts[starts + np.arange(int(ptr[-1]), dtype=np.int64)])


def split_validation(samples: SampleIndex, val_ratio: float, seed: int) -> tuple[SampleIndex, SampleIndex]:
    """(training samples, held-out validation samples): round(val_ratio x samples), at least one, chosen at
    random with the seed (the same on every rank and every resume), each kept in file order. DataError when
    nothing would be left to train on."""
    n = len(samples)
    n_val = max(1, round(val_ratio * n))
    if n_val >= n:
        raise DataError([f"--val_ratio {val_ratio:g} holds out {n_val} of {n} samples: none is left to train on "
                         "(lower it, or give a separate --val_data_path)"])
    held_out = np.zeros(n, dtype=bool)
    held_out[np.random.default_rng([seed, VAL_SPLIT_STREAM]).choice(n, size=n_val, replace=False)] = True
    return samples.take(np.flatnonzero(~held_out)), samples.take(np.flatnonzero(held_out))


def build_samples(ds: TokenizedDataset, cfg: TrainConfig) -> SampleIndex:
    """Turn records into samples: parallel records as they are; runs of text records grouped
    `branches_per_sample` at a time, or a random count in [min, max] when max_branches_per_sample is set.
    Texts that tokenise to nothing are dropped."""
    rng = np.random.default_rng(cfg.seed)
    mains: list[int] = []
    ptr = [0]
    branches: list[int] = []

    def add(main: int, texts: list[int]) -> None:
        texts = [t for t in texts if ds.text_len(t) > 0]
        if main >= 0 and ds.text_len(main) == 0:
            main = -1
        if texts or main >= 0:
            mains.append(main)
            branches.extend(texts)
            ptr.append(len(branches))

    def flush_run(run: list[int]) -> None:
        i = 0
        while i < len(run):
            if cfg.max_branches_per_sample is not None:
                n = int(rng.integers(cfg.min_branches_per_sample, cfg.max_branches_per_sample + 1))
            else:
                n = cfg.branches_per_sample
            add(-1, run[i:i + n])
            i += n
        run.clear()

    run: list[int] = []
    for r in range(ds.num_records):
        first, end = int(ds.record_texts[r]), int(ds.record_texts[r + 1])
        if ds.record_is_parallel[r]:
            flush_run(run)
            add(first, list(range(first + 1, end)))
        else:
            run.append(first)
    flush_run(run)
    return SampleIndex(main=np.asarray(mains, dtype=np.int64), ptr=np.asarray(ptr, dtype=np.int64),
                       branch_texts=np.asarray(branches, dtype=np.int64))


def sample_token_ids(ds: TokenizedDataset, samples: SampleIndex, s: int) -> tuple[np.ndarray, list[np.ndarray]]:
    main = ds.text(int(samples.main[s])) if samples.main[s] >= 0 else np.zeros(0, dtype=np.int32)
    branches = [ds.text(int(t)) for t in samples.branch_texts[samples.ptr[s]:samples.ptr[s + 1]]]
    return main, branches


def sample_lengths(ds: TokenizedDataset, samples: SampleIndex) -> np.ndarray:
    """Total tokens per sample (vectorised)."""
    text_len = np.diff(ds.text_offsets)
    per_branch = text_len[samples.branch_texts]
    branch_sums = np.add.reduceat(per_branch, samples.ptr[:-1]) if len(per_branch) else np.zeros(len(samples))
    branch_sums = np.where(np.diff(samples.ptr) > 0, branch_sums, 0)
    main_len = np.where(samples.main >= 0, text_len[np.maximum(samples.main, 0)], 0)
    return (branch_sums + main_len).astype(np.int64)


# --- batches -------------------------------------------------------------------------------------------

def epoch_batches(samples: SampleIndex, cfg: TrainConfig, epoch: int) -> list[np.ndarray]:
    """All batches of one epoch (every rank computes the same list), shuffled with seed + epoch.

    With --batch_by_samples a batch is `batch_size` samples; otherwise samples are added until the batch
    holds at least `batch_size` texts (branches, counting the main)."""
    order = np.random.default_rng(cfg.seed + 1000 * (epoch + 1)).permutation(len(samples))
    if cfg.batch_by_samples:
        return [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    texts_per_sample = np.diff(samples.ptr) + (samples.main >= 0)
    batches, start, count = [], 0, 0
    for i, s in enumerate(order):
        count += int(texts_per_sample[s])
        if count >= cfg.batch_size:
            batches.append(order[start:i + 1])
            start, count = i + 1, 0
    if start < len(order):
        batches.append(order[start:])
    return batches


def rank_batches(batches: list[np.ndarray], rank: int, world: int) -> list[np.ndarray]:
    """Disjoint shard for one rank; every rank gets the same count so DDP steps stay in lockstep."""
    per_rank = len(batches) // world
    return batches[rank::world][:per_rank]


def steps_in_epoch(samples: SampleIndex, cfg: TrainConfig, world: int, epoch: int) -> int:
    """Optimiser steps of one epoch (text batching makes it vary a little between epochs)."""
    return len(rank_batches(epoch_batches(samples, cfg, epoch), 0, world)) // cfg.accumulation_steps


def total_optimizer_steps(samples: SampleIndex, cfg: TrainConfig, world: int) -> int:
    """Optimiser steps of the run: every epoch, or max_steps if that comes first (epochs are counted only
    until it does, so a large --epochs with --max_steps starts at once)."""
    total = 0
    for epoch in range(cfg.epochs):
        total += steps_in_epoch(samples, cfg, world, epoch)
        if cfg.max_steps is not None and total >= cfg.max_steps:
            return cfg.max_steps
    return total


def collate_batch(ds: TokenizedDataset, samples: SampleIndex, batch: np.ndarray, cfg: TrainConfig,
                  dense_attention: bool = False) -> PackedBatch:
    """Sample indices -> packed rows of column-major layouts."""
    layouts = [build_sample_layout(*sample_token_ids(ds, samples, int(s)), branch_stride=cfg.branch_stride)
               for s in batch]
    return pack_layouts(layouts, cfg.tokens_per_row, dense_attention)


def pack_layouts(layouts: list[SampleLayout], tokens_per_row: int, dense_attention: bool) -> PackedBatch:
    """Rows packed by the rule of the attention backend (layout.row_plan)."""
    rows, T = row_plan([len(lay) for lay in layouts], tokens_per_row, dense_attention)
    return collate_rows(layouts, rows, T)
