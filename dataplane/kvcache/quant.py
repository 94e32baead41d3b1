"""KV quantization codecs and an eviction-capable quantized token buffer.

A `Codec` turns a chunk of keys or values `x [n, H, D]` into codes plus scales
(and zero points for integer codecs) and back. Granularity says which elements
share one scale:

    per-token    one scale per token per `group_size` channels        (values, KIVI)
    per-channel  one scale per channel per group of `group_size` tokens (keys, KIVI/KVQuant)
    per-head     one scale per head per group of `group_size` tokens
    per-tensor   one scale per group of `group_size` tokens

fp8 (e4m3, symmetric) takes per-tensor or per-head; int8/int4/int3/int2 (asymmetric,
min/max) take per-channel or per-token; int4 packs two codes per uint8, int3 eight codes in three
bytes, int2 four codes per byte (KIVI's 2-bit). The
cast codecs `none` (the model dtype), `fp16` and `bf16` store no scales.

`rotated` (integer codecs): each head's row is multiplied by a fixed orthonormal matrix R (a
Hadamard matrix with seeded random signs, block-diagonal when head_dim is not a power of two:
`hadamard_rotation`) before it is quantized, and by R^T
after it is dequantized (QuaRot's trick): an outlier channel is spread over all channels of its
row, so per-token scales fit keys nearly as well as per-channel ones, and a per-token codec
moves with its token under eviction.
NOTE: fp8 scales are dynamic per group of tokens, not one static calibrated
scale as in vLLM; the scale costs 2 bytes per head per group.

`QuantBuffer` holds the encoded rows of one tensor (K or V) of one layer of one
sequence and supports per-head row selection (eviction), so its `nbytes()` is
what is really allocated. `Codec.bytes_per_token()` is the steady-state cost
(full groups) and equals `nbytes() / rows` once only full groups are stored.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

KV_DTYPES = ("none", "fp16", "bf16", "fp8", "int8", "int4", "int3", "int2")
INT_BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
GRANULARITIES = ("per-tensor", "per-head", "per-channel", "per-token")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
STAT_DTYPE = torch.float16  # scales and zero points
COUNT_DTYPE = torch.int32  # rows per token group per head
_CAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
_MIN_SCALE = 1e-4  # keeps fp16 scales normal; error of a constant group is then <= 5e-5


def _hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix [n, n] of +-1 (n a power of two): H_2n = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


@functools.lru_cache(maxsize=8)
def _rotation(head_dim: int) -> torch.Tensor:
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    # a head_dim that is not a power of two: a block-diagonal of normalised Hadamards (96 = 64 + 32)
    blocks = [1 << b for b in reversed(range(head_dim.bit_length())) if head_dim >> b & 1]
    h = torch.block_diag(*[_hadamard(n) / math.sqrt(n) for n in blocks])
    g = torch.Generator().manual_seed(0x5EED)
    signs = torch.randint(0, 2, (head_dim,), generator=g, dtype=torch.float64) * 2 - 1
    return (signs[:, None] * h).float()  # [D, D], R @ R^T = I


def hadamard_rotation(head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """R [D, D] float32, orthonormal and the same on every machine (+-1/sqrt(D) for a power-of-two D,
    else a block-diagonal of Hadamard blocks, one per set bit of D)."""
    return _rotation(head_dim).to(device)


def default_granularity(dtype: str, kind: str, evicting: bool = False) -> str:
    """The usual choice: keys per-channel / values per-token (int), per-head (fp8); per-token when evicting."""
    if evicting:
        return "per-token"
    if dtype == "fp8":
        return "per-head"
    return "per-channel" if kind == "key" else "per-token"


@dataclass(frozen=True)
class Encoded:
    """One encoded chunk. codes [n, H, Dc]; scale/zero [n, H, D/g] (per-token) or
    [1, Hs, Ds] (token-grouped: Hs in {1, H}, Ds in {1, D}); zero is None for fp8/casts."""

    codes: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None


@dataclass(frozen=True)
class Codec:
    """How one tensor kind (keys or values) of shape [*, num_heads, head_dim] is stored."""

    dtype: str
    granularity: str
    group_size: int
    num_heads: int
    head_dim: int
    fp_dtype: torch.dtype = torch.float32  # the model's dtype (what `none` stores)
    rotated: bool = False  # rows quantized as x @ R (`hadamard_rotation`), read back as y @ R^T

    def __post_init__(self) -> None:
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"kv dtype {self.dtype!r} not in {KV_DTYPES}")
        if self.rotated and self.dtype not in INT_BITS:
            raise ValueError(f"a rotated codec needs an integer dtype (int8, int4, int3, int2), not {self.dtype}")
        if not self.is_quantized:
            return
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity {self.granularity!r} not in {GRANULARITIES}")
        if self.dtype == "fp8" and self.granularity == "per-channel":
            # NOTE: per-token fp8 (one scale per token per group of channels) is what paged blocks use
            raise ValueError(f"fp8 supports per-tensor, per-head or per-token scales, not {self.granularity}")
        if self.dtype in INT_BITS and self.granularity not in ("per-channel", "per-token"):
            raise ValueError(f"{self.dtype} supports per-channel or per-token scales, not {self.granularity}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.granularity == "per-token" and self.head_dim % self.group_size:
            raise ValueError(
                f"{self.dtype} per-token groups run along channels: group_size {self.group_size} "
                f"must divide head_dim {self.head_dim}"
            )
        if self.dtype == "int4" and (self.head_dim % 2 or self.group_size % 2):
            raise ValueError(f"int4 packs two codes per byte: head_dim {self.head_dim} and "
                             f"group_size {self.group_size} must be even")
        if self.dtype in ("int3", "int2") and self.head_dim % 8:
            raise ValueError(f"{self.dtype} packs eight codes into {INT_BITS[self.dtype]} bytes: head_dim "
                             f"{self.head_dim} must be a multiple of 8")

    # -- properties -------------------------------------------------------

    @property
    def is_quantized(self) -> bool:
        return self.dtype == "fp8" or self.dtype in INT_BITS

    @property
    def token_grouped(self) -> bool:
        """Scales shared by the tokens of a group (everything but per-token)."""
        return self.is_quantized and self.granularity != "per-token"

    @property
    def chunk_tokens(self) -> int:
        """Tokens that must be present before they can be encoded."""
        return self.group_size if self.token_grouped else 1

    @property
    def storage_dtype(self) -> torch.dtype:
        if self.dtype == "fp8":
            return torch.float8_e4m3fn
        if self.dtype in INT_BITS:
            return torch.uint8
        return _CAST.get(self.dtype, self.fp_dtype)

    @property
    def qmax(self) -> int:
        return (1 << INT_BITS[self.dtype]) - 1

    @property
    def code_dim(self) -> int:
        """Bytes (storage elements) one head of one token's codes takes."""
        return self.head_dim * INT_BITS[self.dtype] // 8 if self.dtype in INT_BITS else self.head_dim

    def _stat_shape(self, n: int) -> tuple[int, int, int]:
        h, d = self.num_heads, self.head_dim
        return {
            "per-token": (n, h, d // self.group_size),
            "per-channel": (1, h, d),
            "per-head": (1, h, 1),
            "per-tensor": (1, 1, 1),
        }[self.granularity]

    def bytes_per_token(self) -> float:
        """Steady-state bytes one token costs in this codec (payload + scales/zeros + group counts)."""
        h, d = self.num_heads, self.head_dim
        elem = torch.empty(0, dtype=self.storage_dtype).element_size()
        payload = h * self.code_dim * elem
        if not self.is_quantized:
            return float(payload)
        n_stats = 1 if self.dtype == "fp8" else 2
        stat_bytes = n_stats * torch.empty(0, dtype=STAT_DTYPE).element_size()
        if not self.token_grouped:
            return payload + stat_bytes * h * (d // self.group_size)
        _, hs, ds = self._stat_shape(1)
        count_bytes = h * torch.empty(0, dtype=COUNT_DTYPE).element_size()
        return payload + (stat_bytes * hs * ds + count_bytes) / self.group_size

    # -- encode / decode ----------------------------------------------------

    def encode(self, x: torch.Tensor, stats_from: torch.Tensor | None = None) -> Encoded:
        """x [n, H, D] (n <= group_size for token-grouped codecs) -> Encoded.

        A leading batch axis encodes many groups at once: x [G, n, H, D] -> codes [G, n, H, Dc],
        stats [G, *stat_shape] (the paged cache encodes every group completed in a step together).
        stats_from: same shape as x; scales/zeros come from it, codes from x (clamped to its range):
        the paged cache leaves full-precision sink rows out of their group's scale yet stores them.
        """
        lead, (n, h, d) = x.shape[:-3], x.shape[-3:]
        if not self.is_quantized:
            return Encoded(x.to(self.storage_dtype), None, None)
        xf = x.float()
        sf = xf if stats_from is None else stats_from.float()
        if self.rotated:
            r = hadamard_rotation(d, xf.device)
            xf = xf @ r
            sf = xf if stats_from is None else sf @ r
        if self.granularity == "per-token":
            g = xf.view(*lead, n, h, d // self.group_size, self.group_size)  # [.., n, H, D/g, g]
            gs = sf.view(*lead, n, h, d // self.group_size, self.group_size)
            dims: tuple[int, ...] = (-1,)
        else:
            g, gs = xf, sf
            dims = {"per-channel": (-3,), "per-head": (-3, -1), "per-tensor": (-3, -2, -1)}[self.granularity]
        shape = (*lead, *self._stat_shape(n))
        if self.dtype == "fp8":
            amax = gs.abs().amax(dim=dims, keepdim=True)
            scale = (amax / FP8_MAX).clamp_min(_MIN_SCALE).to(STAT_DTYPE)
            codes = (g / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            return Encoded(codes.reshape(*lead, n, h, d), scale.reshape(shape), None)
        lo = gs.amin(dim=dims, keepdim=True)
        hi = gs.amax(dim=dims, keepdim=True)
        scale = ((hi - lo) / self.qmax).clamp_min(_MIN_SCALE).to(STAT_DTYPE)
        zero = lo.to(STAT_DTYPE)
        q = ((g - zero.float()) / scale.float()).round_().clamp_(0, self.qmax).to(torch.uint8)
        q = q.reshape(*lead, n, h, d)
        if self.dtype == "int4":
            q = q[..., 0::2] | (q[..., 1::2] << 4)  # [.., n, H, D/2]
        elif self.dtype in ("int3", "int2"):
            q = _pack(q, INT_BITS[self.dtype])
        return Encoded(q, scale.reshape(shape), zero.reshape(shape))

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor | None,
                   zero: torch.Tensor | None) -> torch.Tensor:
        """codes [N, H, Dc] with scale/zero already broadcastable to [N, H, D] -> [N, H, D] fp_dtype."""
        if not self.is_quantized:
            return codes.to(self.fp_dtype)
        assert scale is not None
        if self.dtype == "int4":
            lo, hi = codes & 0x0F, codes >> 4
            codes = torch.stack([lo, hi], dim=-1).flatten(-2)  # [N, H, D]
        elif self.dtype in ("int3", "int2"):
            codes = _unpack(codes, INT_BITS[self.dtype])
        x = codes.float() * scale.float()
        if zero is not None:
            x = x + zero.float()
        if self.rotated:
            x = x @ hadamard_rotation(x.shape[-1], x.device).T
        return x.to(self.fp_dtype)

    def _expand_row_stat(self, s: torch.Tensor) -> torch.Tensor:
        """per-token stats [N, H, D/g] -> [N, H, D]."""
        return s.repeat_interleave(self.group_size, dim=-1)

    def decode(self, enc: Encoded) -> torch.Tensor:
        """Encoded chunk -> [n, H, D] in fp_dtype."""
        scale, zero = enc.scale, enc.zero
        if self.granularity == "per-token" and scale is not None:
            scale = self._expand_row_stat(scale)
            zero = None if zero is None else self._expand_row_stat(zero)
        return self.dequantize(enc.codes, scale, zero)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [..., D] (< 2**bits, D % 8 == 0) -> [..., D * bits / 8] uint8: eight codes per `bits` bytes."""
    w = q.to(torch.int32).unflatten(-1, (-1, 8)) << (torch.arange(8, device=q.device, dtype=torch.int32) * bits)
    word = w.sum(-1, keepdim=True)  # [..., D/8, 1] (disjoint bits: the sum is an or)
    shifts = torch.arange(bits, device=q.device, dtype=torch.int32) * 8
    return ((word >> shifts) & 0xFF).to(torch.uint8).flatten(-2)


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `_pack`: [..., D * bits / 8] uint8 -> [..., D] uint8."""
    b = codes.to(torch.int32).unflatten(-1, (-1, bits)) << (torch.arange(bits, device=codes.device,
                                                                          dtype=torch.int32) * 8)
    word = b.sum(-1, keepdim=True)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int32) * bits
    return ((word >> shifts) & ((1 << bits) - 1)).to(torch.uint8).flatten(-2)


class QuantBuffer:
    """Encoded rows of one tensor (K or V) of one layer, in token order, per-head selectable.

    Row r of head h is one stored token of that head. Token-grouped stats live
    once per group in `grp_scale/grp_zero [G, Hs, Ds]` with `counts [G, H]` rows
    per head (heads may keep different tokens after per-head eviction, but always
    the same number of rows).
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.codes: torch.Tensor | None = None  # [N, H, Dc]
        self.scale: torch.Tensor | None = None  # [N, H, D/g] per-token, [G, Hs, Ds] grouped
        self.zero: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None  # [G, H] (grouped codecs only)

    def __len__(self) -> int:
        return 0 if self.codes is None else self.codes.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scale, self.zero, self.counts) if t is not None]

    def nbytes(self) -> int:
        """Bytes really allocated by this buffer."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def append(self, x: torch.Tensor) -> None:
        """Encode and append x [n, H, D]; token-grouped codecs take one group (a partial one after sinks)."""
        c = self.codec
        if c.token_grouped and not 0 < x.shape[0] <= c.group_size:
            raise ValueError(f"token-grouped codec takes groups of up to {c.group_size} tokens, got {x.shape[0]}")
        enc = c.encode(x)
        cat = (lambda a, b: b if a is None else torch.cat([a, b]))  # noqa: E731
        self.codes = cat(self.codes, enc.codes)
        if enc.scale is not None:
            self.scale = cat(self.scale, enc.scale)
        if enc.zero is not None:
            self.zero = cat(self.zero, enc.zero)
        if c.token_grouped:
            cnt = torch.full((1, c.num_heads), x.shape[0], dtype=COUNT_DTYPE, device=x.device)
            self.counts = cat(self.counts, cnt)

    def _group_ids(self) -> torch.Tensor:
        """[N, H] index of the token group each row belongs to (per head)."""
        assert self.counts is not None
        n = len(self)
        ends = self.counts.long().cumsum(0).T.contiguous()  # [H, G]
        rows = torch.arange(n, device=ends.device).expand(ends.shape[0], n).contiguous()  # [H, N]
        return torch.searchsorted(ends, rows, right=True).T  # [N, H]

    def decode(self) -> torch.Tensor:
        """All rows -> [N, H, D] in the codec's fp dtype."""
        c = self.codec
        if self.codes is None:
            return torch.empty(0, c.num_heads, c.head_dim, dtype=c.fp_dtype)
        if not c.is_quantized or not c.token_grouped:
            return c.decode(Encoded(self.codes, self.scale, self.zero))
        assert self.scale is not None
        gid = self._group_ids()  # [N, H]
        heads = torch.arange(c.num_heads, device=gid.device)[None, :]

        def per_row(s: torch.Tensor) -> torch.Tensor:  # [G, Hs, Ds] -> [N, H, Ds]
            return s.expand(s.shape[0], c.num_heads, s.shape[2])[gid, heads]

        zero = None if self.zero is None else per_row(self.zero)
        return c.dequantize(self.codes, per_row(self.scale), zero)

    def select(self, idx: torch.Tensor) -> None:
        """Keep rows idx [k, H] (per head, ascending); frees everything else."""
        if self.codes is None:
            return
        k, h = idx.shape

        def rows(t: torch.Tensor) -> torch.Tensor:  # [N, H, X] -> [k, H, X]
            # NOTE: gather has no float8 kernel on CPU; move the bytes as uint8
            raw = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
            out = raw.gather(0, idx[:, :, None].expand(k, h, t.shape[2]))
            return out.view(t.dtype)

        if self.codec.token_grouped:
            assert self.counts is not None
            kept_gid = self._group_ids().gather(0, idx)  # [k, H]
            counts = torch.zeros_like(self.counts).scatter_add_(
                0, kept_gid, torch.ones_like(kept_gid, dtype=COUNT_DTYPE))
            live = counts.sum(1) > 0  # drop groups no head keeps
            self.counts = counts[live].contiguous()
            self.scale = None if self.scale is None else self.scale[live].contiguous()
            self.zero = None if self.zero is None else self.zero[live].contiguous()
        else:
            self.scale = None if self.scale is None else rows(self.scale)
            self.zero = None if self.zero is None else rows(self.zero)
        self.codes = rows(self.codes)
