"""Pairwise judges: ROUGE-L (by hand and against the rouge-score package), reading a verdict,
the order swap that turns a position-biased judge's verdicts into ties, and each backend:
an OpenAI-compatible and an Ollama chat endpoint on 127.0.0.1, a minigpt model, the overlap judge."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import QuietHandler
from torch import nn

from minigpt.evaluation.pairwise import (
    ChatPairJudge,
    ModelPairJudge,
    OverlapJudge,
    degenerate,
    judge_both_orders,
    pairwise_prompt,
    parse_verdict,
)
from minigpt.evaluation.rouge import lcs_length, rouge_l, words
from minigpt.models.gpt2.model import GPTModel
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer

ENTRY = {"instruction": "Name the capital of France.", "input": "", "output": "The capital of France is Paris."}
GOOD, BAD = "Paris is the capital of France.", "I like turtles."
SMALL = dict(vocab_size=50257, context_length=256, emb_dim=32, n_layers=1, n_heads=2, drop_rate=0.0, qkv_bias=False)


# --- ROUGE-L -------------------------------------------------------------------------------


def test_lcs_by_hand():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (BCBA)
    assert lcs_length([], ["a"]) == 0 and lcs_length(["a", "b"], ["a", "b"]) == 2


def test_rouge_l_by_hand():
    # 6 words each; the longest common subsequence is "the capital of france" (Paris comes first in one)
    precision, recall, f1 = rouge_l(GOOD, ENTRY["output"])
    assert (precision, recall) == (4 / 6, 4 / 6) and f1 == pytest.approx(4 / 6)
    assert rouge_l(BAD, ENTRY["output"]).f1 == 0.0 and rouge_l("", "x") == (0.0, 0.0, 0.0)
    assert words("Hello, World! It's 42.") == ["hello", "world", "it", "s", "42"]


@pytest.mark.parametrize(("answer", "reference"), [
    (GOOD, ENTRY["output"]), ("the cat sat on the mat", "the cat is on the mat today"),
    ("A B C D E F", "f e d c b a"), ("one two three, four five", "one three five seven"), ("x", "y z")])
def test_rouge_l_equals_the_rouge_score_package(answer, reference):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="the reference implementation")
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(reference, answer)["rougeL"]
    assert rouge_l(answer, reference) == pytest.approx((expected.precision, expected.recall, expected.fmeasure))


# --- Verdicts and the order swap -----------------------------------------------------------


@pytest.mark.parametrize(("reply", "verdict"), [
    ("A", "A"), ("B.", "B"), ("Response B is better", "B"), ("tie", "tie"), ("It's a TIE", "tie"),
    ("a better answer is B", "B"), ("no idea", "tie"), ("**A**", "A")])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def first_position(entry, answer_a, answer_b):
    return "A"


def test_a_judge_that_prefers_position_a_gives_only_ties():
    verdict = judge_both_orders(first_position, ENTRY, GOOD, BAD)
    assert verdict == ("tie", "A", "A")


SHEEP = {"instruction": "What is the plural of sheep?", "input": "", "output": "The plural of sheep is sheep."}


@pytest.mark.parametrize(("entry", "answer", "kind"), [
    (SHEEP, "", "empty"), (SHEEP, "...", "empty"),
    (SHEEP, "The plural is sheep is sheep.", "repetition"),
    ({"instruction": "Summarize the task.", "input": "", "output": "Write a summary."},
     "that the task that the task that the task", "repetition"),
    (SHEEP, "What is the plural of sheep?", "echo"),
    (SHEEP, "The plural of sheep is sheep.", None), (SHEEP, "Sheep.", None),
    (ENTRY, GOOD, None), (ENTRY, "Very very good.", None),  # one word twice is English, not a loop
    ({"instruction": "Repeat the word hello.", "input": "", "output": "Repeat the word hello."},
     "Repeat the word hello.", None),  # the reference itself repeats the prompt: no echo
])
def test_degenerate_answers_are_named(entry, answer, kind):
    assert degenerate(entry, answer) == kind


def test_the_overlap_judge_scores_junk_as_a_loss():
    # Both answers came from a model that learned the reference's words but not to stop: ROUGE-L
    # alone prefers them to an empty base answer, or even to a correct answer in other words.
    judge = OverlapJudge()
    assert judge_both_orders(judge, SHEEP, "The plural is sheep is sheep.", "") == ("tie", "tie", "tie")
    assert judge_both_orders(judge, SHEEP, "The plural is sheep is sheep.", "Sheep.") == ("loss", "B", "A")
    assert judge_both_orders(judge, SHEEP, "What is the plural of sheep?", "Sheep.") == ("loss", "B", "A")
    assert judge_both_orders(judge, SHEEP, "Sheep.", "") == ("win", "A", "B")
    assert judge.score(SHEEP, "The plural is sheep is sheep.") == 0.0
    assert judge.score(SHEEP, "The plural of sheep is sheep.") == 100.0
    assert "cannot see whether an answer is right" in OverlapJudge.LIMITS


def test_a_consistent_judge_decides_both_ways():
    judge = OverlapJudge()
    assert judge_both_orders(judge, ENTRY, GOOD, BAD) == ("win", "A", "B")
    assert judge_both_orders(judge, ENTRY, BAD, GOOD) == ("loss", "B", "A")
    assert judge_both_orders(judge, ENTRY, GOOD, GOOD) == ("tie", "tie", "tie")


def test_overlap_judge_ties_within_the_margin():
    close = "The capital of France is Paris, of course."  # P 6/8, R 6/6: F1 6/7 = 0.857, the reference's 1
    assert OverlapJudge(margin=0.15)(ENTRY, close, ENTRY["output"]) == "tie"
    assert OverlapJudge(margin=0.14)(ENTRY, close, ENTRY["output"]) == "B"
    assert OverlapJudge().score(ENTRY, ENTRY["output"]) == 100
    with pytest.raises(ValueError, match="margin"):
        OverlapJudge(margin=1.5)


# --- Chat endpoints on 127.0.0.1 -----------------------------------------------------------


def chat_server(http_server, choose, ollama=False):
    """A chat endpoint answering each comparison request with ``choose(answer_a, answer_b)``;
    the request bodies and headers are kept in ``server.bodies`` / ``server.keys``."""
    bodies, keys = [], []

    class ChatHandler(QuietHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(body)
            keys.append(self.headers.get("Authorization"))
            prompt = body["messages"][0]["content"]
            if "Response A: `" in prompt:
                a = prompt.split("Response A: `")[1].split("`")[0]
                b = prompt.split("Response B: `")[1].split("`")[0]
                content = choose(a, b)
            else:  # compare's check that the judge answers
                content = "ready"
            message = {"role": "assistant", "content": content}
            self.send_json({"message": message} if ollama else {"choices": [{"message": message}]})

    server = http_server(ChatHandler)
    server.bodies, server.keys = bodies, keys
    return server


def test_openai_compatible_judge_that_always_says_a_gives_only_ties(http_server, only_localhost):
    server = chat_server(http_server, lambda a, b: "A")
    judge = ChatPairJudge(server.url("/v1/chat/completions"), model="judge-model", api_key="k3y", timeout=5)
    assert judge_both_orders(judge, ENTRY, GOOD, BAD) == ("tie", "A", "A")
    first, second = server.bodies
    assert first == {"model": "judge-model", "temperature": 0,
                     "messages": [{"role": "user", "content": pairwise_prompt(ENTRY, GOOD, BAD)}]}
    assert second["messages"][0]["content"] == pairwise_prompt(ENTRY, BAD, GOOD)  # the order swapped
    assert server.keys == ["Bearer k3y", "Bearer k3y"]
    assert "Paris" in first["messages"][0]["content"] and "correct output" in first["messages"][0]["content"]


def test_openai_compatible_judge_that_reads_the_answers_decides(http_server, only_localhost):
    server = chat_server(http_server, lambda a, b: "The better one is A." if "Paris" in a else "B")
    judge = ChatPairJudge(server.url("/v1/chat/completions"), timeout=5)
    assert judge_both_orders(judge, ENTRY, GOOD, BAD).outcome == "win"
    assert judge_both_orders(judge, ENTRY, BAD, GOOD).outcome == "loss"


def test_ollama_judge_uses_the_native_chat_format(http_server, only_localhost):
    server = chat_server(http_server, lambda a, b: "B", ollama=True)
    judge = ChatPairJudge(server.url("/api/chat"), model="llama3", timeout=5)
    assert judge(ENTRY, GOOD, BAD) == "B"
    (body,) = server.bodies
    assert body["stream"] is False and body["options"]["temperature"] == 0 and body["model"] == "llama3"
    assert server.requests == [("POST", "/api/chat")] and server.keys == [None]


# --- A minigpt model as the judge -----------------------------------------------------------


def test_model_judge_compares_the_next_token_probabilities_of_a_and_b():
    """A head whose only non-zero number is a bias of 1 on the token "A": P(A) = e / (1 + e)."""
    tokenizer = get_gpt2_tokenizer()
    model = GPTModel(SMALL)
    model.out_head = nn.Linear(SMALL["emb_dim"], SMALL["vocab_size"])
    with torch.no_grad():
        model.out_head.weight.zero_()
        model.out_head.bias.zero_()
    judge = ModelPairJudge(model, tokenizer)
    assert judge(ENTRY, GOOD, BAD) == "tie"
    a_id, b_id = tokenizer.encode("A"), tokenizer.encode("B")
    assert judge.choice_ids == a_id + b_id
    with torch.no_grad():
        model.out_head.bias[a_id[0]] = 1.0
    p_a, p_b = judge.probabilities(ENTRY, GOOD, BAD)
    assert p_a == pytest.approx(math.e / (1 + math.e)) and p_a + p_b == pytest.approx(1.0)
    assert judge_both_orders(judge, ENTRY, GOOD, BAD).outcome == "tie"  # it always says A
