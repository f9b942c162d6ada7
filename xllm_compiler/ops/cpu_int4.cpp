// xllm::linear_w4 on CPU: int4 weights, asymmetric per group of K (w = q * scale + offset, q in [0, 15]),
// against input rows quantized to int8 per group on the fly, multiplied with AVX2's vpmaddubsw.
//
// Why int8 inputs: at decode the layer streams its weight, half a byte per value plus the group's scale and
// offset; the products must then cost less than the bytes take to arrive. vpmaddubsw multiplies unsigned
// bytes (the weights, 0..15, as they are stored: no zero point to subtract per value) by signed ones (the
// inputs) and adds pairs into int16: 32 products per instruction. A pair is at most 2 * 15 * 127 = 3810, so
// eight of them (4 K steps) sum in int16 without saturating before vpmaddwd widens them to int32 and the
// chunk goes into float, scaled by the group's weight scale and the row's input scale for the group. The
// offset needs no product at all: sum_k offset * x[k] = offset * (the group's sum of x), one multiply-add
// per group. Each group of inputs gets a scale of its own (max|x| / 127 over the group, as llama.cpp's
// Q8_0 activations have per 32): it costs nothing more, the float conversion is per group anyway.
//
// Packed once at load (runtime/platform/cpu.py): the weight as uint8 [ceil(N/32), Kp/8, 32, 4], Kp the K of
// whole groups; byte b of output j at step s holds q[j, 8s + b] in its low nibble and q[j, 8s + 4 + b] in
// its high one (zero past K), so one 32-byte load is 8 outputs x 8 K and two masks split it into the two
// operands of vpmaddubsw. Scales and offsets as float32 [ceil(N/32), G, 32]. A register tile of 1 row x 32
// outputs at decode, up to 4 rows x 16 outputs above. Built where the compiler targets AVX2 with FMA (every
// x86-64 CPU of the last decade, AVX-512 ones too); elsewhere int4_linear_dtypes() is empty and the op runs
// its composite (ops/quant.py). The sums are exact in int32; the results differ from the composite by the
// rounding of the inputs to int8 only (bounded in tests/quant/test_int4_linear.py).
//
// With AVX512-VNNI the same packed weights run 16 outputs per 64-byte load through vpdpbusd, which multiplies
// the nibbles (unsigned) by four input bytes (signed) and adds the four products into int32 at once: no int16
// stage that must be widened every four steps, so a group sums in int32 whatever its length, and a step is a
// load, a shift, two masks and two vpdpbusd per 16 outputs, where AVX2 needs twice the instructions for 8. At
// decode that is what kept the AVX2 tile below the rate the weight streams at (it read int4 at 18.6 GB/s
// where the int8 kernel read 26 on a Sapphire Rapids). bfloat16 rows take it where AVX512-BF16 rounds the
// outputs; elsewhere they keep the AVX2 tile.
#include <torch/extension.h>
#include "cpu_replay.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#include <type_traits>
#include "cpu_avx2.h"
#include "cpu_avx512.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define XLLM_INT4_VNNI 1  // the VNNI tile below is built
#endif

namespace {

constexpr int64_t kBlock = 32;  // outputs per packed block: four 8-lane vectors
constexpr int64_t kStep = 8;    // K per step: 8 nibbles in each output's 32 bits
constexpr int64_t kChunk = 4;   // steps summed in int16 before widening (8 pairs of at most 3810)
constexpr int64_t kGroupAlign = kStep * kChunk;  // group sizes are whole chunks
constexpr int kTileRows = 4;

#if defined(__AVX2__) && defined(__FMA__)
using namespace xllm_avx2;

// Rows x 8 * Vectors outputs (from vector v0 of the block) of one packed block:
// out[m, j] = sum_g (xs[m, g] * scale[g, j] * sum_{k in g} xq[m, k] q[j, k] + offset[g, j] * xsum[m, g]) + bias[j].
template <typename T, int Rows, int Vectors>
void block_tile(const int8_t* q, int64_t q_stride, const float* x_scale, const float* x_sum, int64_t groups,
                const uint8_t* block, int64_t group_steps, const float* scale, const float* offset, int v0,
                const T* bias, T* out, int64_t out_stride, int64_t valid) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[Rows][Vectors];
  for (int m = 0; m < Rows; ++m)
    for (int v = 0; v < Vectors; ++v) acc[m][v] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t c = 0; c < group_steps; c += kChunk) {
      __m256i part[Rows][Vectors];
      for (int m = 0; m < Rows; ++m)
        for (int v = 0; v < Vectors; ++v) part[m][v] = _mm256_setzero_si256();
      // Not unrolled: unrolled, GCC reassociates the chunk's int16 sums into a tree, computing every product
      // first and spilling them (1.7x slower at one row).
#pragma GCC unroll 1
      for (int64_t t = 0; t < kChunk; ++t) {
        const int64_t s = g * group_steps + c + t;
        const uint8_t* w = block + s * kBlock * 4 + v0 * 32;
        for (int v = 0; v < Vectors; ++v) {
          const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * v));
          const __m256i low = _mm256_and_si256(packed, nibble);
          const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
          for (int m = 0; m < Rows; ++m) {
            const int8_t* xq = q + m * q_stride + s * kStep;
            part[m][v] = _mm256_add_epi16(part[m][v], _mm256_maddubs_epi16(low, broadcast4(xq)));
            part[m][v] = _mm256_add_epi16(part[m][v], _mm256_maddubs_epi16(high, broadcast4(xq + 4)));
          }
        }
      }
      for (int v = 0; v < Vectors; ++v) {
        const __m256 group_scale = _mm256_loadu_ps(scale + g * kBlock + 8 * (v0 + v));
        for (int m = 0; m < Rows; ++m) {
          const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(part[m][v], ones));
          acc[m][v] = _mm256_fmadd_ps(dot, _mm256_mul_ps(group_scale, _mm256_set1_ps(x_scale[m * groups + g])), acc[m][v]);
        }
      }
    }
    for (int v = 0; v < Vectors; ++v) {
      const __m256 group_offset = _mm256_loadu_ps(offset + g * kBlock + 8 * (v0 + v));
      for (int m = 0; m < Rows; ++m)
        acc[m][v] = _mm256_fmadd_ps(group_offset, _mm256_set1_ps(x_sum[m * groups + g]), acc[m][v]);
    }
  }
  for (int v = 0; v < Vectors; ++v) {
    const int64_t first = 8 * (v0 + v);
    if (first >= valid) break;
    const int64_t lanes = std::min<int64_t>(8, valid - first);
    const __m256 b = bias != nullptr ? load8(bias + first, lanes) : _mm256_setzero_ps();
    for (int m = 0; m < Rows; ++m) store8(out + m * out_stride + first, _mm256_add_ps(acc[m][v], b), lanes);
  }
}

#if defined(XLLM_INT4_VNNI)
// Which input dtypes take the VNNI tile: float32 always, bfloat16 where store16 rounds it (AVX512-BF16).
template <typename T>
constexpr bool kVnni = std::is_same_v<T, float>
#if defined(__AVX512BF16__)
                       || std::is_same_v<T, at::BFloat16>
#endif
    ;

// Rows x 32 outputs of one packed block, the sums as in block_tile. One row sums the low and the high nibbles
// apart (four chains of vpdpbusd, not two), so that the step waits on the loads, not on the instruction's
// latency; more rows have chains enough.
template <typename T, int Rows>
void block_tile_vnni(const int8_t* q, int64_t q_stride, const float* x_scale, const float* x_sum, int64_t groups,
                     const uint8_t* block, int64_t group_steps, const float* scale, const float* offset,
                     const T* bias, T* out, int64_t out_stride, int64_t valid) {
  using namespace xllm_avx512;
  constexpr int kSums = Rows == 1 ? 2 : 1;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[Rows][2];
  for (int m = 0; m < Rows; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dot[Rows][2][kSums];
    for (int m = 0; m < Rows; ++m)
      for (int v = 0; v < 2; ++v)
        for (int i = 0; i < kSums; ++i) dot[m][v][i] = _mm512_setzero_si512();
    for (int64_t t = 0; t < group_steps; ++t) {
      const int64_t s = g * group_steps + t;
      const uint8_t* w = block + s * kBlock * 4;
      for (int v = 0; v < 2; ++v) {
        const __m512i packed = _mm512_loadu_si512(w + 64 * v);
        const __m512i low = _mm512_and_si512(packed, nibble);
        const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
        for (int m = 0; m < Rows; ++m) {
          int32_t first, second;
          std::memcpy(&first, q + m * q_stride + s * kStep, 4);
          std::memcpy(&second, q + m * q_stride + s * kStep + 4, 4);
          dot[m][v][0] = _mm512_dpbusd_epi32(dot[m][v][0], low, _mm512_set1_epi32(first));
          dot[m][v][kSums - 1] = _mm512_dpbusd_epi32(dot[m][v][kSums - 1], high, _mm512_set1_epi32(second));
        }
      }
    }
    for (int v = 0; v < 2; ++v) {
      const __m512 group_scale = _mm512_loadu_ps(scale + g * kBlock + 16 * v);
      const __m512 group_offset = _mm512_loadu_ps(offset + g * kBlock + 16 * v);
      for (int m = 0; m < Rows; ++m) {
        __m512i sum = dot[m][v][0];
        if constexpr (kSums == 2) sum = _mm512_add_epi32(sum, dot[m][v][1]);
        const __m512 weight = _mm512_mul_ps(group_scale, _mm512_set1_ps(x_scale[m * groups + g]));
        acc[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), weight, acc[m][v]);
        acc[m][v] = _mm512_fmadd_ps(group_offset, _mm512_set1_ps(x_sum[m * groups + g]), acc[m][v]);
      }
    }
  }
  for (int v = 0; v < 2 && 16 * v < valid; ++v) {
    const __mmask16 mask = lanes_mask(std::min<int64_t>(16, valid - 16 * v));
    const __m512 b = bias != nullptr ? load16(bias + 16 * v, mask) : _mm512_setzero_ps();
    for (int m = 0; m < Rows; ++m) store16(out + m * out_stride + 16 * v, _mm512_add_ps(acc[m][v], b), mask);
  }
}
#else
template <typename T>
constexpr bool kVnni = false;
#endif

template <typename T, int Rows>
void block_rows(const int8_t* q, int64_t q_stride, const float* x_scale, const float* x_sum, int64_t groups,
                const uint8_t* block, int64_t group_steps, const float* scale, const float* offset, const T* bias,
                T* out, int64_t out_stride, int64_t valid) {
#if defined(XLLM_INT4_VNNI)
  if constexpr (kVnni<T>) {
    block_tile_vnni<T, Rows>(q, q_stride, x_scale, x_sum, groups, block, group_steps, scale, offset, bias, out,
                             out_stride, valid);
    return;
  }
#endif
  if constexpr (Rows == 1) {
    block_tile<T, 1, 4>(q, q_stride, x_scale, x_sum, groups, block, group_steps, scale, offset, 0, bias, out,
                        out_stride, valid);
  } else {
    for (int v0 = 0; v0 < 4 && 8 * v0 < valid; v0 += 2)
      block_tile<T, Rows, 2>(q, q_stride, x_scale, x_sum, groups, block, group_steps, scale, offset, v0, bias, out,
                             out_stride, valid);
  }
}

// Per-thread scratch for the quantized rows, sized once to the largest step.
struct Scratch {
  std::vector<int8_t> q;
  std::vector<float> scale, sum;
};

template <typename T>
void int4_linear_rows(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                      const torch::Tensor& offset, int64_t group_size, const c10::optional<torch::Tensor>& bias,
                      torch::Tensor& out) {
  const int64_t rows = x.size(0), k_size = x.size(1), x_stride = x.stride(0), outputs = out.size(1);
  const int64_t groups = scale.size(1), q_stride = groups * group_size, group_steps = group_size / kStep;
  thread_local Scratch scratch;
  if (static_cast<int64_t>(scratch.q.size()) < rows * q_stride) scratch.q.resize(rows * q_stride);
  if (static_cast<int64_t>(scratch.scale.size()) < rows * groups) {
    scratch.scale.resize(rows * groups);
    scratch.sum.resize(rows * groups);
  }
  int8_t* q = scratch.q.data();
  float *x_scale = scratch.scale.data(), *x_sum = scratch.sum.data();
  const T* xp = x.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t g = 0; g < groups; ++g) {
        // ceil(K / group_size) groups: none is empty, the last may be short
        const int64_t start = g * group_size, count = std::min(group_size, k_size - start);
        const T* span = xp + m * x_stride + start;
        int8_t* qg = q + m * q_stride + start;
        const float top = abs_max(span, count);
        x_sum[m * groups + g] = quantize_span(span, count, top > 0.f ? 127.f / top : 0.f, qg);
        x_scale[m * groups + g] = top / 127.f;
        std::fill(qg + count, qg + group_size, int8_t{0});
      }
    }
  });
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *op = offset.data_ptr<float>();
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* yp = out.data_ptr<T>();
  const int64_t block_bytes = packed.stride(0), block_groups = groups * kBlock;
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* block = wp + b * block_bytes;
      const float *bs = sp + b * block_groups, *bo = op + b * block_groups;
      const int64_t valid = std::min<int64_t>(kBlock, outputs - b * kBlock);
      const T* block_bias = bp ? bp + b * kBlock : nullptr;
      for (int64_t m0 = 0; m0 < rows; m0 += kTileRows) {
        const int8_t* qt = q + m0 * q_stride;
        const float *xs = x_scale + m0 * groups, *xsum = x_sum + m0 * groups;
        T* yt = yp + m0 * outputs + b * kBlock;
        switch (std::min<int64_t>(kTileRows, rows - m0)) {
          case 1: block_rows<T, 1>(qt, q_stride, xs, xsum, groups, block, group_steps, bs, bo, block_bias, yt, outputs, valid); break;
          case 2: block_rows<T, 2>(qt, q_stride, xs, xsum, groups, block, group_steps, bs, bo, block_bias, yt, outputs, valid); break;
          case 3: block_rows<T, 3>(qt, q_stride, xs, xsum, groups, block, group_steps, bs, bo, block_bias, yt, outputs, valid); break;
          default: block_rows<T, 4>(qt, q_stride, xs, xsum, groups, block, group_steps, bs, bo, block_bias, yt, outputs, valid); break;
        }
      }
    }
  });
}
#endif  // __AVX2__ && __FMA__

bool runs(at::ScalarType dtype) {
#if defined(__AVX2__) && defined(__FMA__)
  return dtype == at::kFloat || dtype == at::kBFloat16;
#else
  return false;
#endif
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

// torch dtype names of the inputs (and outputs) this build's int4 kernel takes.
std::vector<std::string> int4_linear_dtypes() {
  std::vector<std::string> names;
  if (runs(at::kFloat)) names.push_back("float32");
  if (runs(at::kBFloat16)) names.push_back("bfloat16");
  return names;
}

// uint8 [N, ceil(K/2)] (element k of a row in byte k/2, low nibble for even k) -> the layout at the top.
torch::Tensor pack_int4_weight(torch::Tensor qweight, int64_t k_size, int64_t group_size) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.size(1) == ceil_div(k_size, 2),
              "pack_int4_weight: a uint8 [N, ceil(K/2)] weight");
  TORCH_CHECK(group_size > 0 && group_size % kGroupAlign == 0, "pack_int4_weight: group size a multiple of 32");
  const int64_t outputs = qweight.size(0), blocks = ceil_div(outputs, kBlock);
  const int64_t padded_k = ceil_div(k_size, group_size) * group_size;
  auto values = at::stack({qweight.bitwise_and(15), qweight.bitwise_right_shift(4)}, -1).view({outputs, -1});
  auto padded = at::zeros({blocks * kBlock, padded_k}, qweight.options());
  padded.narrow(0, 0, outputs).narrow(1, 0, k_size).copy_(values.narrow(1, 0, k_size));
  // [blocks, 32, steps, half, 4] -> [blocks, steps, 32, 4, half]: byte b of a step's lane = (k = 8s + 4 half + b)
  auto lanes = padded.view({blocks, kBlock, padded_k / kStep, 2, 4}).permute({0, 2, 1, 4, 3});
  return lanes.select(-1, 0).bitwise_or(lanes.select(-1, 1).bitwise_left_shift(4)).contiguous();
}

// float32 [N, G] (the scales or the offsets of the groups) -> [ceil(N/32), G, 32], zero past N.
torch::Tensor pack_int4_scales(torch::Tensor values) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == at::kFloat, "pack_int4_scales: float32 [N, G]");
  const int64_t outputs = values.size(0), groups = values.size(1), blocks = ceil_div(outputs, kBlock);
  auto padded = at::zeros({blocks * kBlock, groups}, values.options());
  padded.narrow(0, 0, outputs).copy_(values);
  return padded.view({blocks, kBlock, groups}).permute({0, 2, 1}).contiguous();
}

// xllm::linear_w4_out's contract on packed tensors: out [..., N] = input [..., K] @ W.T + bias, W the
// dequantized weight, with the input rows quantized to int8 per group (see the top of this file).
torch::Tensor int4_linear_out(torch::Tensor input, torch::Tensor packed, torch::Tensor scale, torch::Tensor offset,
                              int64_t group_size, c10::optional<torch::Tensor> bias, torch::Tensor out) {
  auto x = input.reshape({-1, input.size(-1)});
  if (x.stride(-1) != 1) x = x.contiguous();
  const auto dtype = x.scalar_type();
  TORCH_CHECK(runs(dtype) && out.scalar_type() == dtype, "int4_linear: input and output of a dtype this build runs");
  TORCH_CHECK(group_size > 0 && group_size % kGroupAlign == 0, "int4_linear: group size a multiple of 32");
  const int64_t groups = ceil_div(x.size(1), group_size), outputs = out.size(-1);
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kByte && packed.size(1) * kStep == groups * group_size &&
                  packed.size(2) == kBlock && packed.size(3) == 4 && packed.is_contiguous() &&
                  packed.size(0) * kBlock >= outputs && packed.size(0) * kBlock < outputs + kBlock,
              "int4_linear: a weight packed by pack_int4_weight for this input and output");
  for (const auto* t : {&scale, &offset})
    TORCH_CHECK(t->dim() == 3 && t->scalar_type() == at::kFloat && t->is_contiguous() && t->size(0) == packed.size(0) &&
                    t->size(1) == groups && t->size(2) == kBlock,
                "int4_linear: scales and offsets packed by pack_int4_scales");
  TORCH_CHECK(out.is_contiguous() && out.numel() == x.size(0) * outputs, "int4_linear: out must be [rows, N]");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->scalar_type() == dtype && bias->numel() == outputs),
              "int4_linear: bias");
  auto flat = out.view({x.size(0), outputs});
#if defined(__AVX2__) && defined(__FMA__)
  if (dtype == at::kFloat) int4_linear_rows<float>(x, packed, scale, offset, group_size, bias, flat);
  if (dtype == at::kBFloat16) int4_linear_rows<at::BFloat16>(x, packed, scale, offset, group_size, bias, flat);
#endif
  return out;
}

torch::Tensor int4_linear(torch::Tensor input, torch::Tensor packed, torch::Tensor scale, torch::Tensor offset,
                          int64_t group_size, c10::optional<torch::Tensor> bias, int64_t out_features) {
  auto sizes = input.sizes().vec();
  sizes.back() = out_features;
  return int4_linear_out(input, packed, scale, offset, group_size, bias, at::empty(sizes, input.options()));
}

torch::Tensor widened_by_blocks(const torch::Tensor& rounded, int64_t blocks);  // cpu_linear.cpp

// ``int4_linear(...).float()`` for bfloat16 input: the LM head's logits (see widened_by_blocks).
torch::Tensor int4_linear_float(torch::Tensor input, torch::Tensor packed, torch::Tensor scale, torch::Tensor offset,
                                int64_t group_size, c10::optional<torch::Tensor> bias, int64_t out_features) {
  TORCH_CHECK(input.scalar_type() == at::kBFloat16, "int4_linear_float takes bfloat16 input");
  return widened_by_blocks(int4_linear(input, packed, scale, offset, group_size, bias, out_features), packed.size(0));
}

void register_int4(pybind11::module& m) {
  namespace py = pybind11;
  m.def("int4_linear_dtypes", &int4_linear_dtypes);
  m.def("pack_int4_weight", &pack_int4_weight, py::arg("qweight"), py::arg("k_size"), py::arg("group_size"));
  m.def("pack_int4_scales", &pack_int4_scales, py::arg("values"));
  xllm_replay::def_kernel(m, "int4_linear_out", &int4_linear_out, py::arg("input"), py::arg("packed"), py::arg("scale"),
                          py::arg("offset"), py::arg("group_size"), py::arg("bias"), py::arg("out"));
  xllm_replay::def_kernel(m, "int4_linear", &int4_linear, py::arg("input"), py::arg("packed"), py::arg("scale"),
                          py::arg("offset"), py::arg("group_size"), py::arg("bias"), py::arg("out_features"));
  xllm_replay::def_kernel(m, "int4_linear_float", &int4_linear_float, py::arg("input"), py::arg("packed"),
                          py::arg("scale"), py::arg("offset"), py::arg("group_size"), py::arg("bias"),
                          py::arg("out_features"));
}
