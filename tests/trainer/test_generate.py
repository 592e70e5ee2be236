"""Generating with a trained adapter: branches continued as training laid them out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from trainer_core.config import TrainConfig
from trainer_core.generate import generate_branch_ids, generate_branches, load_generator
from trainer_core.layout import build_sample_layout
from trainer_core.model import build_lora_model, parallel_logits, save_adapter_dir


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir, demo_data_path):
    """The tiny model's adapter at rope_2d_ratio 0.5, with LoRA B given weight (a trained adapter's is not 0)."""
    cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path), rope_2d_ratio=0.5)
    model = build_lora_model(cfg, torch.device("cpu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    out = tmp_path_factory.mktemp("run") / "adapter"
    save_adapter_dir(model, out, cfg)
    return out


@pytest.fixture(scope="module")
def gen(adapter_dir):
    return load_generator(adapter_dir)


def until_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def test_one_branch_without_a_main_generates_what_generate_does(gen):
    """One branch and no main is ordinary text: the same tokens as transformers' own greedy generate()."""
    start = gen.tokenizer("The module", add_special_tokens=False)["input_ids"]
    ours = generate_branch_ids(gen, [], [start], max_new_tokens=8)[0]
    theirs = gen.model.generate(input_ids=torch.tensor([start]), attention_mask=torch.ones(1, len(start), dtype=torch.long),
                                max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(start):].tolist()
    eos = gen.tokenizer.eos_token_id
    assert until_eos(ours, eos) == until_eos(theirs, eos)


def sample_logits(gen, main: list[int], branches: list[list[int]]):
    layout = build_sample_layout(main, branches, gen.branch_stride)
    logits = parallel_logits(gen.model, *(t[None] for t in (layout.input_ids, layout.pos1d, layout.branch_pos,
                                                            layout.time_ids)), torch.zeros(1, len(layout),
                                                                                           dtype=torch.long))[0]

    def at(k: int, time: int) -> torch.Tensor:
        """The logits at branch k's token of that time (the main, when there is one, is sequence 0)."""
        branch_pos = (k + (1 if main else 0)) * gen.branch_stride
        return logits[((layout.branch_pos == branch_pos) & (layout.time_ids == time)).nonzero().item()]
    return at


def assert_finished_sample_predicts_every_new_token(gen, main, starts, new, eos=None):
    eos = gen.tokenizer.eos_token_id if eos is None else eos
    at = sample_logits(gen, main, [s + [t for t in n if t != eos] for s, n in zip(starts, new)])
    for k, (start, added) in enumerate(zip(starts, new)):
        for j, token in enumerate(added):
            assert at(k, len(main) + len(start) + j - 1).argmax().item() == token, (k, j)


@pytest.mark.parametrize("lengths", [(2, 2, 2), (1, 4, 2)], ids=["equal starts", "starts of 1, 4 and 2 tokens"])
def test_each_new_token_is_what_the_finished_sample_predicts_there(gen, lengths):
    """Laid out as training lays it out, the finished sample predicts every generated token at the token before
    it: the columns fill in order (shorter starts catch up first), and a token sees only earlier columns and
    itself, so nothing generated later changes what it predicted."""
    encode = lambda text: gen.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    main = encode("Parallel branches share a main text.")
    starts = [encode(text)[:n] for text, n in zip(("First of all", "A longer start here", "x y z"), lengths)]
    assert [len(s) for s in starts] == list(lengths)
    new = generate_branch_ids(gen, main, starts, max_new_tokens=6)
    assert [len(ids) for ids in new] == [6, 6, 6]
    assert_finished_sample_predicts_every_new_token(gen, main, starts, new)
    # without a main, too; and sampling follows its seed
    no_main = generate_branch_ids(gen, [], starts, max_new_tokens=3)
    assert_finished_sample_predicts_every_new_token(gen, [], starts, no_main)
    assert generate_branch_ids(gen, main, starts, 4, temperature=1.0, seed=3) == \
        generate_branch_ids(gen, main, starts, 4, temperature=1.0, seed=3)


def test_a_branch_ends_at_the_end_of_sequence_token_which_stays_out_of_the_sample(gen):
    """Training has no end-of-sequence token in a sample: one generated ends its branch and is not laid out,
    while the other branches go on."""
    encode = lambda text: gen.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    main, starts = encode("Two branches."), [encode("First"), encode("Second")]
    free = generate_branch_ids(gen, main, starts, max_new_tokens=5)
    eos = free[0][1]     # take branch 1's second new token for the end token: it stops at its first one
    new = generate_branch_ids(gen, main, starts, max_new_tokens=5, eos_token_id=eos)
    assert new[0] == free[0][:free[0].index(eos) + 1]          # ended by the token, which is returned
    assert len(new[1]) == 5 or new[1][-1] == eos               # the other branch went on to its own end
    assert_finished_sample_predicts_every_new_token(gen, main, starts, new, eos)


def test_a_branch_without_a_start_is_refused(gen):
    with pytest.raises(ValueError, match="branch 2: give it a start of at least one token"):
        generate_branches(gen, "main", ["a", ""], max_new_tokens=2)


def test_paratrain_generate_prints_each_branch(adapter_dir, tmp_path):
    paratrain = [sys.executable, "-m", "paratrain", "generate"]
    proc = subprocess.run([*paratrain, "--adapter", str(adapter_dir), "--main", "Two answers:", "--branch", "One",
                           "--branch", "Two", "--max_new_tokens", "3", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    branches = json.loads(proc.stdout)["branches"]
    assert len(branches) == 2 and branches[0].startswith("One") and branches[1].startswith("Two")
    assert "Loading weights" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr  # no library chatter
    missing = subprocess.run([*paratrain, "--adapter", str(tmp_path), "--branch", "a"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and f"{tmp_path}: not a paratrain adapter directory" in missing.stderr
    assert "Traceback" not in missing.stderr
    # a device this machine lacks, or no device at all: one line, not a 38-line traceback
    for device, said in [("gpu", "--device gpu: not a device"), ("cuda:64", "cuda:64: this machine's torch sees")]:
        wrong = subprocess.run([*paratrain, "--adapter", str(adapter_dir), "--branch", "a", "--device", device],
                               capture_output=True, text=True, timeout=120)
        assert wrong.returncode == 2 and said in wrong.stderr and len(wrong.stderr.splitlines()) == 1, wrong.stderr


def test_a_file_or_a_broken_rope2d_json_is_no_adapter_named_in_one_line(tmp_path):
    """`--adapter out/lora/x_final.pth` (a file, not the adapter dir) or a cut-short rope2d.json: a DataError
    naming it, not a NotADirectoryError or JSONDecodeError traceback."""
    from trainer_core.data import DataError
    from trainer_core.model import read_adapter_settings

    pth = tmp_path / "x_final.pth"
    pth.write_bytes(b"\0")
    broken = tmp_path / "adapter"
    broken.mkdir()
    (broken / "rope2d.json").write_text('{"rope_2d_ratio": 0.5,')
    for path, message in ((pth, "x_final.pth: a file; an adapter is a directory"),
                          (broken, "rope2d.json: not readable as JSON")):
        with pytest.raises(DataError) as refused:
            read_adapter_settings(path)
        assert message in refused.value.lines[0], refused.value.lines


def test_a_missing_adapter_an_output_dir_a_cut_short_adapter_or_a_moved_base_model_is_one_line(adapter_dir,
                                                                                            tmp_path):
    """What a walkthrough met: an adapter that is not there said "no rope2d.json"; a run's output dir did not
    say where its adapter is; a cut-short adapter_model.safetensors was a SafetensorError traceback; a base model
    that moved blamed a --base_model never given."""
    import shutil

    from trainer_core.data import DataError

    out = tmp_path / "out"
    shutil.copytree(adapter_dir, out / "adapter")
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"\xff" * 16)
    moved = tmp_path / "moved"
    shutil.copytree(adapter_dir, moved)
    settings = json.loads((moved / "rope2d.json").read_text())
    (moved / "rope2d.json").write_text(json.dumps({**settings, "base_model": str(tmp_path / "gone-model")}))
    for path, message in [(tmp_path / "cancelled" / "adapter", "cancelled/adapter: no such directory (a run writes"),
                          (out, f"out: a run's output directory; its adapter is {out / 'adapter'}"),
                          (out / "adapter", "adapter_model.safetensors: not readable ("),
                          (moved, "gone-model: no such directory: the base model the adapter was trained on")]:
        with pytest.raises(DataError) as refused:
            load_generator(path)
        assert message in refused.value.lines[0], refused.value.lines
    assert "give its copy with --base_model" in refused.value.lines[0]
    with pytest.raises(DataError, match=f"--base_model {tmp_path / 'nope'}: no such directory$"):
        load_generator(moved, base_model=str(tmp_path / "nope"))
