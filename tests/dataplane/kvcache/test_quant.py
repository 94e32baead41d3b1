"""Codecs: round-trip error bounds, int4 packing, byte accounting == storage allocated, row selection."""

from __future__ import annotations

import pytest
import torch
from kvfleet.dataplane.kvcache.quant import Codec, QuantBuffer, hadamard_rotation

H, D, G = 3, 64, 32
CASES = [("fp8", "per-head"), ("fp8", "per-tensor"), ("int8", "per-channel"), ("int8", "per-token"),
         ("int4", "per-channel"), ("int4", "per-token"), ("int3", "per-channel"), ("int3", "per-token"),
         ("int2", "per-channel"), ("int2", "per-token"), ("fp16", "per-token"), ("bf16", "per-token"),
         ("none", "per-token")]


def _x(n: int = 2 * G, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, D, generator=g)
    x[:, :, 5] *= 8.0  # an outlier channel, as real keys have
    return x


def _fill(codec: Codec, x: torch.Tensor) -> QuantBuffer:
    buf = QuantBuffer(codec)
    step = codec.chunk_tokens if codec.token_grouped else x.shape[0]
    for s in range(0, x.shape[0], step):
        buf.append(x[s:s + step])
    return buf


@pytest.mark.parametrize("dtype,gran", CASES)
def test_round_trip_error_bound(dtype: str, gran: str) -> None:
    x = _x()
    codec = Codec(dtype, gran, G, H, D)
    y = _fill(codec, x).decode()
    assert y.shape == x.shape and y.dtype == torch.float32
    err = (y - x).abs()
    if dtype == "none":
        assert torch.equal(y, x)
        return
    if dtype in ("fp16", "bf16"):
        rel = 2.0 ** -11 if dtype == "fp16" else 2.0 ** -8
        assert (err <= x.abs() * rel + 1e-6).all()
        return
    if dtype == "fp8":
        # e4m3: 3 mantissa bits -> relative half-ulp 2^-4; scale = amax / 448 per group
        amax = x.abs().amax() if gran == "per-tensor" else x.abs().amax(dim=(0, 2), keepdim=True)
        assert (err <= x.abs() * 2.0 ** -4 + amax / 448 * 2.0 ** -6 + 1e-6).all()
        return
    qmax = (1 << {"int8": 8, "int4": 4, "int3": 3, "int2": 2}[dtype]) - 1
    if gran == "per-token":
        xs = x.view(x.shape[0], H, D // G, G)
        rng = xs.amax(-1, keepdim=True) - xs.amin(-1, keepdim=True)
        bound = (rng / qmax * 0.5 * 1.01 + 1e-3 * xs.abs().amax(-1, keepdim=True)).expand_as(xs).reshape_as(x)
    else:
        xs = x.view(-1, G, H, D)
        rng = xs.amax(1, keepdim=True) - xs.amin(1, keepdim=True)
        bound = (rng / qmax * 0.5 * 1.01 + 1e-3 * xs.abs().amax(1, keepdim=True)).expand_as(xs).reshape_as(x)
    assert (err <= bound).all(), (err - bound).max()


def test_error_shrinks_with_bits_and_per_channel_keys_beat_per_token_on_outlier_channels() -> None:
    x = _x()
    e = {(dt, gr): (_fill(Codec(dt, gr, G, H, D), x).decode() - x).pow(2).mean().item()
         for dt, gr in CASES if dt in ("int8", "int4")}
    assert e[("int8", "per-channel")] < e[("int4", "per-channel")]
    assert e[("int8", "per-token")] < e[("int4", "per-token")]
    assert e[("int4", "per-channel")] < e[("int4", "per-token")]  # KIVI's reason for per-channel keys
    e2 = {b: (_fill(Codec(b, "per-channel", G, H, D), x).decode() - x).pow(2).mean().item() for b in ("int3", "int2")}
    assert e[("int4", "per-channel")] < e2["int3"] < e2["int2"]


@pytest.mark.parametrize("dtype,per_byte", [("int3", 8 / 3), ("int2", 4)])
def test_low_bit_codes_pack_exactly(dtype: str, per_byte: float) -> None:
    from kvfleet.dataplane.kvcache.quant import _pack, _unpack

    bits = {"int3": 3, "int2": 2}[dtype]
    q = torch.randint(0, 1 << bits, (5, H, D), dtype=torch.uint8)
    packed = _pack(q, bits)
    assert packed.shape == (5, H, round(D / per_byte)) and packed.dtype == torch.uint8
    assert torch.equal(_unpack(packed, bits), q)


@pytest.mark.parametrize("dtype,gran", CASES)
def test_bytes_per_token_equals_allocated_storage(dtype: str, gran: str) -> None:
    codec = Codec(dtype, gran, G, H, D)
    buf = _fill(codec, _x(4 * G))
    assert buf.nbytes() == pytest.approx(4 * G * codec.bytes_per_token(), abs=0)
    assert len(buf) == 4 * G


def test_bytes_per_token_values() -> None:
    assert Codec("none", "per-token", G, H, D).bytes_per_token() == H * D * 4
    assert Codec("bf16", "per-token", G, H, D).bytes_per_token() == H * D * 2
    # int4 per-token, groups of 32 channels: 96 payload + 3 heads * 2 groups * (scale + zero) * 2 bytes
    assert Codec("int4", "per-token", G, H, D).bytes_per_token() == 96 + 24
    # int4 per-channel: 96 + (3*64 scales + 3*64 zeros) * 2 bytes / 32 tokens + 3 int32 counts / 32
    assert Codec("int4", "per-channel", G, H, D).bytes_per_token() == 96 + 24 + 12 / 32
    assert Codec("fp8", "per-head", G, H, D).bytes_per_token() == 192 + (3 * 2 + 12) / 32


def test_int4_packs_two_codes_per_byte() -> None:
    codec = Codec("int4", "per-token", G, H, D)
    enc = codec.encode(_x(4))
    assert enc.codes.dtype == torch.uint8 and enc.codes.shape == (4, H, D // 2)
    fp8 = Codec("fp8", "per-head", G, H, D).encode(_x(G))
    assert fp8.codes.dtype == torch.float8_e4m3fn and fp8.zero is None


@pytest.mark.parametrize("dtype,gran", [c for c in CASES if c[0] != "bf16"])
def test_select_keeps_rows_per_head_and_frees_storage(dtype: str, gran: str) -> None:
    x = _x(3 * G)
    codec = Codec(dtype, gran, G, H, D)
    buf = _fill(codec, x)
    full = buf.decode()
    before = buf.nbytes()
    # head 0 keeps rows from all groups, head 1 only from the first, head 2 from the last
    idx = torch.stack([torch.tensor([0, 33, 70, 95]), torch.tensor([1, 2, 3, 4]),
                       torch.tensor([64, 65, 90, 95])], dim=1)
    buf.select(idx)
    want = full.gather(0, idx[:, :, None].expand(4, H, D))
    assert torch.equal(buf.decode(), want)  # same scales, same codes: bit-identical
    assert len(buf) == 4 and buf.nbytes() < before


def test_select_drops_groups_no_head_keeps() -> None:
    codec = Codec("int8", "per-channel", G, H, D)
    buf = _fill(codec, _x(3 * G))
    buf.select(torch.tensor([[0], [1]]).expand(2, H).contiguous())  # only group 0 survives
    assert buf.counts is not None and buf.counts.shape == (1, H)
    assert buf.scale is not None and buf.scale.shape[0] == 1


def test_invalid_codecs_are_rejected_with_clear_messages() -> None:
    with pytest.raises(ValueError, match="must divide head_dim"):
        Codec("int4", "per-token", 48, H, D)
    with pytest.raises(ValueError, match="fp8 supports per-tensor, per-head or per-token"):
        Codec("fp8", "per-channel", G, H, D)
    with pytest.raises(ValueError, match="int8 supports per-channel or per-token"):
        Codec("int8", "per-head", G, H, D)
    with pytest.raises(ValueError, match="two codes per byte"):
        Codec("int4", "per-channel", 7, H, D)
    with pytest.raises(ValueError, match="kv dtype"):
        Codec("int1", "per-token", G, H, D)
    with pytest.raises(ValueError, match="multiple of 8"):
        Codec("int3", "per-channel", G, H, 12)
    with pytest.raises(ValueError, match="groups of up to 32 tokens"):
        QuantBuffer(Codec("int8", "per-channel", G, H, D)).append(_x(33))


# -- rotated keys (QuaRot-style Hadamard rotation before a per-token codec) -----------------------


def test_hadamard_rotation_is_orthonormal_and_fixed():
    r = hadamard_rotation(64)
    torch.testing.assert_close(r @ r.T, torch.eye(64), rtol=0, atol=1e-6)
    assert torch.equal(r.abs(), torch.full((64, 64), 1 / 8.0))  # +-1/sqrt(D): exact in float32
    assert torch.equal(r, hadamard_rotation(64))  # the same matrix every time (seeded signs)
    r96 = hadamard_rotation(96)  # not a power of two: Hadamard blocks of 64 and 32 on the diagonal
    torch.testing.assert_close(r96 @ r96.T, torch.eye(96), rtol=0, atol=1e-6)
    assert torch.equal(r96[:64, 64:], torch.zeros(64, 32)) and torch.equal(r96[64:, 64:].abs(), torch.full((32, 32), 32 ** -0.5))
    with pytest.raises(ValueError, match="integer dtype"):
        Codec("fp8", "per-token", 8, 2, 64, rotated=True)


def test_rotation_spreads_outlier_channels_so_per_token_keys_fit_better():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, 64, generator=g)
    x[..., 5] *= 20.0  # an outlier channel, as real keys have
    plain = Codec("int4", "per-token", 32, 2, 64)
    rot = Codec("int4", "per-token", 32, 2, 64, rotated=True)
    err = {c.rotated: float((c.decode(c.encode(x)) - x).pow(2).mean()) for c in (plain, rot)}
    assert err[True] < 0.5 * err[False]
    assert rot.bytes_per_token() == plain.bytes_per_token()  # the rotation costs no bytes
