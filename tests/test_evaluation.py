"""A/B evaluation: reading golden sets (both formats, bad lines named), the held-out split,
batched answers equal to answering each prompt alone, the win rate and its bootstrap interval
(against the normal approximation), and the report's table, chart and per-prompt rows."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from minigpt.evaluation.comparison import (
    Comparison,
    Decoding,
    answer_prompts,
    golden_from_instructions,
    plot_win_rate,
    read_golden_set,
    report_table,
    result_rows,
    win_rate,
    write_golden_set,
)
from minigpt.evaluation.pairwise import PairVerdict
from minigpt.finetuning.instruction import generate_response, split_instruction_data
from minigpt.models.gpt2.model import GPTModel
from minigpt.tokenizers.gpt2 import PAD_TOKEN_ID, get_gpt2_tokenizer

SMALL = dict(vocab_size=50257, context_length=128, emb_dim=32, n_layers=1, n_heads=2, drop_rate=0.0, qkv_bias=False)
ENTRIES = [{"instruction": "Name a color.", "input": "", "output": "Blue."},
           {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
           {"instruction": "Add two and two.", "input": "", "output": "Four."}]


# --- The golden set ------------------------------------------------------------------------


def test_golden_set_reads_both_formats_and_skips_blank_lines(tmp_path):
    path = tmp_path / "golden.jsonl"
    path.write_text('{"prompt": "Name a color.", "reference": "Blue."}\n\n'
                    '{"instruction": "Translate to French.", "input": "cat", "output": "chat"}\n'
                    '{"instruction": "Add two and two.", "output": "Four."}\n', encoding="utf-8")
    assert read_golden_set(path) == ENTRIES


@pytest.mark.parametrize(("lines", "words"), [
    (['{"prompt": "a", "reference": "b"}', '{"prompt": "a"'], "line 2: not valid JSON"),
    (['{"prompt": "a", "reference": "b"}', "", '{"prompt": "a"}'], "line 3: no reference"),
    (['{"instruction": "a", "input": 3, "output": "b"}'], "line 1: input not a string"),
    (['["a", "b"]'], "line 1: expected a JSON object"),
    (["", " "], "holds no examples")])
def test_a_bad_golden_line_is_named_by_its_number(tmp_path, lines, words):
    path = tmp_path / "golden.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=words):
        read_golden_set(path)


def test_a_missing_golden_set_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt, reference"):
        read_golden_set(tmp_path / "nope.jsonl")


def test_written_golden_sets_read_back(tmp_path):
    write_golden_set(ENTRIES, tmp_path / "g.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert lines[0] == {"prompt": "Name a color.", "reference": "Blue."} and "instruction" in lines[1]
    assert read_golden_set(tmp_path / "g.jsonl") == ENTRIES


def test_the_golden_set_is_the_test_split_fine_tuning_held_out(tmp_path):
    data = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(40)]
    (tmp_path / "data.json").write_text(json.dumps(data))
    assert golden_from_instructions(tmp_path / "data.json") == split_instruction_data(data)[2] == data[34:38]
    assert golden_from_instructions(tmp_path / "data.json", subset=20) == data[17:19]


# --- Answers -------------------------------------------------------------------------------


def test_batched_answers_equal_answering_each_prompt_alone(one_thread):
    tokenizer = get_gpt2_tokenizer()
    model = GPTModel(SMALL).eval()
    batched = answer_prompts(model, ENTRIES, tokenizer, Decoding(max_new_tokens=6, batch_size=2))
    assert batched == [generate_response(model, e, tokenizer, max_new_tokens=6) for e in ENTRIES]


def test_sampled_answers_repeat_with_the_same_seed(one_thread):
    tokenizer, model = get_gpt2_tokenizer(), GPTModel(SMALL).eval()
    decoding = Decoding(max_new_tokens=5, temperature=1.0, seed=7)
    first = answer_prompts(model, ENTRIES, tokenizer, decoding)
    assert answer_prompts(model, ENTRIES, tokenizer, decoding) == first
    assert answer_prompts(model, ENTRIES, tokenizer, Decoding(max_new_tokens=5, temperature=1.0, seed=8)) != first


def test_bad_decoding_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        Decoding(temperature=-1)
    with pytest.raises(ValueError, match="batch_size"):
        Decoding(batch_size=0)


# --- Win rate ------------------------------------------------------------------------------


def test_win_rate_counts_a_tie_as_half():
    w = win_rate(["win", "win", "tie", "loss"])
    assert (w.wins, w.ties, w.losses, w.n) == (2, 1, 1, 4) and w.rate == pytest.approx(2.5 / 4)
    assert w.low <= w.rate <= w.high


def test_unanimous_outcomes_have_no_spread():
    w = win_rate(["win"] * 10)
    assert (w.rate, w.low, w.high) == (1.0, 1.0, 1.0)


def test_the_bootstrap_interval_agrees_with_the_normal_approximation():
    """400 prompts, half won, half lost: standard error 0.5 / sqrt(400) = 0.025, so the 95 %
    interval is 0.5 +- 1.96 * 0.025 = 0.451 .. 0.549."""
    w = win_rate(["win", "loss"] * 200)
    half_width = 1.959964 * 0.5 / math.sqrt(400)
    assert w.low == pytest.approx(0.5 - half_width, abs=0.004) and w.high == pytest.approx(0.5 + half_width, abs=0.004)
    assert win_rate(["win", "loss"] * 200, confidence=0.5).high < w.high


def test_the_interval_equals_resampling_the_prompts_themselves():
    """Drawing counts from the multinomial is drawing prompts with replacement, summarised."""
    outcomes = ["win"] * 13 + ["tie"] * 5 + ["loss"] * 7
    values = np.array([{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in outcomes])
    draws = np.random.default_rng(1).integers(0, len(values), size=(20_000, len(values)))
    low, high = np.quantile(values[draws].mean(axis=1), [0.025, 0.975])
    w = win_rate(outcomes, resamples=20_000)
    assert w.rate == pytest.approx(15.5 / 25) and w.low == pytest.approx(low, abs=0.021)
    assert w.high == pytest.approx(high, abs=0.021)


def test_win_rate_needs_outcomes():
    with pytest.raises(ValueError, match="one judged prompt"):
        win_rate([])


# --- The report ----------------------------------------------------------------------------


def comparison() -> Comparison:
    verdicts = [PairVerdict("win", "A", "B"), PairVerdict("tie", "A", "A"), PairVerdict("loss", "B", "A")]
    return Comparison("gpt2", "runs/instruct", "ROUGE-L overlap", ENTRIES, ["Red.", "chien", "Five, I think."],
                      ["Blue.", "chat", "Four."], verdicts, [10.0, None, 30.0], [90.0, 80.0, 70.0],
                      {"text": "wikitext2", "base": 30.0, "candidate": 33.0})


def test_report_table_shows_counts_rate_scores_lengths_and_perplexity():
    table = report_table(comparison())
    assert "| ROUGE-L overlap | 3 | 1 | 1 | 1 | 0.500 (" in table
    assert "| base | gpt2 | 20.0 | 1.7 | 0% | 30.00 |" in table  # scores 10 and 30 (one missing); 5 words / 3
    assert "| candidate | runs/instruct | 80.0 | 1.0 | 0% | 33.00 |" in table
    assert "perplexity (wikitext2)" in table


def test_report_table_shows_the_share_of_degenerate_answers_and_what_the_judge_cannot_see():
    c = dataclasses.replace(comparison(), judge_limits="it cannot see whether an answer is right")
    c.base_answers = ["", "chien", "Add two and two."]  # empty, fine, the prompt echoed
    c.candidate_answers = ["Blue blue is blue blue is.", "chat", "Four."]  # a loop, fine, fine
    table = report_table(c)
    assert "| degenerate answers |" in table
    assert "| base | gpt2 | 20.0 | 1.7 | 67% | 30.00 |" in table
    assert "| candidate | runs/instruct | 80.0 | 2.7 | 33% | 33.00 |" in table
    assert "Judged by ROUGE-L overlap: it cannot see whether an answer is right." in table


def test_result_rows_keep_both_answers_and_every_verdict():
    rows = result_rows(comparison())
    assert rows[1]["base_answer"] == "chien" and rows[1]["candidate_answer"] == "chat"
    assert (rows[1]["verdict_candidate_as_A"], rows[1]["verdict_candidate_as_B"], rows[1]["outcome"]) == \
        ("A", "A", "tie")
    assert rows[0]["reference"] == "Blue." and "Name a color." in rows[0]["prompt"]
    assert rows[1]["base_score"] is None and rows[2]["candidate_score"] == 70.0


def test_win_rate_chart_is_a_png(tmp_path):
    plot_win_rate(comparison(), tmp_path / "w.png")
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_answer_ends_before_the_end_of_text(one_thread):
    """A head that always prefers end-of-text (a bias on its id): every answer is empty."""
    model = GPTModel(SMALL).eval()
    model.out_head = torch.nn.Linear(SMALL["emb_dim"], SMALL["vocab_size"])
    with torch.no_grad():
        model.out_head.weight.zero_()
        model.out_head.bias.zero_()
        model.out_head.bias[PAD_TOKEN_ID] = 1.0
    assert answer_prompts(model, ENTRIES, get_gpt2_tokenizer(), Decoding(max_new_tokens=3)) == ["", "", ""]
