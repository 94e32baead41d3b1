// Helpers shared by the CPU kernels (cpu_ops.cpp, cpu_quant_attention.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvfleet {

// exp(x), vectorizable: 2^(x log2 e) split into an integer part (the float's exponent bits) and a
// fraction (a degree-6 polynomial, relative error ~1e-7); x is clamped to [-87, 88] (float's range).
inline float exp_fast(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.4426950408889634f;
  const float fi = std::floor(t);
  const float f = t - fi;  // [0, 1)
  float p = 2.1871262347909954e-4f;
  p = p * f + 1.2382415530029704e-3f;
  p = p * f + 9.686186291396648e-3f;
  p = p * f + 5.5478912462151565e-2f;
  p = p * f + 2.4023109676181384e-1f;
  p = p * f + 6.931468377006911e-1f;
  p = p * f + 1.0000000061582064f;
  const int32_t bits = (static_cast<int32_t>(fi) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Ask for the next block's rows of this head while the current block is computed: blocks are scattered,
// so the hardware prefetcher cannot guess the jump.
template <typename T>
inline void prefetch_block(const T* first, int64_t bs, int64_t row, int64_t D) {
  const int64_t lines = (D * static_cast<int64_t>(sizeof(T)) + 63) / 64;
  for (int64_t j = 0; j < bs; ++j)
    for (int64_t l = 0; l < lines; ++l)
      __builtin_prefetch(reinterpret_cast<const char*>(first + j * row) + 64 * l);
}

// In place: s[0..L) -> exp(s - max(s)); returns 1 / sum, by which the caller scales its weighted sum.
inline float softmax_unnormalized(float* s, int64_t L) {
  float mx = -INFINITY;
  for (int64_t t = 0; t < L; ++t) mx = std::max(mx, s[t]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < L; ++t) {
    s[t] = exp_fast(s[t] - mx);
    sum += s[t];
  }
  return 1.f / sum;
}

}  // namespace kvfleet
