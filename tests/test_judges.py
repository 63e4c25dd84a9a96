"""Judges: the book's rating prompt, reading a score from a reply, the two HTTP chat formats
(against a chat endpoint on 127.0.0.1), and a model's probability-weighted score."""

import json

import pytest
import torch
from conftest import QuietHandler
from torch import nn

from minigpt.evaluation.judges import HTTPJudge, ModelJudge, judge_prompt, judge_responses, parse_score
from minigpt.finetuning.prompt_format import format_input
from minigpt.models.gpt2.config import GPTConfig
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer

ENTRY = {"instruction": "Name a color.", "input": "", "output": "Blue."}


def chat_server(http_server, reply: dict):
    """A chat endpoint that records each request's JSON body (``server.bodies``) and answers ``reply``."""
    bodies = []

    class ChatHandler(QuietHandler):
        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_json(reply)

    server = http_server(ChatHandler)
    server.bodies = bodies
    return server


@pytest.mark.parametrize(("reply", "score"), [("85", 85), ("Score: 100.", 100), ("0", 0),
                                              ("I'd say 250", None), ("good", None)])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_judge_prompt_is_the_books_request():
    assert judge_prompt(ENTRY, "Blue") == (
        f"Given the input `{format_input(ENTRY)}` and correct output `Blue.`, score the model response "
        "`Blue` on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
    )


def test_openai_compatible_judge_sends_the_rating_prompt_and_parses_the_score(http_server, only_localhost):
    server = chat_server(http_server, {"choices": [{"message": {"role": "assistant", "content": "92"}}]})
    judge = HTTPJudge(server.url("/v1/chat/completions"), model="judge-model", timeout=5)
    assert judge(ENTRY, "Blue") == 92
    assert server.requests == [("POST", "/v1/chat/completions")]
    (body,) = server.bodies
    assert body == {"model": "judge-model", "temperature": 0,
                    "messages": [{"role": "user", "content": judge_prompt(ENTRY, "Blue")}]}
    assert "score the model response `Blue` on a scale from 0 to 100" in body["messages"][0]["content"]


def test_ollama_judge_uses_the_native_chat_format(http_server, only_localhost):
    server = chat_server(http_server, {"message": {"role": "assistant", "content": "Score: 40"}})
    assert HTTPJudge(server.url("/api/chat"), model="llama3", timeout=5)(ENTRY, "Red") == 40
    assert server.requests == [("POST", "/api/chat")]
    (body,) = server.bodies
    assert body["stream"] is False and body["options"]["temperature"] == 0


def test_api_key_is_sent_as_a_bearer_token(http_server, only_localhost):
    seen = []

    class KeyHandler(QuietHandler):
        def do_POST(self):
            seen.append(self.headers["Authorization"])
            data = json.dumps({"message": {"content": "7"}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = http_server(KeyHandler)
    assert HTTPJudge(server.url("/api/chat"), api_key="secret", timeout=5)(ENTRY, "Red") == 7
    assert seen == ["Bearer secret"]


def test_unexpected_reply_is_named(http_server, only_localhost):
    server = chat_server(http_server, {"answer": "42"})
    with pytest.raises(ValueError, match="unexpected reply from the judge"):
        HTTPJudge(server.url("/api/chat"), timeout=5)(ENTRY, "Red")


def test_unreachable_judge_is_a_connection_error(http_server, only_localhost):
    server = chat_server(http_server, {})
    url = server.url("/api/chat")
    server.shutdown()
    server.server_close()
    with pytest.raises(ConnectionError, match="did not answer"):
        HTTPJudge(url, timeout=2)(ENTRY, "Red")


def test_judge_responses_scores_each_response(http_server, only_localhost):
    server = chat_server(http_server, {"message": {"role": "assistant", "content": "75"}})
    responses = [{**ENTRY, "model_response": "Blue"}, {**ENTRY, "model_response": "Green"}]
    assert judge_responses(responses, HTTPJudge(server.url("/api/chat"), timeout=5), progress=False) == [75, 75]
    assert [body["messages"][0]["content"] for body in server.bodies] == [
        judge_prompt(ENTRY, "Blue"), judge_prompt(ENTRY, "Green")]


class FixedLogits(nn.Module):
    """Stands in for a GPTModel: the next-token logits are ``logits`` whatever the prompt."""

    def __init__(self, logits):
        super().__init__()
        self.cfg = GPTConfig(context_length=64, emb_dim=8, n_heads=1, n_layers=1)
        self.logits = logits
        self.device = torch.device("cpu")
        self.modes = []  # the mode of each forward pass

    def forward(self, ids):
        self.modes.append(self.training)
        return self.logits.expand(ids.shape[0], ids.shape[1], -1)


def test_model_judge_scores_the_probability_weighted_number():
    tokenizer = get_gpt2_tokenizer()
    logits = torch.full((50257,), -1e4)
    logits[tokenizer.encode("80")] = 5.0  # equally likely: 80 and 90, and nothing else
    logits[tokenizer.encode("90")] = 5.0
    logits[tokenizer.encode("The")] = 50.0  # not a number: ignored
    model = FixedLogits(logits)
    assert ModelJudge(model, tokenizer)(ENTRY, "Blue") == pytest.approx(85.0)
    # Judged in eval mode (no dropout); the model's training mode comes back afterwards.
    assert model.modes == [False] and model.training
