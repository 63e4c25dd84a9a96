"""QLoRA and quantized checkpoints: LoRA trains on a frozen 4-bit base, merging gives back a
full-precision model, adapters move between quantized and float bases, a quantized model
saves and loads exactly, a Hugging Face GPT-2 loads straight into NF4, and every job with
``quantize`` runs on tiny settings.

References: the float model with the dequantized weights (what a quantized layer must
compute), transformers' ``GPT2LMHeadModel`` (random weights), and the model quantized after
a full-precision load (what quantizing while loading must equal).
"""

from __future__ import annotations

import dataclasses
import json
import signal

import pytest
import torch
from safetensors.torch import save_file
from test_hf_gpt2 import random_ids, saved_hf_model
from test_jobs import signal_after_step, spam_like
from test_jobs_dpo import preference_file
from torch import nn

from minigpt.data.windows import tokenize
from minigpt.finetuning.classification import load_classifier
from minigpt.generation.generate import generate
from minigpt.jobs.classify import ClassifyConfig, finetune_classifier
from minigpt.jobs.dpo import DPOConfig, finetune_dpo
from minigpt.jobs.finetune import FinetuneConfig
from minigpt.jobs.generate import GenerateConfig, generate_text
from minigpt.jobs.info import preset_sizes
from minigpt.jobs.instruct import InstructConfig, finetune_instructions
from minigpt.lora.adapters import apply_lora, lora_disabled, merge_lora
from minigpt.lora.files import load_lora, save_lora
from minigpt.lora.layers import LinearWithLoRA
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.models.gpt2.weights import load_config
from minigpt.quantization.layers import QUANTIZED_LAYERS, Linear4bit, Linear8bit, LinearInt4
from minigpt.quantization.model import WEIGHT_ONLY_SCHEMES, is_quantized, quantize_model
from minigpt.quantization.schemes import SCHEMES, quantized_bytes
from minigpt.runtime.linear import Linear
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer
from minigpt.training.checkpoint import load_state
from minigpt.training.loop import TrainingInterrupted

SMALL = GPTConfig(vocab_size=97, context_length=16, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                  qkv_bias=True, tie_weights=True)
JOB_MODEL = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                      tie_weights=True)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs tiny models."""


def ids(batch: int = 4, tokens: int = 16) -> torch.Tensor:
    return torch.randint(0, SMALL.vocab_size, (batch, tokens))


def base_model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(SMALL).eval()


def qlora_model(scheme: str = "nf4", trained: bool = True) -> GPTModel:
    """A quantized copy of :func:`base_model` with rank-4 LoRA, its B made non-zero (as after training)."""
    model = quantize_model(base_model(), scheme)
    apply_lora(model, rank=4, alpha=8)
    if trained:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora.B"):
                    p.normal_(0.0, 0.05)
    return model


def float_with_dequantized_weights(quantized: nn.Module) -> GPTModel:
    """The reference: a float model whose linears hold the quantized model's dequantized weights."""
    model = base_model()
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, QUANTIZED_LAYERS):
                linear = model.get_submodule(name.removesuffix(".linear"))
                if m.tied_to is None:
                    linear.weight.copy_(m.dequantized_weight())
                else:  # a quantized tied head has its own copy; the embedding kept the float matrix
                    linear.weight = nn.Parameter(m.dequantized_weight())
    return model


# ------------------------------------------------------------------------------ QLoRA


@pytest.mark.parametrize("scheme", SCHEMES)
def test_qlora_training_lowers_the_loss_and_touches_only_the_adapters(scheme):
    model = qlora_model(scheme, trained=False)
    model.train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora." not in k}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora." in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    targets = x.roll(-1, dims=1)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # packed codes, scales, embeddings
    wrapped = model.trf_blocks[0].att.W_query
    assert isinstance(wrapped, LinearWithLoRA) and isinstance(wrapped.linear, QUANTIZED_LAYERS)
    assert wrapped.lora.A.dtype == wrapped.linear.compute_dtype == torch.float32


def test_adapters_follow_a_bfloat16_compute_dtype():
    model = quantize_model(base_model(), "nf4", compute_dtype=torch.bfloat16)
    apply_lora(model, rank=4, alpha=8)
    layer = model.trf_blocks[0].ff.layers[0]
    assert layer.lora.A.dtype == layer.lora.B.dtype == torch.bfloat16
    logits = model(ids())  # float32 activations in and out, the adapter in bfloat16
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_base_with_adapters_off_is_the_quantized_model(scheme):
    model = qlora_model(scheme)
    plain = quantize_model(base_model(), scheme)
    x = ids()
    with torch.no_grad(), lora_disabled(model):
        assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_dequantizes_into_a_plain_full_precision_model(scheme, tmp_path):
    model = qlora_model(scheme)
    x = ids()
    with torch.no_grad():
        expected = model(x)
        merged = merge_lora(model)
        got = merged(x)
    assert not is_quantized(merged) and not any(isinstance(m, LinearWithLoRA) for m in merged.modules())
    linears = [m for m in merged.modules() if isinstance(m, nn.Linear)]
    assert all(m.weight.dtype == torch.float32 and not m.weight.requires_grad for m in linears)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    reloaded = GPTModel.from_pretrained(tmp_path / "merged").eval()
    assert not is_quantized(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adapter_from_a_quantized_base_loads_onto_the_float_base(scheme, tmp_path):
    qlora = qlora_model(scheme)
    save_lora(qlora, tmp_path / "adapter.safetensors")
    on_float = float_with_dequantized_weights(qlora)
    report = load_lora(on_float, tmp_path / "adapter.safetensors")
    assert report.rank == 4 and len(report.modules) == 2 * 6 + 1  # six linears a block, and the head
    ours = dict(on_float.named_parameters())
    for name, p in qlora.named_parameters():
        if ".lora." in name:
            assert torch.equal(ours[name], p), name
    x = ids()
    with torch.no_grad():  # the same weights up to float rounding: the same logits
        torch.testing.assert_close(on_float(x), qlora(x), atol=1e-4, rtol=1e-4)
        on_original = base_model()
        load_lora(on_original, tmp_path / "adapter.safetensors")
        drift = (on_original(x) - qlora(x)).abs().max().item()
    assert drift < (0.05 if scheme == "int8" else 0.5)  # only the quantization error of the base remains


def test_an_adapter_loads_onto_a_quantized_base(tmp_path):
    model = base_model()
    apply_lora(model, rank=2, alpha=2)
    save_lora(model, tmp_path / "adapter.safetensors")
    quantized = quantize_model(base_model(), "nf4-dq")
    load_lora(quantized, tmp_path / "adapter.safetensors")
    assert isinstance(quantized.trf_blocks[1].att.out_proj.linear, Linear4bit)


# ------------------------------------------------------------------- quantized checkpoints


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_saved_quantized_model_loads_back_exactly(scheme, tmp_path):
    model = quantize_model(base_model(), scheme)
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    entry = config["quantization"]
    assert entry["scheme"] == scheme and entry["compute_dtype"] == "float32"
    assert entry["layers"]["trf_blocks.0.ff.layers.0"] == [4 * SMALL.emb_dim, SMALL.emb_dim]
    assert len(entry["layers"]) == 6 * SMALL.n_layers + (scheme in WEIGHT_ONLY_SCHEMES)  # decoding's: the head too
    loaded = GPTModel.from_pretrained(tmp_path / "q").eval()
    assert type(loaded.trf_blocks[0].att.W_key) is {"int8": Linear8bit, "int4": LinearInt4}.get(scheme, Linear4bit)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) and saved[k].dtype == restored[k].dtype for k in saved)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert GPTModel.from_pretrained(tmp_path / "q", quantize=scheme).cfg == SMALL  # its own scheme: fine
    other = "int8" if scheme != "int8" else "nf4"
    with pytest.raises(ValueError, match=f"quantized with {scheme}, not {other}"):
        GPTModel.from_pretrained(tmp_path / "q", quantize=other)


def test_a_quantized_checkpoint_stores_its_packed_bytes(tmp_path):
    model = quantize_model(base_model(), "nf4-dq")
    model.save_pretrained(tmp_path / "q")
    base_model().save_pretrained(tmp_path / "f")
    linear_weights = sum(m.weight.numel() for m in base_model().trf_blocks.modules() if isinstance(m, nn.Linear))
    shapes = [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, Linear4bit)]
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("f", "q")}
    saved = size["f"] - size["q"]
    # The file shrinks by the float32 weights less their packed form (headers differ by a few KB).
    expected = 4 * linear_weights - sum(quantized_bytes(s, "nf4-dq") for s in shapes)
    assert abs(saved - expected) < 8192


def test_a_quantized_directory_gives_its_config_and_checked_tensors(tmp_path):
    quantize_model(base_model(), "int8").save_pretrained(tmp_path / "q")
    assert load_config(tmp_path / "q") == SMALL
    state = load_state(tmp_path / "q")  # int8 codes beside float32 scales: not a mixed-dtype file
    assert state["trf_blocks.0.att.W_query.data"].dtype == torch.int8
    state["final_norm.scale"] = state["final_norm.scale"].half()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "q" / "model.safetensors")
    with pytest.raises(ValueError, match=r"final_norm.scale \(torch.float16\)"):
        load_state(tmp_path / "q")  # the float tensors must still share one dtype


@pytest.mark.parametrize("damage, words", [
    (lambda e: e.pop("layers"), "entry is damaged"),
    (lambda e: e.update(scheme="nf3"), "entry is damaged"),
    (lambda e: e["layers"].update({"trf_blocks.0.att.W_query": [8, 8]}), "by its quantization entry"),
    (lambda e: e["layers"].update({"final_norm": [64, 64]}), "no linear layer"),
    (lambda e: e.update(block_size=32), r"trf_blocks.0.att.W_query.scales: file has \(64,\), model expects \(128,\)"),
])
def test_a_damaged_quantization_entry_is_named(tmp_path, damage, words):
    quantize_model(base_model(), "nf4").save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    damage(config["quantization"])
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=words):
        GPTModel.from_pretrained(tmp_path / "q")


def test_a_book_state_dict_loads_quantized(tmp_path):
    model = base_model()
    torch.save(model.state_dict(), tmp_path / "book.pth")
    loaded = GPTModel.from_pretrained(tmp_path / "book.pth", cfg=SMALL, quantize="int8").eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), quantize_model(model, "int8")(x))


def test_an_unknown_scheme_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="nf4, nf4-dq, int8"):
        GPTModel.from_pretrained(tmp_path / "nothing-here", quantize="int2")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_hugging_face_gpt2_loads_straight_into_a_quantized_model(scheme, tmp_path):
    hf = saved_hf_model("heads6", tmp_path / "hf")
    ours = GPTModel.from_pretrained(tmp_path / "hf").eval()
    quantized = GPTModel.from_pretrained(tmp_path / "hf", quantize=scheme).eval()
    after = quantize_model(GPTModel.from_pretrained(tmp_path / "hf"), scheme).eval()  # load, then quantize
    block_linears = [name for name, m in ours.named_modules() if isinstance(m, nn.Linear) and "trf_blocks" in name]
    assert len(block_linears) == 6 * ours.cfg.n_layers
    assert all(isinstance(quantized.get_submodule(name), QUANTIZED_LAYERS) for name in block_linears)
    if scheme in WEIGHT_ONLY_SCHEMES:  # decoding reads the head for every token: quantized too, untied
        assert isinstance(quantized.out_head, QUANTIZED_LAYERS) and quantized.out_head.tied_to == "tok_emb"
        assert torch.equal(quantized.tok_emb.weight, ours.tok_emb.weight)  # looked up, so kept in float
    else:  # QLoRA's schemes keep the head in full precision, tied to the embedding
        assert type(quantized.out_head) is Linear and quantized.out_head.weight is quantized.tok_emb.weight
    x = random_ids(ours.cfg, 2, 24)
    with torch.no_grad():
        reference, float_logits, got = hf(x).logits, ours(x), quantized(x)
        assert torch.equal(got, after(x))
    torch.testing.assert_close(float_logits, reference, atol=1e-4, rtol=0)
    # These random logits are about 0.16 in size: int8 moves them by at most about 0.003, NF4 by about 0.04.
    tolerance = 0.01 if scheme == "int8" else 0.1
    assert (got - reference).abs().max() < tolerance
    # Close logits: a few near-ties flip (more under int4, which rounds the head too, to 16 levels a group).
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() > (0.7 if scheme == "int4" else 0.8)


# ---------------------------------------------------------------------------------- jobs


@pytest.mark.parametrize("scheme", SCHEMES)
def test_generate_with_quantize_continues_with_the_quantized_model(scheme, tmp_path):
    torch.manual_seed(0)
    GPTModel(JOB_MODEL).save_pretrained(tmp_path / "base")
    settings = GenerateConfig(model=str(tmp_path / "base"), prompt="Every effort moves", max_new_tokens=6,
                              temperature=0.0, quantize=scheme, device="cpu")  # greedy, as generate() by default
    text = "".join(generate_text(settings).pieces)
    tokenizer = get_gpt2_tokenizer()
    prompt = torch.tensor([tokenize(settings.prompt, tokenizer)])
    model = quantize_model(GPTModel.from_pretrained(tmp_path / "base"), scheme).eval()
    ids = generate(model, prompt, settings.max_new_tokens, eos_id=tokenizer.eot_token)
    assert text == tokenizer.decode(ids[0, prompt.shape[1]:].tolist())  # greedy: the quantized model's own words


def test_generate_quantizes_random_weights_of_a_preset():
    settings = GenerateConfig(preset="tiny", prompt="Hello", max_new_tokens=3, quantize="nf4", device="cpu",
                              temperature=0.0)  # greedy: the likeliest tokens, as compared below
    text = "".join(generate_text(settings).pieces)
    torch.manual_seed(settings.seed)  # the job's seed gives the preset's weights
    model = quantize_model(GPTModel("tiny"), "nf4").eval()
    tokenizer = get_gpt2_tokenizer()
    ids = generate(model, torch.tensor([tokenize("Hello", tokenizer)]), 3, eos_id=tokenizer.eot_token)
    assert text == tokenizer.decode(ids[0, 1:].tolist())


def test_quantize_without_lora_and_unknown_schemes_are_refused():
    with pytest.raises(ValueError, match="needs lora_rank"):
        InstructConfig(quantize="nf4")
    with pytest.raises(ValueError, match="nf4, nf4-dq, int8"):
        InstructConfig(quantize="fp4", lora_rank=4)
    with pytest.raises(ValueError, match="nf4, nf4-dq, int8"):
        GenerateConfig(quantize="4bit")
    assert FinetuneConfig.__dataclass_fields__["quantize"].metadata["choices"] == SCHEMES


def instruction_file(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "", "output": " ".join(
        map(str, range(1, i + 2)))} for i in range(20)]))
    return data


def test_instruct_job_trains_qlora_and_saves_a_full_precision_model(tmp_path):
    torch.manual_seed(0)
    GPTModel(JOB_MODEL).save_pretrained(tmp_path / "base")
    settings = InstructConfig(model=str(tmp_path / "base"), data=str(instruction_file(tmp_path)),
                              output=str(tmp_path / "run"), epochs=1, lr=1e-3, max_new_tokens=2, device="cpu",
                              lora_rank=4, quantize="nf4")
    metrics = finetune_instructions(settings, progress=False)
    assert metrics["responses"] == 2
    model = GPTModel.from_pretrained(tmp_path / "run")
    assert model.cfg == dataclasses.replace(JOB_MODEL, tie_weights=False)  # the head's merged update untied it
    assert not is_quantized(model)


def test_classify_job_on_a_quantized_base_stops_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    GPTModel(JOB_MODEL).save_pretrained(tmp_path / "base")
    values = dict(model=str(tmp_path / "base"), data=str(spam_like(tmp_path, 60)), epochs=2, batch_size=4,
                  lr=1e-3, eval_every=2, eval_iter=1, lora_rank=2, quantize="int8", device="cpu")
    whole = finetune_classifier(ClassifyConfig(**values, output=str(tmp_path / "whole")), progress=False)
    with signal_after_step(4, signal.SIGTERM), pytest.raises(TrainingInterrupted):
        finetune_classifier(ClassifyConfig(**values, output=str(tmp_path / "cut")), progress=False)
    resumed = finetune_classifier(ClassifyConfig.load(tmp_path / "cut"), resume=True, progress=False)
    assert resumed == whole  # the quantized base rebuilt the same way, the adapters restored
    model, labels = load_classifier(tmp_path / "cut")
    assert labels == ["a", "b"] and not is_quantized(model)


def test_dpo_job_uses_the_quantized_base_with_adapters_off_as_reference(tmp_path):
    torch.manual_seed(0)
    GPTModel(JOB_MODEL).save_pretrained(tmp_path / "base")
    settings = DPOConfig(model=str(tmp_path / "base"), data=str(preference_file(tmp_path)),
                         output=str(tmp_path / "run"), epochs=1, batch_size=4, lr=1e-3, eval_every=10, eval_iter=1,
                         max_new_tokens=2, num_responses=1, device="cpu", lora_rank=2, quantize="nf4-dq")
    metrics = finetune_dpo(settings, progress=False)
    assert metrics["reference"] == "adapters off"
    # Before training the policy is its reference: every reward is exactly 0.
    assert metrics["val_before"]["rewards/margins"] == 0.0
    base = GPTModel.from_pretrained(tmp_path / "base")
    load_lora(base, tmp_path / "run" / "adapter.safetensors")  # the QLoRA adapter on the float base
    merged = GPTModel.from_pretrained(tmp_path / "run")
    assert not is_quantized(merged)


def test_info_gives_the_memory_of_each_scheme():
    small = next(p for p in preset_sizes() if p.name == "gpt2-small")
    memory = small.memory
    assert list(memory) == ["float32", "bfloat16", "int8", "int4", "nf4", "nf4-dq"] and set(SCHEMES) < set(memory)
    assert memory["float32"] == 4 * small.parameters
    blocks = 12 * (4 * 768 * 768 + 2 * 4 * 768 * 768)  # attention 4 x (768, 768), feed-forward (3072, 768) x 2
    rest = small.parameters - blocks
    assert memory["nf4"] == 4 * rest + blocks // 2 + 4 * blocks // 64
    # int8 (and int4) quantize the output head too; the preset's head is untied, so its float matrix goes.
    shapes = [(768, 768)] * 48 + [(3072, 768), (768, 3072)] * 12 + [(50257, 768)]
    assert memory["int8"] == 4 * (rest - 50257 * 768) + sum(quantized_bytes(shape, "int8") for shape in shapes)
    assert memory["float32"] == 2 * memory["bfloat16"] and memory["float32"] > memory["nf4"] > memory["nf4-dq"]
    assert memory["nf4"] > memory["int8"] > memory["int4"]  # nf4 keeps the 154 MB head in float32
    assert memory["nf4"] - memory["nf4-dq"] == sum(quantized_bytes(n, "nf4") - quantized_bytes(n, "nf4-dq")
                                                   for n in [768 * 768] * 48 + [4 * 768 * 768] * 24)
