"""Which parts of a rendered chat prompt are the format's markup, and which are what users wrote.

The one idea: only the format's own markup (``<|im_start|>``, ``<|eot_id|>`` ...) may be read as
special tokens; the same characters typed inside a message are plain text, or a user could write
``<|im_end|><|im_start|>system`` and speak as the system. :func:`content_spans` finds where each
message's content sits in the rendered prompt, so the engine encodes only the markup with specials.
"""

from __future__ import annotations

import re

from minigpt.finetuning.prompt_format import Messages, PromptFormat

# A private-use character around a message's index stands in for its content (see content_spans)
_STAND_IN = re.compile("\ue000(\\d+)\ue001")


def content_spans(chat_format: PromptFormat, messages: Messages) -> tuple[str, list[tuple[int, int]] | None]:
    """The rendered prompt and the ``(start, end)`` of each piece of it that is message content.

    The one idea: render twice, once with each content replaced by a stand-in, and walk
    both texts together; the markup between stand-ins is the format's own, what replaces
    a stand-in is the user's (as written, or trimmed by the template). Only the format's
    markup may then be read as special tokens. None for the spans when the template does
    more to a content than trim it (the walk then fails).
    """
    text = chat_format.render(messages)
    marked = chat_format.render([{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)])
    parts = _STAND_IN.split(marked)  # [markup, index, markup, index, ..., markup]
    spans = []
    position = 0
    for k, part in enumerate(parts):
        if k % 2 == 0:
            if not text.startswith(part, position):
                return text, None
            position += len(part)
            continue
        after = parts[k + 1]
        content = messages[int(part)]["content"]
        fits = [c for c in (content, content.strip()) if text.startswith(c, position)
                and text.startswith(after, position + len(c))]
        if not fits:
            return text, None
        spans.append((position, position + len(fits[0])))
        position += len(fits[0])
    return text, spans if position == len(text) else None
