"""The synchronous engine: step = schedule -> run -> postprocess.

The scheduler (`scheduler.py`, no torch) plans a step (`StepPlan`); the worker (`worker.py`: model
runner + KV storage) runs it and answers with a `StepResult`; `postprocess` turns that into outputs.

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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from kvfleet.dataplane.config import EngineConfig, tokenizer_dir
from kvfleet.dataplane.engine import handoff
from kvfleet.dataplane.engine.adapters import AdapterManager
from kvfleet.dataplane.engine.api import (
    SEED_MAX,
    SEED_MIN,
    EngineStats,
    GenerationRequest,
    InvalidRequest,
    KVHandoff,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
    choice_request_id,
)
from kvfleet.dataplane.engine.kv_sharing import CrossVariantReuse, check_kv_sharing, check_sharing_weights
from kvfleet.dataplane.engine.model_runner import ModelRunner
from kvfleet.dataplane.engine.scheduler import Scheduler
from kvfleet.dataplane.engine.sequence import SeqStatus, Sequence
from kvfleet.dataplane.engine.structured import StructuredOutputs
from kvfleet.dataplane.engine.worker import Sample, StepPlan, StepResult, Worker
from kvfleet.dataplane.kernels.cpu import attach_cpu_kernels
from kvfleet.dataplane.kvcache import transfer
from kvfleet.dataplane.kvcache.blocks import BlockManager
from kvfleet.dataplane.kvcache.build import KVStorageSpec, kv_storage_spec
from kvfleet.dataplane.kvcache.hidden import HiddenStore
from kvfleet.dataplane.kvcache.keys import prefix_extra_key
from kvfleet.dataplane.kvcache.lookahead import lookahead_scorer
from kvfleet.dataplane.kvcache.paged_eviction import EvictionStats, PagedEvictor
from kvfleet.dataplane.kvsharing import transition_layers
from kvfleet.dataplane.model.packed_linear import pack_linears

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
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 weights_id: str = "") -> None:
        """weights_id: content hash of weights that are not the base's (a full fine-tune), for the prefix key."""
        self.config = config
        self.model_config = model_config
        self.device = torch.device(device)
        if config.cpu_packed_linear and self.device.type == "cpu":
            pack_linears(model)  # oneDNN-prepacked weights: the linears are most of a CPU step
        mc = model_config
        bs = config.block_size
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        # how the cache policy stores KV (raises before allocating anything: pyramid is rejected)
        kvspec = kv_storage_spec(config.cache_policy, mc.num_hidden_layers, bs, mc.num_key_value_heads,
                                 mc.head_dim, dtype, num_lanes=config.max_num_seqs)
        # DroidSpeak: the hidden state entering each recomputed group's first layer is kept per slot
        transitions = sorted({t for share in config.kv_sharing for t in transition_layers(share.recompute_layers)})
        hidden_bytes = HiddenStore.bytes_per_block(len(transitions), bs, mc.hidden_size, dtype) if transitions else 0
        num_blocks = self._num_blocks(kvspec, hidden_bytes)
        # NOTE: a sequence can never outgrow the whole cache (it would preempt itself forever)
        self.max_model_len = min(self.max_model_len, num_blocks * bs)
        rotary = getattr(model, "rotary", None)
        kv = kvspec.allocate(num_blocks, self.device,
                             rope=(lambda p: rotary.cos_sin(p, dtype)) if rotary is not None else None)
        if config.kv_sharing:
            check_kv_sharing(config, mc.num_hidden_layers)
            kv.hidden = HiddenStore(transitions, num_blocks, bs, mc.hidden_size, dtype, self.device)
        bm = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(bm, config.max_num_seqs, config.max_num_batched_tokens,
                                   starvation_s=config.starvation_ms / 1000.0,
                                   hit_align_blocks=kvspec.hit_align_blocks, usable_hit=kv.usable_hit,
                                   usable_shared=kv.hidden.usable if kv.hidden is not None else None,
                                   max_adapters=config.max_active_adapters if config.adapters else None)
        self.worker = Worker(model, kv, bm, kvspec.policy.eviction, self.device,
                             lookahead_scorer(config.cache_policy, model, mc, self.device))
        # CPU: fused kernels for decode attention, norms and RoPE (built once, cached; dataplane/kernels)
        self.kernels = attach_cpu_kernels(config.cpu_kernels, model, self.runner.attn) \
            if self.device.type == "cpu" else None
        # LoRA variants served on these base weights (checked now, loaded on first use)
        self.adapters = AdapterManager.from_config(config, mc, self.device, dtype) if config.adapters else None
        self.runner.adapters = self.adapters
        self.weights_id = weights_id
        self.eos_token_ids = frozenset(getattr(mc, "eos_token_ids", ()) or ())
        self.runner.eos_token_ids = self.eos_token_ids
        self.runner.structured = StructuredOutputs(Path(tokenizer_dir(config)) / "tokenizer.json",
                                                   mc.vocab_size, self.eos_token_ids)
        # prefix-cache isolation: KV of another variant or another codec is never a hit
        self.codec_key = kvspec.prefix_key_suffix
        if config.kv_sharing:
            check_sharing_weights(config, self.weights_of)
            self.runner.sharing = CrossVariantReuse(
                {self.prefix_key(share.variant): share.recompute_layers for share in config.kv_sharing})
        self.kv_layout = transfer.layout(kv)  # prefill and decode must agree on it to hand KV over
        self.reservations = handoff.Reservations()  # decode role: blocks held for KV on its way
        self.seqs: dict[str, Sequence] = {}
        self.groups: dict[str, list[str]] = {}  # n > 1: request id -> its choices' sequence ids
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prompt_tokens_computed = 0  # prompt positions run through the model (one prefill per n choices)

    @property
    def runner(self) -> ModelRunner:
        """The worker's model runner."""
        return self.worker.runner

    @property
    def evictor(self) -> PagedEvictor | None:
        """The worker's token evictor (None without an eviction policy)."""
        return self.worker.evictor

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """Load the model from `config.model_dir` and size the KV cache."""
        from kvfleet.dataplane.model.loader import load_model

        device, dtype = resolve_device_dtype(config)
        model, model_config = load_model(config.weights_dir, dtype=dtype, device=device)
        weights_id = ""
        if config.fine_tune_dir:  # a full fine-tune: its KV is its own (the prefix key names its weights)
            from kvfleet.dataplane.model.loader import safetensors_files
            from kvfleet.dataplane.model.lora import weights_identity

            weights_id = weights_identity(*safetensors_files(Path(config.fine_tune_dir)))
        return cls(model, model_config, config, device, dtype, weights_id)

    def _num_blocks(self, kvspec: KVStorageSpec, hidden_bytes: int = 0) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = kvspec.bytes_per_block + hidden_bytes  # stored hidden states share the KV budget
        if cfg.kv_cache_bytes is not None:
            budget = cfg.kv_cache_bytes
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * 0.8)
        else:
            want = min(cfg.max_num_seqs * self.max_model_len, max(DEFAULT_CPU_KV_TOKENS, self.max_model_len))
            budget = math.ceil(want / cfg.block_size) * per_block
        lanes = kvspec.lane_bytes
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
        if request.request_id in self.seqs or request.request_id in self.groups:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if n >= self.max_model_len:
            raise ValueError(f"prompt of {n} tokens leaves no room to generate (max_model_len {self.max_model_len})")
        sp = request.sampling
        if sp.max_tokens < 1 or sp.temperature < 0 or not 0 < sp.top_p <= 1 or sp.top_k < 0 \
                or sp.repetition_penalty <= 0 or sp.min_tokens < 0 or sp.n < 1:
            raise ValueError(f"invalid sampling params {sp}: need max_tokens >= 1, temperature >= 0, "
                             "0 < top_p <= 1, top_k >= 0, repetition_penalty > 0, min_tokens >= 0")
        if sp.seed is not None and not SEED_MIN <= sp.seed <= SEED_MAX - (sp.n - 1):
            # NOTE: caught here, torch's manual_seed would raise inside the step and end the engine loop
            # (choice i of n samples with seed + i)
            raise InvalidRequest(f"seed must be in [{SEED_MIN}, {SEED_MAX - (sp.n - 1)}]", param="seed")
        vocab = getattr(self.model_config, "vocab_size", None)
        if vocab is not None and any(not 0 <= t < vocab for t, _ in sp.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if sp.json_schema is not None:
            if sp.min_tokens:  # a complete document allows only eos, which min_tokens would ban
                raise InvalidRequest("min_tokens cannot be combined with structured output", param="min_tokens")
            try:
                self.runner.structured.grammar(sp.json_schema)  # type: ignore[union-attr]
            except ValueError as e:
                raise InvalidRequest(str(e), param="response_format") from e
        if vocab is not None and (min(request.prompt_token_ids) < 0 or max(request.prompt_token_ids) >= vocab):
            # NOTE: caught here, an out-of-range id would otherwise crash the step of every request
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        sp = request.sampling
        if sp.n == 1:
            self.scheduler.add(self.new_sequence(request))
            return
        # n choices: the leader computes the prompt; the others fork from it when it samples
        rid, kw = request.request_id, self._sequence_kwargs(request)
        choices = [Sequence(replace(request, request_id=choice_request_id(rid, i), sampling=replace(
            sp, n=1, seed=None if sp.seed is None else sp.seed + i)), group_id=rid, index=i, **kw)
            for i in range(sp.n)]
        choices[0].forks = choices[1:]
        self.groups[rid] = [c.seq_id for c in choices]
        for c in choices:
            self.seqs[c.seq_id] = c
        self.scheduler.add(choices[0])

    def _sequence_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        slo = self.config.slo_class(request.slo_class)
        variant = request.variant or self.config.variant
        adapter = self.config.adapter(variant)
        if adapter is None and self.config.adapters and variant != self.config.variant:
            known = [self.config.variant] + [a.name for a in self.config.adapters]
            raise InvalidRequest(f"this engine serves variants {known}, not {variant!r}", param="model")
        return dict(priority=slo.priority if slo else 0, ttft_s=slo.ttft_ms / 1000.0 if slo else math.inf,
                    tpot_s=slo.tpot_ms / 1000.0 if slo else math.inf,
                    extra_key=self.prefix_key(variant), adapter=adapter.name if adapter else None,
                    share_key=self.prefix_key(share.from_variant) if (share := self.config.sharing(variant)) else "")

    def prefix_key(self, variant: str = "") -> str:
        """The extra key of a request's prefix-cache hashes (`keys.prefix_extra_key`): its variant (this
        engine's by default), the identity of the weights it runs on and the codec."""
        variant = variant or self.config.variant
        return prefix_extra_key(variant, self.weights_of(variant), self.codec_key)

    def weights_of(self, variant: str) -> str:
        """The identity of the weights `variant` runs on here: its adapter's, the fine-tune's, "" for the base."""
        adapter = self.config.adapter(variant)
        return self.adapters.identities[adapter.name] if adapter and self.adapters else self.weights_id

    def served_variants(self) -> list[str]:
        """The variants this engine answers for: its own and its LoRA adapters'."""
        return [self.config.variant] + [a.name for a in self.config.adapters]

    def new_sequence(self, request: GenerationRequest) -> Sequence:
        """A tracked `Sequence` for a validated one-choice request (not yet scheduled)."""
        seq = Sequence(request, **self._sequence_kwargs(request))
        self.seqs[request.request_id] = seq
        return seq

    # -- disaggregation: decode's side of the KV hand-off (see handoff.py) ------------

    def reserve(self, request_id: str, num_prompt_tokens: int, max_tokens: int, ttl_s: float = 60.0) -> bool:
        """Hold KV blocks for a prompt whose KV a prefill engine will push; False = no room now."""
        return self.reservations.reserve(self, request_id, num_prompt_tokens, max_tokens, ttl_s)

    def release_reservation(self, request_id: str) -> bool:
        return self.reservations.release(self, request_id)

    def add_prefilled(self, request: GenerationRequest, first_token: int,
                      kv: KVHandoff | None) -> bool:
        """Continue `request` after its first token from the pushed KV (or recompute it: returns True)."""
        if request.request_id in self.seqs:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.sampling.n != 1 or request.sampling.json_schema is not None:
            raise InvalidRequest("a prefilled request continues one choice without a grammar", param="n")
        table = self.reservations.tables.pop(request.request_id, None)
        self.reservations.deadlines.pop(request.request_id, None)
        _, recomputed = handoff.admit_prefilled(self, request, first_token, kv, table)
        return recomputed

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now and free its blocks; returns its final output (None if unknown).
        A request with n > 1 has one final output per choice: see `abort_all`."""
        outs = self.abort_all(request_id)
        return outs[0] if outs else None

    def abort_all(self, request_id: str) -> list[RequestOutput]:
        """End a request (every choice of an n > 1 request, or one choice by its own id); a decode
        reservation under this id is released too."""
        self.reservations.release(self, request_id)
        outs = []
        for sid in self.groups.get(request_id, [request_id]):
            seq = self.scheduler.abort(sid)
            if seq is None and sid in self.seqs and self.seqs[sid].group_id is not None:
                seq = self.seqs[sid]  # a choice not forked yet: it has no blocks
                leader = self.seqs.get(choice_request_id(seq.group_id or "", 0))
                if leader is not None and seq in leader.forks:
                    leader.forks.remove(seq)
            if seq is not None and sid in self.seqs:
                outs.append(self._final(seq, "abort"))
        return outs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- the loop ------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the increments it produced."""
        plan = self.scheduler.schedule()
        result = self.worker.execute(plan)
        return self.postprocess(plan, result)

    def postprocess(self, out: StepPlan, result: StepResult) -> list[RequestOutput]:
        """Advance sequences, append sampled tokens, detect stops, emit increments; then eviction."""
        self.scheduler.commit(out)
        now = time.monotonic()
        outputs: list[RequestOutput] = []
        for item, tok in zip(out.scheduled, result.samples, strict=True):
            seq = item.seq
            if item.start < seq.num_prompt_tokens:
                self.prompt_tokens_computed += min(item.start + item.num_new_tokens, seq.num_prompt_tokens) - item.start
            if tok is None or seq.status is not SeqStatus.RUNNING:
                continue
            if seq.forks:
                outputs += self._fork(seq, now, result.fork_samples)
            token_id, logprob = tok
            reason = self._append(seq, token_id, logprob, now)
            if reason is not None:
                kv = handoff.export_kv(self, seq) if seq.request.export_kv else None
                self.scheduler.finish(seq, reason)
                outputs.append(self._final(seq, reason, kv))
            elif logprob is None and seq.num_emitted + 1 == seq.num_output_tokens:
                # hot path (a plain decode step): exactly the one new token to emit
                seq.num_emitted += 1
                outputs.append(RequestOutput(seq.output_id, [token_id], False, None, None,
                                             seq.num_prompt_tokens, seq.num_cached_prompt_tokens, seq.index))
            else:
                outputs.append(self._increment(seq, False, None))
        self.worker.evict(item.seq for item in out.scheduled if item.seq.status is SeqStatus.RUNNING)
        return outputs

    def _fork(self, leader: Sequence, now: float, samples: dict[str, Sample]) -> list[RequestOutput]:
        """The leader's prompt is computed: start its other choices on the shared KV, each with the
        first token sampled from the leader's logits. A cache that cannot share (quantized, evicting)
        or a lack of seats/blocks queues the choice for recompute (mostly prefix-cache hits) instead."""
        outputs = []
        children, leader.forks = leader.forks, []
        for child in children:
            token_id, logprob = samples[child.seq_id]
            shared = False
            if self.worker.can_share_blocks:
                shared, copy = self.scheduler.fork(leader, child)
                if copy is not None:
                    self.worker.copy_block(*copy)
            reason = self._append(child, token_id, logprob, now)
            if reason is not None:
                if shared:
                    self.scheduler.finish(child, reason)
                else:
                    child.status = SeqStatus.FINISHED
                outputs.append(self._final(child, reason))
                continue
            if not shared:
                self.scheduler.add(child)
            outputs.append(self._increment(child, False, None))
        return outputs

    def _append(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None, now: float) -> str | None:
        sp = seq.request.sampling
        if seq.first_token_time is None:
            seq.first_token_time = now
            if seq.index == 0:  # one prompt per request, however many choices
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

    def _increment(self, seq: Sequence, finished: bool, reason: Any, kv: KVHandoff | None = None) -> RequestOutput:
        new = seq.token_ids[seq.num_prompt_tokens + seq.num_emitted:]
        seq.num_emitted += len(new)
        lps = None
        if seq.request.sampling.logprobs is not None:
            lps, seq.pending_logprobs = seq.pending_logprobs, []
        return RequestOutput(seq.output_id, new, finished, reason, lps, seq.num_prompt_tokens,
                             seq.num_cached_prompt_tokens, index=seq.index, kv=kv,
                             num_preemptions=seq.num_preemptions if finished else 0,
                             queue_s=seq.first_scheduled_time - seq.request.arrival_time
                             if finished and seq.first_scheduled_time is not None else None)

    def _final(self, seq: Sequence, reason: str, kv: KVHandoff | None = None) -> RequestOutput:
        self.seqs.pop(seq.seq_id, None)
        if seq.group_id is not None and not any(c in self.seqs for c in self.groups.get(seq.group_id, ())):
            self.groups.pop(seq.group_id, None)
        self.worker.release(seq.seq_id)
        return self._increment(seq, True, reason, kv)

    # -- conveniences ----------------------------------------------------------

    def generate(self, prompts: Seq[Seq[int]], sampling: SamplingParams | Seq[SamplingParams] | None = None,
                 **request_kw: Any) -> list[RequestOutput]:
        """Offline batch: run `prompts` together to completion; one aggregated output per prompt, in order."""
        sps = [sampling or SamplingParams()] * len(prompts) if not isinstance(sampling, list | tuple) \
            else list(sampling)
        if any(sp.n != 1 for sp in sps):
            raise ValueError("generate() returns one output per prompt: use add_request/step for n > 1")
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
            prompt_tokens_computed=self.prompt_tokens_computed, shared_prefix_tokens=s["shared_hit_tokens"],
        )


def _merge(outs: list[RequestOutput]) -> RequestOutput:
    """Concatenate a request's increments into one output."""
    last = outs[-1]
    toks = [t for o in outs for t in o.new_token_ids]
    lps = None if last.logprobs is None else [lp for o in outs for lp in (o.logprobs or [])]
    return RequestOutput(last.request_id, toks, last.finished, last.finish_reason, lps,
                         last.num_prompt_tokens, outs[0].num_cached_prompt_tokens, index=last.index,
                         num_preemptions=last.num_preemptions, queue_s=last.queue_s)
