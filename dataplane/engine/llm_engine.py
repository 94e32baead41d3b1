"""The synchronous engine: step = schedule -> run -> postprocess.

    engine = LLMEngine.from_config(EngineConfig(model_dir=..., num_kv_blocks=512))
    engine.add_request(GenerationRequest("r1", prompt_ids, SamplingParams(max_tokens=32)))
    while engine.has_unfinished():
        for out in engine.step(): ...

Single-threaded by contract: `AsyncLLMEngine` calls it from one thread only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence as Seq
from typing import Any

import torch
from kvfleet.dataplane.config import EngineConfig
from kvfleet.dataplane.engine.api import (
    SEED_MAX,
    SEED_MIN,
    EngineStats,
    GenerationRequest,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from kvfleet.dataplane.engine.model_runner import ModelRunner
from kvfleet.dataplane.engine.scheduler import Scheduler, SchedulerOutput
from kvfleet.dataplane.engine.sequence import SeqStatus, Sequence
from kvfleet.dataplane.kvcache.blocks import BlockManager
from kvfleet.dataplane.kvcache.paged_eviction import EvictionStats, PagedEvictor
from kvfleet.dataplane.kvcache.paged_quant import make_paged_cache, paged_bytes_per_block, paged_lane_bytes
from kvfleet.dataplane.kvcache.policy import PolicySpec

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_CPU_KV_TOKENS = 32768  # KV budget when the config gives none and there is no GPU to measure


def resolve_device_dtype(cfg: EngineConfig) -> tuple[torch.device, torch.dtype]:
    """'auto' -> cuda if available (bfloat16) else cpu (float32)."""
    dev = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, _DTYPES[cfg.dtype]


class LLMEngine:
    """Continuous-batching engine over a paged KV cache."""

    def __init__(self, model: Any, model_config: Any, config: EngineConfig,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.config = config
        self.model_config = model_config
        self.device = torch.device(device)
        mc = model_config
        bs = config.block_size
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        num_blocks = self._num_blocks(mc, dtype)
        # NOTE: a sequence can never outgrow the whole cache (it would preempt itself forever)
        self.max_model_len = min(self.max_model_len, num_blocks * bs)
        config.cache_policy.check_servable()  # before allocating anything: pyramid is rejected
        spec = PolicySpec.from_config(config.cache_policy)
        rotary = getattr(model, "rotary", None)
        kv = make_paged_cache(config.cache_policy, mc.num_hidden_layers, num_blocks, bs,
                              mc.num_key_value_heads, mc.head_dim, dtype, self.device,
                              num_lanes=config.max_num_seqs,
                              rope=(lambda p: rotary.cos_sin(p, dtype)) if rotary is not None else None)
        bm = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        cp = config.cache_policy
        grouped = cp.token_grouped("key") or cp.token_grouped("value")
        self.scheduler = Scheduler(bm, config.max_num_seqs, config.max_num_batched_tokens,
                                   starvation_s=config.starvation_ms / 1000.0,
                                   # a prefix hit never splits a token group that spans blocks
                                   hit_align_blocks=max(1, cp.group_size // bs) if grouped else 1)
        # token eviction: one kept-token set per sequence, compacted after each step
        self.evictor = PagedEvictor(spec.eviction, kv, bm) if spec.eviction.enabled else None
        self.runner = ModelRunner(model, kv, self.device)
        self.runner.scores = self.evictor.scores if self.evictor is not None else None  # h2o/snapkv
        self.eos_token_ids = frozenset(getattr(mc, "eos_token_ids", ()) or ())
        # prefix-cache isolation: KV of another variant or another codec is never a hit
        self._codec_key = "" if (cp.key_quantization, cp.value_quantization) == ("none", "none") else \
            f"|kv={cp.key_quantization}/{cp.value_quantization}"
        self.seqs: dict[str, Sequence] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """Load the model from `config.model_dir` and size the KV cache."""
        from kvfleet.dataplane.model.loader import load_model

        device, dtype = resolve_device_dtype(config)
        model, model_config = load_model(config.model_dir, dtype=dtype, device=device)
        return cls(model, model_config, config, device, dtype)

    def _num_blocks(self, mc: Any, dtype: torch.dtype) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = paged_bytes_per_block(cfg.cache_policy, mc.num_hidden_layers, cfg.block_size,
                                          mc.num_key_value_heads, mc.head_dim, dtype)
        if cfg.kv_cache_bytes is not None:
            budget = cfg.kv_cache_bytes
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.8)
        else:
            want = min(cfg.max_num_seqs * self.max_model_len, max(DEFAULT_CPU_KV_TOKENS, self.max_model_len))
            budget = math.ceil(want / cfg.block_size) * per_block
        lanes = paged_lane_bytes(cfg.cache_policy, mc.num_hidden_layers, cfg.max_num_seqs, mc.num_key_value_heads,
                                 mc.head_dim, dtype)
        n = (budget - lanes) // per_block  # full-precision lanes come out of the same budget
        if n < 1:
            raise ValueError(f"KV budget {budget} B is smaller than one block ({per_block} B) plus the "
                             f"full-precision lanes ({lanes} B)")
        return n

    # -- requests ------------------------------------------------------------

    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request. Raises ValueError if it can never fit."""
        n = len(request.prompt_token_ids)
        if n == 0:
            raise ValueError("prompt must have at least one token")
        if request.request_id in self.seqs:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if n >= self.max_model_len:
            raise ValueError(f"prompt of {n} tokens leaves no room to generate (max_model_len {self.max_model_len})")
        sp = request.sampling
        if sp.max_tokens < 1 or sp.temperature < 0 or not 0 < sp.top_p <= 1 or sp.top_k < 0:
            raise ValueError(f"invalid sampling params {sp}: need max_tokens >= 1, temperature >= 0, "
                             "0 < top_p <= 1, top_k >= 0")
        if sp.seed is not None and not SEED_MIN <= sp.seed <= SEED_MAX:
            # NOTE: caught here, torch's manual_seed would raise inside the step and end the engine loop
            raise ValueError(f"seed must be in [{SEED_MIN}, {SEED_MAX}]")
        vocab = getattr(self.model_config, "vocab_size", None)
        if vocab is not None and (min(request.prompt_token_ids) < 0 or max(request.prompt_token_ids) >= vocab):
            # NOTE: caught here, an out-of-range id would otherwise crash the step of every request
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        slo = self.config.slo_class(request.slo_class)
        seq = Sequence(
            request,
            priority=slo.priority if slo else 0,
            ttft_s=slo.ttft_ms / 1000.0 if slo else math.inf,
            tpot_s=slo.tpot_ms / 1000.0 if slo else math.inf,
            extra_key=(request.variant or self.config.variant) + self._codec_key,
        )
        self.seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now and free its blocks; returns its final output (None if unknown)."""
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return None
        return self._final(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- the loop ------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the increments it produced."""
        out = self.scheduler.schedule()
        tokens = self.runner.run(out)
        return self.postprocess(out, tokens)

    def postprocess(self, out: SchedulerOutput,
                    tokens: list[tuple[int, TokenLogprob | None] | None]) -> list[RequestOutput]:
        """Advance sequences, append sampled tokens, detect stops, emit increments."""
        self.scheduler.commit(out)
        now = time.monotonic()
        outputs: list[RequestOutput] = []
        for item, tok in zip(out.scheduled, tokens, strict=True):
            seq = item.seq
            if tok is None or seq.status is not SeqStatus.RUNNING:
                continue
            token_id, logprob = tok
            reason = self._append(seq, token_id, logprob, now)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                outputs.append(self._final(seq, reason))
            elif logprob is None and seq.num_emitted + 1 == seq.num_output_tokens:
                # hot path (a plain decode step): exactly the one new token to emit
                seq.num_emitted += 1
                outputs.append(RequestOutput(seq.request.request_id, [token_id], False, None, None,
                                             seq.num_prompt_tokens, seq.num_cached_prompt_tokens))
            else:
                outputs.append(self._increment(seq, False, None))
        if self.evictor is not None:
            for item in out.scheduled:
                if item.seq.status is SeqStatus.RUNNING:
                    self.evictor.maybe_compact(item.seq)
        return outputs

    def _append(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None, now: float) -> str | None:
        sp = seq.request.sampling
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.prompt_tokens += seq.num_prompt_tokens
        seq.last_token_time = now
        self.generation_tokens += 1
        seq.token_ids.append(token_id)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        # NOTE: the stop token is emitted as the last new token (as vLLM and FakeEngine do);
        # ignore_eos only disables the model's eos ids, never the request's stop_token_ids.
        if (token_id in sp.stop_token_ids) or (not sp.ignore_eos and token_id in self.eos_token_ids):
            return "stop"
        if seq.num_output_tokens >= sp.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _increment(self, seq: Sequence, finished: bool, reason: Any) -> RequestOutput:
        new = seq.token_ids[seq.num_prompt_tokens + seq.num_emitted:]
        seq.num_emitted += len(new)
        lps = None
        if seq.request.sampling.logprobs is not None:
            lps, seq.pending_logprobs = seq.pending_logprobs, []
        return RequestOutput(seq.seq_id, new, finished, reason, lps, seq.num_prompt_tokens,
                             seq.num_cached_prompt_tokens)

    def _final(self, seq: Sequence, reason: str) -> RequestOutput:
        self.seqs.pop(seq.seq_id, None)
        self.runner.release(seq.seq_id)
        if self.evictor is not None:
            self.evictor.release(seq.seq_id)
        return self._increment(seq, True, reason)

    # -- conveniences ----------------------------------------------------------

    def generate(self, prompts: Seq[Seq[int]], sampling: SamplingParams | Seq[SamplingParams] | None = None,
                 **request_kw: Any) -> list[RequestOutput]:
        """Offline batch: run `prompts` together to completion; one aggregated output per prompt, in order."""
        sps = [sampling or SamplingParams()] * len(prompts) if not isinstance(sampling, list | tuple) \
            else list(sampling)
        base = f"gen-{time.monotonic_ns()}"
        ids = [f"{base}-{i}" for i in range(len(prompts))]
        for rid, p, sp in zip(ids, prompts, sps, strict=True):
            self.add_request(GenerationRequest(rid, list(p), sp, **request_kw))
        acc: dict[str, list[RequestOutput]] = {rid: [] for rid in ids}
        while any(rid in self.seqs for rid in ids):
            for o in self.step():
                if o.request_id in acc:
                    acc[o.request_id].append(o)
        return [_merge(acc[rid]) for rid in ids]

    def eviction_stats(self) -> EvictionStats:
        """Token-eviction counters (all zero without an eviction policy)."""
        return self.evictor.stats if self.evictor is not None else EvictionStats()

    def stats(self) -> EngineStats:
        s = self.scheduler.stats()
        return EngineStats(
            num_running=s["num_running"], num_waiting=s["num_waiting"],
            kv_blocks_total=s["kv_blocks_total"], kv_blocks_used=s["kv_blocks_used"],
            prefix_cache_hit_tokens=s["prefix_hit_tokens"], prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens, num_preemptions=s["num_preemptions"],
        )


def _merge(outs: list[RequestOutput]) -> RequestOutput:
    """Concatenate a request's increments into one output."""
    last = outs[-1]
    toks = [t for o in outs for t in o.new_token_ids]
    lps = None if last.logprobs is None else [lp for o in outs for lp in (o.logprobs or [])]
    return RequestOutput(last.request_id, toks, last.finished, last.finish_reason, lps,
                         last.num_prompt_tokens, outs[0].num_cached_prompt_tokens)
