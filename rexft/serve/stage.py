"""``rexft serve``: a trained run behind an OpenAI-compatible endpoint (run directory in, endpoint out).

    serve.backend=local   (default) the exact dynamic mixture on rexft's engine, each request with its prior
    serve.backend=vllm    merge-export's per-cluster / per-task adapters on vLLM, a request routed to one

Writes run_dir/serve/: endpoint.json (the URL, backend, models and pid, from the moment it serves until it stops), routes.jsonl (one
line per request: what served it and why, tokens, latency), vllm.log (the supervised vLLM's output).
Stops on SIGINT / SIGTERM, the supervised vLLM and its processes with it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

from rexft.config import RunConfig
from rexft.data import PromptFormat
from rexft.errors import RexftError
from rexft.rundir import folder_name
from rexft.serve.app import Service, create_app
from rexft.serve.router import build_router

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def exports_of(cfg: RunConfig) -> tuple[str, dict[str, Path], int]:
    """(mode, {adapter name: folder}, rank) of the run's per-cluster or per-task export."""
    manifest_file = cfg.path / "export" / "manifest.json"
    if not manifest_file.is_file():
        raise RexftError(f"serve.backend=vllm serves merge-export's adapters and {manifest_file} does not exist: run "
                         "`rexft merge-export export.mode=per_cluster` (or per_task) with this recipe first")
    manifest = json.loads(manifest_file.read_text())
    mode = manifest["mode"]
    if mode not in ("per_cluster", "per_task"):
        raise RexftError(f"serve.backend=vllm routes among per-cluster or per-task adapters; {cfg.path / 'export'} holds "
                         f"a '{mode}' export: run `rexft merge-export export.mode=per_cluster export.overwrite=true`")
    if not manifest.get("vllm_compatible", False):
        raise RexftError(f"{manifest_file} was not written for vLLM (an older merge-export, or export.vllm_compatible="
                         "false): rerun `rexft merge-export export.overwrite=true`")
    folders = manifest.get("folders") or {name: folder_name(name) for name in manifest[mode]}
    exports = {name: (cfg.path / "export" / mode / folder).resolve() for name, folder in folders.items()}
    return mode, exports, int(manifest["rank"])


def build_service(cfg: RunConfig) -> Service:
    from rexft.modeling import load_tokenizer, resolve_source

    folder = cfg.path / "serve"
    folder.mkdir(parents=True, exist_ok=True)
    settings = cfg.serve
    api_key = settings.api_key or os.environ.get("REXFT_API_KEY") or None
    common = dict(max_tokens=settings.max_tokens, api_key=api_key,
                  route_log=folder / "routes.jsonl" if settings.route_log else None)
    if settings.backend == "local":
        from rexft.inference import load_model_for_inference
        from rexft.serve.local import LocalBackend

        model, tokenizer, adapter_config, what = load_model_for_inference(cfg)
        takes_prior = bool(adapter_config and adapter_config["adapter"]["type"] == "trex"
                           and adapter_config["adapter"].get("use_prior"))
        router = build_router(cfg, None, None)
        backend = LocalBackend(model, tokenizer, settings.max_batch, settings.max_tokens, cfg.eval.profile,
                               settings.engine)
        context = settings.max_model_len or model.config.max_position_embeddings
        log.info("local backend: %s%s", what, ", a prior per request" if takes_prior else "")
        return Service(cfg.name, router, tokenizer, backend, [], PromptFormat.for_model(tokenizer, cfg.model),
                       context=context, uses_prior=takes_prior, **common)
    from transformers import AutoConfig

    from rexft.modeling import TINY
    from rexft.serve.vllm import CHAT_TEMPLATE, VllmBackend, plain_chat_template, vllm_command, vllm_python

    if cfg.model.name_or_path == TINY:
        raise RexftError("serve.backend=vllm needs a model vLLM loads from disk or the hub; model=tiny_llama is built "
                         "in-process (save it with save_pretrained and point model.name_or_path at the folder)")
    mode, exports, rank = exports_of(cfg)
    clash = [name for name in exports if name == cfg.name]
    if clash:
        raise RexftError(f"an export is named like the run ('{cfg.name}'), which names the routed model; rename the run")
    router = build_router(cfg, exports, mode)
    tokenizer = load_tokenizer(cfg.model)
    base = resolve_source(cfg.model)
    context = settings.max_model_len or AutoConfig.from_pretrained(base).max_position_embeddings
    fmt = PromptFormat.for_model(tokenizer, cfg.model)
    extra = list(settings.vllm_args)
    template = plain_chat_template(fmt, tokenizer)
    if template is not None:  # trained without the model's chat template: vLLM must render chats as training did
        template_file = folder / CHAT_TEMPLATE
        template_file.write_text(template)
        extra = ["--chat-template", str(template_file), *extra]
    if settings.upstream:
        if template is not None:
            log.warning("the run was trained without the model's chat template: start the upstream vLLM with "
                        "--chat-template %s, or its chat requests will be formatted otherwise", template_file)
        backend = VllmBackend(None, settings.upstream, None, settings.startup_timeout)
    else:
        from rexft.config import config_root
        from rexft.modeling import default_device

        port = settings.vllm_port or free_port()
        command = vllm_command(vllm_python(settings.vllm_python, config_root()), base, exports, rank, port, context,
                               default_device() == "cpu", extra)
        backend = VllmBackend(command, f"http://127.0.0.1:{port}", folder / "vllm.log", settings.startup_timeout)
    log.info("vllm backend: %d %s adapters of rank %d%s", len(exports), mode.replace("per_", ""), rank,
             f", upstream {settings.upstream}" if settings.upstream else "")
    return Service(cfg.name, router, tokenizer, backend, list(exports), fmt, context=context, uses_prior=False, **common)


def serve(cfg: RunConfig) -> None:
    """``rexft serve``: blocks until SIGINT or SIGTERM."""
    import uvicorn

    service = build_service(cfg)
    port = cfg.serve.port or free_port(cfg.serve.host)
    url = f"http://{cfg.serve.host}:{port}"
    service.endpoint = (cfg.path / "serve" / "endpoint.json",
                        {"url": url, "backend": cfg.serve.backend, "pid": os.getpid(), "models": [service.name] + service.adapters})
    print(f"rexft serve: {url}/v1 ({cfg.serve.backend} backend; model '{service.name}' routed"
          + (f", {len(service.adapters)} adapters by name" if service.adapters else "") + ")", flush=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per health probe
    uvicorn.run(create_app(service), host=cfg.serve.host, port=port, log_level="info", timeout_graceful_shutdown=10)
