// xllm::linear_w8 on CPU: int8 weights (symmetric, one float scale per output channel) against input rows
// quantized to int8 on the fly, multiplied with AVX512-VNNI's vpdpbusd and summed in int32.
//
// Why int8 products for the inputs too: at decode the layer streams its weight, and int8 halves the bytes
// of bfloat16; at prefill it is bound by the multiply-adds, and vpdpbusd does four products per lane where
// vdpbf16ps does two. Quantizing a row costs O(K) against the layer's O(N K), so one kernel serves every
// row count. Each row's scale is max|x| / 127 (round to nearest even); the results differ from the op's
// weight-only composite (ops/quant.py) by that rounding only: the int32 sums are exact.
//
// Packed once at load (runtime/platform/cpu.py, as the float kernel's weights are): uint8
// [ceil(N/64), ceil(K/4), 64, 4], each weight plus 128. vpdpbusd multiplies unsigned bytes by signed ones:
// the weights are the unsigned side, the broadcast input bytes the signed side, and the 128 * sum(x_q) the
// bias adds to every output is taken back once per row. A register tile of up to 6 rows x 64 outputs, as in
// cpu_linear.cpp. Built where the compiler targets AVX512-VNNI (float32 inputs) and AVX512-BF16 (bfloat16).
//
// Without VNNI, AVX2 (with FMA) runs the same packed weights with vpmaddubsw, which multiplies unsigned bytes
// by signed ones and adds pairs into int16 with saturation: 255 * 127 * 2 does not fit, so the weights are
// taken back to signed (the +128 flipped off again, shared by every row of the tile) and each product is
// |x| * (w with the sign of x) (vpsignb), at most 2 * 127 * 127 per pair, as llama.cpp's AVX2 Q8_0 dot
// does; vpmaddwd then widens the pairs to int32. Elsewhere int8_linear_dtypes() is empty and the op runs its
// composite.
#include <torch/extension.h>
#include "cpu_replay.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "cpu_avx2.h"
#include "cpu_avx512.h"

// Which kernel this build has: AVX512-VNNI (BF16 for bfloat16), else AVX2 with FMA for both dtypes.
#if defined(__AVX512VNNI__)
#define XLLM_INT8_VNNI 1
#define XLLM_INT8_F32 1
#if defined(__AVX512BF16__)
#define XLLM_INT8_BF16 1
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#define XLLM_INT8_AVX2 1
#define XLLM_INT8_F32 1
#define XLLM_INT8_BF16 1
#endif

namespace {

constexpr int64_t kBlock = 64;  // outputs per packed block: four 16-lane vectors
constexpr int64_t kStep = 4;    // K per 32-bit lane of vpdpbusd
constexpr int kTileRows = 6;

#if defined(XLLM_INT8_VNNI)

using namespace xllm_avx512;

// One row: q[k] = round(x[k] * 127 / max|x|) (zero-padded to ``padded``), its scale max|x| / 127 and sum(q).
template <typename T>
void quantize_row(const T* x, int64_t k_size, int64_t padded, int8_t* q, float* scale, int32_t* sum) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_size; k += 16) {
    amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x + k, lanes_mask(std::min<int64_t>(16, k_size - k)))));
  }
  const float top = _mm512_reduce_max_ps(amax);
  const __m512 inverse = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
  __m512i sums = _mm512_setzero_si512();
  for (int64_t k = 0; k < k_size; k += 16) {
    const __mmask16 mask = lanes_mask(std::min<int64_t>(16, k_size - k));
    const __m512i values = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x + k, mask), inverse));  // nearest even
    sums = _mm512_add_epi32(sums, values);
    _mm_mask_storeu_epi8(q + k, mask, _mm512_cvtsepi32_epi8(values));
  }
  std::fill(q + k_size, q + padded, int8_t{0});
  *scale = top / 127.f;
  *sum = _mm512_reduce_add_epi32(sums);
}

// rows x 64 outputs of one packed block from int8 rows (stride ``q_stride`` bytes):
// out[m, j] = (sum_k q[m, k] * w[k, j]) * x_scale[m] * w_scale[j] + bias[j].
template <typename T, int Rows>
void block_tile(const int8_t* q, int64_t q_stride, const float* x_scale, const int32_t* x_sum, const uint8_t* block,
                int64_t steps, const float* w_scale, const T* bias, T* out, int64_t out_stride, int64_t valid) {
  __m512i acc[Rows][4];
  for (int m = 0; m < Rows; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_si512();
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* w = block + s * kBlock * kStep;
    const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64), w2 = _mm512_loadu_si512(w + 128),
                  w3 = _mm512_loadu_si512(w + 192);
    for (int m = 0; m < Rows; ++m) {
      int32_t four;
      std::memcpy(&four, q + m * q_stride + s * kStep, sizeof(four));
      const __m512i xm = _mm512_set1_epi32(four);
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], w0, xm);
      acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], w1, xm);
      acc[m][2] = _mm512_dpbusd_epi32(acc[m][2], w2, xm);
      acc[m][3] = _mm512_dpbusd_epi32(acc[m][3], w3, xm);
    }
  }
  for (int j = 0; j < 4 && 16 * j < valid; ++j) {
    const __mmask16 mask = lanes_mask(std::min<int64_t>(16, valid - 16 * j));
    const __m512 scales = _mm512_maskz_loadu_ps(mask, w_scale + 16 * j);
    const __m512 b = bias != nullptr ? load16(bias + 16 * j, mask) : _mm512_setzero_ps();
    for (int m = 0; m < Rows; ++m) {
      const __m512i dot = _mm512_sub_epi32(acc[m][j], _mm512_set1_epi32(128 * x_sum[m]));  // the weights' +128
      const __m512 value = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), scales), _mm512_set1_ps(x_scale[m]));
      store16(out + m * out_stride + 16 * j, _mm512_add_ps(value, b), mask);
    }
  }
}

// Per-thread scratch for the quantized rows: sized once to the largest step, so a steady step allocates nothing.
struct Scratch {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;
};

template <typename T>
void int8_linear_rows(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& w_scale,
                      const c10::optional<torch::Tensor>& bias, torch::Tensor& out) {
  const int64_t rows = x.size(0), k_size = x.size(1), x_stride = x.stride(0), outputs = out.size(1);
  const int64_t steps = packed.size(1), q_stride = steps * kStep;
  thread_local Scratch scratch;
  if (static_cast<int64_t>(scratch.q.size()) < rows * q_stride) scratch.q.resize(rows * q_stride);
  if (static_cast<int64_t>(scratch.scale.size()) < rows) {
    scratch.scale.resize(rows);
    scratch.sum.resize(rows);
  }
  int8_t* q = scratch.q.data();
  float* x_scale = scratch.scale.data();
  int32_t* x_sum = scratch.sum.data();
  const T* xp = x.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      quantize_row(xp + m * x_stride, k_size, q_stride, q + m * q_stride, x_scale + m, x_sum + m);
  });
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = w_scale.data_ptr<float>();
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const int64_t block_bytes = packed.stride(0);
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* block = wp + b * block_bytes;
      const int64_t valid = std::min<int64_t>(kBlock, outputs - b * kBlock);
      const T* block_bias = bp ? bp + b * kBlock : nullptr;
      for (int64_t m0 = 0; m0 < rows; m0 += kTileRows) {
        const int8_t* qt = q + m0 * q_stride;
        T* ot = op + m0 * outputs + b * kBlock;
        const float *xs = x_scale + m0, *ws = sp + b * kBlock;
        const int32_t* sums = x_sum + m0;
        switch (std::min<int64_t>(kTileRows, rows - m0)) {
          case 1: block_tile<T, 1>(qt, q_stride, xs, sums, block, steps, ws, block_bias, ot, outputs, valid); break;
          case 2: block_tile<T, 2>(qt, q_stride, xs, sums, block, steps, ws, block_bias, ot, outputs, valid); break;
          case 3: block_tile<T, 3>(qt, q_stride, xs, sums, block, steps, ws, block_bias, ot, outputs, valid); break;
          case 4: block_tile<T, 4>(qt, q_stride, xs, sums, block, steps, ws, block_bias, ot, outputs, valid); break;
          case 5: block_tile<T, 5>(qt, q_stride, xs, sums, block, steps, ws, block_bias, ot, outputs, valid); break;
          default: block_tile<T, 6>(qt, q_stride, xs, sums, block, steps, ws, block_bias, ot, outputs, valid); break;
        }
      }
    }
  });
}

#elif defined(XLLM_INT8_AVX2)
using namespace xllm_avx2;

// Rows x 8 * Vectors outputs (from vector v0 of the block) of one packed block from int8 rows:
// out[m, j] = (sum_k q[m, k] * w[k, j]) * x_scale[m] * w_scale[j] + bias[j].
template <typename T, int Rows, int Vectors>
void block_tile(const int8_t* q, int64_t q_stride, const float* x_scale, const uint8_t* block, int64_t steps, int v0,
                const float* w_scale, const T* bias, T* out, int64_t out_stride, int64_t valid) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
  __m256i acc[Rows][Vectors];
  for (int m = 0; m < Rows; ++m)
    for (int v = 0; v < Vectors; ++v) acc[m][v] = _mm256_setzero_si256();
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* w = block + s * kBlock * kStep + 32 * v0;
    __m256i x[Rows], magnitude[Rows];
    for (int m = 0; m < Rows; ++m) {
      x[m] = broadcast4(q + m * q_stride + s * kStep);
      magnitude[m] = _mm256_abs_epi8(x[m]);
    }
    for (int v = 0; v < Vectors; ++v) {
      const __m256i weights = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * v)), flip);
      for (int m = 0; m < Rows; ++m) {
        const __m256i pairs = _mm256_maddubs_epi16(magnitude[m], _mm256_sign_epi8(weights, x[m]));
        acc[m][v] = _mm256_add_epi32(acc[m][v], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int v = 0; v < Vectors; ++v) {
    const int64_t first = 8 * (v0 + v);
    if (first >= valid) break;
    const int64_t lanes = std::min<int64_t>(8, valid - first);
    const __m256 scales = load8(w_scale + first, lanes);
    const __m256 b = bias != nullptr ? load8(bias + first, lanes) : _mm256_setzero_ps();
    for (int m = 0; m < Rows; ++m) {
      const __m256 value = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[m][v]), scales), _mm256_set1_ps(x_scale[m]));
      store8(out + m * out_stride + first, _mm256_add_ps(value, b), lanes);
    }
  }
}

// A block's 64 outputs for up to 3 rows: 1 row x 64, 2 x 32 or 3 x 16 outputs per tile (16 registers).
template <typename T, int Rows>
void block_rows(const int8_t* q, int64_t q_stride, const float* x_scale, const uint8_t* block, int64_t steps,
                const float* w_scale, const T* bias, T* out, int64_t out_stride, int64_t valid) {
  constexpr int kVectors = Rows == 1 ? 8 : Rows == 2 ? 4 : 2;
  for (int v0 = 0; v0 < 8 && 8 * v0 < valid; v0 += kVectors)
    block_tile<T, Rows, kVectors>(q, q_stride, x_scale, block, steps, v0, w_scale, bias, out, out_stride, valid);
}

template <typename T>
void int8_linear_rows(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& w_scale,
                      const c10::optional<torch::Tensor>& bias, torch::Tensor& out) {
  const int64_t rows = x.size(0), k_size = x.size(1), x_stride = x.stride(0), outputs = out.size(1);
  const int64_t steps = packed.size(1), q_stride = steps * kStep;
  thread_local std::vector<int8_t> q_rows;
  thread_local std::vector<float> x_scales;
  if (static_cast<int64_t>(q_rows.size()) < rows * q_stride) q_rows.resize(rows * q_stride);
  if (static_cast<int64_t>(x_scales.size()) < rows) x_scales.resize(rows);
  int8_t* q = q_rows.data();
  float* x_scale = x_scales.data();
  const T* xp = x.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float top = abs_max(xp + m * x_stride, k_size);
      quantize_span(xp + m * x_stride, k_size, top > 0.f ? 127.f / top : 0.f, q + m * q_stride);
      std::fill(q + m * q_stride + k_size, q + (m + 1) * q_stride, int8_t{0});
      x_scale[m] = top / 127.f;
    }
  });
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = w_scale.data_ptr<float>();
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const int64_t block_bytes = packed.stride(0);
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* block = wp + b * block_bytes;
      const int64_t valid = std::min<int64_t>(kBlock, outputs - b * kBlock);
      const T* block_bias = bp ? bp + b * kBlock : nullptr;
      const float* ws = sp + b * kBlock;
      for (int64_t m0 = 0; m0 < rows; m0 += 3) {
        const int8_t* qt = q + m0 * q_stride;
        T* ot = op + m0 * outputs + b * kBlock;
        switch (std::min<int64_t>(3, rows - m0)) {
          case 1: block_rows<T, 1>(qt, q_stride, x_scale + m0, block, steps, ws, block_bias, ot, outputs, valid); break;
          case 2: block_rows<T, 2>(qt, q_stride, x_scale + m0, block, steps, ws, block_bias, ot, outputs, valid); break;
          default: block_rows<T, 3>(qt, q_stride, x_scale + m0, block, steps, ws, block_bias, ot, outputs, valid); break;
        }
      }
    }
  });
}

#endif  // XLLM_INT8_VNNI, XLLM_INT8_AVX2

bool runs(at::ScalarType dtype) {
#if defined(XLLM_INT8_F32)
  if (dtype == at::kFloat) return true;
#endif
#if defined(XLLM_INT8_BF16)
  if (dtype == at::kBFloat16) return true;
#endif
  return false;
}

}  // namespace

// torch dtype names of the inputs (and outputs) this build's int8 kernel takes.
std::vector<std::string> int8_linear_dtypes() {
  std::vector<std::string> names;
  if (runs(at::kFloat)) names.push_back("float32");
  if (runs(at::kBFloat16)) names.push_back("bfloat16");
  return names;
}

// int8 [N, K] -> uint8 [ceil(N/64), ceil(K/4), 64, 4], each value plus 128, zero weights in the padding.
torch::Tensor pack_int8_weight(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "pack_int8_weight: a 2-d int8 weight");
  const int64_t outputs = weight.size(0), k_size = weight.size(1);
  const int64_t blocks = (outputs + kBlock - 1) / kBlock, steps = (k_size + kStep - 1) / kStep;
  auto padded = at::zeros({blocks * kBlock, steps * kStep}, weight.options());
  padded.narrow(0, 0, outputs).narrow(1, 0, k_size).copy_(weight);
  auto packed = padded.view({blocks, kBlock, steps, kStep}).permute({0, 2, 1, 3}).contiguous().view(at::kByte);
  return packed.bitwise_xor_(128);  // two's complement + 128 == the sign bit flipped
}

// xllm::linear_w8_out's contract on a packed weight: out [..., N] = input [..., K] @ (q * scale).T + bias,
// with the input rows quantized to int8 (see the top of this file).
torch::Tensor int8_linear_out(torch::Tensor input, torch::Tensor packed, torch::Tensor scale,
                              c10::optional<torch::Tensor> bias, torch::Tensor out) {
  auto x = input.reshape({-1, input.size(-1)});
  if (x.stride(-1) != 1) x = x.contiguous();
  const auto dtype = x.scalar_type();
  TORCH_CHECK(runs(dtype) && out.scalar_type() == dtype, "int8_linear: input and output of a dtype this build runs");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kByte && packed.size(2) == kBlock &&
                  packed.size(3) == kStep && packed.is_contiguous(),
              "int8_linear: a weight packed by pack_int8_weight");
  TORCH_CHECK(out.is_contiguous() && out.numel() == x.size(0) * out.size(-1), "int8_linear: out must be [rows, N]");
  TORCH_CHECK(packed.size(0) * kBlock >= out.size(-1) && packed.size(1) * kStep >= x.size(1) &&
                  packed.size(1) * kStep < x.size(1) + kStep,
              "int8_linear: weight does not match the input and output");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == out.size(-1),
              "int8_linear: one float32 scale per output");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->scalar_type() == dtype && bias->numel() == out.size(-1)),
              "int8_linear: bias");
  auto flat = out.view({x.size(0), out.size(-1)});
#if defined(XLLM_INT8_F32)
  if (dtype == at::kFloat) int8_linear_rows<float>(x, packed, scale, bias, flat);
#endif
#if defined(XLLM_INT8_BF16)
  if (dtype == at::kBFloat16) int8_linear_rows<at::BFloat16>(x, packed, scale, bias, flat);
#endif
  return out;
}

torch::Tensor int8_linear(torch::Tensor input, torch::Tensor packed, torch::Tensor scale,
                          c10::optional<torch::Tensor> bias, int64_t out_features) {
  auto sizes = input.sizes().vec();
  sizes.back() = out_features;
  return int8_linear_out(input, packed, scale, bias, at::empty(sizes, input.options()));
}

torch::Tensor widened_by_blocks(const torch::Tensor& rounded, int64_t blocks);  // cpu_linear.cpp

// ``int8_linear(...).float()`` for bfloat16 input: the LM head's logits (see widened_by_blocks).
torch::Tensor int8_linear_float(torch::Tensor input, torch::Tensor packed, torch::Tensor scale,
                                c10::optional<torch::Tensor> bias, int64_t out_features) {
  TORCH_CHECK(input.scalar_type() == at::kBFloat16, "int8_linear_float takes bfloat16 input");
  return widened_by_blocks(int8_linear(input, packed, scale, bias, out_features), packed.size(0));
}

void register_quant(pybind11::module& m) {
  namespace py = pybind11;
  m.def("int8_linear_dtypes", &int8_linear_dtypes);
  m.def("pack_int8_weight", &pack_int8_weight, py::arg("weight"));
  xllm_replay::def_kernel(m, "int8_linear_out", &int8_linear_out, py::arg("input"), py::arg("packed"), py::arg("scale"),
                          py::arg("bias"), py::arg("out"));
  xllm_replay::def_kernel(m, "int8_linear", &int8_linear, py::arg("input"), py::arg("packed"), py::arg("scale"),
                          py::arg("bias"), py::arg("out_features"));
  xllm_replay::def_kernel(m, "int8_linear_float", &int8_linear_float, py::arg("input"), py::arg("packed"),
                          py::arg("scale"), py::arg("bias"), py::arg("out_features"));
}
