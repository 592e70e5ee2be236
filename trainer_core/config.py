"""The one training-job schema.

Every other view of a job is derived from `TrainConfig`: the `python -m trainer_core.train` flags
(`add_cli_arguments` / `from_cli`), the server's request body, the UI form (field groups, defaults and
help come from here) and the worker's torchrun command line (`to_cli_args`). Add a field here and all
of them gain it; nothing else lists the parameters.

This module must not import torch: the server and UI import it.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Literal, get_args, get_origin

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Tokens per cross-entropy chunk: the trainer never holds more logits than this many rows of the
# vocabulary (trainer_core.model), and the VRAM estimate charges exactly that (trainer_core.vram).
# 2048 rows of a 152k vocabulary: ~0.6 GB of bf16 logits, ~2 GB with their float32 copies at the peak
# (8192 cost ~6 GB at the quick-start shape, a third of the 16 GB budget); one chunk is still a large matmul.
CE_CHUNK_TOKENS = 2048

# Upper bounds: far beyond any real run, low enough that no count overflows a tensor or a loop runs for
# hours before the first step, so a typo fails validation instead of a job.
MAX_POSITION = 1 << 20       # tokens per branch or row, and the branch coordinate step
MAX_BRANCHES = 1024          # texts per sample
MAX_COUNT = 1 << 16          # batch size, accumulation steps
MAX_STEPS = 1_000_000_000    # optimiser steps, log and save intervals

# Groups as the guide groups its flags ("model", "data", "training"), the validation loss, and where outputs go.
GROUPS = ("model", "data", "validation", "training", "output")


def _field(default: Any, help: str, group: str, *, is_path: bool = False, **kw: Any) -> Any:
    """A schema field in one of GROUPS; `is_path`: a file or directory (the UI gives it a wide input)."""
    extra = {"group": group, **({"format": "path"} if is_path else {})}
    return Field(default, description=help, json_schema_extra=extra, **kw)


# What a run may change when it resumes a checkpoint: how long it runs (the LR schedule follows the new
# length), how steps are computed, where and how often it writes or validates, and where the data file lies (the
# data count by content; a validation file does not change what is trained). Any other field defines the run, so a checkpoint saved under another value belongs to
# another run (trainer_core.train.resume_identity).
NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$"   # no leading '.': lora/.{name}_*.pth would be a hidden file
RESUMABLE_CHANGES = frozenset({"epochs", "max_steps", "gradient_checkpointing", "compile", "ddp", "tokens_per_row",
                               "output_dir", "name", "log_interval", "save_interval", "resume", "data_path",
                               "eval_interval", "val_data_path", "early_stop_patience",
                               "early_stop_min_delta", "init_adapter", "sample_count", "sample_new_tokens"})   # a resumed run's weights are its checkpoint's


class TrainConfig(BaseModel):
    """Parameters of one parallel-branch LoRA training run (flag names are the guide's)."""

    # A misspelled key is an error, never a silent default; NaN/Infinity are refused (JSON cannot carry
    # them back to the worker, and no parameter means anything at infinity).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # --- model ---------------------------------------------------------------------------------
    base_model: str = _field(..., "HuggingFace model directory (a local path; from the command line also a hub id "
                                  "already in the local HuggingFace cache; nothing is downloaded).", "model",
                             is_path=True, min_length=1)
    lora_rank: int = _field(8, "LoRA rank. Guide: <1B models 4-8, 1-3B 8-16, >3B 16-32.", "model", ge=1, le=1024)
    lora_alpha: float | None = _field(None, "LoRA alpha; empty means 2 x lora_rank.", "model", gt=0,
                                      le=16384)
    lora_dropout: float = _field(0.0, "Dropout on the LoRA branch.", "model", ge=0.0, lt=1.0)
    lora_target_modules: str = _field(
        "all-linear", "Comma-separated module names to adapt, or 'all-linear' (every linear layer of the decoder).",
        "model", min_length=1)
    rope_2d_ratio: float = _field(
        0.5, "Share of rotary frequency pairs (the lowest) that encode 2D (branch, time) positions. "
        "0 = stock model. Guide: many short branches 0.6-0.7, few long branches 0.3-0.4.", "model", ge=0.0, le=1.0)
    branch_stride: int = _field(128, "Branch coordinate step between consecutive branches.", "model", ge=1,
                                le=MAX_POSITION)
    gradient_checkpointing: bool = _field(False, "Recompute activations in backward to save memory.", "model")
    compile: bool = _field(False, "torch.compile each decoder layer (fuses the element-wise work between the "
                           "matmuls); the first steps are slow while it compiles.", "model")
    adapter_dtype: Literal["float32", "model"] = _field(
        "float32", "LoRA weights and optimiser state in float32, computed in the model's dtype (mixed precision), "
        "or stored in the model's dtype too (bf16 on CUDA: a little less memory; small updates can round away).",
        "model")
    init_adapter: str | None = _field(
        None, "Start LoRA from this paratrain adapter (a run's <output_dir>/adapter or adapter_best/) instead of "
        "zero, e.g. to train on with other data. Its lora_rank, lora_alpha, lora_target_modules, rope_2d_ratio and "
        "branch_stride must be this run's.", "model", is_path=True, min_length=1)

    # --- data ----------------------------------------------------------------------------------
    data_path: str = _field(..., "Parallel JSONL file: {\"main\", \"branches\"} or {\"text\"} per line.", "data",
                            is_path=True, min_length=1)
    max_seq_len: int = _field(1024, "Each branch (and the main) is truncated to this many tokens.", "data", ge=1,
                             le=MAX_POSITION)
    branches_per_sample: int = _field(8, "Fixed number of consecutive text records grouped into one sample.",
                                      "data", ge=1, le=MAX_BRANCHES)
    max_branches_per_sample: int | None = _field(
        None, "Dynamic grouping: a random count in [min, max] text records per sample ({\"main\", \"branches\"} "
        "records keep their own branches).", "data", ge=1,
        le=MAX_BRANCHES)
    min_branches_per_sample: int = _field(1, "Lower bound of the dynamic branch count (the last sample of a run of "
                                          "text records takes what is left, maybe fewer).", "data", ge=1,
                                         le=MAX_BRANCHES)
    batch_by_samples: bool = _field(False, "batch_size counts samples (otherwise it counts texts/branches).", "data")
    tokens_per_row: int = _field(
        16384, "Samples of a step are packed into rows of at most this many tokens (no padding to the "
        "longest sample; a longer sample gets a row of its own).", "data", ge=16, le=MAX_POSITION)
    val_ratio: float = _field(
        0.0, "Share of data_path's samples held out for a validation loss (chosen with the seed; they are not "
        "trained on), at most half. 0: none.", "validation", ge=0.0, le=0.5)
    val_data_path: str | None = _field(
        None, "A separate Parallel JSONL for the validation loss (instead of val_ratio).", "validation",
        is_path=True, min_length=1)
    eval_interval: int = _field(50, "With a validation set (val_ratio or val_data_path): its loss every N "
                                "optimiser steps, before the first and after the last.", "validation", ge=1,
                                le=MAX_STEPS)
    early_stop_patience: int = _field(
        0, "With a validation set: stop once its loss has not improved on the lowest for this many validations "
        "in a row (adapter_best/ holds the lowest's adapter). 0: train to the end.", "validation", ge=0,
        le=MAX_STEPS)
    early_stop_min_delta: float = _field(
        0.0, "With early_stop_patience: a validation loss counts as an improvement only when it is below the lowest "
        "so far by more than this (a noisy curve that creeps down stops too). adapter_best/ still keeps the "
        "lowest. 0: any lower loss.", "validation", ge=0.0, le=1000.0)

    # --- training ------------------------------------------------------------------------------
    epochs: int = _field(3, "Passes over the data.", "training", ge=1, le=1000)
    batch_size: int = _field(16, "Per-device batch: samples with --batch_by_samples, else at least this many texts "
                                 "(whole samples; a main counts as a text; an epoch's last batch may hold fewer).",
                             "training", ge=1, le=MAX_COUNT)
    learning_rate: float = _field(1e-4, "Peak AdamW learning rate (warmup, then cosine decay).", "training", gt=0,
                                  le=1.0)
    warmup_ratio: float = _field(0.05, "Share of optimiser steps spent warming up.", "training", ge=0.0, le=1.0)
    weight_decay: float = _field(0.0, "AdamW weight decay.", "training", ge=0.0, le=10.0)
    max_grad_norm: float = _field(1.0, "Gradient-norm clipping threshold.", "training", gt=0,
                                  le=1e9)
    accumulation_steps: int = _field(1, "Micro-batches per optimiser step.", "training", ge=1, le=MAX_COUNT)
    max_steps: int | None = _field(None, "Stop after this many optimiser steps (empty: run all epochs).",
                                   "training", ge=1, le=MAX_STEPS)
    dtype: Literal["bfloat16", "float16", "float32"] = _field(
        "bfloat16", "Training precision on CUDA (CPU runs always use float32). float16, for GPUs without bfloat16, "
        "trains with loss scaling.", "training")
    ddp: bool = _field(False, "Distributed data parallel under torchrun (NCCL on CUDA, gloo on CPU).", "training")
    seed: int = _field(42, "Seed for data order, branch grouping and LoRA init.", "training", ge=0, le=2**32 - 1)

    # --- output --------------------------------------------------------------------------------
    output_dir: str = _field("out", "Where lora/, adapter/, checkpoints/ and metrics.jsonl go.", "output",
                             is_path=True, min_length=1)
    # the pattern is in the schema for clients, and checked by _name_is_part_of_a_file_name, whose message
    # a person reads (pydantic's own would quote the regex)
    name: str = Field("paratrain", description="Run name used in <output_dir>/lora/{name}_{model}.pth.",
                      json_schema_extra={"group": "output", "pattern": NAME_PATTERN}, min_length=1, max_length=100)
    log_interval: int = _field(1, "Log metrics every N optimiser steps.", "output", ge=1, le=MAX_STEPS)
    save_interval: int = _field(50, "Save a resumable checkpoint every N optimiser steps.", "output", ge=1,
                                le=MAX_STEPS)
    resume: bool = _field(True, "Continue from the newest checkpoint in output_dir when there is one.", "output")
    sample_count: int = _field(2, "After training, continue this many samples (the validation set's first, else the "
                               "training set's) from each branch's first tokens, and write what the model wrote "
                               "beside what the data has in <output_dir>/samples.jsonl. 0: none.", "output", ge=0,
                               le=100)
    sample_new_tokens: int = _field(32, "The most tokens each branch of such a sample grows by (greedy).", "output",
                                    ge=1, le=4096)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # a NUL byte cannot be a path or a flag, and PostgreSQL text columns refuse it
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("name", mode="after")
    @classmethod
    def _name_is_part_of_a_file_name(cls, value: str) -> str:
        if not re.fullmatch(NAME_PATTERN, value):
            raise ValueError("letters, digits, '.', '_' and '-' only, no spaces, not starting with '.' (it is part "
                             "of the output file names), e.g. my-first-run")
        return value

    @model_validator(mode="after")
    def _check_branch_bounds(self) -> "TrainConfig":
        if self.max_branches_per_sample is not None and self.min_branches_per_sample > self.max_branches_per_sample:
            raise ValueError("min_branches_per_sample must be <= max_branches_per_sample")
        if self.max_branches_per_sample is None and self.min_branches_per_sample != 1:
            raise ValueError("min_branches_per_sample applies to dynamic grouping only: set max_branches_per_sample "
                             "too (or use branches_per_sample for a fixed count)")
        return self

    @model_validator(mode="after")
    def _check_one_validation_set(self) -> "TrainConfig":
        if self.val_ratio > 0 and self.val_data_path is not None:
            raise ValueError("val_ratio and val_data_path both choose the validation set: give one of them")
        if self.early_stop_patience and not self.has_validation:
            raise ValueError("early_stop_patience stops on the validation loss: give val_ratio or val_data_path too")
        if self.early_stop_min_delta and not self.early_stop_patience:
            raise ValueError("early_stop_min_delta applies to early stopping: give early_stop_patience too")
        return self

    @property
    def has_validation(self) -> bool:
        return self.val_ratio > 0 or self.val_data_path is not None

    @model_validator(mode="after")
    def _check_float16_adapters(self) -> "TrainConfig":
        # float16 trains with loss scaling, which unscales float32 gradients only
        if self.dtype == "float16" and self.adapter_dtype == "model":
            raise ValueError("dtype float16 needs adapter_dtype float32: float16 LoRA weights cannot be "
                             "loss-scaled (or use dtype bfloat16)")
        return self

    @property
    def resolved_lora_alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def model_short_name(self) -> str:
        """The `{model}` part of output names: the last path component of base_model ('.' or '..' as the
        directory they name)."""
        name = self.base_model.rstrip("/").split("/")[-1]
        if name in ("", ".", ".."):
            name = os.path.basename(os.path.abspath(self.base_model))
        return name or "model"

    # --- derived views -----------------------------------------------------------------------------
    def to_cli_args(self) -> list[str]:
        """Flags for `python -m trainer_core.train`; round-trips through `from_cli`."""
        args: list[str] = []
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if value is None:
                continue
            if _is_bool(info.annotation):
                if value != info.default:
                    args.append(f"--{name}" if value else f"--no-{name}")
                continue
            args += [f"--{name}", str(value)]
        return args

    @classmethod
    def from_cli(cls, argv: list[str] | None = None, prog: str = "trainer_core.train") -> "TrainConfig":
        parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
        add_cli_arguments(parser)
        try:
            return cls.from_namespace(parse_args_with_hints(parser, argv))
        except ValidationError as e:
            parser.error(format_validation_error(e, whole="flags", prefix="--"))
            raise  # unreachable: parser.error exits

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "TrainConfig":
        """The flags `add_cli_arguments` defined and the user gave (others in `ns` are not the config's)."""
        return cls(**{k: v for k, v in vars(ns).items() if k in cls.model_fields and v is not None})

    @classmethod
    def fields_by_group(cls) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {g: [] for g in GROUPS}
        for name, info in cls.model_fields.items():
            out[_group(info)].append(name)
        return out


MAX_ATTEMPTS = 100   # a job's max_attempts as submitted (hand-backs may grow it later)


class JobResources(BaseModel):
    """How the queue runs a job, next to its TrainConfig: GPUs, processes, machines, order and retries.
    The API's JobCreate and the UI form's Resources group are both made from these fields."""

    gpus: int = Field(1, ge=0, le=64, description="GPUs per node; 0 runs on CPU (gloo).")
    nproc: int | None = Field(None, ge=1, le=64, description="Processes of a CPU job (gpus=0); default 1. "
                              "A GPU job runs one process per GPU.")
    nodes: int = Field(1, ge=1, le=64, description="Machines (workers) the job spans. More than one: the job waits "
                       "until that many workers each have `gpus` free, then starts on all of them at once.")
    priority: int = Field(0, ge=-1000, le=1000, description="Higher runs first; FIFO within a priority.")
    max_attempts: int | None = Field(None, ge=1, le=MAX_ATTEMPTS,
                                     description="Runs a job may lose (its worker gone) before it fails; "
                                                 "default: the server's.")

    @property
    def procs_per_node(self) -> int:
        return self.gpus if self.gpus > 0 else (self.nproc or 1)

    @classmethod
    def of_stored_job(cls, job: Any) -> JobResources:
        """The resources that submit a stored job (the table row or its API record) again: its `nproc` only
        for a CPU job (a GPU job's is its GPU count, set by the server), its `max_attempts` within the
        bound (hand-backs grew it)."""
        get = job.get if isinstance(job, dict) else lambda name: getattr(job, name)
        return cls(gpus=get("gpus"), nproc=get("nproc") if get("gpus") == 0 else None, nodes=get("nodes"),
                   priority=get("priority"), max_attempts=min(get("max_attempts") or MAX_ATTEMPTS, MAX_ATTEMPTS))


def closest_name(name: str, known: Iterable[str]) -> str | None:
    """The known name a misspelt one most likely meant (difflib's closest match), or None."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return close[0] if close else None


def _load_mapping(text: str) -> Any:
    """A job file's JSON or YAML; a key given twice is an error (both readers would keep the last one silently,
    and train something the file's first line does not say)."""
    import json

    import yaml

    def unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if dupes := sorted({k for k in keys if keys.count(k) > 1}):
            raise ValueError(f"duplicate key {dupes[0]!r}")   # json names no line here
        return dict(pairs)

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *defaults`: its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool)) and key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first_line[key] + 1})", key_node.start_mark)
                if isinstance(key, (str, int, float, bool)):
                    first_line[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

    # JSON first: YAML 1.1 refuses some valid JSON (tab indentation)
    if text.lstrip().startswith("{"):
        return json.loads(text, object_pairs_hook=unique_pairs)
    return yaml.load(text, Loader=UniqueKeyLoader) or {}


def _check_plain(value: Any, where: str = "") -> None:
    """What YAML holds beyond JSON (NaN, infinity, dates, binary, sets) cannot be sent or stored: ValueError
    naming the key."""
    import math

    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for item in value:
            _check_plain(item, where)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value} is not a value a job can hold (give a finite number)")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"{where}: a {type(value).__name__} value; give plain text, a number, true/false or a "
                         "list of them")


def parse_job_file(text: str, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """A saved job (the UI's *Save as YAML*, `paratrain submit`'s input): TrainConfig fields at the top
    level, JobResources fields under `job:`; a bare TrainConfig YAML or JSON is one too, and so is the API's
    request body (`{"config": {...}, "gpus": ...}`). `overrides` are
    `key=value` (`job.key=value` for a job field; the value read as YAML: 3e-4, true, [q_proj, v_proj]),
    applied over the file. Returns (the config fields that are set, the job fields that are set), checked
    against both schemas (required config fields may be missing). ValueError naming the line, the key or
    the field."""
    import json

    import yaml

    try:
        data = _load_mapping(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ValueError(f"not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ValueError("the file does not hold a mapping of field: value")
    if isinstance(data.get("config"), dict):   # the API's JobCreate body: {"config": {...}, "gpus": 1, ...}
        resources = {k: v for k, v in data.items() if k != "config"}
        beside = sorted(map(str, set(resources) - set(JobResources.model_fields)))
        if beside:
            named = [f"{key} (did you mean {close}?)" if (close := closest_name(key, JobResources.model_fields))
                     else key for key in beside]
            raise ValueError(f"next to 'config' (the API's request body) only {'/'.join(JobResources.model_fields)} "
                             f"may stand, not {', '.join(named)}")
        data = {**data["config"], **({"job": resources} if resources else {})}
    given_by: dict[str, str] = {}   # key as written ('lr', 'job.gpus') -> the --set that gave its value
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {override!r}: expected key=value (job.key=value for a job field)")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value   # plain text, e.g. a path with a colon
        section, _, name = key.strip().rpartition(".")
        if section == "job":
            if data.get("job") is None:
                data["job"] = {}
            if isinstance(data["job"], dict):   # else the check below names it
                data["job"][name] = parsed
                given_by[f"job.{name}"] = f"--set {override}"
        else:
            data[key.strip()] = parsed
            given_by[key.strip()] = f"--set {override}"
    _check_plain(data)
    job = data.pop("job", None)
    job = {} if job is None else job   # `job: 0` is a mistake to name, not "no job section"
    if not isinstance(job, dict):
        raise ValueError(f"'job' must be a mapping of {'/'.join(JobResources.model_fields)}")
    unknown = (sorted(map(str, set(data) - set(TrainConfig.model_fields)))
               + sorted(f"job.{k}" for k in set(job) - set(JobResources.model_fields)))
    if unknown:
        known = [*TrainConfig.model_fields, *(f"job.{k}" for k in JobResources.model_fields)]
        named = {key: f"{key} (did you mean {close}?)" if (close := closest_name(key, known)) else key
                 for key in unknown}
        # a --set's own mistake is named as the --set's; the caller names the file before the others
        in_file = [named[key] for key in unknown if key not in given_by]
        by_set = [f"{given_by[key]}: unknown config key {named[key]}" for key in unknown if key in given_by]
        raise ValueError("; ".join(([f"unknown config keys: {', '.join(in_file)}"] if in_file else []) + by_set))
    try:   # every value as the schema takes it (required fields it may lack are stand-ins here)
        TrainConfig(**{"base_model": "-", "data_path": "-", **data})
    except ValidationError as e:
        raise ValueError(format_validation_error(e, given_by={k: v for k, v in given_by.items()
                                                              if not k.startswith("job.")})) from None
    try:
        JobResources.model_validate(job, strict=True)   # YAML gives numbers as numbers: "2" is a mistake
    except ValidationError as e:
        job_given_by = {key.removeprefix("job."): source for key, source in given_by.items() if key.startswith("job.")}
        raise ValueError(format_validation_error(e, whole="job", prefix="job.", given_by=job_given_by)) from None
    return data, job


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _group(info: Any) -> str:
    extra = info.json_schema_extra or {}
    return extra.get("group", "training") if isinstance(extra, dict) else "training"


# What the server sets in every job's config, whatever was sent: the job's own output dir
# (<data_dir>/jobs/<id>/out), and resuming from it (its only checkpoints are its earlier attempts').
JOB_SET_FIELDS = {"output_dir": "set by the server for a job: <data_dir>/jobs/<id>/out",
                  "resume": "always on for a job: a re-queued attempt resumes its own checkpoints"}


# Where the trainer keeps the adapter of the lowest validation loss, in the output dir (a job's retry carries
# it over with the checkpoints; the UI downloads it with adapter/)
BEST_ADAPTER_DIR = "adapter_best"
# What the trained model wrote after training (trainer_core/samples.py; the UI shows it with the job)
SAMPLES_FILE = "samples.jsonl"


def job_config(stored: dict[str, Any], unknown_allowed: Collection[str] = ()) -> TrainConfig:
    """A queued job's stored config as its trainer runs it, on the server (its command) and on the worker
    (which derives its own): always resuming, also for a job stored before the server set that.
    `unknown_allowed`: fields this schema may not know and may drop, because the job leaves them at the
    default of the schema that stored it (a worker older than its server: the job does not use that feature)."""
    known = {name: value for name, value in stored.items()
             if name in TrainConfig.model_fields or name not in unknown_allowed}
    return TrainConfig(**{**known, "resume": True})


def fields_at_default(stored: dict[str, Any]) -> list[str]:
    """The stored config's fields whose value is this schema's default: a worker of an older version may
    drop those it does not know (see job_config)."""
    return [name for name, info in TrainConfig.model_fields.items()
            if name in stored and not info.is_required()
            and stored[name] == _json_value(info.get_default(call_default_factory=True))]


def _json_value(value: Any) -> Any:
    """A default as a stored (JSON) config holds it: paths as strings, tuples as lists."""
    return pydantic_core.to_jsonable_python(value)

# The fields that change what a dataset check reports (samples, batches, packed rows, the example layout):
# `paratrain data check` takes them as flags, and the UI's check sends them from its form.
SAMPLE_SHAPING_FIELDS = ("max_seq_len", "branches_per_sample", "min_branches_per_sample", "max_branches_per_sample",
                         "batch_by_samples", "batch_size", "tokens_per_row", "branch_stride", "seed", "val_ratio")


def add_cli_arguments(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One flag per TrainConfig field (or per field in `only`), spelled as the field; validation is left to
    pydantic."""
    for group_name in GROUPS:
        names = [name for name, info in TrainConfig.model_fields.items()
                 if _group(info) == group_name and (only is None or name in only)]
        if not names:
            continue
        group = parser.add_argument_group(group_name)
        for name in names:
            info = TrainConfig.model_fields[name]
            help_text = info.description or ""
            if _is_bool(info.annotation):
                help_text += f" (default: {'on' if info.default else 'off'})"
                group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
                continue
            default = None if info.is_required() else info.default
            help_text += "" if info.is_required() else f" (default: {default})"
            choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else None
            group.add_argument(f"--{name}", type=_cli_type(info.annotation), default=None, choices=choices,
                               required=info.is_required(), help=help_text,
                               metavar="{" + ",".join(choices) + "}" if choices else name.upper())


def _cli_type(annotation: Any):
    text = str(annotation)
    if annotation is int or text == "int | None":
        return int
    if annotation is float or text == "float | None":
        return float
    return str


def format_validation_error(e: ValidationError, whole: str = "config", prefix: str = "",
                            given_by: Mapping[str, str] | None = None) -> str:
    """'field: message' lines, the field named as the user spelled it (`prefix`: '--' on a command line;
    `whole` for a rule over several, '' for none). `given_by`: where a field's value came from, said first
    ('--set val_ratio=0.9')."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        line = f"{prefix + loc}: {msg}" if loc else (f"{whole}: {msg}" if whole else msg)
        source = (given_by or {}).get(str(err["loc"][0])) if err["loc"] else None
        lines.append(f"{source}: {line}" if source else line)
    return "; ".join(lines)


def parse_args_with_hints(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """parser.parse_args, except that a misspelt flag (--lr, --lora-rank) is answered with the flag it most
    likely meant."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = _long_flags(parser)
        hints = [f"{given} -> {close}" for given in (u.split("=", 1)[0] for u in unknown if u.startswith("--"))
                 if (close := _likely_flag(given, flags))]
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {', '.join(hints)}?)"
                                                                       if hints else ""))
    return args


def _long_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every --flag of the parser and its subcommands' parsers, but --help."""
    flags = {f for f in parser._option_string_actions if f.startswith("--") and f != "--help"}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags.update(_long_flags(sub))
    return sorted(flags)


def _likely_flag(given: str, flags: list[str]) -> str | None:
    """--lora-rank -> --lora_rank (dashes for underscores, typos: difflib); --lr -> --learning_rate and --bs ->
    --batch_size (the initials of the words, as other trainers abbreviate)."""
    name = given[2:].replace("-", "_")
    by_initials = [f for f in flags if "_" in f and "".join(w[0] for w in f[2:].split("_")) == name]
    if by_initials:
        return " or ".join(by_initials)
    return closest_name("--" + name, flags)

