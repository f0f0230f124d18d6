// One decode step of a pre-norm transformer stack on the CPU, all in one call.
//
// Why: decoding a 135M-parameter model reads its weights once a token, so its floor is their
// bytes over the memory bandwidth. torch.compile's step came to 1.4-1.5x that floor in this
// machine's fast spells: ~0.9 ms a step of fixed cost on the host (the Python wrapper, argument
// handling, 60 kernel and op calls with their thread wake-ups) and products that read the
// weights slower than the loop below. This kernel runs the whole step in one OpenMP region
// (~0.2 ms of fixed cost for a SmolLM2-shaped model small enough to stay in cache): the threads
// split every matrix's rows in contiguous halves, meet at a barrier where a stage needs another
// thread's rows, and never sleep.
//
// The stack, as zoo.model.ZooBlock runs it: x = embed[ids] (then RMSNorm where the config has
// embed_norm); per layer x += o(attention(rotary(q, k), v)) of rms(x), then, where the layer
// has an FFN, x += down(silu(gate(h)) * up(h)) (SwiGLU) or fc_out(gelu(fc_in(h))) of h = rms(x);
// logits = head(rms(x)). Attention appends each row's token to the layer's KV cache at slot
// length[b] and attends over that row's slots 0..length[b] with attend.h's blocks. The cache is
// a pool of blocks of S tokens, keys transposed as attend.h reads them: keys (N, H_kv, D, S),
// values (N, H_kv, S, D), and a block table (B, W) names each row's blocks in order (vLLM's
// PagedAttention, zoo.infer.paged); a contiguous cache k_t (B, H_kv, D, capacity) is the same
// layout with one block a row (table [[0], [1], ...]), so both run this code. Weights, caches and logits share one dtype (float32,
// bfloat16 or float16); activations and sums are float32 throughout. Any linear (q, k, v, o,
// the FFN's, the head) may instead hold a QuantizedLinear's int8 or int4 codes with scales (and
// zeros) of that dtype, turned into floats in registers as they are read (see Matrix below):
// fewer bytes a token is the only way left to decode faster once the step runs near its bound.
//
// Compiled after ../decode_attention/attend.h (kernels/cpu_build.py joins the two texts).

#include <omp.h>

#include <array>

namespace {

using namespace zoo_attend;

// The per-layer entries of `layer_weights`, in order (transformer_step/__init__.py's LAYER_FIELDS)
enum LayerField {
  kMixerNorm, kQ, kQBias, kK, kKBias, kV, kVBias, kO, kOBias,
  kFfnNorm, kGate, kGateBias, kUp, kUpBias, kDown, kDownBias, kLayerFields
};
// and of `globals`
enum GlobalField { kEmbed, kEmbedNorm, kFinalNorm, kHead, kInvFreq, kGlobalFields };
constexpr int64_t kMaxHeadDim = 512;

// This thread's rows of n: contiguous, in whole groups of `quantum` (the last may be short).
inline std::pair<int64_t, int64_t> share(int64_t n, int tid, int threads, int64_t quantum) {
  const int64_t units = (n + quantum - 1) / quantum;
  const int64_t begin = units * tid / threads * quantum;
  const int64_t end = units * (tid + 1) / threads * quantum;
  return {std::min(begin, n), std::min(end, n)};
}

inline float sum_lanes(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// w[0:K] . x[0:K] with four accumulators over consecutive vectors, so no add waits on the
// one before it. The rows of a matrix go one after another: each thread then reads its part
// of the weights as one sequential stream, which the hardware prefetcher follows. Reading
// four rows side by side (four streams) was slower: float32 SmolLM2 8.0 -> 8.5 ms/token, and
// bfloat16 8.4 ms where the sequential loop takes 5.2 (or 4.9 with software prefetch of the
// next rows); handing rows out in chunks from a shared counter instead of two contiguous
// halves was slower still (8.0 -> 9.1 ms: many short streams).
template <typename W>
inline float dot(const W* w, int64_t K, const float* x) {
  constexpr int64_t V = Vec::size();
  Vec a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f);
  int64_t k = 0;
  for (; k + 4 * V <= K; k += 4 * V) {
    a0 = at::vec::fmadd(load_float(w + k), Vec::loadu(x + k), a0);
    a1 = at::vec::fmadd(load_float(w + k + V), Vec::loadu(x + k + V), a1);
    a2 = at::vec::fmadd(load_float(w + k + 2 * V), Vec::loadu(x + k + 2 * V), a2);
    a3 = at::vec::fmadd(load_float(w + k + 3 * V), Vec::loadu(x + k + 3 * V), a3);
  }
  for (; k + V <= K; k += V) a0 = at::vec::fmadd(load_float(w + k), Vec::loadu(x + k), a0);
  if (k < K) a0 = at::vec::fmadd(load_float(w + k, K - k), Vec::loadu(x + k, K - k), a0);
  return sum_lanes((a0 + a1) + (a2 + a3));
}

// dot() of one row w with NB inputs (x (NB, K)) at once: each vector of the row is loaded and
// turned into floats once for all of them (16 rows of bfloat16 converted it 16 times). Each
// input's sums run in dot's order, so a row's result does not depend on the batch around it.
template <int NB, typename W>
inline void row_dots(const W* w, int64_t K, const float* x, float* out) {
  constexpr int64_t V = Vec::size();
  Vec a[4][NB];
  for (int u = 0; u < 4; ++u)
    for (int b = 0; b < NB; ++b) a[u][b] = Vec(0.0f);
  int64_t k = 0;
  for (; k + 4 * V <= K; k += 4 * V) {
    for (int u = 0; u < 4; ++u) {
      const Vec wu = load_float(w + k + u * V);
      for (int b = 0; b < NB; ++b)
        a[u][b] = at::vec::fmadd(wu, Vec::loadu(x + b * K + k + u * V), a[u][b]);
    }
  }
  for (; k + V <= K; k += V) {
    const Vec wk = load_float(w + k);
    for (int b = 0; b < NB; ++b) a[0][b] = at::vec::fmadd(wk, Vec::loadu(x + b * K + k), a[0][b]);
  }
  if (k < K) {
    const Vec wk = load_float(w + k, K - k);
    for (int b = 0; b < NB; ++b)
      a[0][b] = at::vec::fmadd(wk, Vec::loadu(x + b * K + k, K - k), a[0][b]);
  }
  for (int b = 0; b < NB; ++b) out[b] = sum_lanes((a[0][b] + a[1][b]) + (a[2][b] + a[3][b]));
}

// For rows [begin, end) of w (N, K) and each of B inputs x (B, K): emit(b, row, w[row] . x[b])
// (a row stays in L1 for the B inputs, which go four at a time through row_dots).
template <typename W, typename Emit>
inline void rows_times(const W* w, int64_t K, const float* x, int64_t B, int64_t begin,
                       int64_t end, Emit&& emit) {
  if (B == 1) {
    for (int64_t r = begin; r < end; ++r) emit(0, r, dot(w + r * K, K, x));
    return;
  }
  float dots[4];
  for (int64_t r = begin; r < end; ++r) {
    const W* row = w + r * K;
    for (int64_t b = 0; b < B; b += 4) {
      const float* inputs = x + b * K;
      const int64_t nb = std::min<int64_t>(4, B - b);
      switch (nb) {
        case 4: row_dots<4>(row, K, inputs, dots); break;
        case 3: row_dots<3>(row, K, inputs, dots); break;
        case 2: row_dots<2>(row, K, inputs, dots); break;
        default: row_dots<1>(row, K, inputs, dots); break;
      }
      for (int64_t i = 0; i < nb; ++i) emit(b + i, r, dots[i]);
    }
  }
}

// ---- Quantised weights (compression/quantized_linear.py's layouts), dequantised in registers.
//
// Where the CPU has AVX-512 VNNI (and ZOO_INT8_DOTS is not 0), rows_times takes int8_dots.h's
// integer products instead: the input quantised to int8 blocks of 32, codes times codes in int32.
// What follows is the float path, for other builds, other groups, and that switch.
//
// A QuantizedLinear's codes are read as they are stored and turned into floats in vector
// registers, never written back as a float matrix: int8 codes (N, K) with a scale per group of
// `group` inputs of a row (group = K: per output channel), W = code * scale; int4 codes two to
// a byte (input 2j in the low nibble, 2j + 1 in the high one) with a scale and a zero per group,
// W = code * scale + zero. A group's products are summed first and scaled once:
//   row . x = sum_g scale_g * (codes_g . x_g) + sum_g zero_g * sum(x_g),
// so the zero costs one product per group with the input's group sums, computed once per input
// (with AVX-512, int4 looks each code's weight up instead: see its int4_row_dots).
// A run of Vec::size() bytes of int4 codes holds 2 * Vec::size() inputs, even ones in the low
// nibbles and odd ones in the high: the input is reordered once per product (each chunk of
// 2 * Vec::size() floats as its even entries then its odd ones) so that the nibbles need no
// shuffle back into input order.

enum class Storage { kFloat, kInt8, kInt4 };

template <typename W>
struct Matrix {
  Storage storage = Storage::kFloat;
  const void* data = nullptr;  // W (N, K), int8 codes (N, K) or uint8 int4 codes (N, K / 2)
  const W* scale = nullptr;    // (N, K / group)
  const W* zero = nullptr;     // (N, K / group), int4 only
  int64_t group = 0;           // inputs per scale
};

// Vec::size() int8 codes (`count` of them, the rest zero) as floats
inline Vec int8_as_float(const int8_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
#else
  float lanes[Vec::size()];
  for (int64_t i = 0; i < Vec::size(); ++i) lanes[i] = static_cast<float>(p[i]);
  return Vec::loadu(lanes);
#endif
}

inline Vec int8_as_float(const int8_t* p, int64_t count) {
  float lanes[Vec::size()] = {};
  for (int64_t i = 0; i < count; ++i) lanes[i] = static_cast<float>(p[i]);
  return Vec::loadu(lanes);
}

// Inputs (NB of them, `x_stride` apart) dotted with row `r` of int8 codes: out[b] = row . x_b.
// kUnroll accumulators per input (consecutive vectors) and two running totals (alternate
// groups), so no add waits on the one before it: one chain through a row would bound a row
// by the add's latency.
template <int NB, typename W>
inline void int8_row_dots(const Matrix<W>& m, int64_t r, int64_t K, const float* x,
                          int64_t x_stride, float* out) {
  constexpr int64_t V = Vec::size();
  constexpr int kUnroll = NB == 1 ? 4 : 2;
  const int8_t* codes = static_cast<const int8_t*>(m.data) + r * K;
  const int64_t groups = K / m.group;
  const W* scale = m.scale + r * groups;
  Vec total[2][NB];
  for (int b = 0; b < NB; ++b) total[0][b] = total[1][b] = Vec(0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    Vec acc[kUnroll][NB];
    for (int u = 0; u < kUnroll; ++u)
      for (int b = 0; b < NB; ++b) acc[u][b] = Vec(0.0f);
    int64_t i = g * m.group;
    const int64_t end = i + m.group;
    for (; i + kUnroll * V <= end; i += kUnroll * V) {
      for (int u = 0; u < kUnroll; ++u) {
        const Vec c = int8_as_float(codes + i + u * V);
        for (int b = 0; b < NB; ++b)
          acc[u][b] = at::vec::fmadd(c, Vec::loadu(x + b * x_stride + i + u * V), acc[u][b]);
      }
    }
    for (; i < end; i += V) {  // the group's (per channel: the row's) last vectors
      const int64_t count = std::min<int64_t>(V, end - i);
      const Vec c = count == V ? int8_as_float(codes + i) : int8_as_float(codes + i, count);
      for (int b = 0; b < NB; ++b)
        acc[0][b] = at::vec::fmadd(c, Vec::loadu(x + b * x_stride + i, count), acc[0][b]);
    }
    const Vec s(static_cast<float>(scale[g]));
    for (int b = 0; b < NB; ++b) {
      Vec sum = acc[0][b];
      for (int u = 1; u < kUnroll; ++u) sum = sum + acc[u][b];
      total[g & 1][b] = at::vec::fmadd(sum, s, total[g & 1][b]);
    }
  }
  for (int b = 0; b < NB; ++b) out[b] = sum_lanes(total[0][b] + total[1][b]);
}

#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kInt4GroupSums = false;

// int4 with AVX-512: a group's 16 weights code * scale + zero sit in one register, and each code
// picks its weight with a permute (vpermps reads the low 4 bits of each 32-bit lane, so the low
// nibble needs no mask): the weights are those of dequantising first, and no scale, zero or
// group sum is applied per group (`sums` unused).
template <int NB, typename W>
inline void int4_row_dots(const Matrix<W>& m, int64_t r, int64_t K, const float* x,
                          int64_t x_stride, const float*, int64_t, float* out) {
  constexpr int64_t V = Vec::size();
  const uint8_t* codes = static_cast<const uint8_t*>(m.data) + r * (K / 2);
  const int64_t groups = K / m.group;
  const W* scale = m.scale + r * groups;
  const W* zero = m.zero + r * groups;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc[2][NB];
  for (int b = 0; b < NB; ++b) acc[0][b] = acc[1][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(static_cast<float>(scale[g])),
                                         _mm512_set1_ps(static_cast<float>(zero[g])));
    for (int64_t i = g * m.group; i < (g + 1) * m.group; i += 2 * V) {
      const __m512i bytes =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i / 2)));
      const __m512 low = _mm512_permutexvar_ps(bytes, table);
      const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
      for (int b = 0; b < NB; ++b) {
        acc[0][b] = _mm512_fmadd_ps(low, _mm512_loadu_ps(x + b * x_stride + i), acc[0][b]);
        acc[1][b] = _mm512_fmadd_ps(high, _mm512_loadu_ps(x + b * x_stride + i + V), acc[1][b]);
      }
    }
  }
  for (int b = 0; b < NB; ++b)
    out[b] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][b], acc[1][b]));
}
#else
constexpr bool kInt4GroupSums = true;

// Vec::size() bytes of int4 codes as floats: the low nibbles, then the high ones
inline void int4_as_float(const uint8_t* p, Vec& low, Vec& high) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i bytes =
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  low = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(0x0F)));
  high = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
#else
  float lo[Vec::size()], hi[Vec::size()];
  for (int64_t i = 0; i < Vec::size(); ++i) {
    lo[i] = static_cast<float>(p[i] & 0x0F);
    hi[i] = static_cast<float>(p[i] >> 4);
  }
  low = Vec::loadu(lo);
  high = Vec::loadu(hi);
#endif
}

// The same for int4 codes, on reordered inputs (see above) and their group sums (`sums`,
// K / group per input, `sum_stride` apart)
template <int NB, typename W>
inline void int4_row_dots(const Matrix<W>& m, int64_t r, int64_t K, const float* x,
                          int64_t x_stride, const float* sums, int64_t sum_stride, float* out) {
  constexpr int64_t V = Vec::size();
  const uint8_t* codes = static_cast<const uint8_t*>(m.data) + r * (K / 2);
  const int64_t groups = K / m.group;
  const W* scale = m.scale + r * groups;
  const W* zero = m.zero + r * groups;
  Vec total[2][NB];
  float zero_part[2][NB];
  for (int b = 0; b < NB; ++b) {
    total[0][b] = total[1][b] = Vec(0.0f);
    zero_part[0][b] = zero_part[1][b] = 0.0f;
  }
  for (int64_t g = 0; g < groups; ++g) {
    Vec acc_low[NB], acc_high[NB];
    for (int b = 0; b < NB; ++b) acc_low[b] = acc_high[b] = Vec(0.0f);
    for (int64_t i = g * m.group; i < (g + 1) * m.group; i += 2 * V) {
      Vec low, high;
      int4_as_float(codes + i / 2, low, high);
      for (int b = 0; b < NB; ++b) {
        acc_low[b] = at::vec::fmadd(low, Vec::loadu(x + b * x_stride + i), acc_low[b]);
        acc_high[b] = at::vec::fmadd(high, Vec::loadu(x + b * x_stride + i + V), acc_high[b]);
      }
    }
    const Vec s(static_cast<float>(scale[g]));
    const float z = static_cast<float>(zero[g]);
    for (int b = 0; b < NB; ++b) {
      total[g & 1][b] = at::vec::fmadd(acc_low[b] + acc_high[b], s, total[g & 1][b]);
      zero_part[g & 1][b] += z * sums[b * sum_stride + g];
    }
  }
  for (int b = 0; b < NB; ++b)
    out[b] = sum_lanes(total[0][b] + total[1][b]) + (zero_part[0][b] + zero_part[1][b]);
}
#endif

// The int4 products' inputs: x (B, K) reordered chunk by chunk (even entries, then odd) into
// `reordered` (B, K), and its sums per group of `group` into `sums` (B, K / group) where given
inline void reorder_for_int4(const float* x, int64_t B, int64_t K, int64_t group,
                             float* reordered, float* sums) {
  constexpr int64_t V = Vec::size();
  for (int64_t b = 0; b < B; ++b) {
    const float* row = x + b * K;
    float* out = reordered + b * K;
    for (int64_t c = 0; c < K; c += 2 * V) {
      for (int64_t i = 0; i < V; ++i) {
        out[c + i] = row[c + 2 * i];
        out[c + V + i] = row[c + 2 * i + 1];
      }
    }
    for (int64_t g = 0; sums != nullptr && g < K / group; ++g) {
      float sum = 0.0f;
      for (int64_t i = g * group; i < (g + 1) * group; ++i) sum += row[i];
      sums[b * (K / group) + g] = sum;
    }
  }
}

// nb <= 4 inputs (x (nb, K), their group sums (nb, K / group) for int4) dotted with row r of
// quantised m: the row's codes are turned into floats once for all of them
template <typename W>
inline void quantized_row_dots(const Matrix<W>& m, int64_t r, int64_t K, const float* x,
                               const float* sums, int64_t nb, float* out) {
  const int64_t groups = K / m.group;
  if (m.storage == Storage::kInt8) {
    switch (nb) {
      case 4: return int8_row_dots<4>(m, r, K, x, K, out);
      case 3: return int8_row_dots<3>(m, r, K, x, K, out);
      case 2: return int8_row_dots<2>(m, r, K, x, K, out);
      default: return int8_row_dots<1>(m, r, K, x, K, out);
    }
  }
  switch (nb) {
    case 4: return int4_row_dots<4>(m, r, K, x, K, sums, groups, out);
    case 3: return int4_row_dots<3>(m, r, K, x, K, sums, groups, out);
    case 2: return int4_row_dots<2>(m, r, K, x, K, sums, groups, out);
    default: return int4_row_dots<1>(m, r, K, x, K, sums, groups, out);
  }
}

// rows_times for quantised m through int8_dots.h's integer products: x (B, K) quantised to int8
// blocks in `scratch`, then each row's codes dotted with up to kMaxRows inputs at a time
template <typename W, typename Emit>
inline void rows_times_int8_dots(const Matrix<W>& m, int64_t K, const float* x, int64_t B,
                                 int64_t begin, int64_t end, float* scratch, Emit&& emit) {
#if defined(ZOO_INT8_DOTS)
  const bool int4 = m.storage == Storage::kInt4;
  const int64_t bytes = zoo_int8::layout_bytes(K), chunks = (K + 63) / 64;
  const int64_t padded = chunks * 64 + 128;
  int8_t* base = reinterpret_cast<int8_t*>(scratch);
  base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
  std::array<zoo_int8::Input, zoo_int8::kMaxRows> inputs;
  for (int64_t b0 = 0; b0 < B; b0 += zoo_int8::kMaxRows) {
    const int64_t nb = std::min<int64_t>(zoo_int8::kMaxRows, B - b0);
    for (int64_t i = 0; i < nb; ++i) {
      int8_t* own = base + i * bytes;
      inputs[i] = {own + padded, reinterpret_cast<float*>(own + 2 * padded),
                   reinterpret_cast<int32_t*>(own + 2 * padded + chunks * 64),
                   reinterpret_cast<float*>(own + 2 * padded + 2 * chunks * 64)};
      zoo_int8::quantize(x + (b0 + i) * K, K, int4, m.group, own, inputs[i]);
    }
    const int64_t groups = K / m.group;
    float dots[zoo_int8::kMaxRows];
    for (int64_t r = begin; r < end; ++r) {
      const W* scale = m.scale + r * groups;
      if (int4) {
        const uint8_t* row = static_cast<const uint8_t*>(m.data) + r * (K / 2);
        const W* zero = m.zero + r * groups;
        switch (nb) {
          case 4: zoo_int8::int4_row_dots<4>(row, scale, zero, K, m.group, inputs.data(), dots); break;
          case 3: zoo_int8::int4_row_dots<3>(row, scale, zero, K, m.group, inputs.data(), dots); break;
          case 2: zoo_int8::int4_row_dots<2>(row, scale, zero, K, m.group, inputs.data(), dots); break;
          default: zoo_int8::int4_row_dots<1>(row, scale, zero, K, m.group, inputs.data(), dots);
        }
      } else {
        const int8_t* row = static_cast<const int8_t*>(m.data) + r * K;
        switch (nb) {
          case 4: zoo_int8::int8_row_dots<4>(row, scale, K, m.group, inputs.data(), dots); break;
          case 3: zoo_int8::int8_row_dots<3>(row, scale, K, m.group, inputs.data(), dots); break;
          case 2: zoo_int8::int8_row_dots<2>(row, scale, K, m.group, inputs.data(), dots); break;
          default: zoo_int8::int8_row_dots<1>(row, scale, K, m.group, inputs.data(), dots);
        }
      }
      for (int64_t i = 0; i < nb; ++i) emit(b0 + i, r, dots[i]);
    }
  }
#endif
}

// Floats of scratch a thread needs for rows_times on quantised matrices of B inputs of up to
// `widest` entries: the int4 float path's reordered inputs and group sums, or the integer
// path's quantised inputs
inline int64_t matrix_scratch_floats(int64_t B, int64_t widest) {
  return std::max(B * widest * 2, zoo_int8::scratch_floats(B, widest));
}

// rows_times for a matrix in any storage. `scratch` (this thread's own, matrix_scratch_floats)
// takes the quantised inputs, or for int4's float path the reordered inputs and group sums.
template <typename W, typename Emit>
inline void rows_times(const Matrix<W>& m, int64_t K, const float* x, int64_t B, int64_t begin,
                       int64_t end, float* scratch, Emit&& emit) {
  if (m.storage == Storage::kFloat) {
    rows_times(static_cast<const W*>(m.data), K, x, B, begin, end, emit);
    return;
  }
  if (begin >= end) return;
#if defined(ZOO_INT8_DOTS)
  if (zoo_int8::takes(m.storage == Storage::kInt4, K, m.group) && zoo_int8::enabled()) {
    rows_times_int8_dots(m, K, x, B, begin, end, scratch, emit);
    return;
  }
#endif
  const float* input = x;
  const float* sums = nullptr;
  const int64_t groups = K / m.group;
  if (m.storage == Storage::kInt4) {
    float* group_sums = kInt4GroupSums ? scratch + B * K : nullptr;
    reorder_for_int4(x, B, K, m.group, scratch, group_sums);
    input = scratch;
    sums = group_sums;
  }
  float dots[4];
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t b = 0; b < B; b += 4) {
      const int64_t nb = std::min<int64_t>(4, B - b);
      quantized_row_dots(m, r, K, input + b * K, sums ? sums + b * groups : nullptr, nb, dots);
      for (int64_t i = 0; i < nb; ++i) emit(b + i, r, dots[i]);
    }
  }
}

// x (B, K) float32 times a QuantizedLinear's codes, transposed: (B, N) float32, by the step's
// own rows_times (one thread), so that tests can compare its products with their definition
template <typename W>
at::Tensor quantized_matmul_as(const at::Tensor& x, const at::Tensor& codes,
                               const at::Tensor& scale, const std::optional<at::Tensor>& zero) {
  const int64_t B = x.size(0), K = x.size(1), N = codes.size(0);
  Matrix<W> m;
  m.storage = codes.scalar_type() == at::kByte ? Storage::kInt4 : Storage::kInt8;
  m.data = codes.data_ptr();
  m.scale = scale.data_ptr<W>();
  m.zero = zero.has_value() && zero->defined() ? zero->data_ptr<W>() : nullptr;
  m.group = K / scale.size(1);
  at::Tensor out = at::empty({B, N}, x.options());
  float* o = out.data_ptr<float>();
  std::vector<float> scratch(matrix_scratch_floats(B, K) + 16);
  rows_times(m, K, x.data_ptr<float>(), B, 0, N, scratch.data(),
             [&](int64_t b, int64_t r, float value) { o[b * N + r] = value; });
  return out;
}

at::Tensor quantized_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                            const std::optional<at::Tensor>& zero) {
  const char* op = "zoo_cpu::quantized_matmul: ";
  const bool int4 = codes.scalar_type() == at::kByte;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), op,
              "x must be a contiguous float32 (B, K) tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t K = x.size(1);
  TORCH_CHECK((int4 || codes.scalar_type() == at::kChar) && codes.dim() == 2 &&
                  codes.is_contiguous() && codes.size(1) * (int4 ? 2 : 1) == K,
              op, "codes must be contiguous int8 (N, ", K, ") or uint8 (N, ", K / 2,
              "), got ", codes.sizes(), " ", codes.scalar_type());
  TORCH_CHECK(scale.dim() == 2 && scale.is_contiguous() && scale.size(0) == codes.size(0) &&
                  scale.size(1) > 0 && K % scale.size(1) == 0,
              op, "scale must be contiguous (N, groups) with groups dividing ", K, ", got ",
              scale.sizes());
  const int64_t group = K / scale.size(1);
  const int64_t quantum = (int4 ? 2 : 1) * Vec::size();
  TORCH_CHECK(group % quantum == 0 || (!int4 && group == K), op, "groups of ", group,
              " inputs; this build takes groups of a multiple of ", quantum);
  TORCH_CHECK(int4 == (zero.has_value() && zero->defined()), op,
              "int4 codes take a zero shaped as the scale, int8 codes none");
  if (int4) {
    TORCH_CHECK(zero->scalar_type() == scale.scalar_type() && zero->is_contiguous() &&
                    zero->sizes() == scale.sizes(), op, "zero must be contiguous, shaped ",
                scale.sizes(), " and of the scale's dtype");
  }
  if (scale.scalar_type() == at::kFloat) return quantized_matmul_as<float>(x, codes, scale, zero);
  if (scale.scalar_type() == at::kBFloat16)
    return quantized_matmul_as<at::BFloat16>(x, codes, scale, zero);
  TORCH_CHECK(scale.scalar_type() == at::kHalf, op,
              "scale must be float32, bfloat16 or float16, got ", scale.scalar_type());
  return quantized_matmul_as<at::Half>(x, codes, scale, zero);
}

// Query (enabled None) or set whether quantised products take the integer path; returns whether
// it was on (always false where the build or the CPU lacks AVX-512 VNNI)
bool int8_dots(std::optional<bool> enabled) {
#if defined(ZOO_INT8_DOTS)
  return enabled.has_value() ? zoo_int8::set_enabled(*enabled) : zoo_int8::enabled();
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zoo_cpu, m) {
  m.def("quantized_matmul(Tensor x, Tensor codes, Tensor scale, Tensor? zero) -> Tensor");
  m.def("int8_dots(bool? enabled) -> bool");
}

TORCH_LIBRARY_IMPL(zoo_cpu, CPU, m) {
  m.impl("quantized_matmul", &quantized_matmul);
}

TORCH_LIBRARY_IMPL(zoo_cpu, CompositeExplicitAutograd, m) {
  m.impl("int8_dots", &int8_dots);
}

namespace {

template <typename W>
inline float bias_at(const W* bias, int64_t i) {
  return bias ? static_cast<float>(bias[i]) : 0.0f;
}

// out (B, d) = x * rsqrt(mean(x^2) + eps) * weight, row by row (Llama's RMSNorm, in float32)
template <typename W>
void rms_norm(const float* x, const W* weight, int64_t B, int64_t d, float eps, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    const float* row = x + b * d;
    Vec acc(0.0f);
    int64_t i = 0;
    for (; i + Vec::size() <= d; i += Vec::size()) {
      const Vec v = Vec::loadu(row + i);
      acc = at::vec::fmadd(v, v, acc);
    }
    float sum = sum_lanes(acc);
    for (; i < d; ++i) sum += row[i] * row[i];
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(d) + eps);
    for (i = 0; i < d; ++i) out[b * d + i] = row[i] * inv * static_cast<float>(weight[i]);
  }
}

template <typename W>
const W* ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<W>() : nullptr;
}

struct Shape {
  int64_t B, d, V, H, H_kv, D, groups, n_layers;
};

// In place: the partial softmaxes of `heads` query heads (each max m, sum of exp(score - m),
// then `dim` exp-weighted values) joined with those of more tokens, `more`: both rescaled to
// the larger max, as merge_blocks does.
inline void combine_partials(float* into, const float* more, int64_t heads, int64_t dim) {
  for (int64_t g = 0; g < heads; ++g) {
    float* a = into + g * (dim + 2);
    const float* c = more + g * (dim + 2);
    const float m = std::max(a[0], c[0]);
    const float wa = std::exp(a[0] - m), wc = std::exp(c[0] - m);
    a[0] = m;
    a[1] = a[1] * wa + c[1] * wc;
    for (int64_t i = 2; i < dim + 2; ++i) a[i] = a[i] * wa + c[i] * wc;
  }
}

template <typename W>
at::Tensor step(const at::Tensor& ids, const std::vector<std::optional<at::Tensor>>& layers,
                const std::vector<std::optional<at::Tensor>>& globals,
                const std::vector<at::Tensor>& kv, const int64_t* tables, int64_t table_width,
                const std::vector<int64_t>& lengths, const std::vector<int64_t>& positions,
                const Shape& s, float eps, bool swiglu,
                bool greedy, const std::vector<std::optional<at::Tensor>>& scales,
                const std::vector<std::optional<at::Tensor>>& zeros) {
  const int64_t B = s.B, d = s.d, V = s.V, H = s.H, H_kv = s.H_kv, D = s.D, G = s.groups;
  const int64_t q_size = H * D, kv_size = H_kv * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t* token = ids.data_ptr<int64_t>();

  // rotary: cos and sin of each layer's and row's position (lengths and positions are (layer,
  // row) flat), as zoo.layers.Rotary: float32 angles position * inv_freq, rounded to the
  // weights' dtype; a position equal to the previous layer's or row's is copied, not recomputed
  const bool rotary = globals[kInvFreq].has_value() && globals[kInvFreq]->defined();
  std::vector<float> cos_sin(rotary ? s.n_layers * B * D : 0);
  if (rotary) {
    const float* inv_freq = globals[kInvFreq]->data_ptr<float>();
    for (int64_t lb = 0; lb < s.n_layers * B; ++lb) {
      float* cs = cos_sin.data() + lb * D;
      const int64_t same = lb >= B && positions[lb] == positions[lb - B]   ? B
                           : lb % B > 0 && positions[lb] == positions[lb - 1] ? 1
                                                                              : 0;
      if (same > 0) {
        std::copy(cs - same * D, cs - same * D + D, cs);
        continue;
      }
      for (int64_t i = 0; i < D / 2; ++i) {
        const float angle = static_cast<float>(positions[lb]) * inv_freq[i];
        cs[i] = static_cast<float>(static_cast<W>(std::cos(angle)));
        cs[D / 2 + i] = static_cast<float>(static_cast<W>(std::sin(angle)));
      }
    }
  }

  // every linear's storage, by its index in layers then globals (scales empty: all float)
  const int64_t n_entries = static_cast<int64_t>(layers.size() + globals.size());
  std::vector<Matrix<W>> matrices(n_entries);
  bool any_int4 = false;
  for (int64_t index = 0; index < n_entries; ++index) {
    const bool is_global = index >= static_cast<int64_t>(layers.size());
    const int64_t field = is_global ? index - layers.size() : index % kLayerFields;
    const bool linear = is_global ? field == kHead
                                  : (field == kQ || field == kK || field == kV || field == kO ||
                                     field == kGate || field == kUp || field == kDown);
    const auto& weight = is_global ? globals[field] : layers[index];
    if (!linear || !weight.has_value() || !weight->defined()) continue;
    Matrix<W>& m = matrices[index];
    if (scales.empty() || !scales[index].has_value() || !scales[index]->defined()) {
      m.data = weight->data_ptr<W>();
      continue;
    }
    const bool int4 = weight->scalar_type() == at::kByte;
    const int64_t K = weight->size(1) * (int4 ? 2 : 1);
    m.storage = int4 ? Storage::kInt4 : Storage::kInt8;
    m.data = weight->data_ptr();
    m.scale = scales[index]->data_ptr<W>();
    m.zero = int4 ? zeros[index]->data_ptr<W>() : nullptr;
    m.group = K / scales[index]->size(1);
    any_int4 = any_int4 || int4;
  }
  auto layer_matrix = [&](int64_t l, int field) -> const Matrix<W>& {
    return matrices[l * kLayerFields + field];
  };

  // Attention's tasks: every (chunk of a row's tokens, KV head). A chunk is at most kBlock
  // tokens: part of one cache block where blocks hold more, else whole blocks (joined inside
  // the task, so the merge that every thread runs sees few partials). chunk_first[l][b] is row
  // b's first chunk in layer l (B + 1 entries), chunk_row[l] the row of each chunk.
  std::vector<std::vector<int64_t>> chunk_first(s.n_layers), chunk_row(s.n_layers);
  int64_t hidden = 0, max_chunks = 1;
  for (int64_t l = 0; l < s.n_layers; ++l) {
    if (layers[l * kLayerFields + kGate].has_value() && layers[l * kLayerFields + kGate]->defined())
      hidden = std::max(hidden, layers[l * kLayerFields + kGate]->size(0));
    const int64_t S = kv[2 * l + 1].size(2);
    const int64_t chunks_per_block = (S + kBlock - 1) / kBlock;
    const int64_t chunk_tokens = S >= kBlock ? kBlock : kBlock / S * S;
    chunk_first[l].assign(B + 1, 0);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t L = lengths[l * B + b] + 1;
      const int64_t n = S >= kBlock ? L / S * chunks_per_block + (L % S + kBlock - 1) / kBlock
                                    : (L + chunk_tokens - 1) / chunk_tokens;
      chunk_first[l][b + 1] = chunk_first[l][b] + n;
      chunk_row[l].insert(chunk_row[l].end(), n, b);
    }
    max_chunks = std::max(max_chunks, chunk_first[l][B]);
  }
  const int threads_wanted = std::max(1, at::get_num_threads());
  // shared: the residual stream, the projections, the FFN's hidden rows, the attention
  // partials; per thread: its own normalised copy of x, attention output and score block
  std::vector<float> x(B * d), q(B * q_size), k(B * kv_size), v(B * kv_size);
  std::vector<float> gate(B * hidden), up(B * hidden);
  std::vector<float> partial(max_chunks * H * (D + 2));
  std::vector<float> piece_partials(threads_wanted * G * (D + 2));
  std::vector<float> normed(threads_wanted * B * d), attended(threads_wanted * B * q_size);
  std::vector<float> scores(threads_wanted * std::min<int64_t>(G, 4) * kBlock);
  std::vector<std::pair<float, int64_t>> best(threads_wanted * B);
  const int64_t widest = std::max({d, q_size, hidden});
  const int64_t scratch_floats = matrix_scratch_floats(B, widest);
  std::vector<float> int4_inputs(scales.empty() ? 0 : threads_wanted * scratch_floats);

  at::Tensor out = greedy ? at::empty({B}, ids.options())
                          : at::empty({B, V}, globals[kEmbed]->options());
  W* logits = greedy ? nullptr : out.data_ptr<W>();

#pragma omp parallel num_threads(threads_wanted)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    float* xn = normed.data() + tid * B * d;
    float* att = attended.data() + tid * B * q_size;
    float* my_scores = scores.data() + tid * std::min<int64_t>(G, 4) * kBlock;
    float* my_piece = piece_partials.data() + tid * G * (D + 2);
    float* work = scales.empty() ? nullptr : int4_inputs.data() + tid * scratch_floats;

#pragma omp single
    {
      const W* embed = ptr<W>(globals[kEmbed]);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < d; ++i) x[b * d + i] = static_cast<float>(embed[token[b] * d + i]);
      if (const W* norm = ptr<W>(globals[kEmbedNorm])) {
        rms_norm(x.data(), norm, B, d, eps, xn);
        std::copy(xn, xn + B * d, x.data());
      }
    }  // (a barrier)

    for (int64_t l = 0; l < s.n_layers; ++l) {
      const auto* f = layers.data() + l * kLayerFields;
      const int64_t* length = lengths.data() + l * B;  // each row's cached tokens before this
      W* k_cache = kv[2 * l].data_ptr<W>();
      W* v_cache = kv[2 * l + 1].data_ptr<W>();
      const int64_t S = kv[2 * l + 1].size(2);  // tokens a cache block

      // q, k, v = projections of rms(x); every thread normalises x itself (d floats: cheaper
      // than a barrier)
      rms_norm(x.data(), ptr<W>(f[kMixerNorm]), B, d, eps, xn);
      const std::pair<int, int64_t> projections[3] = {{kQ, q_size}, {kK, kv_size}, {kV, kv_size}};
      float* targets[3] = {q.data(), k.data(), v.data()};
      for (int p = 0; p < 3; ++p) {
        const int field = projections[p].first;
        const int64_t n = projections[p].second;
        const W* bias = ptr<W>(f[field + 1]);
        float* y = targets[p];
        const auto [r0, r1] = share(n, tid, nt, 4);
        rows_times(layer_matrix(l, field), d, xn, B, r0, r1, work,
                   [&](int64_t b, int64_t r, float dot) {
          y[b * n + r] = dot + bias_at(bias, r);
        });
      }
#pragma omp barrier
      // rotary on q (scaled for the scores) and k; k and v into the row's slot length[b]
      {
        const auto [t0, t1] = share(B * (H + H_kv), tid, nt, 1);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t / (H + H_kv), h = t % (H + H_kv);
          const float* cs = rotary ? cos_sin.data() + (l * B + b) * D : nullptr;
          const bool is_query = h < H;
          float* head = is_query ? q.data() + b * q_size + h * D
                                 : k.data() + b * kv_size + (h - H) * D;
          if (cs) {
            float rotated[kMaxHeadDim];
            for (int64_t i = 0; i < D / 2; ++i) {
              rotated[i] = head[i] * cs[i] - head[D / 2 + i] * cs[D / 2 + i];
              rotated[D / 2 + i] = head[D / 2 + i] * cs[i] + head[i] * cs[D / 2 + i];
            }
            std::copy(rotated, rotated + D, head);
          }
          if (is_query) {
            for (int64_t i = 0; i < D; ++i) head[i] *= scale;
            continue;
          }
          const int64_t kv_head = h - H;
          const int64_t block = tables[b * table_width + length[b] / S], offset = length[b] % S;
          W* k_slot = k_cache + ((block * H_kv + kv_head) * D) * S + offset;
          W* v_slot = v_cache + ((block * H_kv + kv_head) * S + offset) * D;
          const float* v_head = v.data() + b * kv_size + kv_head * D;
          for (int64_t i = 0; i < D; ++i) {
            k_slot[i * S] = static_cast<W>(head[i]);
            v_slot[i] = static_cast<W>(v_head[i]);
          }
        }
      }
#pragma omp barrier
      // attention: every (chunk of a row's tokens, KV head) is a task; a chunk's pieces (one
      // per cache block it spans) are joined into its partial here
      const std::vector<int64_t>& first = chunk_first[l];
      {
        const int64_t chunks_per_block = (S + kBlock - 1) / kBlock;
        const int64_t chunk_tokens = S >= kBlock ? kBlock : kBlock / S * S;
        const auto [t0, t1] = share(first[B] * H_kv, tid, nt, 1);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t chunk = t / H_kv, h = t % H_kv, b = chunk_row[l][chunk];
          const int64_t j = chunk - first[b], L = length[b] + 1;
          int64_t token = S >= kBlock ? j / chunks_per_block * S + j % chunks_per_block * kBlock
                                      : j * chunk_tokens;
          int64_t left = std::min({chunk_tokens, L - token,
                                   S >= kBlock ? S - token % S : chunk_tokens});
          float* out = partial.data() + t * G * (D + 2);
          for (bool first_piece = true; left > 0; first_piece = false) {
            const int64_t block = tables[b * table_width + token / S], offset = token % S;
            const int64_t n = std::min(left, S - offset);
            attend_block(q.data() + (b * H + h * G) * D,
                         k_cache + (block * H_kv + h) * D * S + offset, S,
                         v_cache + ((block * H_kv + h) * S + offset) * D, D, n, G, D, my_scores,
                         first_piece ? out : my_piece);
            if (!first_piece) combine_partials(out, my_piece, G, D);
            token += n;
            left -= n;
          }
        }
      }
#pragma omp barrier
      // every thread merges all heads into its own copy (no barrier), then its rows of o
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t hg = 0; hg < H; ++hg) {  // query head h * G + g of KV head h
          merge_blocks(partial.data() + (first[b] * H + hg) * (D + 2), first[b + 1] - first[b],
                       H * (D + 2), D, att + (b * H + hg) * D);
        }
      }
      {
        const W* bias = ptr<W>(f[kOBias]);
        const auto [r0, r1] = share(d, tid, nt, 4);
        rows_times(layer_matrix(l, kO), q_size, att, B, r0, r1, work,
                   [&](int64_t b, int64_t r, float dot) {
          x[b * d + r] += dot + bias_at(bias, r);
        });
      }
#pragma omp barrier
      if (layer_matrix(l, kGate).data == nullptr) continue;  // a layer without an FFN
      const int64_t n = f[kGate]->size(0);
      rms_norm(x.data(), ptr<W>(f[kFfnNorm]), B, d, eps, xn);
      const auto [r0, r1] = share(n, tid, nt, 4);
      const W* gate_bias = ptr<W>(f[kGateBias]);
      rows_times(layer_matrix(l, kGate), d, xn, B, r0, r1, work,
                 [&](int64_t b, int64_t r, float dot) {
        gate[b * n + r] = dot + bias_at(gate_bias, r);
      });
      if (swiglu) {
        const W* up_bias = ptr<W>(f[kUpBias]);
        rows_times(layer_matrix(l, kUp), d, xn, B, r0, r1, work,
                   [&](int64_t b, int64_t r, float dot) {
          up[b * n + r] = dot + bias_at(up_bias, r);
        });
      }
      // the activation over this thread's rows, in vectors: silu(g) * u or gelu(g)
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t i = r0; i < r1; i += Vec::size()) {
          const int64_t count = std::min<int64_t>(Vec::size(), r1 - i);
          const Vec g = Vec::loadu(gate.data() + b * n + i, count);
          Vec a;
          if (swiglu) {
            a = g / (Vec(1.0f) + g.neg().exp()) * Vec::loadu(up.data() + b * n + i, count);
          } else {
            a = Vec(0.5f) * g * (Vec(1.0f) + (g * Vec(0.70710678118654752f)).erf());
          }
          a.store(gate.data() + b * n + i, count);
        }
      }
#pragma omp barrier
      {
        const W* bias = ptr<W>(f[kDownBias]);
        const auto [o0, o1] = share(d, tid, nt, 4);
        rows_times(layer_matrix(l, kDown), n, gate.data(), B, o0, o1, work,
                   [&](int64_t b, int64_t r, float dot) { x[b * d + r] += dot + bias_at(bias, r); });
      }
#pragma omp barrier
    }

    // the head: logits, or each thread's best token of its rows
    rms_norm(x.data(), ptr<W>(globals[kFinalNorm]), B, d, eps, xn);
    const auto [r0, r1] = share(V, tid, nt, 4);
    auto* mine = best.data() + tid * B;
    for (int64_t b = 0; b < B; ++b) mine[b] = {-std::numeric_limits<float>::infinity(), -1};
    rows_times(matrices[layers.size() + kHead], d, xn, B, r0, r1, work,
               [&](int64_t b, int64_t r, float dot) {
      const W logit = static_cast<W>(dot);
      if (!greedy) {
        logits[b * V + r] = logit;
      } else if (static_cast<float>(logit) > mine[b].first || mine[b].second < 0) {
        mine[b] = {static_cast<float>(logit), r};  // rows come in order: ties keep the first
      }
    });
  }

  if (greedy) {  // threads hold increasing rows: the first best of the first thread wins ties
    int64_t* picked = out.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      std::pair<float, int64_t> top = {-std::numeric_limits<float>::infinity(), -1};
      for (int t = 0; t < threads_wanted; ++t) {
        const auto& candidate = best[t * B + b];
        if (candidate.second >= 0 && (top.second < 0 || candidate.first > top.first))
          top = candidate;
      }
      picked[b] = top.second;
    }
  }
  return out;
}

at::Tensor transformer_decode_step(
    const at::Tensor& ids, const std::vector<std::optional<at::Tensor>>& layers,
    const std::vector<std::optional<at::Tensor>>& globals, const std::vector<at::Tensor>& kv,
    const at::Tensor& block_tables, const at::Tensor& lengths, const at::Tensor& positions,
    int64_t n_heads, int64_t n_kv_heads,
    int64_t head_dim, double eps, c10::string_view activation, bool greedy,
    const std::vector<std::optional<at::Tensor>>& scales,
    const std::vector<std::optional<at::Tensor>>& zeros) {
  const char* op = "transformer_decode_step: ";
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              op, "ids must be a contiguous (B,) int64 tensor");
  TORCH_CHECK(globals.size() == kGlobalFields, op, "expected ", int(kGlobalFields), " globals");
  TORCH_CHECK(layers.size() % kLayerFields == 0, op, "layer_weights must hold ",
              int(kLayerFields), " entries per layer");
  const int64_t n_layers = layers.size() / kLayerFields;
  TORCH_CHECK(kv.size() == 2 * n_layers, op, "kv must hold 2 entries per layer");
  TORCH_CHECK(activation == "swiglu" || activation == "gelu", op,
              "activation must be 'swiglu' or 'gelu'");
  const bool swiglu = activation == "swiglu";
  const at::Tensor& embed = *globals[kEmbed];
  const at::Tensor& head = *globals[kHead];
  const auto dtype = embed.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              "weights must be float32, bfloat16 or float16");
  Shape s{ids.size(0), embed.size(1), head.size(0), n_heads, n_kv_heads, head_dim,
          n_heads / std::max<int64_t>(n_kv_heads, 1), n_layers};
  TORCH_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0, op,
              "n_heads must be a multiple of n_kv_heads");
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= kMaxHeadDim, op, "head_dim must be even and <= ",
              kMaxHeadDim);
  TORCH_CHECK(s.B > 0, op, "empty batch");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == s.B &&
                  block_tables.size(1) > 0 && block_tables.scalar_type() == at::kLong &&
                  block_tables.is_contiguous(),
              op, "block_tables must be a contiguous (B, W) int64 tensor with B = ", s.B,
              " and W >= 1, got ", block_tables.sizes(), " ", block_tables.scalar_type());
  // lengths and positions: (n_layers, B), or (B,) for every layer; read through their strides
  auto per_layer_row = [&](const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.scalar_type() == at::kLong &&
                    ((t.dim() == 2 && t.size(0) == n_layers && t.size(1) == s.B) ||
                     (t.dim() == 1 && t.size(0) == s.B)),
                op, what, " must be an int64 tensor (n_layers, B) = (", n_layers, ", ", s.B,
                ") or (B,), got ", t.sizes(), " ", t.scalar_type());
    const int64_t layer_stride = t.dim() == 2 ? t.stride(0) : 0, row_stride = t.stride(-1);
    const int64_t* data = t.data_ptr<int64_t>();
    std::vector<int64_t> flat(n_layers * s.B);
    for (int64_t l = 0; l < n_layers; ++l)
      for (int64_t b = 0; b < s.B; ++b) flat[l * s.B + b] = data[l * layer_stride + b * row_stride];
    return flat;
  };
  const std::vector<int64_t> lengths_v = per_layer_row(lengths, "lengths");
  const std::vector<int64_t> positions_v = per_layer_row(positions, "positions");
  const int64_t table_width = block_tables.size(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();

  // checked every step: shapes compared in place, nothing allocated
  auto check_weight = [&](const std::optional<at::Tensor>& t, c10::IntArrayRef shape,
                          const char* what, int64_t layer) {
    TORCH_CHECK(t.has_value() && t->defined(), op, what, " of layer ", layer, " is missing");
    TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous() && t->device().is_cpu() &&
                    t->sizes() == shape,
                op, what, " of layer ", layer, " must be a contiguous CPU tensor of ", dtype,
                " shaped ", shape, ", got ", t->sizes(), " ", t->scalar_type());
  };
  // a linear's weight: a float matrix (N, K), or quantised codes where `scales` has an entry
  TORCH_CHECK(scales.size() == zeros.size() &&
                  (scales.empty() || scales.size() == layers.size() + globals.size()),
              op, "scales and zeros must both be empty or hold one entry per layer weight and "
              "global (", layers.size() + globals.size(), "), got ", scales.size(), " and ",
              zeros.size());
  auto is_set = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
  auto check_linear = [&](int64_t index, int64_t n, int64_t k, const char* what, int64_t layer) {
    const bool is_global = index >= static_cast<int64_t>(layers.size());
    const auto& t = is_global ? globals[index - layers.size()] : layers[index];
    if (scales.empty() || !is_set(scales[index])) {
      TORCH_CHECK(scales.empty() || !is_set(zeros[index]), op, what, " of layer ", layer,
                  " has zeros but no scales");
      check_weight(t, {n, k}, what, layer);
      return;
    }
    TORCH_CHECK(is_set(t), op, what, " of layer ", layer, " is missing");
    const at::Tensor& codes = *t;
    const at::Tensor& scale = *scales[index];
    const bool int4 = codes.scalar_type() == at::kByte;
    TORCH_CHECK(int4 || codes.scalar_type() == at::kChar, op, what, " of layer ", layer,
                " has scales, so its codes must be int8 (int8) or uint8 (int4, two a byte); got ",
                codes.scalar_type());
    const std::array<int64_t, 2> shape{n, int4 ? k / 2 : k};
    TORCH_CHECK(codes.is_contiguous() && codes.device().is_cpu() && (!int4 || k % 2 == 0) &&
                    codes.sizes() == c10::IntArrayRef(shape),
                op, what, " of layer ", layer, ": codes must be a contiguous CPU tensor shaped ",
                c10::IntArrayRef(shape), ", got ", codes.sizes());
    const int64_t groups = scale.dim() == 2 ? scale.size(1) : 0;
    TORCH_CHECK(scale.scalar_type() == dtype && scale.is_contiguous() && groups > 0 &&
                    scale.size(0) == n && k % groups == 0,
                op, what, " of layer ", layer, ": scale must be a contiguous ", dtype,
                " tensor (", n, ", groups) with groups dividing ", k, ", got ", scale.sizes(),
                " ", scale.scalar_type());
    const int64_t group = k / groups;
    const int64_t quantum = (int4 ? 2 : 1) * Vec::size();  // codes turned to floats at a time
    TORCH_CHECK(group % quantum == 0 || (!int4 && group == k), op, what, " of layer ", layer,
                ": groups of ", group, " inputs; this build takes ", int4 ? "int4" : "int8",
                " groups of a multiple of ", quantum, int4 ? "" : " (or per output channel)");
    if (int4) {
      TORCH_CHECK(is_set(zeros[index]) && zeros[index]->scalar_type() == dtype &&
                      zeros[index]->is_contiguous() && zeros[index]->sizes() == scale.sizes(),
                  op, what, " of layer ", layer, ": int4 needs a contiguous ", dtype,
                  " zero shaped as its scale ", scale.sizes());
    } else {
      TORCH_CHECK(!is_set(zeros[index]), op, what, " of layer ", layer, ": int8 takes no zero");
    }
  };
  auto check_bias = [&](const std::optional<at::Tensor>& t, int64_t n, const char* what,
                        int64_t layer) {
    if (t.has_value() && t->defined()) check_weight(t, {n}, what, layer);
  };
  const int64_t d = s.d, q_size = n_heads * head_dim, kv_size = n_kv_heads * head_dim;
  check_weight(globals[kEmbed], {embed.size(0), d}, "embed", -1);
  check_linear(static_cast<int64_t>(layers.size()) + kHead, s.V, d, "head", -1);
  check_weight(globals[kFinalNorm], {d}, "final norm", -1);
  check_bias(globals[kEmbedNorm], d, "embed norm", -1);
  if (globals[kInvFreq].has_value() && globals[kInvFreq]->defined()) {
    const at::Tensor& f = *globals[kInvFreq];
    TORCH_CHECK(f.scalar_type() == at::kFloat && f.is_contiguous() &&
                    f.numel() == head_dim / 2, op, "inv_freq must be float32 (head_dim / 2,)");
  }
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t id = ids.data_ptr<int64_t>()[b];
    TORCH_CHECK(id >= 0 && id < embed.size(0), op, "token id ", id, " is outside the embedding's ",
                embed.size(0), " rows");
  }
  for (int64_t l = 0; l < n_layers; ++l) {
    const auto* f = layers.data() + l * kLayerFields;
    check_weight(f[kMixerNorm], {d}, "mixer norm", l);
    const int64_t base = l * kLayerFields;
    check_linear(base + kQ, q_size, d, "q_proj", l);
    check_linear(base + kK, kv_size, d, "k_proj", l);
    check_linear(base + kV, kv_size, d, "v_proj", l);
    check_linear(base + kO, d, q_size, "o_proj", l);
    check_bias(f[kQBias], q_size, "q bias", l);
    check_bias(f[kKBias], kv_size, "k bias", l);
    check_bias(f[kVBias], kv_size, "v bias", l);
    check_bias(f[kOBias], d, "o bias", l);
    if (f[kGate].has_value() && f[kGate]->defined()) {
      const int64_t n = f[kGate]->size(0);
      check_weight(f[kFfnNorm], {d}, "ffn norm", l);
      check_linear(base + kGate, n, d, swiglu ? "gate_proj" : "fc_in", l);
      check_linear(base + kDown, d, n, swiglu ? "down_proj" : "fc_out", l);
      check_bias(f[kGateBias], n, "gate bias", l);
      check_bias(f[kDownBias], d, "down bias", l);
      if (swiglu) {
        check_linear(base + kUp, n, d, "up_proj", l);
        check_bias(f[kUpBias], n, "up bias", l);
      }
    }
    // the cache: N blocks of S tokens, keys (N, H_kv, D, S) and values (N, H_kv, S, D)
    const bool four = kv[2 * l + 1].dim() == 4;
    const int64_t n_blocks = four ? kv[2 * l + 1].size(0) : 0;
    const int64_t S = four ? kv[2 * l + 1].size(2) : 0;
    for (int which = 0; which < 2; ++which) {
      const at::Tensor& cache = kv[2 * l + which];
      const std::array<int64_t, 4> shape =
          which == 0 ? std::array<int64_t, 4>{n_blocks, n_kv_heads, head_dim, S}
                     : std::array<int64_t, 4>{n_blocks, n_kv_heads, S, head_dim};
      TORCH_CHECK(cache.scalar_type() == dtype && cache.is_contiguous() && S > 0 &&
                      n_blocks > 0 && cache.sizes() == c10::IntArrayRef(shape),
                  op, which == 0 ? "key" : "value", " cache of layer ", l,
                  " must be contiguous, of the weights' dtype, shaped ", c10::IntArrayRef(shape),
                  " (blocks, H_kv, ", which == 0 ? "D, S)" : "S, D)", "; got ", cache.sizes());
    }
    for (int64_t b = 0; b < s.B; ++b) {
      const int64_t length = lengths_v[l * s.B + b];
      TORCH_CHECK(length >= 0 && length < table_width * S, op, "layer ", l, "'s cache holds ",
                  length, " of ", table_width * S, " slots: no room for the new token (row ", b,
                  "; reserve first)");
      for (int64_t j = 0; j <= length / S; ++j) {
        const int64_t block = tables[b * table_width + j];
        TORCH_CHECK(block >= 0 && block < n_blocks, op, "block_tables[", b, ", ", j, "] = ",
                    block, " is outside layer ", l, "'s ", n_blocks, " cache blocks");
      }
    }
  }

  const float eps_f = static_cast<float>(eps);
  if (dtype == at::kFloat)
    return step<float>(ids, layers, globals, kv, tables, table_width, lengths_v, positions_v, s,
                       eps_f, swiglu, greedy, scales, zeros);
  if (dtype == at::kBFloat16)
    return step<at::BFloat16>(ids, layers, globals, kv, tables, table_width, lengths_v,
                              positions_v, s, eps_f, swiglu, greedy, scales, zeros);
  return step<at::Half>(ids, layers, globals, kv, tables, table_width, lengths_v, positions_v, s,
                        eps_f, swiglu, greedy, scales, zeros);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zoo_cpu, m) {
  m.def(
      "transformer_decode_step(Tensor ids, Tensor?[] layer_weights, Tensor?[] globals, "
      "Tensor(a!)[] kv, Tensor block_tables, Tensor lengths, Tensor positions, int n_heads, "
      "int n_kv_heads, "
      "int head_dim, float eps, str activation, bool greedy, Tensor?[] scales, Tensor?[] zeros) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(zoo_cpu, CPU, m) {
  m.impl("transformer_decode_step", &transformer_decode_step);
}
