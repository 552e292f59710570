"""The OpenAI-compatible backends against a stub server on 127.0.0.1: request bodies, the key, order under
concurrency, retries (5xx, 429, connection errors) and their absence (4xx), the judge's yes/no score, and a whole
prompts stage from a YAML that names the backend."""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from _tiny_synthesis import TINY_CONFIG, run_tiny
from PIL import Image

from coalign.io import read_json, read_jsonl
from coalign.synthesis import load_config
from coalign.synthesis._io import derive_seed
from coalign.synthesis.backends import ChatBackend, JudgeBackend, build_backend
from coalign.synthesis.hf_backends import chat_backend
from coalign.synthesis.openai_backend import OpenAIChat, OpenAIJudge, ServerError, group_schema

KEY = "sk-test-123"


class Stub:
    """A chat-completions server: records each request, fails the first ``fail_first`` with ``fail_status``,
    and otherwise answers ``reply(body) -> (status, json)`` (default: :func:`group_answer` of the body's seed)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.fail_first, self.fail_status = 0, 503
        self.reply: Callable[[dict[str, Any]], tuple[int, dict[str, Any]]] = lambda body: (
            200,
            chat(group_answer(body)),
        )
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append({"path": self.path, **body})
                    stub.headers.append(dict(self.headers))
                    failing = len(stub.requests) <= stub.fail_first
                if self.path != "/v1/chat/completions":
                    status, answer = 404, {"error": {"message": f"no route {self.path}"}}
                elif failing:
                    status, answer = stub.fail_status, {"error": {"message": "server overloaded, try later"}}
                else:
                    status, answer = stub.reply(body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> Stub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def chat(content: str) -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
            "content": content}, "finish_reason": "stop"}]}  # fmt: skip


def group_answer(body: dict[str, Any]) -> str:
    """A valid group of the tiny config (3 edits, 3-8 word captions, 2-5 word texts) whose words depend on the
    seed, so that different seeds never look like near-duplicates."""
    seed = body["seed"]
    words = [f"w{(seed >> (4 * k)) % 4096}" for k in range(8)]
    n = 3
    edits = [{"caption": f"a {words[k]} {words[k + 1]} {words[k + 2]} scene", "forward": f"add the {words[k]}",
              "backward": f"remove the {words[k]}"} for k in range(n)]  # fmt: skip
    group = {"source": f"a {words[5]} {words[6]} {words[7]} scene", "edits": edits,
             "cross": [{"from": 0, "to": 1, "text": f"swap {words[0]} for {words[1]}"}]}  # fmt: skip
    return json.dumps(group)


def ok_group(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return 200, chat(group_answer(body))


def conversation(k: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You write JSON."}, {"role": "user", "content": f"group {k}"}]


def test_request_body_key_and_answers_in_input_order_under_concurrency(monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY)
    with Stub() as stub:
        # the later a request comes in the input, the sooner its answer: a pool that returned in completion order
        # would reverse the answers
        stub.reply = lambda body: (time.sleep(0.02 * (8 - body["seed"] % 10)) or 200, chat(f"answer {body['seed']}"))
        backend = OpenAIChat(stub.url, "stub-model", api_key_env="MY_KEY", temperature=0.7, max_tokens=99,
                             concurrency=4, response_format_json=True)  # fmt: skip
        seeds = [10 * k + k for k in range(8)]
        answers = backend.generate([conversation(k) for k in range(8)], seeds, num_edits=3)
    assert answers == [f"answer {s}" for s in seeds]
    assert len(stub.requests) == 8
    by_seed = {r["seed"]: r for r in stub.requests}
    for k, s in enumerate(seeds):
        r = by_seed[s]
        assert r["path"] == "/v1/chat/completions"
        assert r["model"] == "stub-model" and r["messages"] == conversation(k)
        assert r["temperature"] == 0.7 and r["max_tokens"] == 99 and r["top_p"] == 0.95
        assert r["response_format"] == {"type": "json_object"}
    assert all(h["Authorization"] == f"Bearer {KEY}" for h in stub.headers)
    # the key is in no settings (they are written to disk and shown on the dataset card)
    assert KEY not in json.dumps(backend.settings())
    assert backend.settings()["model"] == "stub-model"


def test_no_key_sends_no_header_and_an_auth_error_names_the_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with Stub() as stub:
        stub.fail_first, stub.fail_status = 1, 401
        backend = OpenAIChat(stub.url, "m", concurrency=1, backoff=0.0)
        with pytest.raises(ServerError, match=r"HTTP 401: server overloaded.*OPENAI_API_KEY .*is not set"):
            backend.generate([conversation(0)], [1], 3)
        assert "Authorization" not in stub.headers[0]
        assert backend.generate([conversation(0)], [1], 3) == [group_answer({"seed": 1})]


def test_5xx_and_429_are_retried_with_exponential_backoff():
    with Stub() as stub:
        stub.fail_first = 3
        backend = OpenAIChat(stub.url, "m", concurrency=1, max_retries=3, backoff=0.5)
        waits: list[float] = []
        backend.client.sleep = waits.append
        assert backend.generate([conversation(0)], [7], 3) == [group_answer({"seed": 7})]
        assert len(stub.requests) == 4 and waits == [0.5, 1.0, 2.0]
        stub.requests.clear()
        stub.fail_first, stub.fail_status = 1, 429
        waits.clear()
        assert backend.generate([conversation(0)], [8], 3) == [group_answer({"seed": 8})]
        assert len(stub.requests) == 2 and waits == [0.5]


def test_a_request_failing_after_all_retries_names_url_status_and_message():
    with Stub() as stub:
        stub.fail_first = 100
        backend = OpenAIChat(stub.url, "m", concurrency=1, max_retries=2, backoff=0.0)
        with pytest.raises(ServerError) as err:
            backend.generate([conversation(0)], [1], 3)
        assert len(stub.requests) == 3
    message = str(err.value)
    assert f"POST {stub.url}/chat/completions failed" in message
    assert "HTTP 503 (after 3 attempts): server overloaded, try later" in message


def test_a_4xx_is_not_retried_and_its_message_is_quoted():
    with Stub() as stub:
        stub.reply = lambda body: (400, {"error": {"message": "The model `nope` does not exist.", "code": 404}})
        backend = OpenAIChat(stub.url, "nope", concurrency=1, max_retries=5, backoff=10.0)
        with pytest.raises(ServerError, match=r"/v1/chat/completions failed: HTTP 400: The model `nope` does not"):
            backend.generate([conversation(0)], [1], 3)
        assert len(stub.requests) == 1  # a 10 s backoff would have shown too


def test_connection_errors_are_retried_then_reported():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = OpenAIChat(f"http://127.0.0.1:{port}/v1/", "m", concurrency=1, max_retries=2, backoff=0.25)
    waits: list[float] = []
    backend.client.sleep = waits.append
    with pytest.raises(ServerError, match=rf"POST http://127.0.0.1:{port}/v1/chat/completions failed: connection "
                                          r"error \(after 3 attempts\)"):  # fmt: skip
        backend.generate([conversation(0)], [1], 3)
    assert waits == [0.25, 0.5]


def test_bad_arguments_and_bad_responses_fail_clearly():
    with pytest.raises(ValueError, match="base_url must be an http"):
        OpenAIChat("127.0.0.1:8000", "m")
    with pytest.raises(ValueError, match="concurrency must be a positive"):
        OpenAIChat("http://127.0.0.1:1/v1", "m", concurrency=0)
    with pytest.raises(ValueError, match="choose one of"):
        OpenAIChat("http://127.0.0.1:1/v1", "m", response_format_json=True, json_schema=True)
    with pytest.raises(ValueError, match="bad init_args"):
        build_backend("coalign.synthesis.openai_backend.OpenAIChat", {"base_url": "http://x", "api_key": "k"},
                      ChatBackend)  # fmt: skip
    with Stub() as stub:
        stub.reply = lambda body: (200, {"choices": []})
        backend = OpenAIChat(stub.url, "m", concurrency=1)
        with pytest.raises(ServerError, match=r"no choices\[0\].message.content"):
            backend.generate([conversation(0)], [1], 3)


def test_json_schema_mode_sends_the_group_schema_for_the_calls_num_edits():
    with Stub() as stub:
        backend = OpenAIChat(stub.url, "m", concurrency=2, json_schema=True, extra_body={"top_k": 20})
        backend.generate([conversation(0), conversation(1)], [1, 2], num_edits=2)
    for r in stub.requests:
        assert r["top_k"] == 20
        fmt = r["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "group"
        assert fmt["json_schema"]["schema"] == group_schema(2, cross=True)
    edits = group_schema(2)["properties"]["edits"]
    assert (edits["minItems"], edits["maxItems"]) == (2, 2)
    assert group_schema(3)["properties"]["cross"]["items"]["properties"]["to"] == {"type": "integer", "minimum": 0,
                                                                                  "maximum": 2}  # fmt: skip
    assert "cross" not in group_schema(3, cross=False)["properties"]


def _logprobs(pairs: list[tuple[str, float]]) -> dict[str, Any]:
    top = [{"token": t, "logprob": math.log(p)} for t, p in pairs]
    return {"content": [{"token": pairs[0][0], "logprob": top[0]["logprob"], "top_logprobs": top}]}


def test_judge_scores_yes_over_yes_plus_no_from_logprobs_and_sends_the_pair_side_by_side():
    answers = {
        "a": {"choices": [{"message": {"content": "Yes"}, "logprobs": _logprobs(
            [("Yes", 0.6), (" yes", 0.1), ("No", 0.2), ("Maybe", 0.05)])}]},  # (0.6 + 0.1) / 0.9
        "b": {"choices": [{"message": {"content": "No."}}]},  # no logprobs: the text decides
        "c": {"choices": [{"message": {"content": "Yes"}, "logprobs": _logprobs([("no", 0.5), ("NO", 0.25)])}]},
    }  # fmt: skip
    with Stub() as stub:
        stub.reply = lambda body: (200, answers[body["messages"][0]["content"][1]["text"].split("'")[1]])
        judge = OpenAIJudge(stub.url, "vlm", question="Changed as '{text}'?", concurrency=3)
        left, right = Image.new("RGB", (20, 10), "red"), Image.new("RGB", (10, 10), "blue")
        scores = judge.judge([left] * 3, [right] * 3, ["a", "b", "c"])
        assert scores == pytest.approx([0.7 / 0.9, 0.0, 0.0])
        r = stub.requests[0]
        assert r["max_tokens"] == 1 and r["logprobs"] is True and r["top_logprobs"] == 20 and r["temperature"] == 0
        assert r["messages"][0]["content"][1]["text"].endswith("? Answer yes or no.")
        url = r["messages"][0]["content"][0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        pair = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert pair.size == (20 + 1 + 10, 10)  # side by side with a gap of 0.08 * height
        assert pair.getpixel((0, 0)) == (255, 0, 0) and pair.getpixel((30, 9)) == (0, 0, 255)
        stub.reply = lambda body: (200, chat("Perhaps"))
        with pytest.raises(ServerError, match="answered 'perhaps', neither yes nor no"):
            judge.judge([left], [right], ["a"])
    assert isinstance(build_backend("OpenAIJudge", {"base_url": stub.url, "model": "v"}, JudgeBackend), OpenAIJudge)


def _yaml_with_backend(tmp_path: Path, url: str) -> Path:
    """``tiny.yaml`` whose prompts stage names the OpenAI backend (the first ``backend: null`` is the prompts')."""
    text = TINY_CONFIG.read_text()
    block = (f"backend: {{class_path: coalign.synthesis.openai_backend.OpenAIChat, init_args: {{base_url: '{url}', "
             "model: stub-model, concurrency: 3, backoff: 0.0, max_retries: 2, api_key_env: MY_KEY}}")  # fmt: skip
    assert text.count("backend: null") >= 2
    path = tmp_path / "openai.yaml"
    path.write_text(text.replace("backend: null", block, 1))
    return path


def test_a_whole_prompts_stage_through_the_backend_from_a_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY)
    config = load_config(_yaml_with_backend(tmp_path, "http://127.0.0.1:9/v1"), [])
    assert config.prompts.backend["class_path"] == "coalign.synthesis.openai_backend.OpenAIChat"
    first_seeds = {derive_seed(config.seed, "prompts", i, 0): i for i in range(config.prompts.num_groups)}
    bad = next(s for s, i in first_seeds.items() if i == 5)
    with Stub() as stub:
        config.prompts.backend["init_args"]["base_url"] = stub.url
        stub.fail_first = 2  # 503s: retried inside the backend, invisible to the stage
        # item 5 is refused (400): its block is retried item by item, then item 5 alone is recorded as failed
        stub.reply = lambda body: (400, {"error": {"message": "prompt too long"}}) if body["seed"] == bad else (
            200, chat(group_answer(body)))  # fmt: skip
        reports = run_tiny(tmp_path / "out", config, stages=("prompts",))
        assert reports["failed"] == {"prompts": 1}
        failure = read_json(next((tmp_path / "out" / "failures" / "prompts").glob("*/*.json")))
        assert failure["id"].endswith("5") and failure["error"].startswith("ServerError: POST ")
        assert "HTTP 400: prompt too long" in json.dumps(failure) and "/v1/chat/completions" in json.dumps(failure)
        assert reports["prompts"]["ok"] == 7 and reports["prompts"]["failed"] == 1
        # the next run redoes only the block of the failed item (blocks of batch_size 4 are recomputed whole)
        stub.requests.clear()
        stub.fail_first, stub.reply = 0, ok_group
        reports = run_tiny(tmp_path / "out", config, stages=("prompts",))
        assert sorted(r["seed"] for r in stub.requests) == sorted(s for s, i in first_seeds.items() if i >= 4)
    assert reports["failed"] == {} and reports["prompts"]["ok"] == 8 and reports["prompts"]["kept"] == 8
    groups = read_jsonl(tmp_path / "out" / "prompts" / "groups.jsonl")
    assert [g["index"] for g in groups] == list(range(8))
    for g in groups:  # every group is the stub's answer to that item's first seed
        seed = derive_seed(config.seed, "prompts", g["index"], 0)
        expected = json.loads(group_answer({"seed": seed}))
        assert g["source"] == expected["source"] and g["edits"] == expected["edits"]
    settings = read_json(tmp_path / "out" / "prompts" / "settings.json")
    assert settings["backend"]["model"] == "stub-model" and KEY not in json.dumps(settings)
    assert stub.url not in json.dumps(settings)  # another server may resume the run


def test_the_shipped_example_config_builds_the_backend():
    config = load_config(TINY_CONFIG.parent / "openai_example.yaml", [])
    backend = chat_backend(config.prompts)
    assert isinstance(backend, OpenAIChat) and backend.json_schema and not backend.response_format_json
    assert backend.client.url == "http://127.0.0.1:8000/v1/chat/completions"
    assert backend.client.api_key_env == "OPENAI_API_KEY" and config.prompts.batch_size >= backend.concurrency
