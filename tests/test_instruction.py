"""Instruction fine-tuning: the exact Alpaca prompt text, the collate function's ids and
masks on hand-made batches (an end-of-text inside a text included), data loading errors,
response extraction, and a tiny model that learns to answer and to stop."""

import json

import pytest

from minigpt.finetuning.instruction import (
    InstructionDataset,
    TokenizedExample,
    collate_instructions,
    generate_response,
    instruction_dataloader,
    load_instruction_data,
    save_responses,
    split_instruction_data,
)
from minigpt.finetuning.prompt_format import extract_response, format_input, format_response
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer
from minigpt.training.config import TrainConfig
from minigpt.training.loop import train_model

# Files this module reads from the data folder (without it, from the copies minigpt ships).
DATA_FILES = ["instruct/instruction-data.json"]

PAD = 50256
INTRO = ("Below is an instruction that describes a task. "
         "Write a response that appropriately completes the request.")
ENTRY = {"instruction": "Name a color.", "input": "", "output": "Blue."}
SMALL = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2,
                  drop_rate=0.0, tie_weights=True)


# --- the prompt format ---------------------------------------------------------------------


def test_format_with_and_without_input_is_the_books_text():
    with_input = {"instruction": "Edit the sentence.", "input": "He go home.", "output": "He goes home."}
    assert format_input(with_input) + format_response(with_input) == (
        f"{INTRO}\n\n### Instruction:\nEdit the sentence.\n\n### Input:\nHe go home."
        "\n\n### Response:\nHe goes home."
    )
    without = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    assert format_input(without) == f"{INTRO}\n\n### Instruction:\nName a color."
    assert format_input({"instruction": "Name a color.", "output": "Blue."}) == format_input(without)


def test_extract_response_drops_the_header_and_whitespace():
    assert extract_response("\n\n### Response:\nThe capital is Paris. \n") == "The capital is Paris."
    assert extract_response(" Paris") == "Paris"


# --- batches -------------------------------------------------------------------------------


def test_collate_pads_shifts_and_ignores_all_but_the_first_pad():
    inputs, targets = collate_instructions([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, PAD, PAD, PAD], [7, 8, 9, PAD, PAD]]
    assert targets.tolist() == [[1, 2, 3, 4, PAD], [6, PAD, -100, -100, -100], [8, 9, PAD, -100, -100]]


def test_collate_truncates_to_the_allowed_length():
    inputs, targets = collate_instructions([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, PAD]]
    assert targets.tolist() == [[1, 2, 3], [6, PAD, -100]]


def test_collate_can_mask_the_prompt_out_of_the_loss():
    # Prompt [0, 1, 2], response [3, 4]: only the response tokens and the end are graded.
    batch = [TokenizedExample([0, 1, 2, 3, 4], 3), TokenizedExample([5, 6, 7], 1)]
    inputs, targets = collate_instructions(batch, mask_instruction=True)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, PAD, PAD]]
    assert targets.tolist() == [[-100, -100, 3, 4, PAD], [6, 7, PAD, -100, -100]]
    with pytest.raises(ValueError, match="mask_instruction needs TokenizedExample"):
        collate_instructions([[0, 1, 2]], mask_instruction=True)


def test_collate_keeps_an_end_of_text_inside_a_text_in_the_loss():
    # Only the targets after the appended end-of-text are padding; one inside a text is a
    # target like any other, and the appended one still teaches the model to stop.
    inputs, targets = collate_instructions([[0, 1, 2, 3, 4], [5, PAD, 6]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, PAD, 6, PAD, PAD]]
    assert targets.tolist() == [[1, 2, 3, 4, PAD], [PAD, 6, PAD, -100, -100]]


def test_an_end_of_text_in_an_entry_is_one_token_and_stays_graded(char_tokenizer):
    entry = {"instruction": "Hi", "input": "", "output": "a<|endoftext|>b"}
    (example,) = InstructionDataset([entry], char_tokenizer)
    assert example.ids[-3:] == [ord("a"), PAD, ord("b")]
    _, targets = collate_instructions([example], mask_instruction=True)
    graded = targets[0][targets[0] != -100].tolist()
    assert graded[-4:] == [ord("a"), PAD, ord("b"), PAD]


def test_dataset_tokenizes_prompt_and_response_once(char_tokenizer):
    entry = {"instruction": "Hi", "input": "", "output": "Yo"}
    (example,) = InstructionDataset([entry], char_tokenizer)
    prompt = f"{INTRO}\n\n### Instruction:\nHi"
    assert example.ids == [ord(c) for c in prompt + "\n\n### Response:\nYo"]
    assert example.prompt_length == len(prompt)


# --- data ----------------------------------------------------------------------------------


def test_book_data_splits_935_55_110(data_dir):
    data = load_instruction_data()
    train, val, test = split_instruction_data(data)
    assert (len(data), len(train), len(val), len(test)) == (1100, 935, 55, 110)
    assert train[0] == data[0] and test[0] == data[935] and val[0] == data[1045]


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(ValueError, match="not valid JSON: .* at line 3"):
        load_instruction_data(path)


def test_entry_without_output_is_named_by_its_index(tmp_path):
    path = tmp_path / "data.json"
    entries = [{"instruction": "a", "input": "", "output": "b"}] * 2 + [{"instruction": "c", "input": ""}]
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="entry 2 has no 'output' field"):
        load_instruction_data(path)


def test_twenty_entries_split_17_1_2(data_dir):
    entries = load_instruction_data()[:20]
    train, val, test = split_instruction_data(entries)
    assert (len(train), len(val), len(test)) == (17, 1, 2)
    assert test == load_instruction_data()[17:19]


def test_save_responses_needs_one_score_per_response(tmp_path):
    responses = [{**ENTRY, "model_response": "Blue"}]
    with pytest.raises(ValueError, match="2 scores for 1 responses"):
        save_responses(responses, tmp_path / "r.json", [1, 2])
    save_responses(responses, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == [{**ENTRY, "model_response": "Blue"}]


# --- training and answering ----------------------------------------------------------------


def test_trained_model_answers_its_instructions_and_stops(tmp_path, one_thread):
    entries = [{"instruction": "Name a primary color.", "input": "", "output": "Red is a primary color."},
               {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."}]
    tokenizer = get_gpt2_tokenizer()
    loader = instruction_dataloader(entries, tokenizer, batch_size=2, shuffle=True)
    model = GPTModel(SMALL)
    # float32 pinned: the same numbers on every CPU ("auto" would pick bfloat16 on some). And 100 steps,
    # not 50: at 50 the token that tells "### Input:" from "### Response:" is half learned, and the
    # answer hinged on rounding (wrong for 2 of 6 seeds in float32, for 2 of 3 in bfloat16).
    config = TrainConfig(max_steps=100, lr=1e-2, min_lr=1e-2, warmup_steps=0, eval_every=100, precision="float32")
    history = train_model(model, loader, loader, config, device="cpu", progress=False)
    assert history.train_losses[-1] < 0.2
    # The answer ends where the model emits <|endoftext|>, which it learned from the one kept pad.
    answers = [generate_response(model, entry, tokenizer, max_new_tokens=20) for entry in entries]
    assert answers == ["Red is a primary color.", "Bonjour."]
    save_responses([{**e, "model_response": a} for e, a in zip(entries, answers, strict=True)],
                   tmp_path / "r.json", [90, None])
    assert json.loads((tmp_path / "r.json").read_text())[1] == {
        "instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour.",
        "model_response": "Bonjour.", "score": None}
