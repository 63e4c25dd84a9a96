"""From a text to (input, target) batches for next-token prediction (book chapter 2).

The one idea: a GPT is trained to predict the next token, so a training example is
just a window of token ids paired with the same window shifted one token to the right.
In a window of ``max_length`` tokens every position is a separate prediction: given
``ids[s : s + k + 1]`` the model should output ``ids[s + k + 1]``.

Windows start every ``stride`` tokens. ``stride == max_length`` gives windows that
touch without overlapping (each token is an input exactly once per epoch); a smaller
stride gives overlapping windows, i.e. more, but more correlated, examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from minigpt.tokenizers.gpt2 import ENDOFTEXT, get_gpt2_tokenizer

# A corpus given as token ids rather than text: the tokenizer is then not needed.
TokenIds = Sequence[int] | torch.Tensor | np.ndarray


def tokenize(text: str, tokenizer: Any = None) -> list[int]:
    """Token ids of ``text``; ``tokenizer`` defaults to GPT-2's BPE.

    ``<|endoftext|>`` in the text is allowed and becomes its special id (50256 for
    GPT-2): corpora use it to mark where one document ends and the next begins.
    The tokenizer needs tiktoken's interface, ``encode(text, allowed_special=...)``.
    """
    if tokenizer is None:
        tokenizer = get_gpt2_tokenizer()
    return tokenizer.encode(text, allowed_special={ENDOFTEXT})


class GPTDataset(Dataset):
    """Sliding windows over the token ids of one text.

    ``text`` may also be the text's token ids already computed (a list, 1-D tensor
    or NumPy array of ints), e.g. from ``minigpt.data.corpora.load_token_ids``; the
    tokenizer is then unused.

    Windows start at ``0, stride, 2 * stride, ...`` as long as ``start + max_length``
    is a valid index, because the target window reaches one token further than the
    input window. With ``n`` tokens that makes ``(n - max_length - 1) // stride + 1``
    windows. Item ``i`` is ``(inputs, targets)``, both ``torch.long`` of shape
    ``(max_length,)`` with ``targets[k] == inputs[k + 1]`` for ``k < max_length - 1``.
    """

    def __init__(
        self,
        text: str | TokenIds,
        tokenizer: Any = None,
        max_length: int = 256,
        stride: int = 128,
    ) -> None:
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length and stride must be at least 1, got {max_length} and {stride}")
        ids = tokenize(text, tokenizer) if isinstance(text, str) else text
        # One flat tensor, sliced on demand: storing every window separately (as the
        # book does) would multiply memory by max_length / stride.
        self.ids = torch.as_tensor(ids, dtype=torch.long)
        if self.ids.ndim != 1:
            raise ValueError(f"token ids must be one-dimensional, got shape {tuple(self.ids.shape)}")
        if len(self.ids) < max_length + 1:
            raise ValueError(
                f"the text has {len(self.ids)} tokens, but max_length={max_length} needs at "
                f"least {max_length + 1} (the targets reach one token past the inputs); "
                "use a longer text or a smaller max_length"
            )
        self.max_length = max_length
        self.stride = stride

    def __len__(self) -> int:
        return (len(self.ids) - self.max_length - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = (i % len(self)) * self.stride
        window = self.ids[start : start + self.max_length + 1]
        return window[:-1], window[1:]


def create_dataloader(
    text: str | TokenIds,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    tokenizer: Any = None,
) -> DataLoader:
    """Batches of ``(inputs, targets)``, each ``torch.long`` of shape ``(batch, max_length)``.

    ``text`` is a text or its token ids (see ``GPTDataset``); ``tokenizer`` defaults to
    GPT-2's BPE. ``drop_last`` skips a final short batch, whose noisier gradient
    would otherwise weigh as much as a full batch's.
    """
    dataset = GPTDataset(text, tokenizer, max_length=max_length, stride=stride)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
    )
