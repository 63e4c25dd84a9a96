"""The fine-tuning and generation jobs on a Llama-family directory: its own tokenizer, its chat
template as the prompt format, QLoRA instruction tuning and then QLoRA DPO on that output.

The directory holds a tiny random LlamaModel (written by ``export_llama``) and the byte-level
BPE that ``test_llama_finetune`` trains with the tokenizers library, with SmolLM2's template.
"""

import json

import pytest
import torch
from test_jobs_dpo import preference_file
from test_llama_finetune import CHATML, TINY, model_dir, trained  # noqa: F401 - trained is a fixture

from minigpt.finetuning.instruction import generate_response
from minigpt.finetuning.prompt_format import ALPACA, ChatTemplateFormat, recorded_format
from minigpt.jobs.dpo import DPOConfig, finetune_dpo
from minigpt.jobs.finetune import choose_prompt_format
from minigpt.jobs.generate import GenerateConfig, generate_text
from minigpt.jobs.instruct import InstructConfig, finetune_instructions
from minigpt.models.gpt2.model import GPTModel
from minigpt.models.llama.config import LlamaConfig
from minigpt.models.llama.hf_layout import export_llama
from minigpt.models.llama.model import LlamaModel
from minigpt.models.loader import load
from minigpt.quantization.model import is_quantized, quantize_model
from minigpt.tokenizers.tokenizer_json import load_hf_tokenizer


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs tiny models."""


@pytest.fixture(scope="module")
def llama_dir(trained, tmp_path_factory):  # noqa: F811 - the imported fixture
    """A Llama-family model directory: weights, tokenizer.json and a ChatML chat template."""
    directory = model_dir(tmp_path_factory.mktemp("llama"), trained, CHATML, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>")
    torch.manual_seed(0)
    export_llama(LlamaModel(LlamaConfig(vocab_size=load_hf_tokenizer(directory).n_vocab, **TINY)), directory)
    return directory


def test_the_prompt_format_follows_the_model(llama_dir, tmp_path):
    tokenizer = load_hf_tokenizer(llama_dir)
    chat = choose_prompt_format("auto", str(llama_dir), tokenizer)
    assert isinstance(chat, ChatTemplateFormat) and chat == ChatTemplateFormat.from_directory(llama_dir, tokenizer)
    assert choose_prompt_format("alpaca", str(llama_dir), tokenizer) is ALPACA
    GPTModel("tiny").save_pretrained(tmp_path / "gpt2")
    assert choose_prompt_format("auto", str(tmp_path / "gpt2"), None) is ALPACA
    assert choose_prompt_format("auto", "tiny", None) is ALPACA
    with pytest.raises(ValueError, match="has no chat template"):
        choose_prompt_format("chat", str(tmp_path / "gpt2"), None)
    with pytest.raises(ValueError, match="prompt_format must be auto or one of alpaca, chat, plain"):
        InstructConfig(prompt_format="chatml")


def test_generate_uses_the_model_s_own_tokenizer_quantized(llama_dir):
    settings = GenerateConfig(model=str(llama_dir), prompt="Hello", max_new_tokens=4, quantize="nf4", device="cpu",
                              temperature=0.0)  # greedy: the first token is the argmax below
    text = generate_text(settings)
    tokenizer = load_hf_tokenizer(llama_dir)
    model = quantize_model(load(llama_dir), "nf4").eval()
    ids = torch.tensor([tokenizer.encode("Hello", allowed_special="all")])
    expected = model(ids).argmax(-1)[0, -1].item()  # the first greedy token
    assert text.prompt == "Hello" and "".join(text.pieces).startswith(tokenizer.decode([expected]))


def test_qlora_instruction_tuning_then_dpo_on_a_llama_directory(llama_dir, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "", "output": " ".join(
        map(str, range(1, i + 2)))} for i in range(20)]))
    instruct = InstructConfig(model=str(llama_dir), data=str(data), output=str(tmp_path / "instruct"), epochs=1,
                              batch_size=4, lr=1e-3, max_new_tokens=3, device="cpu", lora_rank=4, quantize="nf4")
    metrics = finetune_instructions(instruct, progress=False)
    assert metrics["responses"] == 2
    tuned = load(tmp_path / "instruct")  # its tokenizer and template were copied next to it
    assert isinstance(tuned, LlamaModel) and not is_quantized(tuned)
    tokenizer = load_hf_tokenizer(tmp_path / "instruct")
    chat = ChatTemplateFormat.from_directory(tmp_path / "instruct", tokenizer)
    entry = json.loads((tmp_path / "instruct" / "responses.json").read_text())[0]
    # The job answered in the chat format, with the tuned (merged) model's own greedy words.
    assert entry["model_response"] == generate_response(tuned.eval(), entry, tokenizer, 3, prompt_format=chat)
    assert recorded_format(tmp_path / "instruct") == "chat"  # what the server reads to prompt it the same way

    dpo = DPOConfig(model=str(tmp_path / "instruct"), data=str(preference_file(tmp_path)), output=str(tmp_path / "dpo"),
                    epochs=1, batch_size=4, lr=1e-3, eval_every=10, eval_iter=1, max_new_tokens=2, num_responses=1,
                    device="cpu", lora_rank=2, quantize="nf4-dq")
    metrics = finetune_dpo(dpo, progress=False)
    assert metrics["reference"] == "adapters off" and metrics["val_before"]["rewards/margins"] == 0.0
    assert isinstance(load(tmp_path / "dpo"), LlamaModel)
