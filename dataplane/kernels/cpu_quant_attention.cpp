// Decode attention over a quantized paged cache (int8 / int4 codes, KIVI-style), dequantizing each row
// as it is read instead of materialising the whole context at full precision first.
//
// What a decode attends equals `PagedQuantKV.read` + the step's own K/V (dataplane/kvcache/paged_quant.py):
//   slot t of sequence b: the lane row override[b, t] when >= 0 (sinks, the full-precision tail),
//   the sequence's own new k/v at t = L - 1, else the dequantized codes of its block:
//   x[d] = code[d] * scale + zero (two roundings, as the torch path: built with -ffp-contract=off).
// Scales and zero points (float16) are either token-grouped, one row [Hs, Ds] per group of g tokens
// (row of slot (block, o) = block * max(1, bs / g) + o / g; Hs in {1, H}, Ds in {1, D}), or per token,
// [NB, bs, H, D / g] (one pair per g channels).
// Shapes: q [B, Hq, D]; codes [NB, bs, Hkv, Dc] uint8 (Dc = D for int8, D / 2 for int4: channel 2j in
// the low nibble of byte j); lanes [R, Hkv, D]; override [B, Lmax] int64; own k/v [B, Hkv, D].

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_common.h"

// The torch path rounds code * scale before adding the zero point: no fused multiply-add here.
#pragma GCC optimize("fp-contract=off")

namespace {

struct QuantSide {  // one of K or V: codes and where each slot's scale/zero live
  const uint8_t* codes;
  const at::Half* scale;
  const at::Half* zero;
  bool grouped;              // token-grouped stats (else per token)
  int64_t group, per_block;  // tokens (grouped) or channels (per token) per stat; stat rows per block
  int64_t s_row, s_head, s_chan;  // stat strides: row (grouped) or slot (per token), head, channel
};

QuantSide side(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& zero, bool grouped,
               int64_t group, int64_t bs) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "codes must be contiguous uint8");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && zero.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  zero.is_contiguous() && scale.sizes() == zero.sizes(), "scale/zero must be contiguous float16");
  QuantSide s{codes.data_ptr<uint8_t>(), scale.data_ptr<at::Half>(), zero.data_ptr<at::Half>(), grouped, group,
              std::max<int64_t>(1, bs / group), 0, 0, 0};
  TORCH_CHECK(scale.dim() == (grouped ? 3 : 4), "token-grouped stats are [R, Hs, Ds], per-token [NB, bs, H, D/g]");
  if (grouped) {  // [R, Hs, Ds]: a size-1 axis is broadcast
    s.s_row = scale.stride(0);
    s.s_head = scale.size(1) == 1 ? 0 : scale.stride(1);
    s.s_chan = scale.size(2) == 1 ? 0 : 1;
  } else {  // [NB, bs, H, D/g]: per slot
    s.s_row = scale.size(2) * scale.size(3);
    s.s_head = scale.size(3);
    s.s_chan = 1;
  }
  return s;
}

struct StatRow {  // the last token-grouped stats row read, as float (the tokens of a group share it)
  int64_t row = -1;
  float scale[512], zero[512];
};

// Row `slot` (= block * bs + o) of kv head h, dequantized into x[D].
template <int BITS>
inline void dequant_row(const QuantSide& s, int64_t block, int64_t o, int64_t bs, int64_t h, int64_t H,
                        int64_t D, float* x, StatRow& stats) {
  const int64_t slot = block * bs + o;
  const int64_t dc = BITS == 4 ? D / 2 : D;
  const uint8_t* c = s.codes + (slot * H + h) * dc;
  float codes[512];
  if (BITS == 4) {
    for (int64_t j = 0; j < dc; ++j) {
      codes[2 * j] = static_cast<float>(c[j] & 0x0F);
      codes[2 * j + 1] = static_cast<float>(c[j] >> 4);
    }
  } else {
    for (int64_t d = 0; d < D; ++d) codes[d] = static_cast<float>(c[d]);
  }
  if (s.grouped) {
    const int64_t row = block * s.per_block + o / s.group;
    if (row != stats.row) {  // float16 -> float once per group of tokens, not once per token
      const at::Half* sc = s.scale + row * s.s_row + h * s.s_head;
      const at::Half* zp = s.zero + row * s.s_row + h * s.s_head;
      for (int64_t d = 0; d < D; ++d) {
        stats.scale[d] = static_cast<float>(sc[d * s.s_chan]);
        stats.zero[d] = static_cast<float>(zp[d * s.s_chan]);
      }
      stats.row = row;
    }
    for (int64_t d = 0; d < D; ++d) {
      const float scaled = codes[d] * stats.scale[d];
      x[d] = scaled + stats.zero[d];
    }
  } else {
    const at::Half* sc = s.scale + slot * s.s_row + h * s.s_head;
    const at::Half* zp = s.zero + slot * s.s_row + h * s.s_head;
    for (int64_t gi = 0, d0 = 0; d0 < D; ++gi, d0 += s.group) {  // one scale per group of channels
      const float scl = static_cast<float>(sc[gi]), zero = static_cast<float>(zp[gi]);
      for (int64_t d = d0; d < d0 + s.group; ++d) {
        const float scaled = codes[d] * scl;
        x[d] = scaled + zero;
      }
    }
  }
}

template <typename T, int BITS>
void quant_decode(const T* q, int64_t q_s0, int64_t q_s1, const QuantSide& ks, const QuantSide& vs,
                  const T* lane_k, const T* lane_v, const int64_t* override, int64_t ov_stride, const T* own_k,
                  const T* own_v, const int64_t* tables, int64_t table_stride, const int64_t* ctx, T* out,
                  int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs, float scale) {
  const int64_t G = Hq / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores, inv(G), row(D);
    StatRow k_stats, v_stats;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv;
      const int64_t L = ctx[b];
      const int64_t* table = tables + b * table_stride;
      const int64_t* ov = override + b * ov_stride;
      scores.resize(G * L);
      for (int64_t g = 0; g < G; ++g) {
        const T* qp = q + b * q_s0 + (h * G + g) * q_s1;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(qp[d]) * scale;
      }
      // the row of slot t (block blk, offset o) at the model dtype, as the torch path reads it
      k_stats.row = v_stats.row = -1;  // rows are per kv head
      auto load = [&](const QuantSide& s, const T* lanes, const T* own, int64_t t, int64_t blk, int64_t o,
                      StatRow& stats) {
        const T* full = t == L - 1 ? own + (b * Hkv + h) * D : (ov[t] >= 0 ? lanes + (ov[t] * Hkv + h) * D : nullptr);
        if (full != nullptr) {
          for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(full[d]);
        } else {
          dequant_row<BITS>(s, blk, o, bs, h, Hkv, D, row.data(), stats);
          for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(static_cast<T>(row[d]));
        }
      };
      for (int64_t start = 0, blk = 0; start < L; start += bs, ++blk) {
        const int64_t n = std::min(bs, L - start);
        for (int64_t j = 0; j < n; ++j) {
          load(ks, lane_k, own_k, start + j, table[blk], j, k_stats);
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            const float* kr = row.data();
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qg[d] * kr[d];
            scores[g * L + start + j] = s;
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) inv[g] = kvfleet::softmax_unnormalized(scores.data() + g * L, L);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t start = 0, blk = 0; start < L; start += bs, ++blk) {
        const int64_t n = std::min(bs, L - start);
        for (int64_t j = 0; j < n; ++j) {
          load(vs, lane_v, own_v, start + j, table[blk], j, v_stats);
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * L + start + j];
            float* ag = acc.data() + g * D;
            const float* vr = row.data();
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] += p * vr[d];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* op = out + (b * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) op[d] = static_cast<T>(acc[g * D + d] * inv[g]);
      }
    }
  });
}

}  // namespace

torch::Tensor quant_decode_attention(torch::Tensor q, int64_t bits, torch::Tensor k_codes, torch::Tensor k_scale,
                                     torch::Tensor k_zero, bool k_grouped, int64_t k_group, torch::Tensor v_codes,
                                     torch::Tensor v_scale, torch::Tensor v_zero, bool v_grouped, int64_t v_group,
                                     torch::Tensor lane_k, torch::Tensor lane_v, torch::Tensor override,
                                     torch::Tensor own_k, torch::Tensor own_v, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [B, Hq, D] with unit stride on D");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK(D <= 512, "head dim over 512");
  TORCH_CHECK(k_codes.dim() == 4 && v_codes.sizes() == k_codes.sizes(), "codes must be [NB, bs, Hkv, Dc]");
  const int64_t bs = k_codes.size(1), Hkv = k_codes.size(2);
  TORCH_CHECK(k_codes.size(3) == (bits == 4 ? D / 2 : D) && Hq % Hkv == 0, "code shapes do not match q");
  for (const auto* t : {&lane_k, &lane_v, &own_k, &own_v})
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->is_contiguous(), "lanes and own k/v: q's dtype, contiguous");
  TORCH_CHECK(own_k.size(0) == B && own_v.size(0) == B, "one own k/v row per sequence");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.stride(1) == 1 && block_tables.scalar_type() == at::kLong &&
                  context_lens.scalar_type() == at::kLong && context_lens.is_contiguous() &&
                  override.scalar_type() == at::kLong && override.dim() == 2 && override.stride(1) == 1,
              "block_tables, override [B, *] and context_lens [B] must be int64");
  const int64_t M = block_tables.size(1);
  const int64_t* ctx = context_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(ctx[b] >= 1 && ctx[b] <= M * bs && ctx[b] <= override.size(1), "context length ", ctx[b],
                " outside the block table");
  const QuantSide ks = side(k_codes, k_scale, k_zero, k_grouped, k_group, bs);
  const QuantSide vs = side(v_codes, v_scale, v_zero, v_grouped, v_group, bs);
  auto out = torch::empty({B, Hq, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "quant_decode_attention", [&] {
    auto run = [&](auto bits_tag) {
      quant_decode<scalar_t, decltype(bits_tag)::value>(
          q.data_ptr<scalar_t>(), q.stride(0), q.stride(1), ks, vs, lane_k.data_ptr<scalar_t>(),
          lane_v.data_ptr<scalar_t>(), override.data_ptr<int64_t>(), override.stride(0), own_k.data_ptr<scalar_t>(),
          own_v.data_ptr<scalar_t>(), block_tables.data_ptr<int64_t>(), block_tables.stride(0), ctx,
          out.data_ptr<scalar_t>(), B, Hq, Hkv, D, bs, static_cast<float>(scale));
    };
    if (bits == 4) run(std::integral_constant<int, 4>{});
    else run(std::integral_constant<int, 8>{});
  });
  return out;
}
