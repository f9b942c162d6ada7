// Fused CPU kernels for the xllm:: ops: one pass over memory each, no temporaries, written into
// caller-provided outputs (the planned arena). Rounding follows the reference forms step by step
// (ops/reference.py): in 16-bit dtypes every intermediate the reference materialises is rounded to
// that dtype here too, so the kernels agree with transformers as closely as the composites do.
#include <torch/extension.h>
#include "cpu_replay.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#include <sleef.h>
#endif
#include <type_traits>
#include <vector>

#include "cpu_avx2.h"

namespace {

template <typename T>
inline T round_to(float value) { return static_cast<T>(value); }

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// 16 lanes of float32 or bfloat16 as float, and back (bfloat16 rounded to nearest even, as c10 does).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v)); }
// A float vector rounded to T's precision and widened back (the reference materialises T there).
template <typename T>
inline __m512 round16(__m512 v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
  } else {
    return v;
  }
}
#endif

template <typename T>
void rms_norm_rows(const T* x, const T* weight, T* out, int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * hidden;
      float sum = 0.f;
      for (int64_t i = 0; i < hidden; ++i) {
        float h = static_cast<float>(row[i]);
        sum += h * h;
      }
      float inv = 1.f / std::sqrt(sum / static_cast<float>(hidden) + eps);
      T* dst = out + r * hidden;
      for (int64_t i = 0; i < hidden; ++i) {
        T normed = round_to<T>(static_cast<float>(row[i]) * inv);
        dst[i] = round_to<T>(static_cast<float>(weight[i]) * static_cast<float>(normed));
      }
    }
  });
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void rms_norm_out(torch::Tensor x, torch::Tensor weight, double eps, torch::Tensor out) {
  x = x.contiguous();
  check_rows(out, "out");
  int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_out", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), weight.contiguous().data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), rows, hidden, static_cast<float>(eps));
  });
}

void fused_add_rms_norm_out(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps,
                            torch::Tensor out, torch::Tensor summed) {
  x = x.contiguous();
  residual = residual.contiguous();
  check_rows(out, "out");
  check_rows(summed, "summed");
  int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_add_rms_norm_out", [&] {
    const scalar_t* a = x.data_ptr<scalar_t>();
    const scalar_t* b = residual.data_ptr<scalar_t>();
    scalar_t* s = summed.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) s[i] = round_to<scalar_t>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
    });
    int64_t hidden = x.size(-1);
    rms_norm_rows<scalar_t>(s, weight.contiguous().data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n / hidden, hidden,
                            static_cast<float>(eps));
  });
}

// silu(gate) * up over one row. The float32 and bfloat16 rows take 16 lanes at a time (8 on AVX2) with
// SLEEF's vectorised exp (1 ulp, shipped inside libtorch): at prefill the scalar exp was most of the time
// of every fused elementwise kernel together. Rounding is the reference's: silu(gate) is rounded to the
// dtype before the product, as the composite materialises it.
template <typename T>
void silu_and_mul_row(const T* gate, const T* up, T* dst, int64_t width) {
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {
    for (; i + 16 <= width; i += 16) {
      __m512 g = load16(gate + i), u = load16(up + i);
      __m512 activated = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), Sleef_expf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      store16(dst + i, _mm512_mul_ps(round16<T>(activated), u));
    }
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {  // 8 lanes, SLEEF's AVX2 exp
    const __m256 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= width; i += 8) {
      const __m256 g = xllm_avx2::load8(gate + i), u = xllm_avx2::load8(up + i);
      const __m256 activated = _mm256_div_ps(g, _mm256_add_ps(one, Sleef_expf8_u10avx2(_mm256_sub_ps(_mm256_setzero_ps(), g))));
      xllm_avx2::store8(dst + i, _mm256_mul_ps(xllm_avx2::round8<T>(activated), u));
    }
  }
#endif
  for (; i < width; ++i) {
    float g = static_cast<float>(gate[i]);
    T activated = round_to<T>(g / (1.f + std::exp(-g)));
    dst[i] = round_to<T>(static_cast<float>(activated) * static_cast<float>(up[i]));
  }
}

void silu_and_mul_out(torch::Tensor gate_up, torch::Tensor out) {
  gate_up = gate_up.contiguous();
  check_rows(out, "out");
  int64_t width = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * width);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul_out", [&] {
    const scalar_t* src = gate_up.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_and_mul_row(src + r * 2 * width, src + r * 2 * width + width, dst + r * width, width);
    });
  });
}

template <typename T>
void rotate_rows(const T* x, const T* cos, const T* sin, T* out, int64_t tokens, int64_t heads, int64_t dim,
                 int64_t token_stride, int64_t head_stride) {
  int64_t half = dim / 2;
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + t * dim;
      const T* s = sin + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        const T* src = x + t * token_stride + h * head_stride;
        T* dst = out + (t * heads + h) * dim;
        for (int64_t d = 0; d < dim; ++d) {
          float rotated = d < half ? -static_cast<float>(src[d + half]) : static_cast<float>(src[d - half]);
          T first = round_to<T>(static_cast<float>(src[d]) * static_cast<float>(c[d]));
          T second = round_to<T>(round_to<T>(rotated) * static_cast<float>(s[d]));
          dst[d] = round_to<T>(static_cast<float>(first) + static_cast<float>(second));
        }
      }
    }
  });
}

void rotary_embedding_out(torch::Tensor query, torch::Tensor key, torch::Tensor cos, torch::Tensor sin,
                          torch::Tensor query_out, torch::Tensor key_out) {
  // query [T, H, D] and key [T, Hkv, D] may be views into the merged QKV output (rows strided) or, in MLA,
  // the rotary part of each head (heads strided too): dims must be dense.
  TORCH_CHECK(query.stride(2) == 1, "query dims must be dense");
  TORCH_CHECK(key.stride(2) == 1, "key dims must be dense");
  cos = cos.contiguous();
  sin = sin.contiguous();
  TORCH_CHECK(cos.numel() == query.size(0) * query.size(2) && sin.numel() == cos.numel(), "cos/sin must be [T, 1, D]");
  check_rows(query_out, "query_out");
  check_rows(key_out, "key_out");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "rotary_embedding_out", [&] {
    rotate_rows<scalar_t>(query.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                          query_out.data_ptr<scalar_t>(), query.size(0), query.size(1), query.size(2), query.stride(0),
                          query.stride(1));
    rotate_rows<scalar_t>(key.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                          key_out.data_ptr<scalar_t>(), key.size(0), key.size(1), key.size(2), key.stride(0),
                          key.stride(1));
  });
}

// s[i] = exp(s[i] - shift) over n scores; returns their sum. SLEEF's 16-lane exp where AVX-512 is built.
inline float exp_shifted(float* s, int64_t n, float shift) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  __m512 sum = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_loadu_ps(s + i), _mm512_set1_ps(shift)));
    _mm512_storeu_ps(s + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - shift);
    total += s[i];
  }
  return total;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
inline float sum16(__m512 v) {  // a tree, not _mm512_reduce_add_ps's chain of 16 scalar adds (GCC 12)
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
  quarter = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
}

// One head over its keys for dim = 16 * Vectors, float32 or bfloat16 rows widened exactly: the query and
// the output's sums stay in registers (a sum in memory waits on its own store at every key), scores in
// ``scores`` (``for_each_key(body)`` calls body(i, offset of key i's row)). Scalar, this head's loops were
// the kernel's time: 12 heads (2 of K/V) over 512 keys, bfloat16, 2 threads, 94 -> 24 us; over 33, 8.6 -> 4.6.
template <int Vectors, typename T, typename Keys>
void attend_head(const T* q, const T* keys, const T* values, float* scores, int64_t count, const Keys& for_each_key,
                 float scale, T* dst) {
  __m512 query[Vectors], sum[Vectors];
  for (int v = 0; v < Vectors; ++v) {
    query[v] = load16(q + 16 * v);
    sum[v] = _mm512_setzero_ps();
  }
  float best = -INFINITY;
  for_each_key([&](int64_t i, int64_t at) {
    __m512 dot = _mm512_mul_ps(query[0], load16(keys + at));
    for (int v = 1; v < Vectors; ++v) dot = _mm512_fmadd_ps(query[v], load16(keys + at + 16 * v), dot);
    scores[i] = sum16(dot) * scale;
    best = std::max(best, scores[i]);
  });
  const float inverse = 1.f / exp_shifted(scores, count, best);
  for_each_key([&](int64_t i, int64_t at) {
    const __m512 p = _mm512_set1_ps(scores[i] * inverse);
    for (int v = 0; v < Vectors; ++v) sum[v] = _mm512_fmadd_ps(p, load16(values + at + 16 * v), sum[v]);
  });
  for (int v = 0; v < Vectors; ++v) store16(dst + 16 * v, sum[v]);
}
#endif

// One head over its keys for any dim and dtype: the scalar form of attend_head.
template <typename T, typename Keys>
void attend_head_any(const T* q, const T* keys, const T* values, float* scores, int64_t count, const Keys& for_each_key,
                     int64_t dim, float scale, float* acc, T* dst) {
  float best = -INFINITY;
  for_each_key([&](int64_t i, int64_t at) {
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)  // vectorised (the sum in lanes): scalar, this loop was most of the kernel
    for (int64_t d = 0; d < dim; ++d) dot += static_cast<float>(q[d]) * static_cast<float>(keys[at + d]);
    scores[i] = dot * scale;
    best = std::max(best, scores[i]);
  });
  const float total = exp_shifted(scores, count, best);
  std::fill(acc, acc + dim, 0.f);
  for_each_key([&](int64_t i, int64_t at) {
    const float p = scores[i] / total;
    for (int64_t d = 0; d < dim; ++d) acc[d] += p * static_cast<float>(values[at + d]);
  });
  for (int64_t d = 0; d < dim; ++d) dst[d] = round_to<T>(acc[d]);
}

// Decode attention over the paged cache, reading K/V in place (no gather): one query token per row, row r
// belonging to sequence seq_of_row[r]; rows x heads run in parallel, in chunks of at least
// kParallelWork multiply-adds (a short context's heads are less work than handing them to another thread).
// Scores and the softmax are float; the output is rounded once.
template <typename T>
void decode_rows(const T* query, const T* keys, const T* values, const int32_t* tables, const int64_t* seq_of_row,
                 const int64_t* lengths, T* out, int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim,
                 int64_t block_size, int64_t table_width, int64_t query_row_stride, float scale, int64_t window) {
  constexpr int64_t kParallelWork = 1 << 15;
  int64_t group = heads / kv_heads;
  int64_t slot_stride = kv_heads * dim;
  int64_t longest = 1;
  for (int64_t r = 0; r < rows; ++r) longest = std::max(longest, window > 0 ? std::min(lengths[r], window) : lengths[r]);
  const int64_t grain = std::max<int64_t>(1, kParallelWork / (2 * longest * dim));
  at::parallel_for(0, rows * heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(dim);
    for (int64_t index = begin; index < end; ++index) {
      int64_t r = index / heads, h = index % heads, kvh = h / group;
      int64_t length = lengths[r];
      int64_t first = window > 0 && length > window ? length - window : 0;
      const T* q = query + r * query_row_stride + h * dim;
      const int32_t* table = tables + seq_of_row[r] * table_width;
      scores.resize(length - first);
      // Key j's slot, block by block: a division per key (block_size is known only at run time) cost more
      // than its dot product.
      auto for_each_key = [&](auto&& body) {
        for (int64_t j = first, b = first / block_size, offset = first % block_size; j < length; ++b, offset = 0) {
          const int64_t base = static_cast<int64_t>(table[b]) * block_size + offset;
          const int64_t count = std::min(block_size - offset, length - j);
          for (int64_t i = 0; i < count; ++i) body(j - first + i, (base + i) * slot_stride);
          j += count;
        }
      };
      const T* k = keys + kvh * dim;
      const T* v = values + kvh * dim;
      T* dst = out + (r * heads + h) * dim;
      const int64_t count = length - first;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {
        if (dim == 64) {
          attend_head<4>(q, k, v, scores.data(), count, for_each_key, scale, dst);
          continue;
        }
        if (dim == 128) {
          attend_head<8>(q, k, v, scores.data(), count, for_each_key, scale, dst);
          continue;
        }
      }
#endif
      attend_head_any(q, k, v, scores.data(), count, for_each_key, dim, scale, acc.data(), dst);
    }
  });
}

void check_dense_heads(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1 && t.stride(1) == t.size(2), name, " must be [rows, heads, dim] with dense heads");
}

// The decode case of xllm::paged_attention_out, whole: the step's tokens [offset, offset + n) hold one
// token each of consecutive sequences from row 0 (the metadata describes the whole step, as in the
// Python kernel). Stores the n keys/values at their slots, attends, zeroes the padding rows, returns
// true. Any other shape of step returns false having touched nothing: the caller takes the general path.
// One call per layer instead of a dozen small tensor ops, which at batch 1 cost more than the attention.
bool paged_decode_out(torch::Tensor query, torch::Tensor key, torch::Tensor value, torch::Tensor kv_cache,
                      torch::Tensor slot_mapping, torch::Tensor query_lens, torch::Tensor seq_lens,
                      torch::Tensor block_tables, double scale, int64_t window, torch::Tensor out, int64_t token_offset) {
  TORCH_CHECK(query_lens.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  block_tables.scalar_type() == at::kInt && slot_mapping.scalar_type() == at::kLong,
              "query_lens, seq_lens and block_tables must be int32, slot_mapping int64");
  query_lens = query_lens.contiguous();
  seq_lens = seq_lens.contiguous();
  const int32_t* lens = query_lens.data_ptr<int32_t>();
  const int32_t* contexts = seq_lens.data_ptr<int32_t>();
  const int64_t tokens = query.size(0), low = token_offset, high = token_offset + tokens;
  std::vector<int64_t> seq_of_row, lengths;
  int64_t start = 0;
  for (int64_t s = 0; s < query_lens.numel(); ++s) {
    int64_t n = lens[s], first = std::max(start, low), last = std::min(start + n, high);
    if (first < last) {
      if (last - first != 1 || first - low != static_cast<int64_t>(seq_of_row.size())) return false;
      seq_of_row.push_back(s);
      lengths.push_back(contexts[s] - n + (last - start));
    }
    start += n;
  }
  if (seq_of_row.empty()) return false;

  // Planes may alias (stride 0: MLA's latent serves as key and value, ops/mla.py); each must be contiguous.
  TORCH_CHECK(kv_cache.select(0, 0).is_contiguous() && kv_cache.select(0, 1).is_contiguous(), "kv_cache planes must be contiguous");
  check_dense_heads(query, "query");
  check_dense_heads(key, "key");
  check_dense_heads(value, "value");
  check_rows(out, "out");
  block_tables = block_tables.contiguous();
  slot_mapping = slot_mapping.contiguous();
  const int64_t block_size = kv_cache.size(2), kv_heads = kv_cache.size(3), dim = kv_cache.size(4);
  const int64_t slots = kv_cache.size(1) * block_size, width = block_tables.size(1);
  for (int64_t length : lengths) TORCH_CHECK(length <= width * block_size, "a length runs past its block table");
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(slot[t] >= 0 && slot[t] < slots, "slot_mapping out of range");
  const int64_t rows = static_cast<int64_t>(seq_of_row.size()), slot_stride = kv_heads * dim, plane = kv_cache.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode_out", [&] {
    scalar_t* cache = kv_cache.data_ptr<scalar_t>();
    for (int64_t t = 0; t < tokens; ++t) {
      std::copy_n(key.data_ptr<scalar_t>() + t * key.stride(0), slot_stride, cache + slot[t] * slot_stride);
      std::copy_n(value.data_ptr<scalar_t>() + t * value.stride(0), slot_stride, cache + plane + slot[t] * slot_stride);
    }
    scalar_t* dst = out.data_ptr<scalar_t>();
    std::fill(dst + std::max(std::min(start, high) - low, int64_t{0}) * query.size(1) * dim, dst + out.numel(),
              round_to<scalar_t>(0.f));
    decode_rows<scalar_t>(query.data_ptr<scalar_t>(), cache, cache + plane, block_tables.data_ptr<int32_t>(),
                          seq_of_row.data(), lengths.data(), dst, rows, query.size(1), kv_heads, dim, block_size,
                          width, query.stride(0), static_cast<float>(scale), window);
  });
  return true;
}

// The first index of `value` in `row`, where it is (a NaN finds the first NaN).
int64_t first_index_of(const float* row, int64_t width, float value) {
  const bool nan = std::isnan(value);
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 target = _mm512_set1_ps(value);
  for (; i + 16 <= width; i += 16) {
    const __m512 v = _mm512_loadu_ps(row + i);
    const __mmask16 hit = nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, target, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
#endif
  for (; i < width; ++i)
    if (nan ? std::isnan(row[i]) : row[i] == value) return i;
  return width - 1;  // not reached: the value is in the row
}

// Greedy sampling's argmax of each row of float32 logits: torch.argmax's answer (the first index of the
// largest value, a NaN counting as the largest), in one vectorised pass for the largest value and one for its
// first index. ATen's argmax is a scalar reduction: 35-45 us for one row of a 32000-token vocabulary, a
// step's worth of the batch-1 decode's work outside the graph.
std::vector<int64_t> argmax_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.device().is_cpu(),
              "argmax_rows takes float32 CPU logits [rows, vocab]");
  TORCH_CHECK(logits.size(1) > 0, "argmax_rows: an empty vocabulary has no argmax");
  logits = logits.contiguous();
  const int64_t rows = logits.size(0), width = logits.size(1);
  std::vector<int64_t> tokens(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits.data_ptr<float>() + r * width;
    int64_t i = 0;
    float best = row[0];
#if defined(__AVX512F__)
    __m512 lanes = _mm512_set1_ps(best);
    bool has_nan = false;
    for (; i + 16 <= width; i += 16) {
      const __m512 v = _mm512_loadu_ps(row + i);
      has_nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;
      lanes = _mm512_max_ps(lanes, v);
    }
    if (!has_nan) best = std::max(best, _mm512_reduce_max_ps(lanes));
    else best = std::numeric_limits<float>::quiet_NaN();
#endif
    for (; i < width; ++i) {
      if (std::isnan(best)) break;
      if (std::isnan(row[i]) || row[i] > best) best = row[i];
    }
    tokens[r] = first_index_of(row, width, best);
  }
  return tokens;
}

}  // namespace

// silu(gate) * up of one row, rounded as silu_and_mul_out rounds: for cpu_linear.cpp's experts kernel.
void silu_and_mul_span(const float* gate, const float* up, float* dst, int64_t width) {
  silu_and_mul_row(gate, up, dst, width);
}
void silu_and_mul_span(const at::BFloat16* gate, const at::BFloat16* up, at::BFloat16* dst, int64_t width) {
  silu_and_mul_row(gate, up, dst, width);
}

// aten.index_select.out(table, 0, index, out=out) for a [rows, width] table with unit stride along width, an
// int64 index and a contiguous out: each row one copy. The replay program (runtime/cpu_replay.py) calls it for
// those index_selects (a decode step's embedding, cos/sin and last-row gathers): through the dispatcher each
// cost 10-15 us at batch 1, the weights' stream having evicted its code and data, for a 1.5 KB copy.
void select_rows_out(torch::Tensor table, torch::Tensor index, torch::Tensor out) {
  TORCH_CHECK(table.dim() == 2 && table.stride(1) == 1, "select_rows_out: the table must be [rows, width], dense rows");
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.is_contiguous(),
              "select_rows_out: the index must be a contiguous 1-d int64 tensor");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == table.scalar_type() && out.dim() == 2 &&
                  out.size(0) == index.size(0) && out.size(1) == table.size(1),
              "select_rows_out: out must be a contiguous [index size, width] tensor of the table's dtype");
  const int64_t rows = table.size(0), bytes = table.size(1) * table.element_size();
  const int64_t* ids = index.data_ptr<int64_t>();
  const auto* from = static_cast<const char*>(table.data_ptr());
  auto* to = static_cast<char*>(out.data_ptr());
  for (int64_t i = 0; i < index.size(0); ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < rows, "select_rows_out: index ", ids[i], " is out of range for ", rows, " rows");
    std::memcpy(to + i * bytes, from + ids[i] * table.stride(0) * table.element_size(), bytes);
  }
}

void register_linear(pybind11::module& m);  // cpu_linear.cpp
void register_quant(pybind11::module& m);   // cpu_quant.cpp
void register_int4(pybind11::module& m);    // cpu_int4.cpp
void register_moe_routing(pybind11::module& m);  // cpu_moe_routing.cpp
void register_replay(pybind11::module& m);  // cpu_replay.cpp

// Argument names are the xllm:: op schemas' (graphs may pass any argument by keyword).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  xllm_replay::def_kernel(m, "rms_norm_out", &rms_norm_out, py::arg("x"), py::arg("weight"), py::arg("eps"),
                          py::arg("out"));
  xllm_replay::def_kernel(m, "fused_add_rms_norm_out", &fused_add_rms_norm_out, py::arg("x"), py::arg("residual"),
                          py::arg("weight"), py::arg("eps"), py::arg("out"), py::arg("summed"));
  xllm_replay::def_kernel(m, "silu_and_mul_out", &silu_and_mul_out, py::arg("gate_up"), py::arg("out"));
  xllm_replay::def_kernel(m, "rotary_embedding_out", &rotary_embedding_out, py::arg("query"), py::arg("key"),
                          py::arg("cos"), py::arg("sin"), py::arg("query_out"), py::arg("key_out"));
  register_linear(m);
  register_quant(m);
  register_int4(m);
  register_moe_routing(m);
  register_replay(m);
  m.def("argmax_rows", &argmax_rows, py::arg("logits"));
  xllm_replay::def_kernel(m, "select_rows_out", &select_rows_out, py::arg("table"), py::arg("index"), py::arg("out"));
  xllm_replay::def_kernel(m, "paged_decode_out", &paged_decode_out, py::arg("query"), py::arg("key"), py::arg("value"),
                          py::arg("kv_cache"), py::arg("slot_mapping"), py::arg("query_lens"), py::arg("seq_lens"),
                          py::arg("block_tables"), py::arg("scale"), py::arg("sliding_window"), py::arg("out"),
                          py::arg("token_offset"));
}
