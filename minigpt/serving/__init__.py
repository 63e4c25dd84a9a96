"""Talk to a model: an OpenAI-compatible HTTP server, a chat session, and a page.

- :mod:`minigpt.serving.engine`: the one model in memory, generating for one request at a time;
- :mod:`minigpt.serving.protocol`: requests checked, errors in OpenAI's shape;
- :mod:`minigpt.serving.responses`: generation events in OpenAI's response shapes;
- :mod:`minigpt.serving.formats`: how chat messages become the prompt;
- :mod:`minigpt.serving.app`: the routes (FastAPI) and the page in ``static/``;
- :mod:`minigpt.serving.server`: ``minigpt serve``'s settings, loading and uvicorn;
- :mod:`minigpt.serving.chat`: a terminal chat's session (history, commands).

Needs the ``serve`` extra: ``pip install "minigpt[serve]"`` (FastAPI and uvicorn).
"""

from minigpt.serving.app import create_app
from minigpt.serving.engine import Engine, Sampling
from minigpt.serving.protocol import APIError, Limits
from minigpt.serving.server import ServeConfig, load_engine, serve

__all__ = ["APIError", "Engine", "Limits", "Sampling", "ServeConfig", "create_app", "load_engine", "serve"]
