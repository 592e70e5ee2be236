"""The VRAM estimator against MEASUREMENTS.md table B, the guide's configs, presets and the CLI."""

from __future__ import annotations

import argparse
import json

import pytest

from trainer_core import vram
from trainer_core.config import TrainConfig

# MEASUREMENTS.md table B: shape, rank, T, grad ckpt, chunked CE, static GB, peak GB, act MB/token
TABLE_B = [
    ("0.5B", 8, 4096, False, False, 0.94, 15.5, 3.64),
    ("0.5B", 8, 16384, False, False, 0.94, 58.8, 3.62),
    ("0.5B", 8, 16384, False, True, 0.94, 38.0, 2.31),
    ("0.5B", 8, 4096, True, False, 0.94, 8.2, 1.81),
    ("0.5B", 8, 16384, True, False, 0.94, 29.6, 1.79),
    ("0.5B", 8, 16384, True, True, 0.94, 8.8, 0.49),
    ("1.5B", 16, 4096, False, False, 3.01, 25.8, 5.69),
    ("1.5B", 16, 16384, False, True, 3.01, 72.8, 4.36),
    ("1.5B", 16, 4096, True, False, 3.01, 10.5, 1.86),
    ("1.5B", 16, 16384, True, True, 3.01, 11.6, 0.54),
]


def _cfg(model: str = "0.5B", **kw) -> TrainConfig:
    return TrainConfig(base_model=model, data_path="d.jsonl", **kw)


@pytest.mark.parametrize("shape,rank,tokens,ckpt,chunked,static,peak,act_mb", TABLE_B)
def test_reproduces_measurements_table_b(shape, rank, tokens, ckpt, chunked, static, peak, act_mb):
    cfg = _cfg(shape, lora_rank=rank, batch_size=tokens // 1024, max_seq_len=1024, gradient_checkpointing=ckpt,
               branches_per_sample=1)   # table B measured tokens: batch_size texts of max_seq_len
    raw = vram._raw_breakdown(cfg, vram.SHAPES[shape], vram.tokens_per_micro_batch(cfg), upcast_adapters=True,
                              checkpointed_ce=True, chunked_ce=chunked)  # as table B was measured
    est_static = raw["weights"] + raw["lora_state"] / 4  # the table's static: adapters only, no grads/AdamW yet
    assert est_static == pytest.approx(static, rel=0.03)
    est_dynamic = raw["activations"] + raw["logits"]
    assert est_dynamic == pytest.approx(peak - static, rel=0.10)
    assert est_dynamic * 1024 / tokens == pytest.approx(act_mb, rel=0.10)


@pytest.mark.parametrize("tokens,peak", [(8192, 17.9), (16384, 27.8)])
def test_reproduces_the_bf16_adapter_measurements(tokens, peak):
    """MEASUREMENTS.md: adapters computed in bf16 (what the trainer does), checkpointed 8k CE chunks, 0.5B."""
    cfg = _cfg("0.5B", batch_size=tokens // 1024, max_seq_len=1024)
    raw = vram._raw_breakdown(cfg, vram.SHAPES["0.5B"], tokens, checkpointed_ce=True)
    assert raw["activations"] + raw["logits"] == pytest.approx(peak - 0.94, rel=0.05)


def test_param_counts_match_published_sizes():
    assert vram.SHAPES["0.5B"].n_params == pytest.approx(0.494e9, rel=0.01)
    assert vram.SHAPES["1.5B"].n_params == pytest.approx(1.54e9, rel=0.01)
    assert vram.SHAPES["3B"].n_params == pytest.approx(3.09e9, rel=0.01)
    assert vram.SHAPES["7B"].n_params == pytest.approx(7.62e9, rel=0.01)
    assert [vram.param_count(n) for n in (2_400_000, 494_000_000, None)] == ["2.4M", "0.49B", "?"]   # not 0.0B


def test_estimate_breakdown_sums_and_fits_flag():
    est = vram.estimate(_cfg(batch_size=8), 80)
    parts = est["breakdown_gb"]
    assert set(parts) == {"weights", "lora_state", "activations", "logits", "overhead"}
    assert est["peak_gb"] == pytest.approx(sum(parts.values()), abs=0.05)
    assert est["fits"] and est["headroom_gb"] > 0 and est["correction"] is None
    small = vram.estimate(_cfg(batch_size=64), 24)
    assert not small["fits"]
    assert any("exceeds" in w and "batch_size" in w for w in small["warnings"])


def test_warnings_follow_guide_advice():
    rank = vram.estimate(_cfg("7B", lora_rank=4, batch_size=1), 80)
    assert any("rank 16-32" in w for w in rank["warnings"])
    many = vram.estimate(_cfg(batch_by_samples=True, max_branches_per_sample=16, max_seq_len=256,
                              batch_size=1, rope_2d_ratio=0.5), 80)
    assert any("0.6-0.7" in w for w in many["warnings"])
    few = vram.estimate(_cfg(batch_by_samples=True, branches_per_sample=2, max_seq_len=2048, batch_size=1,
                             rope_2d_ratio=0.5), 80)
    assert any("0.3-0.4" in w for w in few["warnings"])
    fp32 = vram.estimate(_cfg(dtype="float32", batch_size=1), 80)
    assert any("bfloat16" in w for w in fp32["warnings"])


def test_tokens_per_text_tightens_the_worst_case():
    worst = vram.estimate(_cfg(batch_size=8), 24)
    typical = vram.estimate(_cfg(batch_size=8), 24, tokens_per_text=200)
    assert typical["tokens_per_micro_batch"] == 1600 and typical["peak_gb"] < worst["peak_gb"]


def test_batch_by_samples_counts_every_branch_of_each_sample():
    """With --batch_by_samples a micro-batch holds batch_size samples of (max_)branches_per_sample texts each:
    the worst case the estimate must budget for."""
    dynamic = vram.estimate(_cfg(batch_by_samples=True, max_branches_per_sample=16, batch_size=2, max_seq_len=256), 80)
    assert dynamic["tokens_per_micro_batch"] == 2 * 16 * 256
    fixed = vram.estimate(_cfg(batch_by_samples=True, branches_per_sample=4, batch_size=2, max_seq_len=256), 80)
    assert fixed["tokens_per_micro_batch"] == 2 * 4 * 256


@pytest.mark.parametrize("field,small,large", [
    ("max_branches_per_sample", 4, 16), ("branches_per_sample", 2, 8), ("batch_size", 2, 8),
    ("max_seq_len", 512, 2048), ("lora_rank", 8, 64)])
def test_the_estimated_peak_grows_with_each_size_setting(field, small, large):
    base = {"batch_by_samples": True, "batch_size": 4, "max_seq_len": 1024, "lora_rank": 16}
    peaks = [vram.estimate(_cfg(**{**base, field: value}), 80)["peak_gb"] for value in (small, large)]
    assert peaks[1] > peaks[0], peaks


def test_measured_peaks_correct_the_estimate():
    cfg = _cfg(batch_size=8)
    raw = vram.estimate(cfg, 80)
    # a job that really peaked at half the estimated dynamic memory
    measured_peak = raw["peak_gb"] - (raw["breakdown_gb"]["activations"] + raw["breakdown_gb"]["logits"]) * 0.5 * 1.08
    corrected = vram.estimate(cfg, 80, measured=[{"config": cfg.model_dump(), "peak_mem_gb": measured_peak}])
    assert corrected["correction"]["jobs"] == 1 and corrected["correction"]["basis"] == "same model"
    assert corrected["correction"]["factor"] == pytest.approx(0.5, abs=0.02)
    assert corrected["peak_gb"] == pytest.approx(measured_peak, rel=0.02)
    assert corrected["raw_peak_gb"] == raw["peak_gb"]
    # unusable rows are ignored
    assert vram.estimate(cfg, 80, measured=[{"config": {"bad": 1}, "peak_mem_gb": 3}])["correction"] is None


def test_shape_from_local_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}))
    shape = vram.model_shape(str(tmp_path))
    assert shape.source == "config.json" and shape.hidden_size == 64
    est = vram.estimate(_cfg(str(tmp_path)), 8)
    assert est["model"]["source"] == "config.json" and est["fits"]


def test_size_names_and_unknown_models():
    assert vram.size_key("Qwen/Qwen2.5-1.5B-Instruct") == "1.5B"
    assert vram.size_key("qwen2.5-7b") == "7B"
    assert vram.size_key("0.5B") == "0.5B"
    assert vram.size_key("Qwen2.5-Coder") is None
    with pytest.raises(ValueError, match="cannot tell the shape"):
        vram.model_shape("/nonexistent/model")


@pytest.mark.parametrize("gpu", [24, 80])
@pytest.mark.parametrize("model", ["0.5B", "1.5B", "3B", "7B"])
def test_presets_fit_and_follow_guide_ranks(gpu, model):
    plist = vram.presets(gpu, model)
    assert [p["name"] for p in plist] == ["guide", "many short branches", "few long branches"]
    low, high = vram.RANK_RANGES[vram.SHAPES[model].size_class]
    for p in plist:
        assert p["fits"], p
        assert p["estimate"]["peak_gb"] <= vram.NEAR_LIMIT_SHARE * gpu
        assert low <= p["config"]["lora_rank"] <= high
        assert p["config"]["dtype"] == "bfloat16"
        TrainConfig(base_model=model, data_path="d", **p["config"])  # every preset is a valid config
    by_name = {p["name"]: p for p in plist}
    assert by_name["many short branches"]["config"]["rope_2d_ratio"] == pytest.approx(0.65)
    assert by_name["few long branches"]["config"]["rope_2d_ratio"] == pytest.approx(0.35)


@pytest.mark.parametrize("model", ["0.5B", "7B"])
def test_a_preset_applied_over_another_trains_what_its_row_shows(model):
    """The UI applies a preset's config over the form: whatever preset came before, the form must then hold
    the row the table showed (the guide's used to keep the previous preset's seq len and branches)."""
    plist = vram.presets(24, model)
    for before in plist:
        for chosen in plist:
            form = TrainConfig(base_model=model, data_path="d", **before["config"]).model_dump()
            applied = TrainConfig(**{**form, **chosen["config"]}).model_dump()
            assert vram.preset_rows([{**chosen, "config": applied}]) == vram.preset_rows([chosen]), \
                (before["name"], chosen["name"])


def test_presets_keep_effective_batch_when_shrinking():
    for preset in vram.presets(8, "7B"):   # every preset had to shrink: each change names a real value
        assert preset["adjustments"] and not any("None" in step for step in preset["adjustments"]), preset
    for big, small in zip(vram.presets(80, "3B"), vram.presets(24, "3B")):
        big, small = big["config"], small["config"]
        assert big["batch_size"] * big["accumulation_steps"] == small["batch_size"] * small["accumulation_steps"]
        assert small["batch_size"] < big["batch_size"] or small["gradient_checkpointing"] > big["gradient_checkpointing"]
    guide_on_8gb = vram.presets(8, "7B")[0]
    assert any(step.startswith("branches_per_sample 8 -> ") for step in guide_on_8gb["adjustments"]), guide_on_8gb


def test_a_text_batch_holds_whole_samples():
    """--batch_size counts texts, but a sample is never split: the guide's 7B batch_size 1 trains one sample
    of 8 texts (the default group) per micro-batch, and its estimate must say so."""
    assert vram.texts_per_micro_batch(_cfg(batch_size=1)) == 8
    assert vram.texts_per_micro_batch(_cfg(batch_size=8)) == 8 and vram.texts_per_micro_batch(_cfg(batch_size=9)) == 16
    assert vram.texts_per_micro_batch(_cfg(batch_size=8, max_branches_per_sample=16)) == 8 - 1 + 16
    assert vram.estimate(_cfg("7B", batch_size=1, max_seq_len=1024), 80)["tokens_per_micro_batch"] == 8 * 1024


def test_cli_prints_guide_configs_for_each_gpu(capsys):
    parser = argparse.ArgumentParser()
    vram.add_arguments(parser)
    assert vram.run(parser.parse_args(["--gpu-mem", "24", "80"])) == 0
    out = capsys.readouterr().out
    for key in ("0.5B (x1 GPU)", "1.5B (x4 GPU)", "7B (x8 GPU)", "fits 24GB", "fits 80GB",
                "Presets for 7B on a 80 GB GPU", "docs/VRAM.md"):
        assert key in out
    assert vram.run(parser.parse_args(["--gpu-mem", "40", "--model", "3B", "--json"])) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["presets"][0]["model"] == "3B" and len(data["guide_configs"]) == 3


def test_cli_names_a_bad_model_or_gpu_size(capsys):
    parser = argparse.ArgumentParser()
    vram.add_arguments(parser)
    assert vram.run(parser.parse_args(["--model", "foo"])) == 2
    assert "--model: cannot tell the shape of model 'foo'" in capsys.readouterr().err
    for bad in ("-3", "nan", "big"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--gpu-mem", bad])
        assert "not a GPU size in GiB" in capsys.readouterr().err


def test_memory_levers_name_only_what_is_not_pulled_yet_for_the_estimate_and_the_trainers_oom_message():
    loose = _cfg(batch_size=8, batch_by_samples=True, max_branches_per_sample=16, dtype="float32")
    levers = vram.memory_levers(loose)
    assert [lever.split(" (")[0] for lever in levers] == [
        "a smaller batch_size", "fewer branches per sample", "dtype bfloat16", "gradient_checkpointing",
        "a smaller max_seq_len"]
    assert "now 8, e.g. 4" in levers[0] and "max_branches_per_sample now 16, e.g. 8" in levers[1]
    assert 'a record with "branches" keeps all of its own' in levers[1]   # the flags group "text" records only
    tight = _cfg(batch_size=1, branches_per_sample=2, gradient_checkpointing=True)
    assert vram.memory_levers(tight) == [f"a smaller max_seq_len (now {tight.max_seq_len}; longer texts are cut)"]
    # Text batches never split a sample (8 texts per group by default): a lever is offered only where it
    # lowers the estimate. Below one group only fewer branches help; at exactly one group only both together.
    def offered(**fields):
        config = _cfg(gradient_checkpointing=True, **fields)
        levers = vram.memory_levers(config)[:-1]   # the last is max_seq_len
        peak = vram.estimate(config, 80)["peak_gb"]
        for lever in levers:
            halved = {"batch_size": config.batch_size // 2, "accumulation_steps": config.accumulation_steps * 2} \
                if lever.startswith("a smaller batch_size") else {}
            if "branches" in lever:
                halved["branches_per_sample"] = config.branches_per_sample // 2
            assert vram.estimate(_cfg(**{**fields, **halved, "gradient_checkpointing": True}), 80)["peak_gb"] < peak
        return [lever.split(" (")[0] for lever in levers]

    assert offered(batch_size=4) == ["fewer branches per sample"]
    assert offered(batch_size=8) == ["a smaller batch_size and fewer branches per sample together"]
    assert offered(batch_size=16) == ["a smaller batch_size"]
    assert offered(batch_size=12) == ["a smaller batch_size", "fewer branches per sample"]
    warning = vram.estimate(_cfg("7B", batch_size=64, max_seq_len=2048), 24)["warnings"][0]
    assert "out of memory expected" in warning and "Try: a smaller batch_size" in warning
