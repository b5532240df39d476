"""Memory arithmetic: the headline figures, exact byte counts, and parameter counts equal to real models."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lq_edu.memory import (
    FORMAT_NAMES,
    GB,
    GiB,
    MemoryRow,
    NumberFormat,
    ParamCount,
    count_params_from_config,
    get_format,
    memory_table,
    model_bytes,
)

SEVENTY_B = 70_000_000_000

# --- bits per parameter ------------------------------------------------------------------------------------------


def test_nf4_with_double_quant_is_4_127_bits():
    fmt = get_format("nf4", block_size=64, double_quant=True)
    assert fmt.bits_per_param == 4 + 8 / 64 + 32 / (64 * 256)
    assert fmt.bits_per_param == 4.126953125
    assert round(fmt.bits_per_param, 3) == 4.127


def test_nf4_without_double_quant_is_4_5_bits():
    assert get_format("nf4").bits_per_param == 4.5
    assert get_format("nf4", block_size=64).bits_per_param == 4 + 32 / 64


@pytest.mark.parametrize(
    ("name", "block_size", "double_quant", "expected"),
    [
        ("fp32", 64, False, 32.0),
        ("bf16", 64, False, 16.0),
        ("fp16", 64, False, 16.0),
        ("fp8_e4m3", 64, False, 8.0),
        ("fp8_e5m2", 64, False, 8.0),
        ("int8", 64, False, 8.5),
        ("int4", 64, False, 4.5),
        ("int3", 64, False, 3.5),
        ("int2", 64, False, 2.5),
        ("nf3", 64, False, 3.5),
        ("nf2", 64, False, 2.5),
        ("nf4", 128, False, 4.25),
        ("nf4", 32, False, 5.0),
        ("int4", 64, True, 4.126953125),
        ("nf2", 128, True, 2 + 8 / 128 + 32 / (128 * 256)),
    ],
)
def test_bits_per_param_written_out(name, block_size, double_quant, expected):
    assert get_format(name, block_size=block_size, double_quant=double_quant).bits_per_param == expected


def test_element_formats_ignore_block_size():
    assert get_format("bf16", block_size=7) == NumberFormat("bf16", 16)


def test_labels():
    assert get_format("nf4", double_quant=True).label == "nf4 (block 64, DQ)"
    assert get_format("int4", block_size=128).label == "int4 (block 128)"
    assert str(get_format("nf4")) == "nf4 (block 64): 4.500 bits/param"
    assert get_format("NF4") == get_format("nf4")


# --- bytes of one tensor ------------------------------------------------------------------------------------------


def test_bytes_for_written_out():
    dq = get_format("nf4", double_quant=True)
    # 64*256 weights: 16384 codes of 4 bits + 256 scales of 8 bits + one fp32 second-level scale + one fp32 offset
    assert dq.bytes_for(64 * 256) == (16384 * 4 + 256 * 8 + 32 + 32) // 8 == 8456
    assert get_format("nf4").bytes_for(64) == 32 + 4  # 64 nibbles and one fp32 scale
    assert get_format("nf4").bytes_for(65) == 33 + 8  # a partial block still pays for its scale (and rounds up)
    assert get_format("int3").bytes_for(1) == 1 + 4  # 3 bits round up to a byte
    assert get_format("bf16").bytes_for(1000) == 2000


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=10**13),
    name=st.sampled_from(FORMAT_NAMES),
    block_size=st.sampled_from([16, 32, 64, 128, 256]),
)
def test_bytes_for_agrees_with_bits_per_param(n, name, block_size):
    """bytes_for counts whole blocks; it can exceed n * bits / 8 by at most one block's overhead (plus DQ extras)."""
    for double_quant in (False, True) if name in ("int8", "int4", "int3", "int2", "nf4", "nf3", "nf2") else (False,):
        fmt = get_format(name, block_size=block_size, double_quant=double_quant)
        ideal = n * fmt.bits_per_param / 8
        slack = 1 + (fmt.scale_bits + fmt.dq_scale_bits + fmt.dq_offset_bits) / 8
        assert ideal - 1e-6 * ideal <= fmt.bytes_for(n) <= ideal + slack + 1e-6 * ideal


def test_double_quant_saves_memory_for_every_block_format():
    for name in ("int8", "int4", "int3", "int2", "nf4", "nf3", "nf2"):
        plain, dq = get_format(name), get_format(name, double_quant=True)
        assert dq.bits_per_param < plain.bits_per_param
        assert dq.bytes_for(10**9) < plain.bytes_for(10**9)


# --- the lesson 01 table ------------------------------------------------------------------------------------------


def test_70b_table_in_gb():
    formats = ["fp32", "bf16", get_format("nf4", double_quant=True)]
    rows = memory_table(SEVENTY_B, formats=formats)
    assert [r.format for r in rows] == ["fp32", "bf16", "nf4 (block 64, DQ)"]
    assert rows[0].bytes == 280 * GB and rows[0].size == 280.0
    assert rows[1].bytes == 140 * GB and rows[1].size == 140.0
    assert round(rows[2].size, 1) == 36.1
    assert math.isclose(rows[2].size, 70e9 * 4.126953125 / 8 / 1e9, rel_tol=1e-9)
    assert round(rows[2].bits_per_param, 3) == 4.127
    assert all(r.unit == "GB" for r in rows)


def test_70b_table_in_gib_and_defaults():
    rows = {r.format: r for r in memory_table(SEVENTY_B, unit="GiB")}
    assert list(rows) == [
        "fp32",
        "bf16",
        "fp8_e4m3",
        "int8 (block 64)",
        "int4 (block 64)",
        "nf4 (block 64)",
        "nf4 (block 64, DQ)",
    ]
    assert rows["fp32"].size == 280e9 / 2**30
    assert round(rows["bf16"].size, 1) == 130.4
    assert rows["nf4 (block 64)"].bits_per_param == 4.5
    assert str(rows["bf16"]) == "bf16                    16.000 bits/param      130.4 GiB"
    assert GiB == 1_073_741_824


def test_table_rejects_unknown_units():
    with pytest.raises(ValueError, match="unit='MB' is not supported; use 'GB'"):
        memory_table(SEVENTY_B, unit="MB")


# --- bad input ----------------------------------------------------------------------------------------------------


def test_unknown_format_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown number format 'nf5'; use one of fp32, bf16, .*nf2"):
        get_format("nf5")


@pytest.mark.parametrize("block_size", [0, -64, 64.0, True, "64"])
def test_bad_block_sizes(block_size):
    with pytest.raises(ValueError, match=r"is not a block size; use a positive int"):
        get_format("nf4", block_size=block_size)


def test_double_quant_needs_block_scales():
    with pytest.raises(ValueError, match="double_quant=True needs block scales, and bf16 has none"):
        get_format("bf16", double_quant=True)


@pytest.mark.parametrize("bad", [0, -1])
def test_non_positive_counts_are_value_errors(bad):
    with pytest.raises(ValueError, match="use a positive int"):
        get_format("nf4").bytes_for(bad)
    with pytest.raises(ValueError, match="use a positive int"):
        model_bytes(bad, "bf16")
    with pytest.raises(ValueError, match="use a positive int"):
        memory_table(bad)


@pytest.mark.parametrize("bad", [70e9, 1.5, True, "70B"])
def test_non_int_counts_are_type_errors(bad):
    with pytest.raises(TypeError, match=r"pass an int, e\.g\. 70_000_000_000"):
        get_format("nf4").bytes_for(bad)
    with pytest.raises(TypeError):
        model_bytes(bad, "bf16")


def test_model_bytes_rejects_non_formats():
    with pytest.raises(TypeError, match="pass a format name such as 'nf4'"):
        model_bytes(100, 4)


# --- counting parameters from a config ----------------------------------------------------------------------------


def _tiny_llama(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6)
    kw.update(num_key_value_heads=2, max_position_embeddings=64)
    kw.update(overrides)
    return LlamaConfig(**kw)


def _tiny_qwen2(**overrides):
    from transformers import Qwen2Config

    kw = dict(vocab_size=101, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4)
    kw.update(num_key_value_heads=2, max_position_embeddings=64)
    kw.update(overrides)
    return Qwen2Config(**kw)


def _tiny_gpt2(**overrides):
    from transformers import GPT2Config

    kw = dict(vocab_size=103, n_embd=32, n_layer=2, n_head=4, n_positions=40, bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    return GPT2Config(**kw)


def _build(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _group(name: str) -> str:
    """Which ParamCount field a named parameter belongs to (written independently of lq_edu)."""
    if "embed_tokens" in name or ".wte." in name or ".wpe." in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in name or ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name or ".ln_" in name:
        return "norms"
    raise AssertionError(f"unexpected parameter {name}")


def _linear_weights(model: torch.nn.Module) -> int:
    """Weights of nn.Linear / GPT-2 Conv1D modules inside the transformer blocks."""
    from transformers.pytorch_utils import Conv1D

    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    return sum(m.weight.numel() for m in blocks.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))


CONFIGS = {
    "llama": _tiny_llama,
    "llama-tied-biases": lambda: _tiny_llama(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "llama-head-dim": lambda: _tiny_llama(head_dim=16),
    "qwen2": _tiny_qwen2,
    "qwen2-tied": lambda: _tiny_qwen2(tie_word_embeddings=True),
    "gpt2": _tiny_gpt2,
    "gpt2-inner-untied": lambda: _tiny_gpt2(n_inner=40, tie_word_embeddings=False),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_count_matches_built_model(kind):
    config = CONFIGS[kind]()
    model = _build(config)
    count = count_params_from_config(config)
    assert count.total == sum(p.numel() for p in model.parameters())
    by_group = dict.fromkeys(("embeddings", "attention", "mlp", "norms", "lm_head"), 0)
    for name, p in model.named_parameters():
        by_group[_group(name)] += p.numel()
    assert by_group == {k: getattr(count, k) for k in by_group}
    assert count.linear == _linear_weights(model)
    assert count == count_params_from_config(config.to_dict())  # a plain dict counts the same


def test_llama_count_written_out():
    cfg = dict(vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4)
    count = count_params_from_config(cfg)  # no kv heads given: plain multi-head attention, untied head
    assert count == ParamCount(
        embeddings=1600,
        attention=2 * 4 * 256,
        mlp=2 * 3 * 640,
        norms=2 * 2 * 16 + 16,
        lm_head=1600,
        linear=2 * (1024 + 1920),
    )
    assert count.total == 1600 + 2048 + 3840 + 80 + 1600


def test_llama3_70b_from_its_config():
    cfg = dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False, model_type="llama",
    )  # fmt: skip
    count = count_params_from_config(cfg)
    assert count.total == 70_553_706_496  # the "70.6B" on the model card
    assert count.linear == 68_451_041_280


def test_count_errors_name_the_missing_keys():
    with pytest.raises(
        ValueError, match="config lacks intermediate_size, num_hidden_layers; count_params_from_config needs"
    ):
        count_params_from_config(dict(vocab_size=10, hidden_size=8, num_attention_heads=2))
    with pytest.raises(ValueError, match="GPT-2 style config lacks n_positions"):
        count_params_from_config(dict(vocab_size=10, n_embd=8, n_layer=2))
    with pytest.raises(ValueError, match=r"config hidden_size=0; it must be a positive int"):
        count_params_from_config(
            dict(vocab_size=10, hidden_size=0, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
        )
    with pytest.raises(ValueError, match="mixture-of-experts"):
        count_params_from_config(dict(model_type="mixtral", num_local_experts=8))
    with pytest.raises(TypeError, match="pass a transformers config"):
        count_params_from_config([1, 2, 3])


def test_unknown_model_type_warns():
    cfg = dict(
        vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, model_type="phi3"
    )
    with pytest.warns(UserWarning, match="model_type='phi3' is counted as a Llama-style model"):
        count_params_from_config(cfg)


# --- whole-model bytes --------------------------------------------------------------------------------------------


def test_model_bytes_plain_count_uses_fmt_throughout():
    assert model_bytes(SEVENTY_B, "bf16") == 140 * GB
    nf4_dq = get_format("nf4", double_quant=True)
    assert model_bytes(SEVENTY_B, nf4_dq) == nf4_dq.bytes_for(SEVENTY_B)


def test_model_bytes_keeps_the_rest_in_bf16():
    count = count_params_from_config(_tiny_llama())
    nf4 = get_format("nf4")
    rest = count.total - count.linear
    assert model_bytes(count, nf4) == nf4.bytes_for(count.linear) + 2 * rest
    assert model_bytes(count, nf4, keep="fp32") == nf4.bytes_for(count.linear) + 4 * rest
    assert model_bytes(_tiny_llama(), "nf4") == model_bytes(count, nf4)  # a config works too


def test_model_bytes_bf16_equals_real_model_in_bf16():
    """All in bf16, the count must equal the bytes torch reports for the model's tensors."""
    model = _build(_tiny_gpt2()).to(torch.bfloat16)
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model_bytes(_tiny_gpt2(), "bf16", keep="bf16") == real


def test_table_for_a_config_mixes_formats():
    cfg = _tiny_llama()
    count = count_params_from_config(cfg)
    rows = memory_table(cfg, formats=["fp32", "nf4"])
    assert all(isinstance(r, MemoryRow) for r in rows)
    assert rows[0].bytes == 4 * count.total  # an element format holds the whole model
    assert rows[1].bytes == model_bytes(cfg, "nf4", keep="bf16")  # a block format: linears only
    assert rows[1].bits_per_param == 8 * rows[1].bytes / count.total
    assert rows[1].bits_per_param > 4.5  # the bf16 embeddings pull the average up


def test_fp4_costs_what_nf4_costs():
    assert get_format("fp4").bits_per_param == get_format("nf4").bits_per_param == 4.5
