"""LlamaModel: its config, the model interface every technique relies on (generation, left
padding, the KV cache, LoRA, NEFTune, DPO and instruction losses), and the named shapes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from minigpt.finetuning.dpo import DPOLoss
from minigpt.finetuning.instruction import instruction_loss
from minigpt.finetuning.neftune import enable_neftune, neftune_lengths
from minigpt.finetuning.reference import sequence_logprobs
from minigpt.generation.batch import generate_batch
from minigpt.generation.generate import generate
from minigpt.lora.adapters import apply_lora, merge_lora
from minigpt.models.llama.config import PRESETS, LlamaConfig
from minigpt.models.llama.model import LlamaModel
from minigpt.runtime.linear import Linear
from minigpt.training.losses import next_token_loss

TINY = LlamaConfig(vocab_size=97, context_length=24, emb_dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   rope_theta=10000.0)


def tiny_model(**overrides) -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(dataclasses.replace(TINY, **overrides)).eval()


def ids_of(batch: int, tokens: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- config and shapes

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_equal_transformers(name):
    transformers = pytest.importorskip("transformers", reason="the reference parameter count comes from transformers")
    config = transformers.AutoConfig.for_model(**PRESETS[name])
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(config)
        ours = LlamaModel(name)
    assert ours.num_parameters() == sum(p.numel() for p in reference.parameters())
    assert ours.cfg == LlamaConfig.from_hf(config.to_dict())  # the file transformers writes reads back the same


def test_smollm2_135m_has_its_published_size_and_a_smaller_cache_than_gpt2():
    with torch.device("meta"):
        model = LlamaModel("smollm2-135m")
    assert model.num_parameters() == 134_515_008
    assert model.cfg.head_dim == 64 and model.cfg.n_kv_heads == 3
    # float32 keys and values: 2 x 30 layers x 3 heads x 64 numbers x 4 bytes, against GPT-2's 2 x 12 x 768 x 4
    assert model.kv_cache_bytes_per_token() == 46_080 < 2 * 12 * 768 * 4


def test_config_round_trips_through_the_hugging_face_dict():
    for name in PRESETS:
        cfg = LlamaConfig.from_preset(name)
        assert LlamaConfig.from_hf(cfg.to_hf()) == cfg
    assert LlamaConfig.from_preset("qwen3-0.6b").qk_norm
    assert LlamaConfig.from_preset("llama-3.2-1b").rope_scaling["rope_type"] == "llama3"


def test_config_reads_the_newer_rope_parameters_field():
    values = dict(PRESETS["smollm2-135m"])
    del values["rope_theta"]
    values["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    cfg = LlamaConfig.from_hf(values)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling is None


def test_an_exported_config_has_one_rope_theta():
    # transformers-5 files nest rope_theta with the llama3 scaling in rope_parameters
    values = dict(PRESETS["llama-3.2-1b"])
    values["rope_parameters"] = {"rope_theta": values.pop("rope_theta"), **values.pop("rope_scaling")}
    cfg = dataclasses.replace(LlamaConfig.from_hf(values), rope_theta=1e6)
    exported = cfg.to_hf()
    assert exported["rope_theta"] == 1e6 and "rope_theta" not in exported["rope_scaling"]
    transformers = pytest.importorskip("transformers", reason="how transformers reads the exported file")
    read = transformers.LlamaConfig(**exported)
    assert (getattr(read, "rope_parameters", None) or {}).get("rope_theta", getattr(read, "rope_theta", None)) == 1e6


@pytest.mark.parametrize("field, value, message", [
    ("use_sliding_window", True, "use_sliding_window=True"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling="),
    ("model_type", "mistral", "model_type='mistral'"),
])
def test_config_refuses_what_the_model_does_not_compute(field, value, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf({**PRESETS["qwen3-0.6b"], field: value}, source="config.json")


def test_config_checks_its_numbers():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        dataclasses.replace(TINY, n_kv_heads=3)
    with pytest.raises(ValueError, match="n_layers"):
        dataclasses.replace(TINY, n_layers=0)


# ---------------------------------------------------------------------------- the model interface

def test_interface_names_that_techniques_look_up():
    model = tiny_model()
    assert isinstance(model.tok_emb, nn.Embedding) and model.out_head.weight is model.tok_emb.weight
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert "trf_blocks.0.att.W_query" in linears and "trf_blocks.1.ff.fc3" in linears
    assert model.cfg.context_length == 24 and model.device.type == "cpu"
    assert model(ids_of(2, 5)).shape == (2, 5, 97)
    assert model(ids_of(2, 5), logits_to_keep=1).shape == (2, 1, 97)


def test_rope_tables_stay_float32_through_a_round_trip_to_bfloat16():
    model = tiny_model()
    exact = model.rope.cos.clone()
    with torch.no_grad():
        model.to(torch.bfloat16)
        assert model(ids_of(2, 8)).dtype == torch.bfloat16
        model.float()
    assert model.rope.cos.dtype == torch.float32 and torch.equal(model.rope.cos, exact)


def test_ids_beyond_the_context_or_vocabulary_are_refused_clearly():
    model = tiny_model()
    with pytest.raises(ValueError, match="context_length=24"):
        model(ids_of(1, 25))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[97]]))


def test_cached_calls_equal_one_full_forward():
    model = tiny_model()
    ids = ids_of(2, 12)
    with torch.no_grad():
        full = model(ids)
        model.reset_kv_cache()
        parts = [model(ids[:, :4], use_cache=True)] + [model(ids[:, t:t + 1], use_cache=True) for t in range(4, 12)]
    assert model.cache_pos == 12
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_a_left_padded_row_gives_the_logits_it_gives_alone():
    model = tiny_model()
    short, long = ids_of(1, 5, seed=2), ids_of(1, 9, seed=3)
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        assert torch.allclose(padded[0, 4:], model(short)[0], atol=1e-5)
        assert torch.allclose(padded[1], model(long)[0], atol=1e-5)


def test_batched_generation_equals_generating_each_prompt_alone():
    model = tiny_model()
    prompts = [ids_of(1, 3, seed=4)[0].tolist(), ids_of(1, 7, seed=5)[0].tolist()]
    batched = generate_batch(model, prompts, max_new_tokens=6)
    for prompt, new in zip(prompts, batched, strict=True):
        alone = generate(model, torch.tensor([prompt]), 6)[0, len(prompt):].tolist()
        assert new == alone


def test_generation_past_the_context_slides_like_recomputation():
    model = tiny_model()  # a 24-token context; 10 prompt tokens + 30 new ones slide the window
    prompt = ids_of(1, 10)
    cached = generate(model, prompt, 30, use_cache=True)
    assert torch.equal(cached, generate(model, prompt, 30, use_cache=False))
    assert cached.shape == (1, 40)


# ---------------------------------------------------------------------------- techniques on top

def test_lora_trains_only_the_adapters_and_merges_to_the_same_logits():
    model = tiny_model()
    ids = ids_of(2, 10)
    with torch.no_grad():
        before = model(ids)
    report = apply_lora(model, rank=4, alpha=8)
    assert report.trainable < report.total
    with torch.no_grad():
        assert torch.allclose(model(ids), before)  # B starts at zero
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    next_token_loss(model, (ids[:, :-1], ids[:, 1:])).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        adapted = model(ids)
        assert not torch.allclose(adapted, before)
        merge_lora(model)
        assert torch.allclose(model(ids), adapted, atol=1e-5)
    assert all(type(m) is Linear for name, m in model.named_modules() if name.endswith("W_query"))


def test_neftune_adds_noise_to_the_token_embedding_in_training_only():
    model = tiny_model()
    ids = ids_of(2, 6)
    with torch.no_grad():
        clean = model(ids)
        enable_neftune(model, alpha=5.0)
        assert torch.equal(model(ids), clean)
        model.train()
        with neftune_lengths(model, torch.tensor([6, 6])):
            assert not torch.allclose(model(ids), clean)


def test_instruction_and_dpo_losses_run_and_backpropagate():
    model = tiny_model().train()
    ids = ids_of(2, 10)
    targets = ids[:, 1:].clone()
    targets[:, :3] = -100  # the prompt is not scored
    loss = instruction_loss(model, (ids[:, :-1], targets))
    logps = sequence_logprobs(model, ids, torch.ones_like(ids))
    assert logps.shape == (2,) and bool((logps < 0).all())
    (loss + logps.sum()).backward()
    assert model.trf_blocks[0].att.W_key.weight.grad is not None


def test_dpo_against_a_frozen_copy_starts_at_log_2_and_backpropagates():
    model = tiny_model().train()
    ids = ids_of(4, 10)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :4] = False  # the prompt is not scored
    batch = {"chosen_ids": ids[:2], "chosen_mask": mask[:2], "rejected_ids": ids[2:], "rejected_mask": mask[2:]}
    loss_fn = DPOLoss(model, beta=0.1)
    reference = loss_fn.reference.model
    assert reference.trf_blocks[0].att.rope[0] is reference.rope  # the copy rotates with its own tables
    loss, metrics = loss_fn(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # the policy equals its reference
    loss.backward()
    assert model.trf_blocks[1].ff.fc2.weight.grad is not None
    assert all(p.grad is None for p in reference.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for flag in (False, True):
        model = tiny_model().train()
        model.gradient_checkpointing = flag
        next_token_loss(model, (ids_of(2, 9)[:, :-1], ids_of(2, 9)[:, 1:])).backward()
        grads.append(model.trf_blocks[0].ff.fc1.weight.grad)
    assert torch.allclose(*grads, atol=1e-6)


def test_nf4_quantized_model_computes_with_its_dequantized_weights():
    from minigpt.quantization.layers import QUANTIZED_LAYERS
    from minigpt.quantization.model import dequantize_model, quantize_model

    model = tiny_model(emb_dim=64, hidden_dim=128)
    ids = ids_of(2, 12)
    with torch.no_grad():
        full = model(ids)
        quantize_model(model, "nf4")
        quantized = model(ids)
        assert sum(isinstance(m, QUANTIZED_LAYERS) for m in model.modules()) == 2 * 7  # 4 attention + 3 feed-forward
        assert isinstance(model.tok_emb, nn.Embedding) and model.out_head.weight is model.tok_emb.weight
        assert torch.allclose(dequantize_model(model)(ids), quantized, atol=1e-5)
    assert 0 < (quantized - full).abs().max() < 0.1 * full.abs().max()  # 4-bit rounding: close, not equal
