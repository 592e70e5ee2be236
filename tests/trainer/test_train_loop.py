"""The arithmetic of the training loop, one function at a time: gradient accumulation over a step's
micro-batches, the learning-rate schedule, and what resuming keeps (metrics, checkpoints)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.trainer.conftest import tiny_lora_model
from trainer_core import checkpoint as ckpt
from trainer_core.data import DataError
from trainer_core.dist import DistEnv
from trainer_core.layout import build_sample_layout, collate_packed
from trainer_core.model import ParallelBranchLM
from trainer_core.train import (Trained, _truncate_metrics, accumulate_gradients, evaluations_left, lr_lambda,
                                 warmup_steps)

ONE_PROCESS = DistEnv(ddp=False, rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def _layouts(seed: int, branch_lengths: list[list[int]]):
    g = torch.Generator().manual_seed(seed)
    return [build_sample_layout(torch.randint(0, 300, (5,), generator=g),
                                [torch.randint(0, 300, (n,), generator=g) for n in lengths])
            for lengths in branch_lengths]


def test_accumulated_gradients_are_those_of_the_whole_steps_mean_loss_per_label_token():
    """Micro-batches of unequal size weigh by their label tokens: the step's gradient is that of the mean
    loss over all its label tokens, as if the step were one batch (not the mean of per-batch means)."""
    model = tiny_lora_model()
    lm = ParallelBranchLM(model)
    small, large = _layouts(1, [[3, 4]]), _layouts(2, [[30, 25, 40], [20, 35]])
    micro = [collate_packed(small, 4096), collate_packed(large, 4096)]
    assert micro[0].num_label_tokens * 5 < micro[1].num_label_tokens
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    mean_loss = accumulate_gradients(lm, micro, ONE_PROCESS, scaler)
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    whole = collate_packed(small + large, 4096)
    whole_loss = lm(**vars(whole)) / whole.num_label_tokens
    whole_loss.backward()

    assert math.isclose(mean_loss, float(whole_loss), rel_tol=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(accumulated[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_learning_rate_warms_up_linearly_then_decays_to_zero_along_a_cosine():
    f = lr_lambda(total_steps=10, warmup_steps=2)
    factors = [f(step) for step in range(11)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(factors[2:10], factors[3:10]))   # strictly falling after the warmup
    assert factors[6] == 0.5 and factors[10] == 0.0                      # the cosine's midpoint, then zero
    assert lr_lambda(total_steps=4, warmup_steps=0)(0) == 1.0            # no warmup: the peak at once
    # the default ratio 0.05 of a 20-step run rounds to 1 step, which would start at the peak: no warmup at all
    assert warmup_steps(0.05, 20) == 2 and lr_lambda(20, warmup_steps(0.05, 20))(0) == 0.5
    assert warmup_steps(0.05, 1000) == 50 and warmup_steps(0.0, 1000) == 0


def test_the_eta_counts_the_validations_still_to_come():
    # every 3 steps of 7, and after the last: steps 3, 6 and 7
    assert [evaluations_left(step, 7, 3) for step in range(8)] == [3, 3, 3, 2, 2, 2, 1, 0]
    assert [evaluations_left(step, 6, 3) for step in (0, 5, 6)] == [2, 1, 0]   # the last is a multiple: once
    # checked against counting them one by one
    for total, interval in [(1, 1), (10, 4), (50, 50), (49, 50), (120, 7)]:
        for step in range(total + 1):
            due = [s for s in range(step + 1, total + 1) if s % interval == 0 or s == total]
            assert evaluations_left(step, total, interval) == len(due), (step, total, interval)


def test_resuming_drops_the_metrics_of_steps_that_will_be_trained_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 9)))
    _truncate_metrics(path, after_step=4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    _truncate_metrics(tmp_path / "absent.jsonl", after_step=4)   # a first run has none: nothing to do


def test_tokens_and_training_time_go_on_from_a_checkpoint_and_are_not_made_up_for_an_older_one(monkeypatch):
    clock = iter([100.0, 112.5])
    monkeypatch.setattr("trainer_core.train.time.monotonic", lambda: next(clock))
    trained = Trained.from_state({"step": 4, "tokens_seen": 900, "train_s": 30.0})
    assert trained.fields() == {"tokens_seen": 900, "train_s": 30.0}   # before this attempt's loop: the saved
    trained.start_clock()   # 100.0
    trained.add_tokens(50)
    assert trained.state() == {"tokens_seen": 950, "train_s": 42.5}   # + 12.5 s of this attempt's loop
    older = Trained.from_state({"step": 4})   # saved before they were counted: unknown, not 0
    older.add_tokens(50)
    assert older.fields() == {} and older.state() == {"tokens_seen": None, "train_s": None}


def test_only_the_latest_checkpoints_are_kept(tmp_path):
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in (4, 8, 12):
        ckpt.save_checkpoint(tmp_path, step=step, lora_weights={"w": param.detach()}, optimizer=optimizer,
                             scheduler=scheduler, scaler=scaler, state={})
    kept = sorted(p.name for p in ckpt.checkpoint_root(tmp_path).iterdir())
    assert kept == ["step_00000008", "step_00000012"] and ckpt.KEEP_CHECKPOINTS == 2
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000012"
    # A run that resumed from step 8 while the run it took the directory over from was saving step 12: its
    # own step 10 replaces that later one, which is another history (and would be resumed next otherwise).
    ckpt.save_checkpoint(tmp_path, step=10, lora_weights={"w": param.detach()}, optimizer=optimizer,
                         scheduler=scheduler, scaler=scaler, state={})
    assert sorted(p.name for p in ckpt.checkpoint_root(tmp_path).iterdir()) == ["step_00000008", "step_00000010"]


def test_a_checkpoint_that_fills_the_disk_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    """torch.save says "unexpected pos ..." when the disk fills; the worker (and a user) look for "No space
    left on device". The half-written checkpoint is removed: it holds space and is no checkpoint."""
    import errno
    from collections import namedtuple

    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 43392 vs 43284")

    monkeypatch.setattr(ckpt.torch, "save", full)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 112 * 1024, 112 * 1024))
    with pytest.raises(OSError) as raised:
        ckpt.save_checkpoint(tmp_path, step=60, lora_weights={"w": param.detach()}, optimizer=optimizer,
                             scheduler=scheduler, scaler=scaler, state={})
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value).startswith("[Errno 28] No space left on device writing checkpoint step 60 under ")
    assert "(112 KiB free): [enforce fail" in str(raised.value)
    assert list(ckpt.checkpoint_root(tmp_path).iterdir()) == []
    # a .pth written over fails the same way, and the previous file stays whole (no truncated copy)
    pth = tmp_path / "latest.pth"
    pth.write_bytes(b"the previous weights")
    with pytest.raises(OSError, match="No space left on device writing latest.pth"):
        with ckpt.disk_full_named(tmp_path, "latest.pth"):
            ckpt.save_replacing({"w": param.detach()}, pth)
    assert pth.read_bytes() == b"the previous weights" and sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoints", "latest.pth"]
    # with room on the disk the same error is no full disk: it is passed on as it is
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(10**12, 10**11, 9 * 10**11))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        ckpt.save_checkpoint(tmp_path, step=61, lora_weights={"w": param.detach()}, optimizer=optimizer,
                             scheduler=scheduler, scaler=scaler, state={})


def test_a_loaded_model_trains_in_train_mode_so_checkpointing_and_dropout_take_effect(tiny_model_dir):
    """from_pretrained returns a model in eval mode, where transformers skips gradient checkpointing: the
    trainer's --gradient_checkpointing saved nothing until prepare_for_training switched to train mode."""
    from trainer_core.config import TrainConfig
    from trainer_core.model import load_base_model, prepare_for_training

    batch = collate_packed(_layouts(3, [[40, 30, 50], [60, 20]]), 4096)

    def bytes_kept_for_backward(**fields) -> int:
        cfg = TrainConfig(base_model=str(tiny_model_dir), data_path="d", **fields)
        model = prepare_for_training(load_base_model(str(tiny_model_dir), torch.device("cpu"), torch.float32,
                                                     "sdpa"), cfg)
        assert model.training and all(m.training for m in model.modules())
        kept = []

        def pack(t):
            kept.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ParallelBranchLM(model)(**vars(batch))
        return sum(kept)

    assert bytes_kept_for_backward(gradient_checkpointing=True) < 0.5 * bytes_kept_for_backward()


def test_the_end_of_training_probe_runs_with_sdpa_and_never_costs_the_final_outputs(tiny_model_dir, demo_data_path,
                                                                                    monkeypatch):
    """On CUDA the model trains with flex, which the probe would run eagerly (not worth compiling for one
    forward), holding every head's full score matrix: tens of GB for a long sample, before the final
    outputs are written. The probe uses SDPA, as load_adapter_dir does, and gives None on out-of-memory."""
    from trainer_core import model as model_module
    from trainer_core import train as train_module
    from trainer_core.config import TrainConfig
    from trainer_core.data import build_samples, load_or_tokenize
    from trainer_core.model import load_base_model, prepare_for_training

    cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path))
    ds = load_or_tokenize(cfg.data_path, cfg.base_model, cfg.max_seq_len)
    samples = build_samples(ds, cfg)
    model = prepare_for_training(load_base_model(cfg.base_model, torch.device("cpu"), torch.float32, "sdpa"), cfg)
    with_sdpa = train_module.probe_logits(model, ds, samples, cfg, ONE_PROCESS)

    config = model.get_base_model().config
    config._attn_implementation = "flex_attention"   # as on CUDA; a flex mask must not be built

    def no_flex(*args, **kwargs):
        raise AssertionError("the probe built a flex BlockMask")

    monkeypatch.setattr(model_module, "columnar_block_mask", no_flex)
    assert train_module.probe_logits(model, ds, samples, cfg, ONE_PROCESS) == with_sdpa
    assert config._attn_implementation == "flex_attention" and model.training   # as training left them

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train_module, "hidden_states", out_of_memory)
    assert train_module.probe_logits(model, ds, samples, cfg, ONE_PROCESS) is None
    assert config._attn_implementation == "flex_attention" and model.training


def test_a_rank_on_a_machine_without_rank_0s_token_cache_tokenises_the_data_itself(tmp_path, monkeypatch,
                                                                                 tiny_model_dir, demo_data_path):
    """A multi-node job: rank 0 tokenised into its own machine's cache, which another machine's ranks do not
    see (PARATRAIN_CACHE is not a shared folder); they get the same tokens from the same file."""
    from trainer_core import train as train_module
    from trainer_core.config import TrainConfig
    from trainer_core.data import file_sha256

    cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path))
    (rank0_ds, rank0_samples), _, sha = train_module.prepare_data(cfg, DistEnv(False, 0, 0, 1, torch.device("cpu")))
    elsewhere = {"tokens_dir": str(tmp_path / "rank-0s-machine" / "cache"), "sha256": sha}
    monkeypatch.setattr(train_module, "broadcast_object",
                        lambda env, obj, group=None: ("ok", json.dumps([elsewhere])))
    monkeypatch.setattr(train_module, "barrier", lambda env, group=None: None)   # no process group here
    monkeypatch.setenv("PARATRAIN_CACHE", str(tmp_path / "this-machines-cache"))
    (ds, samples), _, rank1_sha = train_module.prepare_data(cfg, DistEnv(True, 1, 0, 2, torch.device("cpu")))
    assert list((tmp_path / "this-machines-cache").iterdir())           # tokenised here
    assert rank1_sha == sha == file_sha256(str(demo_data_path)) and len(samples) == len(rank0_samples)
    assert (ds.tokens == rank0_ds.tokens).all() and (ds.text_offsets == rank0_ds.text_offsets).all()
    # another copy of the file would give this machine's ranks other steps than rank 0's: they would hang
    elsewhere["sha256"] = "0" * 64
    with pytest.raises(DataError, match="this machine's copy differs from global rank 0's"):
        train_module.prepare_data(cfg, DistEnv(True, 1, 0, 2, torch.device("cpu")))


def test_a_run_whose_directory_is_claimed_while_its_model_loads_writes_nothing(tmp_path, monkeypatch, tiny_model_dir,
                                                                             demo_data_path):
    """The model load can take minutes: a newer run that claimed the directory meanwhile may have resumed and
    logged steps already. This one must not truncate its metrics.jsonl (nor write anything else)."""
    from trainer_core import exit_codes, owner
    from trainer_core import train as train_module
    from trainer_core.config import TrainConfig

    out = tmp_path / "out"
    out.mkdir()
    theirs = "".join(json.dumps({"step": s, "loss": 7.0}) + "\n" for s in (1, 2, 3))
    (out / "metrics.jsonl").write_text(theirs)
    load = train_module.build_lora_model

    def load_while_a_newer_run_starts(*args, **kwargs):
        owner.claim(out)
        return load(*args, **kwargs)

    monkeypatch.setattr(train_module, "build_lora_model", load_while_a_newer_run_starts)
    cfg = TrainConfig(base_model=str(tiny_model_dir), data_path=str(demo_data_path), output_dir=str(out),
                      max_steps=2, batch_size=2, batch_by_samples=True)
    assert train_module.train(cfg, ONE_PROCESS, train_module.StopFlag()) == exit_codes.SUPERSEDED
    assert (out / "metrics.jsonl").read_text() == theirs
    assert sorted(p.name for p in out.iterdir()) == [owner.OWNER_FILE, "metrics.jsonl"]


def test_an_adapter_trained_on_another_base_model_is_named_and_one_in_the_output_dir_refused(tmp_path, capsys):
    from trainer_core.config import TrainConfig
    from trainer_core.train import check_starting_adapter

    adapter = tmp_path / "old" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "rope2d.json").write_text(json.dumps({"rope_2d_ratio": 0.5, "branch_stride": 128,
                                                     "base_model": "/models/Qwen2.5-0.5B"}))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    cfg = TrainConfig(base_model=str(tmp_path / "instruct"), data_path="d", init_adapter=str(adapter),
                      output_dir=str(tmp_path / "new"))
    check_starting_adapter(cfg, ONE_PROCESS)
    assert "was trained on /models/Qwen2.5-0.5B, this run's base model is" in capsys.readouterr().err
    check_starting_adapter(cfg.model_copy(update={"base_model": "/models/Qwen2.5-0.5B"}), ONE_PROCESS)
    assert capsys.readouterr().err == ""   # the same model: nothing to say
    with pytest.raises(DataError, match="is in this run's --output_dir"):
        check_starting_adapter(cfg.model_copy(update={"output_dir": str(tmp_path / "old")}), ONE_PROCESS)
    (adapter / "rope2d.json").write_text("[1, 2]")   # JSON, but no settings: named, not an AttributeError
    with pytest.raises(DataError, match="rope2d.json: not a JSON object"):
        check_starting_adapter(cfg, ONE_PROCESS)
