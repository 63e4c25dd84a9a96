"""The compare job end to end, offline: two small models answer a golden set, the overlap
judge (and a fake OpenAI-compatible judge on 127.0.0.1 that always prefers position A)
decides, both perplexities are measured, and every report file is written."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from test_pairwise import chat_server

from minigpt.cli import compare as compare_command
from minigpt.cli import eval as eval_command
from minigpt.evaluation.comparison import write_golden_set
from minigpt.evaluation.pairwise import ModelPairJudge, judge_both_orders
from minigpt.evaluation.perplexity import sliding_window_perplexity
from minigpt.jobs.compare import CompareConfig, chat_endpoint, compare, judge_backend
from minigpt.jobs.evaluate import EvalConfig, evaluate_perplexity
from minigpt.lora.adapters import apply_lora, merge_lora
from minigpt.lora.files import save_lora
from minigpt.models.gpt2.model import GPTModel
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer

SMALL = dict(vocab_size=50257, context_length=128, emb_dim=32, n_layers=1, n_heads=2, drop_rate=0.0, qkv_bias=False)
ENTRIES = [{"instruction": "Name a color.", "input": "", "output": "Blue."},
           {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
           {"instruction": "Add two and two.", "input": "", "output": "Four."}]
DATA_FILES = ("wikitext2/wiki.test.tokens.txt",)  # the one test that reads real data asks for it
TEXT = "It was a bright cold day in April, and the clocks were striking thirteen. " * 20


@pytest.fixture
def setup(tmp_path):
    """A golden set, a short general text and two saved models of one shape, different weights."""
    write_golden_set(ENTRIES, tmp_path / "golden.jsonl")
    (tmp_path / "text.txt").write_text(TEXT)
    for name, seed in (("base", 1), ("candidate", 2)):
        torch.manual_seed(seed)
        GPTModel(SMALL).save_pretrained(tmp_path / name)
    return tmp_path


def settings(tmp_path, **changes) -> CompareConfig:
    values = dict(base=str(tmp_path / "base"), candidate=str(tmp_path / "candidate"),
                  golden=str(tmp_path / "golden.jsonl"), perplexity_text=str(tmp_path / "text.txt"),
                  max_new_tokens=6, batch_size=2, output=str(tmp_path / "out"), device="cpu")
    return CompareConfig(**{**values, **changes})


def test_compare_with_the_overlap_judge_writes_the_whole_report(setup, one_thread):
    result = compare(settings(setup, score=True), progress=False)
    c, out = result.comparison, setup / "out"
    assert c.win.n == 3 and c.win.wins + c.win.ties + c.win.losses == 3
    rows = [json.loads(line) for line in (out / "comparison.jsonl").read_text().splitlines()]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["candidate_answer"] for r in rows] == [a["candidate_answer"] for a in answers] == c.candidate_answers
    assert [r["outcome"] for r in rows] == [v.outcome for v in c.verdicts]
    assert all(r["base_score"] is not None for r in rows)
    tokens = get_gpt2_tokenizer().encode(TEXT)
    for role in ("base", "candidate"):
        model = GPTModel.from_pretrained(setup / role)
        assert c.perplexity[role] == pytest.approx(sliding_window_perplexity(model, tokens).perplexity, rel=1e-6)
    assert (out / "report.md").read_text() == result.report
    assert "| ROUGE-L overlap (margin 0.02) | 3 |" in result.report and "perplexity on " in result.report
    assert (out / "win_rate.png").is_file() and json.loads((out / "report.json").read_text())["win_rate"]["wins"] == \
        c.win.wins


def test_a_model_compared_with_itself_ties_everywhere(setup, one_thread):
    c = compare(settings(setup, candidate=str(setup / "base"), perplexity=False), progress=False).comparison
    assert c.base_answers == c.candidate_answers and c.win.ties == 3 and c.win.rate == 0.5
    assert c.perplexity is None


def test_an_adapter_on_the_base_is_the_candidate(setup, one_thread):
    model = GPTModel.from_pretrained(setup / "base")
    apply_lora(model, rank=2, alpha=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(0, 0.5)
    save_lora(model, setup / "adapter.safetensors")
    merged = merge_lora(model)
    c = compare(settings(setup, candidate=None, adapter=str(setup / "adapter.safetensors")), progress=False).comparison
    ids = get_gpt2_tokenizer().encode(TEXT)
    assert c.perplexity["candidate"] == pytest.approx(sliding_window_perplexity(merged, ids).perplexity, rel=1e-5)
    assert c.perplexity["base"] != pytest.approx(c.perplexity["candidate"])


@pytest.mark.parametrize(("kind", "path"), [("openai", "/v1/chat/completions"), ("ollama", "/api/chat")])
def test_a_judge_preferring_position_a_makes_every_verdict_a_tie(setup, http_server, only_localhost, monkeypatch,
                                                                 kind, path):
    server = chat_server(http_server, lambda a, b: "A", ollama=kind == "ollama")
    monkeypatch.setenv("JUDGE_KEY", "s3cret")
    result = compare(settings(setup, judge=f"{kind}:{server.base_url}", judge_model="big", api_key_env="JUDGE_KEY",
                              perplexity=False), progress=False)
    w = result.comparison.win
    assert (w.wins, w.ties, w.losses, w.rate) == (0, 3, 0, 0.5)
    assert server.requests == [("POST", path)] * 7  # the check that it answers, then two orders per prompt
    assert server.keys == ["Bearer s3cret"] * 7 and {b["model"] for b in server.bodies} == {"big"}
    assert f"big at {server.base_url}{path}" in result.report


@pytest.fixture
def no_answers(monkeypatch):
    """compare fails the test if a model starts answering."""
    monkeypatch.setattr("minigpt.jobs.compare.answer_prompts",
                        lambda *args, **kwargs: pytest.fail("a model answered before every input was checked"))


@pytest.mark.parametrize(("change", "error", "words"), [
    ({"perplexity_text": "missing.txt"}, (FileNotFoundError, ValueError), "missing.txt"),
    ({"golden": "missing.jsonl"}, FileNotFoundError, "no golden set at missing.jsonl"),
    ({"candidate": "runs/does-not-exist"}, FileNotFoundError, "runs/does-not-exist not found"),
    ({"adapter": "missing.safetensors"}, FileNotFoundError, "adapter missing.safetensors not found"),
    ({"judge": "openai:http://127.0.0.1:9/v1"}, ConnectionError, "did not answer"),  # port 9: nothing listens
])
def test_every_input_is_checked_before_any_model_answers(setup, no_answers, change, error, words, monkeypatch):
    monkeypatch.chdir(setup)
    with pytest.raises(error, match=words):
        compare(settings(setup, **change), progress=False)
    assert not (setup / "out").exists()


def test_a_failure_after_judging_leaves_the_report_of_what_was_done(setup, one_thread, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("minigpt.jobs.compare.sliding_window_perplexity", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        compare(settings(setup), progress=False)
    report = (setup / "out" / "report.md").read_text()
    assert "| judge | prompts | wins | ties | losses |" in report  # the win rate was measured and is kept
    assert "compare stopped while measuring perplexity: RuntimeError('out of memory')" in report
    assert (setup / "out" / "answers.jsonl").is_file() and (setup / "out" / "win_rate.png").is_file()


def test_the_report_says_which_judge_ran_and_what_it_cannot_see(setup, one_thread):
    report = compare(settings(setup, perplexity=False), progress=False).report
    assert "Judged by ROUGE-L overlap (margin 0.02): the overlap judge counts the words" in report
    assert "cannot see whether an answer is right" in report and "| degenerate answers |" in report


def test_a_minigpt_model_can_judge(setup, one_thread):
    """The candidate judging itself against the base: verdicts from its P(A) and P(B), in both orders."""
    result = compare(settings(setup, judge=f"minigpt:{setup / 'candidate'}", score=True, perplexity=False),
                     progress=False)
    c = result.comparison
    judge = ModelPairJudge(GPTModel.from_pretrained(setup / "candidate"), get_gpt2_tokenizer())
    expected = [judge_both_orders(judge, e, cand, base) for e, cand, base in
                zip(c.entries, c.candidate_answers, c.base_answers, strict=True)]
    assert c.verdicts == expected and all(0 <= s <= 100 for s in c.candidate_scores)


def test_judge_settings_and_endpoints():
    assert judge_backend("minigpt:runs/judge") == ("minigpt", "runs/judge")
    assert chat_endpoint("openai", "http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_endpoint("openai", "http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_endpoint("ollama", "http://localhost:11434") == "http://localhost:11434/api/chat"
    with pytest.raises(ValueError, match="unknown judge 'gpt4'"):
        judge_backend("gpt4")
    with pytest.raises(ValueError, match="candidate .* or adapter"):
        compare(CompareConfig(base="gpt2"))


def test_eval_perplexity_of_a_text_file_is_the_sliding_window_perplexity(setup, one_thread):
    result = evaluate_perplexity(EvalConfig(checkpoint=str(setup / "base"), perplexity=str(setup / "text.txt"),
                                            stride=32, max_tokens=200, device="cpu"), progress=False)
    ids = get_gpt2_tokenizer().encode(TEXT)[:200]
    expected = sliding_window_perplexity(GPTModel.from_pretrained(setup / "base"), ids, stride=32)
    assert result == expected and result.tokens == 199 and result.stride == 32


def test_eval_perplexity_reads_wikitext2(setup, data_dir, one_thread):
    result = evaluate_perplexity(EvalConfig(checkpoint=str(setup / "base"), perplexity="wikitext2",
                                            max_tokens=300, device="cpu"), progress=False)
    assert result.tokens == 299 and result.perplexity > 1000  # random weights: near the vocabulary size


def command_line(module, argv: list[str]) -> int:
    """Parse ``argv`` with the command module's options and run it (as ``minigpt <command>`` does)."""
    parser, flags = argparse.ArgumentParser(), {}
    module.add(parser, flags)
    return module.run(parser.parse_args(argv))


def test_the_compare_command_prints_the_report(setup, one_thread, capsys):
    assert command_line(compare_command, [
        "--base", str(setup / "base"), "--candidate", str(setup / "candidate"), "--golden", str(setup / "golden.jsonl"),
        "--judge", "overlap", "--limit", "2", "--max-new-tokens", "4", "--perplexity-text", str(setup / "text.txt"),
        "--output", str(setup / "out"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| ROUGE-L overlap (margin 0.02) | 2 |" in out and "perplexity on " in out
    assert len((setup / "out" / "comparison.jsonl").read_text().splitlines()) == 2


def test_the_eval_command_measures_a_texts_perplexity(setup, one_thread, capsys):
    assert command_line(eval_command, ["--checkpoint", str(setup / "base"), "--perplexity", str(setup / "text.txt"),
                                       "--stride", "16", "--device", "cpu"]) == 0
    ids = get_gpt2_tokenizer().encode(TEXT)
    expected = sliding_window_perplexity(GPTModel.from_pretrained(setup / "base"), ids, stride=16)
    assert f"stride 16): loss {expected.loss:.4f}, perplexity {expected.perplexity:,.2f}" in capsys.readouterr().out


def test_eval_perplexity_loads_the_weights_quantized_when_asked(setup, one_thread):
    """int8 weights (one scale per row) change the perplexity a little, not much."""
    settings = dict(checkpoint=str(setup / "base"), perplexity=str(setup / "text.txt"), device="cpu")
    full = evaluate_perplexity(EvalConfig(**settings), progress=False)
    int8 = evaluate_perplexity(EvalConfig(**settings, quantize="int8"), progress=False)
    assert int8.perplexity != full.perplexity and int8.perplexity == pytest.approx(full.perplexity, rel=1e-2)
    with pytest.raises(ValueError, match="unknown quantization scheme .int3.; choose one of nf4, nf4-dq, int8, int4"):
        EvalConfig(checkpoint="gpt2", quantize="int3")
