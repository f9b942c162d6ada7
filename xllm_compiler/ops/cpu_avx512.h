// AVX-512 lanes shared by the int8 and int4 weight kernels (cpu_quant.cpp, cpu_int4.cpp): 16 float lanes
// read from float32 or bfloat16 and written back, any lane count through a mask.
#pragma once
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <cstdint>

namespace xllm_avx512 {

inline __mmask16 lanes_mask(int64_t lanes) { return static_cast<__mmask16>((1u << lanes) - 1); }

// 16 lanes as float32 (bfloat16 widened exactly); lanes past ``mask`` read as zero.
inline __m512 load16(const float* x, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, x); }
inline __m512 load16(const c10::BFloat16* x, __mmask16 mask) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

inline void store16(float* out, __m512 value, __mmask16 mask) { _mm512_mask_storeu_ps(out, mask, value); }
#if defined(__AVX512BF16__)
// Rounded to nearest even, as c10's conversion is.
inline void store16(c10::BFloat16* out, __m512 value, __mmask16 mask) {
  _mm256_mask_storeu_epi16(out, mask, (__m256i)_mm512_cvtneps_pbh(value));
}
#endif

}  // namespace xllm_avx512
#endif  // __AVX512F__ && __AVX512BW__ && __AVX512VL__
