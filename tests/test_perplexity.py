"""Sliding-window perplexity: transformers' documented method, run on a transformers GPT-2
with the same weights (exported with ``export_hf``), gives the same perplexity; the
windows cover every token once; hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from minigpt.evaluation.perplexity import sliding_window_perplexity, sliding_windows
from minigpt.models.gpt2.hf_layout import export_hf
from minigpt.models.gpt2.model import GPTModel

SMALL = dict(vocab_size=97, context_length=32, emb_dim=32, n_layers=2, n_heads=2, drop_rate=0.0, qkv_bias=True)


def hf_perplexity(hf_model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """The loop of transformers' "Perplexity of fixed-length models" guide, with each
    window's mean loss weighted by the labels it really scores (the shift drops a label
    only where no earlier token precedes it: in the first window)."""
    seq_len = ids.shape[1]
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(input_ids, labels=target_ids).loss
        scored = int((target_ids[:, 1:] != -100).sum())
        if scored:  # a one-token window has no label: its mean loss is NaN, and it counts nothing
            nll_sum += loss.item() * scored
        n_tokens += scored
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="the reference implementation")
    torch.manual_seed(3)
    model = GPTModel(SMALL).eval()
    with torch.no_grad():  # larger weights than the initialisation, so tokens differ in surprise
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    directory = export_hf(model, tmp_path_factory.mktemp("hf"))
    return model, transformers.GPT2LMHeadModel.from_pretrained(directory).eval()


@pytest.mark.parametrize(("length", "max_length", "stride"), [
    (200, 32, 16), (200, 32, 32), (201, 32, 7), (150, 20, 1), (25, 32, 16), (64, 32, 32)])
def test_equals_transformers_on_the_same_weights(models, one_thread, length, max_length, stride):
    model, hf_model = models
    ids = torch.randint(0, SMALL["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))
    ours = sliding_window_perplexity(model, ids[0], context_length=max_length, stride=stride, batch_size=3)
    reference = hf_perplexity(hf_model, ids, max_length, stride)
    assert ours.perplexity == pytest.approx(reference, rel=1e-4)
    unscored = ours.windows if stride == max_length else 1  # each window's first token, or the text's
    assert ours.tokens == length - unscored and ours.stride == stride and ours.context_length == max_length


@pytest.mark.parametrize("length", [65, 97])
def test_a_last_window_of_one_token_scores_nothing(models, one_thread, length):
    # k * context + 1 tokens with stride == context: the last window holds the one token left
    model, hf_model = models
    ids = torch.randint(0, SMALL["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))
    ours = sliding_window_perplexity(model, ids[0], context_length=32, stride=32)
    assert ours.perplexity == pytest.approx(hf_perplexity(hf_model, ids, 32, 32), rel=1e-4)
    assert ours.windows == length // 32 and ours.tokens == length - ours.windows - 1


def test_disjoint_windows_leave_each_windows_first_token_unscored(models, one_thread):
    model, _ = models
    ids = torch.randint(0, SMALL["vocab_size"], (16,)).repeat(8)  # 128 tokens, period 16
    disjoint = sliding_window_perplexity(model, ids, context_length=16, stride=16)
    overlapping = sliding_window_perplexity(model, ids, context_length=16, stride=1)
    assert disjoint.windows == 8 and overlapping.windows == 128 - 16 + 1
    assert disjoint.tokens == 128 - 8 and overlapping.tokens == 127


@pytest.mark.parametrize(("num_tokens", "context", "stride"), [(10, 4, 2), (10, 4, 4), (11, 4, 3), (3, 4, 2)])
def test_windows_score_every_token_once(num_tokens, context, stride):
    windows = sliding_windows(num_tokens, context, stride)
    scored = [t for begin, end, new in windows for t in range(end - new, end)]
    assert scored == list(range(num_tokens))
    assert all(end - begin <= context for begin, end, _ in windows) and windows[-1][1] == num_tokens


def test_windows_by_hand():
    assert sliding_windows(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert sliding_windows(10, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity():
    model = GPTModel(SMALL)
    with torch.no_grad():
        model.out_head.weight.zero_()  # every logit 0: each token has probability 1/97
    result = sliding_window_perplexity(model, list(range(50)), stride=5)
    assert result.perplexity == pytest.approx(SMALL["vocab_size"], rel=1e-5)
    assert result.loss == pytest.approx(math.log(SMALL["vocab_size"]), rel=1e-6)


@pytest.mark.parametrize(("kwargs", "words"), [
    (dict(stride=33), "stride must be in [1, 32]"), (dict(context_length=64), "context_length must be in [2, 32]"),
    (dict(ids=[5]), "needs two at least")])
def test_bad_settings_say_what_to_change(kwargs, words):
    ids = kwargs.pop("ids", list(range(40)))
    with pytest.raises(ValueError, match=words.replace("[", r"\[")):
        sliding_window_perplexity(GPTModel(SMALL), ids, **kwargs)
