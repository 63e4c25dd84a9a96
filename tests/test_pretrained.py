"""One door to GPT-2 and the Llama family: the right model class, its own tokenizer, its chat template."""

import json

import pytest
import torch

from minigpt.models.gpt2.model import GPTModel
from minigpt.models.llama.model import LlamaModel
from minigpt.models.loader import chat_template_of, load, load_tokenizer, resolve
from minigpt.models.registry import family_of_name
from minigpt.quantization.model import is_quantized
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer

transformers = pytest.importorskip("transformers", reason="the reference checkpoints are written by transformers")
tokenizers = pytest.importorskip("tokenizers", reason="the reference tokenizer is trained by the tokenizers library")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _llama_dir(tmp_path, with_tokenizer: bool = True):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=True)
    reference = transformers.LlamaForCausalLM(config).eval()
    directory = tmp_path / "llama"
    reference.save_pretrained(directory)
    if with_tokenizer:
        from tokenizers import Tokenizer, decoders, models, trainers
        from tokenizers import pre_tokenizers as pt

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pt.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(["the cat sat on the mat, the dog sat on the log"] * 20, trainers.BpeTrainer(
            vocab_size=290, initial_alphabet=pt.ByteLevel.alphabet(), special_tokens=["<|im_start|>", "<|im_end|>"],
            show_progress=False))
        tok.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None}), encoding="utf-8")
    return directory, reference


def _gpt2_dir(tmp_path):
    config = transformers.GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=2)
    directory = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def test_a_llama_directory_loads_as_llama_with_the_logits_of_transformers(tmp_path, one_thread):
    directory, reference = _llama_dir(tmp_path, with_tokenizer=False)
    assert resolve(directory).family.name == "llama"
    model = load(directory)
    assert isinstance(model, LlamaModel)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=0)


def test_a_gpt2_directory_loads_as_gpt2_and_quantized_on_request(tmp_path, one_thread):
    directory = _gpt2_dir(tmp_path)
    assert resolve(directory).family.name == "gpt2"
    assert family_of_name("gpt2-small").name == "gpt2" and family_of_name("smollm2-135m").name == "llama"
    assert isinstance(load(directory), GPTModel)
    assert is_quantized(load(directory, quantize="nf4"))
    assert isinstance(load(_llama_dir(tmp_path, with_tokenizer=False)[0], quantize="nf4"), LlamaModel)


def test_tokenizer_and_template_follow_the_model(tmp_path):
    directory, _ = _llama_dir(tmp_path)
    tokenizer = load_tokenizer(directory)
    reference = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    text = "the cat sat on the log"
    assert tokenizer.encode(text) == reference.encode(text).ids
    assert tokenizer.eot_token == reference.token_to_id("<|im_end|>")
    assert chat_template_of(directory) == CHATML
    gpt2 = _gpt2_dir(tmp_path)
    assert load_tokenizer(gpt2).encode(text) == get_gpt2_tokenizer().encode(text)
    assert chat_template_of(gpt2) is None


def test_a_llama_directory_without_its_tokenizer_says_what_to_copy(tmp_path):
    directory, _ = _llama_dir(tmp_path, with_tokenizer=False)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(directory)


def test_gpt2_names_give_their_tokenizer_without_a_download(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("GPT-2's encoding ships with minigpt: nothing to download")

    monkeypatch.setattr("minigpt.io.hub.download_gpt2", no_network)
    assert load_tokenizer("gpt2-small").encode("Hello") == [15496]
    assert chat_template_of("gpt2-xl") is None
