"""`zoo serve MODEL`: an OpenAI-compatible HTTP server over zoo.infer's continuous-batching Engine.

    zoo serve smollm2-135m --port 8000 --max-batch 16
    curl http://127.0.0.1:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 16}'

Endpoints: POST /v1/completions and /v1/chat/completions (the tokenizer's chat template), both
streaming as server-sent events in OpenAI's chunk format when `stream` is true; GET /v1/models;
GET /health (with the engine's slot and KV-block counts).

One thread owns the Engine (it is not thread-safe) and steps it while there is work. Request
handlers on the event loop reach it only through a queue of commands (add, cancel), applied
between steps; the thread hands each request's token events back to that request's asyncio queue
with `loop.call_soon_threadsafe`. Text is made on the event loop: ids are detokenised
incrementally (never half a UTF-8 character) and watched for the request's stop strings, which
end it early (the engine's request is cancelled, its slot freed). A client that goes away
cancels its request the same way. Every bad request gets a 4xx JSON error naming the field, in
OpenAI's shape; nothing one request does stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import collections
import contextlib
import dataclasses
import json
import queue
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from zoo.infer.text import load_for_generation
from zoo.tokenizer import ByteTokenizer

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512  # chat has no fixed default; a bounded one keeps a slot from hanging


# ---------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def validation_error(errors: Sequence[dict]) -> ApiError:
    """FastAPI's validation errors as one OpenAI error naming the first bad field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg"))
        return ApiError(400, f"the request body is not valid JSON: {detail}", None, "invalid_json")
    if not loc:
        return ApiError(400, f"the request body must be a JSON object ({first.get('msg')})")
    # a union's alternatives add their type names ('str', 'list[int]') to the location
    path = ".".join([str(loc[0])] + [str(part) for part in loc[1:] if not _is_type_tag(part)])
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"{path}: not a field zoo serve takes (OpenAI's, and the extensions "
                        "top_k, repetition_penalty, ignore_eos)", str(loc[0]),
                        "unsupported_parameter")
    got = first.get("input")
    shown = "" if first.get("type") == "missing" else f" (got {json.dumps(got)[:80]})"
    return ApiError(400, f"{path}: {first.get('msg')}{shown}", str(loc[0]))


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none")
                                      or "[" in part or part.startswith("function-"))


# ---------------------------------------------------------------------------------------------
# Request bodies (OpenAI's fields; extensions: top_k, repetition_penalty, ignore_eos)


class _Body(BaseModel):
    # a field the server does not know is refused by name, not ignored: a client asking for
    # something (ignore_eos, say) learns it was not done
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, strict=True)
    temperature: float = Field(1.0, strict=True)
    top_p: float = Field(1.0, strict=True)
    top_k: int = Field(0, strict=True)
    repetition_penalty: float = Field(1.0, strict=True)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, strict=True)
    n: int = Field(1, strict=True)
    stream: bool = Field(False, strict=True)
    stream_options: dict[str, bool] | None = None
    ignore_eos: bool = Field(False, strict=True)  # vLLM's: generate max_tokens whatever comes
    # accepted only at their neutral values: the server does not implement them
    presence_penalty: float = Field(0.0, strict=True)
    frequency_penalty: float = Field(0.0, strict=True)
    logit_bias: dict[str, float] | None = None
    # OpenAI's fields that change nothing in the answer: accepted and ignored
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None


class CompletionBody(_Body):
    prompt: str | list[int] | list[str]
    echo: bool = Field(False, strict=True)
    logprobs: int | None = Field(None, strict=True)
    best_of: int | None = Field(None, strict=True)
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, strict=True)
    logprobs: bool = Field(False, strict=True)
    top_logprobs: int | None = Field(None, strict=True)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # without tools, nothing to choose
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


def check_unsupported(body: _Body) -> None:
    """Fields the server does not implement are refused by name unless neutral, never ignored."""
    neutral = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None,
               "echo": False, "logprobs": (None, False), "top_logprobs": (None, 0),
               "best_of": (None, 1), "suffix": None, "tools": None,
               "response_format": (None, {"type": "text"})}
    for field, allowed in neutral.items():
        if field not in type(body).model_fields:
            continue
        value = getattr(body, field)
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if value not in allowed and not (value in ({}, []) and None in allowed):
            shown = ", ".join(json.dumps(a) for a in allowed)
            raise ApiError(400, f"{field}={json.dumps(value)} is not supported by zoo serve "
                           f"(only {shown})", field, "unsupported_parameter")


# ---------------------------------------------------------------------------------------------
# Text: incremental detokenisation and stop strings


class IncrementalDetokenizer:
    """Token ids in, new text out, never half a character.

    Byte-level BPE splits a multi-byte character across tokens; decoding a window of ids and
    keeping only what follows the window's already-read part (vLLM's prefix/read offsets) emits
    a character once its last byte has come, at constant cost per token. The window starts on the
    prompt's last ids, so a word's leading space decodes as it would after the prompt.
    """

    def __init__(self, tokenizer, prompt: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.bytes = (codecs.getincrementaldecoder("utf-8")(errors="replace")
                      if isinstance(tokenizer, ByteTokenizer) else None)
        self.ids = list(prompt[-4:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        if self.bytes is not None:
            return self.bytes.decode(bytes([token]))
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is still held back (an unfinished character, as the replacement character)."""
        if self.bytes is not None:
            return self.bytes.decode(b"", final=True)
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        # a partial multi-byte character decodes to U+FFFD until its last piece arrives
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]


class StopStrings:
    """Generated text in, the text safe to send out, until one of `stops` appears.

    Text that could be the start of a stop string is held back until it is not; the stop string
    itself is never sent (OpenAI's semantics).
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text, self.sent, self.hit = "", 0, False

    def feed(self, piece: str) -> str:
        if self.hit:
            return ""
        self.text += piece
        if not self.stops:
            return self.flush()
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            cut = min(found)
            self.text, self.hit = self.text[:cut], True
            return self.flush()
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text) - self.sent), hold, -1):
                if self.text.endswith(stop[:k]):
                    hold = k
                    break
        out = self.text[self.sent:len(self.text) - hold]
        self.sent += len(out)
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


# ---------------------------------------------------------------------------------------------
# The engine's thread


@dataclasses.dataclass
class Submission:
    """One request on its way through the engine thread; `events` receives, in order, the
    engine's TokenEvents, or an Exception when the engine failed it. `stepped_at` holds, for
    each TokenEvent in `events`, the perf_counter time its step ended."""

    request: Any  # zoo.infer.engine.Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    accepted: asyncio.Future  # the engine's request id, or the ValueError of Engine.add
    request_id: int | None = None
    stepped_at: collections.deque = dataclasses.field(default_factory=collections.deque)

    def deliver(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def settle(self, outcome: int | BaseException) -> None:
        def set_outcome():
            if self.accepted.done():
                return
            if isinstance(outcome, BaseException):
                self.accepted.set_exception(outcome)
            else:
                self.accepted.set_result(outcome)

        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(set_outcome)


def _hand_over(batch: list[tuple[Submission, Any]], stepped_at: float) -> None:
    """On the event loop: one step's events into their requests' queues."""
    for submission, event in batch:
        submission.stepped_at.append(stepped_at)
        submission.events.put_nowait(event)


@dataclasses.dataclass
class ServeTiming:
    """Where the server's time per token goes: the engine's steps on its thread, and on the
    event loop the time from a step's end to its chunk handed to the connection."""

    steps: int = 0
    step_s: float = 0.0
    chunks: int = 0
    step_to_write_s: float = 0.0
    engine_thread_cpu_s: float = 0.0  # the engine thread's own CPU time, read after each step

    def as_dict(self) -> dict:
        """Totals (a client differences two readings) and means; CPU seconds of the event loop
        (read here: call it on the loop), the engine's thread, and the whole process (the
        rest is torch's intra-op threads, spinning included)."""
        return {"steps": self.steps, "step_ms_total": 1e3 * self.step_s,
                "step_ms_mean": 1e3 * self.step_s / self.steps if self.steps else None,
                "chunks": self.chunks, "step_to_write_ms_total": 1e3 * self.step_to_write_s,
                "step_to_write_ms_mean": (1e3 * self.step_to_write_s / self.chunks
                                          if self.chunks else None),
                "cpu_s": {"event_loop": time.thread_time(),
                          "engine_thread": self.engine_thread_cpu_s,
                          "process": time.process_time()}}


class EngineThread:
    """Owns the Engine: applies add / cancel commands between steps and steps while there is
    work; sleeps on the command queue when there is none."""

    def __init__(self, engine):
        self.engine = engine
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.running: dict[int, Submission] = {}
        self.stats: dict = dict(engine.stats())
        self.failures = 0
        self.timing = ServeTiming()
        self._thread = threading.Thread(target=self._run, name="zoo-serve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.commands.put(("stop", None))
        self._thread.join(timeout=10)

    def add(self, submission: Submission) -> None:
        self.commands.put(("add", submission))

    def cancel(self, submission: Submission) -> None:
        self.commands.put(("cancel", submission))

    @property
    def steps(self) -> int:
        return self.timing.steps

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            try:
                if not self._iterate():
                    return
            except Exception:  # a bug outside a step (stats, has_work): logged, and go on
                traceback.print_exc()
                self.failures += 1
                time.sleep(0.1)  # a bug that repeats does not spin a core

    def _iterate(self) -> bool:
        """Apply the queued commands, then step once if there is work; False on "stop"."""
        block = not self.engine.has_work()
        try:
            commands = [self.commands.get(block=block)]
        except queue.Empty:
            commands = []
        while True:  # everything queued so far, applied before the next step
            try:
                commands.append(self.commands.get_nowait())
            except queue.Empty:
                break
        for kind, submission in commands:
            if kind == "stop":
                self._fail_all(RuntimeError("the server is shutting down"))
                return False
            if kind == "add":
                self._add(submission)
            else:
                self._cancel(submission)
        if self.engine.has_work():
            self._step()
        self.stats = dict(self.engine.stats())
        return True

    def _add(self, submission: Submission) -> None:
        try:
            request_id = self.engine.add(submission.request)
        except Exception as error:  # a refusal (ValueError) or a bug: the request's, not ours
            if not isinstance(error, ValueError):
                traceback.print_exc()
            submission.settle(error)
            return
        submission.request_id = request_id
        self.running[request_id] = submission
        submission.settle(request_id)

    def _cancel(self, submission: Submission) -> None:
        if self.running.pop(submission.request_id, None) is not None:
            try:
                self.engine.cancel(submission.request_id)
            except Exception:  # the request is gone from our side either way
                traceback.print_exc()
                self.failures += 1

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception as error:  # a bug in a step fails the requests in it, not the server
            traceback.print_exc()
            self.failures += 1
            self._fail_all(RuntimeError(f"the engine failed: {type(error).__name__}: {error}"))
            return
        ended = time.perf_counter()
        self.timing.steps += 1
        self.timing.step_s += ended - started
        self.timing.engine_thread_cpu_s = time.thread_time()
        # one wake-up of each event loop per step, not one per event: every
        # call_soon_threadsafe writes to the loop's self-pipe and wakes it
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for event in events:
            submission = self.running.get(event.request_id)
            if submission is None:  # cancelled between the step's start and its events
                continue
            batches.setdefault(submission.loop, []).append((submission, event))
            if event.finish_reason is not None:
                del self.running[event.request_id]
        for loop, batch in batches.items():
            with contextlib.suppress(RuntimeError):  # the loop closed: shutting down
                loop.call_soon_threadsafe(_hand_over, batch, ended)

    def _fail_all(self, error: Exception) -> None:
        for request_id, submission in list(self.running.items()):
            submission.deliver(error)
            with contextlib.suppress(Exception):
                self.engine.cancel(request_id)
        self.running.clear()


# ---------------------------------------------------------------------------------------------
# The app


@dataclasses.dataclass
class Served:
    """What the endpoints serve: the model's name, its tokenizer, its limits, its engine."""

    name: str
    tokenizer: Any
    stop_token_ids: tuple[int, ...]
    vocab_size: int
    max_context: int | None  # prompt + generated tokens; None: no limit
    engine: EngineThread
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


@dataclasses.dataclass
class Prepared:
    """A validated request: the prompt's ids and how to generate and cut its text."""

    prompt: list[int]
    stops: list[str]
    engine_request: Any


def _encode_prompt(served: Served, body: CompletionBody) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: a list of {len(prompt)} prompts; zoo serve takes one "
                           "prompt per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = list(served.tokenizer.encode(prompt))
    else:
        bad = [t for t in prompt if not 0 <= t < served.vocab_size]
        if bad:
            raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary "
                           f"[0, {served.vocab_size})", "prompt")
        ids = list(prompt)
    if not ids:
        raise ApiError(400, "prompt: the prompt is empty (it must hold at least one token)",
                       "prompt")
    return ids


def _message_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages.{index}.content: only text parts are supported "
                           f"(got type {json.dumps(part.get('type'))})", "messages")
        parts.append(part["text"])
    return "".join(parts)


def _encode_chat(served: Served, body: ChatBody) -> list[int]:
    tokenizer = served.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise ApiError(400, f"messages: the tokenizer of {served.name} has no chat template; "
                       "use /v1/completions with a prompt", "messages")
    if not body.messages:
        raise ApiError(400, "messages: the list is empty (it must hold at least one message)",
                       "messages")
    messages = [{"role": m.role, "content": _message_text(m, i)}
                for i, m in enumerate(body.messages)]
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as error:  # the template's own checks (e.g. roles must alternate)
        raise ApiError(400, f"messages: the chat template refused them: {error}",
                       "messages") from None
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return [int(t) for t in ids]


def prepare(served: Served, body: _Body, prompt: list[int], max_tokens_field: str,
            prompt_field: str, default_max_tokens: int) -> Prepared:
    """Every field checked and named before the engine sees the request."""
    from zoo.infer.engine import Request as EngineRequest

    check_unsupported(body)
    max_tokens = getattr(body, max_tokens_field)
    limit = served.max_context
    if limit is not None and len(prompt) >= limit:
        raise ApiError(400, f"{prompt_field}: {len(prompt)} tokens, past this model's context of "
                       f"{limit} tokens (prompt and completion together)", prompt_field,
                       "context_length_exceeded")
    if max_tokens is None:
        max_tokens = default_max_tokens if limit is None else min(default_max_tokens,
                                                                  limit - len(prompt))
    if max_tokens < 1:
        raise ApiError(400, f"{max_tokens_field}={max_tokens} must be at least 1",
                       max_tokens_field)
    if limit is not None and len(prompt) + max_tokens > limit:
        raise ApiError(400, f"{max_tokens_field}={max_tokens}: {len(prompt)} prompt tokens + "
                       f"{max_tokens} is past this model's context of {limit} tokens; ask for "
                       f"at most {limit - len(prompt)}", max_tokens_field,
                       "context_length_exceeded")
    for field, value, low, high in (("temperature", body.temperature, 0.0, 2.0),
                                    ("top_p", body.top_p, 0.0, 1.0)):
        if not low <= value <= high or (field == "top_p" and value == 0.0):
            allowed = "[0, 2]" if field == "temperature" else "(0, 1]"
            raise ApiError(400, f"{field}={value} must be in {allowed}", field)
    if body.top_k < 0:
        raise ApiError(400, f"top_k={body.top_k} must be >= 0 (0 means off)", "top_k")
    if not body.repetition_penalty > 0:
        raise ApiError(400, f"repetition_penalty={body.repetition_penalty} must be > 0",
                       "repetition_penalty")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stops):
        raise ApiError(400, "stop: a stop string is empty", "stop")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options: only allowed when stream is true", "stream_options")
    try:
        request = EngineRequest(prompt=prompt, max_new_tokens=max_tokens,
                                temperature=body.temperature, top_k=body.top_k,
                                top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                                seed=body.seed,
                                stop_token_ids=() if body.ignore_eos else served.stop_token_ids)
    except ValueError as error:
        raise engine_refusal(error, prompt_field) from None
    return Prepared(prompt, stops, request)


# the engine's field names and the API's, in the order a refusal is blamed on them: a prompt
# and a max_new_tokens too long together are refused for the max_tokens asked
ENGINE_FIELDS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
                 "top_k": "top_k", "seed": "seed", "repetition_penalty": "repetition_penalty",
                 "prompt": "prompt"}


def engine_refusal(error: BaseException, prompt_field: str) -> ApiError:
    """The engine's ValueError (it names its own fields) as a 400 naming the API's field."""
    message = str(error)
    param = next((api for field, api in ENGINE_FIELDS.items() if field in message), None)
    param = prompt_field if param == "prompt" else param
    return ApiError(400, message.replace("max_new_tokens", "max_tokens"), param)


@dataclasses.dataclass
class Completion:
    """The outcome of one request: its text pieces as they come, then why it finished."""

    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None


async def _watch_disconnect(request: Request, submission: Submission) -> None:
    """Put a None into the request's queue when its client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            submission.deliver(None)
            return


class RunningRequest:
    """One request in the engine, read as text: `start()` submits it (a refusal raises
    ApiError), each `next()` gives the new text and the progress so far (None once the client
    has gone), and `close()`, synchronous so it also runs in a cancelled task's cleanup, cancels
    the engine's request unless it finished by itself."""

    def __init__(self, served: Served, request: Request, prepared: Prepared, prompt_field: str):
        self.served, self.request, self.prepared = served, request, prepared
        self.prompt_field = prompt_field
        loop = asyncio.get_running_loop()
        self.submission = Submission(prepared.engine_request, loop, asyncio.Queue(),
                                     loop.create_future())
        self.detokenizer = IncrementalDetokenizer(served.tokenizer, prepared.prompt)
        self.stops = StopStrings(prepared.stops)
        self.done = Completion()
        self.stepped_at = 0.0  # when the step of the latest token ended (perf_counter)
        self.watcher: asyncio.Task | None = None
        self.closed = False

    async def start(self) -> None:
        self.served.engine.add(self.submission)
        try:
            await self.submission.accepted
        except ValueError as error:
            self.closed = True
            raise engine_refusal(error, self.prompt_field) from None
        self.watcher = asyncio.create_task(_watch_disconnect(self.request, self.submission))

    def ready(self) -> bool:
        """Whether `next()` has an event waiting (it will not wait for the engine)."""
        return not self.submission.events.empty()

    async def next(self) -> tuple[str, Completion] | None:
        """(new text, progress) for the next token; progress.finish_reason is set on the last."""
        event = await self.submission.events.get()
        if event is None:  # the client went away
            self.close()
            return None
        if isinstance(event, Exception):
            self.close()
            raise ApiError(500, str(event), None, "engine_error", "server_error")
        self.stepped_at = self.submission.stepped_at.popleft()
        done, stop_ids = self.done, self.served.stop_token_ids
        done.completion_tokens += event.token is not None
        reason = event.finish_reason
        no_text = event.token is None or (reason == "stop" and event.token in stop_ids)
        piece = "" if no_text else self.detokenizer.push(event.token)
        if reason is not None:
            piece += self.detokenizer.flush()
        piece = self.stops.feed(piece)
        if self.stops.hit:
            reason = "stop"
        elif reason is not None:
            piece += self.stops.flush()
        done.text += piece
        if reason is not None:
            done.finish_reason = {"cancelled": "stop"}.get(reason, reason)
            self.close()
        return piece, done

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.watcher is not None:
            self.watcher.cancel()
        if self.done.finish_reason is None or self.stops.hit:
            self.served.engine.cancel(self.submission)


def _usage(prepared: Prepared, done: Completion) -> dict:
    return {"prompt_tokens": len(prepared.prompt), "completion_tokens": done.completion_tokens,
            "total_tokens": len(prepared.prompt) + done.completion_tokens}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


CLIENT_GONE = 499  # nginx's status for a client that closed the connection; nobody reads it


async def respond(served: Served, request: Request, body: _Body, prepared: Prepared,
                  chat: bool, prompt_field: str):
    kind = "chatcmpl" if chat else "cmpl"
    response_id, created = f"{kind}-{uuid.uuid4().hex}", int(time.time())
    run = RunningRequest(served, request, prepared, prompt_field)
    await run.start()  # a refusal is a 4xx here, before any response has started

    def chunk(text: str | None, finish_reason: str | None, first: bool = False) -> dict:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first
                     else {} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None,
                      "finish_reason": finish_reason}
        return {"id": response_id, "object": "chat.completion.chunk" if chat else
                "text_completion", "created": created, "model": served.name, "choices": [choice]}

    if not body.stream:
        try:
            while run.done.finish_reason is None:
                if await run.next() is None:
                    return JSONResponse({}, status_code=CLIENT_GONE)
        finally:
            run.close()
        done = run.done
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": done.text},
                      "logprobs": None, "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": done.text, "logprobs": None,
                      "finish_reason": done.finish_reason}
        return JSONResponse({
            "id": response_id, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": served.name, "choices": [choice],
            "usage": _usage(prepared, done)})

    include_usage = bool((body.stream_options or {}).get("include_usage"))
    timing = served.engine.timing

    async def events() -> AsyncIterator[str]:
        try:
            if chat:
                yield _sse(chunk(None, None, first=True))
            while run.done.finish_reason is None:
                written, stepped_at = [], []
                # every token already handed over goes out in one write (one send, one wake-up
                # of the client) when the loop has fallen behind the engine
                while not written or run.ready():
                    step = await run.next()
                    if step is None:
                        return
                    piece, done = step
                    if piece:
                        written.append(_sse(chunk(piece, None)))
                        stepped_at.append(run.stepped_at)
                    if done.finish_reason is not None:
                        written.append(_sse(chunk(None if chat else "", done.finish_reason)))
                        break
                if written:
                    yield "".join(written)
                    now = time.perf_counter()
                    timing.chunks += len(stepped_at)
                    timing.step_to_write_s += sum(now - t for t in stepped_at)
            if include_usage:
                yield _sse({"id": response_id, "object": chunk(None, None)["object"],
                            "created": created, "model": served.name, "choices": [],
                            "usage": _usage(prepared, run.done)})
        except ApiError as error:  # the engine failed mid-stream: said in the stream
            yield _sse(error.body())
        finally:
            run.close()  # also when the response is cancelled because the client went away
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def create_app(served: Served) -> FastAPI:
    """The FastAPI app over `served`; its engine thread runs while the app does."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        served.engine.start()
        try:
            yield
        finally:
            served.engine.stop()

    app = FastAPI(title="zoo serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError):
        return error_response(validation_error(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(error.status_code, f"{request.method} {request.url.path}: "
                                       f"{error.detail}", None, None, kind))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception):
        traceback.print_exception(error)
        return error_response(ApiError(500, f"internal error: {type(error).__name__}: {error}",
                                       None, None, "server_error"))

    def check_model(name: str) -> None:
        if name != served.name:
            raise ApiError(404, f"model: {json.dumps(name)} is not served here; this server "
                           f"serves {json.dumps(served.name)}", "model", "model_not_found")

    @app.get("/health")
    async def health():
        engine = served.engine
        body = {"status": "ok" if engine.alive else "engine stopped", "model": served.name,
                "engine": engine.stats, "steps": engine.steps, "engine_failures": engine.failures,
                "timing": engine.timing.as_dict()}
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": served.created,
                "owned_by": "zoo", "max_model_len": served.max_context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        check_model(body.model)
        prompt = _encode_prompt(served, body)
        prepared = prepare(served, body, prompt, "max_tokens", "prompt",
                           DEFAULT_COMPLETION_MAX_TOKENS)
        return await respond(served, request, body, prepared, chat=False, prompt_field="prompt")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        check_model(body.model)
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        prompt = _encode_chat(served, body)
        prepared = prepare(served, body, prompt, field, "messages", DEFAULT_CHAT_MAX_TOKENS)
        return await respond(served, request, body, prepared, chat=True, prompt_field="messages")

    return app


# ---------------------------------------------------------------------------------------------
# The command


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a save_pretrained directory, a shipped config name "
                   "(untrained weights), a transformers directory / GGUF file, or smollm2-135m")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="attention's KV pool in blocks (default: the engine's)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt tokens prefilled per step, between decode steps")
    p.add_argument("--max-context", type=int, default=None,
                   help="longest prompt + completion in tokens (default: the model's own limit, "
                   "if it has one)")
    p.add_argument("--name", default=None,
                   help="the model name clients send (default: MODEL as given)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"])


def build_served(args: argparse.Namespace) -> Served:
    from zoo.infer.engine import Engine

    for flag in ("max_batch", "block_size", "prefill_chunk", "kv_blocks", "max_context"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={value} must be >= 1")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port={args.port} must be in 0..65535")
    model, tokenizer, note = load_for_generation(args.model, getattr(torch, args.dtype),
                                                 args.device)
    if note:
        print(f"note: {note}", file=sys.stderr)
    limit = model.sequence_limit()
    max_context = args.max_context
    if limit is not None:
        max_context = limit[0] if max_context is None else min(max_context, limit[0])
    stops = tuple(sorted({t for t in (model.config.eos_token_id,
                                      getattr(tokenizer, "eos_token_id", None)) if t is not None}))
    engine = Engine(model, max_batch=args.max_batch, block_size=args.block_size,
                    kv_blocks=args.kv_blocks, prefill_chunk=args.prefill_chunk)
    return Served(name=args.name or args.model, tokenizer=tokenizer, stop_token_ids=stops,
                  vocab_size=model.config.vocab_size, max_context=max_context,
                  engine=EngineThread(engine))


def serve(app: FastAPI, host: str, port: int, log_level: str,
          on_ready: Callable[[str], None]) -> None:
    """Run `app` under uvicorn until interrupted; `on_ready(url)` once the socket listens."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()
                on_ready(f"http://{host}:{bound[1]}")

    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()


def run_serve_command(args: argparse.Namespace) -> int:
    served = build_served(args)

    def ready(url: str) -> None:
        print(f"zoo serve: {served.name} at {url}/v1 (max batch {args.max_batch}; "
              f"Ctrl-C stops)", flush=True)

    serve(create_app(served), args.host, args.port, args.log_level, ready)
    return 0

