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

// Compiled after attend.h (the block helpers; cpu_build.py joins the two texts).

namespace {

using namespace zoo_attend;

// Every (batch row, KV head, block of kBlock tokens) is one task; the cores share them.
// key_scales, value_scales: (B, H_kv, L) float32 per-token scales of an int8 cache, else
// undefined tensors.
template <typename T>
void attend_all(const float* q, const at::Tensor& keys_t, const at::Tensor& values,
                int64_t groups, int64_t n_blocks, float* partial,
                const at::Tensor& key_scales = {}, const at::Tensor& value_scales = {}) {
  const int64_t H_kv = keys_t.size(1), D = keys_t.size(2), L = keys_t.size(3);
  const int64_t H = H_kv * groups;
  const T* k_ptr = keys_t.data_ptr<T>();
  const T* v_ptr = values.data_ptr<T>();
  const float* ks_ptr = key_scales.defined() ? key_scales.data_ptr<float>() : nullptr;
  const float* vs_ptr = value_scales.defined() ? value_scales.data_ptr<float>() : nullptr;
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
                   partial + task * groups * (D + 2),
                   ks_ptr == nullptr ? nullptr
                       : ks_ptr + b * key_scales.stride(0) + h * key_scales.stride(1) + start,
                   vs_ptr == nullptr ? nullptr
                       : vs_ptr + b * value_scales.stride(0) + h * value_scales.stride(1) + start);
    }
  });
}

// each query head's blocks merged: (B, H, D) float32
at::Tensor merge_all(const std::vector<float>& partial, int64_t B, int64_t H_kv, int64_t groups,
                     int64_t n_blocks, int64_t D) {
  at::Tensor out = at::empty({B, H_kv * groups, D}, at::TensorOptions().dtype(at::kFloat));
  float* o_ptr = out.data_ptr<float>();
  const float* p_ptr = partial.data();
  for (int64_t bh = 0; bh < B * H_kv; ++bh) {
    for (int64_t g = 0; g < groups; ++g) {
      // (b, h * groups + g) in (B, H, D); block 0 of that head in the partials
      merge_blocks(p_ptr + (bh * n_blocks * groups + g) * (D + 2), n_blocks,
                   groups * (D + 2), D, o_ptr + (bh * groups + g) * D);
    }
  }
  return out;
}

// q (B, H, D) in float32, times the softmax scale once: what every block of keys is scored with
static std::vector<float> scaled_queries(const at::Tensor& q, double scale) {
  const at::Tensor q_in = q.to(at::kFloat).contiguous();
  std::vector<float> out(q_in.data_ptr<float>(), q_in.data_ptr<float>() + q_in.numel());
  for (float& x : out) x *= static_cast<float>(scale);
  return out;
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
  // per (b, kv head, block, query head of the group): the block's max score, its sum of exps,
  // then the D exp-weighted values
  std::vector<float> q_scaled = scaled_queries(q, scale);
  std::vector<float> partial(B * H_kv * n_blocks * groups * (D + 2));
  float* p_ptr = partial.data();
  if (dtype == at::kFloat) {
    attend_all<float>(q_scaled.data(), keys_t, values, groups, n_blocks, p_ptr);
  } else if (dtype == at::kBFloat16) {
    attend_all<at::BFloat16>(q_scaled.data(), keys_t, values, groups, n_blocks, p_ptr);
  } else {
    attend_all<at::Half>(q_scaled.data(), keys_t, values, groups, n_blocks, p_ptr);
  }

  return merge_all(partial, B, H_kv, groups, n_blocks, D).to(dtype);
}

// q (B, H, D) float; k_codes_t (B, H_kv, D, L) int8 with k_scales (B, H_kv, L) float32, one
// scale per cached token and head; v_codes (B, H_kv, L, D) int8 with v_scales (B, H_kv, L):
// the int8 KV cache (layers/attention.py), read as codes, each dequantised in registers.
at::Tensor decode_attention_int8_cpu(const at::Tensor& q, const at::Tensor& k_codes_t,
                                     const at::Tensor& k_scales, const at::Tensor& v_codes,
                                     const at::Tensor& v_scales, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_codes_t.dim() == 4 && v_codes.dim() == 4 &&
                  k_scales.dim() == 3 && v_scales.dim() == 3,
              "decode_attention_int8: q (B, H, D), k_codes_t (B, H_kv, D, L), k_scales "
              "(B, H_kv, L), v_codes (B, H_kv, L, D), v_scales (B, H_kv, L)");
  TORCH_CHECK(k_codes_t.scalar_type() == at::kChar && v_codes.scalar_type() == at::kChar,
              "decode_attention_int8: codes must be int8");
  TORCH_CHECK(k_scales.scalar_type() == at::kFloat && v_scales.scalar_type() == at::kFloat,
              "decode_attention_int8: scales must be float32");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t H_kv = k_codes_t.size(1), L = k_codes_t.size(3);
  TORCH_CHECK(k_codes_t.size(0) == B && k_codes_t.size(2) == D && v_codes.size(0) == B &&
                  v_codes.size(1) == H_kv && v_codes.size(2) == L && v_codes.size(3) == D &&
                  k_scales.size(0) == B && k_scales.size(1) == H_kv && k_scales.size(2) == L &&
                  v_scales.size(0) == B && v_scales.size(1) == H_kv && v_scales.size(2) == L,
              "decode_attention_int8: codes and scales do not match q's batch, head_dim or "
              "the cache's length");
  TORCH_CHECK(H_kv > 0 && H % H_kv == 0, "decode_attention_int8: H must be a multiple of H_kv");
  TORCH_CHECK(L > 0, "decode_attention_int8: the cache is empty");
  TORCH_CHECK(k_codes_t.stride(3) == 1 && v_codes.stride(3) == 1 && k_scales.stride(2) == 1 &&
                  v_scales.stride(2) == 1,
              "decode_attention_int8: codes and scales need unit stride in their last dim");
  const int64_t groups = H / H_kv;
  const int64_t n_blocks = (L + kBlock - 1) / kBlock;
  std::vector<float> q_scaled = scaled_queries(q, scale);
  std::vector<float> partial(B * H_kv * n_blocks * groups * (D + 2));
  attend_all<int8_t>(q_scaled.data(), k_codes_t, v_codes, groups, n_blocks, partial.data(),
                     k_scales, v_scales);
  return merge_all(partial, B, H_kv, groups, n_blocks, D).to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zoo_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor keys_t, Tensor values, float scale) -> Tensor");
  m.def("decode_attention_int8(Tensor q, Tensor k_codes_t, Tensor k_scales, Tensor v_codes, "
        "Tensor v_scales, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(zoo_cpu, CPU, m) {
  m.impl("decode_attention", &decode_attention_cpu);
  m.impl("decode_attention_int8", &decode_attention_int8_cpu);
}
