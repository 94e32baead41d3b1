"""Offline throughput and step-overhead benchmark of the engine.

    python -m kvfleet.tools.engine_bench --model-dir DIR --batch 1 8 32
    python -m kvfleet.tools.engine_bench --shape smollm2 --batch 8 --profile

`--shape tiny|smollm2` writes a random model of that shape (no download) when
no `--model-dir` is given. For each batch size B it generates `--max-tokens`
tokens for B prompts of `--prompt-len` tokens in one `generate` call and
reports decode tokens/s and where a step's time goes: scheduler, batch
preparation, model forward, logits + sampling, postprocess. "engine
overhead" is everything but forward/logits/sampling, i.e. the Python the
engine adds around the model.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from kvfleet.dataplane.config import EngineConfig
from kvfleet.dataplane.engine import model_runner as mr
from kvfleet.dataplane.engine.api import SamplingParams
from kvfleet.dataplane.engine.llm_engine import LLMEngine, resolve_device_dtype

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    tie_word_embeddings=True, rope_theta=100000.0),
    # SmolLM2's depth and head layout with tiny matrices: forward time ~= per-step dispatch cost,
    # i.e. roughly what a GPU step of the real model costs when kernel launches dominate
    "smollm2-skeleton": dict(vocab_size=512, hidden_size=72, intermediate_size=128, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                             max_position_embeddings=8192, tie_word_embeddings=True),
}


class StepTimer:
    """Wraps engine parts with wall-clock accumulators (synchronizing the device at each edge)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self._decode_only = False
        self._decode_seqs = 0
        self.sync: Callable[[], None] = (torch.cuda.synchronize if engine.device.type == "cuda"
                                         else (lambda: None))
        sched, runner, model = engine.scheduler, engine.runner, engine.runner.model
        sched.schedule = self._wrap("schedule", sched.schedule)  # type: ignore[method-assign]
        runner.prepare = self._wrap("prepare", runner.prepare)  # type: ignore[method-assign]
        model.forward = self._wrap("forward", model.forward)
        model.compute_logits = self._wrap("logits", model.compute_logits)
        self._sample = mr.sample
        mr.sample = self._wrap("sample", mr.sample)  # type: ignore[assignment]
        engine.postprocess = self._wrap("postprocess", engine.postprocess)  # type: ignore[method-assign]
        engine.step = self._wrap("step", engine.step)  # type: ignore[method-assign]

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **kw: Any) -> Any:
            self.sync()
            t0 = time.perf_counter()
            r = fn(*a, **kw)
            self.sync()
            dt = time.perf_counter() - t0
            self.t[name] += dt
            self.t[name + "#n"] += 1
            if name == "schedule":  # remember whether this step is decode-only
                self._decode_only = bool(r.scheduled) and all(i.num_new_tokens == 1 for i in r.scheduled)
                self._decode_seqs = len(r.scheduled)
            elif name == "step" and self._decode_only:
                self.t["decode_step"] += dt
                self.t["decode_tokens"] += self._decode_seqs
            return r

        return timed

    def restore(self) -> None:
        mr.sample = self._sample  # type: ignore[assignment]


def run_batch(engine: LLMEngine, batch: int, prompt_len: int, max_tokens: int, vocab: int,
              seed: int = 0) -> dict[str, float]:
    """Generate for `batch` prompts at once; returns throughput numbers."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, sp)
    wall = time.perf_counter() - t0
    gen = sum(len(o.new_token_ids) for o in outs)
    return {"wall_s": wall, "gen_tokens": gen, "tok_s": gen / wall}


class _NullModel(torch.nn.Module):
    """Computes nothing: isolates the engine's own per-step cost."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Any) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], 1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros(hidden.shape[0], 8)


def engine_overhead(num_seqs: int, steps: int = 50) -> dict[str, float]:
    """ms per decode step spent in schedule / runner (batch build) / postprocess with a null model."""
    from types import SimpleNamespace

    from kvfleet.dataplane.engine.api import GenerationRequest

    mc = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, head_dim=2, vocab_size=8,
                         max_position_embeddings=4096, eos_token_ids=())
    cfg = EngineConfig(model_dir="null", device="cpu", num_kv_blocks=num_seqs * 20, max_num_seqs=num_seqs,
                       max_num_batched_tokens=num_seqs * 64)
    eng = LLMEngine(_NullModel(), mc, cfg)
    sp = SamplingParams(max_tokens=steps + 10, temperature=0.0, ignore_eos=True)
    for i in range(num_seqs):
        eng.add_request(GenerationRequest(f"r{i}", [1 + i % 7] * 60, sp))
    eng.step()  # prefill
    acc = defaultdict(float)
    for _ in range(steps):
        t0 = time.perf_counter()
        out = eng.scheduler.schedule()
        t1 = time.perf_counter()
        res = eng.worker.execute(out)
        t2 = time.perf_counter()
        eng.postprocess(out, res)
        t3 = time.perf_counter()
        acc["schedule"] += t1 - t0
        acc["run"] += t2 - t1
        acc["postprocess"] += t3 - t2
    return {k: 1e3 * v / steps for k, v in acc.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--profile", action="store_true", help="cProfile the last batch size")
    ap.add_argument("--overhead", type=int, nargs="*", metavar="SEQS",
                    help="only measure the engine's own cost per decode step with a null model")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.overhead is not None:
        for n in args.overhead or [32, 256]:
            ms = engine_overhead(n)
            print(f"running={n:4d} " + " ".join(f"{k}_ms={v:6.3f}" for k, v in ms.items())
                  + f" total_ms={sum(ms.values()):6.3f}")
        return

    if args.model_dir is not None:
        return _bench(args, args.model_dir)
    from kvfleet.dataplane.model.tiny import write_tiny_llama

    with tempfile.TemporaryDirectory(prefix=f"kvfleet-bench-{args.shape}-") as model_dir:
        write_tiny_llama(model_dir, seed=0, **SHAPES[args.shape])
        _bench(args, model_dir)


def _bench(args: argparse.Namespace, model_dir: str) -> None:
    need = (args.prompt_len + args.max_tokens) * max(args.batch)
    cfg = EngineConfig(model_dir=model_dir, device=args.device, dtype=args.dtype,
                       num_kv_blocks=need // 16 + max(args.batch) + 8,
                       max_num_seqs=max(args.batch), max_num_batched_tokens=4096, enable_prefix_caching=False)
    engine = LLMEngine.from_config(cfg)
    dev, dtype = resolve_device_dtype(cfg)
    vocab = engine.model_config.vocab_size
    print(f"model={model_dir} device={dev} dtype={dtype} threads={torch.get_num_threads()} "
          f"prompt_len={args.prompt_len} max_tokens={args.max_tokens}")
    run_batch(engine, 2, 8, 4, vocab)  # warm-up
    for i, b in enumerate(args.batch):
        timer = StepTimer(engine)
        prof = cProfile.Profile() if args.profile and i == len(args.batch) - 1 else None
        if prof:
            prof.enable()
        res = run_batch(engine, b, args.prompt_len, args.max_tokens, vocab, seed=i)
        if prof:
            prof.disable()
        timer.restore()
        t = timer.t
        steps = t["step#n"]
        model_s = t["forward"] + t["logits"] + t["sample"]
        over = t["step"] - model_s
        decode_tps = t["decode_tokens"] / t["decode_step"] if t["decode_step"] else 0.0
        print(f"batch={b:3d} tok/s={res['tok_s']:9.1f} decode_tok/s={decode_tps:9.1f} steps={int(steps)} step_ms={1e3 * t['step'] / steps:7.2f} "
              f"forward_ms={1e3 * t['forward'] / steps:7.2f} logits+sample_ms={1e3 * (t['logits'] + t['sample']) / steps:6.2f} "
              f"sched_ms={1e3 * t['schedule'] / steps:5.2f} prepare_ms={1e3 * t['prepare'] / steps:5.2f} "
              f"post_ms={1e3 * t['postprocess'] / steps:5.2f} engine_overhead={100 * over / t['step']:5.1f}%")
        del engine.__dict__["step"], engine.__dict__["postprocess"]
        del engine.scheduler.__dict__["schedule"], engine.runner.__dict__["prepare"]
        del engine.runner.model.__dict__["forward"], engine.runner.model.__dict__["compute_logits"]
        if prof:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
            print(s.getvalue())


if __name__ == "__main__":
    main()
