"""Instruction tuning, DPO, LoRA, QLoRA and NEFTune on a Llama-family model, with its chat template.

The tokenizer is a byte-level BPE that the `tokenizers` library trains here, with ChatML's
special tokens; the model is a tiny random LlamaModel (2 layers, grouped-query attention).
"""

import copy
import json
import math

import pytest
import torch

from minigpt.evaluation.comparison import Decoding, answer_prompts
from minigpt.finetuning.dpo import DPOLoss
from minigpt.finetuning.instruction import (
    InstructionDataset,
    collate_instructions,
    generate_response,
    instruction_dataloader,
    instruction_loss,
)
from minigpt.finetuning.neftune import enable_neftune, neftune_lengths
from minigpt.finetuning.preference import PreferenceDataset, preference_dataloader
from minigpt.finetuning.prompt_format import ALPACA, RESPONSE_HEADER, ChatTemplateFormat, format_input
from minigpt.finetuning.reference import AdaptersOffReference, pair_logprobs, precompute_reference
from minigpt.io.files import PACKAGE_DATA_DIR
from minigpt.lora.adapters import apply_lora
from minigpt.models.llama.config import LlamaConfig
from minigpt.models.llama.model import LlamaModel
from minigpt.quantization.layers import QUANTIZED_LAYERS
from minigpt.quantization.model import dequantize_model, quantize_model
from minigpt.tokenizers.chat_template import render_chat
from minigpt.tokenizers.tokenizer_json import load_hf_tokenizer

tokenizers = pytest.importorskip("tokenizers", reason="the test's tokenizer.json is trained by the tokenizers library")
from tokenizers import Tokenizer, decoders, models, trainers  # noqa: E402
from tokenizers import pre_tokenizers as pt  # noqa: E402

# SmolLM2-Instruct's template (ChatML with a default system turn)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
ENTRIES = [
    {"instruction": "Name the painter.", "input": "The verdict", "output": "Jack Gisburn."},
    {"instruction": "Say yes.", "input": "", "output": "Yes, I will."},
    {"instruction": "Repeat the word.", "input": "picture", "output": "picture picture"},
]
PAIRS = [
    {"instruction": "Name the painter.", "input": "", "chosen": "Jack Gisburn.", "rejected": "Nobody at all."},
    {"instruction": "Is it good?", "input": "The picture", "chosen": "It is.", "rejected": "No, it never was."},
    {"instruction": "Say yes.", "chosen": "Yes.", "rejected": "I would rather not say anything."},
]
TINY = dict(context_length=128, emb_dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=10000.0)


LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def trained():
    """A byte-level BPE that the tokenizers library trains on the shipped text, with ChatML's and Llama 3's tokens."""
    reference = Tokenizer(models.BPE())
    reference.pre_tokenizer = pt.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pt.ByteLevel.alphabet(), show_progress=False,
                                  special_tokens=SPECIAL)
    reference.train_from_iterator([(PACKAGE_DATA_DIR / "the-verdict.txt").read_text(encoding="utf-8")], trainer)
    return reference


def model_dir(directory, tokenizer: Tokenizer, template: str, **special_tokens):
    """The tokenizer files of a model directory, the chat template in tokenizer_config.json."""
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **special_tokens}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def chat_model_dir(trained, tmp_path_factory):
    """ChatML (SmolLM2's template), eos <|im_end|> and pad <|endoftext|> (as Qwen's)."""
    return model_dir(tmp_path_factory.mktemp("chatml"), trained, CHATML, eos_token="<|im_end|>",
                     pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tok(chat_model_dir):
    return load_hf_tokenizer(chat_model_dir)


@pytest.fixture(scope="module")
def chat(chat_model_dir, tok):
    return ChatTemplateFormat.from_directory(chat_model_dir, tok)


def reference_ids(chat_model_dir, text: str) -> list[int]:
    """The ids the tokenizers library gives ``text``, special tokens read as such."""
    return Tokenizer.from_file(str(chat_model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def tiny_llama(tok, seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    return LlamaModel(LlamaConfig(vocab_size=tok.n_vocab, **TINY))


# --------------------------------------------------------------------------- the chat format


def test_the_masked_prompt_is_the_user_turn_rendered_with_the_generation_prompt(chat_model_dir, tok, chat):
    entry = ENTRIES[0]
    prompt = render_chat(CHATML, [{"role": "user", "content": "Name the painter.\n\nThe verdict"}],
                         add_generation_prompt=True)
    assert prompt == SYSTEM + "<|im_start|>user\nName the painter.\n\nThe verdict<|im_end|>\n<|im_start|>assistant\n"
    assert chat.prompt(entry) == prompt and chat.answer(entry) == "Jack Gisburn.<|im_end|>\n"
    (example,) = InstructionDataset([entry], tok, chat)
    assert example.ids[:example.prompt_length] == reference_ids(chat_model_dir, prompt)
    assert example.ids[example.prompt_length:] == reference_ids(chat_model_dir, "Jack Gisburn.<|im_end|>\n")
    assert example.ids.count(tok.token_to_id("<|im_start|>")) == 3  # one id each, not their characters

    # The loss scores exactly the answer, the template's end-of-turn included, and nothing is appended
    inputs, targets = collate_instructions([example], mask_instruction=True, end_of_text=False)
    assert inputs[0].tolist() == example.ids[:-1]
    assert [t for t in targets[0].tolist() if t != -100] == example.ids[example.prompt_length:]


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_the_prompt_and_the_text_are_those_of_transformers_apply_chat_template(style, trained, tmp_path):
    transformers = pytest.importorskip("transformers", reason="the reference chat rendering is transformers'")
    if style == "chatml":
        directory = model_dir(tmp_path, trained, CHATML, eos_token="<|im_end|>")
    else:
        directory = model_dir(tmp_path, trained, LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    ours = load_hf_tokenizer(directory)
    chat = ChatTemplateFormat.from_directory(directory, ours)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    for entry in ENTRIES:
        (example,) = InstructionDataset([entry], ours, chat)
        user = {"role": "user", "content": entry["instruction"] + (f"\n\n{entry['input']}" if entry["input"] else "")}
        prompt = reference.apply_chat_template([user], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert example.ids[:example.prompt_length] == list(prompt)
        whole = reference.apply_chat_template([user, {"role": "assistant", "content": entry["output"]}],
                                              tokenize=False)
        assert ours.decode(example.ids) == whole
    if style == "llama3":  # the template writes the BOS; the answer ends with the end-of-turn, the eos
        assert example.ids[0] == ours.bos_token_id
        assert example.ids[-1] == ours.eot_token == ours.token_to_id("<|eot_id|>")


def test_chat_batches_pad_with_the_tokenizer_s_end_of_text_and_append_nothing(tok, chat):
    dataset = InstructionDataset(ENTRIES, tok, chat)
    assert dataset.pad_token_id == tok.eot_token == tok.token_to_id("<|im_end|>") != tok.pad_token_id
    inputs, targets = dataset.collate_fn(mask_instruction=False)([dataset[0], dataset[1]])
    short, long = sorted((dataset[0].ids, dataset[1].ids), key=len)
    row = [dataset[0].ids, dataset[1].ids].index(short)
    assert inputs.shape[1] == len(long) - 1
    assert inputs[row].tolist() == short + [tok.eot_token] * (len(long) - len(short) - 1)
    assert targets[row].tolist() == short[1:] + [-100] * (len(long) - len(short))


def test_the_alpaca_format_with_a_llama_tokenizer_ends_and_pads_with_its_end_of_text(tok):
    loader = instruction_dataloader(ENTRIES[:2], tok, batch_size=2, allowed_max_length=None)
    inputs, targets = next(iter(loader))
    first = tok.encode(format_input(ENTRIES[0])) + tok.encode(RESPONSE_HEADER + ENTRIES[0]["output"])
    second = tok.encode(format_input(ENTRIES[1])) + tok.encode(RESPONSE_HEADER + ENTRIES[1]["output"])
    assert len(first) > len(second)
    assert inputs[0].tolist() == first and targets[0].tolist() == first[1:] + [tok.eot_token]
    width = len(first)
    assert inputs[1].tolist() == second + [tok.eot_token] * (width - len(second))
    assert targets[1].tolist() == second[1:] + [tok.eot_token] + [-100] * (width - len(second))
    assert InstructionDataset(ENTRIES, None).pad_token_id == 50256  # GPT-2's, as before


def test_preference_pairs_in_the_chat_format(chat_model_dir, tok, chat):
    dataset = PreferenceDataset(PAIRS, tok, prompt_format=chat)
    example = dataset[1]
    prompt = SYSTEM + "<|im_start|>user\nIs it good?\n\nThe picture<|im_end|>\n<|im_start|>assistant\n"
    assert example.prompt == reference_ids(chat_model_dir, prompt)
    assert example.chosen == reference_ids(chat_model_dir, "It is.<|im_end|>\n")
    assert example.rejected == reference_ids(chat_model_dir, "No, it never was.<|im_end|>\n")
    batch = next(iter(preference_dataloader(dataset, batch_size=3, allowed_max_length=None)))
    end = len(example.prompt) + len(example.chosen)
    assert batch["chosen_ids"][1, :end].tolist() == example.prompt + example.chosen
    assert set(batch["chosen_ids"][1, end:].tolist()) == {tok.eot_token}
    assert batch["chosen_mask"][1].nonzero().flatten().tolist() == list(range(len(example.prompt), end))
    # Alpaca pairs with this tokenizer end with its end-of-text, not GPT-2's 50256
    alpaca = PreferenceDataset(PAIRS, tok)[0]
    assert alpaca.chosen == tok.encode("Jack Gisburn.") + [tok.eot_token]
    assert alpaca.prompt == tok.encode(format_input(PAIRS[0])) + tok.encode(RESPONSE_HEADER)


def test_a_template_that_does_not_continue_its_prompt_is_refused():
    odd = ChatTemplateFormat("{% for m in messages %}{{ m['content'] }}|{% endfor %}"
                             "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    with pytest.raises(ValueError, match="use the Alpaca format"):
        odd.answer(ENTRIES[0])


def test_a_directory_without_a_chat_template_or_a_format_without_tokenizer_says_so(tmp_path, tok, chat):
    with pytest.raises(ValueError, match="no chat template"):
        ChatTemplateFormat.from_directory(tmp_path, tok)
    with pytest.raises(ValueError, match="load_hf_tokenizer"):
        InstructionDataset(ENTRIES, None, chat)


# --------------------------------------------------------------------------- training a LlamaModel


def test_an_instruction_step_on_a_llama_model_scores_only_the_answers(tok, chat):
    model = tiny_llama(tok)
    loader = instruction_dataloader(ENTRIES, tok, batch_size=3, mask_instruction=True, prompt_format=chat)
    inputs, targets = next(iter(loader))
    loss = instruction_loss(model, (inputs, targets))
    # By hand: the mean negative log-probability of each answer token given all before it
    dataset = InstructionDataset(ENTRIES, tok, chat)
    terms = []
    for ids, prompt_length in dataset:
        logps = torch.log_softmax(model(torch.tensor([ids]))[0, :-1], dim=-1)
        terms += [-logps[t - 1, ids[t]] for t in range(prompt_length, len(ids))]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        instruction_loss(model, (inputs, targets)).backward()
        optimizer.step()
    assert instruction_loss(model, (inputs, targets)).item() < loss.item() - 0.5


def dpo_steps(model, loss_fn, batch, steps: int = 5, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_a_dpo_step_on_a_llama_model(tok, chat):
    model = tiny_llama(tok)
    dataset = PreferenceDataset(PAIRS, tok, prompt_format=chat)
    batch = next(iter(preference_dataloader(dataset, batch_size=3, allowed_max_length=None)))
    chosen, rejected = pair_logprobs(model, batch)
    for i, example in enumerate(dataset):  # each pair alone, unpadded: the same sums
        for side, value in (("chosen", chosen[i]), ("rejected", rejected[i])):
            ids = example.prompt + getattr(example, side)
            logps = torch.log_softmax(model(torch.tensor([ids]))[0, :-1], dim=-1)
            by_hand = sum(logps[t - 1, ids[t]] for t in range(len(example.prompt), len(ids)))
            torch.testing.assert_close(value, by_hand, atol=1e-5, rtol=1e-5)
    # Reference log-probabilities computed once, in batches padded with the tokenizer's end-of-text
    precompute_reference(model, dataset, allowed_max_length=None, batch_size=2)
    stored = next(iter(preference_dataloader(dataset, batch_size=3, allowed_max_length=None)))
    torch.testing.assert_close(stored["ref_chosen_logps"], chosen.detach())
    losses = dpo_steps(model, DPOLoss(None, beta=0.5), stored)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # the policy is the reference
    assert losses[-1] < losses[0] - 0.1


def test_lora_dpo_on_a_llama_model_with_the_adapters_off_as_reference(tok, chat):
    model = tiny_llama(tok)
    base = copy.deepcopy(model).eval()
    report = apply_lora(model, rank=4, alpha=8)
    assert report.trainable > 0
    batch = next(iter(preference_dataloader(PAIRS, tok, batch_size=3, allowed_max_length=None,
                                            prompt_format=chat)))
    reference = AdaptersOffReference(model)
    losses = dpo_steps(model, DPOLoss(reference, beta=0.5), batch)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0] - 0.05
    with torch.no_grad():
        for got, want in zip(reference.logps(batch), pair_logprobs(base, batch), strict=True):
            torch.testing.assert_close(got, want)  # the base model, untouched by training
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora." in name for name in trained)


def test_neftune_finds_the_llama_token_embedding_and_spares_the_padding(tok, chat):
    model = tiny_llama(tok)
    enable_neftune(model, alpha=5.0)
    inputs, targets = next(iter(instruction_dataloader(ENTRIES, tok, batch_size=3, prompt_format=chat)))
    seen = []
    model.tok_emb.register_forward_hook(lambda module, args, output: seen.append(output.detach()))
    lengths = torch.tensor([10, 20, inputs.shape[1]])
    with neftune_lengths(model, lengths):
        model.train()(inputs)
    model.eval()(inputs)
    noise = seen[0] - seen[1]  # the noisy embeddings (training) minus the clean ones (eval)
    for row, length in enumerate(lengths.tolist()):
        bound = 5.0 / math.sqrt(length * model.cfg.emb_dim)
        assert 0.5 * bound < noise[row, :length].abs().max() <= bound
        assert torch.all(noise[row, length:] == 0)
    model.train()
    loss = instruction_loss(model, (inputs, targets))  # lengths from the targets, as in training
    loss.backward()
    assert torch.isfinite(loss) and model.tok_emb.weight.grad is not None


def test_qlora_on_a_llama_model(tok, chat):
    model = tiny_llama(tok)
    batch = next(iter(instruction_dataloader(ENTRIES, tok, batch_size=3, prompt_format=chat)))
    quantize_model(model, "nf4", block_size=32)
    blocks = [module for name, module in model.named_modules() if name.startswith("trf_blocks")]
    assert sum(isinstance(module, QUANTIZED_LAYERS) for module in blocks) == 2 * 7  # q, k, v, out, 3 of SwiGLU
    assert isinstance(model.out_head, torch.nn.Linear) and model.out_head.weight is model.tok_emb.weight
    dequantized = dequantize_model(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(model(batch[0]), dequantized(batch[0]), atol=1e-5, rtol=1e-5)
    apply_lora(model, rank=4, alpha=8)
    loss = instruction_loss(model, batch)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".lora." in name for name in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
    # DPO on the quantized base: the reference is the same model with its adapters off
    pairs = next(iter(preference_dataloader(PAIRS, tok, batch_size=3, allowed_max_length=None, prompt_format=chat)))
    losses = dpo_steps(model, DPOLoss(AdaptersOffReference(model), beta=0.5), pairs, steps=3)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0]


def test_a_llama_model_tuned_on_chat_data_answers_and_stops_at_the_end_of_turn(tok, chat):
    model = tiny_llama(tok)
    entries = ENTRIES[:2]
    inputs, targets = next(iter(instruction_dataloader(entries, tok, batch_size=2, mask_instruction=True,
                                                       prompt_format=chat)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        instruction_loss(model, (inputs, targets)).backward()
        optimizer.step()
    model.eval()
    for entry in entries:
        # "<|im_end|>" is the end-of-text: the answer stops there, before the template's "\n"
        assert generate_response(model, entry, tok, max_new_tokens=20, prompt_format=chat) == entry["output"]
    assert ALPACA.answer(entries[0]) == RESPONSE_HEADER + entries[0]["output"]
    # the evaluation's batched answers (minigpt compare) read the same chat format and stop at the same end
    assert answer_prompts(model, entries, tok, Decoding(max_new_tokens=20), prompt_format=chat) == [
        entry["output"] for entry in entries]
