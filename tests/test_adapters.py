"""inject_lora / save_adapter / load_adapter: PEFT as the referee, both ways, plus every refusal."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from lq_edu.adapters import (
    BASE_META_NAME,
    BASE_WEIGHTS_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    inject_lora,
    load_adapter,
    lora_layers,
    save_adapter,
)
from lq_edu.lora import LoRALinear, initial_error
from lq_edu.quant_linear import QuantLinear

peft = pytest.importorskip("peft")


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def course_model():
    from lq_edu.models import load_course_model

    return load_course_model()[0]


MODELS = {"tiny": tiny_llama, "course": course_model}
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_inject_report_and_freezing(capsys):
    model = tiny_llama()
    report = inject_lora(model, r=4, alpha=8)
    printed = capsys.readouterr().out
    assert "trainable" in printed and "model.layers.0.self_attn.q_proj" in printed
    assert len(report.targets) == 14 and "lm_head" not in report.targets  # 7 linears x 2 layers
    expected = sum(4 * (m.in_features + m.out_features) for m in lora_layers(model).values())
    assert report.trainable == expected and report.trainable_bytes == 4 * expected
    assert report.percent == pytest.approx(100 * expected / sum(p.numel() for p in model.parameters()))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert torch.equal(_logits(model), _logits(tiny_llama()))  # B = 0: nothing changed yet


def test_targets_by_name_and_regex():
    model = tiny_llama()
    report = inject_lora(model, r=2, targets=["q_proj", "v_proj"], verbose=False)
    assert report.targets == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
    report = inject_lora(tiny_llama(), r=2, targets=r"model\.layers\.1\.mlp\..*", verbose=False)
    assert len(report.targets) == 3


def test_target_matching_nothing_lists_modules():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"matches no linear layer.*self_attn\.q_proj"):
        inject_lora(model, targets=["qkv"], verbose=False)
    assert not lora_layers(model)


def test_bad_rank_leaves_model_unchanged():
    model = tiny_llama()
    with pytest.raises(ValueError, match="r=0"):
        inject_lora(model, r=0, verbose=False)
    with pytest.raises(ValueError, match="r=33"):  # hidden 32
        inject_lora(model, r=33, verbose=False)
    with pytest.raises(ValueError, match="alpha=-2"):
        inject_lora(model, r=2, alpha=-2, verbose=False)
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("which", ["tiny", "course"])
@pytest.mark.parametrize("rslora", [False, True])
def test_lq_edu_adapter_loads_in_peft(tmp_path, which, rslora):
    model = MODELS[which]()
    inject_lora(model, r=4, alpha=8, use_rslora=rslora, verbose=False)
    _randomize_adapters(model)
    ours = _logits(model)
    save_adapter(model, tmp_path, base_name_or_path=which)
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in keys
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_rslora"] is rslora
    fresh = MODELS[which]()
    base_logits = _logits(fresh)
    peft_model = peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    theirs = _logits(peft_model)
    assert not torch.allclose(ours, base_logits, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["tiny", "course"])
def test_peft_adapter_loads_in_lq_edu(tmp_path, which):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
                     use_rslora=True)
    peft_model = get_peft_model(MODELS[which](), cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    theirs = _logits(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    model = MODELS[which]()
    report = load_adapter(model, tmp_path)
    assert len(report.targets) == 3 * model.config.num_hidden_layers
    torch.testing.assert_close(_logits(model), theirs, atol=1e-5, rtol=1e-4)
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_merge_unmerge_whole_model():
    model = tiny_llama()
    inject_lora(model, r=4, alpha=8, verbose=False)
    _randomize_adapters(model)
    before = _logits(model)
    weights = {n: m.base_layer.weight.detach().clone() for n, m in lora_layers(model).items()}
    for m in lora_layers(model).values():
        m.merge()
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="merged"):
        save_adapter(model, "/nonexistent/never-written")
    for m in lora_layers(model).values():
        m.unmerge()
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=1e-4)
    for n, m in lora_layers(model).items():
        torch.testing.assert_close(m.base_layer.weight, weights[n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["zero", "lq"])
def test_quantized_round_trip_with_base_and_fingerprint(tmp_path, init):
    model = tiny_llama()
    W = {n: model.get_submodule(n).weight.detach().clone() for n in ("model.layers.0.self_attn.q_proj",)}
    inject_lora(model, r=4, alpha=8, quantize="nf4", init=init, verbose=False)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer.base_layer, QuantLinear) and layer.init == init
    if init == "lq":
        assert initial_error(layer, W["model.layers.0.self_attn.q_proj"]) < 0.08
    if init == "zero":
        _randomize_adapters(model, seed=4)
    ours = _logits(model)
    (tmp_path / "README.md").write_text("an old card")
    save_adapter(model, tmp_path)
    assert (tmp_path / "README.md").read_text() == "an old card"  # no card given: left alone
    save_adapter(model, tmp_path, card="# my adapter")
    assert (tmp_path / "README.md").read_text() == "# my adapter\n"
    assert (tmp_path / BASE_WEIGHTS_NAME).is_file()
    meta = json.loads((tmp_path / BASE_META_NAME).read_text())["layers"]
    assert re.fullmatch(r"[0-9a-f]{64}", meta["model.layers.0.self_attn.q_proj"]["fingerprint"])
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    assert torch.equal(_logits(fresh), ours)
    other = tiny_llama(seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match="fingerprint mismatch at model.layers"):
        load_adapter(other, tmp_path)
    assert not lora_layers(other)


def test_shape_mismatch_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_llama()
    inject_lora(model, r=4, verbose=False)
    save_adapter(model, tmp_path)
    (tmp_path / BASE_META_NAME).unlink()  # a plain PEFT folder: only shapes can be checked
    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"shape mismatch at model\.layers\.0\.mlp\.down_proj: .*needs \(4, 64\) and \(48, 4\)"):
        load_adapter(wider, tmp_path)
    assert not lora_layers(wider)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_refused_whole(tmp_path, damage):
    model = tiny_llama()
    inject_lora(model, r=4, quantize="nf4", init="lq", verbose=False)
    save_adapter(model, tmp_path)
    for name in (WEIGHTS_NAME, BASE_WEIGHTS_NAME):
        path = tmp_path / name
        good = path.read_bytes()
        path.write_bytes(good[: len(good) // 2] if damage == "truncate" else b"\x10\x00" + good[2:60])
        fresh = tiny_llama()
        with pytest.raises(ValueError, match=f"{name} is corrupt or truncated"):
            load_adapter(fresh, tmp_path)
        assert not lora_layers(fresh) and not any(isinstance(m, QuantLinear) for m in fresh.modules())
        path.write_bytes(good)


def test_unsupported_config_is_refused(tmp_path):
    model = tiny_llama()
    inject_lora(model, r=4, verbose=False)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load_adapter(tiny_llama(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(tiny_llama(), tmp_path)


def test_loading_twice_or_on_quantized_model_is_refused(tmp_path):
    model = tiny_llama()
    inject_lora(model, r=4, verbose=False)
    save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, r=4, verbose=False)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        load_adapter(model, tmp_path)
    from lq_edu.surgery import quantize_model

    quantized = tiny_llama()
    quantize_model(quantized)
    with pytest.raises(ValueError, match="is a QuantLinear; load_adapter needs the original float model"):
        load_adapter(quantized, tmp_path)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), LoRALinear)
    assert not isinstance(model.get_submodule("model.layers.0.self_attn.q_proj").base_layer, LoRALinear)
    assert isinstance(model.get_submodule("lm_head"), nn.Linear)


def test_inject_lq_data_needs_and_uses_stats():
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    with pytest.raises(ValueError, match="needs stats for every target"):
        inject_lora(model, r=4, quantize="nf4", init="lq-data", stats={}, verbose=False)
    with pytest.raises(ValueError, match="pass quantize="):
        inject_lora(model, r=4, init="lq", verbose=False)
    g = torch.Generator().manual_seed(0)
    stats = {n: torch.rand(model.get_submodule(n).in_features, generator=g) + 0.1 for n in names}
    report = inject_lora(model, r=4, quantize="nf4", init="lq-data", stats=stats, verbose=False)
    assert report.init == "lq-data" and len(report.targets) == len(names)
    assert all(m.decomposition.method == "lq-weighted" for m in lora_layers(model).values())
