"""Instruction fine-tuning: the exact Alpaca prompt text, the collate function's ids and
masks on hand-made batches, data loading errors, response extraction, and the judges
(one behind a fake HTTP server started here)."""

import http.server
import json
import math
import threading

import pytest
import torch
from torch import nn

from minigpt.cli import main
from minigpt.config import GPTConfig
from minigpt.instruction import (
    HTTPJudge,
    InstructionDataset,
    ModelJudge,
    TokenizedExample,
    collate_instructions,
    extract_response,
    format_input,
    format_response,
    generate_response,
    instruction_dataloader,
    judge_prompt,
    load_instruction_data,
    parse_score,
    save_responses,
    split_instruction_data,
)
from minigpt.model import GPTModel
from minigpt.tokenizer import get_gpt2_tokenizer
from minigpt.training import TrainConfig, train_model

PAD = 50256
INTRO = ("Below is an instruction that describes a task. "
         "Write a response that appropriately completes the request.")


class CharTokenizer:
    """One id per character (its code point): token ids a reader can compute by hand."""

    def encode(self, text, allowed_special=()):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


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


def test_dataset_tokenizes_prompt_and_response_once():
    entry = {"instruction": "Hi", "input": "", "output": "Yo"}
    (example,) = InstructionDataset([entry], CharTokenizer())
    prompt = f"{INTRO}\n\n### Instruction:\nHi"
    assert example.ids == [ord(c) for c in prompt + "\n\n### Response:\nYo"]
    assert example.prompt_length == len(prompt)


# --- data ----------------------------------------------------------------------------------


def test_book_data_splits_935_55_110(data_path):
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


# --- judges --------------------------------------------------------------------------------

ENTRY = {"instruction": "Name a color.", "input": "", "output": "Blue."}


@pytest.mark.parametrize(("reply", "score"), [("85", 85), ("Score: 100.", 100), ("0", 0),
                                              ("I'd say 250", None), ("good", None)])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


class FakeChatServer:
    """A chat endpoint on 127.0.0.1 that records each request and answers ``reply``."""

    def __init__(self, reply: dict):
        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                requests.append((self.path, json.loads(body)))
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def test_openai_compatible_judge_sends_the_rating_prompt_and_parses_the_score():
    reply = {"choices": [{"message": {"role": "assistant", "content": "92"}}]}
    with FakeChatServer(reply) as server:
        judge = HTTPJudge(f"{server.url}/v1/chat/completions", model="judge-model", timeout=5)
        assert judge(ENTRY, "Blue") == 92
    ((path, body),) = server.requests
    assert path == "/v1/chat/completions"
    assert body == {"model": "judge-model", "temperature": 0,
                    "messages": [{"role": "user", "content": judge_prompt(ENTRY, "Blue")}]}
    assert "score the model response `Blue` on a scale from 0 to 100" in body["messages"][0]["content"]


def test_ollama_judge_uses_the_native_chat_format():
    with FakeChatServer({"message": {"role": "assistant", "content": "Score: 40"}}) as server:
        assert HTTPJudge(f"{server.url}/api/chat", model="llama3", timeout=5)(ENTRY, "Red") == 40
    ((path, body),) = server.requests
    assert path == "/api/chat" and body["stream"] is False and body["options"]["temperature"] == 0


def test_unreachable_judge_is_a_connection_error():
    with FakeChatServer({}) as server:
        url = server.url
    with pytest.raises(ConnectionError, match="did not answer"):
        HTTPJudge(f"{url}/api/chat", timeout=2)(ENTRY, "Red")


class FixedLogits(nn.Module):
    """Stands in for a GPTModel: the next-token logits are ``logits`` whatever the prompt."""

    def __init__(self, logits):
        super().__init__()
        self.cfg = GPTConfig(context_length=64, emb_dim=8, n_heads=1, n_layers=1)
        self.logits = logits
        self.device = torch.device("cpu")

    def forward(self, ids):
        return self.logits.expand(ids.shape[0], ids.shape[1], -1)


def test_model_judge_scores_the_probability_weighted_number(data_path):
    tokenizer = get_gpt2_tokenizer()
    logits = torch.full((50257,), -1e4)
    logits[tokenizer.encode("80")] = 5.0  # equally likely: 80 and 90, and nothing else
    logits[tokenizer.encode("90")] = 5.0
    logits[tokenizer.encode("The")] = 50.0  # not a number: ignored
    assert ModelJudge(FixedLogits(logits), tokenizer)(ENTRY, "Blue") == pytest.approx(85.0)


# --- training, answering, the command line -------------------------------------------------


def test_trained_model_answers_its_instructions_and_stops(data_path, tmp_path, one_thread):
    entries = [{"instruction": "Name a primary color.", "input": "", "output": "Red is a primary color."},
               {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."}]
    tokenizer = get_gpt2_tokenizer()
    loader = instruction_dataloader(entries, tokenizer, batch_size=2, shuffle=True)
    model = GPTModel(SMALL)
    config = TrainConfig(max_steps=50, lr=1e-2, min_lr=1e-2, warmup_steps=0, eval_every=50)
    history = train_model(model, loader, loader, config, device="cpu", progress=False)
    assert history.train_losses[-1] < 0.2
    # The answer ends where the model emits <|endoftext|>, which it learned from the one kept pad.
    answers = [generate_response(model, entry, tokenizer, max_new_tokens=20) for entry in entries]
    assert answers == ["Red is a primary color.", "Bonjour."]
    save_responses([{**e, "model_response": a} for e, a in zip(entries, answers)], tmp_path / "r.json", [90, None])
    assert json.loads((tmp_path / "r.json").read_text())[1] == {
        "instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour.",
        "model_response": "Bonjour.", "score": None}


def cli_run(model_dir, out, *extra):
    return main(["finetune", "instruct", "--model", str(model_dir), "--subset", "20", "--epochs", "1",
                 "--lr", "1e-3", "--max-new-tokens", "3", "--output", str(out), "--device", "cpu", *extra])


def test_cli_without_a_judge_says_so_and_reports_loss_and_perplexity(data_path, tmp_path, capsys, one_thread):
    GPTModel(SMALL).save_pretrained(tmp_path / "base")
    assert cli_run(tmp_path / "base", tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "no judge given (--judge-model or --judge-url)" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["examples"] == {"train": 17, "val": 1, "test": 2}
    assert metrics["judge_score"] is None
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))
    assert f"perplexity {metrics['test_perplexity']:,.1f}" in out
    responses = json.loads((tmp_path / "run" / "responses.json").read_text())
    assert [r["output"] for r in responses] == [e["output"] for e in load_instruction_data()[17:19]]
    assert GPTModel.from_pretrained(tmp_path / "run").cfg == SMALL


def test_cli_scores_the_answers_with_an_http_judge(data_path, tmp_path, capsys, one_thread):
    GPTModel(SMALL).save_pretrained(tmp_path / "base")
    with FakeChatServer({"message": {"role": "assistant", "content": "75"}}) as server:
        code = cli_run(tmp_path / "base", tmp_path / "run", "--judge-url", f"{server.url}/api/chat")
    assert code == 0 and len(server.requests) == 2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["judge_score"] == 75
    assert "judge score 75.0 / 100 over 2 of 2 responses" in capsys.readouterr().out


def test_cli_names_the_malformed_entry(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c"}]))
    assert main(["finetune", "instruct", "--model", "tiny", "--data", str(data), "--output", str(tmp_path)]) == 2
    assert "entry 1 has no 'output' field" in capsys.readouterr().err
