"""Sliding-window dataset and dataloader, checked against the book's chapter 2 numbers."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minigpt.data.windows import GPTDataset, create_dataloader, tokenize
from minigpt.io.files import PACKAGE_DATA_DIR
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer


@pytest.fixture(scope="module")
def verdict() -> str:
    """The book's text, as shipped with minigpt."""
    return (PACKAGE_DATA_DIR / "the-verdict.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def gpt2():
    """GPT-2's encoding as shipped (test_tokenizer.py checks it against tiktoken's own files);
    the ids below are the book's."""
    return get_gpt2_tokenizer()


def book_windows(ids, max_length, stride):
    """The book's GPTDatasetV1 loop, as the reference for which windows exist."""
    inputs, targets = [], []
    for i in range(0, len(ids) - max_length, stride):
        inputs.append(ids[i : i + max_length])
        targets.append(ids[i + 1 : i + max_length + 1])
    return inputs, targets


def test_the_verdict_has_the_books_5145_tokens(gpt2, verdict):
    ids = tokenize(verdict, gpt2)
    assert len(ids) == 5145
    assert ids[:4] == [40, 367, 2885, 1464]


def test_tokenize_turns_endoftext_into_its_id(gpt2):
    # The reference ids from the data folder's README (tiktoken's GPT-2 encoding).
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    assert tokenize(text, gpt2) == [
        15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554,
        262, 4252, 18250, 8812, 2114, 286, 617, 34680, 27271, 13,
    ]


def test_first_batches_with_stride_1_match_the_book(gpt2, verdict):
    loader = create_dataloader(verdict, batch_size=1, max_length=4, stride=1, shuffle=False, tokenizer=gpt2)
    batches = iter(loader)
    inputs, targets = next(batches)
    assert inputs.tolist() == [[40, 367, 2885, 1464]]
    assert targets.tolist() == [[367, 2885, 1464, 1807]]
    inputs, targets = next(batches)
    assert inputs.tolist() == [[367, 2885, 1464, 1807]]
    assert targets.tolist() == [[2885, 1464, 1807, 3619]]


def test_batch_of_8_with_stride_4_matches_the_book(gpt2, verdict):
    loader = create_dataloader(verdict, batch_size=8, max_length=4, stride=4, shuffle=False, tokenizer=gpt2)
    inputs, targets = next(iter(loader))
    assert inputs.dtype == targets.dtype == torch.long
    assert inputs.tolist() == [
        [40, 367, 2885, 1464],
        [1807, 3619, 402, 271],
        [10899, 2138, 257, 7026],
        [15632, 438, 2016, 257],
        [922, 5891, 1576, 438],
        [568, 340, 373, 645],
        [1049, 5975, 284, 502],
        [284, 3285, 326, 11],
    ]
    assert targets.tolist() == [
        [367, 2885, 1464, 1807],
        [3619, 402, 271, 10899],
        [2138, 257, 7026, 15632],
        [438, 2016, 257, 922],
        [5891, 1576, 438, 568],
        [340, 373, 645, 1049],
        [5975, 284, 502, 284],
        [3285, 326, 11, 287],
    ]


def test_number_of_windows_and_batches(gpt2, verdict):
    # Hand-computed: windows start at 0, 4, ..., 5140 (5140 + 4 < 5145): 1286 windows.
    dataset = GPTDataset(verdict, gpt2, max_length=4, stride=4)
    assert len(dataset) == 1286
    # The book's pretraining setup: 256-token windows, stride 256, 90 % of the text.
    train_text = verdict[: int(0.9 * len(verdict))]
    loader = create_dataloader(train_text, batch_size=2, max_length=256, stride=256, tokenizer=gpt2)
    assert len(loader) == 9  # the book's 9 training batches of shape (2, 256)
    for inputs, targets in loader:
        assert inputs.shape == targets.shape == (2, 256)


@given(
    ids=st.lists(st.integers(0, 50256), min_size=2, max_size=60),
    max_length=st.integers(1, 12),
    stride=st.integers(1, 12),
)
def test_windows_are_the_books_and_targets_are_inputs_shifted(ids, max_length, stride):
    if len(ids) < max_length + 1:
        with pytest.raises(ValueError):
            GPTDataset(ids, max_length=max_length, stride=stride)
        return
    dataset = GPTDataset(ids, max_length=max_length, stride=stride)
    expected_inputs, expected_targets = book_windows(ids, max_length, stride)
    assert len(dataset) == len(expected_inputs) == (len(ids) - max_length - 1) // stride + 1
    for i, (inputs, targets) in enumerate(dataset):
        assert inputs.tolist() == expected_inputs[i]
        assert targets.tolist() == expected_targets[i]
        assert torch.equal(targets[:-1], inputs[1:])


def test_token_ids_in_any_form_give_the_same_windows_as_the_text(gpt2, verdict):
    ids = tokenize(verdict, gpt2)
    reference = GPTDataset(verdict, gpt2, max_length=8, stride=5)
    for form in (ids, torch.tensor(ids), np.array(ids, dtype=np.uint16)):
        dataset = GPTDataset(form, max_length=8, stride=5)
        assert len(dataset) == len(reference)
        inputs, targets = dataset[-1]
        assert inputs.dtype == targets.dtype == torch.long
        assert torch.equal(inputs, reference[-1][0]) and torch.equal(targets, reference[-1][1])


def test_too_short_text_says_how_many_tokens_it_has_and_needs(gpt2):
    with pytest.raises(ValueError, match=r"has 2 tokens.*at least 5"):
        GPTDataset("Hello world", gpt2, max_length=4, stride=1)
    # Exactly max_length + 1 tokens is enough for one window.
    assert len(GPTDataset("Hello world, my friend", gpt2, max_length=4, stride=1)) == 1


@pytest.mark.parametrize("max_length, stride", [(0, 1), (4, 0), (-1, 4)])
def test_max_length_and_stride_must_be_positive(gpt2, max_length, stride):
    with pytest.raises(ValueError, match="at least 1"):
        GPTDataset("some text that is long enough for a window", gpt2, max_length=max_length, stride=stride)


def test_shuffled_epoch_visits_every_window_once(gpt2, verdict):
    loader = create_dataloader(verdict, batch_size=16, max_length=8, stride=8, drop_last=False, tokenizer=gpt2)
    seen = torch.cat([inputs for inputs, _ in loader])
    ordered = torch.stack([inputs for inputs, _ in loader.dataset])
    assert not torch.equal(seen, ordered)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, ordered.tolist()))


def test_default_tokenizer_is_gpt2(verdict):
    loader = create_dataloader(verdict, batch_size=1, max_length=4, stride=1, shuffle=False)
    inputs, _ = next(iter(loader))
    assert inputs.tolist() == [[40, 367, 2885, 1464]]
