"""After training, a look at what the adapter learned that a loss cannot give: a few samples (the validation
set's first, else the training set's) continued branch by branch from each branch's first tokens, greedily,
and written to <output_dir>/samples.jsonl beside the text the data has there. One JSON object per sample:

    {"step": 120, "source": "validation", "sample": 0, "main": "...",
     "branches": [{"start": "The first", "generated": " words the model wrote", "data": " words the data has"}]}

Generation is trainer_core.generate's (the layout training used, no KV cache).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer_core.data import Progress, SampleIndex, TokenizedDataset, sample_token_ids
from trainer_core.generate import Generator, continuation_text, generate_branch_ids

START_TOKENS = 8   # a branch's start: its first 8 tokens, at most half of it


def branch_start_len(branch_len: int) -> int:
    """How many of a branch's tokens the model is given to start from (at least one: training never
    predicts a branch's first token)."""
    return max(1, min(START_TOKENS, branch_len // 2))


def continue_sample(gen: Generator, main_ids: list[int], branch_ids: list[list[int]], new_tokens: int,
                    should_stop: Callable[[], bool] = lambda: False) -> list[dict[str, str]]:
    """Each branch's start, what the model wrote after it, and what the data has there, as text."""
    starts = [ids[:branch_start_len(len(ids))] for ids in branch_ids]
    written = generate_branch_ids(gen, main_ids, starts, new_tokens, should_stop=should_stop)
    after = lambda start, ids: continuation_text(gen.tokenizer, start, ids)  # noqa: E731
    return [{"start": gen.tokenizer.decode(start, skip_special_tokens=True), "generated": after(start, new),
             "data": after(start, ids[len(start):][:new_tokens])}
            for start, new, ids in zip(starts, written, branch_ids)]


def pick_samples(ds: TokenizedDataset, samples: SampleIndex, count: int) -> list[int]:
    """The first `count` samples whose branches all hold a token (a branch needs one to start from)."""
    picked = []
    for s in range(len(samples)):
        if len(picked) == count:
            break
        _, branches = sample_token_ids(ds, samples, s)
        if branches and all(len(b) > 0 for b in branches):
            picked.append(s)
    return picked


def continue_samples(gen: Generator, split: tuple[TokenizedDataset, SampleIndex], *, source: str, count: int,
                     new_tokens: int, step: int, should_stop: Callable[[], bool] = lambda: False,
                     log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """`count` samples of `split` continued, a record each (the module's docstring); those done when
    `should_stop()` turns true (asked before each token); `log` takes progress lines when it is slow."""
    ds, samples = split
    records: list[dict[str, Any]] = []
    picked = pick_samples(ds, samples, count)
    progress = Progress(len(picked), log, what="samples", unit="samples") if log else None
    for done, s in enumerate(picked, start=1):
        main, branches = sample_token_ids(ds, samples, s)
        continued = continue_sample(gen, main.tolist(), [b.tolist() for b in branches], new_tokens, should_stop)
        if should_stop():   # this one is cut short: not what the model writes
            break
        records.append({"step": step, "source": source, "sample": s,
                        "main": gen.tokenizer.decode(main.tolist(), skip_special_tokens=True), "branches": continued})
        if progress:
            progress.update(done)
    return records


def write_samples(path: Path, records: list[dict[str, Any]]) -> None:
    """`path` replaced by the records, one JSON line each (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)
