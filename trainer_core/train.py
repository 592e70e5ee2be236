"""`python -m trainer_core.train`: parallel-branch LoRA training (the guide's command line).

    torchrun --nproc_per_node 2 -m trainer_core.train --base_model DIR --data_path FILE \\
        --lora_rank 8 --batch_size 4 --batch_by_samples --max_branches_per_sample 16 \\
        --rope_2d_ratio 0.5 --epochs 1 --ddp

Reads top to bottom: data -> model -> optimiser -> (resume) -> loop -> outputs. Rank 0 prints one JSON
object per line on stdout (metrics and events, for machines) and a progress line on stderr (for people).
Exit codes: trainer_core/exit_codes.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer_core import checkpoint as ckpt
from trainer_core import exit_codes, owner
from trainer_core.config import (BEST_ADAPTER_DIR, RESUMABLE_CHANGES, SAMPLES_FILE, TrainConfig,
                                 add_cli_arguments, format_validation_error)
from trainer_core.data import (DataError, Progress, SampleIndex, TokenizedDataset, build_samples, collate_batch,
                               epoch_batches, file_sha256, has_tokenizer_files, load_tokenizer, local_model_dir,
                               open_tokens, prepare_tokens, rank_batches, sample_lengths, split_validation,
                               total_optimizer_steps)
from trainer_core.dist import (DistEnv, all_reduce_sum, any_rank, barrier, broadcast_object, compute_cleanup,
                               compute_init, gather_objects, print0, write_line)
from trainer_core.generate import Generator
from trainer_core.layout import PackedBatch
from trainer_core.model import (ParallelBranchLM, attention_backend, build_lora_model, check_init_adapter,
                               eager_inference, hidden_states, load_init_adapter, load_lora_weights, lora_state_dict,
                               output_layer, quiet_libraries, save_adapter_dir, training_dtype)
from trainer_core.rope2d import rope_2d_pairs
from trainer_core.samples import continue_samples, write_samples
from trainer_core.vram import memory_levers

# Test-only fault injection, off unless set (tests/reliability): `oom_at_step:N`, `crash_rank:R_at_step:N`
# (SIGKILL of rank R), `enospc_on_checkpoint:N` (OSError ENOSPC when saving step N), `nan_loss_at_step:N`
# (inject_fault answers True after the forward: the caller makes the loss NaN), `slow_tokenize:S` (rank 0's
# data preparation takes S seconds longer). A run that resumed from a checkpoint injects nothing, so a retry
# shows the recovery.
FAULT_ENV = "PARATRAIN_FAULT"


def inject_fault(env: DistEnv, step: int, where: str, resumed: bool) -> bool:
    import re

    spec = os.environ.get(FAULT_ENV, "")
    slow = re.fullmatch(r"slow_tokenize:(\d+)", spec)
    if slow is not None:
        if where == "tokenize":
            time.sleep(int(slow.group(1)))
        return False
    match = re.fullmatch(r"(oom|crash_rank:(\d+)|enospc_on_checkpoint|nan_loss)(?:_at_step)?:(\d+)", spec)
    if match is None or resumed or int(match.group(3)) != step:
        return False
    kind = match.group(1)
    if kind == "nan_loss" and where == "loss":
        return True
    if kind == "oom" and where == "step":   # a real allocation, too large for any device: its own error type
        torch.empty(2**62, dtype=torch.uint8, device=env.device)
    if match.group(2) is not None and where == "step" and env.rank == int(match.group(2)):
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "enospc_on_checkpoint" and where == "checkpoint":
        import errno

        raise OSError(errno.ENOSPC, f"No space left on device ({FAULT_ENV}: simulated, checkpoint of step {step})")
    return False


class Diverged(Exception):
    """The loss or the gradient norm of a step is NaN or infinite: stepping would write NaN into the weights."""


# Under float16 loss scaling an overflowing step halves the scale (from 2**16); one this small means the
# gradients overflow float16 even unscaled, which is divergence, not a scale still settling.
MIN_LOSS_SCALE = 2.0 ** -8


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[torch.Tensor],
                   max_grad_norm: float, loss: float, step: int) -> tuple[float, bool]:
    """Unscale, clip and apply the step's gradients: (gradient norm, applied).

    A non-finite loss or gradient norm raises Diverged before anything is applied, with one exception: under
    float16 loss scaling an infinite gradient norm means the *scaled* gradients overflowed. GradScaler then
    skips the step and halves the scale, which is routine (several times at the start of a run)."""
    scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    overflow = not math.isfinite(grad_norm)
    if not math.isfinite(loss) or (overflow and not scaler.is_enabled()):
        raise Diverged(f"step {step}: loss {loss}, gradient norm {grad_norm}")
    scaler.step(optimizer)   # skipped when unscale_ found an inf/NaN gradient
    scaler.update()
    if overflow and scaler.get_scale() < MIN_LOSS_SCALE:
        raise Diverged(f"step {step}: float16 gradients overflow even at loss scale {scaler.get_scale():g}")
    return grad_norm, not overflow


class StopNow(BaseException):
    """A stop signal with nothing to save (before the first step), or a second one (stop without saving)."""


class StopFlag:
    """SIGTERM/SIGINT during training set a flag the loop checks at step boundaries: it saves and exits.
    Before training starts there is nothing to save, so they stop at once; so does a second signal, unless
    it comes within SAME_STOP_S of the first: one stop can arrive twice. A worker killed -9 hands its
    launcher's parent-death SIGTERM to torchrun once per exiting thread, and torchrun forwards each to every
    rank; taken for a second signal, the repeat lost the checkpoint the first one asked for."""

    SAME_STOP_S = 1.0

    def __init__(self) -> None:
        self.requested = False
        self.exiting = False           # StopNow was raised: later signals would only interrupt the way out
        self.last_signal_at = -math.inf
        self.training = False
        self.announce = True   # rank 0 says it heard the signal: a step can take minutes

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.exiting or now - self.last_signal_at < self.SAME_STOP_S:
            return   # on the way out already, or the same stop delivered again
        self.last_signal_at = now
        if not self.training or self.requested:
            self.exiting = True
            raise StopNow("before the first training step: nothing to save" if not self.training else
                          "by a second stop signal: exiting without a new checkpoint")
        self.requested = True
        if self.announce:   # os.write: a print here could interrupt one of the loop's own (a reentrant write)
            try:
                os.write(2, b"stop requested: a checkpoint is saved when this step ends (a second signal, a "
                            b"second or more later, exits without one)\n")
            except OSError:
                pass


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """Steps of linear warmup. At least 2 for any positive ratio: the last warmup step is at the peak, so
    one step would be no warmup at all (the default 0.05 of a run under 30 steps)."""
    return max(2, round(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0


def evaluations_left(step: int, total_steps: int, eval_interval: int) -> int:
    """Validations after `step`: at every multiple of eval_interval up to total_steps, and at total_steps."""
    multiples = total_steps // eval_interval - step // eval_interval
    return multiples + (1 if total_steps % eval_interval and step < total_steps else 0)


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warmup to the peak, then cosine decay to zero."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def output_names(cfg: TrainConfig) -> tuple[Path, Path, Path, Path]:
    """The latest .pth, the final .pth, the adapter directory and the best one (lowest validation loss)."""
    lora_dir = Path(cfg.output_dir) / "lora"
    stem = f"{cfg.name}_{cfg.model_short_name}"
    return (lora_dir / f"{stem}.pth", lora_dir / f"{stem}_final.pth", Path(cfg.output_dir) / "adapter",
            Path(cfg.output_dir) / BEST_ADAPTER_DIR)


def emit(env: DistEnv, record: dict, metrics_file: Path | None = None) -> None:
    """One machine-readable JSON line on stdout (rank 0), optionally appended to metrics.jsonl."""
    if not env.is_main:
        return
    line = json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()})
    write_line(line, sys.stdout)   # NaN/Infinity are not JSON: they go out as null
    if metrics_file is not None:
        with open(metrics_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def check_base_model(path: str) -> None:
    """A clear message for a wrong --base_model instead of a loader traceback."""
    model_dir = Path(local_model_dir(path))
    if not model_dir.is_dir() and os.environ.get("PARATRAIN_JOB_ID"):   # the server found it when it queued the job
        raise DataError([f"--base_model {path}: no such directory: moved or deleted since the job was queued? "
                         "(put it back and Retry, or Edit as new job with where it is now)"])
    if not model_dir.is_dir():
        raise DataError([f"--base_model {path}: no such directory, nor a model in the local HuggingFace cache "
                         "(nothing is downloaded: give a model directory, or fetch it first with `hf download`)"])
    missing = [f for f in ("config.json",) if not (model_dir / f).exists()]
    if missing or not has_tokenizer_files(model_dir):
        raise DataError([f"--base_model {path}: not a HuggingFace model directory with a tokenizer "
                         f"(missing {', '.join(missing) or 'tokenizer files'})"])


def describe_rope_2d(pairs_2d: int, pairs: int) -> str:
    return f"{pairs_2d} of {pairs} rotary frequency pairs 2D" + ("; the stock model's positions" if not pairs_2d else "")


def check_output_dir(path: str) -> None:
    """--output_dir exists (made if missing) and takes files: a file of that name or a place this user cannot
    write is the user's to fix, said before a model loads."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataError([f"--output_dir {path}: is a file, not a directory"]) from None
    except OSError as e:
        raise DataError([f"--output_dir {path}: cannot be created ({e.strerror})"]) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise DataError([f"--output_dir {path}: not writable by this user"])


def resume_identity(cfg: TrainConfig, world_size: int, data_sha256: str) -> dict:
    """What a checkpoint must share with the run that resumes it. Every config field counts except those
    in RESUMABLE_CHANGES; the data count by content, the model by its resolved path."""
    fields = {k: v for k, v in cfg.model_dump().items() if k not in RESUMABLE_CHANGES}
    identity = {**fields, "base_model": str(Path(local_model_dir(cfg.base_model)).resolve()), "data_sha256": data_sha256,
                "world_size": world_size}
    return json.loads(json.dumps(identity))   # as a checkpoint's JSON gives it back


def check_resume_identity(checkpoint: Path, saved: dict | None, current: dict) -> None:
    if saved is None:   # saved by a paratrain that did not record it
        return
    # a TrainConfig field added since the checkpoint was written had its default there (val_ratio 0: no
    # sample was held out); other keys it lacks are not compared
    fields = TrainConfig.model_fields
    saved = {**{k: fields[k].get_default(call_default_factory=True) for k in current
                if k in fields and k not in saved and not fields[k].is_required()}, **saved}
    diffs = [f"{k} {saved[k]!r} -> {v!r}" if k != "data_sha256" else "the training data file has changed since"
             for k, v in current.items() if k in saved and saved[k] != v]
    if diffs:
        raise DataError([f"{checkpoint}: saved by a run with other settings ({'; '.join(diffs)}).",
                         "Resuming it would mix two runs: use another --output_dir, or --no-resume to start over "
                         "in this one (its old checkpoints, lora/*.pth, adapter/ and adapter_best/ are deleted)."])


def tokenize_here(path: str, cfg: TrainConfig, env: DistEnv, rank0_sha256: str) -> Path:
    """Rank 0 is on another machine, whose token cache this one does not share (PARATRAIN_CACHE on a local
    disk): the same file, tokenizer and max_seq_len give the same tokens here. Each rank of this machine
    tokenises; the first to finish writes the cache (data.prepare_tokens). A different copy of the file would
    give the ranks different steps: refused. The error is this rank's own, so it says it here."""
    try:
        if not Path(path).is_file():
            raise DataError([f"{path}: not found on this machine (global rank 0's has it)"])
        if file_sha256(path) != rank0_sha256:
            raise DataError([f"{path}: this machine's copy differs from global rank 0's (another sha256): "
                             "every node must read the same file"])
        return prepare_tokens(path, cfg.base_model, cfg.max_seq_len)
    except DataError as e:
        print("\n".join(f"[rank {env.rank}] {line}" for line in e.lines), file=sys.stderr, flush=True)
        raise


Split = tuple[TokenizedDataset, SampleIndex]   # the tokens, and the samples made of them


def prepare_data(cfg: TrainConfig, env: DistEnv) -> tuple[Split, Split | None, str]:
    """(training split, validation split or None, the data file's sha256). Rank 0 validates and tokenises
    the data file and the validation file (before any model is loaded); the others read its cache."""
    paths = [cfg.data_path, *([cfg.val_data_path] if cfg.val_data_path else [])]
    result: tuple[str, str] = ("", "")
    if env.is_main:
        try:
            check_base_model(cfg.base_model)
            check_output_dir(cfg.output_dir)
            inject_fault(env, 0, "tokenize", False)
            prepared = []
            for path in paths:
                warnings: list[str] = []
                tokens_dir = prepare_tokens(path, cfg.base_model, cfg.max_seq_len, log=lambda m: print0(env, m),
                                            warnings=warnings)
                for warning in warnings:
                    print0(env, f"warning: {warning}")
                prepared.append({"tokens_dir": str(tokens_dir), "sha256": file_sha256(path)})
            if len(prepared) == 2 and prepared[0]["sha256"] == prepared[1]["sha256"]:
                print0(env, f"warning: --val_data_path {cfg.val_data_path} holds the same as --data_path: its loss "
                            "measures the samples trained on, not how the model does on others")
            result = ("ok", json.dumps(prepared))
        except DataError as e:
            result = ("error", str(e))
    # the other ranks wait for rank 0 here, and the ranks with their tokens for those that tokenise for
    # themselves below: waits as long as the tokenising, on the group of PREPARE_TIMEOUT (trainer_core/dist.py)
    status, payload = broadcast_object(env, result, group=env.prepare_group)
    if status == "error":
        raise DataError(payload.splitlines())
    prepared = json.loads(payload)
    tokens_dirs = [Path(p["tokens_dir"]) for p in prepared]
    for i, (path, tokens_dir) in enumerate(zip(paths, tokens_dirs)):
        if not (tokens_dir / "index.npz").exists():
            tokens_dirs[i] = tokenize_here(path, cfg, env, prepared[i]["sha256"])
    barrier(env, group=env.prepare_group)
    splits = []
    for path, tokens_dir in zip(paths, tokens_dirs):
        ds = open_tokens(tokens_dir)
        samples = build_samples(ds, cfg)
        if len(samples) == 0:
            raise DataError([f"{path}: no sample has any tokens"])
        splits.append((ds, samples))
    train_split, val_split = splits[0], splits[1] if len(splits) > 1 else None
    if cfg.val_ratio > 0:
        ds, samples = train_split
        kept, held_out = split_validation(samples, cfg.val_ratio, cfg.seed)
        train_split, val_split = (ds, kept), (ds, held_out)
    return train_split, val_split, prepared[0]["sha256"]


def check_starting_adapter(cfg: TrainConfig, env: DistEnv) -> None:
    """check_init_adapter, outside the output dir (a fresh start there replaces its adapter/ and adapter_best/;
    --no-resume deletes them before the model loads), and a note when it was trained on another base model."""
    adapter, out = Path(cfg.init_adapter).resolve(), Path(cfg.output_dir).resolve()
    if adapter == out or out in adapter.parents:
        raise DataError([f"--init_adapter {cfg.init_adapter} is in this run's --output_dir {cfg.output_dir}, whose "
                         "adapters a fresh start replaces: copy it elsewhere first, or give another --output_dir"])
    trained_on = check_init_adapter(cfg).get("base_model")
    ours = str(Path(local_model_dir(cfg.base_model)).resolve())
    if trained_on and trained_on not in (cfg.base_model, ours):
        print0(env, f"note: --init_adapter {cfg.init_adapter} was trained on {trained_on}, this run's base model is "
                    f"{cfg.base_model}: right for a copy of the same model, meaningless for another")


def checked_on_main(env: DistEnv, check) -> None:
    """`check()` on rank 0; its DataError is raised on every rank (the others would wait in a collective)."""
    error = None
    if env.is_main:
        try:
            check()
        except DataError as e:
            error = e.lines
    error = broadcast_object(env, error)
    if error:
        raise DataError(error)


def choose_checkpoint(cfg: TrainConfig, env: DistEnv, out_dir: Path, identity: dict) -> Path | None:
    """The checkpoint to resume (None: start afresh), picked by rank 0 for every rank (a save landing meanwhile
    must not give two ranks two checkpoints); DataError when it was saved by a run of other settings."""
    result: tuple[str, str | None] = ("ok", None)
    if env.is_main and cfg.resume:
        try:
            last = ckpt.latest_checkpoint(out_dir)
            if last is not None:
                check_resume_identity(last, ckpt.read_state(last).get("run"), identity)
            result = ("ok", str(last) if last is not None else None)
        except DataError as e:
            result = ("error", "\n".join(e.lines))
    status, payload = broadcast_object(env, result)
    if status == "error":
        raise DataError(payload.splitlines())
    return Path(payload) if payload else None


def train(cfg: TrainConfig, env: DistEnv, stop: StopFlag) -> int:
    t_start = time.time()
    out_dir = Path(cfg.output_dir)
    (ds, samples), val, data_sha256 = prepare_data(cfg, env)
    total_steps = total_optimizer_steps(samples, cfg, env.world_size)
    if total_steps == 0:
        raise DataError([f"{cfg.data_path}: {len(samples)} samples make no full optimiser step with batch_size "
                         f"{cfg.batch_size} x accumulation_steps {cfg.accumulation_steps} x {env.world_size} ranks"])
    print0(env, f"data: {ds.num_records} records -> {len(samples)} samples; {total_steps} optimiser steps "
                f"on {env.world_size} rank(s), device {env.device}")
    if val is not None:
        source = (f"held out of {cfg.data_path} (--val_ratio {cfg.val_ratio:g})" if cfg.val_ratio > 0
                  else f"of {cfg.val_data_path}")
        print0(env, f"validation: {len(val[1])} samples {source}, their loss every {cfg.eval_interval} steps")
        if len(val[1]) > len(samples):
            print0(env, f"warning: the validation set has more samples ({len(val[1])}) than training ({len(samples)})")
    for path, tokens in [(cfg.data_path, ds), *([(cfg.val_data_path, val[0])] if cfg.val_data_path else [])]:
        cut = int(tokens.text_truncated.sum())
        if cut:   # of the texts with a token, as data check counts them (an empty main is none)
            texts = int((np.diff(tokens.text_offsets) > 0).sum())
            print0(env, f"warning: {cut:,} of {texts:,} texts of {path} are longer than "
                        f"--max_seq_len {cfg.max_seq_len} and are cut to it (`paratrain data check {path} "
                        f"--tokenizer {cfg.base_model} --max_seq_len {cfg.max_seq_len}` counts them)")
    if cfg.max_steps is not None and total_steps < cfg.max_steps:
        print0(env, f"note: --epochs {cfg.epochs} make {total_steps} steps, fewer than --max_steps {cfg.max_steps}: "
                    "training stops after the epochs (raise --epochs to train longer)")
    # which checkpoint to resume, decided before the model loads (minutes for a large one). A run the
    # checkpoint refuses (other settings) stops here, before it claims the directory from the run training there.
    identity = resume_identity(cfg, env.world_size, data_sha256)
    if choose_checkpoint(cfg, env, out_dir, identity) is None and cfg.init_adapter:
        checked_on_main(env, lambda: check_starting_adapter(cfg, env))   # before the claim and the model load
    # From here this run is the output dir's writer: a run still training on it stops at its next step
    # (trainer_core/owner.py). The checkpoint is picked again after the claim, so none is written after the pick.
    owner_token = owner.claim(out_dir) if env.is_main else ""
    last = choose_checkpoint(cfg, env, out_dir, identity)
    init_adapter = cfg.init_adapter if last is None else None   # a resumed run has its weights in the checkpoint
    if cfg.init_adapter and last is not None:
        print0(env, f"note: --init_adapter is not read: this run resumes from {last}, with its weights")

    def claim_lost_here() -> bool:
        """Whether a newer run has claimed the output dir since (rank 0's answer; the others do not look)."""
        return env.is_main and not owner.holds(out_dir, owner_token)

    def superseded() -> bool:
        """claim_lost_here() on every rank, asked before each write; the training loop asks it with the stop
        flag, in the step's one collective."""
        return any_rank(env, claim_lost_here())[0]

    def stop_superseded() -> int:
        print0(env, f"{out_dir} was taken over by {owner.describe(owner.read_owner(out_dir))}: this run "
                    f"stops at step {step} without writing more (one run writes an output dir at a time)")
        return exit_codes.SUPERSEDED

    if not cfg.resume and env.is_main:
        # its final outputs too: left beside this run's checkpoints they would pass for this run's
        earlier = [p for p in (ckpt.checkpoint_root(out_dir), *output_names(cfg), out_dir / SAMPLES_FILE)
                   if p.exists()]
        if earlier:
            print0(env, f"--no-resume: deleting an earlier run's {', '.join(p.name + '/' * p.is_dir() for p in earlier)}"
                        f" in {out_dir}")
            for path in earlier:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    torch.manual_seed(cfg.seed)  # identical LoRA init on every rank
    model = build_lora_model(cfg, env.device)
    if init_adapter:   # on rank 0: wrapping the model, DDP gives every rank rank 0's parameters
        checked_on_main(env, lambda: load_init_adapter(model, init_adapter))
        print0(env, f"LoRA starts from {init_adapter}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    print0(env, f"model: {cfg.base_model}, LoRA r={cfg.lora_rank} on {cfg.lora_target_modules}, "
                f"{sum(p.numel() for p in trainable):,} trainable parameters, rope_2d_ratio {cfg.rope_2d_ratio} "
                f"({describe_rope_2d(*rope_2d_pairs(model))})")
    if cfg.compile:
        print0(env, "--compile: the decoder layers compile during the first steps (a minute or two)")
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=env.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lr_lambda(total_steps, warmup_steps(cfg.warmup_ratio, total_steps)))
    # float16 has too few exponent bits for small gradients: scale the loss up before backward (GradScaler).
    # bfloat16 and float32 have float32's range and need no scaling.
    scaler = torch.amp.GradScaler(env.device.type, enabled=training_dtype(cfg, env.device) == torch.float16)

    step, start_epoch, start_epoch_step = 0, 0, 0
    since_best = 0   # the checkpoint's LowestLoss.since_best
    validation_unfinished = False   # a stop came at (or during) a step's validation: it runs on resume
    trained = Trained()
    if last is not None:
        state = restore_checkpoint(last, model, optimizer, scheduler, scaler)
        step, start_epoch, start_epoch_step = state["step"], state["epoch"], state["epoch_step"]
        since_best = state.get("validations_since_best", 0)
        validation_unfinished = bool(state.get("validation_unfinished"))
        trained = Trained.from_state(state)
        if step >= total_steps:
            print0(env, f"{last} is at step {step}, the end of this run ({total_steps} steps): "
                        "writing the final outputs")
        else:
            print0(env, f"resuming from {last} (step {step}/{total_steps}, epoch {start_epoch + 1}, "
                        f"epoch step {start_epoch_step})")
    metrics_file = out_dir / "metrics.jsonl"
    if superseded():   # while the model loaded
        return stop_superseded()
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # a run starting afresh keeps no line of an earlier one, step 0's (a validation) included
        _truncate_metrics(metrics_file, after_step=step if last is not None else -1)
    emit(env, {"event": "start", "total_steps": total_steps, "resumed_from_step": step,
               "world_size": env.world_size, "samples": len(samples), "val_samples": len(val[1]) if val else 0})

    lm = ParallelBranchLM(model)
    lm_ddp = DDP(lm, device_ids=[env.local_rank] if env.device.type == "cuda" else None) if env.ddp else lm
    latest_pth = output_names(cfg)[0]
    dense_attention = attention_backend(env.device) != "flex_attention"

    resumed = last is not None

    def save(epoch: int, epoch_step: int) -> None:
        inject_fault(env, step, "checkpoint", resumed)
        weights = lora_state_dict(model)
        if env.is_main:
            state = {"epoch": epoch, "epoch_step": epoch_step, "total_steps": total_steps, "run": identity,
                     "validations_since_best": lowest.since_best, "validation_unfinished": validation_unfinished,
                     **trained.state()}
            path = ckpt.save_checkpoint(out_dir, step=step, lora_weights=weights, optimizer=optimizer,
                                        scheduler=scheduler, scaler=scaler, state=state)
            latest_pth.parent.mkdir(parents=True, exist_ok=True)
            with ckpt.disk_full_named(latest_pth.parent, latest_pth.name):
                ckpt.save_replacing(weights, latest_pth)
            emit(env, {"event": "checkpoint", "step": step, "path": str(path)})
        barrier(env)

    best_dir = output_names(cfg)[3]
    # The lowest validation loss so far, rank 0's: adapter_best/'s. A resumed run goes on from its record,
    # unless that is of a step after the checkpoint (saved before a crash lost those steps: they are trained
    # again) or of another validation set (--val_data_path may change on resume); a run starting afresh from none.
    val_set = validation_set_id(cfg, data_sha256) if env.is_main and val is not None else None
    lowest = LowestLoss(read_best(best_dir, up_to_step=step, val_set=val_set) if val_set and last is not None
                        else None, since_best, cfg.early_stop_min_delta)
    if env.is_main and last is None:
        remove_best_adapter(best_dir)
        (out_dir / SAMPLES_FILE).unlink(missing_ok=True)   # an earlier run's: it would pass for this one's
    elif val_set and lowest.best is None and (best_dir / BEST_FILE).exists():
        print0(env, f"note: {best_dir}/ was measured on another validation set (or at a step trained again): "
                    "this run's validations start a new best, and the validation curve changes its samples here")
    if lowest.best is None and lowest.since_best:
        print0(env, f"note: the early stop's count ({lowest.since_best} validations without a lower loss) starts "
                    f"again: {best_dir}/ is missing or does not count for this run")
        lowest.since_best = 0

    def keep_if_best(val_loss: float) -> None:
        if env.is_main and lowest.add(val_loss, step):
            save_best_adapter(model, best_dir, cfg, step=step, val_loss=val_loss, val_set=val_set)

    def patience_ran_out() -> bool:   # rank 0 counts; all ranks agree (no collective without early stopping)
        return cfg.early_stop_patience > 0 and any_rank(env, env.is_main and lowest.out_of(cfg.early_stop_patience))[0]

    # A run that stopped early and runs again (a retry, the same command, a larger --max_steps) stops there
    # again: only a larger --early_stop_patience (or 0) trains on.
    stopped_early = last is not None and step < total_steps and patience_ran_out()
    if stopped_early:
        print0(env, f"not training on from {last}: {lowest.describe(cfg.early_stop_patience)}. Writing the final "
                    "outputs; a larger --early_stop_patience (or 0) trains on from it")

    # The ETA counts the validations still to come: a third of a training step's time per token (forward only)
    # until one has been timed: the one before training unless it compiled (flex attention, --compile)
    val_tokens = int(sample_lengths(*val).sum()) if val is not None else 0
    eval_s: float | None = None
    if val is not None and last is None:   # before training (LoRA at zero, or --init_adapter's): where the curve starts
        t_val = time.time()
        measured = validation_loss(lm, val, cfg, env, dense_attention)
        if measured is not None and dense_attention and not cfg.compile:
            eval_s = time.time() - t_val
        if superseded():   # while it ran
            return stop_superseded()
        if measured is not None:
            keep_if_best(measured[0])
            emit(env, {"step": 0, "epoch": 0, "loss": None, **val_fields(measured), "total_steps": total_steps,
                       "time": round(time.time(), 3), "tokens": 0, **trained.fields()}, metrics_file)
            print0(env, f"step 0/{total_steps} | val loss {measured[0]:.4f} (before training)")
    elif val is not None and validation_unfinished:
        # the checkpoint's step was saved before its validation (a stop came): the curve's point, adapter_best/
        # and the early stop's count must not miss it, the last step's least of all
        measured = validation_loss(lm, val, cfg, env, dense_attention)
        if superseded():
            return stop_superseded()
        if measured is not None:
            keep_if_best(measured[0])
            stopped_early = stopped_early or (step < total_steps and patience_ran_out())
            complete_metric(env, metrics_file, step, val_fields(measured))
            print0(env, f"step {step}/{total_steps} | val loss {measured[0]:.4f} (the validation a stop left "
                        "unfinished)")
        validation_unfinished = False

    step_time_ema = None
    epoch = start_epoch
    trained.start_clock()
    stop.training = True   # from here a stop signal saves a checkpoint at the next step boundary
    while step < total_steps and epoch < cfg.epochs and not stopped_early:
        batches = rank_batches(epoch_batches(samples, cfg, epoch), env.rank, env.world_size)
        first = start_epoch_step if epoch == start_epoch else 0
        steps_this_epoch = len(batches) // cfg.accumulation_steps   # the same on every rank (rank_batches)
        for epoch_step in range(first, steps_this_epoch):
            t0 = time.time()
            micro = [collate_batch(ds, samples, b, cfg, dense_attention)
                     for b in batches[epoch_step * cfg.accumulation_steps:(epoch_step + 1) * cfg.accumulation_steps]]
            mean_loss = accumulate_gradients(lm_ddp, micro, env, scaler,
                                             poison=inject_fault(env, step + 1, "loss", resumed))
            lr = optimizer.param_groups[0]["lr"]   # this step's
            # DDP: gradients are all-reduced, so every rank sees the same norm and makes the same decision
            grad_norm, applied = optimizer_step(optimizer, scaler, trainable, cfg.max_grad_norm, mean_loss, step + 1)
            # A skipped step used its batch: it counts towards total_steps (the data position stays right), but
            # the schedule follows the steps applied (as in HF Trainer)
            if applied:
                scheduler.step()
            else:
                print0(env, f"step {step + 1}: float16 gradients overflowed at this loss scale; step skipped, "
                            f"loss scale now {scaler.get_scale():g}")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            inject_fault(env, step, "step", resumed)

            tokens = all_reduce_sum(env, float(sum(m.num_tokens for m in micro)))
            trained.add_tokens(int(tokens))
            dt = time.time() - t0
            # before this step writes anything (metrics, a checkpoint, the final outputs)
            stopping, taken_over = any_rank(env, stop.requested, claim_lost_here())
            if taken_over:
                return stop_superseded()
            step_time_ema = dt if step_time_ema is None else 0.9 * step_time_ema + 0.1 * dt
            measured = None
            validation_due = val is not None and (step % cfg.eval_interval == 0 or step == total_steps)
            # not while stopping: the stop's checkpoint comes first
            if validation_due and not stopping:
                t_val = time.time()
                measured = validation_loss(lm, val, cfg, env, dense_attention, stop)
                if measured is not None:   # one that ran out of memory ended early: no measure of the next
                    eval_s = time.time() - t_val
                # it may have taken minutes: a stop or a takeover meanwhile counts before this step writes
                stopping, taken_over = any_rank(env, stop.requested, claim_lost_here())
                if taken_over:
                    return stop_superseded()
                if measured is not None:
                    keep_if_best(measured[0])
                    stopped_early = step < total_steps and patience_ran_out()
            validation_unfinished = validation_due and stopping and measured is None
            if step % cfg.log_interval == 0 or step == total_steps or measured is not None:
                evals_to_come = evaluations_left(step, total_steps, cfg.eval_interval) if val is not None else 0
                eta_s = step_time_ema * (total_steps - step) + evals_to_come * (
                    eval_s if eval_s is not None else val_tokens * dt / max(tokens, 1.0) / 3)
                record = {"step": step, "epoch": epoch + 1, "loss": round(mean_loss, 6), "lr": lr,
                          "grad_norm": round(grad_norm, 6), "tokens_per_s": round(tokens / dt, 1),
                          "gpu_mem_gb": _gpu_mem_gb(env), "eta_s": round(eta_s, 1),
                          "total_steps": total_steps,
                          # to plot against wall-clock time and tokens seen (the step's, all ranks; non-padding)
                          "time": round(time.time(), 3), "tokens": int(tokens), **trained.fields(),
                          **(val_fields(measured) if measured is not None else {})}
                emit(env, record, metrics_file)
                print0(env, f"step {step}/{total_steps} (epoch {epoch + 1}) | loss {mean_loss:.4f} | "
                            + (f"val loss {measured[0]:.4f} | " if measured is not None else "")
                            + f"lr {lr:.2e} | grad {grad_norm:.3f} | {tokens / dt:,.0f} tok/s | "
                              f"eta {_hms(record['eta_s'])}")

            # an early stop's checkpoint keeps its count: the same run started again stops there too
            if stopping or stopped_early or step % cfg.save_interval == 0 or step == total_steps:
                done_epoch = epoch_step + 1 == steps_this_epoch
                save(epoch + 1 if done_epoch else epoch, 0 if done_epoch else epoch_step + 1)
            if stopping:
                print0(env, f"stop requested: checkpoint saved at step {step}; " + (
                    "the job resumes from it when it runs again" if os.environ.get("PARATRAIN_JOB_ID") else
                    "rerun the same command to resume"))
                return 0
            if stopped_early:
                print0(env, f"early stop at step {step}/{total_steps}: {lowest.describe(cfg.early_stop_patience)}")
                break
            if step >= total_steps:
                break
        epoch += 1

    if superseded():
        return stop_superseded()
    write_final_outputs(model, cfg, env, step=step, elapsed_s=time.time() - t_start,
                        probe=probe_logits(model, ds, samples, cfg, env),
                        best=lowest.best, stopped_early=stopped_early)
    if env.is_main:   # the adapter is written: nothing here can cost it
        write_samples_after_training(model, cfg, env, val if val is not None else (ds, samples),
                                     source="validation" if val is not None else "training", step=step, stop=stop,
                                     may_write=lambda: not claim_lost_here())
    return 0


@dataclass
class LowestLoss:
    """The lowest validation loss so far, (loss, step), what adapter_best/ holds, and what --early_stop_patience
    counts: the validations since the last improvement, a loss below the lowest then by more than `min_delta`
    (as HF's EarlyStoppingCallback threshold: a loss lower by less is the new lowest, but no improvement)."""

    best: tuple[float, int] | None = None
    since_best: int = 0
    min_delta: float = 0.0

    def add(self, val_loss: float, step: int) -> bool:
        """Count a validation: True when it is the new lowest. A NaN never is (no later loss is below one)."""
        if not math.isfinite(val_loss) or (self.best is not None and val_loss >= self.best[0]):
            self.since_best += 1
            return False
        improved = self.best is None or val_loss < self.best[0] - self.min_delta
        self.best, self.since_best = (val_loss, step), 0 if improved else self.since_best + 1
        return True

    def out_of(self, patience: int) -> bool:
        """`patience` validations in a row without an improvement (0: never)."""
        return 0 < patience <= self.since_best

    def describe(self, patience: int) -> str:
        if not self.best:
            return ""
        lowest = f"{self.best[0]:.4f} (step {self.best[1]})"
        # with a min_delta the lowest may be among the last validations: lower, but by too little to count
        return (f"in {self.since_best} validations the validation loss has not fallen below the lowest before it by "
                f"more than {self.min_delta:g} (lowest now {lowest}; --early_stop_patience {patience})"
                if self.min_delta else f"the validation loss has not improved on the lowest, {lowest}, in "
                                       f"{self.since_best} validations (--early_stop_patience {patience})")


@dataclass
class Trained:
    """How much a run has trained over all its attempts, for plotting against other runs: the non-padding
    tokens of its steps (all ranks) and the seconds its training loops ran (steps, validations and checkpoints;
    not loading the model, not waiting in a queue or between attempts). Saved in each checkpoint; None for a
    run resumed from a checkpoint saved before they were counted."""

    tokens_seen: int | None = 0
    train_s: float | None = 0.0
    clock_started: float | None = None   # this attempt's loop's start (time.monotonic())

    @classmethod
    def from_state(cls, state: dict) -> Trained:
        return cls(state.get("tokens_seen"), state.get("train_s"))

    def start_clock(self) -> None:
        self.clock_started = time.monotonic()

    def add_tokens(self, tokens: int) -> None:
        if self.tokens_seen is not None:
            self.tokens_seen += tokens

    def seconds(self) -> float | None:
        if self.train_s is None:
            return None
        running = time.monotonic() - self.clock_started if self.clock_started is not None else 0.0
        return round(self.train_s + running, 3)

    def state(self) -> dict:
        """The checkpoint's fields (trainer_state.json)."""
        return {"tokens_seen": self.tokens_seen, "train_s": self.seconds()}

    def fields(self) -> dict:
        """A metric record's fields: none that is not known."""
        return {k: v for k, v in self.state().items() if v is not None}


def restore_checkpoint(path: Path, model, optimizer, scheduler, scaler) -> dict:
    """Load a checkpoint's adapter weights and optimiser/scheduler/loss-scale/RNG state in place; its state
    (trainer_state.json): the optimiser step, epoch and step within that epoch to continue from, the
    validations since the lowest validation loss then, and what Trained counts."""
    weights, blob, state = ckpt.load_checkpoint(path)
    load_lora_weights(model, weights, path)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])   # the number of steps applied
    # The saved learning rates are the saved run's schedule's. A resumed run may be longer or shorter
    # (--max_steps, --epochs): its rates are this run's schedule at the steps applied so far.
    for group, base_lr, rate in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * rate(scheduler.last_epoch)
    if blob.get("scaler"):   # a float16 run's loss scale; empty or absent (older checkpoints): start afresh
        scaler.load_state_dict(blob["scaler"])
    torch.set_rng_state(blob["rng_cpu"])
    return state


def accumulate_gradients(lm: torch.nn.Module, micro: list[PackedBatch], env: DistEnv, scaler: torch.amp.GradScaler,
                         poison: bool = False) -> float:
    """Forward and backward over one optimiser step's micro-batches: the mean loss per label token over
    all of them and all ranks (the same number on every rank), with the gradients of that mean.

    Each micro-batch's summed loss is divided by the step's label tokens (all ranks), so micro-batches and
    ranks weigh by their tokens, not equally; DDP averages over ranks, hence the world_size factor. DDP
    syncs gradients on the last micro-batch only. `poison` (a test fault) makes the loss NaN, as a diverged
    forward would, with NaN gradients too."""
    label_tokens = max(1.0, all_reduce_sum(env, float(sum(m.num_label_tokens for m in micro))))
    loss_sum = torch.zeros((), device=env.device)
    for i, mb in enumerate(micro):
        with (lm.no_sync() if env.ddp and i < len(micro) - 1 else nullcontext()):
            loss = lm(**vars(mb.to(env.device)))
            if poison:
                loss = loss * float("nan")
            scaler.scale(loss * env.world_size / label_tokens).backward()
        loss_sum += loss.detach()
    return all_reduce_sum(env, float(loss_sum)) / label_tokens


@torch.no_grad()
def validation_loss(lm: ParallelBranchLM, val: Split, cfg: TrainConfig, env: DistEnv,
                    dense_attention: bool, stop: StopFlag | None = None) -> tuple[float, int] | None:
    """(mean loss per label token, label tokens) over every validation sample, the batches shared out over the
    ranks (each sample counted once), in eval mode (no LoRA dropout). Called on every rank; rank 0 reports its
    progress when it takes long. None when a rank ran out of memory: the validation is skipped, said once, and
    training goes on (a validation batch is a training batch without gradients: it fits where training fits,
    unless --val_data_path holds longer samples). None too when a stop is requested during it: it can take
    minutes, and the stop's checkpoint must be saved before the worker's grace period ends."""
    ds, samples = val
    batches = epoch_batches(samples, cfg, epoch=0)[env.rank::env.world_size]
    model = lm.peft_model
    was_training = model.training
    model.eval()
    progress = Progress(len(batches), lambda line: print0(env, line), what="validating", unit="batches")
    loss_sum, label_tokens, ran_out, stopped = 0.0, 0, False, False
    try:
        for done, batch in enumerate(batches):
            if stop is not None and stop.requested:
                stopped = True
                break
            mb = collate_batch(ds, samples, batch, cfg, dense_attention)
            loss_sum += float(lm(**vars(mb.to(env.device))))
            label_tokens += mb.num_label_tokens
            progress.update(done + 1)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        ran_out = True
    finally:
        model.train(was_training)
    ran_out, stopped = any_rank(env, ran_out, stopped)
    if ran_out:
        print0(env, "warning: the validation ran out of memory and is skipped (training goes on); its batches "
                    "are --batch_size samples as in training: a --val_data_path with longer samples needs a lower "
                    "--max_seq_len")
        return None
    if stopped:
        print0(env, "stop requested: this validation is left unfinished, so that the checkpoint is saved now")
        return None
    total_tokens = all_reduce_sum(env, float(label_tokens))
    return all_reduce_sum(env, loss_sum) / max(1.0, total_tokens), int(total_tokens)


def val_fields(measured: tuple[float, int]) -> dict:
    """A metric record's validation fields."""
    return {"val_loss": round(measured[0], 6), "val_tokens": measured[1]}


def write_final_outputs(model, cfg: TrainConfig, env: DistEnv, *, step: int, elapsed_s: float,
                        probe: list[float] | None, best: tuple[float, int] | None = None,
                        stopped_early: bool = False) -> None:
    """The final .pth, the latest .pth and the PEFT adapter directory, then the `done` event (with `best`, the
    validation loss and step of adapter_best/, when there is one, and whether --early_stop_patience ended the
    run). Every rank reports a digest of its weights first: DDP must leave them all the same."""
    latest_pth, final_pth, adapter_dir, best_dir = output_names(cfg)
    weights = lora_state_dict(model)
    hashes = gather_objects(env, weights_digest(weights))
    if env.is_main:
        final_pth.parent.mkdir(parents=True, exist_ok=True)
        with ckpt.disk_full_named(final_pth.parent, "the final outputs"):
            ckpt.save_replacing(weights, final_pth)
            ckpt.save_replacing(weights, latest_pth)
            save_adapter_dir(model, adapter_dir, cfg)
        best_fields = ({"best_adapter_dir": str(best_dir), "best_val_loss": round(best[0], 6), "best_step": best[1]}
                       if best else {})
        emit(env, {"event": "done", "step": step, "final_path": str(final_pth), "adapter_dir": str(adapter_dir),
                   **best_fields, "stopped_early": stopped_early, "elapsed_s": round(elapsed_s, 1),
                   "rank_weight_digests": hashes, "probe_logits": probe})
        print0(env, f"done{' (stopped early)' if stopped_early else ''}: {final_pth} and {adapter_dir}/" + (
            f"; the lowest validation loss, {best[0]:.4f}, was at step {best[1]}: {best_dir}/" if best else ""))
    barrier(env)


def write_samples_after_training(model, cfg: TrainConfig, env: DistEnv, split: Split, *, source: str, step: int,
                                 stop: StopFlag, may_write) -> None:
    """<output_dir>/samples.jsonl (trainer_core/samples.py), on rank 0, after the final outputs; none with
    --sample_count 0 (an earlier one would not describe this adapter). A failure is a warning: the run has
    succeeded. A stop signal ends it within a token (a cancel must not outlast the worker's grace period), and
    a run that lost the output dir meanwhile (`may_write()` false) writes nothing."""
    path = Path(cfg.output_dir) / SAMPLES_FILE
    if not cfg.sample_count:
        path.unlink(missing_ok=True)
        return
    t0 = time.time()
    try:
        gen = Generator(model, load_tokenizer(cfg.base_model), cfg.branch_stride)
        stopping = lambda: stop.requested or not may_write()  # noqa: E731
        with eager_inference(model):
            records = continue_samples(gen, split, source=source, count=cfg.sample_count,
                                       new_tokens=cfg.sample_new_tokens, step=step, should_stop=stopping,
                                       log=lambda line: print0(env, line))
        if not may_write():
            print0(env, f"note: no samples written: {cfg.output_dir} was taken over by a newer run meanwhile")
            return
        write_samples(path, records)
    except Exception as e:   # noqa: BLE001 (out of memory included)
        print0(env, f"warning: no samples written ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return
    print0(env, f"samples: {len(records)} {source} sample(s) continued by up to {cfg.sample_new_tokens} tokens a "
                f"branch in {time.time() - t0:.1f} s: {path}")


BEST_FILE = "validation.json"   # in adapter_best/: {"step", "val_loss", "val_set"} of the adapter saved there


def validation_set_id(cfg: TrainConfig, data_sha256: str) -> str:
    """Which samples a validation loss averages: losses of two sets are not compared."""
    if cfg.val_data_path:
        return f"file sha256 {file_sha256(cfg.val_data_path)}"
    return f"held out of sha256 {data_sha256}: val_ratio {cfg.val_ratio}, seed {cfg.seed}"


def save_best_adapter(model, best_dir: Path, cfg: TrainConfig, *, step: int, val_loss: float, val_set: str) -> None:
    """The adapter as it is now into `best_dir`, with its step, validation loss and set. Written beside it
    (dot names: not listed as a job's artifacts), then the old one moved aside and the new one into place:
    a kill leaves a whole adapter_best/ (or, between the two renames, none), never a part of one."""
    tmp, old = best_aside(best_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with ckpt.disk_full_named(best_dir.parent, best_dir.name):
            save_adapter_dir(model, tmp, cfg)
            (tmp / BEST_FILE).write_text(json.dumps({"step": step, "val_loss": val_loss, "val_set": val_set}))
            with open(tmp / "README.md", "a", encoding="utf-8") as readme:
                readme.write(f"\nThis is the adapter of step {step}, the lowest validation loss of its run: "
                             f"{val_loss:.4f} ({BEST_FILE}).\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if best_dir.exists():
        os.replace(best_dir, old)
    os.replace(tmp, best_dir)
    shutil.rmtree(old, ignore_errors=True)


def remove_best_adapter(best_dir: Path) -> None:
    """An earlier run's adapter_best/ (and what a kill left of one being written): a run starting afresh
    measures its own."""
    for path in (best_dir, *best_aside(best_dir)):
        shutil.rmtree(path, ignore_errors=True)


def best_aside(best_dir: Path) -> tuple[Path, Path]:
    """Where save_best_adapter writes the next best, and moves the previous one while it swaps them."""
    return best_dir.with_name(f".{best_dir.name}.tmp"), best_dir.with_name(f".{best_dir.name}.old")


def read_best(best_dir: Path, up_to_step: int, val_set: str) -> tuple[float, int] | None:
    """(validation loss, step) recorded in `best_dir`, or None: none there (or no weights), one of a later
    step, or of another validation set."""
    try:
        record = json.loads((best_dir / BEST_FILE).read_text())
        best = (float(record["val_loss"]), int(record["step"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    complete = (best_dir / "adapter_model.safetensors").is_file()
    return best if complete and best[1] <= up_to_step and record.get("val_set") == val_set else None


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].float().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def probe_logits(model, ds, samples, cfg: TrainConfig, env: DistEnv) -> list[float] | None:
    """A few logits of the trained model on the first sample: lets anyone check that the saved adapter
    reproduces the model as it was at the end of training (computed as load_adapter_dir loads it: SDPA).
    None, rather than no final outputs, when even that does not fit."""
    batch = collate_batch(ds, samples, np.array([0]), cfg).to(env.device)
    try:
        with eager_inference(model):
            hidden = hidden_states(model, batch.input_ids, batch.pos1d, batch.branch_pos, batch.time_ids,
                                   batch.sample_ids)
            last = int((batch.sample_ids[0] >= 0).sum()) - 1
            logits = output_layer(model)(hidden[0, last])   # one position, not [T, V]
        return [round(float(x), 5) for x in logits[:8]]
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        print0(env, "out of memory computing the probe logits of the first sample; the final outputs are "
                    "written without them")
        return None


def complete_metric(env: DistEnv, metrics_file: Path, step: int, fields: dict) -> None:
    """Add `fields` to the step's metric record, in metrics.jsonl and as a new line on stdout (the server
    replaces a step's point with a newer one); a new record when the step logged none."""
    if not env.is_main:
        return
    lines = metrics_file.read_text(encoding="utf-8").splitlines() if metrics_file.exists() else []
    records = [json.loads(ln) for ln in lines if ln.strip()]
    logged = next((r for r in reversed(records) if r.get("step") == step and "event" not in r), None)
    record = {**(logged or {"step": step, "loss": None, "time": round(time.time(), 3), "tokens": 0}), **fields}
    _truncate_metrics(metrics_file, after_step=step - 1)
    emit(env, record, metrics_file)


def _truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop lines of steps that will be trained again, so the file has each step once."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= after_step]
    path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")


def _gpu_mem_gb(env: DistEnv) -> float | None:
    if env.device.type != "cuda":
        return None
    # GiB, the unit of the VRAM estimate this number calibrates (and of MEASUREMENTS.md's "GB")
    return round(torch.cuda.max_memory_allocated(env.device) / 2**30, 3)


def as_flags(text: str) -> str:
    """TrainConfig field names in `text` written as the command-line flags they are here."""
    import re

    return re.sub(r"\b(" + "|".join(TrainConfig.model_fields) + r")\b", r"--\1", text)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# No torch.distributed.elastic `record` here: a rank it records (a peer's "Connection closed" after another
# rank was SIGKILLed) carries an earlier timestamp than the killed rank, and torchrun then reports the
# consequence as the root cause, whose exit code the worker reads (tests/reliability: crash_rank).
def main(argv: list[str] | None = None) -> int:
    return run_config(TrainConfig.from_cli(argv, prog="python -m trainer_core.train"))


# --- `paratrain train`: the same flags, one process (several: torchrun ... -m trainer_core.train --ddp) ---
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_cli_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = TrainConfig.from_namespace(args)
    except ValidationError as e:
        print(f"paratrain train: {format_validation_error(e, whole='flags', prefix='--')}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    return run_config(cfg)


def out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the plain RuntimeError of an allocation that failed on the CPU."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError)
                                                     and "DefaultCPUAllocator: can't allocate memory" in str(e))


def run_config(cfg: TrainConfig) -> int:
    """Train; the exit code is the process contract of docs/API.md (0, 2 bad input, 3 out of memory,
    4 diverged, 5 another run took over the output dir, 130 stopped without a new checkpoint)."""
    quiet_libraries()
    stop = StopFlag()
    stop.install()
    env = compute_init(cfg.ddp)
    stop.announce = env.is_main
    if cfg.ddp and not env.ddp:
        print0(env, "note: --ddp without torchrun trains in this one process (several: torchrun --nproc_per_node N "
                    "-m trainer_core.train ... --ddp)")
    try:
        return train(cfg, env, stop)
    except DataError as e:
        return report_failure(env, exit_codes.BAD_INPUT, "\n".join(e.lines))
    except StopNow as e:
        print0(env, f"stopped {e}")
        return exit_codes.STOPPED_UNSAVED
    except Diverged as e:
        return report_failure(env, exit_codes.DIVERGED, (
            f"paratrain: training diverged at {e}; the step was not applied and the last checkpoint is intact. "
            f"Try a lower --learning_rate (now {cfg.learning_rate:g})"
            + (", --dtype bfloat16 instead of float16" if cfg.dtype == "float16" else "")
            + " or a smaller --lora_alpha."))
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        return report_failure(env, exit_codes.OUT_OF_MEMORY, f"paratrain: out of memory on rank {env.rank}: "
                              f"{str(e).splitlines()[0]}\nTry {as_flags('; '.join(memory_levers(cfg)))}.",
                              every_rank=True)
    finally:
        compute_cleanup(env)


def report_failure(env: DistEnv, code: int, message: str, every_rank: bool = False) -> int:
    """The trainer's reason to exit with `code`: on stderr for people, and as a `failed` event on stdout, which
    the worker takes for the job's failure reason (the stderr before it is progress). Rank 0's, or with
    `every_rank` (out of memory strikes one rank) each failing rank's."""
    if env.is_main or every_rank:
        write_line(message, sys.stderr)
        write_line(json.dumps({"event": "failed", "exit_code": code, "rank": env.rank, "message": message}),
                   sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
