"""The vLLM backend: merge-export's static adapters as LoRA modules of a vLLM OpenAI server, the router in front.

Either rexft starts and supervises the server (a child process in its own session, from vLLM's own virtual
environment, ``scripts/setup_vllm.sh``; restarted if it dies, stopped with rexft and every process it
spawned), or ``serve.upstream`` names one already running (tensor parallelism, replicas behind a load
balancer: the router holds no state, so routers scale out beside them). Requests are forwarded with
``model`` set to the chosen adapter, every other field as the client sent it, and streams passed through
chunk by chunk. While the server is unreachable requests get 503 (starting or restarting) or 502 (an
upstream that does not answer), each with the reason, and are served again once it is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rexft.errors import RexftError
from rexft.served_adapters import VLLM_RANKS
from rexft.serve.backend import Call, Failed
from rexft.serve.protocol import APIError, Relayed

log = logging.getLogger(__name__)
CHAT_TEMPLATE = "chat_template.jinja"  # in run_dir/serve: how training rendered chats, for vLLM's --chat-template


def max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds adapters of ``rank``."""
    for allowed in VLLM_RANKS:
        if allowed >= rank:
            return allowed
    raise RexftError(f"the exports have rank {rank}, above vLLM's largest --max-lora-rank {VLLM_RANKS[-1]}")


def vllm_python(configured: str | None, root: Path) -> str:
    """The python of vLLM's virtual environment: serve.vllm_python, REXFT_VLLM_PYTHON, or .venv-vllm."""
    candidates = [configured, os.environ.get("REXFT_VLLM_PYTHON"), str(root / ".venv-vllm" / "bin" / "python"),
                  str(Path.cwd() / ".venv-vllm" / "bin" / "python")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    raise RexftError("serve.backend=vllm: no vLLM environment found (serve.vllm_python, REXFT_VLLM_PYTHON, "
                     ".venv-vllm/bin/python); set one up with `bash scripts/setup_vllm.sh`, or point "
                     "serve.upstream at a running vLLM server")


def plain_chat_template(fmt, tokenizer) -> str | None:
    """A Jinja chat template that renders a conversation as training did without the model's chat template
    (``PromptFormat.render`` with ``chat=False``: ``plain_template`` around one user turn as it is, or around
    ``Role: content`` turns joined by blank lines), with the special tokens the tokenizer adds to plain text
    written into it, since vLLM tokenizes a rendered chat without adding them. None where training used the
    model's own template, which vLLM applies by default."""
    if fmt.chat:
        return None
    marker = "\x00"
    prefix, suffix = fmt.plain_template.format(prompt=marker).split(marker)
    bare, full = tokenizer("x", add_special_tokens=False).input_ids, tokenizer("x").input_ids
    start = next(i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare)
    head = tokenizer.decode(full[:start]) + prefix
    tail = suffix + tokenizer.decode(full[start + len(bare):])
    return ("{{ %s }}{%% if messages | length == 1 %%}{{ messages[0]['content'] }}{%% else %%}"
            "{%% for m in messages %%}{%% if not loop.first %%}{{ '\\n\\n' }}{%% endif %%}"
            "{{ (m['role'] | capitalize) + ': ' + m['content'] }}{%% endfor %%}{%% endif %%}{{ %s }}"
            % (json.dumps(head), json.dumps(tail)))  # JSON strings are Jinja string literals


def vllm_command(python: str, base: str, exports: dict[str, Path], rank: int, port: int, max_model_len: int,
                 on_cpu: bool, extra: list[str]) -> list[str]:
    """vLLM's OpenAI server for ``base`` with every export a LoRA module (``vllm serve`` itself looks up its
    package metadata under the name vllm, which the CPU build does not carry: the module runs the same server)."""
    modules = [json.dumps({"name": name, "path": str(path)}) for name, path in exports.items()]
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", base, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32" if on_cpu else "auto", "--max-model-len", str(max_model_len),
            "--enable-lora", "--max-lora-rank", str(max_lora_rank(rank)),
            "--max-loras", str(min(len(exports), 8)), "--max-cpu-loras", str(max(len(exports), 1)),
            "--disable-uvicorn-access-log", "--lora-modules", *modules, *extra]


class VllmBackend:
    """Forwards OpenAI requests to vLLM (see the module docstring)."""

    name = "vllm"

    def __init__(self, command: list[str] | None, url: str, log_file: Path | None, startup_timeout: float):
        self.command, self.url, self.log_file = command, url.rstrip("/"), log_file
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.healthy = False
        self.stopping = False
        self.watcher: asyncio.Task | None = None
        self.client = None

    # ------------------------------------------------------------------------------- life cycle
    async def start(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
        if self.command is None:  # an upstream: never fatal at start-up, requests say whether it answers
            self.healthy = await self.probe()
            if not self.healthy:
                log.warning("upstream vLLM at %s does not answer yet; requests get 502 until it does", self.url)
            self.watcher = asyncio.create_task(self.watch())
            return
        self.spawn()
        deadline = time.monotonic() + self.startup_timeout
        while not await self.probe():
            if self.process.poll() is not None:
                raise RexftError(f"vLLM exited with code {self.process.returncode} while starting; its log: {self.log_file}")
            if time.monotonic() > deadline:
                self.kill()
                raise RexftError(f"vLLM was not healthy after {self.startup_timeout:.0f} s (serve.startup_timeout); "
                                 f"its log: {self.log_file}")
            await asyncio.sleep(1)
        self.healthy = True
        log.info("vLLM healthy at %s after %.0f s", self.url, time.monotonic() - self.started_at)
        self.watcher = asyncio.create_task(self.watch())

    def spawn(self) -> None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        env.pop("PYTHONPATH", None)  # vLLM's environment, not rexft's
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        self.started_at = time.monotonic()
        log.info("started vLLM (pid %d): %s", self.process.pid, " ".join(self.command[:8]) + " ...")

    async def watch(self) -> None:
        """Keep ``healthy`` current; restart a supervised vLLM that exited."""
        while not self.stopping:
            await asyncio.sleep(2)
            if self.process is not None and self.process.poll() is not None and not self.stopping:
                log.error("vLLM exited with code %s; restarting it (see %s)", self.process.returncode, self.log_file)
                self.healthy = False
                self.kill()
                self.restarts += 1
                self.spawn()
            self.healthy = await self.probe()

    async def probe(self) -> bool:
        try:
            return (await self.client.get(f"{self.url}/health", timeout=2.0)).status_code == 200
        except Exception:
            return False

    def kill(self) -> None:
        """Stop the supervised vLLM and every process it started (its session's process group)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        except ProcessLookupError:
            pass
        try:  # processes of that group still running after their leader exited
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    async def stop(self) -> None:
        self.stopping = True
        if self.watcher is not None:
            self.watcher.cancel()
        self.kill()
        if self.client is not None:
            await self.client.aclose()

    # -------------------------------------------------------------------------------- forwarding
    def unavailable(self) -> str | None:
        return None if self.healthy else self.down(RuntimeError("not healthy")).message

    def down(self, err: Exception) -> APIError:
        """The error a request gets while vLLM does not answer: 502 (an upstream), 503 (starting, restarting)."""
        if self.command is None:
            return APIError(502, f"the upstream vLLM server at {self.url} did not answer ({type(err).__name__}); "
                                 "retry once it is back", code="upstream_unavailable", kind="server_error")
        state = "starting" if not self.restarts else f"restarting (restart {self.restarts})"
        return APIError(503, f"vLLM is {state}: up {time.monotonic() - self.started_at:.0f} s, not answering yet; "
                             "retry shortly", code="engine_unavailable", kind="server_error")

    def refuse(self, request) -> None:
        """Nothing: vLLM checks the fields it takes itself, and its refusals reach the client as 4xx."""

    async def answer(self, call: Call):
        """vLLM's answer to the request as the client sent it, ``model`` set to the route's adapter and
        ``max_tokens`` to the checked limit: the response, or its stream's chunks, each a Relayed."""
        forwarded = {**call.request.model_dump(exclude_unset=True), "model": call.route.adapter,
                     "max_tokens": call.max_tokens}
        forwarded.pop("max_completion_tokens", None)
        try:
            upstream = await self.send("/v1/chat/completions" if call.chat else "/v1/completions", forwarded)
        except APIError as err:
            yield Failed(err)
            return
        try:
            if not call.request.stream:
                yield self.relayed(await upstream.aread())
                return
            async for line in upstream.aiter_lines():
                if line.startswith("data: {"):
                    yield self.relayed(line[len("data: "):])
        finally:
            await upstream.aclose()

    def relayed(self, raw: bytes | str) -> Relayed | Failed:
        try:
            return Relayed.model_validate_json(raw)
        except ValueError:
            return Failed(APIError(502, f"vLLM answered with something that is not an OpenAI body: {raw[:200]!r}",
                                   code="upstream_invalid", kind="server_error"))

    async def send(self, path: str, body: dict):
        """The upstream's response (streamed), or an APIError when it cannot be reached or refuses."""
        import httpx

        if self.command is not None and not self.healthy:
            raise self.down(RuntimeError("not healthy"))
        try:
            request = self.client.build_request("POST", f"{self.url}{path}", json=body)
            upstream = await self.client.send(request, stream=True)
        except (httpx.TransportError, OSError) as err:
            raise self.down(err) from None
        if upstream.status_code >= 400:
            raw = await upstream.aread()
            await upstream.aclose()
            try:
                message = json.loads(raw).get("error", {}).get("message") or raw.decode(errors="replace")
            except (ValueError, AttributeError):
                message = raw.decode(errors="replace")
            status = upstream.status_code if upstream.status_code < 500 else 502
            raise APIError(status, f"vLLM: {message}", kind="invalid_request_error" if status < 500 else "server_error")
        return upstream


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when rexft serve dies, however it dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass
