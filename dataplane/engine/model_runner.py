"""Model runner: SchedulerOutput -> flat batch + paged metadata -> forward -> sampled tokens.

Per step the runner
1. orders the scheduled sequences as [one-token sequences (decodes) | prefill chunks];
2. builds every int64 index (input ids, positions, slots, decode block tables,
   context lengths, logits rows) with numpy, packs them into ONE buffer and
   moves it to the device in one copy;
3. runs the model under `torch.inference_mode()` and computes logits only at
   the last token of each sequence that is due a token (`ScheduledSeq.sample`);
4. samples (`sampler.sample`) with per-request generators for seeded requests.

The model contract (`model/llama.py`): `forward(input_ids[T], positions[T], attn)
-> hidden[T, H]` and `compute_logits(hidden[N, H]) -> [N, V]`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from kvfleet.dataplane.engine.adapters import AdapterManager
from kvfleet.dataplane.engine.api import TokenLogprob
from kvfleet.dataplane.engine.kv_sharing import CrossVariantReuse, tap_forward
from kvfleet.dataplane.engine.logits_process import row_history
from kvfleet.dataplane.engine.sampler import sample
from kvfleet.dataplane.engine.scheduler import ScheduledSeq, SchedulerOutput
from kvfleet.dataplane.engine.sequence import Sequence
from kvfleet.dataplane.engine.structured import StructuredOutputs
from kvfleet.dataplane.kvcache.paged import PagedAttention, PagedMetadata, PrefillBatch, PrefillChunk
from kvfleet.dataplane.kvcache.storage import KVStorage, LaneTable


class ModelRunner:
    """Owns the model, the KV storage and the per-request RNGs."""

    def __init__(self, model: Any, kv_cache: KVStorage, device: torch.device,
                 batch_prefill: bool | None = None) -> None:
        """batch_prefill: attend all prefill chunks in one padded SDPA (None = on CUDA only; never
        with a storage that is not exact, whose reads overlay full-precision rows per sequence)."""
        self.model = model
        self.kv = kv_cache
        self.attn = PagedAttention(kv_cache)
        self.device = device
        self.block_size = kv_cache.block_size
        self._generators: dict[str, torch.Generator] = {}
        self.batch_prefill = device.type == "cuda" if batch_prefill is None else batch_prefill
        self.batch_prefill = self.batch_prefill and kv_cache.exact
        self.eos_token_ids: frozenset[int] = frozenset()  # banned while a request is short of min_tokens
        self.fork_samples: dict[str, tuple[int, TokenLogprob | None]] = {}  # first tokens of forked choices
        self.structured: StructuredOutputs | None = None  # grammar masks (json_schema requests)
        self.adapters: AdapterManager | None = None  # LoRA variants on these base weights (engine/adapters.py)
        self.sharing: CrossVariantReuse | None = None  # variants reusing a sibling's KV (engine/kv_sharing.py)

    @property
    def lanes(self) -> LaneTable:
        """Which lane each running sequence holds (kept by the storage)."""
        return self.kv.lane_table

    def release(self, request_id: str) -> None:
        """Forget per-request state (its RNG, its lane) once the request is finished."""
        self._generators.pop(request_id, None)
        self.kv.release(request_id)
        if self.structured is not None:
            self.structured.release(request_id)

    def generator_state(self, seq_id: str) -> bytes:
        """A seeded request's random stream as bytes (b"" when it has none yet), for `restore_generator`."""
        g = self._generators.get(seq_id)
        return bytes(g.get_state().numpy().tobytes()) if g else b""

    def restore_generator(self, seq: Any, state: bytes) -> None:
        """Continue a seeded request's random stream from another engine's generator state."""
        g = torch.Generator(device=self.device)
        g.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        self._generators[seq.seq_id] = g

    def _generator(self, item: ScheduledSeq | Sequence) -> torch.Generator | None:
        seq = item.seq if isinstance(item, ScheduledSeq) else item
        sp = seq.request.sampling
        if sp.seed is None or sp.temperature == 0:
            return None
        rid = seq.seq_id
        g = self._generators.get(rid)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(sp.seed)
            self._generators[rid] = g
        return g

    def run(self, out: SchedulerOutput) -> list[tuple[int, TokenLogprob | None] | None]:
        """Compute one step. Returns, aligned with `out.scheduled`, (token, logprob) or None."""
        self.fork_samples = {}
        if out.is_empty:
            return []
        items = out.scheduled
        # decodes (1 new token) first: the paged backend batches them together
        order = sorted(range(len(items)), key=lambda i: items[i].num_new_tokens != 1)
        ordered = [items[i] for i in order]
        if out.reuse and self.sharing is not None:  # a sibling's KV into this step's blocks first
            self.sharing.run(self, out.reuse)
        input_ids, positions, meta, sample_rows, which = self.prepare(ordered)
        with torch.inference_mode():
            if self.kv.score_hook is not None:  # h2o/snapkv: which slots each row attends, per step
                meta.scores = self.kv.score_hook.plan(ordered, meta)
            self.attn.set_metadata(meta)
            lora = None if self.adapters is None else self.adapters.batch(
                [it.seq.adapter for it in ordered], [it.num_new_tokens for it in ordered])
            hidden_store = self.kv.hidden
            if hidden_store is not None and hidden_store.layers:  # DroidSpeak: keep transition layers' input
                hidden = tap_forward(self.model, input_ids, positions, self.attn, lora, hidden_store,
                                     meta.slot_mapping)
            elif lora is None:
                hidden = self.model.forward(input_ids, positions, self.attn)  # [T, H]
            else:  # one forward for the base and every adapter of the step (per-token adapter slots)
                hidden = self.model.forward(input_ids, positions, self.attn, lora=lora)
            self.attn.meta = None
            result: list[tuple[int, TokenLogprob | None] | None] = [None] * len(items)
            if not which:
                return result
            logits = self.model.compute_logits(hidden.index_select(0, sample_rows))  # [N, V]
            seqs = [ordered[j].seq for j in which]
            # n > 1: the other choices' first tokens come from their leader's logits row (one prefill)
            forks = [(k, c) for k, s in enumerate(seqs) for c in s.forks]
            if forks:
                seqs = seqs + [c for _, c in forks]
            sps = [s.request.sampling for s in seqs]
            # grammar masks on the CPU while the device still computes the forward (no sync before here)
            mask = self._grammar_masks(seqs, sps)
            if forks:
                logits = logits[list(range(len(which))) + [k for k, _ in forks]]
            hist = [row_history(sp, s.token_ids, s.num_prompt_tokens, self.eos_token_ids)
                    for sp, s in zip(sps, seqs, strict=True)] if any(sp.has_logits_processing for sp in sps) \
                else None
            res = sample(logits, sps, [self._generator(s) for s in seqs], hist, mask)
        if mask is not None:
            for k in mask[0]:
                self.structured.advance(seqs[k].seq_id, res.token_ids[k])
        for k, j in enumerate(which):
            result[order[j]] = (res.token_ids[k], res.logprobs[k])
        self.fork_samples = {c.seq_id: (res.token_ids[len(which) + i], res.logprobs[len(which) + i])
                             for i, (_, c) in enumerate(forks)}
        return result

    def _grammar_masks(self, seqs: list[Sequence], sps: list[Any]) -> tuple[list[int], torch.Tensor] | None:
        rows = [k for k, sp in enumerate(sps) if sp.json_schema is not None]
        if not rows or self.structured is None:
            return None
        return rows, self.structured.masks([(seqs[k].seq_id, sps[k].json_schema) for k in rows])

    def prepare(self, items: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, PagedMetadata,
                                                            torch.Tensor, list[int]]:
        """-> input_ids [T], positions [T], metadata, rows of hidden to sample at [N], their item indices."""
        bs = self.block_size
        # one pass over the sequences (per sequence, never per token): new-token counts,
        # first positions, the new token ids, and block tables padded to the longest
        nb = len(items)
        counts: list[int] = []
        firsts: list[int] = []
        ids: list[int] = []
        max_blocks = 0
        offs: list[int] = []  # evicted tokens per sequence: logical position - physical slot index
        for it in items:
            n, st = it.num_new_tokens, it.start
            counts.append(n)
            firsts.append(st - it.seq.num_evicted)  # PHYSICAL first slot index
            offs.append(it.seq.num_evicted)
            ids += it.seq.token_ids[st:st + n] if n > 1 else (it.seq.token_ids[st],)
            max_blocks = max(max_blocks, len(it.seq.block_table))
        flat: list[int] = []
        pad = [0] * max_blocks
        for it in items:
            bt = it.seq.block_table
            flat += bt
            flat += pad[len(bt):]
        tables = np.array(flat, dtype=np.int64).reshape(nb, max_blocks)  # [B, M]
        n_new = np.array(counts, dtype=np.int64)
        starts = np.array(firsts, dtype=np.int64)
        ends = np.cumsum(n_new)  # exclusive end of each sequence in the flat batch
        total = int(ends[-1])
        nd = counts.count(1)  # decodes lead the batch (sorted by caller)
        ctx = starts + n_new  # context length after this step
        if nd == nb:  # all decodes: one token per sequence
            seq_of_tok = np.arange(nb)
            phys = starts
        else:
            seq_of_tok = np.repeat(np.arange(nb), n_new)  # [T]
            phys = np.arange(total, dtype=np.int64) - np.repeat(ends - n_new, n_new) + starts[seq_of_tok]
        slots = tables[seq_of_tok, phys // bs] * bs + phys % bs  # [T]
        # RoPE positions are LOGICAL (tokens seen); attention runs over the physical slots
        pos = phys + np.array(offs, dtype=np.int64)[seq_of_tok] if any(offs) else phys

        # one host buffer -> one device copy, then views
        sample_at = [(int(ends[r]) - 1, r) for r, it in enumerate(items) if it.sample]
        rows = np.fromiter((row for row, _ in sample_at), dtype=np.int64, count=len(sample_at))
        parts = {"ids": np.asarray(ids, dtype=np.int64), "pos": pos, "slots": slots, "ctx": ctx,
                 "rows": rows, "tables": tables.reshape(-1)}
        use_batch = self.batch_prefill and nb - nd >= 2
        if use_batch:
            qlen, qstart, st = n_new[nd:], (ends - n_new)[nd:], starts[nd:]
            lq = int(qlen.max())
            i = np.minimum(np.arange(lq)[None, :], qlen[:, None] - 1)  # [Bp, Lq], padding repeats the last row
            parts["q_index"] = (qstart[:, None] + i).reshape(-1)
            parts["limit"] = (st[:, None] + i).reshape(-1)  # last visible key position of each query row
            flat_rows = np.arange(nb - nd)[:, None] * lq + np.arange(lq)[None, :]
            parts["out_index"] = flat_rows[np.arange(lq)[None, :] < qlen[:, None]]
        packed = np.concatenate(list(parts.values()))
        dev = torch.from_numpy(packed).to(self.device, non_blocking=True)
        views: dict[str, torch.Tensor] = {}
        off = 0
        for name, arr in parts.items():
            views[name] = dev[off:off + arr.size]
            off += arr.size
        input_ids, positions, slot_t, dev_ctx = views["ids"], views["pos"], views["slots"], views["ctx"]
        sample_rows = views["rows"]  # [N] rows of hidden to compute logits at
        dev_tables = views["tables"].view(nb, max_blocks)  # [B, M]
        dec_bt = mask = None
        if nd:
            dec_blocks = int(-(-ctx[:nd].max() // bs))
            dec_bt = dev_tables[:nd, :dec_blocks]  # [Bd, Md]
            span = torch.arange(dec_blocks * bs, device=self.device)
            mask = (span[None, :] < dev_ctx[:nd, None])[:, None, None, :]  # [Bd, 1, 1, Md * bs]

        prefills = []
        batch = None
        if use_batch:
            pf_blocks = int(-(-ctx[nd:].max() // bs))
            span = torch.arange(pf_blocks * bs, device=self.device)
            limit = views["limit"].view(nb - nd, lq)
            batch = PrefillBatch(views["q_index"].view(nb - nd, lq), dev_tables[nd:, :pf_blocks],
                                 (span[None, None, :] <= limit[:, :, None])[:, None],  # [Bp, 1, Lq, Lk]
                                 views["out_index"])
        else:
            for r in range(nd, nb):
                s, n = int(ends[r] - n_new[r]), int(n_new[r])
                # cached context before this chunk: attend over its blocks; else over the chunk itself
                block_ids = dev_tables[r, :int(-(-ctx[r] // bs))] if starts[r] > 0 else None
                prefills.append(PrefillChunk(s, n, int(ctx[r]), block_ids))
        meta = PagedMetadata(slot_t, nd, dec_bt, mask, prefills, batch,
                             decode_context_lens=dev_ctx[:nd] if nd else None)
        # the storage's plan: which rows to write and overlay this step (None for an exact storage)
        meta.policy = self.kv.plan_step(items, ends - n_new, tables, positions, nd,
                                        dec_bt.shape[1] * bs if dec_bt is not None else 0,
                                        [bool(starts[r] > 0) for r in range(nd, nb)], self.device)
        return input_ids, positions, meta, sample_rows, [r for _, r in sample_at]
