// One query per head against a KV cache, on the CPU: the decode step of softmax attention.
//
// Why C++: inductor turns the same expression into a BLAS product for the scores and a fused
// softmax + weighted sum whose accumulator is one dependent chain of vector adds per head
// (cascaded through memory above 4096 tokens) and which reads the values once per query head.
// This kernel reads each cached key and value once for all the query heads of its group, splits
// the context into blocks that both cores share, and merges the blocks' partial softmaxes
// (flash-decoding): 2.4x the compiled PyTorch path at 8k tokens for attention-tiny's heads,
// 3.2x for SmolLM2's (`zoo bench decode-attention-op`). Built on first use by cpu.py.
//
// Shapes: q (B, H, D); keys_t (B, H_kv, D, L), the cache's transposed keys; values
// (B, H_kv, L, D); out (B, H, D), all of one dtype: float32, bfloat16 or float16 (read as
// float32; the sums are float32 throughout). Query head h reads KV head h / (H / H_kv).

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

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kBlock = 512;  // tokens per task: the scores of a group stay in L1

// Vec::size() elements of the cache (float, bf16 or fp16) as floats; `count` < Vec::size()
// reads only that many (the rest are zero).
template <typename T>
inline Vec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
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

float max_of(const float* x, int64_t n) {
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
std::pair<float, float> exp_and_sum(float* scores, int64_t n) {
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

template <int G, typename T>
void attend_heads(const float* q, const T* keys_t, int64_t key_row_stride,
                  const T* values, int64_t value_row_stride, int64_t n, int64_t dim,
                  float* scores, float* partial) {
  scores_of<G>(q, dim, keys_t, key_row_stride, n, scores);
  for (int g = 0; g < G; ++g) {
    const auto [m, sum] = exp_and_sum(scores + g * kBlock, n);
    partial[g * (dim + 2)] = m;
    partial[g * (dim + 2) + 1] = sum;
  }
  weighted_values<G>(scores, values, value_row_stride, n, dim, partial + 2, dim + 2);
}

// One block of n tokens for one KV head and its `groups` query heads: writes, per query head,
// the block's max score m, its sum of exp(score - m) and the exp-weighted sum of values. The
// query heads go four at a time (registers hold 4 heads x 4 token vectors of accumulators).
template <typename T>
void attend_block(const float* q, const T* keys_t, int64_t key_row_stride,
                  const T* values, int64_t value_row_stride, int64_t n, int64_t groups,
                  int64_t dim, float* scores, float* partial) {
  for (int64_t g = 0; g < groups; g += 4) {
    const float* q_g = q + g * dim;
    float* p_g = partial + g * (dim + 2);
    switch (std::min<int64_t>(4, groups - g)) {
      case 1: attend_heads<1>(q_g, keys_t, key_row_stride, values, value_row_stride, n, dim,
                              scores, p_g); break;
      case 2: attend_heads<2>(q_g, keys_t, key_row_stride, values, value_row_stride, n, dim,
                              scores, p_g); break;
      case 3: attend_heads<3>(q_g, keys_t, key_row_stride, values, value_row_stride, n, dim,
                              scores, p_g); break;
      default: attend_heads<4>(q_g, keys_t, key_row_stride, values, value_row_stride, n, dim,
                               scores, p_g); break;
    }
  }
}

// Every (batch row, KV head, block of kBlock tokens) is one task; the cores share them.
template <typename T>
void attend_all(const float* q, const at::Tensor& keys_t, const at::Tensor& values,
                int64_t groups, int64_t n_blocks, float* partial) {
  const int64_t H_kv = keys_t.size(1), D = keys_t.size(2), L = keys_t.size(3);
  const int64_t H = H_kv * groups;
  const T* k_ptr = keys_t.data_ptr<T>();
  const T* v_ptr = values.data_ptr<T>();
  at::parallel_for(0, keys_t.size(0) * H_kv * n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(std::min<int64_t>(groups, 4) * kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n_blocks, block = task % n_blocks;
      const int64_t b = bh / H_kv, h = bh % H_kv;
      const int64_t start = block * kBlock, n = std::min(kBlock, L - start);
      attend_block(q + (b * H + h * groups) * D,
                   k_ptr + b * keys_t.stride(0) + h * keys_t.stride(1) + start,
                   keys_t.stride(2),
                   v_ptr + b * values.stride(0) + h * values.stride(1) + start * values.stride(2),
                   values.stride(2), n, groups, D, scores.data(),
                   partial + task * groups * (D + 2));
    }
  });
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& keys_t,
                                const at::Tensor& values, double scale) {
  TORCH_CHECK(q.dim() == 3 && keys_t.dim() == 4 && values.dim() == 4,
              "decode_attention: q (B, H, D), keys_t (B, H_kv, D, L), values (B, H_kv, L, D)");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(keys_t.scalar_type() == dtype && values.scalar_type() == dtype,
              "decode_attention: q, keys_t and values must share one dtype");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "decode_attention (cpu kernel): float32, bfloat16 or float16");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t H_kv = keys_t.size(1), L = keys_t.size(3);
  TORCH_CHECK(keys_t.size(0) == B && keys_t.size(2) == D && values.size(0) == B &&
                  values.size(1) == H_kv && values.size(2) == L && values.size(3) == D,
              "decode_attention: keys_t and values do not match q's batch, head_dim or length");
  TORCH_CHECK(H_kv > 0 && H % H_kv == 0, "decode_attention: H must be a multiple of H_kv");
  TORCH_CHECK(L > 0, "decode_attention: the cache is empty");
  TORCH_CHECK(keys_t.stride(3) == 1 && values.stride(3) == 1,
              "decode_attention: keys_t and values need unit stride in their last dim");
  const int64_t groups = H / H_kv;
  const int64_t n_blocks = (L + kBlock - 1) / kBlock;
  // the query scaled once, in float32; per (b, kv head, block, query head of the group): the
  // block's max score, its sum of exps, then the D exp-weighted values
  const at::Tensor q_in = q.to(at::kFloat).contiguous();
  std::vector<float> q_scaled(q_in.data_ptr<float>(), q_in.data_ptr<float>() + B * H * D);
  for (float& x : q_scaled) x *= static_cast<float>(scale);
  std::vector<float> partial(B * H_kv * n_blocks * groups * (D + 2));
  float* p_ptr = partial.data();
  if (dtype == at::kFloat) {
    attend_all<float>(q_scaled.data(), keys_t, values, groups, n_blocks, p_ptr);
  } else if (dtype == at::kBFloat16) {
    attend_all<at::BFloat16>(q_scaled.data(), keys_t, values, groups, n_blocks, p_ptr);
  } else {
    attend_all<at::Half>(q_scaled.data(), keys_t, values, groups, n_blocks, p_ptr);
  }

  // merge the blocks: rescale each block's sums to the overall max
  at::Tensor out = at::empty({B, H, D}, q.options().dtype(at::kFloat));
  float* o_ptr = out.data_ptr<float>();
  for (int64_t bh = 0; bh < B * H_kv; ++bh) {
    for (int64_t g = 0; g < groups; ++g) {
      auto block_row = [&](int64_t block) {
        return p_ptr + ((bh * n_blocks + block) * groups + g) * (D + 2);
      };
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t block = 0; block < n_blocks; ++block) m = std::max(m, block_row(block)[0]);
      float* o = o_ptr + (bh * groups + g) * D;  // (b, h * groups + g) in (B, H, D)
      std::fill(o, o + D, 0.0f);
      float sum = 0.0f;
      for (int64_t block = 0; block < n_blocks; ++block) {
        const float* row = block_row(block);
        const float w = std::exp(row[0] - m);
        sum += w * row[1];
        axpy(o, w, row + 2, D);
      }
      const float inv = 1.0f / sum;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  }
  return out.to(dtype);
}

}  // namespace

TORCH_LIBRARY(zoo_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor keys_t, Tensor values, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(zoo_cpu, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }
