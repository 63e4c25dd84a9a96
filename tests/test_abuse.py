"""The server and the command line as an attacker and a careless user drive them: no request
may hold the single generation slot for long, and every bad input is an OpenAI-shaped
4xx (or one line on the command line), never a 500 or a traceback.

Each denial-of-service repro runs against a real uvicorn server while another client
asks for ``/v1/models`` or a short completion: those answers must come back within a
second (``FAST``), as they did before the hostile request; ``HANG`` only guards the
test run itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

httpx = pytest.importorskip("httpx", reason="raw HTTP requests need httpx")
pytest.importorskip("uvicorn", reason="the server runs on uvicorn (pip install 'minigpt[serve]')")

from minigpt.finetuning.prompt_format import ChatTemplateFormat  # noqa: E402
from minigpt.models.gpt2.model import GPTModel  # noqa: E402
from minigpt.serving import Engine, Limits, create_app  # noqa: E402
from minigpt.serving.engine import StopMatcher, TokenEvent  # noqa: E402
from minigpt.serving.responses import CompletionChoice  # noqa: E402
from minigpt.serving.server import BackgroundServer  # noqa: E402
from minigpt.serving.settings import ServeConfig  # noqa: E402
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer  # noqa: E402

CFG = dict(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)
FAST, HANG = 1.0, 120.0
SHORT = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    return Engine(GPTModel(CFG), get_gpt2_tokenizer(), name="tiny")


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_app(engine, limits=Limits(max_tokens=4000, max_n=8, max_stop_chars=2**20,
                                                           max_request_tokens=10**6))) as running:
        yield running


def post(server, path: str, body, timeout: float = HANG, **headers) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.base_url + path, content=content, timeout=timeout,
                      headers={"Content-Type": "application/json", **headers})


def answered_quickly(server) -> None:
    """Another client is served within FAST seconds: the model list, and a short completion."""
    assert httpx.get(server.base_url + "/v1/models", timeout=FAST).status_code == 200
    assert post(server, "/v1/completions", SHORT, timeout=FAST).status_code == 200


def wait_until_free(engine: Engine, generations: int) -> None:
    """Until the engine has started its ``generations``-th generation and has none running."""
    deadline = time.monotonic() + HANG
    while (engine.lock.locked() or engine.stats["generations"] < generations) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.lock.locked()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# --- 1. stop strings ------------------------------------------------------------------------


def test_a_stop_string_over_the_limit_is_refused_before_any_work(engine):
    with BackgroundServer(create_app(engine)) as running:
        error = error_of(post(running, "/v1/completions", {**SHORT, "stop": ["x" * 1_000_000]}), 400)
        assert error["param"] == "stop" and "1,000" in error["message"] and error["code"] == "limit_exceeded"


def test_a_megabyte_stop_string_costs_little_per_token(server, engine):
    # allowed by this server's limits: matching is linear in the stop's length, not quadratic
    before = engine.stats["tokens"]
    body = {**SHORT, "max_tokens": 4, "stop": ["x" * 1_000_000, "y" * 300_000]}
    assert post(server, "/v1/completions", body).status_code == 200
    assert engine.stats["tokens"] - before == 4
    answered_quickly(server)


@pytest.mark.parametrize("stops", [["ab"], ["aab", "b"], ["abab", "bab"], ["aaaa"], ["ba", "ab", "aa"]])
def test_stop_matching_cuts_where_the_first_stop_ends(stops):
    generator = torch.Generator().manual_seed(len("".join(stops)))
    for _ in range(200):
        pieces = ["".join("abc"[i] for i in torch.randint(0, 3, (int(torch.randint(0, 4, ())),),
                                                            generator=generator).tolist()) for _ in range(8)]
        matcher, shown, stopped = StopMatcher(stops), "", False
        for piece in pieces:
            text, stopped = matcher.add(piece)
            shown += text
            if stopped:
                break
        whole = "".join(pieces)
        found = sorted((whole.find(s) + len(s), whole.find(s)) for s in stops if s in whole)
        assert (shown if stopped else shown + matcher.flush()) == (whole[:found[0][1]] if found else whole)
        assert stopped == bool(found)


# --- 2. what one request may ask for --------------------------------------------------------


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"prompt": ["a"] * 300, "n": 8, "max_tokens": 1}, "prompt", "choices (prompts times n) is 2,400"),
    ({"prompt": ["a"] * 200_000, "max_tokens": 1}, "prompt", "choices (prompts times n) is 200,000"),
    ({"prompt": "word " * 60, "n": 8, "max_tokens": 1000}, "prompt", "request's tokens"),
    ({"prompt": "Hi", "n": 9}, "n", "n is 9"),
])
def test_a_request_over_its_cost_limits_gets_a_400_naming_the_limit(engine, body, param, words):
    with BackgroundServer(create_app(engine, limits=Limits(max_request_tokens=4096))) as running:
        error = error_of(post(running, "/v1/completions", {"model": "tiny", **body}), 400)
        assert error["param"] == param and words in error["message"]


def test_a_body_over_the_limit_is_refused_unread(engine):
    with BackgroundServer(create_app(engine, limits=Limits(max_body_bytes=2**20))) as running:
        body = json.dumps({"prompt": "a" * (20 * 2**20)}).encode()
        assert error_of(post(running, "/v1/completions", body), 413)["code"] == "limit_exceeded"
        answered_quickly(running)


# --- 3. work that outlives its client -------------------------------------------------------


def test_a_non_streamed_request_whose_client_left_stops(server, engine):
    before, generations = engine.stats["tokens"], engine.stats["generations"]
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", {**SHORT, "n": 8, "max_tokens": 4000, "temperature": 1.0}, timeout=0.5)
    wait_until_free(engine, generations + 1)
    assert engine.stats["tokens"] - before < 8 * 4000
    answered_quickly(server)


def test_a_streaming_client_that_never_reads_holds_nothing(server, engine):
    body, generations = {**SHORT, "max_tokens": 200, "temperature": 1.0, "stream": True}, engine.stats["generations"]
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=HANG) as response:
        assert response.status_code == 200  # and nothing read: its answer waits in the server's queue
        wait_until_free(engine, generations + 1)
        answered_quickly(server)


def test_a_streaming_client_that_leaves_stops_its_generation(server, engine):
    before, generations = engine.stats["tokens"], engine.stats["generations"]
    body = {**SHORT, "max_tokens": 4000, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=HANG) as response:
        next(response.iter_lines())
    wait_until_free(engine, generations + 1)
    assert engine.stats["tokens"] - before < 4000
    answered_quickly(server)


LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0].content }}"


@pytest.mark.parametrize(("template", "words"), [
    (LOOPS, "ran longer than 0.5 s"),
    ("{{ 'x' * 10**10 }}", "too large to write"),
    ("{{ raise_exception('roles must alternate user/assistant') }}", "roles must alternate user/assistant"),
    ("{% for m in messages %}{{ m.content }", "unexpected '}'"),
    ("{{ messages.__class__.__mro__ }}", "__class__"),  # the sandbox's SecurityError
])
def test_a_chat_template_that_fails_or_runs_too_long_is_a_400_with_its_reason(template, words):
    torch.manual_seed(0)
    engine = Engine(GPTModel(CFG), get_gpt2_tokenizer(), name="tiny",
                    chat_format=ChatTemplateFormat(template, time_limit=0.5))
    with BackgroundServer(create_app(engine)) as running:
        result: dict[str, httpx.Response] = {}
        chat = threading.Thread(target=lambda: result.setdefault("r", post(
            running, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})))
        chat.start()
        assert httpx.get(running.base_url + "/v1/models", timeout=FAST).status_code == 200  # the loop is free
        chat.join(HANG)
        error = error_of(result["r"], 400)
        assert error["param"] == "messages" and words in error["message"]


def test_sigterm_stops_the_server_mid_generation(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    server = subprocess.Popen([sys.executable, "-m", "minigpt", "serve", "--port", str(port), "--device", "cpu"],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + HANG
        while time.monotonic() < deadline:
            try:
                httpx.get(base + "/v1/models", timeout=FAST)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"prompt": "Hi", "max_tokens": 1024, "n": 8, "temperature": 1.0}
        threading.Thread(target=lambda: httpx.post(base + "/v1/completions", json=body, timeout=HANG),
                         daemon=True).start()
        time.sleep(1.0)  # the generation is under way
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has stopped
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# --- 4-8. 500s that are 400s, and a connection that survives an error -----------------------


@pytest.mark.parametrize("settings", [{"temperature": 1e-40}, {"top_p": 1e-50, "temperature": 1.0}])
def test_settings_that_underflow_are_greedy_streamed_or_not(server, settings):
    body = {**SHORT, "max_tokens": 4, **settings}
    assert post(server, "/v1/completions", body).json()["choices"][0]["text"] == \
        post(server, "/v1/completions", {**body, "temperature": 0}).json()["choices"][0]["text"]
    streamed = post(server, "/v1/completions", {**body, "stream": True}).text
    assert streamed.endswith("data: [DONE]\n\n") and '"error"' not in streamed


@pytest.mark.parametrize(("seed", "status"), [(2**64, 400), (-(2**63) - 1, 400), (2**64 - 1, 200), (-(2**63), 200)])
def test_seeds_beyond_64_bits_are_a_400(server, seed, status):
    response = post(server, "/v1/completions", {**SHORT, "seed": seed})
    assert response.status_code == status
    if status == 400:
        assert error_of(response, 400)["param"] == "seed"


def test_deeply_nested_json_is_a_400(server):
    error = error_of(post(server, "/v1/completions", b"[" * 100_000), 400)
    assert "nests too deeply" in error["message"]


def test_an_error_keeps_the_connection_usable(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    with BackgroundServer(create_app(engine)) as running, socket.create_connection(
            ("127.0.0.1", int(running.base_url.rsplit(":", 1)[1]))) as sock:
        reader = sock.makefile("rb")

        def ask() -> int:
            body = json.dumps(SHORT).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            status = int(reader.readline().split()[1])
            length = 0
            while (line := reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert "error" in json.loads(reader.read(length)) or status == 200
            return status

        monkeypatch.setattr(engine, "generate", broken)
        assert ask() == 500
        monkeypatch.undo()
        assert ask() == 200  # on the same connection


# --- 9, 11. a local server and the web -------------------------------------------------------


def test_only_json_for_this_host_is_answered_and_no_cors_by_default(server):
    assert error_of(post(server, "/v1/completions", SHORT, Host="evil.example"), 400)["code"] == "invalid_host"
    assert error_of(post(server, "/v1/completions", SHORT, **{"Content-Type": "text/plain"}), 415)["code"] == \
        "unsupported_media_type"
    response = post(server, "/v1/completions", SHORT, Origin="https://evil.example")
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_a_cors_origin_is_allowed_when_asked(engine):
    with BackgroundServer(create_app(engine, cors_origin="https://app.example")) as running:
        response = post(running, "/v1/completions", SHORT, Origin="https://app.example")
        assert response.headers["access-control-allow-origin"] == "https://app.example"


def test_other_addresses_need_an_api_key():
    with pytest.raises(ValueError, match="give an api_key"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", api_key="k").hosts() == ["*"]
    assert ServeConfig(host="192.168.1.5", insecure_no_api_key=True).hosts()[-1] == "192.168.1.5"


# --- 15, 16. the model's name, and top_logprobs ---------------------------------------------


def test_another_model_name_is_a_404(server):
    error = error_of(post(server, "/v1/completions", {**SHORT, "model": "no-such-model"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"


def test_top_logprobs_keep_the_likelier_of_two_tokens_that_read_the_same(engine):
    first, second = 171, 172  # two bytes that begin a character: each alone reads as U+FFFD
    assert engine.token_text(first) == engine.token_text(second) == "\ufffd"
    choice = CompletionChoice(engine, 0, 2)
    choice.piece(TokenEvent(first, "", -0.5, [(first, -0.5), (second, -1.5)]))
    assert choice.result()["logprobs"]["top_logprobs"] == [{"\ufffd": -0.5}]
