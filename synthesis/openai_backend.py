"""Backends on an OpenAI-compatible HTTP server (vLLM, SGLang, llama.cpp, TGI, the OpenAI API): the way to run the
LLM stage at scale.

:class:`OpenAIChat` is a :class:`.backends.ChatBackend` for the prompts stage; :class:`OpenAIJudge` a
:class:`.backends.JudgeBackend` for the ``judge`` filter when the server serves a vision-language model. Both POST
``{base_url}/chat/completions`` with the standard library (no client package), ``concurrency`` requests at a
time from threads (the server batches them), and return answers in input order.

* **Key.** Read from the environment variable named by ``api_key_env`` for each request; the key itself
  never appears in a config or a settings file. Without it no ``Authorization`` header is sent (a local
  ``vllm serve`` without ``--api-key`` needs none).
* **Retries.** Connection errors, timeouts, 429 and 5xx answers are retried ``max_retries`` times, waiting
  ``backoff * 2**attempt`` seconds (or the server's ``Retry-After``, when longer). Other 4xx answers are
  not retried. The last failure raises :class:`ServerError` naming the URL, the status and the server's message;
  the stage runner then records the item under ``failures/`` and the next run retries it.
* **Seeds.** Every request carries its item's seed (a 63-bit integer), so a server that honours ``seed``
  (vLLM does) answers a rerun with the same text.
* **Settings.** Only what determines the answers (model, sampling, response format, extra body) is recorded; the
  URL, concurrency, retries and timeout may change between resumed runs.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from .backends import ChatBackend, JudgeBackend, register_backend
from .config import JUDGE_QUESTION
from .hf_backends import side_by_side

__all__ = ["ServerError", "OpenAIChat", "OpenAIJudge", "group_schema"]

_MESSAGE_CHARS = 500  # of a server's error body quoted in an error


class ServerError(RuntimeError):
    """A request that failed for good (after its retries, or at once for a 4xx other than 429)."""


class _Client:
    """POST JSON to ``{base_url}/chat/completions`` with retries and exponential backoff."""

    def __init__(self, base_url: str, api_key_env: str | None, timeout: float, max_retries: int, backoff: float):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        if max_retries < 0 or backoff < 0 or timeout <= 0:
            got = f"{max_retries}, {backoff}, {timeout}"
            raise ValueError(f"need max_retries >= 0, backoff >= 0 and timeout > 0, got {got}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env, self.timeout = api_key_env, timeout
        self.max_retries, self.backoff = max_retries, backoff
        self.sleep: Callable[[float], None] = time.sleep

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _fail(self, status: str, message: str) -> ServerError:
        hint = ""
        if status in ("HTTP 401", "HTTP 403") and self.api_key_env and not os.environ.get(self.api_key_env):
            hint = f" (the environment variable {self.api_key_env} holding the API key is not set)"
        return ServerError(f"POST {self.url} failed: {status}: {message[:_MESSAGE_CHARS]}{hint}")

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * 2**attempt
            request = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                message = err.read().decode("utf-8", "replace").strip() or str(err.reason)
                status = f"HTTP {err.code}"
                if err.code != 429 and err.code < 500:
                    raise self._fail(status, _server_message(message)) from None
                retry_after = err.headers.get("Retry-After", "") if err.headers else ""
                if retry_after.strip().isdigit():
                    wait = max(wait, float(retry_after))
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, reset, DNS, timeout
                status, message = "connection error", str(getattr(err, "reason", err))
            else:
                try:
                    return json.loads(raw)
                except json.JSONDecodeError:
                    raise self._fail("invalid JSON response", raw.decode("utf-8", "replace")) from None
            if attempt == self.max_retries:
                raise self._fail(f"{status} (after {self.max_retries + 1} attempts)", _server_message(message))
            self.sleep(wait)
        raise AssertionError("unreachable")


def _server_message(body: str) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body itself."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return body
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
    return body


def _in_order(fn: Callable[[Any], Any], items: Sequence[Any], concurrency: int) -> list[Any]:
    """``[fn(x) for x in items]`` on ``concurrency`` threads; the first error (in input order) is raised."""
    if concurrency == 1 or len(items) <= 1:
        return [fn(x) for x in items]
    pool = ThreadPoolExecutor(max_workers=min(concurrency, len(items)), thread_name_prefix="openai")
    try:
        futures = [pool.submit(fn, x) for x in items]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _message_text(response: dict[str, Any], url: str) -> str:
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        got = str(response)[:_MESSAGE_CHARS]
        raise ServerError(f"POST {url}: the response has no choices[0].message.content: {got}") from None
    if not isinstance(content, str):
        raise ServerError(f"POST {url}: choices[0].message.content is {type(content).__name__}, not text")
    return content


def group_schema(num_edits: int, cross: bool = True) -> dict[str, Any]:
    """The JSON schema of a group of ``num_edits`` edits (the group JSON of :mod:`.backends`)."""
    text = {"type": "string"}
    edit = {
        "type": "object",
        "properties": {"caption": text, "forward": text, "backward": text},
        "required": ["caption", "forward", "backward"],
        "additionalProperties": False,
    }
    properties: dict[str, Any] = {
        "source": text,
        "edits": {"type": "array", "items": edit, "minItems": num_edits, "maxItems": num_edits},
    }
    if cross:
        index = {"type": "integer", "minimum": 0, "maximum": num_edits - 1}
        properties["cross"] = {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"from": index, "to": index, "text": text},
                "required": ["from", "to", "text"],
                "additionalProperties": False,
            },
        }
    return {"type": "object", "properties": properties, "required": ["source", "edits"], "additionalProperties": False}


def _check_common(model: str, concurrency: int) -> None:
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be the served model's name (as in GET /v1/models), got {model!r}")
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive number of parallel requests, got {concurrency!r}")


@register_backend
class OpenAIChat(ChatBackend):
    """A chat LLM behind an OpenAI-compatible server, one seeded request per conversation.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (``vllm serve``'s default).
        model: the served model name.
        api_key_env: name of the environment variable holding the API key (never the key itself).
        temperature: sampling temperature.
        top_p: nucleus mass.
        max_tokens: answer budget.
        concurrency: requests in flight at once (threads); the server batches them.
        max_retries: retries of a request after a connection error, a timeout, 429 or 5xx.
        backoff: seconds before the first retry, doubled for each next one.
        timeout: seconds to wait for one answer.
        response_format_json: send ``response_format: {"type": "json_object"}`` (JSON mode).
        json_schema: send the group's JSON schema as ``response_format`` instead (structured outputs: vLLM's
            guided decoding, OpenAI's strict mode), with the ``num_edits`` of each call.
        cross: the schema allows ``cross`` texts (only with ``json_schema``).
        extra_body: more request fields, e.g. ``{top_k: 50, repetition_penalty: 1.05}`` for vLLM.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        temperature: float = 1.0,
        top_p: float = 0.95,
        max_tokens: int = 512,
        concurrency: int = 32,
        max_retries: int = 5,
        backoff: float = 1.0,
        timeout: float = 300.0,
        response_format_json: bool = False,
        json_schema: bool = False,
        cross: bool = True,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        _check_common(model, concurrency)
        if response_format_json and json_schema:
            raise ValueError("choose one of response_format_json and json_schema")
        self.client = _Client(base_url, api_key_env, timeout, max_retries, backoff)
        self.model, self.concurrency = model, concurrency
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.response_format_json, self.json_schema, self.cross = response_format_json, json_schema, cross
        self.extra_body = dict(extra_body or {})

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "model": self.model,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "response_format_json": self.response_format_json,
            "json_schema": self.json_schema,
            "cross": self.cross,
            "extra_body": self.extra_body,
        }

    def request(self, messages: list[dict[str, str]], seed: int, num_edits: int) -> dict[str, Any]:
        """The request body for one conversation."""
        body = {
            **self.extra_body,
            "model": self.model,
            "messages": messages,
            "seed": int(seed),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
        }
        if self.response_format_json:
            body["response_format"] = {"type": "json_object"}
        elif self.json_schema:
            schema = {"name": "group", "schema": group_schema(num_edits, self.cross)}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        return body

    def generate(
        self, conversations: Sequence[list[dict[str, str]]], seeds: Sequence[int], num_edits: int
    ) -> list[str]:
        if len(conversations) != len(seeds):
            raise ValueError(f"{len(conversations)} conversations but {len(seeds)} seeds")

        def one(pair: tuple[list[dict[str, str]], int]) -> str:
            return _message_text(self.client.post(self.request(pair[0], pair[1], num_edits)), self.client.url)

        return _in_order(one, list(zip(conversations, seeds, strict=True)), self.concurrency)


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@register_backend
class OpenAIJudge(JudgeBackend):
    """A vision-language model behind an OpenAI-compatible server, asked a yes/no question about each pair.

    The pair is sent side by side as one PNG (as :class:`.hf_backends.MLLMJudgeBackend` shows it), with
    ``max_tokens: 1``, ``temperature: 0`` and ``logprobs``. The score is ``P(yes) / (P(yes) + P(no))`` over the
    first token's ``top_logprobs`` (tokens that read "yes" / "no" once stripped and lower-cased); a server that
    returns no log-probabilities scores 1.0 for an answer "yes", 0.0 for "no", and an error for anything else.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served vision-language model.
        api_key_env: name of the environment variable holding the API key.
        question: the question, with ``{text}``; " Answer yes or no." is appended.
        top_logprobs: alternatives returned for the first token (vLLM allows up to 20 by default).
        concurrency, max_retries, backoff, timeout: as for :class:`OpenAIChat`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        question: str = JUDGE_QUESTION,
        top_logprobs: int = 20,
        concurrency: int = 16,
        max_retries: int = 5,
        backoff: float = 1.0,
        timeout: float = 300.0,
    ) -> None:
        _check_common(model, concurrency)
        if "{text}" not in question:
            raise ValueError(f"question must contain {{text}}, got {question!r}")
        self.client = _Client(base_url, api_key_env, timeout, max_retries, backoff)
        self.model, self.question, self.top_logprobs, self.concurrency = model, question, top_logprobs, concurrency

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "model": self.model, "question": self.question, "top_logprobs": self.top_logprobs}

    def request(self, reference: Image.Image, target: Image.Image, text: str) -> dict[str, Any]:
        """The request body for one triple."""
        content = [
            {"type": "image_url", "image_url": {"url": _data_url(side_by_side(reference, target))}},
            {"type": "text", "text": self.question.format(text=text) + " Answer yes or no."},
        ]
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 1,
            "temperature": 0.0,
            "seed": 0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }

    def score(self, response: dict[str, Any]) -> float:
        """``P(yes) / (P(yes) + P(no))`` of one response (see the class docstring)."""
        url = self.client.url
        try:
            first = response["choices"][0]["logprobs"]["content"][0]
            alternatives = first.get("top_logprobs") or [first]
        except (KeyError, IndexError, TypeError, AttributeError):
            alternatives = []
        mass = {"yes": 0.0, "no": 0.0}
        for alt in alternatives:
            word = str(alt.get("token", "")).strip().lower()
            if word in mass:
                mass[word] += math.exp(float(alt["logprob"]))
        if mass["yes"] + mass["no"] > 0:
            return mass["yes"] / (mass["yes"] + mass["no"])
        answer = _message_text(response, url).strip().lower().rstrip(".!")
        if answer in mass:
            return 1.0 if answer == "yes" else 0.0
        raise ServerError(f"POST {url}: the judge answered {answer[:80]!r}, neither yes nor no")

    def judge(
        self, references: Sequence[Image.Image], targets: Sequence[Image.Image], texts: Sequence[str]
    ) -> list[float]:
        def one(triple: tuple[Image.Image, Image.Image, str]) -> float:
            return self.score(self.client.post(self.request(*triple)))

        return _in_order(one, list(zip(references, targets, texts, strict=True)), self.concurrency)
