"""Talk to a model: an OpenAI-compatible HTTP server, a chat session, and a page.

- :mod:`minigpt.serving.engine`: the one model in memory, generating for one request at a time;
- :mod:`minigpt.serving.protocol`: requests checked, errors in OpenAI's shape;
- :mod:`minigpt.serving.responses`: generation events in OpenAI's response shapes;
- :mod:`minigpt.serving.markup`: which parts of a chat prompt are markup, which are users' words;
- :mod:`minigpt.serving.guard`, :mod:`minigpt.serving.job`: each request checked and costed before any work;
- :mod:`minigpt.serving.app`: the routes (FastAPI) and the page in ``static/``;
- :mod:`minigpt.serving.settings`: ``minigpt serve``'s and ``chat``'s settings, and the model they load;
- :mod:`minigpt.serving.server`: binding the port, uvicorn, stopping within seconds;
- :mod:`minigpt.serving.chat`: a terminal chat's session (history, commands).

Needs the ``serve`` extra: ``pip install "minigpt[serve]"`` (FastAPI and uvicorn). The names
below are imported on first use, so that the settings (``ServeConfig``, ``ChatConfig``) and
``--help`` work without the extra.
"""

import importlib
from typing import Any

_HOMES = {"create_app": "app", "Engine": "engine", "Sampling": "engine", "APIError": "protocol",
          "Limits": "protocol", "ServeConfig": "settings", "load_engine": "settings", "serve": "server"}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
