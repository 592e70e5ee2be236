"""After training, a look at what the adapter learned that a loss cannot give: a few samples (the validation
set's first, else the training set's) continued branch by branch from each branch's first tokens, greedily,
and written to <output_dir>/samples.jsonl beside the text the data has there. One JSON object per sample:

    {"step": 120, "source": "validation", "sample": 0, "main": "...",
     "branches": [{"start": "The first", "generated": " words the model wrote", "data": " words the data has"}]}

Generation is trainer_core.generate's (the layout training used, no KV cache).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer_core.data import SampleIndex, TokenizedDataset, sample_token_ids
from trainer_core.generate import Generator, generate_branch_ids

START_TOKENS = 8   # a branch's start: its first 8 tokens, at most half of it


def branch_start_len(branch_len: int) -> int:
    """How many of a branch's tokens the model is given to start from (at least one: training never
    predicts a branch's first token)."""
    return max(1, min(START_TOKENS, branch_len // 2))


def continue_sample(gen: Generator, main_ids: list[int], branch_ids: list[list[int]],
                    new_tokens: int) -> list[dict[str, str]]:
    """Each branch's start, what the model wrote after it, and what the data has there, as text."""
    starts = [ids[:branch_start_len(len(ids))] for ids in branch_ids]
    written = generate_branch_ids(gen, main_ids, starts, new_tokens)
    decode = lambda ids: gen.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    # the whole branch decoded, less its start: decoding the new ids alone can drop the space before them
    after = lambda start, ids: decode(start + ids)[len(decode(start)):]  # noqa: E731
    return [{"start": decode(start), "generated": after(start, new), "data": after(start, ids[len(start):][:new_tokens])}
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


def write_samples(gen: Generator, split: tuple[TokenizedDataset, SampleIndex], *, source: str, count: int,
                  new_tokens: int, step: int, path: Path, should_stop=lambda: False) -> int:
    """Continue `count` samples of `split` and write them to `path` (replaced); how many were written
    (fewer when `should_stop()` turns true between two)."""
    ds, samples = split
    records: list[dict[str, Any]] = []
    for s in pick_samples(ds, samples, count):
        if should_stop():
            break
        main, branches = sample_token_ids(ds, samples, s)
        records.append({"step": step, "source": source, "sample": s,
                        "main": gen.tokenizer.decode(main.tolist(), skip_special_tokens=True),
                        "branches": continue_sample(gen, main.tolist(), [b.tolist() for b in branches], new_tokens)})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)
    return len(records)
