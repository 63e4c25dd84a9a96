"""The one model in memory, and generation for one request at a time.

The one idea: the model's key-value cache is a single piece of state, so one generation
owns the model from its first token to its last: :meth:`Engine.generate` takes the
engine's lock before the first step and releases it when the generation ends, is
stopped, or is closed (a client that went away). Everything random comes from the
request's own ``torch.Generator``, so a seeded request gives the same tokens whatever
else the server is doing, and the same tokens as :func:`minigpt.generation.generate.generate`
with that seed.

Text leaves through :class:`~minigpt.generation.text.IncrementalDecoder` (no character cut in
half) and :class:`StopMatcher` (text that might begin a stop string is held back until
it is known not to).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from minigpt.finetuning.prompt_format import PLAIN, Messages, PromptFormat
from minigpt.generation.generate import stream_steps
from minigpt.generation.text import IncrementalDecoder
from minigpt.models.base import evaluating
from minigpt.serving.markup import content_spans
from minigpt.tokenizers.bpe import special_token_pattern


@dataclass(frozen=True)
class Sampling:
    """How one choice is generated: the sampling settings of
    :func:`minigpt.generation.generate.generate`, stop strings, and ``top_logprobs`` alternatives
    to report with each token (0: none)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: Sequence[str] = ()
    top_logprobs: int = 0


@dataclass
class TokenEvent:
    """One generated token: ``text`` is what it adds to the answer (may be empty while a
    character or a possible stop string is incomplete), ``logprob`` its log-probability
    under the model (softmax of the raw logits), ``top`` the likeliest alternatives as
    ``(token id, logprob)``."""

    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Finished:
    """The end of one choice: ``reason`` is ``"stop"`` (end-of-text or a stop string) or
    ``"length"`` (``max_tokens`` reached); ``text`` is any text held back until now."""

    reason: str
    text: str
    tokens: int


class StopMatcher:
    """Text in, piece by piece; text out, cut before the first stop string to appear.

    ``add(piece)`` returns ``(text safe to show, stopped)``: the longest tail that could be
    the start of a stop string is held back until the next piece settles it.

    Each stop string is matched as the Knuth-Morris-Pratt algorithm does: its state is the
    length of the longest tail of the text so far that begins the stop string, and each new
    character moves it in amortized constant time. Comparing every possible beginning
    instead costs the stop string's length squared per token (38 s for a 1 MB stop).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._fallback = [_fallback(s) for s in self.stops]
        self._matched = [0] * len(self.stops)
        self._held = ""

    def add(self, piece: str) -> tuple[str, bool]:
        text = self._held + piece
        for position in range(len(self._held), len(text)):
            for k, stop in enumerate(self.stops):
                matched = self._matched[k]
                while matched and stop[matched] != text[position]:
                    matched = self._fallback[k][matched - 1]  # the next shorter tail that begins the stop
                matched += stop[matched] == text[position]
                if matched == len(stop):
                    self._held = ""
                    self._matched = [0] * len(self.stops)
                    return text[:position + 1 - matched], True
                self._matched[k] = matched
        keep = max(self._matched, default=0)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        rest, self._held, self._matched = self._held, "", [0] * len(self.stops)
        return rest


def _fallback(stop: str) -> list[int]:
    """KMP's failure function: for each prefix ``stop[:i + 1]``, the length of its longest
    proper prefix that is also its suffix. O(len(stop))."""
    fallback = [0] * len(stop)
    matched = 0
    for i in range(1, len(stop)):
        while matched and stop[i] != stop[matched]:
            matched = fallback[matched - 1]
        matched += stop[i] == stop[matched]
        fallback[i] = matched
    return fallback


class Engine:
    """A model, its tokenizer and its chat format, served one generation at a time.

    ``tokenizer`` has tiktoken's interface (``encode``, ``decode``, ``eot_token``); requests
    name the model by ``name`` or one of its ``aliases``;
    ``chat_format`` renders chat messages into the prompt text (default: a plain
    transcript). ``stats`` counts generations and generated tokens. :meth:`close` stops
    every generation at its next token (a server shutting down).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, name: str = "minigpt",
                 chat_format: PromptFormat = PLAIN, aliases: Sequence[str] = ()) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.aliases = tuple(aliases)
        self.chat_format = chat_format
        self.eos_id: int = tokenizer.eot_token
        self.context_length: int = model.cfg.context_length
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.stats = {"generations": 0, "tokens": 0}

    def close(self) -> None:
        """Stop every generation, now and to come, before its next token."""
        self.closed.set()

    def encode(self, text: str) -> list[int]:
        """Text -> token ids; special tokens written in the text (``<|endoftext|>``, a chat
        template's turn markers) are the special tokens."""
        return self.tokenizer.encode(text, allowed_special="all")

    def encode_chat(self, messages: Messages) -> list[int]:
        """The chat format's prompt for ``messages`` as token ids, where only the format's
        own markup is read as special tokens: ``<|im_end|>`` typed inside a message is
        plain text, so a user cannot end their turn and write a system turn of their own.

        Raises ``ValueError`` for a message that holds a special token when the template
        changes contents too much to tell them from its markup."""
        text, spans = content_spans(self.chat_format, messages)
        specials = frozenset(getattr(self.tokenizer, "special_tokens_set", ()))
        if not specials:
            return self.encode(text)
        found = list(special_token_pattern(specials).finditer(text))
        if spans is None:
            for i, m in enumerate(messages):
                if special_token_pattern(specials).search(m["content"]):
                    raise ValueError(f"message {i} holds a special token this model's chat template would "
                                     "read as markup; remove it from the message")
            return self.encode(text)
        markup = [m for m in found if not any(start < m.end() and m.start() < end for start, end in spans)]
        ids = []
        position = 0
        for m in markup:  # the text between two markup tokens, specials in it read as plain text
            ids += self.tokenizer.encode(text[position:m.start()], disallowed_special=())
            ids += self.tokenizer.encode(m.group(), allowed_special={m.group()})
            position = m.end()
        return ids + self.tokenizer.encode(text[position:], disallowed_special=())

    def token_text(self, token_id: int) -> str:
        """One token as text (a piece of a character shows as U+FFFD; see :meth:`token_bytes`)."""
        return self.tokenizer.decode([token_id])

    def token_bytes(self, token_id: int) -> list[int]:
        """One token's UTF-8 bytes, as OpenAI's chat logprobs report them."""
        if hasattr(self.tokenizer, "decode_bytes"):
            return list(self.tokenizer.decode_bytes([token_id]))
        return list(self.token_text(token_id).encode("utf-8"))

    def generate(self, ids: Sequence[int], sampling: Sampling, generator: torch.Generator,
                 cancel: threading.Event | None = None) -> Iterator[TokenEvent | Finished]:
        """Continue the prompt ``ids``: a :class:`TokenEvent` per token, then one :class:`Finished`.

        Holds the engine's lock from the first step until the end; closing the iterator
        early, or setting ``cancel`` (a client that disconnected), stops the generation
        before its next token and frees the model. Cancelled, it ends without ``Finished``.
        """
        with self.lock:
            self.stats["generations"] += 1
            yield from self._generate(ids, sampling, generator, cancel or threading.Event())

    def _generate(self, ids: Sequence[int], s: Sampling, generator: torch.Generator, cancel: threading.Event
                  ) -> Iterator[TokenEvent | Finished]:
        decoder = IncrementalDecoder(self.tokenizer)
        stopper = StopMatcher(s.stop)
        count = 0
        idx = torch.tensor([list(ids)], dtype=torch.long, device=self.model.device)
        steps = stream_steps(self.model, idx, s.max_tokens, temperature=s.temperature, top_k=s.top_k,
                             top_p=s.top_p, eos_id=self.eos_id, generator=generator, top_logprobs=s.top_logprobs)
        try:
            for step in steps:
                if cancel.is_set() or self.closed.is_set():
                    return
                token_id = int(step.ids[0, 0])
                if token_id == self.eos_id:
                    yield Finished("stop", stopper.add(decoder.flush())[0] + stopper.flush(), count)
                    return
                count += 1
                self.stats["tokens"] += 1
                text, stopped = stopper.add(decoder.add(token_id))
                top = list(zip(step.top_ids[0].tolist(), step.top_logprobs[0].tolist(), strict=True))
                yield TokenEvent(token_id, text, float(step.logprobs[0]), top)
                if stopped:
                    yield Finished("stop", "", count)
                    return
            rest, stopped = stopper.add(decoder.flush())
            yield Finished("stop" if stopped else "length", rest + ("" if stopped else stopper.flush()), count)
        finally:
            steps.close()  # the model's cache is freed even when the client left mid-way

    @torch.no_grad()
    def prompt_logprobs(self, ids: Sequence[int], top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """Each prompt token's log-probability given the tokens before it (from the second
        token on: ``len(ids) - 1`` values) and the ``top`` likeliest tokens at each of
        those positions, from one forward pass: what ``echo`` with ``logprobs`` reports."""
        if len(ids) < 2:
            return [], []
        with self.lock, evaluating(self.model):
            idx = torch.tensor([list(ids)], dtype=torch.long, device=self.model.device)
            logp = self.model(idx[:, :-1])[0].float().log_softmax(dim=-1)  # (tokens - 1, vocab)
            chosen = logp.gather(-1, idx[0, 1:, None])[:, 0].tolist()
            best = logp.topk(top, dim=-1)
        pairs = zip(best.indices.tolist(), best.values.tolist(), strict=True)
        return chosen, [list(zip(i, v, strict=True)) for i, v in pairs]


def request_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator of the request's own: seeded with ``seed``, else from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
