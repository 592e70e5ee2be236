"""Offline demo assets: a tiny random Qwen2 model with a locally trained tokenizer, and a Parallel JSONL
made from real text that ships with Python (module overviews as `main`, their functions' docs as
`branches`). Nothing is downloaded; the same command gives the same files on every machine.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pydoc
from pathlib import Path

# Where `paratrain serve` creates the demo assets, relative to its data dir (the server takes relative paths
# from its data root, so the UI names them as they are).
DEMO_MODEL = "models/tiny-qwen2"
DEMO_DATA = "datasets/demo.jsonl"


def demo_job() -> dict:
    """The demo job (an API request body) that the serve banner's curl submits and the New job tab's
    *Demo job* button fills in: the guide's batch shape, a learning rate that shows the tiny
    random model's loss falling within a minute on a CPU, and a tenth of the samples held out for a
    validation curve."""
    return {"config": {"base_model": DEMO_MODEL, "data_path": DEMO_DATA, "batch_size": 4, "batch_by_samples": True,
                       "max_branches_per_sample": 16, "learning_rate": 0.003, "max_steps": 40, "val_ratio": 0.1,
                       "eval_interval": 10}, "gpus": 0}


# Standard-library modules whose documentation becomes the demo corpus (stable, always installed).
DEMO_MODULES = (
    "json", "re", "os", "os.path", "shutil", "string", "textwrap", "itertools", "functools", "collections",
    "heapq", "bisect", "math", "statistics", "random", "datetime", "calendar", "pathlib", "glob", "fnmatch",
    "csv", "base64", "hashlib", "hmac", "secrets", "uuid", "zlib", "gzip", "tarfile", "zipfile",
    "subprocess", "threading", "queue", "sched", "socket", "ssl", "select", "selectors", "email.utils",
    "urllib.parse", "http.client", "html", "difflib", "pprint", "reprlib", "enum", "dataclasses",
    "contextlib", "abc", "copy", "operator", "inspect", "types", "typing", "warnings", "logging",
    "argparse", "getopt", "tempfile", "filecmp", "stat", "struct", "codecs", "unicodedata", "locale",
    "gettext", "array", "weakref", "gc", "traceback", "timeit", "platform", "sysconfig", "shlex",
    "configparser", "fractions", "decimal", "numbers", "cmath", "colorsys", "ipaddress", "mimetypes",
    "binascii", "quopri", "plistlib", "sqlite3", "xml.dom.minidom", "wave", "tokenize", "keyword", "ast",
)
MAX_BRANCHES_PER_MODULE = 16


def _first_paragraphs(doc: str, limit_chars: int = 700) -> str:
    text = " ".join(doc.strip().split("\n\n")[:2])
    text = " ".join(text.split())
    return text[:limit_chars]


def demo_records() -> list[dict]:
    """One record per module: its overview as main, up to 16 of its public functions' docs as branches."""
    records = []
    for name in DEMO_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        overview = _first_paragraphs(pydoc.getdoc(module))
        branches = []
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            doc = _first_paragraphs(pydoc.getdoc(obj), 400)
            if len(doc) >= 20:
                branches.append(f"{attr}: {doc}")
            if len(branches) == MAX_BRANCHES_PER_MODULE:
                break
        if overview and branches:
            records.append({"main": f"Module {name}. {overview}", "branches": branches})
    return records


def make_demo_data(path: str | os.PathLike, text_records: int = 64) -> Path:
    """Write the demo Parallel JSONL: main+branches records, then single-`text` records (both shapes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = demo_records()
    texts = [b for r in records for b in r["branches"]][:text_records]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def train_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained here with `tokenizers` (no hub access)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_tiny_model(out_dir: str | os.PathLike, hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int = 2, vocab_size: int = 1024, seed: int = 0) -> Path:
    """Save a tiny random Qwen2 causal LM plus its tokenizer to out_dir (a normal HF model directory)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = demo_records()
    corpus = [r["main"] for r in records] + [b for r in records for b in r["branches"]]
    tokenizer = train_tokenizer(corpus, vocab_size)
    tokenizer.save_pretrained(out)
    # AutoTokenizer on a qwen2 config would swap in Qwen's own pre-tokenizer; say which class to use.
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tok_cfg, indent=2))

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=32768, tie_word_embeddings=True,
        initializer_range=0.1,  # larger random weights: the demo LoRA shows a visibly falling loss
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # a bar for one small shard is noise in `paratrain serve`'s first start
    try:
        model.save_pretrained(out)
    finally:
        hf_logging.enable_progress_bar()
    return out


# --- CLI hooks (paratrain make-tiny-model / make-demo-data) ----------------------------------------

def add_make_tiny_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="Directory to write the model and tokenizer to.")
    parser.add_argument("--hidden-size", type=int, default=64, help="Model width (default 64).")
    parser.add_argument("--layers", type=int, default=2, help="Decoder layers (default 2).")


def run_make_tiny_model(args: argparse.Namespace) -> int:
    path = make_tiny_model(args.out_dir, hidden_size=args.hidden_size, num_layers=args.layers)
    print(f"tiny Qwen2 model and tokenizer written to {path}")
    return 0


def add_make_demo_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_file", help="Parallel JSONL file to write.")


def run_make_demo_data(args: argparse.Namespace) -> int:
    path = make_demo_data(args.out_file)
    with open(path, encoding="utf-8") as f:
        n = sum(1 for _ in f)
    print(f"demo dataset with {n} records written to {path}")
    return 0
