"""The OpenAI-compatible server: real clients on a loopback port, texts equal to sequential cllm_rt.generate
(float64 tiny model), stop strings, disconnects, overload, bad bodies, auth, the CLI."""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

import cllm_rt
from cllm_rt import serve
from training_fixtures import EOS, byte_tokenizer, save_model, tiny_lm

NAME = "tiny"
CONTEXT = 4096  # long enough that a request cut short by its client could not have finished by itself
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPTS = ["Hello there", "ab", "The quick brown fox", "x", "def f(n):\n    return", "Grüße, €5"]


def _model(eos=EOS):
    """``eos``: every prompt here meets it ("Hello there" after 8 tokens, "ab" after 175); None: they never end."""
    model = tiny_lm(dtype=torch.float64, max_position_embeddings=CONTEXT)
    model.generation_config.eos_token_id = eos
    return model


@pytest.fixture
def endless(tokenizer):
    """A server whose requests run to their max_tokens (thousands of tokens: seconds) unless cut short."""
    with serve.background(serve.create_app(_model(eos=None), tokenizer, model_name=NAME, max_batch=1,
                                           max_queue=1)) as url:
        yield url


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def reference(tokenizer):
    """Expected (text, finish_reason, completion tokens) of one request, decoded alone by cllm_rt.generate
    on a model of its own (the server's model is the server's)."""
    model = _model()

    def expected(prompt: list[int], max_tokens: int, stop=(), eos=EOS, **sampling):
        """``sampling``: temperature, top_k, top_p, seed for cllm_rt.generate(do_sample=True); none: greedy."""
        out = cllm_rt.generate(model, torch.tensor([prompt]), max_new_tokens=max_tokens, eos_token_id=eos,
                               **({"do_sample": True, "top_k": 0, **sampling} if sampling else {}))
        new = out.sequences[0, len(prompt):].tolist()
        text = tokenizer.decode([t for t in new if t != eos], skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        if hits:
            return text[:min(hits)], "stop"
        return text, "stop" if eos in new else "length"

    return expected


@pytest.fixture(scope="module")
def url(tokenizer):
    with serve.background(serve.create_app(_model(), tokenizer, model_name=NAME, max_batch=4, max_queue=8)) as url:
        yield url


def _ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


def _chat_ids(tokenizer, content: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def _client(url, **options):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60, **options)


def _health(url, until, timeout=30.0):
    """Poll /health until ``until(answer)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.get(f"{url}/health", timeout=10).json()
        if until(answer) or time.monotonic() > deadline:
            return answer
        time.sleep(0.02)


def _one(url, kind: str, prompt: str, max_tokens: int, stream: bool, stop=None):
    """(text, finish_reason) of one request through the openai client."""
    client = _client(url)
    if kind == "chat":
        request = dict(model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stop=stop)
        if not stream:
            choice = client.chat.completions.create(**request).choices[0]
            return choice.message.content, choice.finish_reason
        chunks = list(client.chat.completions.create(**request, stream=True))
        return ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                chunks[-1].choices[0].finish_reason)
    request = dict(model=NAME, prompt=prompt, max_tokens=max_tokens, stop=stop)
    if not stream:
        choice = client.completions.create(**request).choices[0]
        return choice.text, choice.finish_reason
    chunks = list(client.completions.create(**request, stream=True))
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


def test_concurrent_requests_equal_sequential_generate(url, tokenizer, reference):
    """Streaming and whole answers, completions and chat, sent at once: they join and leave one batch."""
    jobs = [(kind, prompt, 10 + 7 * i, i % 2 == 0)
            for i, (kind, prompt) in enumerate((k, p) for p in PROMPTS for k in ("completion", "chat"))]
    expected = [reference(_chat_ids(tokenizer, p) if k == "chat" else _ids(tokenizer, p), n) for k, p, n, _ in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: _one(url, *job), jobs))
    assert got == expected
    assert {reason for _, reason in got} == {"stop", "length"}


def test_sampled_answers_equal_the_one_token_sampler_and_reproduce_from_their_seed(url, tokenizer, reference):
    """Greedy and sampled rows in one batch: each text equals cllm_rt.generate alone with the same settings
    (itself identical to one-token-at-a-time sampling, tests/test_sampling.py); a request without a seed is told
    the one it got, and sending that seed again gives the same text."""
    fox, hello = _ids(tokenizer, "The quick brown fox"), _ids(tokenizer, "Hello there")
    bodies = [dict(prompt="Hello there"), dict(prompt="The quick brown fox", temperature=1.0, seed=5),
              dict(prompt="The quick brown fox", temperature=0.7, top_k=20, top_p=0.9, seed=2**40),
              dict(prompt="The quick brown fox", temperature=1.3)]

    def post(body):
        response = httpx.post(f"{url}/v1/completions", timeout=60, json=dict(model=NAME, max_tokens=40, **body))
        assert response.status_code == 200, response.text
        return response.json()

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(post, bodies))
    texts = [a["choices"][0]["text"] for a in answers]
    assert "seed" not in answers[0] and texts[0] == reference(hello, 40)[0]
    assert answers[1]["seed"] == 5 and texts[1] == reference(fox, 40, temperature=1.0, seed=5)[0]
    assert texts[2] == reference(fox, 40, temperature=0.7, top_k=20, top_p=0.9, seed=2**40)[0]
    drawn = answers[3]["seed"]
    assert isinstance(drawn, int) and texts[3] == reference(fox, 40, temperature=1.3, seed=drawn)[0]
    assert post(dict(prompt="The quick brown fox", temperature=1.3, seed=drawn))["choices"][0]["text"] == texts[3]
    assert len(set(texts[1:])) == 3  # the seeds and settings did change the samples


def test_n_choices_are_rows_with_consecutive_seeds(url, tokenizer, reference):
    client = _client(url)
    answer = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "ab"}], max_tokens=30,
                                            temperature=1.0, n=3, seed=77)
    prompt = _chat_ids(tokenizer, "ab")
    assert [c.index for c in answer.choices] == [0, 1, 2] and answer.model_extra["seed"] == 77
    assert [(c.message.content, c.finish_reason) for c in answer.choices] == [
        reference(prompt, 30, temperature=1.0, seed=77 + i) for i in range(3)]
    assert answer.usage.completion_tokens >= 3


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_strings_cut_the_text_before_them(url, tokenizer, reference, stream):
    prompt = "The quick brown fox"
    full, _ = reference(_ids(tokenizer, prompt), 60)
    stop = next(full[i:i + 2] for i in range(5, len(full)) if full[i:i + 2].isprintable() and full[i:i + 2].strip())
    expected = reference(_ids(tokenizer, prompt), 60, [stop, "never appears"])
    assert expected[1] == "stop" and len(expected[0]) < len(full)
    assert _one(url, "completion", prompt, 60, stream, [stop, "never appears"]) == expected


def test_text_stream_emits_whole_characters_and_holds_back_a_possible_stop(tokenizer):
    text = serve.TextStream(tokenizer, stop=["<END>"])
    deltas = []
    for token in "a€<EN".encode():  # € is three bytes, three tokens
        assert not text.push(token)
        deltas.append(text.take())
    assert deltas == ["a", "", "", "€", "", "", ""]  # "<EN" might be the start of "<END>"
    assert not text.push(ord("x")) and text.take() == "<ENx"
    for token in "<END>tail".encode():
        if text.push(token):
            break
    assert text.stopped and text.take(final=True) == "" and text.text == "a€<ENx"


def _generated(url) -> float:
    metrics = httpx.get(f"{url}/metrics").text
    return float(next(line.split()[1] for line in metrics.splitlines()
                      if line.startswith("cllm_rt_generation_tokens_total")))


def test_a_disconnected_client_frees_its_row(endless):
    """Streaming and not: the row leaves the batch long before its max_tokens could be reached."""
    url, payload = endless, dict(model=NAME, prompt="ab", max_tokens=CONTEXT - 8)
    with httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json={**payload, "stream": True}) as response:
            next(response.iter_lines())  # decoding has started; leaving the block hangs up
        assert _health(url, lambda h: h["running"] == 0)["running"] == 0
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            client.post("/v1/completions", json=payload, timeout=httpx.Timeout(60, read=0.5))
    assert _health(url, lambda h: h["running"] == 0)["running"] == 0
    assert _generated(url) < CONTEXT - 8  # both rows together made fewer tokens than one alone would


def test_overload_is_answered_at_once_and_the_queue_drains(endless, tokenizer, reference):
    """One row decoding and one request waiting fill the server; the next request gets 503 at once."""
    url = endless
    with httpx.Client(base_url=url, timeout=60) as client:
        long = dict(model=NAME, prompt="ab", max_tokens=CONTEXT - 8, stream=True)
        with client.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # kept: a dropped iterator would close the connection
            next(lines)  # the one row is taken
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                queued = pool.submit(_one, url, "completion", "x", 12, False)
                assert _health(url, lambda h: h["waiting"] == 1)["waiting"] == 1
                refused = client.post("/v1/completions", json=dict(model=NAME, prompt="x", max_tokens=4))
                assert refused.status_code == 503 and "overloaded" in refused.json()["error"]["message"]
                running.close()  # frees the row: the queued request runs
                assert queued.result(timeout=60) == reference(_ids(tokenizer, "x"), 12, eos=None)


@pytest.mark.parametrize("body, status, message", [
    (b"{", 400, "not valid JSON"),
    (b"[1, 2]", 400, ""),
    (json.dumps({"model": NAME}), 400, "prompt"),
    (json.dumps({"model": NAME, "prompt": "x", "max_tokens": "many"}), 400, "max_tokens"),
    (json.dumps({"model": NAME, "prompt": "x", "max_tokens": 0}), 400, "max_tokens"),
    (json.dumps({"model": NAME, "prompt": "x", "temperature": -0.5}), 400, "temperature"),
    (json.dumps({"model": NAME, "prompt": "x", "n": 2}), 400, "n=2: greedy"),
    (json.dumps({"model": NAME, "prompt": "x", "n": 9, "temperature": 1.0}), 400, "n must be between 1 and 8"),
    (json.dumps({"model": NAME, "prompt": "x", "n": 2, "temperature": 1.0, "stream": True}), 400, "with stream"),
    (json.dumps({"model": NAME, "prompt": "x", "temperature": 1.0, "top_p": 0.0}), 400, "top_p must be in (0, 1]"),
    (json.dumps({"model": NAME, "prompt": "x", "top_k": -2}), 400, "top_k must be an integer >= 0"),
    (json.dumps({"model": NAME, "prompt": "x", "temperature": 1.0, "seed": "7"}), 400, "seed"),
    (json.dumps({"model": NAME, "prompt": "x", "presence_penalty": 0.5}), 400, "presence_penalty"),
    (json.dumps({"model": NAME, "prompt": "x", "logprobs": 2}), 400, "logprobs"),
    (json.dumps({"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), 400, "at most 4"),
    (json.dumps({"model": NAME, "prompt": "x", "max_tokens": CONTEXT}), 400, "max_position_embeddings"),
    (json.dumps({"model": NAME, "prompt": [1, 99999]}), 400, "token ids"),
    (json.dumps({"model": NAME, "prompt": ""}), 400, "empty"),
    (json.dumps({"model": "other", "prompt": "x"}), 404, "serves 'tiny'"),
    (b"x" * (2 << 20), 413, ""),
])
def test_bad_completion_bodies_get_errors_and_the_server_lives_on(url, body, status, message):
    response = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    if status != 413:  # Starlette's body limit answers in plain text
        assert message in response.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


@pytest.mark.parametrize("messages, message", [
    ([], "messages"),
    ([{"content": "hi"}], "role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text content"),
])
def test_bad_chat_bodies_get_errors(url, messages, message):
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "messages": messages})
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_a_failed_step_fails_its_requests_and_the_server_lives_on(tokenizer, reference, monkeypatch):
    failures = iter([True])

    class Failing(serve.engine.Decoder):
        def decode(self):
            if next(failures, False):
                raise FloatingPointError("the model produced NaN")
            return super().decode()

    monkeypatch.setattr(serve.engine, "Decoder", Failing)
    with serve.background(serve.create_app(_model(), tokenizer, model_name=NAME)) as url:
        failed = httpx.post(f"{url}/v1/completions", json=dict(model=NAME, prompt="x", max_tokens=5))
        assert failed.status_code == 500 and "NaN" in failed.json()["error"]["message"]
        assert _one(url, "completion", "x", 5, False) == reference(_ids(tokenizer, "x"), 5)


def test_models_and_metrics(url):
    models = _client(url).models.list()
    assert [m.id for m in models.data] == [NAME]
    _one(url, "completion", "ab", 5, True)
    metrics = httpx.get(f"{url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("cllm_rt_requests_total{endpoint=\"/v1/completions\",status=\"200\"}", "cllm_rt_tokens_per_forward",
                 "cllm_rt_queue_depth", "cllm_rt_time_to_first_token_seconds_bucket",
                 "cllm_rt_time_per_output_token_seconds_bucket", "cllm_rt_request_latency_seconds_count"):
        assert name in metrics.text


def test_api_key(tokenizer):
    app = serve.create_app(_model(), tokenizer, model_name=NAME, api_key="sekret")
    with serve.background(app) as url:
        for headers in ({}, {"authorization": "Bearer wrong"}):
            response = httpx.get(f"{url}/v1/models", headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            _client(url).completions.create(model=NAME, prompt="x", max_tokens=2)
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
        assert keyed.completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(f"{url}/health").status_code == 200  # health stays open to probes


def test_the_cli_serves_a_model_directory(tmp_path, tokenizer):
    directory = save_model(_model(), tmp_path / "model", tokenizer)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "CLLM_RT_API_KEY": "k", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "server.log", "w+")  # a file, not a pipe nobody drains
    server = subprocess.Popen([sys.executable, "-m", "cllm_rt", "serve", "--model", directory, "--port", str(port),
                               "--dtype", "float64", "--threads", "1"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while server.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert server.poll() is None, (tmp_path / "server.log").read_text()
        answer = httpx.post(f"{url}/v1/chat/completions", headers={"authorization": "Bearer k"}, timeout=60,
                            json={"model": directory, "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 3})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
    finally:
        server.terminate()
        server.wait(30)
        log.close()
