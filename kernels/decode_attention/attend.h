// The blocks of one-query attention on the CPU, shared by the decode-attention op
// (cpu_kernel.cpp) and the fused transformer decode step (kernels/transformer_step): both are
// compiled with this text before their own (kernels/cpu_build.py), so a change here rebuilds
// both.
//
// A block is up to kBlock cached tokens of one KV head seen by its `groups` query heads. For
// each query head it leaves a partial softmax: the block's max score m, its sum of
// exp(score - m) and the exp-weighted sum of the values (D floats); merge_blocks combines a
// head's blocks (flash-decoding).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace zoo_attend {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kBlock = 512;  // tokens per task: the scores of a group stay in L1

// Vec::size() elements of the cache (float, bf16 or fp16) as floats; `count` < Vec::size()
// reads only that many (the rest are zero).
template <typename T>
inline Vec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else if constexpr (std::is_same_v<T, int8_t>) {
    // an int8 KV cache's codes: sign-extended and converted in registers (through a stack
    // array the stores and reloads took twice the float kernel's time)
#if defined(CPU_CAPABILITY_AVX512)
    return Vec(_mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(CPU_CAPABILITY_AVX2)
    return Vec(_mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
    float lanes[Vec::size()];
    for (int64_t i = 0; i < Vec::size(); ++i) lanes[i] = static_cast<float>(p[i]);
    return Vec::loadu(lanes);
#endif
  } else {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

template <typename T>
inline Vec load_float(const T* p, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, count);
  } else {
    float lanes[Vec::size()] = {};
    for (int64_t i = 0; i < count; ++i) lanes[i] = static_cast<float>(p[i]);
    return Vec::loadu(lanes);
  }
}

// out[0:n] += a * x[0:n]
inline void axpy(float* out, float a, const float* x, int64_t n) {
  int64_t i = 0;
  const Vec av(a);
  for (; i + Vec::size() <= n; i += Vec::size()) {
    at::vec::fmadd(av, Vec::loadu(x + i), Vec::loadu(out + i)).store(out + i);
  }
  for (; i < n; ++i) out[i] += a * x[i];
}

inline float max_of(const float* x, int64_t n) {
  constexpr float lowest = -std::numeric_limits<float>::infinity();
  Vec m_vec(lowest);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    m_vec = at::vec::maximum(m_vec, Vec::loadu(x + i));
  }
  float lanes[Vec::size()];
  m_vec.store(lanes);
  float m = *std::max_element(lanes, lanes + Vec::size());
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// scores[g][0:n] = sum_d q[g][d] * keys_t[d][0:n] for G query heads: the accumulators of
// kUnroll token vectors per head stay in registers across d, and each key vector loaded serves
// all G heads (writing the scores once instead of once per d halved this pass).
template <int G, typename T>
void scores_of(const float* q, int64_t dim, const T* keys_t, int64_t key_row_stride,
               int64_t n, float* scores) {
  constexpr int64_t kUnroll = 4, kStep = kUnroll * Vec::size();
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    Vec acc[G][kUnroll];
    for (int g = 0; g < G; ++g)
      for (int u = 0; u < kUnroll; ++u) acc[g][u] = Vec(0.0f);
    for (int64_t d = 0; d < dim; ++d) {
      const T* row = keys_t + d * key_row_stride + i;
      Vec k[kUnroll];
      for (int u = 0; u < kUnroll; ++u) k[u] = load_float(row + u * Vec::size());
      for (int g = 0; g < G; ++g) {
        const Vec qd(q[g * dim + d]);
        for (int u = 0; u < kUnroll; ++u) acc[g][u] = at::vec::fmadd(qd, k[u], acc[g][u]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int u = 0; u < kUnroll; ++u) acc[g][u].store(scores + g * kBlock + i + u * Vec::size());
  }
  for (; i < n; i += Vec::size()) {  // the last (partial) vectors
    const int64_t count = std::min<int64_t>(Vec::size(), n - i);
    Vec acc[G];
    for (int g = 0; g < G; ++g) acc[g] = Vec(0.0f);
    for (int64_t d = 0; d < dim; ++d) {
      const Vec k = load_float(keys_t + d * key_row_stride + i, count);
      for (int g = 0; g < G; ++g) acc[g] = at::vec::fmadd(Vec(q[g * dim + d]), k, acc[g]);
    }
    for (int g = 0; g < G; ++g) acc[g].store(scores + g * kBlock + i, count);
  }
}

// out[g][0:dim] = sum_t weights[g][t] * values[t][0:dim], one vector of dim at a time with
// kUnroll tokens in flight (independent accumulators: one chain of dependent adds per token
// would bound this pass by the add's latency).
template <int G, typename T>
void weighted_values(const float* weights, const T* values, int64_t value_row_stride,
                     int64_t n, int64_t dim, float* out, int64_t out_stride) {
  constexpr int64_t kUnroll = 4;
  for (int64_t j = 0; j < dim; j += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), dim - j);
    Vec acc[G][kUnroll];
    for (int g = 0; g < G; ++g)
      for (int u = 0; u < kUnroll; ++u) acc[g][u] = Vec(0.0f);
    int64_t t = 0;
    for (; t + kUnroll <= n; t += kUnroll) {
      for (int u = 0; u < kUnroll; ++u) {
        const T* row = values + (t + u) * value_row_stride + j;
        const Vec v = count == Vec::size() ? load_float(row) : load_float(row, count);
        for (int g = 0; g < G; ++g)
          acc[g][u] = at::vec::fmadd(Vec(weights[g * kBlock + t + u]), v, acc[g][u]);
      }
    }
    for (; t < n; ++t) {
      const Vec v = load_float(values + t * value_row_stride + j, count);
      for (int g = 0; g < G; ++g)
        acc[g][0] = at::vec::fmadd(Vec(weights[g * kBlock + t]), v, acc[g][0]);
    }
    for (int g = 0; g < G; ++g) {
      const Vec sum = (acc[g][0] + acc[g][1]) + (acc[g][2] + acc[g][3]);
      sum.store(out + g * out_stride + j, count);
    }
  }
}

// In place: scores[0:n] = exp(scores - max); returns (max, sum of the exps).
inline std::pair<float, float> exp_and_sum(float* scores, int64_t n) {
  const float m = max_of(scores, n);
  const Vec m_vec(m);
  Vec sum_vec(0.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec e = (Vec::loadu(scores + i) - m_vec).exp_u20();  // 20 ulp: ~1e-6 relative
    e.store(scores + i);
    sum_vec = sum_vec + e;
  }
  float lanes[Vec::size()];
  sum_vec.store(lanes);
  float sum = std::accumulate(lanes, lanes + Vec::size(), 0.0f);
  for (; i < n; ++i) {
    scores[i] = std::exp(scores[i] - m);
    sum += scores[i];
  }
  return {m, sum};
}

// key_scales, value_scales: an int8 cache's per-token scales (nullptr for a float cache). A
// token's key scale multiplies its score and its value scale its weight, so the codes are read
// as they are and no dequantised copy of the block is made.
template <int G, typename T>
void attend_heads(const float* q, const T* keys_t, int64_t key_row_stride,
                  const T* values, int64_t value_row_stride, int64_t n, int64_t dim,
                  float* scores, float* partial, const float* key_scales = nullptr,
                  const float* value_scales = nullptr) {
  scores_of<G>(q, dim, keys_t, key_row_stride, n, scores);
  for (int g = 0; g < G; ++g) {
    float* row = scores + g * kBlock;
    if (key_scales != nullptr) {
      for (int64_t t = 0; t < n; ++t) row[t] *= key_scales[t];
    }
    const auto [m, sum] = exp_and_sum(row, n);
    partial[g * (dim + 2)] = m;
    partial[g * (dim + 2) + 1] = sum;
    if (value_scales != nullptr) {  // after the sum: the softmax's denominator is unscaled
      for (int64_t t = 0; t < n; ++t) row[t] *= value_scales[t];
    }
  }
  weighted_values<G>(scores, values, value_row_stride, n, dim, partial + 2, dim + 2);
}

// One block of n tokens for one KV head and its `groups` query heads: writes, per query head,
// the block's max score m, its sum of exp(score - m) and the exp-weighted sum of values. The
// query heads go four at a time (registers hold 4 heads x 4 token vectors of accumulators).
template <typename T>
void attend_block(const float* q, const T* keys_t, int64_t key_row_stride,
                  const T* values, int64_t value_row_stride, int64_t n, int64_t groups,
                  int64_t dim, float* scores, float* partial,
                  const float* key_scales = nullptr, const float* value_scales = nullptr) {
  for (int64_t g = 0; g < groups; g += 4) {
    const float* q_g = q + g * dim;
    float* p_g = partial + g * (dim + 2);
    switch (std::min<int64_t>(4, groups - g)) {
      case 1: attend_heads<1>(q_g, keys_t, key_row_stride, values, value_row_stride, n, dim,
                              scores, p_g, key_scales, value_scales); break;
      case 2: attend_heads<2>(q_g, keys_t, key_row_stride, values, value_row_stride, n, dim,
                              scores, p_g, key_scales, value_scales); break;
      case 3: attend_heads<3>(q_g, keys_t, key_row_stride, values, value_row_stride, n, dim,
                              scores, p_g, key_scales, value_scales); break;
      default: attend_heads<4>(q_g, keys_t, key_row_stride, values, value_row_stride, n, dim,
                               scores, p_g, key_scales, value_scales); break;
    }
  }
}

// out[0:D] = the softmax-weighted values of one query head from its n_blocks partials, which
// lie `stride` floats apart (each m, sum, then D values): each block's sums rescaled to the
// overall max.
inline void merge_blocks(const float* partial, int64_t n_blocks, int64_t stride, int64_t dim,
                         float* out) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t block = 0; block < n_blocks; ++block) m = std::max(m, partial[block * stride]);
  std::fill(out, out + dim, 0.0f);
  float sum = 0.0f;
  for (int64_t block = 0; block < n_blocks; ++block) {
    const float* row = partial + block * stride;
    const float w = std::exp(row[0] - m);
    sum += w * row[1];
    axpy(out, w, row + 2, dim);
  }
  const float inv = 1.0f / sum;
  for (int64_t d = 0; d < dim; ++d) out[d] *= inv;
}

}  // namespace zoo_attend
