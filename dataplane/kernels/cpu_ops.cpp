// CPU kernels for the serving engine's hot path (built by dataplane/kernels/cpu.py).
//
// Shapes: T = tokens in the step, B = decode sequences, Hq/Hkv = query/key-value heads,
// G = Hq / Hkv, D = head dim, NB = cache blocks, bs = block size, M = blocks per table.
//
// paged_decode_attention  one new query token per sequence against its cached keys/values,
//                         read straight from the paged cache through its block table
//                         (no gathered copy, no padding to the longest sequence)
// rms_norm                x / rms(x) * w, float accumulation (one pass instead of ~6 ops)
// add_rms_norm            (x + delta, rms_norm(x + delta)) in one pass
// rope_                   rotate-half RoPE applied in place to the q and k heads of a qkv row
// quant_decode_attention  decode attention over int8/int4 codes, dequantized per row as read
//                         (cpu_quant_attention.cpp)
//
// Compiled with -O3 -march=native -fopenmp-simd -fno-trapping-math: the inner loops are written so
// the compiler vectorizes them (`omp simd` reductions allow reassociating the float sums; without
// -fno-trapping-math gcc leaves the exp loop scalar). SiLU-gate is not here: torch's two vectorized
// ops (silu, mul) measured faster than a fused loop with this exp.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace {

using kvfleet::prefetch_block;

template <typename T>
void decode_attention(const T* q, int64_t q_s0, int64_t q_s1, const T* kc, const T* vc,
                      const int64_t* tables, int64_t table_stride, const int64_t* ctx, T* out,
                      int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs, float scale) {
  const int64_t G = Hq / Hkv;
  const int64_t row = Hkv * D;  // floats between consecutive slots of one block
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores, inv(G);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv;
      const int64_t L = ctx[b];
      const int64_t* table = tables + b * table_stride;
      scores.resize(G * L);
      for (int64_t g = 0; g < G; ++g) {
        const T* qp = q + b * q_s0 + (h * G + g) * q_s1;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(qp[d]) * scale;
      }
      // scores [G, L] = q . k_t, block by block (no division per token)
      for (int64_t start = 0, blk = 0; start < L; start += bs, ++blk) {
        const T* kb = kc + table[blk] * bs * row + h * D;
        const int64_t n = std::min(bs, L - start);
        if (start + bs < L) prefetch_block(kc + table[blk + 1] * bs * row + h * D, bs, row, D);
        for (int64_t j = 0; j < n; ++j) {
          const T* kp = kb + j * row;
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qg[d] * static_cast<float>(kp[d]);
            scores[g * L + start + j] = s;
          }
        }
      }
      // softmax over t, per query head
      for (int64_t g = 0; g < G; ++g) inv[g] = kvfleet::softmax_unnormalized(scores.data() + g * L, L);
      // out [G, D] = sum_t p_t v_t
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t start = 0, blk = 0; start < L; start += bs, ++blk) {
        const T* vb = vc + table[blk] * bs * row + h * D;
        const int64_t n = std::min(bs, L - start);
        if (start + bs < L) prefetch_block(vc + table[blk + 1] * bs * row + h * D, bs, row, D);
        for (int64_t j = 0; j < n; ++j) {
          const T* vp = vb + j * row;
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * L + start + j];
            float* ag = acc.data() + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] += p * static_cast<float>(vp[d]);
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

// One row: y = w * T(x * rsqrt(mean(x^2) + eps)), the reference's rounding (normalize in float32,
// round to the model dtype, then scale by the weight).
template <typename T>
inline void norm_row(const float* x, const T* w, T* y, int64_t H, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < H; ++j) ss += x[j] * x[j];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
  for (int64_t j = 0; j < H; ++j)
    y[j] = static_cast<T>(static_cast<float>(w[j]) * static_cast<float>(static_cast<T>(x[j] * r)));
}

void check_cpu_contiguous(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  // q [B, Hq, D] (rows may be strided), k/v_cache [NB, bs, Hkv, D], block_tables [B, M] int64,
  // context_lens [B] int64 (slots 0..L-1 of each table are attended) -> [B, Hq, D]; rows of q and
  // of block_tables may be strided (views of the step's packed buffers)
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [B, Hq, D] with unit stride on D");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "k/v cache must be [NB, bs, Hkv, D]");
  check_cpu_contiguous(k_cache, "k_cache");
  check_cpu_contiguous(v_cache, "v_cache");
  TORCH_CHECK(block_tables.device().is_cpu() && block_tables.dim() == 2 && block_tables.stride(1) == 1,
              "block_tables must be a CPU [B, M] tensor with unit stride on M");
  check_cpu_contiguous(context_lens, "context_lens");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "q and the cache must share a dtype");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && Hq % Hkv == 0, "head shapes do not match");
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B, "one table and length per sequence");
  const int64_t M = block_tables.size(1);
  const int64_t* ctx = context_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(ctx[b] >= 1 && ctx[b] <= M * bs, "context length ", ctx[b], " outside the block table");
  auto out = torch::empty({B, Hq, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_attention<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), q.stride(1), k_cache.data_ptr<scalar_t>(),
                               v_cache.data_ptr<scalar_t>(), block_tables.data_ptr<int64_t>(), block_tables.stride(0), ctx,
                               out.data_ptr<scalar_t>(), B, Hq, Hkv, D, bs, static_cast<float>(scale));
  });
  return out;
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  // x [T, H], weight [H] -> [T, H]
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "x [T, H], weight [H]");
  const int64_t T = x.size(0), H = x.size(1);
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> xf(H);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t j = 0; j < H; ++j) xf[j] = static_cast<float>(xp[t * H + j]);
        norm_row<scalar_t>(xf.data(), wp, yp + t * H, H, static_cast<float>(eps));
      }
    });
  });
  return y;
}

std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor delta, torch::Tensor weight, double eps) {
  // x, delta [T, H], weight [H] -> (x + delta, rms_norm(x + delta)), both [T, H]
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(delta, "delta");
  check_cpu_contiguous(weight, "weight");
  TORCH_CHECK(x.sizes() == delta.sizes() && x.scalar_type() == delta.scalar_type(), "x and delta differ");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "x [T, H], weight [H]");
  const int64_t T = x.size(0), H = x.size(1);
  auto sum = torch::empty_like(x);
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dp = delta.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* sp = sum.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> xf(H);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t j = 0; j < H; ++j) {
          const scalar_t s = static_cast<scalar_t>(static_cast<float>(xp[t * H + j]) +
                                                   static_cast<float>(dp[t * H + j]));
          sp[t * H + j] = s;
          xf[j] = static_cast<float>(s);
        }
        norm_row<scalar_t>(xf.data(), wp, yp + t * H, H, static_cast<float>(eps));
      }
    });
  });
  return {sum, y};
}

void rope_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t num_heads, int64_t num_kv_heads) {
  // qkv [T, (Hq + 2 Hkv) * D] (row stride may exceed the width): the first Hq + Hkv heads of each row
  // (q, then k) rotated in place; cos/sin [T, D] (rotate-half layout, halves repeated)
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [T, W] with unit stride on W");
  check_cpu_contiguous(cos, "cos");
  check_cpu_contiguous(sin, "sin");
  const int64_t T = qkv.size(0), D = cos.size(-1), half = D / 2;
  TORCH_CHECK(cos.numel() == T * D && sin.numel() == T * D, "cos/sin must be [T, D]");
  TORCH_CHECK(qkv.size(1) >= (num_heads + num_kv_heads) * D, "qkv row shorter than its q and k heads");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(),
              "cos/sin must have qkv's dtype");
  const int64_t heads = num_heads + num_kv_heads, stride = qkv.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_", [&] {
    scalar_t* base = qkv.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* c = cp + t * D;
        const scalar_t* s = sp + t * D;
        for (int64_t h = 0; h < heads; ++h) {
          scalar_t* x = base + t * stride + h * D;
          // out = x * cos + rotate_half(x) * sin, each product rounded to the dtype as the reference does
          for (int64_t j = 0; j < half; ++j) {
            const float x1 = static_cast<float>(x[j]), x2 = static_cast<float>(x[j + half]);
            const scalar_t a1 = static_cast<scalar_t>(x1 * static_cast<float>(c[j]));
            const scalar_t b1 = static_cast<scalar_t>(-x2 * static_cast<float>(s[j]));
            const scalar_t a2 = static_cast<scalar_t>(x2 * static_cast<float>(c[j + half]));
            const scalar_t b2 = static_cast<scalar_t>(x1 * static_cast<float>(s[j + half]));
            x[j] = static_cast<scalar_t>(static_cast<float>(a1) + static_cast<float>(b1));
            x[j + half] = static_cast<scalar_t>(static_cast<float>(a2) + static_cast<float>(b2));
          }
        }
      }
    });
  });
}

// cpu_quant_attention.cpp
torch::Tensor quant_decode_attention(torch::Tensor q, int64_t bits, torch::Tensor k_codes, torch::Tensor k_scale,
                                     torch::Tensor k_zero, bool k_grouped, int64_t k_group, torch::Tensor v_codes,
                                     torch::Tensor v_scale, torch::Tensor v_zero, bool v_grouped, int64_t v_group,
                                     torch::Tensor lane_k, torch::Tensor lane_v, torch::Tensor override,
                                     torch::Tensor own_k, torch::Tensor own_v, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
  m.def("rms_norm", &rms_norm, "RMSNorm, one pass");
  m.def("add_rms_norm", &add_rms_norm, "residual add + RMSNorm, one pass");
  m.def("rope_", &rope_, "rotate-half RoPE on the q and k heads of qkv rows, in place");
  m.def("quant_decode_attention", &quant_decode_attention, "decode attention over int8/int4 paged codes + lanes");
}
