"""The validation loss (--val_ratio, --val_data_path, --eval_interval), from real trainer processes on CPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer_core.config import TrainConfig
from trainer_core.data import (build_samples, collate_batch, load_or_tokenize, load_tokenizer, sample_token_ids,
                               split_validation)
from trainer_core.generate import Generator
from trainer_core.layout import IGNORE_INDEX
from trainer_core.model import load_adapter_dir, parallel_logits
from trainer_core.samples import continue_sample, continue_samples

pytestmark = pytest.mark.slow


def train(out, model, data, *flags) -> list[dict]:
    """`python -m trainer_core.train` with the guide's quick-start data flags; its metric records."""
    proc = subprocess.run([sys.executable, "-m", "trainer_core.train", "--base_model", str(model), "--data_path",
                           str(data), "--batch_size", "4", "--batch_by_samples", "--max_branches_per_sample", "8",
                           "--learning_rate", "2e-2", "--output_dir", str(out), *flags],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r for r in map(json.loads, proc.stdout.splitlines()) if "step" in r and "event" not in r]


def loss_per_token(model, ds, samples, cfg: TrainConfig) -> float:
    """The mean cross-entropy per label token over `samples`, one sample at a time from full logits: another
    way to the number than the trainer's (batched, packed, chunked)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(len(samples)):
            batch = collate_batch(ds, samples, [s], cfg)
            logits = parallel_logits(model, batch.input_ids, batch.pos1d, batch.branch_pos, batch.time_ids,
                                     batch.sample_ids)
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((batch.labels != IGNORE_INDEX).sum())
    return total / count


def test_held_out_samples_give_the_saved_adapters_loss_before_during_and_after_training(tmp_path, tiny_model_dir,
                                                                                      demo_data_path):
    out = tmp_path / "out"
    records = train(out, tiny_model_dir, demo_data_path, "--val_ratio", "0.2", "--max_steps", "7",
                    "--eval_interval", "3", "--log_interval", "2")
    # evaluated before the first step, every 3 steps and after the last; a step evaluated is logged even
    # off the log interval, and the validation loss is in metrics.jsonl as on stdout
    assert [r["step"] for r in records if r.get("val_loss") is not None] == [0, 3, 6, 7]
    assert [r["step"] for r in records] == [0, 2, 3, 4, 6, 7]
    assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] == records

    cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path), max_branches_per_sample=8,
                      val_ratio=0.2)
    ds = load_or_tokenize(cfg.data_path, cfg.base_model, cfg.max_seq_len)
    _, held_out = split_validation(build_samples(ds, cfg), cfg.val_ratio, cfg.seed)
    model = load_adapter_dir(str(tiny_model_dir), out / "adapter")
    after = loss_per_token(model, ds, held_out, cfg)
    with model.disable_adapter():   # step 0: LoRA B starts at zero, so the base model (with the 2D RoPE patch)
        before = loss_per_token(model, ds, held_out, cfg)
    assert records[-1]["val_loss"] == pytest.approx(after, abs=2e-5)
    assert records[0]["val_loss"] == pytest.approx(before, abs=2e-5)
    assert records[0]["loss"] is None and after < before   # trained on the rest, it predicts the held-out better

    # after training, the first held-out samples continued by the trained model (greedy, the default count
    # and length) beside what the data has there; the saved adapter writes the same
    written = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    gen = Generator(model, load_tokenizer(str(tiny_model_dir)), cfg.branch_stride)
    decode = lambda ids: gen.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert len(written) == 2
    for record in written:
        main, branches = sample_token_ids(ds, held_out, record["sample"])
        branches = [b.tolist() for b in branches]
        assert (record["step"], record["source"], record["main"]) == (7, "validation", decode(main.tolist()))
        assert record["branches"] == continue_sample(gen, main.tolist(), branches, new_tokens=32)
        for branch, ids in zip(record["branches"], branches):
            assert decode(ids).startswith(branch["start"] + branch["data"])
            assert len(gen.tokenizer(branch["generated"], add_special_tokens=False)["input_ids"]) <= 34
    # a stop signal ends the work within a token (a cancel must not outlast the worker's grace period), and a
    # sample cut short is not one
    asked = []
    stop_at_third_token = lambda: asked.append(1) or len(asked) > 3  # noqa: E731
    assert continue_samples(gen, (ds, held_out), source="validation", count=2, new_tokens=32, step=7,
                            should_stop=stop_at_third_token) == []
    assert len(asked) < 8


def test_a_validation_file_changes_nothing_in_training_and_ranks_share_its_samples(tmp_path, tiny_model_dir,
                                                                                   demo_data_path):
    val_file = tmp_path / "val.jsonl"
    lines = demo_data_path.read_text().splitlines(True)
    val_file.write_text("".join(line for i, line in enumerate(lines) if i % 7 == 0))
    # with LoRA dropout, training left in eval mode after a validation would train other losses
    common = ("--max_steps", "4", "--eval_interval", "2", "--lora_dropout", "0.1")
    plain = train(tmp_path / "plain", tiny_model_dir, demo_data_path, *common)
    validated = train(tmp_path / "val", tiny_model_dir, demo_data_path, *common, "--val_data_path", str(val_file))
    trained = [r for r in validated if r["step"] > 0]
    for key in ("loss", "grad_norm", "lr"):   # evaluating (eval mode, no gradients) leaves the training alone
        assert [r[key] for r in trained] == [r[key] for r in plain], key
    assert [r["step"] for r in validated if r.get("val_loss") is not None] == [0, 2, 4]

    # two ranks evaluate a share each: the same loss and label tokens as one process, so every sample counts once
    ddp = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
                          "-m", "trainer_core.train", "--base_model", str(tiny_model_dir), "--data_path",
                          str(demo_data_path), "--batch_size", "4", "--batch_by_samples", "--max_branches_per_sample",
                          "8", "--output_dir", str(tmp_path / "ddp"), "--max_steps", "30", "--val_data_path",
                          str(val_file), "--ddp", "--eval_interval", "1", "--early_stop_patience", "1",
                          "--learning_rate", "0.5"], capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # rank 0 decides to stop early (it alone holds the lowest loss); both ranks stop there, neither hangs
    done = json.loads(ddp.stdout.splitlines()[-1])
    assert done["event"] == "done" and done["stopped_early"] and done["step"] < 30, ddp.stdout[-2000:]
    step0 = next(json.loads(line) for line in ddp.stdout.splitlines() if line.startswith('{"step": 0'))
    assert step0["val_tokens"] == validated[0]["val_tokens"] > 0
    assert step0["val_loss"] == pytest.approx(validated[0]["val_loss"], abs=1e-5)


def test_a_resumed_run_validates_on_and_a_fresh_start_keeps_no_earlier_line(tmp_path, tiny_model_dir,
                                                                          demo_data_path):
    out = tmp_path / "out"
    train(out, tiny_model_dir, demo_data_path, "--val_ratio", "0.2", "--max_steps", "2", "--eval_interval", "2")
    longer = train(out, tiny_model_dir, demo_data_path, "--val_ratio", "0.2", "--max_steps", "4",
                   "--eval_interval", "3")   # how often it validates may change on resume; no second step 0
    assert [r["step"] for r in longer] == [3, 4] and all("val_loss" in r for r in longer)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in lines if "val_loss" in r] == [0, 2, 3, 4]
    # which samples are held out defines the run: another ratio is another run's checkpoint
    refused = subprocess.run([sys.executable, "-m", "trainer_core.train", "--base_model", str(tiny_model_dir),
                              "--data_path", str(demo_data_path), "--batch_size", "4", "--batch_by_samples",
                              "--max_branches_per_sample", "8", "--learning_rate", "2e-2", "--output_dir", str(out),
                              "--val_ratio", "0.3", "--max_steps", "6"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "val_ratio 0.2 -> 0.3" in refused.stderr, refused.stderr[-2000:]
    # starting afresh, without a validation set: no line of the earlier run stays, step 0's included
    train(out, tiny_model_dir, demo_data_path, "--max_steps", "2", "--no-resume")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_checkpoint_saved_before_validation_existed_held_nothing_out():
    """Its run identity has no val_ratio: it trained on every sample, so it resumes only without one."""
    from trainer_core.data import DataError
    from trainer_core.train import check_resume_identity

    saved = {"lora_rank": 8, "seed": 42}
    check_resume_identity(Path("ckpt"), saved, {"lora_rank": 8, "seed": 42, "val_ratio": 0.0})
    with pytest.raises(DataError, match=r"val_ratio 0.0 -> 0.2"):
        check_resume_identity(Path("ckpt"), saved, {"lora_rank": 8, "seed": 42, "val_ratio": 0.2})
    check_resume_identity(Path("ckpt"), saved, {"lora_rank": 8, "seed": 42, "world_size": 2})   # not a field


def test_a_run_taken_over_or_stopped_while_it_validates_writes_nothing_of_that_step(tmp_path, monkeypatch, capsys,
                                                                                   tiny_model_dir, demo_data_path):
    """A validation can take minutes; a newer run claiming the directory meanwhile must get it untouched."""
    from trainer_core import exit_codes, owner
    from trainer_core import train as train_module
    from trainer_core.dist import DistEnv

    one_process = DistEnv(False, 0, 0, 1, torch.device("cpu"))
    validate = train_module.validation_loss

    def cfg(out):
        return TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path), output_dir=str(out),
                           max_steps=4, batch_size=2, batch_by_samples=True, val_ratio=0.1, eval_interval=2,
                           save_interval=2)

    def at_step_2(action):
        calls = []

        def validation_loss(*args):
            calls.append(1)
            if len(calls) == 2:   # the validations are before step 1, then at step 2
                action()
            return validate(*args)
        monkeypatch.setattr(train_module, "validation_loss", validation_loss)

    out = tmp_path / "taken"
    at_step_2(lambda: owner.claim(out))
    assert train_module.train(cfg(out), one_process, train_module.StopFlag()) == exit_codes.SUPERSEDED
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert not (out / "checkpoints").exists()
    # a stop during it: the validation is left (a long one outlasted the worker's grace period, and the
    # checkpoint was lost) and the step's checkpoint saved at once, not a step later
    out = tmp_path / "stopped"
    stop = train_module.StopFlag()
    capsys.readouterr()
    at_step_2(lambda: setattr(stop, "requested", True))
    assert train_module.train(cfg(out), one_process, stop) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
    assert "stop requested: this validation is left unfinished" in capsys.readouterr().err
    assert [json.loads(line).get("val_loss") for line in (out / "metrics.jsonl").read_text().splitlines()][-1] is None
    # resumed, the run validates step 2 first: its point (completed, not repeated), adapter_best/ and the early
    # stop's count must not miss it
    monkeypatch.setattr(train_module, "validation_loss", validate)
    assert train_module.train(cfg(out), one_process, train_module.StopFlag()) == 0
    assert "step 2/4 | val loss" in capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4]
    assert lines[2]["val_loss"] is not None and lines[2]["loss"] is not None   # step 2's training loss kept


def test_a_validation_out_of_memory_is_skipped_and_training_goes_on(tmp_path, monkeypatch, capsys, tiny_model_dir,
                                                                     demo_data_path):
    from trainer_core import model as model_module
    from trainer_core import train as train_module
    from trainer_core.dist import DistEnv

    forward = model_module.ParallelBranchLM.forward

    def forward_without_room_to_validate(self, *args, **kwargs):
        if not self.peft_model.training:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(model_module.ParallelBranchLM, "forward", forward_without_room_to_validate)
    out = tmp_path / "out"
    cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path), output_dir=str(out),
                      max_steps=3, batch_size=2, batch_by_samples=True, val_ratio=0.1, eval_interval=2)
    assert train_module.train(cfg, DistEnv(False, 0, 0, 1, torch.device("cpu")), train_module.StopFlag()) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and not any("val_loss" in r for r in lines)
    assert capsys.readouterr().err.count("the validation ran out of memory and is skipped") == 3   # steps 0, 2, 3
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_samples_come_from_the_training_set_without_a_validation_set_and_cannot_fail_a_run(
        tmp_path, monkeypatch, capsys, tiny_model_dir, demo_data_path):
    """Samples are written after the adapter: an error there (out of memory on a long sample) is a warning
    and the run succeeds; --sample_count 0 writes none."""
    from trainer_core import train as train_module
    from trainer_core.dist import DistEnv

    def run(out, **fields) -> int:
        cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path), output_dir=str(out),
                          max_steps=2, batch_size=2, batch_by_samples=True, **fields)
        return train_module.train(cfg, DistEnv(False, 0, 0, 1, torch.device("cpu")), train_module.StopFlag())

    assert run(tmp_path / "one", sample_count=1, sample_new_tokens=3) == 0
    [record] = [json.loads(line) for line in (tmp_path / "one" / "samples.jsonl").read_text().splitlines()]
    assert (record["source"], record["sample"], record["step"]) == ("training", 0, 2)
    assert "samples: 1 training sample(s) continued by up to 3 tokens a branch" in capsys.readouterr().err
    # none with --sample_count 0, and none left of an earlier run: it would pass for this adapter's
    assert run(tmp_path / "one", sample_count=0) == 0   # the same run at its end: its final outputs again
    assert not (tmp_path / "one" / "samples.jsonl").exists()
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "samples.jsonl").write_text('{"step": 1}\n')
    assert run(tmp_path / "none", sample_count=0, resume=False) == 0
    assert (tmp_path / "none" / "adapter").is_dir() and not (tmp_path / "none" / "samples.jsonl").exists()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
    monkeypatch.setattr(train_module, "continue_samples", out_of_memory)
    assert run(tmp_path / "oom") == 0
    assert "warning: no samples written (OutOfMemoryError: CUDA out of memory." in capsys.readouterr().err
    assert (tmp_path / "oom" / "adapter" / "adapter_model.safetensors").exists()


def test_a_validation_file_that_is_the_training_data_is_warned_about(tmp_path, capsys, tiny_model_dir,
                                                                     demo_data_path):
    from trainer_core import train as train_module
    from trainer_core.dist import DistEnv

    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(demo_data_path.read_bytes())   # by content, not by name
    cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path), val_data_path=str(copy),
                      output_dir=str(tmp_path / "out"))
    (_, samples), (_, val_samples), _ = train_module.prepare_data(cfg, DistEnv(False, 0, 0, 1, torch.device("cpu")))
    assert len(val_samples) == len(samples)
    assert f"--val_data_path {copy} holds the same as --data_path" in capsys.readouterr().err


def test_the_adapter_with_the_lowest_validation_loss_is_kept_across_a_resume(tmp_path, monkeypatch, capsys,
                                                                             tiny_model_dir, demo_data_path):
    """adapter_best/ holds the weights of the step whose validation loss was lowest (here scripted: 7.0 before
    training, 6.0 at step 2, then worse), also when the run resumes past it."""
    from safetensors.torch import load_file

    from trainer_core import train as train_module
    from trainer_core.dist import DistEnv

    losses = iter([7.0, 6.0, 6.5, 6.2])   # before training, steps 2 and 4, then step 6 after the resume
    monkeypatch.setattr(train_module, "validation_loss", lambda *args: (next(losses), 100))
    out = tmp_path / "out"

    def run(max_steps: int) -> dict:
        cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path), output_dir=str(out),
                          max_steps=max_steps, batch_size=2, batch_by_samples=True, val_ratio=0.1, eval_interval=2,
                          save_interval=2, learning_rate=2e-2)
        capsys.readouterr()
        assert train_module.train(cfg, DistEnv(False, 0, 0, 1, torch.device("cpu")), train_module.StopFlag()) == 0
        return next(r for r in map(json.loads, capsys.readouterr().out.splitlines()) if r.get("event") == "done")

    done = run(4)
    assert (done["best_step"], done["best_val_loss"], done["best_adapter_dir"]) == (2, 6.0, str(out / "adapter_best"))
    best = load_file(out / "adapter_best" / "adapter_model.safetensors")
    at_step_2 = load_file(out / "checkpoints" / "step_00000002" / "adapter.safetensors")
    assert best.keys() == at_step_2.keys() and all(torch.equal(best[k], at_step_2[k]) for k in best)
    assert not all(torch.equal(best[k], v) for k, v in load_file(out / "checkpoints" / "step_00000004" /
                                                                  "adapter.safetensors").items())
    record = json.loads((out / "adapter_best" / "validation.json").read_text())
    assert (record["step"], record["val_loss"]) == (2, 6.0) and "val_ratio 0.1, seed 42" in record["val_set"]
    assert json.loads((out / "adapter_best" / "rope2d.json").read_text())["rope_2d_ratio"] == 0.5   # loadable
    readme = (out / "adapter_best" / "README.md").read_text()
    assert "This is the adapter of step 2, the lowest validation loss" in readme
    done = run(6)   # resumed at step 4: step 6's 6.2 is no better than step 2's 6.0
    assert (done["best_step"], done["best_val_loss"]) == (2, 6.0)
    assert json.loads((out / "adapter_best" / "validation.json").read_text())["step"] == 2


def test_a_best_adapter_counts_only_for_its_validation_set_and_steps_not_trained_again(tmp_path):
    """Its record is ignored when it was saved after the checkpoint a resume starts from (a crash lost those
    steps), measured another validation set (--val_data_path changed on resume), or lacks its weights."""
    from trainer_core.train import BEST_FILE, read_best, validation_set_id

    (tmp_path / BEST_FILE).write_text(json.dumps({"step": 6, "val_loss": 5.5, "val_set": "A"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    assert read_best(tmp_path, up_to_step=6, val_set="A") == (5.5, 6)
    assert read_best(tmp_path, up_to_step=5, val_set="A") is None
    assert read_best(tmp_path, up_to_step=9, val_set="B") is None
    assert read_best(tmp_path / "missing", up_to_step=9, val_set="A") is None
    (tmp_path / "adapter_model.safetensors").unlink()   # a directory a kill left half deleted
    assert read_best(tmp_path, up_to_step=9, val_set="A") is None
    (tmp_path / BEST_FILE).write_text("{not json")
    assert read_best(tmp_path, up_to_step=9, val_set="A") is None
    # the set: another file's content, or another held-out share or seed, is another set
    one, other = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    one.write_text('{"text": "a"}\n')
    other.write_text('{"text": "b"}\n')
    ids = {validation_set_id(TrainConfig(base_model="m", data_path="d", **fields), "f00d")
           for fields in ({"val_data_path": str(one)}, {"val_data_path": str(other)}, {"val_ratio": 0.1},
                          {"val_ratio": 0.2}, {"val_ratio": 0.1, "seed": 1})}
    assert len(ids) == 5


def test_a_run_starting_afresh_keeps_no_earlier_best_adapter(tmp_path, monkeypatch, capsys, tiny_model_dir,
                                                              demo_data_path):
    from trainer_core import train as train_module
    from trainer_core.dist import DistEnv

    out = tmp_path / "out"
    for name in ("adapter_best", ".adapter_best.tmp"):   # an earlier run's, and what a kill left of one
        (out / name).mkdir(parents=True)
        (out / name / "validation.json").write_text(json.dumps({"step": 1, "val_loss": 1.0, "val_set": "x"}))
    monkeypatch.setattr(train_module, "validation_loss", lambda *args: None)   # every validation out of memory
    cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path), output_dir=str(out),
                      max_steps=2, batch_size=2, batch_by_samples=True, val_ratio=0.1)
    assert train_module.train(cfg, DistEnv(False, 0, 0, 1, torch.device("cpu")), train_module.StopFlag()) == 0
    done = next(r for r in map(json.loads, capsys.readouterr().out.splitlines()) if r.get("event") == "done")
    assert "best_step" not in done
    assert not (out / "adapter_best").exists() and not (out / ".adapter_best.tmp").exists()


def test_early_stopping_ends_the_run_after_the_patience_and_a_rerun_stops_there_too(tmp_path, monkeypatch, capsys,
                                                                                    tiny_model_dir, demo_data_path):
    """--early_stop_patience 2 with scripted losses 7.0 (before training), 6.0, 6.5, 6.2: two validations
    without a new lowest after step 1 end the run at step 3, with its final outputs; the count is in the
    checkpoint, so the same run started again stops there at once, and a larger patience trains on."""
    from trainer_core import train as train_module
    from trainer_core.dist import DistEnv

    out = tmp_path / "out"

    def run(patience: int, losses: list[float], min_delta: float = 0.0, out=out) -> tuple[list[dict], str]:
        scripted = iter(losses)   # StopIteration (a failed run) on a validation not scripted
        monkeypatch.setattr(train_module, "validation_loss", lambda *args: (next(scripted), 100))
        cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path), output_dir=str(out),
                          max_steps=10, batch_size=2, batch_by_samples=True, val_ratio=0.1, eval_interval=1,
                          save_interval=100, early_stop_patience=patience, early_stop_min_delta=min_delta)
        capsys.readouterr()
        assert train_module.train(cfg, DistEnv(False, 0, 0, 1, torch.device("cpu")), train_module.StopFlag()) == 0
        assert next(scripted, None) is None   # every scripted validation ran
        printed = capsys.readouterr()
        return [json.loads(line) for line in printed.out.splitlines()], printed.err

    records, err = run(2, [7.0, 6.0, 6.5, 6.2])
    assert [r["step"] for r in records if "val_loss" in r] == [0, 1, 2, 3]
    done = records[-1]
    assert (done["event"], done["step"], done["stopped_early"], done["best_step"]) == ("done", 3, True, 1)
    assert ("early stop at step 3/10: the validation loss has not improved on the lowest, 6.0000 (step 1), in 2 "
            "validations") in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    final = (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns

    records, err = run(2, [])   # again: no step trained, no validation, the final outputs written again
    assert records[-1]["event"] == "done" and records[-1]["stopped_early"] and records[-1]["step"] == 3
    assert "not training on from" in err and "has not improved on the lowest, 6.0000 (step 1), in 2 validations" in err
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns > final

    records, err = run(3, [6.3])   # the count goes on from the checkpoint's 2: step 4 is the third
    assert [r["step"] for r in records if "val_loss" in r] == [4] and records[-1]["step"] == 4
    assert records[-1]["stopped_early"] and "in 3 validations (--early_stop_patience 3)" in err

    shutil.rmtree(out / "adapter_best")   # no lowest to compare with: the count starts again, and says so
    records, err = run(3, [6.3, 6.4, 6.5, 6.6])
    assert "the early stop's count (3 validations without a lower loss) starts again" in err
    assert records[-1]["step"] == 8 and records[-1]["best_step"] == 5

    # a loss that creeps down by less than early_stop_min_delta stops too; adapter_best/ keeps the lowest
    records, err = run(2, [7.0, 6.98, 6.96], min_delta=0.05, out=tmp_path / "creeping")
    assert (records[-1]["step"], records[-1]["stopped_early"], records[-1]["best_step"]) == (2, True, 2)
    assert ("in 2 validations the validation loss has not fallen below the lowest before it by more than 0.05 "
            "(lowest now 6.9600 (step 2)") in err


def test_the_lowest_loss_record_counts_validations_since_it():
    from trainer_core.train import LowestLoss

    lowest = LowestLoss()
    assert [lowest.add(loss, step) for step, loss in enumerate([7.0, 7.0, 6.5, float("nan"), 6.6])] == [
        True, False, True, False, False]   # equal is no lower; a NaN counts as no lower
    assert lowest.best == (6.5, 2) and lowest.since_best == 2
    assert lowest.out_of(2) and not lowest.out_of(3) and not lowest.out_of(0)   # 0: no early stop
    # with a min_delta, a lower loss by less is the new lowest (adapter_best/) but no improvement to the count
    creeping = LowestLoss(min_delta=0.05)
    assert [creeping.add(loss, step) for step, loss in enumerate([7.0, 6.98, 6.96, 6.90, 6.89])] == [True] * 5
    assert creeping.best == (6.89, 4) and creeping.since_best == 1   # 6.90 was 0.06 below 6.96: the last improvement
    assert "by more than 0.05 (lowest now 6.8900 (step 4); --early_stop_patience 1)" in creeping.describe(1)


def test_a_nan_validation_loss_is_never_the_lowest(tmp_path, monkeypatch, capsys, tiny_model_dir, demo_data_path):
    from trainer_core import train as train_module
    from trainer_core.dist import DistEnv

    losses = iter([float("nan"), 6.0, 5.0, 5.5, 5.6])   # before training (NaN), then steps 1 to 4
    monkeypatch.setattr(train_module, "validation_loss", lambda *args: (next(losses), 100))
    cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path), output_dir=str(tmp_path),
                      max_steps=10, batch_size=2, batch_by_samples=True, val_ratio=0.1, eval_interval=1,
                      early_stop_patience=2)
    assert train_module.train(cfg, DistEnv(False, 0, 0, 1, torch.device("cpu")), train_module.StopFlag()) == 0
    done = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (done["step"], done["best_step"], done["best_val_loss"]) == (4, 2, 5.0)
