"""Colocated vs disaggregated serving of long prompts, and what moving the KV costs (SmolLM2-135M).

    python -m bench.disaggregated            # writes bench/results/disaggregated.{json,md} (~10 min on 2 cores)
    python -m bench.disaggregated --quick    # short prompts, few requests: a smoke run (~2 min)

Setups, each in fresh processes on loopback, one after another (never two at once):

- colocated: the `engine` role (`kvfleet serve`'s server over one `AsyncLLMEngine`), `--threads 2`
  (and `--threads 1` as a second row), fp32 KV;
- disaggregated: router + 1 prefill (`--threads 1`) + 1 decode (`--threads 1`) processes, under the
  fp32, int8 and int4 CachePolicies (keys per-channel in groups of 32 tokens, values per-token,
  4 sink + 32 residual tokens at full precision, blocks of 16 tokens).

Fairness: the two engine threads of the disaggregated pair are matched by the colocated engine with
2 threads; the router (HTTP + gRPC, no torch compute) is a third, mostly idle, process.

Workload: seeded random token-id prompts (every request its own prompt: no prefix-cache hits),
`--output-tokens` tokens each (greedy, `ignore_eos`), streamed with the `openai` SDK by closed-loop
clients at each concurrency. TTFT and TPOT (per request, excluding the first token) are client-side.

KV transfer: after the latency runs, the benchmark drives the prefill and decode pods itself for a
few prompt lengths (`Decode.Reserve` -> `Prefill.Prefill` with the decode pod as target ->
`Decode.Release`) and records each `PrefillReply`: `kv_bytes` (blocks as stored + the lane) and
`transfer_s` (serialize the hand-off, open a channel, stream `PushKV`, decode's checks) and
`prefill_s`. A least-squares line `a + b * prompt_tokens` separates the per-token cost from the
fixed one. The decode pod's `Stats` (kv_bytes_received, recomputes) checks the latency runs too.

The markdown ends with the analytic model that carries the per-token KV bytes to a GPU cluster
(bytes moved vs prefill compute saved vs interconnect bandwidth); text between the analysis markers
of an existing file is kept across re-runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from e2e.processes import LoggedProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL = "smollm2"
BLOCK_SIZE = 16


def policies() -> dict[str, Any]:
    from kvfleet.dataplane.config import CachePolicyConfig as C

    r = {"group_size": 32, "residual_tokens": 32, "quant_sink_tokens": 4}
    return {"fp32": C(), "int8": C(key_quantization="int8", value_quantization="int8", **r),
            "int4": C(key_quantization="int4", value_quantization="int4", **r)}


# -- processes --------------------------------------------------------------------------


class Proc(LoggedProcess):
    """One role process (the harness's), with PYTHONSAFEPATH set and a model-load-sized start timeout."""

    def start(self) -> Proc:
        self.env.setdefault("PYTHONSAFEPATH", "1")
        super().start()
        return self

    def wait_ready(self, timeout: float = 300.0) -> Proc:
        super().wait_ready(timeout)
        return self


def cpu_seconds(procs: list[Proc]) -> dict[str, float]:
    """user + system CPU seconds each process has used so far (all its threads), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for p in procs:
        assert p.proc is not None
        fields = Path(f"/proc/{p.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        out[p.name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def engine_config(tmp: Path, model_dir: str, cp: Any, name: str, num_kv_blocks: int) -> Path:
    from kvfleet.dataplane.config import EngineConfig

    cfg = EngineConfig(model_dir=model_dir, variant=MODEL, dtype="float32", device="cpu", block_size=BLOCK_SIZE,
                       num_kv_blocks=num_kv_blocks, max_num_seqs=8, max_num_batched_tokens=2048, cache_policy=cp)
    path = tmp / name / "engine.json"  # a folder each: variant.json would be read from beside it
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cfg.to_json())
    return path


def colocated(tmp: Path, config: Path, threads: int) -> list[Proc]:
    argv = [sys.executable, "-m", "kvfleet.dataplane.roles.engine", "--config", str(config), "--host", "127.0.0.1",
            "--port", "0", "--threads", str(threads), "--log-level", "WARNING"]
    return [Proc(f"engine-{threads}t", argv, tmp / f"engine-{threads}t-{time.monotonic_ns()}.log",
                 r"listening on (http://\S+)")]


def disaggregated(tmp: Path, config: Path, model_dir: str) -> list[Proc]:
    """prefill, decode (started together), then the router pointed at them."""
    def role(name: str) -> Proc:
        argv = [sys.executable, "-m", f"kvfleet.dataplane.roles.{name}", "--config", str(config),
                "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--threads", "1",
                "--log-level", "WARNING"]
        return Proc(name, argv, tmp / f"{name}-{time.monotonic_ns()}.log", r"gRPC on (\S+:\d+)")

    pre, dec = role("prefill").start(), role("decode").start()
    pre.wait_ready(), dec.wait_ready()
    return [router(tmp, model_dir, [f"--endpoint=prefill={MODEL}@{pre.address}",
                                    f"--endpoint=decode={MODEL}@{dec.address}"]), pre, dec]


def router(tmp: Path, model_dir: str, flags: list[str]) -> Proc:
    """A router process (not started) for the one-model bench fleet; `flags`: its --endpoint and other flags."""
    rcfg = {"fleet": "bench", "namespace": "default", "port": 0, "sloClasses": [],
            "models": [{"model": MODEL, "variant": MODEL, "weightsDir": model_dir,
                        "roles": {"prefill": {"grpcPort": 0}, "decode": {"grpcPort": 0}}}]}
    path = tmp / f"router-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(rcfg))
    argv = [sys.executable, "-m", "kvfleet.dataplane.roles.router", "--config", str(path), "--host", "127.0.0.1",
            "--port", "0", "--log-level", "WARNING", *flags]
    return Proc("router", argv, tmp / f"router-{time.monotonic_ns()}.log", r"listening on (http://\S+)")


# -- client -----------------------------------------------------------------------------


def prompts(n: int, lens: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256, vocab) for _ in range(rng.randint(*lens))] for _ in range(n)]


async def one_request(client: Any, prompt: list[int], max_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and ttft is None:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    e2e = time.perf_counter() - t0
    assert ttft is not None and tokens == max_tokens, (ttft, tokens)
    return {"prompt_tokens": len(prompt), "ttft_s": ttft, "tpot_s": (e2e - ttft) / max(tokens - 1, 1), "e2e_s": e2e}


def pcts(vals: list[float]) -> dict[str, float]:
    a = np.array(vals)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


async def run_level(url: str, work: list[list[int]], concurrency: int, max_tokens: int) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1800.0)
    queue = list(reversed(work))
    results: list[dict[str, float]] = []

    async def worker() -> None:
        while queue:
            results.append(await one_request(client, queue.pop(), max_tokens))

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall,
            "prompt_tokens": sum(r["prompt_tokens"] for r in results),
            "output_tok_s": len(results) * max_tokens / wall,
            "ttft_s": pcts([r["ttft_s"] for r in results]), "tpot_s": pcts([r["tpot_s"] for r in results]),
            "e2e_s": pcts([r["e2e_s"] for r in results]), "loadavg_1m": [load0, os.getloadavg()[0]],
            "per_request": results}


# -- gRPC: stats and the transfer probe ------------------------------------------------------


def role_stats(address: str, role: str) -> dict[str, int]:
    import grpc
    from kvfleet.dataplane.rpc import kvfleet_pb2 as pb
    from kvfleet.dataplane.rpc import kvfleet_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.DecodeStub(ch) if role == "decode" else pb_grpc.PrefillStub(ch)
        msg = stub.Stats(pb.Empty(), timeout=10)
    return {f.name: int(getattr(msg, f.name)) for f in msg.DESCRIPTOR.fields if isinstance(getattr(msg, f.name), int)}


def probe_transfer(prefill: str, decode: str, lengths: list[int], vocab: int, seed: int,
                   repeats: int) -> list[dict[str, Any]]:
    """Reserve on decode, prefill with decode as the KV target, release: PrefillReplies per length.

    Each prompt goes `repeats` times: the first prefill computes it (`prefill_s`), the repeats read
    it from prefill's prefix cache (cheap) but still push every block, so the transfer is timed
    `repeats` times at little cost; the median is kept.
    """
    import grpc
    from kvfleet.dataplane.engine.api import GenerationRequest, SamplingParams
    from kvfleet.dataplane.roles import wire
    from kvfleet.dataplane.rpc import kvfleet_pb2 as pb
    from kvfleet.dataplane.rpc import kvfleet_pb2_grpc as pb_grpc

    out = []
    rng = random.Random(seed)
    with grpc.insecure_channel(prefill, options=wire.CHANNEL_OPTIONS) as pch, \
            grpc.insecure_channel(decode, options=wire.CHANNEL_OPTIONS) as dch:
        pstub, dstub = pb_grpc.PrefillStub(pch), pb_grpc.DecodeStub(dch)
        for i, n in enumerate(lengths):
            prompt = [rng.randrange(256, vocab) for _ in range(n)]
            replies, loads = [], []
            for r in range(repeats):
                rid = f"probe-{seed}-{i}-{r}"
                dstub.Reserve(pb.ReserveRequest(request_id=rid, num_prompt_tokens=n, max_tokens=2), timeout=10)
                req = GenerationRequest(rid, prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                                        variant=MODEL)
                loads.append(os.getloadavg()[0])
                rep = pstub.Prefill(pb.PrefillRequest(request=wire.request_to_pb(req),
                                                      target=pb.KVTarget(address=decode, reservation=rid)),
                                    timeout=600)
                dstub.Release(pb.ReleaseRequest(reservation=rid), timeout=10)
                assert rep.transfer_ok, f"probe {rid}: the KV push failed"
                replies.append(rep)
            assert len({r.kv_bytes for r in replies}) == 1, "a cached repeat moved other bytes"
            out.append({"prompt_tokens": n, "kv_bytes": replies[0].kv_bytes, "kv_blocks": replies[0].kv_blocks,
                        "transfer_s": float(np.median([r.transfer_s for r in replies])),
                        "transfer_s_all": [r.transfer_s for r in replies], "prefill_s": replies[0].prefill_s,
                        "cached_prefill_s": [r.prefill_s for r in replies[1:]], "loadavg_1m": loads})
    return out


def fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """y = fixed + per_token * x (least squares)."""
    b, a = np.polyfit(np.array(xs, dtype=float), np.array(ys, dtype=float), 1)
    return {"fixed": float(a), "per_token": float(b)}


# -- one setup --------------------------------------------------------------------------------


def run_setup(name: str, procs: list[Proc], levels: list[tuple[int, list[list[int]]]], args: argparse.Namespace,
              vocab: int, probe_lengths: list[int]) -> dict[str, Any]:
    print(f"== {name}: starting {', '.join(p.name for p in procs)} (load {os.getloadavg()[0]:.2f})", flush=True)
    for p in procs:
        if p.proc is None:
            p.start()
    try:
        for p in procs:
            p.wait_ready()
        url = procs[0].address
        asyncio.run(run_level(url, prompts(1, (16, 16), vocab, 7), 1, 4))  # warm: first-call costs
        by = {p.name: p for p in procs}
        before = role_stats(by["decode"].address, "decode") if "decode" in by else None
        res: dict[str, Any] = {"levels": []}
        for c, work in levels:
            cpu0 = cpu_seconds(procs)
            lv = asyncio.run(run_level(url, work, c, args.output_tokens))
            cpu1 = cpu_seconds(procs)
            lv["cpu_s"] = {k: cpu1[k] - cpu0[k] for k in cpu0}
            res["levels"].append(lv)
            print(f"   c={c}: TTFT p50 {lv['ttft_s']['p50']:.2f}s TPOT p50 {1e3 * lv['tpot_s']['p50']:.0f}ms "
                  f"CPU {lv['cpu_s']} (load {lv['loadavg_1m'][1]:.2f})", flush=True)
        if before is not None:
            after = role_stats(by["decode"].address, "decode")
            sent = role_stats(by["prefill"].address, "prefill")
            tokens = sum(lv["prompt_tokens"] for lv in res["levels"])
            got = after.get("kv_bytes_received", 0) - before.get("kv_bytes_received", 0)
            res["decode_stats"] = {"kv_bytes_received": got, "prompt_tokens": tokens,
                                   "bytes_per_prompt_token": got / tokens,
                                   "recomputes": after.get("recomputes", 0) - before.get("recomputes", 0),
                                   "kv_checksum_failures": after.get("kv_checksum_failures", 0),
                                   "prefill_kv_bytes_sent_total": sent.get("kv_bytes_sent", 0),
                                   "reservations_left": after.get("reservations", 0)}
            probes = probe_transfer(by["prefill"].address, by["decode"].address, probe_lengths, vocab, args.seed + 77,
                                    args.probe_repeats)
            xs = [p["prompt_tokens"] for p in probes]
            res["transfer"] = {"probes": probes, "bytes": fit(xs, [p["kv_bytes"] for p in probes]),
                               "ms": fit(xs, [1e3 * p["transfer_s"] for p in probes]),
                               "prefill_ms": fit(xs, [1e3 * p["prefill_s"] for p in probes])}
            t = res["transfer"]
            print(f"   KV: {t['bytes']['per_token']:.0f} B/token + {round(t['bytes']['fixed']):d} B, "
                  f"{1e3 * t['ms']['per_token']:.2f} us/token + {t['ms']['fixed']:.1f} ms", flush=True)
        return res
    finally:
        for p in reversed(procs):
            p.stop()


# -- analytic model ---------------------------------------------------------------------------

H100_TFLOPS = 989e12  # dense BF16
LINKS_GBPS = (100, 400)
MODELS = {  # layers, kv heads, head dim, non-embedding params, attention width (heads x head dim)
    "SmolLM2-135M": {"layers": 30, "kv_heads": 3, "head_dim": 64, "params": 106.2e6, "attn_width": 576},
    "Llama-3-8B": {"layers": 32, "kv_heads": 8, "head_dim": 128, "params": 6.98e9, "attn_width": 4096},
}


def kv_bytes_per_token(m: dict[str, float], bits: int, overhead: float = 1.0) -> float:
    return 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * bits / 8 * overhead


def prefill_flops_per_token(m: dict[str, float], prompt_tokens: int) -> float:
    """2 x params (matmuls) + causal attention: QK^T and AV over n/2 keys on average, 2 FLOPs each."""
    return 2 * m["params"] + 2 * 2 * m["layers"] * (prompt_tokens / 2) * m["attn_width"]


def analytic(overheads: dict[str, float], prompt_tokens: int, mfus: tuple[float, ...]) -> list[dict[str, Any]]:
    rows = []
    for name, m in MODELS.items():
        for codec, bits in (("fp16", 16), ("int8", 8), ("int4", 4)):
            b = kv_bytes_per_token(m, bits, overheads.get(codec, 1.0))
            for mfu in mfus:
                compute_us = prefill_flops_per_token(m, prompt_tokens) / (mfu * H100_TFLOPS) * 1e6
                row = {"model": name, "codec": codec, "bytes_per_token": b, "mfu": mfu,
                       "prefill_us_per_token": compute_us}
                for g in LINKS_GBPS:
                    us = b * 8 / (g * 1e9) * 1e6
                    row[f"transfer_us_{g}g"] = us
                    row[f"ratio_{g}g"] = us / compute_us
                rows.append(row)
    return rows


# -- report -----------------------------------------------------------------------------------

MARK_A, MARK_B = "<!-- analysis -->", "<!-- /analysis -->"


def _ms3(d: dict[str, float], scale: float = 1e3, fmt: str = "{:.0f}") -> str:
    return "/".join(fmt.format(scale * d[p]) for p in ("p50", "p90", "p99"))


def write_md(rep: dict[str, Any], path: Path) -> None:
    old = path.read_text() if path.exists() else ""
    m = re.search(re.escape(MARK_A) + r"(.*?)" + re.escape(MARK_B), old, re.S)
    analysis = m.group(1).strip() if m else "_(written after looking at the tables)_"
    env, w = rep["environment"], rep["workload"]
    lines = [
        "# Colocated vs disaggregated serving of long prompts (SmolLM2-135M)", "",
        f"`{rep['command']}` on {env['cpu']} ({env['cpu_count']} cores, shared with two other engineers' work), "
        f"torch {env['torch']}, Python {env['python']}, kvfleet {env['kvfleet_git_sha']}, {env['date_utc']} UTC, "
        f"{rep['wall_s'] / 60:.1f} min in all. fp32 model on CPU, blocks of {BLOCK_SIZE} tokens, "
        "every setup in fresh processes on loopback, one at a time.", "",
        f"Workload: random token-id prompts of {w['prompt_lens'][0]}-{w['prompt_lens'][1]} tokens (every request "
        f"its own prompt: no prefix-cache hits), {w['output_tokens']} output tokens each (greedy, `ignore_eos`), "
        "streamed through the `openai` SDK by closed-loop clients; "
        + ", ".join(f"{n} requests at concurrency {c}" for c, n in w["levels"])
        + ". The same prompts for every setup. TTFT and TPOT (per request, first token excluded) are "
        "client-side; with this few requests p90/p99 are the slowest requests, not a tail.", "",
        "Threads: the colocated engine with 2 torch threads matches prefill (1) + decode (1); the router is a "
        "third process with no torch work. `colocated 1t` is the same engine with one thread. Load average "
        "(1 min, `os.getloadavg`) at the start -> end of each row: the two cores are shared, so read rows of one "
        "run against each other, not against other runs.", "",
        "## Latency", "",
        "`CPU s/req` is the CPU time the setup's processes used during the row (user + system, all threads, "
        "from /proc) per request, split as engine or router+prefill+decode: unlike wall-clock figures it does "
        "not depend on what else runs on the cores.", "",
        "| setup | KV policy | concurrency | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | E2E p50 s | output tok/s "
        "| CPU s/req | load avg |", "|---|---|---:|---|---|---:|---:|---|---|",
    ]
    for s in rep["setups"]:
        for lv in s["levels"]:
            la, cpu = lv["loadavg_1m"], lv.get("cpu_s", {})
            per = [v / lv["requests"] for v in cpu.values()]
            cpu_txt = (f"{sum(per):.1f}" + (" = " + " + ".join(f"{v:.1f}" for v in per) if len(per) > 1 else "")
                       if per else "")
            lines.append(f"| {s['name']} | {s['policy']} | {lv['concurrency']} | {_ms3(lv['ttft_s'])} | "
                         f"{_ms3(lv['tpot_s'])} | {lv['e2e_s']['p50']:.2f} | {lv['output_tok_s']:.2f} | {cpu_txt} | "
                         f"{la[0]:.2f} -> {la[1]:.2f} |")
    lines += [
        "", "## KV transfer per prompt token (disaggregated, prefill -> decode over gRPC on loopback)", "",
        "Probe: one prompt per length (" + ", ".join(str(n) for n in rep["probe_lengths"]) + " tokens), sent "
        f"{rep.get('probe_repeats', 1)} times (the repeats hit prefill's prefix cache but push every block "
        "again; the median transfer is kept), each as `Reserve` -> `Prefill` (pushes to decode) -> `Release`, "
        "every figure from the `PrefillReply`. `B/token` = slope of bytes over prompt length (exact: the "
        "blocks), `fixed` = intercept (the lane: full-precision sink + residual + incomplete-group rows, "
        "fp32). `transfer` = serialize the hand-off + open a channel + stream `PushKV` + decode's checksum "
        "and layout checks; it runs after prefill and before the first token returns, so all of it is on "
        "the TTFT path. `@N` columns are the longest probe: ms in all, us per prompt token amortized "
        "(fixed costs included), GB/s moved. `slope` = us/token from a least-squares line over the lengths. "
        "`decode rx` = bytes the decode pod counted during the latency runs / their prompt tokens (whole "
        "blocks and the lane included). `transfer / prefill` compares the amortized transfer with the "
        "uncached prefill time of the same prompt on this CPU (1 thread).", "",
        "| KV policy | B/token | vs fp32 | fixed B | decode rx B/token | transfer ms @N | us/token @N "
        "| slope us/token | GB/s @N | prefill ms/token @N | transfer / prefill | recomputes | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    fp32_bt = next((s["transfer"]["bytes"]["per_token"] for s in rep["setups"] if s.get("transfer")
                    and s["policy"] == "fp32"), None)
    for s in rep["setups"]:
        t = s.get("transfer")
        if not t:
            continue
        big = max(t["probes"], key=lambda p: p["prompt_tokens"])
        n = big["prompt_tokens"]
        d = s["decode_stats"]
        loads = [x for p in t["probes"] for x in (p["loadavg_1m"] if isinstance(p["loadavg_1m"], list)
                                                   else [p["loadavg_1m"]])]
        lines.append(
            f"| {s['policy']} | {t['bytes']['per_token']:.0f} | "
            f"{(t['bytes']['per_token'] / fp32_bt) if fp32_bt else float('nan'):.3f} | {round(t['bytes']['fixed']):d} | "
            f"{d['bytes_per_prompt_token']:.0f} | {1e3 * big['transfer_s']:.1f} | "
            f"{1e6 * big['transfer_s'] / n:.1f} | {1e3 * t['ms']['per_token']:.1f} | "
            f"{big['kv_bytes'] / big['transfer_s'] / 1e9:.2f} | {1e3 * big['prefill_s'] / n:.2f} | "
            f"{big['transfer_s'] / big['prefill_s']:.4f} | {d['recomputes']} | {min(loads):.2f}-{max(loads):.2f} |")
    mo = rep["model"]
    lines += [
        "", "## What a GPU cluster would see: the model", "",
        "Per prompt token, prefill computes `2 x params + 4 x layers x (n/2) x (heads x head_dim)` FLOPs "
        f"(matmuls, plus causal attention over n/2 earlier tokens on average; n = {mo['prompt_tokens']} here) and "
        "moves `2 x layers x kv_heads x head_dim x bytes x overhead` of KV. The decode pod would otherwise "
        "recompute the prompt, so the KV bytes buy exactly that prefill compute. On an H100 "
        f"(989 dense BF16 TFLOP/s) at MFU {' / '.join(f'{x:.0%}' for x in mo['mfus'])}: "
        "`transfer / prefill` < 1 means the link moves a token's KV faster than the GPU computes it, so a "
        "layer-by-layer push hides behind prefill (TTFT grows by about one layer's transfer), and shipping "
        "KV beats recomputing it; > 1 means the link is the bottleneck and TTFT grows by "
        "`n x (transfer - prefill)` even when pipelined. kvfleet today pushes after prefill ends (no "
        "overlap), so its TTFT grows by the whole `n x transfer`. Quantized overhead factors are the measured "
        "ones above (scales and zero points, fp16; per token, over the int codes): "
        + ", ".join(f"{k} x{v:.3f}" for k, v in mo["overheads"].items()) + "; fp16 has none. Links at line "
        "rate (an RDMA NIC reaches ~85-95% of it; gRPC over TCP far less, see GB/s above).", "",
        "| model | KV codec | KV B/token | MFU | prefill us/token | transfer us/token 100 Gb/s | ratio | "
        "transfer us/token 400 Gb/s | ratio | 2k-token prompt: TTFT + (serial push) 100 / 400 Gb/s ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in mo["rows"]:
        n = mo["prompt_tokens"]
        lines.append(
            f"| {r['model']} | {r['codec']} | {r['bytes_per_token']:.0f} | {r['mfu']:.0%} | "
            f"{r['prefill_us_per_token']:.3f} | {r['transfer_us_100g']:.3f} | {r['ratio_100g']:.2f} | "
            f"{r['transfer_us_400g']:.3f} | {r['ratio_400g']:.2f} | "
            f"{n * r['prefill_us_per_token'] / 1e3:.2f} + {n * r['transfer_us_100g'] / 1e3:.2f} / "
            f"{n * r['transfer_us_400g'] / 1e3:.2f} |")
    lines += ["", MARK_A, analysis, MARK_B]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from bench.engine import environment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short prompts, few requests (smoke run)")
    ap.add_argument("--prompt-lens", type=int, nargs=2, default=[1024, 1536], metavar=("MIN", "MAX"))
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--requests-c1", type=int, default=4)
    ap.add_argument("--requests-c4", type=int, default=8)
    ap.add_argument("--probe-lengths", type=int, nargs="+", default=[256, 512, 1024, 1536])
    ap.add_argument("--probe-repeats", type=int, default=3, help="pushes timed per probe prompt (median kept)")
    ap.add_argument("--colocated-threads", type=int, nargs="*", default=[2, 1])
    ap.add_argument("--policies", nargs="+", default=["fp32", "int8", "int4"])
    ap.add_argument("--model-prompt-tokens", type=int, default=2048, help="prompt length for the analytic model")
    ap.add_argument("--mfu", type=float, nargs="+", default=[0.4], help="H100 MFU(s) for the analytic model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="output path without extension")
    ap.add_argument("--render", type=Path, help="only rewrite the markdown of this results JSON")
    a = ap.parse_args(argv)
    if a.render:
        write_md(json.loads(a.render.read_text()), a.render.with_suffix(".md"))
        return 0
    if a.quick:
        a.prompt_lens, a.requests_c1, a.requests_c4, a.probe_lengths = [256, 384], 2, 4, [128, 256, 384]
        a.output_tokens, a.colocated_threads = 16, [2]
    out = a.out or RESULTS / ("disaggregated_quick" if a.quick else "disaggregated")
    from kvfleet.dataplane.model.smollm2 import smollm2_dir

    model_dir = str(smollm2_dir())
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    lens = (a.prompt_lens[0], a.prompt_lens[1])
    levels = [(1, prompts(a.requests_c1, lens, vocab, a.seed + 1)), (4, prompts(a.requests_c4, lens, vocab, a.seed + 4))]
    per_seq = -(-(a.prompt_lens[1] + a.output_tokens) // BLOCK_SIZE)
    num_kv_blocks = 8 * per_seq + 64  # max_num_seqs 8 at the longest prompt, whatever the policy
    pols = policies()
    t0 = time.perf_counter()
    setups: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvfleet-bench-disagg-") as tmpdir:
        tmp = Path(tmpdir)
        fp32_cfg = engine_config(tmp, model_dir, pols["fp32"], "colocated-fp32", num_kv_blocks)
        for th in a.colocated_threads:
            name = f"colocated {th}t"
            setups.append({"name": name, "policy": "fp32", "threads": th,
                           **run_setup(name, colocated(tmp, fp32_cfg, th), levels, a, vocab, [])})
        for pol in a.policies:
            cfg = engine_config(tmp, model_dir, pols[pol], f"disagg-{pol}", num_kv_blocks)
            name = "disaggregated 1+1t"
            procs = disaggregated(tmp, cfg, model_dir)
            setups.append({"name": name, "policy": pol, "threads": 2,
                           **run_setup(f"{name} {pol}", procs, levels, a, vocab, a.probe_lengths)})
    wall = time.perf_counter() - t0
    env = environment(1, "float32")
    env.pop("torch_threads", None)
    fp32_bt = next(s["transfer"]["bytes"]["per_token"] for s in setups if s.get("transfer") and s["policy"] == "fp32")
    raw = {"int8": fp32_bt / 4, "int4": fp32_bt / 8}  # int codes alone: fp32 stores 4 bytes per element
    overheads = {s["policy"]: s["transfer"]["bytes"]["per_token"] / raw[s["policy"]]
                 for s in setups if s.get("transfer") and s["policy"] in raw}
    mfus = tuple(a.mfu)
    rep = {
        "command": "make bench-disagg" if not a.quick else "python -m bench.disaggregated --quick",
        "environment": env, "wall_s": wall, "model_dir": model_dir, "num_kv_blocks": num_kv_blocks,
        "policies": {k: pols[k].__dict__ for k in a.policies}, "probe_lengths": a.probe_lengths,
        "probe_repeats": a.probe_repeats,
        "workload": {"prompt_lens": a.prompt_lens, "output_tokens": a.output_tokens,
                     "levels": [(c, len(w)) for c, w in levels], "seed": a.seed},
        "setups": setups,
        "model": {"prompt_tokens": a.model_prompt_tokens, "mfus": list(mfus), "overheads": overheads,
                  "h100_tflops": H100_TFLOPS, "models": MODELS,
                  "rows": analytic(overheads, a.model_prompt_tokens, mfus)},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rep, indent=2) + "\n")
    write_md(rep, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
