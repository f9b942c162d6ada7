// Linear layers on CPU over weights packed once at load: the kernel behind every linear layer of a
// lowered graph (runtime/platform/cpu.py), written straight into the caller's output (the planned arena).
// The packing itself runs as each weight is read (runtime/weights.py), and a tied embedding gathers its
// rows from the packed lm_head (packed_embedding), so a load keeps one copy of each weight.
//
// Why our own: at decode a linear layer reads its whole weight to produce a few rows, so its speed is
// the speed at which it streams the weight. The packed layout makes that stream one sequential run
// per block of 64 outputs: float32 [ceil(N/64), K, 64], bfloat16 [ceil(N/64), ceil(K/2), 64, 2] (pairs of
// K interleaved, the operand shape of AVX-512 BF16's vdpbf16ps). A register tile of up to 6 input rows
// x 64 outputs accumulates in 24 vector registers with no horizontal reduction, so the same kernel also
// holds up at prefill sizes. Measured against oneDNN on its own packed weights over the 49 linear layers
// of the ~100M Llama (docs/performance.md): 1.5-2x faster from 1 to 8 rows, as fast or faster at 512.
// Sums are float; the output is rounded once. Built where the compiler targets AVX-512 (float32) and
// AVX-512 BF16 (bfloat16), or else AVX2 with FMA (both dtypes: 8-lane tiles over the same layout, the
// AVX2 section below); elsewhere packed_linear_dtypes() is empty and graphs keep aten.linear.
// Where the CPU has AMX, bfloat16 inputs of 2 rows or more run AMX tiles over the same packed layout.
// The last section runs the routed experts of an MoE layer on per-expert packed weights.
#include <torch/extension.h>
#include "cpu_replay.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include "cpu_avx2.h"
#if defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

// Which kernels this build has: AVX-512 (BF16 for bfloat16), else AVX2 with FMA for both dtypes.
#if defined(__AVX512F__)
#define XLLM_LINEAR_F32 1
#if defined(__AVX512BF16__)
#define XLLM_LINEAR_BF16 1
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#define XLLM_LINEAR_AVX2 1
#define XLLM_LINEAR_F32 1
#define XLLM_LINEAR_BF16 1
#endif

namespace {

constexpr int64_t kBlock = 64;  // outputs per packed block: four 16-lane vectors (AVX2: eight 8-lane ones)

#if defined(__AVX512F__)

constexpr int kTileRows = 6;  // input rows per register tile: 6 x 4 accumulators + 4 weight vectors

// Float32 lanes: one K step is one fused multiply-add per accumulator.
struct F32 {
  using T = float;
  static constexpr int64_t kStep = 1;
  using Weights = __m512;
  using Input = __m512;
  static Weights load(const float* w) { return _mm512_loadu_ps(w); }
  static Input broadcast(const float* x, int64_t k, int64_t) { return _mm512_set1_ps(x[k]); }
  static __m512 madd(__m512 acc, Weights w, Input x) { return _mm512_fmadd_ps(x, w, acc); }
  static void store(float* out, __m512 value, __mmask16 mask) { _mm512_mask_storeu_ps(out, mask, value); }
  static __m512 widen(const float* x, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, x); }
  static __m512 round(__m512 value) { return value; }
};

#if defined(__AVX512BF16__)
// BFloat16 lanes: one K step is a pair of K, two products per lane in one vdpbf16ps.
struct BF16 {
  using T = at::BFloat16;
  static constexpr int64_t kStep = 2;
  using Weights = __m512bh;
  using Input = __m512bh;
  static Weights load(const at::BFloat16* w) { return (__m512bh)_mm512_loadu_si512(w); }
  static Input broadcast(const at::BFloat16* x, int64_t k, int64_t k_size) {
    uint32_t low = x[k].x, high = k + 1 < k_size ? x[k + 1].x : 0;
    return (__m512bh)_mm512_set1_epi32(static_cast<int>(low | (high << 16)));
  }
  static __m512 madd(__m512 acc, Weights w, Input x) { return _mm512_dpbf16_ps(acc, w, x); }
  static void store(at::BFloat16* out, __m512 value, __mmask16 mask) {
    _mm256_mask_storeu_epi16(out, mask, (__m256i)_mm512_cvtneps_pbh(value));
  }
  static __m512 widen(const at::BFloat16* x, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, x)), 16));
  }
  static __m512 round(__m512 value) {  // to bfloat16 (nearest even) and back, as a materialised bfloat16 is
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(value)), 16));
  }
};
#endif

// rows x 64 outputs of one packed block: out[m, j] = bias[j] + sum_k x[m, k] * w[k, j].
template <typename L, int Rows>
void block_tile(const typename L::T* x, int64_t x_stride, const typename L::T* block, int64_t k_size,
                const typename L::T* bias, typename L::T* out, int64_t out_stride, int64_t valid) {
  __m512 acc[Rows][4];
  for (int m = 0; m < Rows; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  constexpr int64_t kLane = 16 * L::kStep;  // elements of one 16-output vector per K step
  int64_t k = 0;
  if constexpr (Rows == 1) {
    // One row is four chains of multiply-adds, each waiting on the one before: vdpbf16ps' latency, not the
    // weight stream, then sets the pace (bfloat16 at 22 GB/s where float32 reads 30 on a Sapphire Rapids).
    // A second set of sums for every other K step makes it eight chains: 29.6 GB/s, the stream's rate.
    __m512 odd[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; k + L::kStep < k_size; k += 2 * L::kStep) {
      const typename L::T* w = block + k * kBlock;
      typename L::Input x0 = L::broadcast(x, k, k_size), x1 = L::broadcast(x, k + L::kStep, k_size);
      acc[0][0] = L::madd(acc[0][0], L::load(w), x0);
      acc[0][1] = L::madd(acc[0][1], L::load(w + kLane), x0);
      acc[0][2] = L::madd(acc[0][2], L::load(w + 2 * kLane), x0);
      acc[0][3] = L::madd(acc[0][3], L::load(w + 3 * kLane), x0);
      odd[0] = L::madd(odd[0], L::load(w + 4 * kLane), x1);
      odd[1] = L::madd(odd[1], L::load(w + 5 * kLane), x1);
      odd[2] = L::madd(odd[2], L::load(w + 6 * kLane), x1);
      odd[3] = L::madd(odd[3], L::load(w + 7 * kLane), x1);
    }
    for (int j = 0; j < 4; ++j) acc[0][j] = _mm512_add_ps(acc[0][j], odd[j]);
  }
  for (; k < k_size; k += L::kStep) {
    const typename L::T* w = block + k * kBlock;
    typename L::Weights w0 = L::load(w), w1 = L::load(w + kLane), w2 = L::load(w + 2 * kLane),
                        w3 = L::load(w + 3 * kLane);
    for (int m = 0; m < Rows; ++m) {
      typename L::Input xm = L::broadcast(x + m * x_stride, k, k_size);
      acc[m][0] = L::madd(acc[m][0], w0, xm);
      acc[m][1] = L::madd(acc[m][1], w1, xm);
      acc[m][2] = L::madd(acc[m][2], w2, xm);
      acc[m][3] = L::madd(acc[m][3], w3, xm);
    }
  }
  for (int j = 0; j < 4 && 16 * j < valid; ++j) {
    const int64_t lanes = std::min<int64_t>(16, valid - 16 * j);
    const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1);
    alignas(64) float bias_lanes[16] = {0.f};
    for (int64_t i = 0; bias != nullptr && i < lanes; ++i) bias_lanes[i] = static_cast<float>(bias[16 * j + i]);
    const __m512 b = _mm512_load_ps(bias_lanes);
    for (int m = 0; m < Rows; ++m) L::store(out + m * out_stride + 16 * j, _mm512_add_ps(acc[m][j], b), mask);
  }
}

// Every row of x through one packed block: the register tiles of kTileRows rows, then the remainder.
template <typename L>
void block_rows(const typename L::T* x, int64_t rows, int64_t x_stride, const typename L::T* block, int64_t k_size,
                const typename L::T* bias, typename L::T* out, int64_t out_stride, int64_t valid) {
  for (int64_t m0 = 0; m0 < rows; m0 += kTileRows) {
    const typename L::T* xt = x + m0 * x_stride;
    typename L::T* ot = out + m0 * out_stride;
    switch (std::min<int64_t>(kTileRows, rows - m0)) {
      case 1: block_tile<L, 1>(xt, x_stride, block, k_size, bias, ot, out_stride, valid); break;
      case 2: block_tile<L, 2>(xt, x_stride, block, k_size, bias, ot, out_stride, valid); break;
      case 3: block_tile<L, 3>(xt, x_stride, block, k_size, bias, ot, out_stride, valid); break;
      case 4: block_tile<L, 4>(xt, x_stride, block, k_size, bias, ot, out_stride, valid); break;
      case 5: block_tile<L, 5>(xt, x_stride, block, k_size, bias, ot, out_stride, valid); break;
      default: block_tile<L, 6>(xt, x_stride, block, k_size, bias, ot, out_stride, valid); break;
    }
  }
}

#if defined(__AVX512BF16__) && defined(__AMX_BF16__) && defined(__AMX_TILE__)
// AMX tiles for bfloat16 from 2 rows up, where this CPU has them (this build targets this CPU, so the macros say
// so). A [2048, 512] weight on one core: 8 rows 0.17 ms by block_tile, 0.05 ms by tiles; 128 rows 2.75 ms and
// 0.29 ms (oneDNN's AMX matmul on the plain weight: 0.14 and 0.36 ms, most of it reordering the weight). The
// tiles read the packed layout as it is: a B tile is 16 pairs of K x 16 outputs, 64 bytes of each 256-byte
// pair step of a block; A is up to 16 rows x 32 K of the input; C up to 16 rows x 16 outputs of float sums.
constexpr int64_t kAmxRows = 16;    // rows per tile
constexpr int64_t kAmxMinRows = 2;  // fewer rows than this take the vector tile

// Linux grants a process the tile data state on request (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
bool amx_ready() {
  static const bool ready = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ready;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: sums of `rows` rows x 16 outputs; 4: rows x 32 K of the input; 5: 16 pairs of K x 16 outputs.
void configure_tiles(int64_t rows) {
  TileConfig config;
  for (int t = 0; t < 6; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = static_cast<uint8_t>(t == 5 ? 16 : rows);
  }
  _tile_loadconfig(&config);
}

// block_rows' contract by AMX tiles; k_size a multiple of 32.
void amx_block_rows(const at::BFloat16* x, int64_t rows, int64_t x_stride, const at::BFloat16* block, int64_t k_size,
                    const at::BFloat16* bias, at::BFloat16* out, int64_t out_stride, int64_t valid) {
  alignas(64) float sums[16][kBlock];
  int64_t configured = 0;
  for (int64_t m0 = 0; m0 < rows; m0 += kAmxRows) {
    const int64_t tile_rows = std::min<int64_t>(kAmxRows, rows - m0);
    if (tile_rows != configured) configure_tiles(configured = tile_rows);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k0 = 0; k0 < k_size; k0 += 32) {
      const at::BFloat16* w = block + k0 * kBlock;  // pair step k0 / 2
      _tile_loadd(4, x + m0 * x_stride + k0, x_stride * 2);
      _tile_loadd(5, w, kBlock * 4);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(5, w + 32, kBlock * 4);
      _tile_dpbf16ps(1, 4, 5);
      _tile_loadd(5, w + 64, kBlock * 4);
      _tile_dpbf16ps(2, 4, 5);
      _tile_loadd(5, w + 96, kBlock * 4);
      _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, &sums[0][0], kBlock * 4);
    _tile_stored(1, &sums[0][16], kBlock * 4);
    _tile_stored(2, &sums[0][32], kBlock * 4);
    _tile_stored(3, &sums[0][48], kBlock * 4);
    for (int j = 0; j < 4 && 16 * j < valid; ++j) {
      const int64_t lanes = std::min<int64_t>(16, valid - 16 * j);
      const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1);
      const __m512 b = bias ? BF16::widen(bias + 16 * j, mask) : _mm512_setzero_ps();
      for (int64_t m = 0; m < tile_rows; ++m)
        BF16::store(out + (m0 + m) * out_stride + 16 * j, _mm512_add_ps(_mm512_load_ps(&sums[m][16 * j]), b), mask);
    }
  }
  _tile_release();
}
#endif

// block_rows, or its AMX form where this CPU has AMX and the rows and K suit it.
template <typename L>
void block_rows_any(const typename L::T* x, int64_t rows, int64_t x_stride, const typename L::T* block,
                    int64_t k_size, const typename L::T* bias, typename L::T* out, int64_t out_stride, int64_t valid) {
#if defined(__AVX512BF16__) && defined(__AMX_BF16__) && defined(__AMX_TILE__)
  if constexpr (std::is_same_v<typename L::T, at::BFloat16>) {
    if (rows >= kAmxMinRows && k_size % 32 == 0 && amx_ready()) {
      amx_block_rows(x, rows, x_stride, block, k_size, bias, out, out_stride, valid);
      return;
    }
  }
#endif
  block_rows<L>(x, rows, x_stride, block, k_size, bias, out, out_stride, valid);
}

#elif defined(XLLM_LINEAR_AVX2)
// AVX2 with FMA (no AVX-512), over the same layout: 8 outputs to a 256-bit vector, so a block is 8 vectors.
// 16 registers hold a tile of 1 row x 64 outputs (8 accumulators), up to 3 rows x 32 or 6 rows x 16 (12
// accumulators, the weight vectors of a step, a broadcast input). A tile narrower than the block reads a
// K step's 256 bytes a strip at a time, which from memory ran at half the speed of one sequential pass, so
// the block goes through in chunks of kChunkSteps K steps (16 KB, which stay in L1 while every tile reads
// them) with the sums kept between chunks; in float32 the first row of each chunk runs alone over all 64
// outputs, one sequential pass that brings the chunk in (bfloat16 did better without). bfloat16 has no
// dot product here: a vector of 8 outputs' pairs is widened to two float vectors (the even K shifted up,
// the odd K masked) and each tile's input rows are widened to float per chunk. Against aten.linear on an
// AMD EPYC (Zen 3): docs/performance.md.

// The tile's loops fully unrolled: GCC's -O3 otherwise keeps the accumulators in memory, storing each one
// every K step (half the speed).
#define XLLM_UNROLL _Pragma("GCC unroll 16")

using xllm_avx2::lane_mask;

// Float32 lanes: one K step is one fused multiply-add per accumulator.
struct F32 {
  using T = float;
  static constexpr int64_t kStep = 1;
  static constexpr bool kLeadRow = true;
  static __m256 weights(const float* w, int) { return _mm256_loadu_ps(w); }
  // A chunk of the tile's rows as float: the rows themselves.
  static const float* rows_as_float(const float* x, int64_t, int64_t, int64_t, int64_t, std::vector<float>&,
                                    int64_t&) {
    return x;
  }
  static __m256 widen(const float* x, int64_t lanes) { return xllm_avx2::load8(x, lanes); }
  static __m256 round(__m256 value) { return value; }
  static void store(float* out, __m256 value, int64_t lanes) { xllm_avx2::store8(out, value, lanes); }
};

// BFloat16 lanes: one K step is a pair of K, a float multiply-add for each.
struct BF16 {
  using T = at::BFloat16;
  static constexpr int64_t kStep = 2;
  static constexpr bool kLeadRow = false;
  // The even (part 0) or odd (part 1) K of 8 outputs' pairs, as float: the upper half of a float is a bfloat16.
  static __m256 weights(const at::BFloat16* w, int part) {
    const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    return _mm256_castsi256_ps(part == 0 ? _mm256_slli_epi32(pairs, 16)
                                         : _mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  // A chunk of the tile's rows (k_count of K) as float, padded with zeros to k_padded (whole pairs: the
  // packed weight is zero there); stride is set to k_padded.
  static const float* rows_as_float(const at::BFloat16* x, int64_t rows, int64_t x_stride, int64_t k_count,
                                    int64_t k_padded, std::vector<float>& buffer, int64_t& stride) {
    stride = k_padded;
    buffer.resize(rows * stride);
    for (int64_t m = 0; m < rows; ++m) {
      const at::BFloat16* row = x + m * x_stride;
      float* dst = buffer.data() + m * stride;
      int64_t k = 0;
      for (; k + 8 <= k_count; k += 8) _mm256_storeu_ps(dst + k, widen(row + k, 8));
      for (; k < stride; ++k) dst[k] = k < k_count ? static_cast<float>(row[k]) : 0.f;
    }
    return buffer.data();
  }
  static __m256 widen(const at::BFloat16* x, int64_t lanes) { return xllm_avx2::load8(x, lanes); }
  static __m256 round(__m256 value) {  // to bfloat16 and back, as a materialised bfloat16 is
    return _mm256_castsi256_ps(_mm256_slli_epi32(xllm_avx2::nearest_even(value), 16));
  }
  static void store(at::BFloat16* out, __m256 value, int64_t lanes) { xllm_avx2::store8(out, value, lanes); }
};

constexpr int kTileRows = 6;          // input rows per register tile
constexpr int64_t kChunkSteps = 64;    // K steps per chunk: 16 KB of a block, read from L1 by every tile

// Rows x 8 * Vectors outputs of one chunk of a packed block, from `strip` (the chunk's first step at the
// tile's first output): sums[m, j] (+)= sum over the chunk's steps of x[m, k] * w[k, j], x float rows
// (x_stride apart, from the chunk's first K). The first chunk starts from zero, the last writes
// out[m, j] = bias[j] + sums (`valid` outputs), the others keep the sums in `sums` (rows kBlock apart).
template <typename L, int Rows, int Vectors>
void block_tile(const float* x, int64_t x_stride, const typename L::T* strip, int64_t steps, bool first, bool last,
                float* sums, const typename L::T* bias, typename L::T* out, int64_t out_stride, int64_t valid) {
  __m256 acc[Rows][Vectors];
XLLM_UNROLL
  for (int m = 0; m < Rows; ++m)
XLLM_UNROLL
    for (int j = 0; j < Vectors; ++j) acc[m][j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(sums + m * kBlock + 8 * j);
  for (int64_t s = 0; s < steps; ++s) {
    const typename L::T* w = strip + s * kBlock * L::kStep;
XLLM_UNROLL
    for (int part = 0; part < L::kStep; ++part) {
      __m256 wj[Vectors];
XLLM_UNROLL
      for (int j = 0; j < Vectors; ++j) wj[j] = L::weights(w + j * 8 * L::kStep, part);
XLLM_UNROLL
      for (int m = 0; m < Rows; ++m) {
        const __m256 xm = _mm256_broadcast_ss(x + m * x_stride + s * L::kStep + part);
XLLM_UNROLL
        for (int j = 0; j < Vectors; ++j) acc[m][j] = _mm256_fmadd_ps(wj[j], xm, acc[m][j]);
      }
    }
  }
  if (!last) {
XLLM_UNROLL
    for (int m = 0; m < Rows; ++m)
XLLM_UNROLL
      for (int j = 0; j < Vectors; ++j) _mm256_storeu_ps(sums + m * kBlock + 8 * j, acc[m][j]);
    return;
  }
XLLM_UNROLL
  for (int j = 0; j < Vectors; ++j) {  // a fixed count, so that acc stays in registers
    if (8 * j >= valid) continue;
    const int64_t lanes = std::min<int64_t>(8, valid - 8 * j);
    const __m256 b = bias != nullptr ? L::widen(bias + 8 * j, lanes) : _mm256_setzero_ps();
XLLM_UNROLL
    for (int m = 0; m < Rows; ++m) L::store(out + m * out_stride + 8 * j, _mm256_add_ps(acc[m][j], b), lanes);
  }
}

// A tile of Rows rows over one chunk of the block's valid outputs, 8 * Vectors at a time.
template <typename L, int Rows, int Vectors>
void block_strips(const float* x, int64_t x_stride, const typename L::T* chunk, int64_t steps, bool first, bool last,
                  float* sums, const typename L::T* bias, typename L::T* out, int64_t out_stride, int64_t valid) {
  for (int64_t j0 = 0; j0 < valid; j0 += 8 * Vectors)
    block_tile<L, Rows, Vectors>(x, x_stride, chunk + j0 * L::kStep, steps, first, last, sums + j0,
                                 bias ? bias + j0 : nullptr, out + j0, out_stride, valid - j0);
}

// Every row of x through one packed block, a chunk of K at a time: tiles of kTileRows rows, then the remainder.
template <typename L>
void block_rows_any(const typename L::T* x, int64_t rows, int64_t x_stride, const typename L::T* block,
                    int64_t k_size, const typename L::T* bias, typename L::T* out, int64_t out_stride, int64_t valid) {
  thread_local std::vector<float> buffer, sums;
  sums.resize(rows * kBlock);
  const int64_t steps = (k_size + L::kStep - 1) / L::kStep;
  for (int64_t s0 = 0; s0 < steps; s0 += kChunkSteps) {
    const int64_t s1 = std::min(steps, s0 + kChunkSteps), k0 = s0 * L::kStep;
    const typename L::T* chunk = block + s0 * kBlock * L::kStep;
    const bool first = s0 == 0, last = s1 == steps;
    for (int64_t m0 = 0, tile = 0; m0 < rows; m0 += tile) {
      tile = std::min<int64_t>(kTileRows, rows - m0);
      if (L::kLeadRow && m0 == 0) tile = 1;
      int64_t stride = x_stride;
      const float* xt = L::rows_as_float(x + m0 * x_stride + k0, tile, x_stride, std::min(k_size, s1 * L::kStep) - k0,
                                         (s1 - s0) * L::kStep, buffer, stride);
      float* st = sums.data() + m0 * kBlock;
      typename L::T* ot = out + m0 * out_stride;
      switch (tile) {
        case 1: block_strips<L, 1, 8>(xt, stride, chunk, s1 - s0, first, last, st, bias, ot, out_stride, valid); break;
        case 2: block_strips<L, 2, 4>(xt, stride, chunk, s1 - s0, first, last, st, bias, ot, out_stride, valid); break;
        case 3: block_strips<L, 3, 4>(xt, stride, chunk, s1 - s0, first, last, st, bias, ot, out_stride, valid); break;
        case 4: block_strips<L, 4, 2>(xt, stride, chunk, s1 - s0, first, last, st, bias, ot, out_stride, valid); break;
        case 5: block_strips<L, 5, 2>(xt, stride, chunk, s1 - s0, first, last, st, bias, ot, out_stride, valid); break;
        default: block_strips<L, 6, 2>(xt, stride, chunk, s1 - s0, first, last, st, bias, ot, out_stride, valid); break;
      }
    }
  }
}
#endif

#if defined(XLLM_LINEAR_F32)

template <typename L>
void packed_linear_rows(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                        torch::Tensor& out) {
  using T = typename L::T;
  const int64_t rows = x.size(0), k_size = x.size(1), x_stride = x.stride(0), outputs = out.size(1);
  const T* xp = x.data_ptr<T>();
  const T* wp = packed.data_ptr<T>();
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const int64_t block_elements = packed.stride(0);
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t valid = std::min<int64_t>(kBlock, outputs - b * kBlock);
      block_rows_any<L>(xp, rows, x_stride, wp + b * block_elements, k_size, bp ? bp + b * kBlock : nullptr,
                        op + b * kBlock, outputs, valid);
    }
  });
}

#endif  // XLLM_LINEAR_F32

bool packs(at::ScalarType dtype) {
#if defined(XLLM_LINEAR_F32)
  if (dtype == at::kFloat) return true;
#endif
#if defined(XLLM_LINEAR_BF16)
  if (dtype == at::kBFloat16) return true;
#endif
  return false;
}

}  // namespace

// torch dtype names (float32, bfloat16) this build packs.
std::vector<std::string> packed_linear_dtypes() {
  std::vector<std::string> names;
  if (packs(at::kFloat)) names.push_back("float32");
  if (packs(at::kBFloat16)) names.push_back("bfloat16");
  return names;
}

namespace {

// The packed layout is, block by block, a transpose of 32-bit units (a float32, or a pair of bfloat16 along
// K): [64, steps] -> [steps, 64]. Done in 32 x 32 tiles, so that neither side strides through memory a row
// at a time, and blocks in parallel: a load packs every linear weight of the model, and the permuted copy of
// ATen this replaces ran at a fifth of this speed (and held a zero-padded temporary of every weight).
void transpose_blocks(const uint32_t* weight, int64_t blocks, int64_t steps, uint32_t* packed) {
  constexpr int64_t kTile = 32;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint32_t* src = weight + b * kBlock * steps;
      uint32_t* dst = packed + b * kBlock * steps;
      for (int64_t s0 = 0; s0 < steps; s0 += kTile) {
        const int64_t s1 = std::min(steps, s0 + kTile);
        for (int64_t j0 = 0; j0 < kBlock; j0 += kTile)
          for (int64_t s = s0; s < s1; ++s)
            for (int64_t j = j0; j < j0 + kTile; ++j) dst[s * kBlock + j] = src[j * steps + s];
      }
    }
  });
}

}  // namespace

namespace {

// [..., N, K] -> the packed layout above, zero-padded to whole blocks (and to an even K in bfloat16), one packed
// matrix per leading index: [N, K] -> [blocks, steps, 64, pair], a stack of experts [E, N, K] -> [E, blocks, ...].
torch::Tensor pack_weight(torch::Tensor weight) {
  const int64_t outputs = weight.size(-2), k_size = weight.size(-1), blocks = (outputs + kBlock - 1) / kBlock;
  const int64_t pair = weight.scalar_type() == at::kBFloat16 ? 2 : 1, steps = (k_size + pair - 1) / pair;
  auto source = weight.reshape({-1, outputs, k_size}).contiguous();
  const int64_t matrices = source.size(0);
  if (blocks * kBlock != outputs || steps * pair != k_size) {  // rare shapes: pad, then pack as any other
    auto padded = at::zeros({matrices, blocks * kBlock, steps * pair}, weight.options());
    padded.narrow(1, 0, outputs).narrow(2, 0, k_size).copy_(source);
    source = padded;
  }
  auto sizes = weight.sizes().vec();
  sizes.resize(sizes.size() - 2);
  for (int64_t size : {blocks, steps, kBlock, pair}) sizes.push_back(size);
  auto packed = at::empty(sizes, weight.options());
  transpose_blocks(static_cast<const uint32_t*>(source.data_ptr()), matrices * blocks, steps,
                   static_cast<uint32_t*>(packed.data_ptr()));
  return packed;
}

}  // namespace

torch::Tensor pack_linear_weight(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && packs(weight.scalar_type()), "pack_linear_weight: a 2-d weight of a packed dtype");
  return pack_weight(weight);
}

namespace {

// out[t, k] = weight[ids[t], k], read from the packed layout: row n is lane n % 64 of block n / 64, one
// 32-bit unit (a float32, or a pair of bfloat16) per K step. A strided read (one cache line per step and
// row), but a step gathers a few rows: a tied embedding then needs no plain copy of its table.
template <typename Bits>
void gather_rows(const Bits* packed, int64_t steps, int64_t pair, const int64_t* ids, int64_t tokens,
                 int64_t k_size, Bits* out) {
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Bits* row = packed + ((ids[t] / kBlock) * steps * kBlock + ids[t] % kBlock) * pair;
      for (int64_t k = 0; k < k_size; ++k) out[t * k_size + k] = row[(k / pair) * kBlock * pair + k % pair];
    }
  });
}

}  // namespace

// aten.embedding.out's contract on a packed weight of ``rows`` rows: out [..., K] = weight[indices].
torch::Tensor packed_embedding_out(torch::Tensor packed, torch::Tensor indices, int64_t rows, torch::Tensor out) {
  const auto dtype = packed.scalar_type();
  const int64_t pair = dtype == at::kBFloat16 ? 2 : 1, k_size = out.size(-1);
  TORCH_CHECK(packs(dtype) && out.scalar_type() == dtype && packed.dim() == 4, "packed_embedding: dtypes");
  TORCH_CHECK(out.is_contiguous() && out.numel() == indices.numel() * k_size,
              "packed_embedding: out must be [tokens, K]");
  TORCH_CHECK(packed.size(0) * kBlock >= rows && packed.size(1) * pair >= k_size, "packed_embedding: weight shape");
  const auto ids = indices.reshape({-1}).to(at::kLong).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < ids.numel(); ++t) {
    TORCH_CHECK(id[t] >= 0 && id[t] < rows, "packed_embedding: index out of range");
  }
  if (pair == 1 || k_size % 2 == 0) {  // whole 32-bit units: a float32, or a pair of bfloat16
    gather_rows(static_cast<const uint32_t*>(packed.data_ptr()), packed.size(1), 1, id, ids.numel(), k_size / pair,
                static_cast<uint32_t*>(out.data_ptr()));
  } else {
    gather_rows(static_cast<const uint16_t*>(packed.data_ptr()), packed.size(1), pair, id, ids.numel(), k_size,
                static_cast<uint16_t*>(out.data_ptr()));
  }
  return out;
}

torch::Tensor packed_embedding(torch::Tensor packed, torch::Tensor indices, int64_t rows, int64_t k_size) {
  auto sizes = indices.sizes().vec();
  sizes.push_back(k_size);
  return packed_embedding_out(packed, indices, rows, at::empty(sizes, packed.options()));
}

// aten.linear.out's contract on a packed weight: out [..., N] = input [..., K] @ weight.T + bias.
torch::Tensor packed_linear_out(torch::Tensor input, torch::Tensor packed, c10::optional<torch::Tensor> bias,
                                torch::Tensor out) {
  auto x = input.reshape({-1, input.size(-1)});
  if (x.stride(-1) != 1) x = x.contiguous();
  const auto dtype = x.scalar_type();
  TORCH_CHECK(packs(dtype) && packed.scalar_type() == dtype && out.scalar_type() == dtype, "packed_linear: dtypes");
  TORCH_CHECK(out.is_contiguous() && out.numel() == x.size(0) * out.size(-1), "packed_linear: out must be [rows, N]");
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) * kBlock >= out.size(-1) && packed.size(1) * packed.size(3) >= x.size(1),
              "packed_linear: weight does not match the input and output");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->scalar_type() == dtype && bias->numel() == out.size(-1)),
              "packed_linear: bias");
  auto flat = out.view({x.size(0), out.size(-1)});
#if defined(XLLM_LINEAR_F32)
  if (dtype == at::kFloat) packed_linear_rows<F32>(x, packed, bias, flat);
#endif
#if defined(XLLM_LINEAR_BF16)
  if (dtype == at::kBFloat16) packed_linear_rows<BF16>(x, packed, bias, flat);
#endif
  return out;
}

torch::Tensor packed_linear(torch::Tensor input, torch::Tensor packed, c10::optional<torch::Tensor> bias,
                            int64_t out_features) {
  auto sizes = input.sizes().vec();
  sizes.back() = out_features;
  return packed_linear_out(input, packed, bias, at::empty(sizes, input.options()));
}

// A linear layer's bfloat16 outputs [..., N] as float32: the LM head's ``.float()`` (models/decoder.py), in the
// kernels that take it in (packed_linear_float here, int8_linear_float, int4_linear_float). Each 64-output
// block is widened by the thread that computed it: the kernels run their blocks as one parallel loop over
// [0, blocks), and at::parallel_for cuts the same range the same way, so every core widens what it wrote, from
// its own caches. A separate cast reads all the logits on one core after the weights' stream has evicted its
// code and data (77-82 us of a bfloat16 batch-1 step on Zen 4). The values are the cast's, bit for bit.
torch::Tensor widened_by_blocks(const torch::Tensor& rounded, int64_t blocks) {
  TORCH_CHECK(rounded.scalar_type() == at::kBFloat16 && rounded.is_contiguous(), "widened_by_blocks: bfloat16 rows");
  auto out = at::empty(rounded.sizes(), rounded.options().dtype(at::kFloat));
  const int64_t width = rounded.size(-1), rows = rounded.numel() / std::max<int64_t>(width, 1);
  const at::BFloat16* from = rounded.data_ptr<at::BFloat16>();
  float* to = out.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t low = begin * kBlock, high = std::min(width, end * kBlock);
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t j = m * width + low; j < m * width + high; ++j) to[j] = static_cast<float>(from[j]);
  });
  return out;
}

// ``packed_linear(...).float()`` for bfloat16 input and weight (see widened_by_blocks).
torch::Tensor packed_linear_float(torch::Tensor input, torch::Tensor packed, c10::optional<torch::Tensor> bias,
                                  int64_t out_features) {
  TORCH_CHECK(input.scalar_type() == at::kBFloat16, "packed_linear_float takes bfloat16 input");
  return widened_by_blocks(packed_linear(input, packed, bias, out_features), packed.size(0));
}

// ---- Mixture-of-experts: the routed experts on packed weights ------------------------------------------------
// xllm::moe_experts on the CPU (ops/moe.py; runtime/platform/cpu.py packs the stacked expert weights at load,
// one packed matrix per expert: gate_up [E, blocks of 2I, steps of H, 64, pair], down [E, blocks of H, steps of
// I, 64, pair]). Each expert runs only its own rows through the packed kernel above, gate and up merged. The
// (token, slot) pairs are grouped by expert with a counting sort (stable: token order kept within an expert);
// each linear is one parallel loop over the blocks of every routed expert together, so at batch 1 (2 experts x
// 32 blocks of gate_up) both cores stream weights. The combine adds each token's experts in ascending id order
// into out, rounded to out's dtype after each add: the composite's order (and transformers' loop's), so bf16
// results agree with it as closely as the dense packed kernel agrees with aten.linear.

void silu_and_mul_span(const float* gate, const float* up, float* dst, int64_t width);  // cpu_kernels.cpp
void silu_and_mul_span(const at::BFloat16* gate, const at::BFloat16* up, at::BFloat16* dst, int64_t width);

namespace {

#if defined(XLLM_LINEAR_F32)

struct Group {  // rows start .. start + count of the grouped pairs, all routed to expert
  int64_t expert, start, count;
};

// One linear layer of every group: group g's rows of x [pairs, K] through its expert's packed matrix, one
// parallel loop over the blocks of every group together.
template <typename L>
void grouped_linear(const std::vector<Group>& groups, const typename L::T* x, int64_t k_size,
                    const torch::Tensor& packed, int64_t outputs, typename L::T* out) {
  const int64_t blocks = packed.size(1), block_elements = packed.stride(1), expert_elements = packed.stride(0);
  const typename L::T* wp = packed.data_ptr<typename L::T>();
  at::parallel_for(0, static_cast<int64_t>(groups.size()) * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const Group& g = groups[item / blocks];
      const int64_t b = item % blocks;
      const typename L::T* block = wp + g.expert * expert_elements + b * block_elements;
      block_rows_any<L>(x + g.start * k_size, g.count, k_size, block, k_size, nullptr, out + g.start * outputs + b * kBlock,
                        outputs, std::min<int64_t>(kBlock, outputs - b * kBlock));
    }
  });
}

// out[t] = sum over t's pairs, ascending expert, of round(weight * y[pair]), rounded to T after each add.
#if defined(__AVX512F__)
template <typename L>
void combine_rows(const typename L::T* y, const float* weight, const int64_t* pair_of, const int64_t* token_start,
                  const int64_t* positions, int64_t tokens, int64_t width, typename L::T* out) {
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      typename L::T* row = out + t * width;
      for (int64_t h = 0; h < width; h += 16) {
        const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, width - h)) - 1);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = token_start[t]; i < token_start[t + 1]; ++i) {
          const int64_t q = positions[i];
          const __m512 scaled = _mm512_mul_ps(L::widen(y + q * width + h, mask), _mm512_set1_ps(weight[pair_of[q]]));
          acc = L::round(_mm512_add_ps(acc, L::round(scaled)));
        }
        L::store(row + h, acc, mask);
      }
    }
  });
}
#else
template <typename L>
void combine_rows(const typename L::T* y, const float* weight, const int64_t* pair_of, const int64_t* token_start,
                  const int64_t* positions, int64_t tokens, int64_t width, typename L::T* out) {
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      typename L::T* row = out + t * width;
      for (int64_t h = 0; h < width; h += 8) {
        const int64_t lanes = std::min<int64_t>(8, width - h);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = token_start[t]; i < token_start[t + 1]; ++i) {
          const int64_t q = positions[i];
          const __m256 scaled = _mm256_mul_ps(L::widen(y + q * width + h, lanes), _mm256_set1_ps(weight[pair_of[q]]));
          acc = L::round(_mm256_add_ps(acc, L::round(scaled)));
        }
        L::store(row + h, acc, lanes);
      }
    }
  });
}
#endif

template <typename L>
void packed_experts(const torch::Tensor& hidden, const float* weight, const int64_t* id, int64_t top_k,
                    const torch::Tensor& gate_up, const torch::Tensor& down, int64_t intermediate, torch::Tensor& out) {
  using T = typename L::T;
  const int64_t tokens = hidden.size(0), width = hidden.size(1), experts = gate_up.size(0);
  // Counting sort of the pairs this op computes (id -1: another rank's) by expert.
  std::vector<int64_t> starts(experts + 1, 0);
  for (int64_t p = 0; p < tokens * top_k; ++p) {
    TORCH_CHECK(id[p] >= -1 && id[p] < experts, "packed_moe_experts: expert id ", id[p], " out of range");
    if (id[p] >= 0) ++starts[id[p] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) starts[e + 1] += starts[e];
  const int64_t pairs = starts[experts];
  std::vector<int64_t> pair_of(pairs), next(starts.begin(), starts.end() - 1);  // grouped position -> pair
  for (int64_t p = 0; p < tokens * top_k; ++p)
    if (id[p] >= 0) pair_of[next[id[p]]++] = p;
  std::vector<Group> groups;
  for (int64_t e = 0; e < experts; ++e)
    if (starts[e + 1] > starts[e]) groups.push_back({e, starts[e], starts[e + 1] - starts[e]});
  // Each token's grouped positions in ascending order, that is by ascending expert: the combine's order.
  std::vector<int64_t> token_start(tokens + 1, 0), positions(pairs);
  for (int64_t q = 0; q < pairs; ++q) ++token_start[pair_of[q] / top_k + 1];
  for (int64_t t = 0; t < tokens; ++t) token_start[t + 1] += token_start[t];
  std::vector<int64_t> fill(token_start.begin(), token_start.end() - 1);
  for (int64_t q = 0; q < pairs; ++q) positions[fill[pair_of[q] / top_k]++] = q;

  // The grouped rows, their merged gate/up projection, its activation and the down projection.
  auto scratch = at::empty({pairs * (2 * width + 3 * intermediate)}, hidden.options());
  T* x = scratch.data_ptr<T>();
  T* projected = x + pairs * width;
  T* activated = projected + pairs * 2 * intermediate;
  T* y = activated + pairs * intermediate;
  const T* rows = hidden.data_ptr<T>();
  const int64_t row_stride = hidden.stride(0);
  at::parallel_for(0, pairs, 64, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const T* row = rows + (pair_of[q] / top_k) * row_stride;
      std::copy(row, row + width, x + q * width);
    }
  });
  grouped_linear<L>(groups, x, width, gate_up, 2 * intermediate, projected);
  at::parallel_for(0, pairs, 16, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const T* gate = projected + q * 2 * intermediate;
      silu_and_mul_span(gate, gate + intermediate, activated + q * intermediate, intermediate);
    }
  });
  grouped_linear<L>(groups, activated, intermediate, down, width, y);
  combine_rows<L>(y, weight, pair_of.data(), token_start.data(), positions.data(), tokens, width, out.data_ptr<T>());
}

#endif  // XLLM_LINEAR_F32

}  // namespace

// xllm::moe_experts_out's experts on packed weights (pack_linear_weight of each [E, N, K] stack): out [T, H] =
// sum over k of topk_weights[t, k] * expert_{ids[t, k]}(hidden[t]), where ids are rows of the stacks (-1: not
// computed here, as ops/moe.py's local_expert_ids gives them) and topk_weights float32 or hidden's dtype.
torch::Tensor packed_moe_experts_out(torch::Tensor hidden, torch::Tensor topk_weights, torch::Tensor ids,
                                     torch::Tensor gate_up, torch::Tensor down, int64_t intermediate,
                                     torch::Tensor out) {
  const auto dtype = hidden.scalar_type();
  const int64_t pair = dtype == at::kBFloat16 ? 2 : 1;
  TORCH_CHECK(packs(dtype) && gate_up.scalar_type() == dtype && down.scalar_type() == dtype &&
                  out.scalar_type() == dtype, "packed_moe_experts: dtypes");
  TORCH_CHECK(hidden.dim() == 2 && out.is_contiguous() && out.sizes() == hidden.sizes(),
              "packed_moe_experts: hidden and out must be [tokens, hidden]");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == hidden.size(0) && topk_weights.sizes() == ids.sizes(),
              "packed_moe_experts: topk_weights and ids must be [tokens, k]");
  const int64_t width = hidden.size(1);
  TORCH_CHECK(gate_up.dim() == 5 && down.dim() == 5 && gate_up.size(0) == down.size(0) &&
                  gate_up.size(1) * kBlock >= 2 * intermediate && gate_up.size(2) * pair >= width &&
                  down.size(1) * kBlock >= width && down.size(2) * pair >= intermediate && gate_up.is_contiguous() &&
                  down.is_contiguous(),
              "packed_moe_experts: packed expert weights do not match hidden and intermediate");
  if (hidden.stride(1) != 1) hidden = hidden.contiguous();
  const auto weights = topk_weights.to(at::kFloat).contiguous();
  const auto local = ids.to(at::kLong).contiguous();
  const float* w = weights.data_ptr<float>();
  const int64_t* id = local.data_ptr<int64_t>();
#if defined(XLLM_LINEAR_F32)
  if (dtype == at::kFloat) packed_experts<F32>(hidden, w, id, ids.size(1), gate_up, down, intermediate, out);
#endif
#if defined(XLLM_LINEAR_BF16)
  if (dtype == at::kBFloat16) packed_experts<BF16>(hidden, w, id, ids.size(1), gate_up, down, intermediate, out);
#endif
  return out;
}

torch::Tensor pack_expert_weights(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 3 && packs(weight.scalar_type()), "pack_expert_weights: a 3-d stack of a packed dtype");
  return pack_weight(weight);
}

void register_linear(pybind11::module& m) {
  namespace py = pybind11;
  m.def("packed_linear_dtypes", &packed_linear_dtypes);
  m.def("pack_linear_weight", &pack_linear_weight, py::arg("weight"));
  xllm_replay::def_kernel(m, "packed_linear_out", &packed_linear_out, py::arg("input"), py::arg("packed"),
                          py::arg("bias"), py::arg("out"));
  xllm_replay::def_kernel(m, "packed_embedding_out", &packed_embedding_out, py::arg("packed"), py::arg("indices"),
                          py::arg("rows"), py::arg("out"));
  xllm_replay::def_kernel(m, "packed_embedding", &packed_embedding, py::arg("packed"), py::arg("indices"),
                          py::arg("rows"), py::arg("k_size"));
  xllm_replay::def_kernel(m, "packed_linear", &packed_linear, py::arg("input"), py::arg("packed"), py::arg("bias"),
                          py::arg("out_features"));
  xllm_replay::def_kernel(m, "packed_linear_float", &packed_linear_float, py::arg("input"), py::arg("packed"),
                          py::arg("bias"), py::arg("out_features"));
  m.def("pack_expert_weights", &pack_expert_weights, py::arg("weight"));
  xllm_replay::def_kernel(m, "packed_moe_experts_out", &packed_moe_experts_out, py::arg("hidden"),
                          py::arg("topk_weights"), py::arg("ids"), py::arg("gate_up"), py::arg("down"),
                          py::arg("intermediate"), py::arg("out"));
}
