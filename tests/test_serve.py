"""rexft serve through real HTTP: `rexft serve` started as a user starts it, on a tiny trained run.

The local backend always; the vLLM backend against the real CPU build of vLLM where scripts/setup_vllm.sh
installed it (.venv-vllm, or REXFT_VLLM_PYTHON), skipped only where it is not installed; the router's
forwarding, 502s and recovery against an upstream that comes and goes.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli, vllm_python

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


# ------------------------------------------------------------------------------------------- fixtures
def save_tiny_model(folder: Path) -> Path:
    """A tiny random LLaMA on disk (64-wide attention heads, which vLLM's CPU kernels take) with the byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rexft.modeling import byte_tokenizer

    config = LlamaConfig(vocab_size=259, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir) -> list[str]:
    """A trex run with a prior on the tiny on-disk model, trained one epoch, exported per cluster."""
    tmp = tmp_path_factory.mktemp("serve")
    model = save_tiny_model(tmp / "tiny-model")
    args = ["recipe=smoke", f"run_dir={tmp / 'run'}", f"model.name_or_path={model}", f"data.local_dir={data_dir}",
            "trainer.epochs=1", "data.tasks=[boolq,piqa,copa,winogrande]"]
    run_cli("train", *args)
    run_cli("merge-export", *args, "export.mode=per_cluster", "export.fidelity=false")
    return args


class Server:
    """`rexft serve ARGS` in a child process, until stop()."""

    def __init__(self, args: list[str], timeout: float = 120):
        from rexft.serve.stage import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("run_dir=")))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = open(self.run_dir.parent / f"serve-{self.port}.log", "w")
        self.process = subprocess.Popen([sys.executable, "-m", "rexft", "serve", *args, f"serve.port={self.port}"],
                                        cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"rexft serve did not come up:\n{Path(self.log.name).read_text()[-3000:]}")
            time.sleep(0.5)

    def ready(self) -> bool:
        """Whether it answers at all (/health says 503 while an upstream is down)."""
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code in (200, 503)
        except httpx.TransportError:
            return False

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", content=data, headers=headers, timeout=120, **kwargs)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def local(run):
    server = Server(run)
    yield server
    server.stop()


def eval_prompts(run_dir: Path, n: int) -> list[str]:
    """The first ``n`` held-out prompts short enough for the tiny model's context, as the smoke recipe's
    plain template renders them."""
    rows = [json.loads(line) for line in (run_dir / "data" / "validation.jsonl").read_text().splitlines()]
    return [f"{row['prompt']}\nAnswer:" for row in rows if len(row["prompt"].encode()) < 600][:n]


def expected_greedy(run_args: list[str], prompts: list[str], max_tokens: int) -> list[str]:
    """What rexft's own engine generates for these completion prompts, one at a time on the plain engine,
    each with its prior: the exact dynamic mixture the local backend must serve."""
    from rexft.cli import compose
    from rexft.inference import PlainEngine, Row, Sampling, adapter_priors, load_model_for_inference, prior_state

    cfg, _ = compose(run_args)
    model, tokenizer, adapter_config, _ = load_model_for_inference(cfg)
    priors = adapter_priors(cfg.path / "adapter", adapter_config, prompts, cfg)
    engine = PlainEngine(model, tokenizer, prior_state(model, priors), batch_size=1)
    rows = [Row(i, tokenizer(p).input_ids, i) for i, p in enumerate(prompts)]
    out = {g.id: g.tokens for g in engine.generate(rows, Sampling(max_new_tokens=max_tokens))}
    texts = []
    for i in range(len(prompts)):
        tokens = out[i][:max_tokens]
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return texts


def stream_text(response: httpx.Response, chat: bool = False) -> tuple[str, list[dict], bool]:
    """(the text of a stream's deltas, its chunks, whether it ended with [DONE])."""
    chunks, done = [], False
    for line in response.text.splitlines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            chunks.append(json.loads(line[6:]))
    key = (lambda c: c["delta"].get("content", "")) if chat else (lambda c: c["text"])
    return "".join(key(c) for chunk in chunks for c in chunk["choices"]), chunks, done


# ------------------------------------------------------------------------------------------ local backend
def test_local_serves_the_exact_mixture_concurrently(local, run):
    """Concurrent greedy requests (batched, joining a running decoding batch) give what rexft's engine gives
    each prompt alone with its own prior; each response names its route."""
    prompts = eval_prompts(local.run_dir, 6)
    expected = expected_greedy(run, prompts, 12)
    results = [None] * len(prompts)

    def ask(i):
        time.sleep(0.05 * i)  # staggered: later requests arrive while earlier ones decode
        results[i] = local.post("/v1/completions", {"model": "smoke", "prompt": prompts[i], "max_tokens": 12,
                                                    "temperature": 0})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for response, want in zip(results, expected):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["text"] == want
        assert body["rexft_route"]["how"] == "mixture" and body["rexft_route"]["cluster"] is not None
        assert response.headers["x-rexft-route"] == "smoke"
        assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["total_tokens"] == sum(
            body["usage"][k] for k in ("prompt_tokens", "completion_tokens"))


def test_local_stream_equals_the_whole_answer(local):
    prompt = eval_prompts(local.run_dir, 1)[0]
    body = {"model": "smoke", "prompt": prompt, "max_tokens": 20, "temperature": 0}
    whole = local.post("/v1/completions", body).json()
    streamed = local.post("/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    text, chunks, done = stream_text(streamed)
    assert done and text == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_per_task_routing_sends_a_task_s_prompts_to_its_adapter(run):
    """The per-task router: each held-out prompt goes to the task whose training prompts' mean embedding is
    nearest, which for these four tasks is its own."""
    from rexft.cli import compose
    from rexft.serve.router import build_router

    cfg, _ = compose(run)
    tasks = ["boolq", "piqa", "copa", "winogrande"]
    router = build_router(cfg, {t: cfg.path / t for t in tasks}, "per_task")
    rows = [json.loads(line) for line in (cfg.path / "data" / "validation.jsonl").read_text().splitlines()]
    routed = [(row["task"], router.route(row["prompt"])[0]) for row in rows[:40]]
    assert all(route.how == "task" and route.router_ms > 0 for _, route in routed)
    assert sum(task == route.adapter for task, route in routed) >= 0.9 * len(routed)


def test_local_chat_uses_the_template_and_stops_at_max_tokens(local):
    messages = [{"role": "user", "content": eval_prompts(local.run_dir, 1)[0]}]
    response = local.post("/v1/chat/completions", {"model": "smoke", "messages": messages, "max_tokens": 3,
                                                   "temperature": 0.8, "seed": 1})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] <= 3
    again = local.post("/v1/chat/completions", {"model": "smoke", "messages": messages, "max_tokens": 3,
                                                "temperature": 0.8, "seed": 1}).json()
    assert again["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"]  # seeded
    streamed = local.post("/v1/chat/completions", {"model": "smoke", "messages": messages, "max_tokens": 3,
                                                   "temperature": 0, "stream": True})
    text, chunks, done = stream_text(streamed, chat=True)
    assert done and chunks[0]["choices"][0]["delta"]["role"] == "assistant"


def test_local_backend_takes_requests_first_come_first_served():
    """A run takes the waiting requests that decode like it only up to the first that does not: a sampled or
    seeded request is not overtaken by greedy ones arriving after it."""
    import asyncio
    from collections import deque
    from types import SimpleNamespace

    from rexft.serve.local import Job, LocalBackend

    loop = asyncio.new_event_loop()
    greedy = lambda i: Job([1], None, 4, 0.0, 1.0, (), None, loop, id=i)
    sampled = Job([1], None, 4, 0.7, 0.9, (), None, loop, id=2)
    backend = SimpleNamespace(pending=deque([greedy(0), greedy(1), sampled, greedy(3)]), ready=threading.Condition())
    taken = LocalBackend._take(backend, greedy(9).key, room=10)
    assert [job.id for job in taken] == [0, 1] and [job.id for job in backend.pending] == [2, 3]
    assert LocalBackend._take(backend, greedy(9).key, room=10) == []  # the sampled request runs next
    assert [job.id for job in LocalBackend._take(backend, sampled.key, room=10)] == [2]
    loop.close()


BAD_REQUESTS = [  # (what, path, body, status, error code)
    ("malformed JSON", "/v1/completions", '{"model": "smoke", "prompt": ', 400, "invalid_json"),
    ("not an object", "/v1/completions", "[1, 2]", 400, "invalid_json"),
    ("missing prompt", "/v1/completions", {"model": "smoke"}, 400, "missing_field"),
    ("missing messages", "/v1/chat/completions", {"model": "smoke"}, 400, "missing_field"),
    ("missing model", "/v1/completions", {"prompt": "hi"}, 400, "missing_field"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model_not_found"),
    ("negative max_tokens", "/v1/completions", {"model": "smoke", "prompt": "hi", "max_tokens": -5}, 400, "invalid_value"),
    ("zero max_tokens", "/v1/completions", {"model": "smoke", "prompt": "hi", "max_tokens": 0}, 400, "invalid_value"),
    ("huge max_tokens", "/v1/completions", {"model": "smoke", "prompt": "hi", "max_tokens": 10 ** 9}, 400, "invalid_value"),
    ("prompt longer than the context", "/v1/completions", {"model": "smoke", "prompt": "x" * 3000}, 400,
     "context_length_exceeded"),
    ("temperature not a number", "/v1/completions", {"model": "smoke", "prompt": "hi", "temperature": "hot"}, 400,
     "invalid_value"),
    ("a boolean for max_tokens", "/v1/completions", {"model": "smoke", "prompt": "hi", "max_tokens": True}, 400,
     "invalid_value"),
    ("an empty stop string", "/v1/completions", {"model": "smoke", "prompt": "hi", "stop": [""]}, 400, "invalid_value"),
    ("a lone surrogate", "/v1/chat/completions", {"model": "smoke", "messages": [{"role": "user", "content": "\ud800"}]},
     400, "invalid_value"),
    ("a seed beyond 64 bits", "/v1/completions", {"model": "smoke", "prompt": "hi", "seed": 2 ** 64}, 400, "invalid_value"),
    ("bad role", "/v1/chat/completions", {"model": "smoke", "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "invalid_value"),
    ("empty messages", "/v1/chat/completions", {"model": "smoke", "messages": []}, 400, "invalid_value"),
    ("several prompts", "/v1/completions", {"model": "smoke", "prompt": ["a", "b"]}, 400, "invalid_value"),
    ("n > 1 on the local backend", "/v1/completions", {"model": "smoke", "prompt": "hi", "n": 2}, 400,
     "unsupported_parameter"),
    ("logprobs on the local backend", "/v1/completions", {"model": "smoke", "prompt": "hi", "logprobs": 2}, 400,
     "unsupported_parameter"),
    ("no such endpoint", "/v1/embeddings", {"model": "smoke", "input": "hi"}, 404, "404"),
]


@pytest.mark.parametrize("what,path,body,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(local, what, path, body, status, code):
    response = local.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert httpx.get(f"{local.url}/health").status_code == 200
    good = local.post("/v1/completions", {"model": "smoke", "prompt": "Question: yes?", "max_tokens": 2})
    assert good.status_code == 200


def test_routes_are_logged(local):
    local.post("/v1/completions", {"model": "smoke", "prompt": "Question: is water wet?", "max_tokens": 2})
    lines = [json.loads(line) for line in (local.run_dir / "serve" / "routes.jsonl").read_text().splitlines()]
    last = lines[-1]
    assert last["adapter"] == "smoke" and last["how"] == "mixture" and isinstance(last["cluster"], int)
    assert last["router_ms"] > 0 and last["latency_ms"] >= last["router_ms"] and last["completion_tokens"] >= 1
    info = json.loads((local.run_dir / "serve" / "endpoint.json").read_text())
    assert info["url"] == local.url and info["backend"] == "local"


def test_api_key_guards_every_endpoint_but_health_and_sigterm_stops_cleanly(run):
    server = Server(run + ["serve.api_key=s3cret"])
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        body = {"model": "smoke", "prompt": "hi", "max_tokens": 2}
        assert server.post("/v1/completions", body).status_code == 401
        wrong = server.post("/v1/completions", body, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        right = {"authorization": "Bearer s3cret"}
        assert server.post("/v1/completions", body, headers=right).status_code == 200
        models = httpx.get(f"{server.url}/v1/models", headers=right).json()
        assert [m["id"] for m in models["data"]] == ["smoke"]
    finally:
        code = server.stop()
    assert code in (0, -signal.SIGTERM)
    assert not (server.run_dir / "serve" / "endpoint.json").exists()


# ------------------------------------------------------------------------------------- the vLLM backend
def stub_upstream(port: int):
    """An OpenAI server that answers as vLLM's would (health, completions, streams), in a thread: the router's
    forwarding and recovery under test, not vLLM."""
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.get("/health")
    async def health():
        return {}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body.get("stream"):
            async def events():
                for word in ("served", " by", f" {body['model']}"):
                    yield f"data: {json.dumps({'model': body['model'], 'choices': [{'index': 0, 'text': word}]})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"model": body["model"], "choices": [{"index": 0, "text": f"served by {body['model']}",
                                                     "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": body["max_tokens"], "total_tokens": 1 + body["max_tokens"]}}

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread


def test_upstream_down_gives_502_then_recovers(run):
    from rexft.serve.stage import free_port

    upstream_port = free_port()
    server = Server(run + ["serve.backend=vllm", f"serve.upstream=http://127.0.0.1:{upstream_port}"])
    try:
        body = {"model": "smoke", "prompt": "Question: is the sky blue?", "max_tokens": 3}
        down = server.post("/v1/completions", body)
        assert down.status_code == 502 and "did not answer" in down.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health").status_code == 503
        stub, thread = stub_upstream(upstream_port)
        try:
            up = server.post("/v1/completions", body)
            assert up.status_code == 200, up.text
            routed = up.json()
            adapter = routed["rexft_route"]["adapter"]
            assert adapter.startswith("cluster") and up.headers["x-rexft-route"] == adapter
            assert routed["choices"][0]["text"] == f"served by {adapter}" and routed["model"] == "smoke"
            named = server.post("/v1/completions", {**body, "model": "cluster00", "stream": True})
            text, chunks, done = stream_text(named)
            assert done and text == "served by cluster00" and all(c["model"] == "cluster00" for c in chunks)
            models = httpx.get(f"{server.url}/v1/models").json()["data"]
            assert models[0]["id"] == "smoke" and all(m["parent"] == "smoke" for m in models[1:])
        finally:
            stub.should_exit = True
            thread.join(timeout=10)
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.skipif(vllm_python() is None, reason="vLLM is not installed here (bash scripts/setup_vllm.sh installs it)")
def test_vllm_backend_serves_the_exports_as_peft_would(run):
    """A real vLLM (the CPU build) started and supervised by rexft serve: routed and named requests, streams,
    vLLM's own errors passed on, and greedy tokens equal to transformers + PEFT on the routed adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    server = Server(run + ["serve.backend=vllm", "serve.startup_timeout=400"], timeout=420)
    try:
        leader = vllm_leader(server)
        model_dir = Path(next(a.split("=", 1)[1] for a in run if a.startswith("model.name_or_path=")))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        for prompt in eval_prompts(server.run_dir, 3):
            body = {"model": "smoke", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True}
            response = server.post("/v1/completions", body)
            assert response.status_code == 200, response.text
            served = response.json()
            adapter = served["rexft_route"]["adapter"]
            assert response.headers["x-rexft-route"] == adapter and served["model"] == "smoke"
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            peft = PeftModel.from_pretrained(base, str(server.run_dir / "export" / "per_cluster" / adapter)).eval()
            ids = torch.tensor([tokenizer(prompt).input_ids])
            with torch.no_grad():
                out = peft.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
            assert served["choices"][0]["token_ids"] == out[0, ids.shape[1]:].tolist()
        # the run was trained without a chat template (the tokenizer has none): vLLM renders chats as training did
        from rexft.config import ModelConfig
        from rexft.data import PromptFormat, message_tokens

        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is it {x}?\nA. yes"}]
        response = server.post("/v1/chat/completions", {"model": "smoke", "messages": messages, "max_tokens": 2,
                                                        "temperature": 0, "return_token_ids": True})
        assert response.status_code == 200, response.text
        plain = PromptFormat(chat=False, plain_template=ModelConfig().plain_template)
        assert response.json()["prompt_token_ids"] == message_tokens(tokenizer, plain, messages)
        streamed = server.post("/v1/completions", {"model": "cluster00", "prompt": "Question: yes or no?",
                                                   "max_tokens": 4, "stream": True, "temperature": 0})
        text, chunks, done = stream_text(streamed)
        assert done and chunks and all(c["rexft_route"]["adapter"] == "cluster00" for c in chunks)
        assert server.post("/v1/completions", {"model": "nope", "prompt": "hi"}).status_code == 404
        assert server.post("/v1/completions", {"model": "smoke", "prompt": "x" * 3000}).status_code == 400
        assert httpx.get(f"{server.url}/v1/models").json()["data"][1]["id"].startswith("cluster")
        # vLLM dies: 503 with the reason while the supervisor restarts it, then served again
        os.kill(leader, signal.SIGKILL)
        deadline, statuses = time.monotonic() + 300, []
        while time.monotonic() < deadline:
            status = server.post("/v1/completions", {"model": "smoke", "prompt": "hi", "max_tokens": 2}).status_code
            statuses.append(status)
            if status == 200 and 503 in statuses:
                break
            time.sleep(1)
        assert 503 in statuses and statuses[-1] == 200, statuses
        leader = vllm_leader(server)  # the restarted one
    finally:
        code = server.stop()
    assert code in (0, -signal.SIGTERM)
    time.sleep(2)
    left = subprocess.run(["pgrep", "-g", str(leader)], capture_output=True, text=True).stdout.split()
    assert not left, f"vLLM processes left behind: {left}"


def vllm_leader(server: Server) -> int:
    """The pid of the vLLM server rexft serve supervises (its child; the leader of vLLM's process group)."""
    found = subprocess.run(["pgrep", "-P", str(server.process.pid), "-f", "vllm.entrypoints.openai.api_server"],
                           capture_output=True, text=True).stdout.split()
    assert found, "no vLLM process under rexft serve"
    return int(found[0])


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("template", ["{prompt}\n\nAnswer:", "Q: {prompt} {{x}} 'a' \"b\" \\ \u00e9\nA:"])
def test_vllm_chat_template_renders_chats_as_training_did(template):
    """A run trained without the model's chat template gets a Jinja template for vLLM's --chat-template that
    gives the token ids training gave (BOS included, braces and quotes in the plain template kept)."""
    from rexft.data import PromptFormat, message_tokens
    from rexft.modeling import byte_tokenizer
    from rexft.serve.vllm import plain_chat_template

    tokenizer = byte_tokenizer()
    fmt = PromptFormat(chat=False, plain_template=template)
    jinja = plain_chat_template(fmt, tokenizer)
    for messages in ([{"role": "user", "content": "Is it {x}?\n'yes'"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                     [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]):
        rendered = tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=True)
        assert tokenizer(rendered, add_special_tokens=False).input_ids == message_tokens(tokenizer, fmt, messages)
    assert plain_chat_template(PromptFormat(chat=True, plain_template=template), tokenizer) is None


def test_exports_have_one_rank_and_refuse_what_vllm_cannot_load():
    from peft import PeftModel

    from conftest import tiny_model
    from rexft.export import vllm_refusal, write_peft_adapter

    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    factors = {}
    for name, rank in zip(names, (2, 4)):
        layer = model.get_submodule(name)
        factors[name] = (torch.randn(rank, layer.in_features, generator=g), torch.randn(layer.out_features, rank, generator=g))
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        write_peft_adapter(Path(folder), factors, "tiny", torch.float32)
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        assert config["r"] == 4 and config["lora_alpha"] == 4 and not config["rank_pattern"] and config["bias"] == "none"
        loaded = PeftModel.from_pretrained(model, folder)
        for name, (A, B) in factors.items():
            layer = loaded.base_model.model.get_submodule(name)
            delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
            torch.testing.assert_close(delta, B @ A)
    assert vllm_refusal(factors) is None
    assert "rank 600" in vllm_refusal({names[0]: (torch.zeros(600, 4), torch.zeros(4, 600))})
    assert "lm_head" in vllm_refusal({"lm_head": (torch.zeros(2, 4), torch.zeros(4, 2))})


def test_serve_vllm_refuses_runs_it_cannot_serve(run, tmp_path):
    """No export (or a non-routing one): one line naming what to run."""
    manifest = Path(next(a.split("=", 1)[1] for a in run if a.startswith("run_dir="))) / "export" / "manifest.json"
    saved = manifest.read_text()
    try:
        manifest.write_text(json.dumps({**json.loads(saved), "mode": "merged"}))
        result = run_cli("serve", *run, "serve.backend=vllm", "serve.upstream=http://127.0.0.1:9", check=False)
        assert result.returncode == 2 and "merge-export export.mode=per_cluster" in result.stderr
    finally:
        manifest.write_text(saved)
