"""Generate with a trained adapter: a shared main text and several branches, each continued one token per
step, all laid out as training laid them out (trainer_core/layout.py).

Each step runs the whole sample again (no KV cache): a token's 1D position is its index in column-major
order, which moves when branches of different lengths grow, so a cache would give the model positions it
never trained on. This is exact, and quick enough for evaluating an adapter; the cost of a step grows with
the length of the sample.

A branch needs at least one token to start from: training predicts a branch's second token from its first,
never its first from the main (labels stay within a branch, DESIGN.md).

    from trainer_core.generate import load_generator, generate_branches
    gen = load_generator("out/adapter")                        # the base model named in rope2d.json
    generate_branches(gen, "Question: ...", ["Answer A:", "Answer B:"], max_new_tokens=32)

or `paratrain generate --adapter out/adapter --main "..." --branch "Answer A:" --branch "Answer B:"`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from trainer_core import exit_codes
from trainer_core.data import DataError, load_tokenizer, local_model_dir
from trainer_core.layout import build_sample_layout
from trainer_core.model import (DTYPES, hidden_states, load_adapter_dir, output_layer, quiet_libraries,
                                read_adapter_settings)


@dataclass
class Generator:
    model: nn.Module          # base model + adapter + the 2D RoPE patch (load_adapter_dir, or the training's model)
    tokenizer: Any
    branch_stride: int        # the training's branch coordinate per branch (rope2d.json)


def load_generator(adapter_dir: str | Path, base_model: str | None = None, device: str = "cpu",
                   dtype: torch.dtype = torch.float32) -> Generator:
    """The adapter of a paratrain run (`<output_dir>/adapter`) on its base model: the one it was trained on
    (recorded in rope2d.json) unless `base_model` names another copy of it."""
    settings = read_adapter_settings(adapter_dir)
    given = base_model is not None
    base_model = local_model_dir(base_model or settings["base_model"])   # a hub id in the local cache too
    if not Path(base_model).is_dir():
        raise DataError([f"--base_model {base_model}: no such directory" if given else
                         f"{base_model}: no such directory: the base model the adapter was trained on (its "
                         f"rope2d.json) has moved or is on another machine; give its copy with --base_model"])
    try:
        model = load_adapter_dir(base_model, adapter_dir, device=device, dtype=dtype)
    except SafetensorError as e:   # a copy cut short, or another file under that name
        raise DataError([f"{Path(adapter_dir) / 'adapter_model.safetensors'}: not readable ({e})"]) from None
    return Generator(model, load_tokenizer(base_model), int(settings["branch_stride"]))


@torch.no_grad()
def generate_branch_ids(gen: Generator, main_ids: list[int], branch_ids: list[list[int]], max_new_tokens: int,
                        temperature: float = 0.0, seed: int = 0, eos_token_id: int | None = None,
                        should_stop: Callable[[], bool] = lambda: False) -> list[list[int]]:
    """Each branch's new token ids (at most `max_new_tokens`): greedy (temperature 0) or sampled, until the end
    token (`eos_token_id`, default the tokenizer's; returned, but never part of the sample: training has none),
    or until `should_stop()` (asked before each step: a step runs the whole sample).

    The columns fill in order: each step continues only the branches that end earliest, so a token is always
    predicted from complete earlier columns, as in training. (Starts of different lengths: the shorter ones
    catch up first.)"""
    if not branch_ids or any(len(b) == 0 for b in branch_ids):
        raise ValueError("every branch needs at least one token to start from")
    device = next(gen.model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    eos = gen.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    branches = [list(b) for b in branch_ids]
    new: list[list[int]] = [[] for _ in branches]
    ended = [False] * len(branches)
    first_branch = 1 if main_ids else 0        # the layout's sequence index of branch 0 (the main is 0)
    while True:
        growing = [k for k in range(len(branches)) if not ended[k] and len(new[k]) < max_new_tokens]
        if not growing or should_stop():
            return new
        frontier = min(len(branches[k]) for k in growing)
        active = [k for k in growing if len(branches[k]) == frontier]
        layout = build_sample_layout(main_ids, branches, gen.branch_stride)
        hidden = hidden_states(gen.model, *(t[None].to(device) for t in (layout.input_ids, layout.pos1d,
                                                                         layout.branch_pos, layout.time_ids)),
                               torch.zeros(1, len(layout), dtype=torch.long, device=device))[0]
        # each active branch's last token: its (branch coordinate, time) is unique in the layout
        last_time = len(main_ids) + frontier - 1
        branch_pos = (first_branch + torch.tensor(active)) * gen.branch_stride
        at = ((layout.branch_pos[None, :] == branch_pos[:, None])
              & (layout.time_ids[None, :] == last_time)).float().argmax(dim=1)
        # the logits of those positions only: all of them would be [T, vocabulary], GBs for a long sample
        next_logits = output_layer(gen.model)(hidden[at.to(device)]).float().cpu()
        if temperature > 0:
            next_ids = torch.multinomial(torch.softmax(next_logits / temperature, dim=-1), 1, generator=generator)[:, 0]
        else:
            next_ids = next_logits.argmax(dim=-1)
        for k, token in zip(active, next_ids.tolist()):
            new[k].append(token)
            if token == eos:
                ended[k] = True
            else:
                branches[k].append(token)


def generate_branches(gen: Generator, main: str, branch_starts: list[str], max_new_tokens: int = 64,
                      temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Each branch's continuation as text (its start not repeated)."""
    encode = lambda text: gen.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    starts = [encode(s) for s in branch_starts]
    empty = [i for i, start in enumerate(starts) if not start]
    if empty:
        raise ValueError(f"branch {empty[0] + 1}: give it a start of at least one token (training never predicts "
                         "a branch's first token from the main)")
    new = generate_branch_ids(gen, encode(main) if main else [], starts, max_new_tokens, temperature, seed)
    return [continuation_text(gen.tokenizer, start, ids) for start, ids in zip(starts, new)]


def continuation_text(tokenizer, start: list[int], new: list[int]) -> str:
    """What `new` adds to `start`, as text: the whole decoded less the start's text (decoding the new ids alone
    can drop the space before them)."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    return decode(start + new)[len(decode(start)):]


# --- `paratrain generate` -----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="A trained adapter directory (<output_dir>/adapter, or "
                        "<output_dir>/adapter_best: the lowest validation loss's).")
    parser.add_argument("--base_model", help="The base model's directory (default: the one in rope2d.json).")
    parser.add_argument("--main", default="", help="The shared main text (may be empty).")
    parser.add_argument("--branch", action="append", required=True, metavar="START",
                        help="A branch's first words; once per branch.")
    parser.add_argument("--max_new_tokens", type=int, default=64,
                        help="The most tokens a branch grows by (default 64; it may end sooner).")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampled.")
    parser.add_argument("--seed", type=int, default=0, help="Of the sampling.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Where the model runs, e.g. cuda, cuda:1 or cpu (default: cuda when there is a GPU).")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="The model's weights: auto is bfloat16 on a GPU, float32 on the CPU.")
    parser.add_argument("--json", action="store_true", help="One JSON object: {\"branches\": [...]}.")


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1 or args.temperature < 0:
        print("paratrain generate: --max_new_tokens must be >= 1 and --temperature >= 0", file=sys.stderr)
        return exit_codes.BAD_INPUT
    try:
        device = torch.device(args.device)
    except RuntimeError:
        print(f"paratrain generate: --device {args.device}: not a device (e.g. cpu, cuda, cuda:1)", file=sys.stderr)
        return exit_codes.BAD_INPUT
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        print(f"paratrain generate: --device {args.device}: this machine's torch sees "
              f"{torch.cuda.device_count() or 'no'} CUDA GPU(s); --device cpu, or cuda:0 and up", file=sys.stderr)
        return exit_codes.BAD_INPUT
    quiet_libraries()
    try:
        dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
            torch.bfloat16 if device.type == "cuda" else torch.float32)
        gen = load_generator(args.adapter, args.base_model, device=args.device, dtype=dtype)
        texts = generate_branches(gen, args.main, args.branch, args.max_new_tokens, args.temperature, args.seed)
    except DataError as e:
        print("\n".join(e.lines), file=sys.stderr)
        return exit_codes.BAD_INPUT
    except ValueError as e:
        print(f"paratrain generate: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    if args.json:
        print(json.dumps({"branches": [start + text for start, text in zip(args.branch, texts)]}))
    else:
        for i, (start, text) in enumerate(zip(args.branch, texts), start=1):
            print(f"[branch {i}] {start}{text}")
    return exit_codes.OK
