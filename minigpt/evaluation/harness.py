"""A bridge to lm-evaluation-harness: a minigpt model answers the harness's three questions.

The harness (``pip install "minigpt[eval]"``) runs hundreds of published benchmarks
(HellaSwag, ARC, MMLU, LAMBADA, ...) against any model that answers three kinds of request:

- ``loglikelihood(context, continuation)``: the log-probability of the continuation's
  tokens after the context, and whether greedy decoding would have written exactly them
  (multiple choice: the likeliest answer wins);
- ``loglikelihood_rolling(text)``: the log-probability of a whole text, read in windows of
  the context length that never overlap, the first one after ``<|endoftext|>`` (perplexity);
- ``generate_until(context, settings)``: a continuation that stops at the first of the
  ``until`` strings, after ``max_gen_toks`` tokens, or at ``<|endoftext|>``.

:class:`MiniGPTLM` answers them with :func:`minigpt.generation.batch.token_logprobs` and
:func:`minigpt.generation.generate.stream_generate`. It tokenizes exactly as the harness's own
Hugging Face backend does (the same base class splits context and continuation, so a space
between them belongs to the continuation), truncates from the left the same way, and so
gives the same numbers as that backend on the same weights. Requests are sorted longest
first, scored in batches (right padding, which a causal model never attends to; prompts
to continue are padded on the left, with an attention mask) and returned in their order.

Importing this module registers the class under the name ``minigpt`` in the harness's model
registry, so ``simple_evaluate(model="minigpt", model_args="pretrained=gpt2-small")``
works once it is imported; the harness finds no model that a package has not imported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # an optional dependency: say how to get it
    raise ImportError(
        f"minigpt.evaluation.harness needs lm-evaluation-harness ({err}): install it with pip install \"minigpt[eval]\""
    ) from err

from minigpt.data.windows import tokenize
from minigpt.generation.batch import pad_prompts, token_logprobs
from minigpt.generation.generate import stream_generate
from minigpt.generation.sampling import check_sampling
from minigpt.models.loader import load, load_tokenizer
from minigpt.quantization.model import quantization_of
from minigpt.runtime.runtime import select_device
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["MiniGPTLM"]

# (the request's own strings or None, context ids, continuation ids): what TemplateLM hands on.
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]
SAMPLING = ("do_sample", "temperature", "top_k", "top_p")  # the generation settings minigpt follows
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("minigpt")
class MiniGPTLM(TemplateLM):
    """lm-evaluation-harness's language-model interface over a minigpt model.

    ``pretrained`` is a model already built (its device kept unless ``device`` is given) or
    what :func:`minigpt.models.load` loads: a GPT-2 or Llama-family name
    (``gpt2-small``, ``smollm2-135m``), a Hugging Face directory, a weights or run directory.
    ``tokenizer`` needs tiktoken's interface (when unset: the model's own). ``batch_size`` requests are scored at
    once; ``max_length`` shortens the context the model reads (its ``context_length`` when
    unset); ``max_gen_toks`` is the length of a generation whose task does not set one.
    ``dtype`` casts the model (``bfloat16`` halves its memory on a GPU); ``quantize``
    (``nf4``, ``nf4-dq``, ``int8``) loads the weights quantized.
    """

    def __init__(
        self,
        pretrained: str | os.PathLike | nn.Module = "gpt2-small",
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str | None = None,
        quantize: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(pretrained, nn.Module):
            if quantize is not None:
                raise ValueError("quantize applies to weights loaded by name or directory; quantize a model "
                                 "already built with minigpt.quantization.model.quantize_model")
            model = pretrained if device is None else pretrained.to(select_device(device))
        else:
            model = load(pretrained, quantize=quantize, device=select_device(device))
        if dtype is not None:
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            model = model.to(DTYPES[dtype])
        self.model = model.eval()
        if tokenizer is None:  # the model's own: GPT-2's BPE, or a Llama-family directory's tokenizer.json
            tokenizer = get_gpt2_tokenizer() if isinstance(pretrained, nn.Module) else load_tokenizer(pretrained)
        self.tokenizer = tokenizer
        self._batch_size = _whole_number("batch_size", batch_size)
        self._max_gen_toks = _whole_number("max_gen_toks", max_gen_toks)
        context = model.cfg.context_length
        self._max_length = context if max_length is None else _whole_number("max_length", max_length)
        if self._max_length > context:
            raise ValueError(f"max_length is {self._max_length}, more than the model's context of {context} tokens")
        self._source = type(pretrained).__name__ if isinstance(pretrained, nn.Module) else str(pretrained)

    # ------------------------------------------------------------------ what the harness reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_token

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name", type(self.tokenizer).__name__)

    def get_model_info(self) -> dict[str, Any]:
        """What the harness writes next to the results."""
        return {"model_source": self._source, "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "quantization": quantization_of(self.model)}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Text -> ids; ``<|endoftext|>`` written in the text is its special id, as in Hugging
        Face's GPT-2 tokenizer. GPT-2 adds no special token of its own: nothing to switch off."""
        return tokenize(string, self.tokenizer)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # ------------------------------------------------------------------ log-likelihoods
    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), continuation is greedy)`` of each request.

        A row is the last ``max_length + 1`` tokens of context + continuation; the model reads
        all but its last token and the continuation's log-probabilities are summed.
        """
        order = Collator(requests, sort_fn=_longest_first)
        answers = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="Scoring continuations") as bar:
            for chunk in order.get_batched(n=self.batch_size):
                answers += self._score_batch(chunk)
                bar.update(len(chunk))
        return order.get_original(answers)

    def _score_batch(self, chunk: Sequence[TokenRequest]) -> list[tuple[float, bool]]:
        rows = [(context + continuation)[-(self.max_length + 1):] for _, context, continuation in chunk]
        longest = max(map(len, rows))
        ids = torch.tensor([row + [self.eot_token_id] * (longest - len(row)) for row in rows], device=self.device)
        logprobs, greedy = token_logprobs(self.model, ids, return_greedy=True)  # (batch, longest - 1)
        answers = []
        for (key, _, continuation), row, row_logprobs, row_greedy in zip(chunk, rows, logprobs, greedy, strict=True):
            if not 0 < len(continuation) < len(row):
                raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored with a context of "
                                 f"{self.max_length} tokens")
            scored = slice(len(row) - 1 - len(continuation), len(row) - 1)  # the continuation's predictions
            answer = (float(row_logprobs[scored].sum()), bool(row_greedy[scored].all()))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            answers.append(answer)
        return answers

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-probability of each whole text: windows of ``max_length`` predictions that
        never overlap, the first one read after ``<|endoftext|>``; every token scored once."""
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for i, (text,) in enumerate(request.args for request in requests):
            pairs = get_rolling_token_windows(self.tok_encode(text), prefix_token=self.prefix_token_id,
                                              max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """The continuation of each context, cut before the first stop string. Requests with
        the same settings are generated together, longest context first."""
        order = Collator([request.args for request in requests], sort_fn=self._longest_context,
                         group_by="gen_kwargs", group_fn=lambda args: args[1])
        texts = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="Generating") as bar:
            for chunk in order.get_batched(n=self.batch_size):
                contexts, settings = zip(*chunk, strict=True)
                for context, text in zip(contexts, self._generate(contexts, settings[0]), strict=True):
                    self.cache_hook.add_partial("generate_until", (context, settings[0]), text)
                    texts.append(text)
                bar.update(len(chunk))
        return order.get_original(texts)

    def _longest_context(self, args: tuple[str, dict]) -> tuple[int, str]:
        return -len(self.tok_encode(args[0])), args[0]

    def _generate(self, contexts: Sequence[str], gen_kwargs: dict) -> list[str]:
        settings = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(settings.pop("until", None), eos=self.tok_decode([self.eot_token_id]))
        max_new = settings.pop("max_gen_toks")
        ignored = sorted(set(settings) - set(SAMPLING))
        if ignored:
            logger.warning("minigpt ignores the generation settings %s", ", ".join(ignored))
        temperature = float(settings.get("temperature") or 0.0) if settings.get("do_sample") else 0.0
        top_k = settings.get("top_k")
        top_p = settings.get("top_p")
        check_sampling(temperature, top_k, top_p, max_new)
        room = self.max_length - max_new  # the prompt keeps its last tokens, leaving room for the new ones
        if room < 1:
            raise ValueError(f"max_gen_toks is {max_new}: it leaves no room for the prompt in the model's context of "
                             f"{self.max_length} tokens; ask for fewer new tokens")
        prompts = [(self.tok_encode(context) or [self.prefix_token_id])[-room:] for context in contexts]
        new = self._continue(prompts, max_new, until, temperature=temperature, top_k=top_k, top_p=top_p)
        return [postprocess_generated_text(self.tok_decode(ids), until, None) for ids in new]

    def _continue(self, prompts: list[list[int]], max_new: int, until: list[str], **sampling: Any) -> list[list[int]]:
        """New ids of each prompt, up to ``<|endoftext|>`` (left out); generation stops early
        once every row has written one of the ``until`` strings."""
        ids, mask = pad_prompts(prompts, self.eot_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        stops = [stop for stop in until if stop]
        steps = stream_generate(self.model, ids, max_new, eos_id=self.eot_token_id, attention_mask=mask, **sampling)
        for step in steps:
            for row, token in enumerate(step[:, 0].tolist()):
                if done[row]:
                    continue
                if token == self.eot_token_id:
                    done[row] = True
                    continue
                new[row].append(token)
                text = self.tok_decode(new[row])
                done[row] = any(stop in text for stop in stops)
            if all(done):
                steps.close()  # frees the model's cache now
                break
        return new


def _longest_first(request: TokenRequest) -> tuple[int, tuple[int, ...]]:
    """Longest rows first: the first batch shows at once whether the memory suffices."""
    tokens = request[1] + request[2]
    return -len(tokens), tuple(tokens)


def _whole_number(name: str, value: int | str) -> int:
    """The harness passes command-line values as text: ``"8"`` is 8."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be at least 1, got {number}")
    return number


# python -m minigpt.evaluation.harness ...: the harness's own command line, minigpt registered
if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
