"""The trainer as users run it: real `torchrun` / `python -m trainer_core.train` processes on CPU."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer_core.config import TrainConfig
from trainer_core.data import build_samples, collate_batch, load_or_tokenize
from trainer_core.model import load_adapter_dir, load_pth, parallel_logits

pytestmark = pytest.mark.slow
PYTHON = sys.executable
BIN = Path(PYTHON).parent


def guide_args(model, data, out, *extra):
    """The guide's quick-start flags (script path replaced), plus a step limit to keep it short."""
    return ["--base_model", str(model), "--data_path", str(data), "--lora_rank", "8", "--batch_size", "4",
            "--batch_by_samples", "--max_branches_per_sample", "16", "--rope_2d_ratio", "0.5", "--epochs", "1",
            "--output_dir", str(out), *extra]


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]


def test_guide_quick_start_under_torchrun_ddp(tmp_path, tiny_model_dir, demo_data_path):
    out = tmp_path / "out"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "trainer_core.train",
           *guide_args(tiny_model_dir, demo_data_path, out, "--ddp", "--max_steps", "10", "--learning_rate", "2e-2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json_lines(proc.stdout)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2 - 0.02, losses     # loss falls
    assert all(set(r) >= {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "gpu_mem_gb", "eta_s",
                          "time", "tokens"}
               for r in records if "loss" in r)
    points = [r for r in records if "loss" in r]   # plottable against wall-clock time and tokens seen
    assert all(a["time"] <= b["time"] for a, b in zip(points, points[1:])) and all(r["tokens"] > 0 for r in points)
    done = records[-1]
    assert done["event"] == "done"
    digests = done["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]                 # both ranks ended identical
    metrics_file = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics_file] == list(range(1, 11))

    # One process accumulating 2 micro-batches per step sees the same batches per step as the 2 ranks, so
    # it must train the same: the loss is normalised over the step's label tokens across micro-batches and
    # ranks, and DDP's averaging over ranks is undone. Any slip there shows in the loss or gradient norm.
    single = subprocess.run([PYTHON, "-m", "trainer_core.train", *guide_args(
        tiny_model_dir, demo_data_path, tmp_path / "single", "--accumulation_steps", "2", "--max_steps", "10",
        "--learning_rate", "2e-2")], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    single_steps = [r for r in json_lines(single.stdout) if "loss" in r]
    ddp_steps = [r for r in records if "loss" in r]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in single_steps] == pytest.approx([r[key] for r in ddp_steps], rel=1e-3), key

    # The guide's outputs exist, and both load back (PEFT + the patch) to the logits of the end of training.
    final_pth = out / "lora" / f"paratrain_{tiny_model_dir.name}_final.pth"
    assert final_pth.exists() and (out / "lora" / f"paratrain_{tiny_model_dir.name}.pth").exists()
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    cfg = TrainConfig.from_cli(guide_args(tiny_model_dir, demo_data_path, out))
    ds = load_or_tokenize(cfg.data_path, cfg.base_model, cfg.max_seq_len)
    batch = collate_batch(ds, build_samples(ds, cfg), [0], cfg)
    args = (batch.input_ids, batch.pos1d, batch.branch_pos, batch.time_ids, batch.sample_ids)
    with torch.no_grad():
        from_dir = parallel_logits(load_adapter_dir(str(tiny_model_dir), out / "adapter"), *args)
        from_pth = parallel_logits(load_pth(str(tiny_model_dir), final_pth, cfg), *args)
    want = torch.tensor(done["probe_logits"])
    last = int((batch.sample_ids[0] >= 0).sum()) - 1        # the sample's last real token, not padding
    torch.testing.assert_close(from_dir[0, last, :8], want, atol=1e-4, rtol=0)
    torch.testing.assert_close(from_pth, from_dir)


def test_bad_line_fails_fast_with_file_and_line(tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n{"text": "four"}\n')
    t0 = time.time()
    proc = subprocess.run([PYTHON, "-m", "trainer_core.train", "--base_model", str(tiny_model_dir),
                           "--data_path", str(data), "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{data}:3: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert time.time() - t0 < 60


def test_missing_model_directory_is_a_clear_error(tmp_path, demo_data_path):
    proc = subprocess.run([PYTHON, "-m", "trainer_core.train", "--base_model", str(tmp_path / "nope"),
                           "--data_path", str(demo_data_path), "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"--base_model {tmp_path / 'nope'}: no such directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_hub_id_in_the_local_huggingface_cache_trains_offline(tmp_path, tiny_model_dir, demo_data_path):
    """The guide names models by hub id; one already in the HF cache is used from there, nothing downloaded."""
    import os
    import shutil

    hub = tmp_path / "hub"
    snapshot = hub / "models--acme--tiny-lm" / "snapshots" / "0123abc"
    shutil.copytree(tiny_model_dir, snapshot)
    (hub / "models--acme--tiny-lm" / "refs").mkdir()
    (hub / "models--acme--tiny-lm" / "refs" / "main").write_text("0123abc")
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    proc = subprocess.run([PYTHON, "-m", "trainer_core.train", *guide_args("acme/tiny-lm", demo_data_path, out),
                           "--max_steps", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "lora" / "paratrain_tiny-lm_final.pth").exists()     # named after the model, not the snapshot
    # the adapter names the hub id, which resolves on another machine too; the snapshot path would not
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "acme/tiny-lm"
    assert json.loads((out / "adapter" / "rope2d.json").read_text())["base_model"] == "acme/tiny-lm"
    generated = subprocess.run([str(BIN / "paratrain"), "generate", "--adapter", str(out / "adapter"), "--main", "a",
                                "--branch", "b", "--max_new_tokens", "2", "--json"],
                               capture_output=True, text=True, timeout=300, env=env)
    assert generated.returncode == 0, generated.stderr[-2000:]

    missing = subprocess.run([PYTHON, "-m", "trainer_core.train", "--base_model", "acme/other-lm",
                              "--data_path", str(demo_data_path), "--output_dir", str(out)],
                             capture_output=True, text=True, timeout=60, env=env)
    assert missing.returncode == 2 and "nor a model in the local HuggingFace cache" in missing.stderr
    assert "Traceback" not in missing.stderr
    # a server's job: its model was there when it was queued (the server checks), and hub ids are refused there
    gone = subprocess.run([PYTHON, "-m", "trainer_core.train", "--base_model", str(tmp_path / "gone-model"),
                           "--data_path", str(demo_data_path), "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=60, env={**env, "PARATRAIN_JOB_ID": "5"})
    assert gone.returncode == 2 and "moved or deleted since the job was queued?" in gone.stderr, gone.stderr[-2000:]
    assert "hf download" not in gone.stderr


def test_bad_flag_value_names_the_field(tmp_path, tiny_model_dir, demo_data_path):
    proc = subprocess.run([PYTHON, "-m", "trainer_core.train", "--base_model", str(tiny_model_dir),
                           "--data_path", str(demo_data_path), "--rope_2d_ratio", "1.5"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--rope_2d_ratio: Input should be less than or equal to 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_misspelt_flag_is_answered_with_the_flag_it_meant(capsys):
    """Other trainers' spellings and abbreviations: dashes for underscores, initials (--lr)."""
    from paratrain.cli import main as paratrain_main

    for argv, hint in ((["--lora-rank", "4"], "--lora-rank -> --lora_rank"),
                       (["--lr", "1e-3"], "--lr -> --learning_rate or --lora_rank"),
                       (["--max-steps=3"], "--max-steps -> --max_steps")):
        with pytest.raises(SystemExit) as refused:
            TrainConfig.from_cli(["--base_model", "m", "--data_path", "d", *argv])
        assert refused.value.code == 2 and f"(did you mean {hint}?)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:   # the subcommand's flags, too
        paratrain_main(["train", "--base_model", "m", "--data_path", "d", "--lora-rank", "4"])
    assert refused.value.code == 2 and "(did you mean --lora-rank -> --lora_rank?)" in capsys.readouterr().err


def test_paratrain_train_is_the_trainer_in_one_process(tmp_path, tiny_model_dir, demo_data_path):
    out = tmp_path / "out"
    relative_model = tiny_model_dir.name     # as users type it, from the model's parent directory
    data = tmp_path / "data.jsonl"   # the demo, and a record with an empty main
    data.write_text(demo_data_path.read_text() + json.dumps({"main": "", "branches": ["x " * 100, "y"]}) + "\n")
    proc = subprocess.run([str(BIN / "paratrain"), "train", *guide_args(relative_model, data, out),
                           "--max_steps", "2", "--max_seq_len", "32"], capture_output=True, text=True, timeout=300,
                          cwd=tiny_model_dir.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["step"] for r in json_lines(proc.stdout) if "loss" in r] == [1, 2]
    # what the run does to the data and the positions is said, not silent
    assert f"texts of {data} are longer than --max_seq_len 32 and are cut to it" in proc.stderr
    # counted as `paratrain data check` counts them (an empty main was a text to the one, not the other)
    from trainer_core.data_cli import summarize
    checked = summarize(TrainConfig.from_cli(guide_args(tiny_model_dir, data, out, "--max_seq_len", "32")),
                        with_example=False)
    assert f"warning: {checked['truncated_texts']:,} of {checked['texts']:,} texts of" in proc.stderr
    assert "rope_2d_ratio 0.5 (4 of 8 rotary frequency pairs 2D)" in proc.stderr, proc.stderr
    # the adapter names its base model so that it resolves from anywhere, and says how to load it
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert json.loads((out / "adapter" / "rope2d.json").read_text())["base_model"] == str(tiny_model_dir.resolve())
    assert "load_adapter_dir" in (out / "adapter" / "README.md").read_text()
    bad = subprocess.run([str(BIN / "paratrain"), "train", "--base_model", "m", "--data_path", "d", "--seed", "-1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "seed:" in bad.stderr and "Traceback" not in bad.stderr


def test_a_model_whose_weights_file_is_cut_short_is_a_clear_error(tmp_path, tiny_model_dir, demo_data_path):
    """A copy or download that stopped half-way: exit 2 (the worker does not retry) and a message naming the
    directory, not transformers' traceback."""
    import shutil

    model = tmp_path / "half-copied"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = subprocess.run([PYTHON, "-m", "trainer_core.train", "--base_model", str(model), "--data_path",
                           str(demo_data_path), "--max_steps", "1", "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"--base_model {model}: the model does not load (SafetensorError" in proc.stderr, proc.stderr[-2000:]
    assert "are its files complete?" in proc.stderr


def test_a_module_name_the_model_lacks_is_a_clear_error(tmp_path, tiny_model_dir, demo_data_path):
    proc = subprocess.run([PYTHON, "-m", "trainer_core.train", "--base_model", str(tiny_model_dir),
                           "--data_path", str(demo_data_path), "--lora_target_modules", "nonexistent_proj",
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--lora_target_modules nonexistent_proj" in proc.stderr and "q_proj" in proc.stderr
    # one good name and one bad: the list names the model's layers, not the pieces of PEFT's wrappers
    from trainer_core.data import DataError
    from trainer_core.model import build_lora_model

    cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path),
                      lora_target_modules="q_proj,nonexistent_proj")
    with pytest.raises(DataError) as refused:
        build_lora_model(cfg, torch.device("cpu"))
    message = str(refused.value)
    assert message.startswith("--lora_target_modules q_proj,nonexistent_proj: no module named nonexistent_proj")
    assert "q_proj" in message.split("linear layers of this model:")[1], message
    assert "base_layer" not in message and "default" not in message, message


def test_an_output_dir_that_is_a_file_is_a_clear_error(tmp_path, tiny_model_dir, demo_data_path):
    (tmp_path / "taken").write_text("a file\n")
    proc = subprocess.run([PYTHON, "-m", "trainer_core.train", "--base_model", str(tiny_model_dir),
                           "--data_path", str(demo_data_path), "--output_dir", str(tmp_path / "taken")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"--output_dir {tmp_path / 'taken'}: is a file, not a directory" in proc.stderr


def run_until_step(cmd, step: int, stderr_path: Path) -> tuple[int, list[dict]]:
    """Start the trainer, SIGTERM it once it has logged `step`, return (exit code, JSON lines)."""
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
        records = []
        for line in proc.stdout:
            if line.startswith("{"):
                records.append(json.loads(line))
                if records[-1].get("step") == step and "loss" in records[-1]:
                    proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=120), records


def test_sigterm_saves_and_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, demo_data_path):
    def cmd(out):
        return [PYTHON, "-m", "trainer_core.train",
                *guide_args(tiny_model_dir, demo_data_path, out, "--max_steps", "14", "--save_interval", "4",
                            "--learning_rate", "1e-2", "--accumulation_steps", "2", "--epochs", "2")]

    full = subprocess.run(cmd(tmp_path / "full"), capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    full_losses = {r["step"]: r["loss"] for r in json_lines(full.stdout) if "loss" in r}
    full_seen = {r["step"]: r["tokens_seen"] for r in json_lines(full.stdout) if "loss" in r}
    assert list(full_seen.values()) == list(itertools.accumulate(r["tokens"] for r in json_lines(full.stdout)
                                                                 if "loss" in r))

    code, first = run_until_step(cmd(tmp_path / "cut"), step=6, stderr_path=tmp_path / "cut.stderr")
    assert code == 0                                          # SIGTERM: saved and exited cleanly
    # heard at once, though the checkpoint waits for the step's end
    assert "stop requested: a checkpoint is saved when this step ends" in (tmp_path / "cut.stderr").read_text()
    saved = [r for r in first if r.get("event") == "checkpoint"][-1]["step"]
    assert 6 <= saved < 14
    second = subprocess.run(cmd(tmp_path / "cut"), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    records = json_lines(second.stdout)
    assert records[0]["event"] == "start" and records[0]["resumed_from_step"] == saved
    resumed = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert min(resumed) == saved + 1 and max(resumed) == 14
    assert abs(resumed[14] - full_losses[14]) < 1e-3
    # metrics.jsonl holds every step exactly once; the tokens seen and the training time go on from the checkpoint
    cut = [json.loads(ln) for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in cut] == list(range(1, 15))
    assert {r["step"]: r["tokens_seen"] for r in cut} == full_seen
    assert all(0 < a["train_s"] < b["train_s"] for a, b in zip(cut, cut[1:]))

    # The same command again: the run is complete, so it says so and rewrites the final outputs.
    again = subprocess.run(cmd(tmp_path / "cut"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "is at step 14, the end of this run (14 steps): writing the final outputs" in again.stdout + again.stderr
    assert [r for r in json_lines(again.stdout) if "loss" in r] == []
    # Another run in the same output dir (another rank, learning rate, dataset...) is not resumed into the
    # old one: it is refused, naming what differs, and nothing there changes; --no-resume starts it over.
    adapter_before = (tmp_path / "cut" / "adapter" / "adapter_model.safetensors").read_bytes()
    other = [*cmd(tmp_path / "cut"), "--lora_rank", "4", "--learning_rate", "2e-2", "--max_steps", "2"]
    bad = subprocess.run(other, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert "checkpoints/step_00000014: saved by a run with other settings" in bad.stderr
    assert "lora_rank 8 -> 4" in bad.stderr and "learning_rate 0.01 -> 0.02" in bad.stderr
    assert "--no-resume" in bad.stderr and "max_steps" not in bad.stderr     # a new length alone is fine
    assert (tmp_path / "cut" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_before
    fresh = subprocess.run([*other, "--no-resume"], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    # the earlier run's final outputs go with its checkpoints: they would pass for this run's until it ends
    assert (f"--no-resume: deleting an earlier run's checkpoints/, paratrain_tiny-qwen2.pth, "
            f"paratrain_tiny-qwen2_final.pth, adapter/, samples.jsonl in {tmp_path / 'cut'}") in fresh.stderr, \
        fresh.stderr
    assert [r["step"] for r in json_lines(fresh.stdout) if "loss" in r] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step_00000002"]


def test_a_diverged_step_stops_training_before_it_reaches_the_weights(tmp_path, tiny_model_dir, demo_data_path):
    import os

    out = tmp_path / "out"
    proc = subprocess.run([PYTHON, "-m", "trainer_core.train", *guide_args(tiny_model_dir, demo_data_path, out,
                           "--max_steps", "6", "--save_interval", "2")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PARATRAIN_FAULT": "nan_loss_at_step:3"})
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "training diverged at step 3: loss nan" in proc.stderr and "Traceback" not in proc.stderr
    assert "--learning_rate" in proc.stderr
    assert [r["step"] for r in json_lines(proc.stdout) if "loss" in r] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    # The worker's failure reason is the trainer's `failed` event, not the progress lines before it on stderr
    import io

    from worker.runner import JobRun

    [event] = [r for r in json_lines(proc.stdout) if r.get("event") == "failed"]
    assert event["exit_code"] == 4 and event["message"].startswith("paratrain: training diverged at step 3")
    run = JobRun(job_id=1, attempt=1, gpu_ids=[], argv=["trainer"], env={})
    run._pump(io.BytesIO(proc.stdout.encode()), is_stdout=True)
    run._pump(io.BytesIO(proc.stderr.encode()), is_stdout=False)
    assert "step 2/6" in "\n".join(run.stderr_tail)
    outcome = run.outcome(4)
    assert (outcome.failure_class, outcome.failure_reason) == ("data", event["message"])


def test_a_trainer_whose_reader_is_gone_still_saves_on_its_stop_signal(tmp_path, tiny_model_dir, demo_data_path):
    """A worker that dies leaves its trainers a closed stdout and a SIGTERM (parent-death signal): they must
    save, not die of a broken pipe at their next metric line."""
    out = tmp_path / "out"
    proc = subprocess.Popen([PYTHON, "-m", "trainer_core.train", *guide_args(tiny_model_dir, demo_data_path, out,
                             "--max_steps", "50")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("step 1/"):
            proc.stdout.close()             # the worker that read the JSON lines is gone
        if line.startswith("step 3/"):      # two metric lines went to the closed pipe
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, rest
    assert "stop requested: checkpoint saved at step" in rest and "Traceback" not in rest
    assert list((out / "checkpoints").iterdir())


def test_one_stop_that_reaches_torchrun_twice_still_saves_a_checkpoint(tmp_path, tiny_model_dir, demo_data_path):
    """A worker killed -9 hands torchrun its parent-death SIGTERM once per exiting thread, and torchrun
    forwards each to the ranks: ~25 ms apart, that is one stop, not a second signal that exits unsaved."""
    out = tmp_path / "out"
    proc = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "1", "-m", "trainer_core.train",
                             *guide_args(tiny_model_dir, demo_data_path, out, "--max_steps", "200", "--epochs", "50",
                                         "--save_interval", "100")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "step 3/" in line:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.03)
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert "stopped by a second stop signal" not in rest, rest[-3000:]
    assert "stop requested: checkpoint saved at step" in rest, rest[-3000:]
    assert [p.name for p in (out / "checkpoints").iterdir()]


def test_a_run_whose_output_dir_another_run_took_over_stops_without_writing(tmp_path, tiny_model_dir,
                                                                            demo_data_path):
    """A job's next attempt started elsewhere while a worker cut off from the server still trains the previous
    one, or the same command started twice: the newer run claims the directory, and the older one stops at its
    next step, on every rank, before it writes another metric line or checkpoint."""
    from trainer_core import owner

    out = tmp_path / "out"
    proc = subprocess.Popen([str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "trainer_core.train",
                             *guide_args(tiny_model_dir, demo_data_path, out, "--ddp", "--max_steps", "400",
                                         "--epochs", "50", "--save_interval", "2")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("step 3/"):
            break
    first = owner.read_owner(out)
    assert first["pid"] != proc.pid                      # rank 0 claimed it, not the launcher
    # a second run that the checkpoint refuses (other settings) leaves the first one training
    refused = subprocess.run([PYTHON, "-m", "trainer_core.train", *guide_args(tiny_model_dir, demo_data_path, out),
                              "--max_steps", "400", "--learning_rate", "5e-4"], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "saved by a run with other settings" in refused.stderr, refused.stderr[-2000:]
    assert owner.read_owner(out) == first
    for line in proc.stderr:
        if line.startswith("step 8/"):                   # still training, past the refused run
            break
    token = owner.claim(out)                             # the newer run
    logged = len((out / "metrics.jsonl").read_text().splitlines())
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 1                   # torchrun: a rank exited non-zero ...
    assert "exitcode  : 5" in rest or "exitcode : 5" in rest, rest[-3000:]   # ... with 5, the trainer's code
    assert f"{out} was taken over by another run on host" in rest and "without writing more" in rest, rest[-3000:]
    # at most the step in flight when the claim landed was written
    assert len((out / "metrics.jsonl").read_text().splitlines()) <= logged + 1
    assert len(set(p.name for p in (out / "checkpoints").iterdir()) - set(saved)) <= 1
    assert not list((out / "lora").glob("*_final.pth")) and owner.holds(out, token)


def test_a_resumed_run_made_longer_follows_the_longer_schedule(tmp_path, tiny_model_dir, demo_data_path):
    """4 steps, then the same command with --max_steps 6: steps 5 and 6 take the 6-step schedule's rates (the
    checkpoint's optimiser state holds the 4-step one's, which had decayed to 0 at step 4)."""
    from trainer_core.train import lr_lambda

    peak = 1e-3

    def run(steps: int) -> dict[int, float]:
        proc = subprocess.run([PYTHON, "-m", "trainer_core.train",
                               *guide_args(tiny_model_dir, demo_data_path, tmp_path / "out"), "--max_steps", str(steps),
                               "--learning_rate", str(peak), "--warmup_ratio", "0"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return {r["step"]: r["lr"] for r in json_lines(proc.stdout) if "loss" in r}

    assert run(4) == pytest.approx({s: peak * lr_lambda(4, 0)(s - 1) for s in range(1, 5)})
    assert run(6) == pytest.approx({s: peak * lr_lambda(6, 0)(s - 1) for s in (5, 6)})


def test_ranks_wait_for_rank_0_tokenising_longer_than_the_collective_timeout(tmp_path, tiny_model_dir,
                                                                             demo_data_path):
    """A big dataset keeps rank 0 tokenising for many minutes while the other ranks wait, far longer than a
    step's collectives may (NCCL: 10 minutes). Here the training's timeout is 4 s and rank 0's data
    preparation takes 10 s longer: the job still trains."""
    import os

    env = {**os.environ, "PARATRAIN_COLLECTIVE_TIMEOUT_S": "4", "PARATRAIN_FAULT": "slow_tokenize:10"}
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "trainer_core.train",
                           *guide_args(tiny_model_dir, demo_data_path, tmp_path / "out", "--ddp", "--max_steps", "2")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json_lines(proc.stdout)[-1]["event"] == "done"


def test_a_collective_timeout_that_is_no_number_of_seconds_is_refused(monkeypatch, capsys):
    from trainer_core.dist import collective_timeout

    monkeypatch.setenv("PARATRAIN_COLLECTIVE_TIMEOUT_S", "10m")
    with pytest.raises(SystemExit) as stopped:
        collective_timeout()
    assert stopped.value.code == 2
    assert "PARATRAIN_COLLECTIVE_TIMEOUT_S='10m': expected a number of seconds > 0" in capsys.readouterr().err
    monkeypatch.setenv("PARATRAIN_COLLECTIVE_TIMEOUT_S", "90")
    assert collective_timeout().total_seconds() == 90


def test_torchrun_with_several_processes_needs_ddp_and_says_so(tmp_path, tiny_model_dir, demo_data_path):
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "trainer_core.train",
                           *guide_args(tiny_model_dir, demo_data_path, tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert "started by torchrun with several processes but without --ddp; add --ddp" in proc.stderr
    assert "exitcode  : 2" in proc.stderr or "exitcode : 2" in proc.stderr, proc.stderr[-2000:]   # bad input


def test_a_stop_signal_before_the_first_step_stops_at_once(tmp_path, tiny_model_dir, demo_data_path):
    """Loading a real model takes minutes: Ctrl-C then must not wait for a step to train and save."""
    proc = subprocess.Popen([PYTHON, "-m", "trainer_core.train", *guide_args(tiny_model_dir, demo_data_path,
                             tmp_path / "out", "--max_steps", "5")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:
        if line.startswith("data: "):       # tokenised; the model loads next
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 130, rest
    assert "stopped before the first training step: nothing to save" in rest and "Traceback" not in rest
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_ctrl_c_while_paratrain_loads_and_a_reader_that_leaves_are_no_tracebacks(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the seconds `paratrain train` imports torch, before the trainer handles signals (exit 130 as
    for a stop before the first step); `paratrain ... | head -1`: the pipe's reader left (exit 141)."""
    import trainer_core.demo as demo
    from paratrain.cli import main

    def interrupted(args):   # where a Ctrl-C lands while a command's module loads: timing it is a race
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "run_make_demo_data", interrupted)
    assert main(["make-demo-data", str(tmp_path / "x.jsonl")]) == 130
    assert "Traceback" not in capsys.readouterr().err
    writes_forever = ("import sys, trainer_core.demo as demo\n"
                      "demo.run_make_demo_data = lambda args: [print('line ' * 20) for _ in iter(int, 1)]\n"
                      "from paratrain.cli import main\nsys.exit(main(['make-demo-data', 'x.jsonl']))")
    proc = subprocess.Popen([PYTHON, "-c", writes_forever], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tmp_path)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err, err


def test_weight_decay_clipping_alpha_and_log_interval_reach_the_training_run(tmp_path, tiny_model_dir,
                                                                             demo_data_path):
    """Each flag through the real command line to its effect. Gradients clipped to a norm of 1e-12 are far
    below AdamW's eps (1e-8), so a step moves a weight by at most lr * 1e-12 / 1e-8 (unclipped, about lr): lora_B
    (zero at init) stays near zero, and lora_A changes by the decoupled weight decay, prod(1 - lr_t * weight_decay)."""
    from trainer_core.train import lr_lambda

    steps, lr, weight_decay = 5, 0.05, 2.0

    def train(out: Path, *extra: str) -> tuple[list[int], dict[str, torch.Tensor]]:
        proc = subprocess.run([PYTHON, "-m", "trainer_core.train", *guide_args(tiny_model_dir, demo_data_path, out),
                               "--max_steps", str(steps), "--learning_rate", str(lr), "--warmup_ratio", "0",
                               "--max_grad_norm", "1e-12", "--save_interval", "100", *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        logged = [r["step"] for r in json_lines(proc.stdout) if "loss" in r]
        return logged, torch.load(next((out / "lora").glob("*_final.pth")), weights_only=True)

    logged, decayed = train(tmp_path / "decayed", "--weight_decay", str(weight_decay), "--log_interval", "2",
                            "--lora_alpha", "3")
    assert logged == [2, 4, 5]   # every second step, and the last
    assert json.loads((tmp_path / "decayed" / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 3
    _, plain = train(tmp_path / "plain")
    shrink = 1.0
    for step in range(steps):
        shrink *= 1 - lr * lr_lambda(steps, 0)(step) * weight_decay
    assert shrink < 0.8
    moved = steps * lr * 1e-12 / 1e-8   # the most the clipped gradients can move a weight: 2.5e-5 here
    lora_a = [k for k in plain if "lora_A" in k]
    assert lora_a and any("lora_B" in k for k in plain)
    for key in plain:
        if "lora_B" in key:
            assert decayed[key].abs().max() <= moved and plain[key].abs().max() <= moved, key
    for key in lora_a:
        torch.testing.assert_close(decayed[key], plain[key] * shrink, rtol=0, atol=2 * moved)


def test_compile_trains_the_same_losses_as_eager(tmp_path, tiny_model_dir, demo_data_path):
    """--compile (each decoder layer through torch.compile, dynamic shapes: packed rows change length) on
    the real command line: it must change the speed only. About 45 s of compiling on 2 CPU cores."""
    import os

    def train(out: Path, *extra: str) -> tuple[list[float], bool]:
        proc = subprocess.run([PYTHON, "-m", "trainer_core.train", *guide_args(tiny_model_dir, demo_data_path, out),
                               "--max_steps", "3", *extra], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "TORCH_LOGS": "guards"})   # printed for each compiled frame
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "adapter" / "adapter_config.json").exists()
        return [r["loss"] for r in json_lines(proc.stdout) if "loss" in r], "GUARDS" in proc.stderr + proc.stdout

    eager, eager_compiled = train(tmp_path / "eager")
    assert len(eager) == 3 and not eager_compiled
    compiled, did_compile = train(tmp_path / "compiled", "--compile")
    assert did_compile and compiled == pytest.approx(eager, rel=1e-4)


def test_a_run_starts_from_another_runs_adapter_and_refuses_one_of_other_settings(tmp_path, tiny_model_dir,
                                                                                  demo_data_path):
    """--init_adapter: to train on from a finished run with other data. The new run's loss before its first
    step is the adapter's own, measured on the same validation samples when the first run ended."""
    def train(out, *extra):
        return subprocess.run([PYTHON, "-m", "trainer_core.train", *guide_args(
            tiny_model_dir, demo_data_path, out, "--max_steps", "3", "--learning_rate", "2e-2", "--val_ratio", "0.1",
            "--eval_interval", "3", *extra)], capture_output=True, text=True, timeout=300)

    first = train(tmp_path / "first")
    assert first.returncode == 0, first.stderr[-2000:]
    first_end = [r for r in json_lines(first.stdout) if r.get("step") == 3][0]["val_loss"]
    first_start = [r for r in json_lines(first.stdout) if r.get("step") == 0][0]["val_loss"]
    adapter = tmp_path / "first" / "adapter"
    second = train(tmp_path / "second", "--init_adapter", str(adapter))
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"LoRA starts from {adapter}" in second.stderr
    second_start = [r for r in json_lines(second.stdout) if r.get("step") == 0][0]["val_loss"]
    assert abs(second_start - first_end) < 1e-4 and abs(second_start - first_start) > 1e-3, (second_start, first_end)

    # under DDP rank 0 alone reads it: wrapping the model gives the other ranks its weights
    ddp = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "trainer_core.train", *guide_args(
        tiny_model_dir, demo_data_path, tmp_path / "ddp", "--max_steps", "1", "--learning_rate", "2e-2",
        "--val_ratio", "0.1", "--init_adapter", str(adapter), "--ddp")], capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    ddp_records = json_lines(ddp.stdout)
    assert abs([r for r in ddp_records if r.get("step") == 0][0]["val_loss"] - first_end) < 1e-4
    digests = ddp_records[-1]["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]

    # the same command again resumes its own checkpoint (whatever --init_adapter says now), and says so
    again = train(tmp_path / "second", "--init_adapter", str(tmp_path / "elsewhere"))
    assert again.returncode == 0 and "note: --init_adapter is not read: this run resumes from" in again.stderr
    # an adapter in the run's own output dir would be replaced (--no-resume deletes it first): refused, kept
    own = train(tmp_path / "first", "--init_adapter", str(adapter), "--no-resume")
    assert own.returncode == 2 and "is in this run's --output_dir" in own.stderr, own.stderr[-2000:]
    assert (adapter / "adapter_model.safetensors").exists() and (tmp_path / "first" / "checkpoints").exists()

    # other settings are refused before the model loads, naming each; so are a missing or a cut-short adapter
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\xff" * 8)
    for extra, message in [(["--lora_rank", "4"], "adapter: an adapter trained with lora_rank 8 (this run: 4), "
                                                  "lora_alpha 16"),
                           (["--rope_2d_ratio", "0.65"], "rope_2d_ratio 0.5 (this run: 0.65)"),
                           # all-linear saved as the module names: compared before the model loads, too
                           (["--lora_target_modules", "q_proj,v_proj"], "lora_target_modules down_proj,gate_proj,"
                                                                        "k_proj,o_proj,q_proj,up_proj,v_proj (this run: "
                                                                        "q_proj,v_proj)"),
                           (["--init_adapter", str(tmp_path / "none")], "none: no such directory"),
                           (["--init_adapter", str(broken)], "adapter_model.safetensors: not readable")]:
        refused = train(tmp_path / f"other{len(extra[1])}", "--init_adapter", str(adapter), *extra)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr, (
            extra, refused.stderr[-2000:])
