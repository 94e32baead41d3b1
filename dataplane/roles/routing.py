"""Which prefill pod gets a request: round-robin, least loaded, or precise prefix-aware. Torch-free.

Prefix-aware routing (llm-d's "precise" scorer): every prefill pod streams its prefix cache's events
(`KVEvents`); `PrefixIndex` keeps, per block hash, the pods that hold it (bounded, LRU). A prompt is
hashed exactly as the engines hash it (`blocks.hash_block`, the pod's block size and prefix key),
and each candidate pod is scored

    score = prefix_weight * (leading prompt blocks it holds / prompt blocks) - load_weight * load

with `load` = (requests in flight from this router + waiting in the pod) / the pod's seats, plus
`ADAPTER_WEIGHT` when the request's LoRA adapter is already resident there (a tie-break among equally
loaded pods in `load` mode). A pod at
or past its seats is *saturated*: its prefix term counts for nothing, so a hot prefix spills to
another pod instead of queueing behind itself. A stale index costs a cache miss, never a wrong
answer: the pod computes what it does not hold.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any

from kvfleet.dataplane.kvcache.blocks import extend_block_hashes
from kvfleet.dataplane.kvcache.keys import hash_to_bytes

ROUTING_MODES = ("round-robin", "load", "prefix")
ADAPTER_WEIGHT = 0.25  # prefix mode: a resident adapter is worth a quarter of a whole prompt's prefix


@dataclass(frozen=True)
class RoutingPolicy:
    """How the router picks prefill pods (router.json `routing`)."""

    mode: str = "prefix"
    prefix_weight: float = 1.0
    load_weight: float = 1.0
    max_index_blocks: int = 1 << 20  # hashes the index keeps (LRU past it)

    def __post_init__(self) -> None:
        if self.mode not in ROUTING_MODES:
            raise ValueError(f"routing.mode must be one of {ROUTING_MODES}, got {self.mode!r}")
        if self.prefix_weight < 0 or self.load_weight < 0:
            raise ValueError("routing weights must be >= 0")
        if self.max_index_blocks < 1:
            raise ValueError("routing.maxIndexBlocks must be >= 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RoutingPolicy:
        d = data or {}
        return cls(mode=d.get("mode", "prefix"), prefix_weight=float(d.get("prefixWeight", 1.0)),
                   load_weight=float(d.get("loadWeight", 1.0)),
                   max_index_blocks=int(d.get("maxIndexBlocks", 1 << 20)))


class PrefixIndex:
    """Block hash (16 bytes) -> pods that hold it, from the pods' KV events; bounded, oldest first out."""

    def __init__(self, max_blocks: int = 1 << 20) -> None:
        self.max_blocks = max_blocks
        self._pods: OrderedDict[bytes, set[str]] = OrderedDict()
        self._by_pod: dict[str, set[bytes]] = {}
        self.hashing: dict[str, tuple[int, str, dict[str, str]]] = {}  # pod -> (block size, codec, keys by variant)
        self.shares_from: dict[str, dict[str, str]] = {}  # pod -> variant -> the sibling whose KV it reuses there

    def __len__(self) -> int:
        return len(self._pods)

    def apply(self, pod: str, batch: Any) -> None:
        """One `KVEventBatch` from `pod` (a `reset` first forgets what the index knew of it)."""
        if batch.reset:
            self.forget(pod)
        self.hashing[pod] = (int(batch.block_size), str(batch.extra_key), dict(batch.prefix_keys))
        self.shares_from[pod] = dict(batch.shares_from)
        mine = self._by_pod.setdefault(pod, set())
        for h in batch.stored:
            pods = self._pods.get(h)
            if pods is None:
                pods = self._pods[h] = set()
            self._pods.move_to_end(h)
            pods.add(pod)
            mine.add(h)
        for h in batch.removed:
            self._drop(pod, h)
        while len(self._pods) > self.max_blocks:
            h, pods = self._pods.popitem(last=False)
            for p in pods:
                self._by_pod.get(p, set()).discard(h)

    def _drop(self, pod: str, h: bytes) -> None:
        pods = self._pods.get(h)
        if pods is not None:
            pods.discard(pod)
            if not pods:
                del self._pods[h]
        self._by_pod.get(pod, set()).discard(h)

    def forget(self, pod: str) -> None:
        """Everything about `pod` (it left, or its event stream broke)."""
        for h in self._by_pod.pop(pod, set()):
            pods = self._pods.get(h)
            if pods is not None:
                pods.discard(pod)
                if not pods:
                    del self._pods[h]
        self.hashing.pop(pod, None)
        self.shares_from.pop(pod, None)

    def prompt_hashes(self, pod: str, variant: str, token_ids: Sequence[int]) -> list[bytes]:
        """The prompt's block hashes as `pod` computes them ([] before its first event)."""
        hashing = self.hashing.get(pod)
        if hashing is None:
            return []
        block_size, codec_key, keys = hashing
        hashes: list[int] = []
        extend_block_hashes(hashes, token_ids, len(token_ids) - 1, block_size, keys.get(variant, variant + codec_key))
        return [hash_to_bytes(h) for h in hashes]

    def held(self, pod: str, variant: str, token_ids: Sequence[int]) -> tuple[int, int]:
        """(leading prompt blocks `pod` holds for `variant`, prompt blocks): its own, or, where the variant
        reuses a sibling's KV on that pod, the sibling's when longer (it recomputes only a few layers)."""
        hashes = self.prompt_hashes(pod, variant, token_ids)
        n = self.leading_blocks(pod, hashes)
        sibling = self.shares_from.get(pod, {}).get(variant)
        if sibling is not None:
            n = max(n, self.leading_blocks(pod, self.prompt_hashes(pod, sibling, token_ids)))
        return n, len(hashes)

    def leading_blocks(self, pod: str, hashes: Sequence[bytes]) -> int:
        """How many leading `hashes` the index says `pod` holds."""
        n = 0
        for h in hashes:
            if pod not in self._pods.get(h, ()):
                break
            n += 1
        return n


@dataclass(frozen=True)
class Candidate:
    """A prefill pod as the picker sees it."""

    name: str
    address: str
    load: int  # requests in flight from this router + waiting in the pod
    seats: int  # the pod's max_num_seqs (0 = unknown)
    has_adapter: bool = False  # the request's LoRA adapter is resident there (no load on the first request)


@dataclass(frozen=True)
class Pick:
    """The pods in preference order, and the chosen one's share of the prompt it already holds."""

    order: list[Candidate]
    matched_blocks: int
    prompt_blocks: int


class PrefillPicker:
    """Orders prefill candidates by the policy; counts the index's estimated hit rate."""

    def __init__(self, policy: RoutingPolicy) -> None:
        self.policy = policy
        self.index = PrefixIndex(policy.max_index_blocks)
        self._turn = count()
        self.prompt_blocks = 0
        self.matched_blocks = 0

    @property
    def hit_rate(self) -> float:
        """Estimated prefix hit rate: blocks the chosen pods held / prompt blocks routed."""
        return self.matched_blocks / self.prompt_blocks if self.prompt_blocks else 0.0

    def pick(self, cands: list[Candidate], variant: str, token_ids: Sequence[int]) -> Pick:
        if not cands:
            return Pick([], 0, 0)
        mode = self.policy.mode
        by_load = sorted(cands, key=lambda c: (c.load, not c.has_adapter, c.name))
        if mode == "round-robin":
            i = next(self._turn) % len(cands)
            order = sorted(cands, key=lambda c: c.name)
            return self._count(order[i:] + order[:i], variant, token_ids)
        if mode == "load":
            return self._count(by_load, variant, token_ids)
        scores: dict[str, float] = {}
        for c in cands:
            n, total = self.index.held(c.address, variant, token_ids)
            held = n / total if total else 0.0
            load = c.load / c.seats if c.seats else float(c.load)
            saturated = bool(c.seats) and c.load >= c.seats
            scores[c.address] = (0.0 if saturated else self.policy.prefix_weight * held
                                  + ADAPTER_WEIGHT * c.has_adapter) - self.policy.load_weight * load
        order = sorted(by_load, key=lambda c: -scores[c.address])  # stable: ties go to the least loaded
        return self._count(order, variant, token_ids)

    def _count(self, order: list[Candidate], variant: str, token_ids: Sequence[int]) -> Pick:
        matched, total = self.index.held(order[0].address, variant, token_ids)
        self.prompt_blocks += total
        self.matched_blocks += matched
        return Pick(order, matched, total)

