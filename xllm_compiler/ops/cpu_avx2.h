// AVX2 lanes shared by the CPU kernels built without AVX-512: 8 float lanes read from float32 or bfloat16
// and written back with c10's rounding, and spans of inputs quantized to int8 (the activations of the int8
// and int4 weight kernels, cpu_quant.cpp and cpu_int4.cpp).
#pragma once
#if defined(__AVX2__) && defined(__FMA__)
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace xllm_avx2 {

inline __m256i lane_mask(int64_t lanes) {  // the first `lanes` of 8 lanes
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lanes)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// `lanes` values as float (bfloat16 widened exactly); the lanes past them read as zero.
inline __m256 load8(const float* x, int64_t lanes = 8) {
  return lanes == 8 ? _mm256_loadu_ps(x) : _mm256_maskload_ps(x, lane_mask(lanes));
}
inline __m256 load8(const c10::BFloat16* x, int64_t lanes = 8) {
  alignas(16) uint16_t bits[8] = {0};
  const __m128i narrow = lanes == 8 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(x))
                                    : (std::copy_n(reinterpret_cast<const uint16_t*>(x), lanes, bits),
                                       _mm_load_si128(reinterpret_cast<const __m128i*>(bits)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(narrow), 16));
}

// c10's round_to_nearest_even in each lane: the bfloat16 bits in the low half (NaN: 0x7FC0).
inline __m256i nearest_even(__m256 value) {
  const __m256i bits = _mm256_castps_si256(value);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(value, value, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

inline void store8(float* out, __m256 value, int64_t lanes = 8) {
  if (lanes == 8) {
    _mm256_storeu_ps(out, value);
  } else {
    _mm256_maskstore_ps(out, lane_mask(lanes), value);
  }
}
inline void store8(c10::BFloat16* out, __m256 value, int64_t lanes = 8) {
  const __m256i bits = nearest_even(value);
  const __m128i narrow = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  if (lanes == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), narrow);
  } else {
    alignas(16) uint16_t spill[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(spill), narrow);
    std::copy_n(spill, lanes, reinterpret_cast<uint16_t*>(out));
  }
}

// A float vector rounded to T's precision and widened back (where a reference materialises T).
template <typename T>
inline __m256 round8(__m256 value) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(nearest_even(value), 16));
  } else {
    return value;
  }
}

template <typename T>
float abs_max(const T* x, int64_t count) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 top = _mm256_setzero_ps();
  for (int64_t k = 0; k < count; k += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign, load8(x + k, std::min<int64_t>(8, count - k))));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  return *std::max_element(lanes, lanes + 8);
}

// q[k] = round(x[k] * inverse) to nearest even for k < count (|x[k] * inverse| <= 127 by the caller's
// choice of inverse); returns the sum of the x[k] themselves, in float.
template <typename T>
float quantize_span(const T* x, int64_t count, float inverse, int8_t* q) {
  const __m256 scale = _mm256_set1_ps(inverse);
  __m256 sum = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= count; k += 32) {  // 32 values: four int32 vectors narrowed to bytes, in order
    __m256i v[4];
    for (int i = 0; i < 4; ++i) {
      const __m256 value = load8(x + k + 8 * i);
      sum = _mm256_add_ps(sum, value);
      v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(value, scale));
    }
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), ordered);
  }
  for (; k < count; k += 8) {
    const int64_t lanes = std::min<int64_t>(8, count - k);
    const __m256 value = load8(x + k, lanes);
    sum = _mm256_add_ps(sum, value);
    alignas(32) int32_t ints[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(ints), _mm256_cvtps_epi32(_mm256_mul_ps(value, scale)));
    for (int64_t i = 0; i < lanes; ++i) q[k + i] = static_cast<int8_t>(ints[i]);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  float total = 0.f;
  for (float lane : lanes) total += lane;
  return total;
}

// Four int8 values at `q` broadcast to every 32-bit lane.
inline __m256i broadcast4(const int8_t* q) {
  int32_t four;
  std::memcpy(&four, q, sizeof(four));
  return _mm256_set1_epi32(four);
}

}  // namespace xllm_avx2
#endif  // __AVX2__ && __FMA__
