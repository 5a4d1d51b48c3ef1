"""rexft serve's app in-process (``conftest.tiny_serving_app``: a tiny trex model with a prior per request):
generated request bodies never get a 5xx or a wait, the official openai client works, stop strings cut the
text, and one row's failure stays with its request.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch

from conftest import tiny_serving_app

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

ANSWER_SECONDS = 20  # a request that takes longer is one left waiting (a request takes ~0.1 s here)


@pytest.fixture(scope="module")
def client():
    with TestClient(tiny_serving_app(), raise_server_exceptions=False) as client:
        yield client


def post(client, path: str, body):
    """POST ``body`` as JSON text (NaN and Infinity as Python's json writes them; bytes as they are), failing
    on a wait."""
    content = body if isinstance(body, bytes) else json.dumps(body)
    pool = ThreadPoolExecutor(1)
    try:
        future = pool.submit(client.post, path, content=content, headers={"content-type": "application/json"})
        return future.result(timeout=ANSWER_SECONDS)
    finally:
        pool.shutdown(wait=False)  # after a timeout: the test fails now, not when the request ends


# ------------------------------------------------------------------------------ generated request bodies
# Bodies of three kinds, about equally often: valid ones (answered: 200), valid ones with one field given a
# wrong or edge value (mostly 400s naming that field), and wild ones (any JSON where the fields go).
surrogates = st.sampled_from(["\ud800", "a\udfffb", "\udc00\ud800"])
plain_texts = st.text(max_size=12) | st.sampled_from(["", " ", "\x00", "\ufffd", "é" * 40, "Question: yes?"])
texts = plain_texts | surrogates
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
parts = st.fixed_dictionaries({"type": st.just("text"), "text": plain_texts})
VALID = {
    "max_tokens": st.integers(1, 8),
    "temperature": st.floats(0, 2) | st.sampled_from([0, 1e-300, 5e-324, 2]),
    "top_p": st.floats(0, 1, exclude_min=True) | st.sampled_from([5e-324, 1]),
    "n": st.just(1),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "seed": st.integers(-2 ** 63, 2 ** 63 - 1),
    "stream": st.booleans(),
    "user": plain_texts,
}
valid_completions = st.fixed_dictionaries(
    {"model": st.just("tiny"), "prompt": plain_texts | st.lists(st.integers(0, 258), min_size=1, max_size=6)},
    optional=VALID)
valid_chats = st.fixed_dictionaries(
    {"model": st.just("tiny"), "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]),
         "content": plain_texts | st.lists(parts, max_size=2)}), min_size=1, max_size=3)},
    optional={**VALID, "max_completion_tokens": st.integers(1, 8)})
WRONG = {  # wrong types, edges and ranges, and fields the local backend does not implement
    "model": st.sampled_from(["gpt-4o", ""]) | json_values,
    "prompt": texts | st.lists(st.integers(-3, 300), max_size=6) | st.lists(texts, max_size=2) | json_values,
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool"]) | json_values,
         "content": texts | st.lists(st.fixed_dictionaries({"type": st.just("image_url") | json_values,
                                                            "text": texts}), max_size=2) | json_values},
        optional={"name": texts | json_values, "tool_calls": json_values}), max_size=3) | json_values,
    "max_tokens": st.integers(-2, 0) | st.sampled_from([9, 2 ** 63, 10 ** 30, True, 1.0, "4"]) | json_values,
    "max_completion_tokens": st.integers(-1, 0) | st.sampled_from([False, 2.5]) | json_values,
    "temperature": st.floats(-1, 3) | st.sampled_from([-1e-300, True, "0.5"]) | json_values,
    "top_p": st.floats(-0.5, 1.5) | st.sampled_from([0, -0.0, False]) | json_values,
    "n": st.integers(-1, 3) | json_values,
    "stop": texts | st.lists(texts, max_size=6) | json_values,
    "seed": st.integers(-2 ** 64, 2 ** 64) | json_values,
    "stream": json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | json_values}) | json_values,
    "logprobs": st.integers(-1, 6) | st.booleans() | json_values,
    "top_logprobs": st.integers(-1, 21) | json_values,
    "echo": st.booleans() | json_values,
    "presence_penalty": st.floats(-3, 3) | json_values,
    "logit_bias": st.dictionaries(texts, st.floats(-200, 200), max_size=2) | json_values,
    "user": texts | json_values,
    "top_k": json_values,  # not OpenAI's: the local backend refuses it by name
}


def one_field_wrong(bodies):
    return bodies.flatmap(lambda body: st.sampled_from(sorted(WRONG)).flatmap(
        lambda name: WRONG[name].map(lambda value: {**body, name: value})))


raw_bodies = st.sampled_from([b'{"model": "tiny", "prompt": ', b"", b"[]", b"NaN", b'{"model": "tiny", "seed": 1e400}',
                              b'{"model": "tiny", "prompt": "\xff\xfe"}', b'{"model": "tiny", "prompt": "a", "prompt": 3}'])
requests = (st.tuples(st.just("/v1/completions"), valid_completions | one_field_wrong(valid_completions))
            | st.tuples(st.just("/v1/chat/completions"), valid_chats | one_field_wrong(valid_chats))
            | st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
                        json_values | st.dictionaries(st.sampled_from(sorted(WRONG)), json_values) | raw_bodies))


@settings(max_examples=80, deadline=timedelta(seconds=10), suppress_health_check=[HealthCheck.too_slow])
@given(request=requests)
def test_generated_bodies_get_an_answer_or_a_4xx_never_a_5xx(client, request):
    path, body = request
    response = post(client, path, body)
    event(f"status {response.status_code}")  # --hypothesis-show-statistics: how many got past validation
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e[:10] for e in events), response.text
    else:
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert client.get("/health").json() == {"status": "ok", "backend": "local"}


def test_openai_client_gets_answers_streams_and_errors(client):
    """The official client, as a user would point it at the server: a completion, a chat stream, and
    OpenAI's exceptions for a bad value and an unknown model."""
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client, max_retries=0)
    answer = api.completions.create(model="tiny", prompt="Question: yes?", max_tokens=4, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens <= 4
    stream = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens <= 4
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model="tiny", prompt="hi", max_tokens=True)
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="gpt-4o", prompt="hi")


def test_stop_strings_cut_the_text(client):
    """A greedy answer (the tiny model's, fixed by its seed), then the same request with a stop string taken
    from it: the text up to that string, finish_reason "stop"."""
    body = {"model": "tiny", "prompt": "Question: is the sky blue?", "max_tokens": 8, "temperature": 0}
    text = post(client, "/v1/completions", body).json()["choices"][0]["text"]
    stop = next((c for c in text[1:] if c.isascii() and c.isprintable()), None)  # a character, whole in any prefix
    assert stop is not None, f"no ASCII character after the first in the greedy answer {text!r}"
    for streamed in (False, True):
        response = post(client, "/v1/completions", {**body, "stop": [stop], "stream": streamed})
        if streamed:
            chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
            cut = "".join(c["choices"][0]["text"] for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            cut, finish = response.json()["choices"][0]["text"], response.json()["choices"][0]["finish_reason"]
        assert cut == text[: text.index(stop)] and finish == "stop"


def test_one_row_failing_stays_with_its_request(monkeypatch):
    """Three requests decoding in one run; the engine fails on one row's prior (set_prior raises), or one
    row's text cannot be cut at its stops: that request gets its error, the others their answers, as when none fails."""
    import asyncio

    from rexft.serve import local
    from rexft.serve.backend import Call, Failed, Finished
    from rexft.serve.protocol import CompletionRequest
    from rexft.serve.router import Route

    app = tiny_serving_app()
    service = app.state.service
    prompts = ["Question: one?", "Question: two?", "Question: three?"]
    priors = [service.router.route(p)[1] for p in prompts]
    poisoned = priors[1]
    real_set_prior = local.set_prior

    def set_prior(model, prior):
        if prior is not None and any(torch.equal(row, poisoned) for row in prior):
            raise RuntimeError("this row's prior breaks the engine")
        real_set_prior(model, prior)

    def answers(backend) -> list:
        async def run():
            loop = asyncio.get_running_loop()
            jobs = []
            for prompt, prior in zip(prompts, priors):
                request = CompletionRequest(model="tiny", prompt=prompt, temperature=0)
                call = Call(request, Route("tiny", "mixture"), prior, service.tokenizer(prompt).input_ids, 6)
                jobs.append(backend.submit(local.Job.of(call, loop)))
            await backend.start()  # after the submissions: the first run holds all three
            results = [await asyncio.wait_for(job.events.get(), ANSWER_SECONDS) for job in jobs]  # not streams: one each
            await backend.stop()
            return results

        return asyncio.run(run())

    def backend():
        return local.LocalBackend(service.backend.model, service.tokenizer, 4, 8)

    together = answers(backend())
    assert all(isinstance(a, Finished) for a in together), together
    monkeypatch.setattr(local, "set_prior", set_prior)
    engine_failed = answers(backend())
    monkeypatch.undo()
    assert isinstance(engine_failed[1], Failed) and "prior breaks the engine" in engine_failed[1].error.message
    assert [engine_failed[0], engine_failed[2]] == [together[0], together[2]]

    failing = backend()
    real_finish = failing.finish

    def finish(tokens, job):
        if job.prior is poisoned:
            raise ValueError("undecodable")
        return real_finish(tokens, job)

    failing.finish = finish
    text_failed = answers(failing)
    assert isinstance(text_failed[1], Failed) and "undecodable" in text_failed[1].error.message
    assert [text_failed[0], text_failed[2]] == [together[0], together[2]]


def test_the_local_backend_on_the_plain_engine_answers_as_the_pool_does():
    """serve.engine=plain (the default off the CPU): the requests waiting when a run starts decode through
    generate(), each cut at its own max_tokens, with the same greedy answers as the pooled engine's."""
    import asyncio

    from rexft.serve import local
    from rexft.serve.backend import Call, Finished
    from rexft.serve.protocol import CompletionRequest
    from rexft.serve.router import Route

    service = tiny_serving_app().state.service
    prompts = ["Question: one?", "Question: two, longer than one?", "Q3"]

    def answers(engine: str) -> list:
        backend = local.LocalBackend(service.backend.model, service.tokenizer, 4, 8, engine=engine)
        assert backend.pooled == (engine == "pool")

        async def run():
            loop = asyncio.get_running_loop()
            jobs = []
            for prompt, limit in zip(prompts, (6, 3, 8)):
                request = CompletionRequest(model="tiny", prompt=prompt, temperature=0)
                call = Call(request, Route("tiny", "mixture"), service.router.route(prompt)[1],
                            service.tokenizer(prompt).input_ids, limit)
                jobs.append(backend.submit(local.Job.of(call, loop)))
            await backend.start()
            results = [await asyncio.wait_for(job.events.get(), ANSWER_SECONDS) for job in jobs]
            await backend.stop()
            return results

        return asyncio.run(run())

    pooled, plain = answers("pool"), answers("plain")
    assert all(isinstance(a, Finished) for a in pooled + plain), plain
    assert plain == pooled
    assert plain[1].completion_tokens <= 3 and any(a.completion_tokens > 3 for a in plain)
