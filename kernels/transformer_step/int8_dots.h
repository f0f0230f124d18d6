// Integer dot products for the decode step's quantised linears (AVX-512 VNNI), as llama.cpp
// computes its Q4/Q8 products: the input is quantised once per product to int8 in blocks of 32
// (one float scale a block: scale = max|x| / 127, code = round(x / scale), llama.cpp's Q8
// activations) and each row of codes is dotted with it by vpdpbusd (u8 x s8 -> s32, 64 products
// an instruction), where turning each code into a float took 3-4 instructions per 16 codes and
// left the step compute bound.
//
// The result is exactly dequantise(W) . dequantise(quantise(x)) up to float32 rounding:
//   int8 codes c (signed), scale s per group:  sum_b s_g(b) * xs_b * (c . xq)_b, where the
//     codes enter vpdpbusd as unsigned c + 128 and each lane starts from -128 * (the sum of its
//     four input codes), so (c + 128) . xq - 128 * sum(xq) is exact in int32;
//   int4 codes u (0..15), scale s and zero z per group: sum_b s_g(b) * xs_b * (u . xq)_b
//     + sum_g z_g * sum_{b in g} xs_b * sum(xq_b)  (the zero times the dequantised input's sum).
// A chunk of int4 codes (64 bytes, 128 inputs: even inputs in the low nibbles, odd ones in the
// high) meets the input's codes stored chunk by chunk as the even entries then the odd ones, so
// the nibbles need no shuffle; each int32 lane then sums inputs of one block of 32.
//
// Compiled after ../decode_attention/attend.h and before cpu_kernel.cpp (one text). Built only
// with AVX-512 (kernels/cpu_build.py's flags); these functions are compiled for VNNI as well and
// run only where the CPU has it (checked at run time), else the float path stands in.

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__) && !defined(__clang__)
#define ZOO_INT8_DOTS 1
#endif

namespace zoo_int8 {

constexpr int64_t kQuantBlock = 32;  // inputs per activation scale (llama.cpp's Q8 block)
constexpr int64_t kMaxRows = 4;      // inputs a row of codes is dotted with per pass

// Whether the integer path takes a matrix of int8 (int4 = false) or int4 codes with K inputs
// in groups of `group`: each group must hold whole activation blocks that one lane pattern of
// scales covers (int8: groups of 32, of a multiple of 64 or per channel; int4: 32, 64 or a
// multiple of 128).
inline bool takes(bool int4, int64_t K, int64_t group) {
  if (K % kQuantBlock != 0 || group % kQuantBlock != 0) return false;
  return int4 ? (group == 32 || group == 64 || group % 128 == 0)
              : (group == 32 || group % 64 == 0 || group == K);
}

inline bool cpu_has_vnni() {
#if defined(ZOO_INT8_DOTS)
  static const bool has = __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

// -1 until first read: ZOO_INT8_DOTS=0 in the environment turns the integer path off
inline std::atomic<int>& setting() {
  static std::atomic<int> value{-1};
  return value;
}

// Whether quantised products use the integer path (the build and CPU have it, and it is on)
inline bool enabled() {
  int value = setting().load(std::memory_order_relaxed);
  if (value < 0) {
    const char* env = std::getenv("ZOO_INT8_DOTS");
    value = cpu_has_vnni() && !(env != nullptr && std::strcmp(env, "0") == 0) ? 1 : 0;
    setting().store(value, std::memory_order_relaxed);
  }
  return value == 1;
}

// Turn the integer path on or off (on only where it exists); returns whether it was on
inline bool set_enabled(bool on) {
  const bool before = enabled();
  setting().store(on && cpu_has_vnni() ? 1 : 0, std::memory_order_relaxed);
  return before;
}

// One input's quantised form, carved from the caller's scratch (see layout_bytes)
struct Input {
  int8_t* codes;        // int8 layout: K codes in order; int4: chunk by chunk, evens then odds
  float* lane_scales;   // per chunk, 16 lanes: the scale of the block each int32 lane sums
  int32_t* lane_bias;   // int8 only: per chunk, 16 lanes: -128 * the lane's four input codes
  float* group_sums;    // int4 only: per group, sum over its blocks of scale * sum(codes)
};

// Inputs per chunk: one 64-byte register of weight codes
inline int64_t chunk_inputs(bool int4) { return int4 ? 128 : 64; }

// Bytes of scratch one input's quantised form takes (64-byte aligned pieces, padded so that
// a chunk's loads never leave it)
inline int64_t layout_bytes(int64_t K) {
  const int64_t chunks = (K + 63) / 64;  // the most chunks (int8's)
  const int64_t padded = chunks * 64 + 128;
  return 2 * padded + 2 * chunks * 64 + ((K / kQuantBlock) * 4 + 63) / 64 * 64;
}

// Floats of scratch a thread needs to quantise B inputs of up to `widest` entries
inline int64_t scratch_floats(int64_t B, int64_t widest) {
  return (B * layout_bytes(widest) + 64) / static_cast<int64_t>(sizeof(float));
}

#if defined(ZOO_INT8_DOTS)
#pragma GCC push_options
#pragma GCC target("avx512vnni")

// 4 (at most `n`) consecutive scales or zeros of the weights' dtype as floats in lanes 0..3
template <typename W>
inline __m128 four_floats(const W* p, int64_t n) {
  const __mmask8 mask = static_cast<__mmask8>((1u << std::min<int64_t>(n, 4)) - 1);
  if constexpr (std::is_same_v<W, float>) {
    return _mm_maskz_loadu_ps(mask, p);
  } else if constexpr (std::is_same_v<W, at::Half>) {
    return _mm_cvtph_ps(_mm_maskz_loadu_epi16(mask, p));
  } else {  // bfloat16: the high half of a float32
    const __m128i bits = _mm_cvtepu16_epi32(_mm_maskz_loadu_epi16(mask, p));
    return _mm_castsi128_ps(_mm_slli_epi32(bits, 16));
  }
}

// Quantise x (K) into `in` for int8 or int4 codes with groups of `group` inputs (int4's
// group sums need it). Blocks of all-zero inputs get scale 0 and codes 0.
inline void quantize(const float* x, int64_t K, bool int4, int64_t group, int8_t* natural,
                     const Input& in) {
  const int64_t blocks = K / kQuantBlock;
  const int64_t chunk = chunk_inputs(int4), lanes_per_block = 16 * kQuantBlock / chunk;
  const int64_t chunks = (K + chunk - 1) / chunk;
  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  float group_sum = 0.0f;  // scale * sum(codes) of the current group's blocks so far
  std::memset(in.lane_scales, 0, chunks * 16 * sizeof(float));
  for (int64_t j = 0; j < blocks; ++j) {
    const __m512 v0 = _mm512_loadu_ps(x + j * kQuantBlock);
    const __m512 v1 = _mm512_loadu_ps(x + j * kQuantBlock + 16);
    const float amax = _mm512_reduce_max_ps(
        _mm512_max_ps(_mm512_and_ps(v0, sign_off), _mm512_and_ps(v1, sign_off)));
    const float scale = amax / 127.0f;
    const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
    // vcvtps2dq rounds to nearest even, as torch.round
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inverse)));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inverse)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(natural + j * kQuantBlock), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(natural + j * kQuantBlock + 16),
                     _mm512_cvtepi32_epi8(q1));
    const int64_t lane0 = (j * kQuantBlock / chunk) * 16 + (j * kQuantBlock % chunk) / (chunk / 16);
    for (int64_t l = 0; l < lanes_per_block; ++l) in.lane_scales[lane0 + l] = scale;
    if (int4) {
      group_sum += scale * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
      if ((j + 1) * kQuantBlock % group == 0) {
        in.group_sums[(j + 1) * kQuantBlock / group - 1] = group_sum;
        group_sum = 0.0f;
      }
    }
  }
  const int64_t padded = chunks * chunk + 64;
  if (!int4) {
    std::memcpy(in.codes, natural, K);
    std::memset(in.codes + K, 0, padded - K);
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i codes = _mm512_loadu_si512(in.codes + c * chunk);
      const __m512i lane_sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, codes);
      _mm512_storeu_si512(in.lane_bias + c * 16, _mm512_slli_epi32(
          _mm512_sub_epi32(_mm512_setzero_si512(), lane_sums), 7));
    }
    return;
  }
  std::memset(in.codes, 0, padded);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * chunk, half = std::min(chunk, K - begin) / 2;
    int8_t* out = in.codes + begin;
    for (int64_t i = 0; i < half; ++i) {
      out[i] = natural[begin + 2 * i];
      out[half + i] = natural[begin + 2 * i + 1];
    }
  }
}

// Rows r of int8 codes (N, K) with scales (N, K / group) dotted with NB quantised inputs:
// out[b] = dequantise(row) . dequantise(input b)
template <int NB, typename W>
__attribute__((noinline)) void int8_row_dots(const int8_t* row, const W* scale, int64_t K,
                                             int64_t group, const Input* in, float* out) {
  const int64_t chunks = (K + 63) / 64;
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 total[NB];
  for (int b = 0; b < NB; ++b) total[b] = _mm512_setzero_ps();
  if (group == 32) {  // two groups a chunk: lanes 0-7 take the first's scale, 8-15 the second's
    const __m512i pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t bytes = std::min<int64_t>(64, K - c * 64);
      const __m512i codes = bytes == 64 ? _mm512_loadu_si512(row + c * 64)
                                        : _mm512_maskz_loadu_epi8((1ull << bytes) - 1, row + c * 64);
      const __m512i shifted = _mm512_xor_si512(codes, offset);
      const __m512 scales = _mm512_permutexvar_ps(
          pair, _mm512_castps128_ps512(four_floats(scale + 2 * c, bytes / 32)));
      for (int b = 0; b < NB; ++b) {
        const __m512i dots = _mm512_dpbusd_epi32(_mm512_loadu_si512(in[b].lane_bias + c * 16),
                                                 shifted, _mm512_loadu_si512(in[b].codes + c * 64));
        const __m512 part = _mm512_mul_ps(_mm512_cvtepi32_ps(dots),
                                          _mm512_loadu_ps(in[b].lane_scales + c * 16));
        total[b] = _mm512_fmadd_ps(part, scales, total[b]);
      }
    }
  } else {  // groups of whole chunks (or one group, per channel): a group's sum scaled once
    const int64_t groups = K / group;
    for (int64_t g = 0; g < groups; ++g) {
      __m512 acc[NB];
      for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
      for (int64_t i = g * group; i < (g + 1) * group; i += 64) {
        const int64_t bytes = std::min<int64_t>(64, K - i), c = i / 64;
        const __m512i codes = bytes == 64 ? _mm512_loadu_si512(row + i)
                                          : _mm512_maskz_loadu_epi8((1ull << bytes) - 1, row + i);
        const __m512i shifted = _mm512_xor_si512(codes, offset);
        for (int b = 0; b < NB; ++b) {
          const __m512i dots = _mm512_dpbusd_epi32(
              _mm512_loadu_si512(in[b].lane_bias + c * 16), shifted,
              _mm512_loadu_si512(in[b].codes + i));
          acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots),
                                   _mm512_loadu_ps(in[b].lane_scales + c * 16), acc[b]);
        }
      }
      const __m512 s = _mm512_set1_ps(static_cast<float>(scale[g]));
      for (int b = 0; b < NB; ++b) total[b] = _mm512_fmadd_ps(acc[b], s, total[b]);
    }
  }
  for (int b = 0; b < NB; ++b) out[b] = _mm512_reduce_add_ps(total[b]);
}

// The same for a row of int4 codes (N, K / 2) with scales and zeros (N, K / group)
template <int NB, typename W>
__attribute__((noinline)) void int4_row_dots(const uint8_t* row, const W* scale, const W* zero,
                                             int64_t K, int64_t group, const Input* in,
                                             float* out) {
  const int64_t chunks = (K + 127) / 128, groups = K / group;
  const __m512i low_nibble = _mm512_set1_epi8(0x0F);
  // lane l sums inputs of the chunk's block l / 4, which lies in the chunk's group l / 4
  // (groups of 32), l / 8 (of 64) or 0 (of a multiple of 128)
  const __m512i spread = group == 32
      ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
      : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  __m512 total[NB];
  for (int b = 0; b < NB; ++b) total[b] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t inputs = std::min<int64_t>(128, K - c * 128), bytes = inputs / 2;
    const uint8_t* p = row + c * 64;
    const __m512i codes = bytes == 64 ? _mm512_loadu_si512(p)
                                      : _mm512_maskz_loadu_epi8((1ull << bytes) - 1, p);
    const __m512i low = _mm512_and_si512(codes, low_nibble);
    const __m512i high = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low_nibble);
    const int64_t first_group = c * 128 / group;
    const __m512 scales = group % 128 == 0
        ? _mm512_set1_ps(static_cast<float>(scale[first_group]))
        : _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(four_floats(
              scale + first_group, (inputs + group - 1) / group)));
    for (int b = 0; b < NB; ++b) {
      const int8_t* x = in[b].codes + c * 128;
      __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, _mm512_loadu_si512(x));
      dots = _mm512_dpbusd_epi32(dots, high, _mm512_loadu_si512(x + bytes));
      const __m512 part = _mm512_mul_ps(_mm512_cvtepi32_ps(dots),
                                        _mm512_loadu_ps(in[b].lane_scales + c * 16));
      total[b] = _mm512_fmadd_ps(part, scales, total[b]);
    }
  }
  // the zeros' part: zero_g times the group's dequantised input sum
  for (int b = 0; b < NB; ++b) {
    __m512 zero_part = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const int64_t n = std::min<int64_t>(16, groups - g);
      const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
      __m512 z;
      if constexpr (std::is_same_v<W, float>) {
        z = _mm512_maskz_loadu_ps(mask, zero + g);
      } else if constexpr (std::is_same_v<W, at::Half>) {
        z = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, zero + g));
      } else {
        z = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, zero + g)), 16));
      }
      zero_part = _mm512_fmadd_ps(z, _mm512_maskz_loadu_ps(mask, in[b].group_sums + g), zero_part);
    }
    out[b] = _mm512_reduce_add_ps(_mm512_add_ps(total[b], zero_part));
  }
}

#pragma GCC pop_options
#endif  // ZOO_INT8_DOTS

}  // namespace zoo_int8
