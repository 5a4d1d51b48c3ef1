"""rexft serve, measured through its endpoint (loopback only).

    fidelity  ROUGE-L of every example `rexft eval` scored (held-in and unseen tasks), asked through
              `rexft serve` (default: the vLLM backend, routed per cluster) against `rexft eval`'s own
              score of the dynamic adapter, per task and macro; and the route agreement: the share of
              held-in requests routed to the cluster where cluster-prior put most of their task's
              training prompts (and the mean share of the task's training prompts in the cluster chosen)
    router    the router alone, in-process and unloaded: embedding + nearest centroid per eval prompt, one at a time
    load      a bounded load test: C concurrent clients sending N chat requests in all (eval prompts,
              greedy, max_tokens M): throughput, p50/p99 latency, errors, and the router's own time
              (embedding + nearest centroid) against the end-to-end latency

    python scripts/bench_serve.py fidelity recipe=demo-sni [--backend vllm] [--clients 4]
    python scripts/bench_serve.py load recipe=demo-sni --backend local --clients 8 32 --requests 200
    python scripts/bench_serve.py router recipe=demo-sni

The run must be trained, evaluated and exported (bash scripts/demo_sni.sh). The server is started as a user
starts it (`rexft serve ... serve.port=P`) and stopped with SIGTERM. Results: run_dir/serve/bench_*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rexft.served_adapters import cluster_of
from rexft.modeling import machine_summary

ROOT = Path(__file__).resolve().parent.parent


def start_server(overrides: list[str], backend: str, log: Path) -> tuple[subprocess.Popen, str]:
    from rexft.serve.stage import free_port

    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, "-m", "rexft", "serve", *overrides, f"serve.backend={backend}",
                                f"serve.port={port}"], cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    clock = time.perf_counter()
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"rexft serve exited; see {log}")
        time.sleep(1)
    print(f"{backend} server up at {url} in {time.perf_counter() - clock:.0f} s", flush=True)
    return process, url


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)


async def ask_all(url: str, bodies: list[dict], clients: int) -> list[tuple[dict | None, float, int]]:
    """Each body posted to /v1/chat/completions by ``clients`` concurrent clients: (json, seconds, status)."""
    results: list = [None] * len(bodies)
    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(bodies):
        queue.put_nowait(item)

    async def client(http: httpx.AsyncClient):
        while not queue.empty():
            i, body = queue.get_nowait()
            clock = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/chat/completions", json=body)
                results[i] = (response.json() if response.status_code == 200 else None, time.perf_counter() - clock,
                              response.status_code)
            except httpx.HTTPError:
                results[i] = (None, time.perf_counter() - clock, 0)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return results


def examples_and_config(overrides: list[str]):
    from rexft.cli import compose
    from rexft.splits import eval_set

    cfg, _ = compose(overrides)
    evalset = eval_set(cfg)
    return cfg, evalset


def request_body(cfg, example, max_tokens: int) -> dict:
    from rexft.data import PromptFormat

    return {"model": cfg.name, "messages": PromptFormat.messages(example), "max_tokens": max_tokens,
            "temperature": 0, **({"stop": list(cfg.eval.stop)} if cfg.eval.stop else {})}


# ------------------------------------------------------------------------------------------ fidelity
def fidelity(args, overrides: list[str]) -> dict:
    from rexft.metrics import rouge_l

    cfg, evalset = examples_and_config(overrides)
    predictions = {}
    for line in (cfg.path / cfg.eval.output / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        if not row.get("dropped") and "rouge_l" in row:
            predictions[row["task"], row["id"]] = row
    examples = [e for e in evalset.examples if (e.task, e.row) in predictions]
    unseen = {id(e) for e in examples if e.task in evalset.unseen}
    report = json.loads((cfg.path / "prior" / "report.json").read_text())
    counts = report["counts"]  # clusters x tasks: cluster-prior's assignment of the training prompts
    task_column = {t: j for j, t in enumerate(report["tasks"])}
    process, url = start_server(overrides, args.backend, cfg.path / "serve" / f"bench_fidelity_{args.backend}.log")
    try:
        clock = time.perf_counter()
        answers = asyncio.run(ask_all(url, [request_body(cfg, e, cfg.eval.max_new_tokens) for e in examples], args.clients))
        seconds = time.perf_counter() - clock
    finally:
        stop_server(process)
    rows, agree, share, same = {}, [], [], 0
    for example, (body, _, status) in zip(examples, answers):
        if body is None:
            raise SystemExit(f"request for {example.task} row {example.row} failed with status {status}")
        text = body["choices"][0]["message"]["content"].strip()
        served = rouge_l(text, example.references or [example.target])
        entry = rows.setdefault(example.task, {"unseen": id(example) in unseen, "n": 0, "serve": 0.0, "eval": 0.0})
        entry["n"] += 1
        entry["serve"] += served
        entry["eval"] += predictions[example.task, example.row]["rouge_l"]
        same += text == predictions[example.task, example.row]["prediction"]
        route = body["rexft_route"]
        # the cluster chosen: the per-cluster adapter's, or (local backend) the nearest centroid's
        chosen = cluster_of(route["adapter"]) if route["how"] == "cluster" else route["cluster"]
        if example.task in task_column and chosen is not None:
            column = [counts[c][task_column[example.task]] for c in range(len(counts))]
            agree.append(chosen == max(range(len(column)), key=column.__getitem__))
            share.append(column[chosen] / max(1, sum(column)))
    for entry in rows.values():
        entry["serve"] /= entry["n"]
        entry["eval"] /= entry["n"]
    macro = {}
    for split, unseen_flag in (("held_in", False), ("unseen", True)):
        chosen = [r for r in rows.values() if r["unseen"] == unseen_flag]
        if chosen:
            macro[split] = {"tasks": len(chosen), "requests": sum(r["n"] for r in chosen),
                            "serve": statistics.mean(r["serve"] for r in chosen),
                            "eval": statistics.mean(r["eval"] for r in chosen)}
    result = {"backend": args.backend, "seconds": round(seconds, 1), "macro": macro, "tasks": rows,
              "route_agreement": sum(agree) / max(1, len(agree)), "route_share": statistics.mean(share) if share else None,
              "routed_requests": len(agree), "same_text": same, "requests": len(examples)}
    for split, m in macro.items():
        print(f"{split}: {m['tasks']} tasks, {m['requests']} requests: ROUGE-L via rexft serve ({args.backend}) "
              f"{m['serve']:.3f} vs rexft eval {m['eval']:.3f} ({m['serve'] - m['eval']:+.3f})")
    print(f"same text as rexft eval's prediction: {same}/{len(examples)}")
    print(f"route agreement (held-in): {result['route_agreement']:.3f} of {len(agree)} requests routed to their task's "
          f"majority cluster; mean share of the task's training prompts in the cluster chosen {result['route_share']:.3f}")
    return result


# ----------------------------------------------------------------------------------------------- load
def load(args, overrides: list[str]) -> dict:
    cfg, evalset = examples_and_config(overrides)
    examples = evalset.examples
    process, url = start_server(overrides, args.backend, cfg.path / "serve" / f"bench_load_{args.backend}.log")
    results = {}
    try:
        asyncio.run(ask_all(url, [request_body(cfg, examples[0], args.max_tokens)], 1))  # warm-up
        for clients in args.clients:
            bodies = [request_body(cfg, examples[i % len(examples)], args.max_tokens) for i in range(args.requests)]
            clock = time.perf_counter()
            answers = asyncio.run(ask_all(url, bodies, clients))
            seconds = time.perf_counter() - clock
            ok = [(body, latency) for body, latency, status in answers if body is not None]
            latencies = sorted(latency for _, latency in ok)
            router = sorted(body["rexft_route"]["router_ms"] for body, _ in ok)
            tokens = sum(body["usage"]["completion_tokens"] for body, _ in ok)
            pick = lambda values, q: values[min(len(values) - 1, int(q * len(values)))] if values else None
            results[clients] = {"requests": len(bodies), "errors": len(bodies) - len(ok), "seconds": round(seconds, 1),
                                "requests_per_s": round(len(ok) / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                                "latency_p50_s": round(pick(latencies, 0.5), 3), "latency_p99_s": round(pick(latencies, 0.99), 3),
                                "router_p50_ms": round(pick(router, 0.5), 2), "router_p99_ms": round(pick(router, 0.99), 2)}
            r = results[clients]
            print(f"{args.backend}, {clients} clients, {r['requests']} requests: {r['requests_per_s']} req/s, "
                  f"{r['tokens_per_s']} tokens/s, latency p50 {r['latency_p50_s']} s p99 {r['latency_p99_s']} s, "
                  f"{r['errors']} errors; router p50 {r['router_p50_ms']} ms "
                  f"({r['router_p50_ms'] / 10 / r['latency_p50_s']:.2f}% of p50 latency)", flush=True)
    finally:
        stop_server(process)
    return {"backend": args.backend, "max_tokens": args.max_tokens, "by_clients": results,
            "cpu": os.cpu_count()}


# --------------------------------------------------------------------------------------------- router
def router(args, overrides: list[str]) -> dict:
    from rexft.formats import prompt_of_chat
    from rexft.serve.router import build_router
    from rexft.serve.stage import exports_of

    cfg, evalset = examples_and_config(overrides)
    mode, exports, _ = exports_of(cfg)
    route = build_router(cfg, exports, mode)
    texts = [prompt_of_chat(request_body(cfg, e, 1)["messages"]) for e in evalset.examples]
    route.route(texts[0])  # warm-up
    ms = sorted(route.route(text)[0].router_ms for text in texts)
    result = {"prompts": len(ms), "router_p50_ms": round(ms[len(ms) // 2], 2),
              "router_p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2), "mode": mode}
    print(f"router ({mode}), {len(ms)} prompts one at a time: p50 {result['router_p50_ms']} ms, p99 {result['router_p99_ms']} ms")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("fidelity", "load", "router"))
    parser.add_argument("--backend", choices=("local", "vllm"), default="vllm")
    parser.add_argument("--clients", type=int, nargs="+", default=None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    args, overrides = parser.parse_known_args()
    print(machine_summary(), flush=True)  # what the figures below depend on
    args.clients = args.clients or ([4] if args.what == "fidelity" else [8, 32])
    if args.what == "fidelity":
        args.clients = args.clients[0]
    result = {"fidelity": fidelity, "load": load, "router": router}[args.what](args, overrides)
    from rexft.cli import compose

    run_dir = compose(overrides)[0].path
    out = run_dir / "serve" / (f"bench_{args.what}_{args.backend}.json" if args.what != "router" else "bench_router.json")
    out.write_text(json.dumps({**result, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
