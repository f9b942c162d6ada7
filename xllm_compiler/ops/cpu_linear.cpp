// Linear layers on CPU over weights packed once at load: the kernel behind every linear layer of a
// lowered graph (runtime/platform/cpu.py), written straight into the caller's output (the planned arena).
//
// Why our own: at decode a linear layer reads its whole weight to produce a few rows, so its speed is
// the speed at which it streams the weight. The packed layout makes that stream one sequential run
// per block of 64 outputs: float32 [ceil(N/64), K, 64], bfloat16 [ceil(N/64), ceil(K/2), 64, 2] (pairs of
// K interleaved, the operand shape of AVX-512 BF16's vdpbf16ps). A register tile of up to 6 input rows
// x 64 outputs accumulates in 24 vector registers with no horizontal reduction, so the same kernel also
// holds up at prefill sizes. Measured against oneDNN on its own packed weights over the 49 linear layers
// of the ~100M Llama (docs/performance.md): 1.5-2x faster from 1 to 8 rows, as fast or faster at 512.
// Sums are float; the output is rounded once. Built only where the compiler targets AVX-512 (float32)
// and AVX-512 BF16 (bfloat16); elsewhere packed_linear_dtypes() is empty and graphs keep aten.linear.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 64;  // outputs per packed block: four 16-lane vectors
constexpr int kTileRows = 6;    // input rows per register tile: 6 x 4 accumulators + 4 weight vectors

#if defined(__AVX512F__)

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
  for (int64_t k = 0; k < k_size; k += L::kStep) {
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
      const T* block = wp + b * block_elements;
      const T* block_bias = bp ? bp + b * kBlock : nullptr;
      const int64_t valid = std::min<int64_t>(kBlock, outputs - b * kBlock);
      for (int64_t m0 = 0; m0 < rows; m0 += kTileRows) {
        const T* xt = xp + m0 * x_stride;
        T* ot = op + m0 * outputs + b * kBlock;
        switch (std::min<int64_t>(kTileRows, rows - m0)) {
          case 1: block_tile<L, 1>(xt, x_stride, block, k_size, block_bias, ot, outputs, valid); break;
          case 2: block_tile<L, 2>(xt, x_stride, block, k_size, block_bias, ot, outputs, valid); break;
          case 3: block_tile<L, 3>(xt, x_stride, block, k_size, block_bias, ot, outputs, valid); break;
          case 4: block_tile<L, 4>(xt, x_stride, block, k_size, block_bias, ot, outputs, valid); break;
          case 5: block_tile<L, 5>(xt, x_stride, block, k_size, block_bias, ot, outputs, valid); break;
          default: block_tile<L, 6>(xt, x_stride, block, k_size, block_bias, ot, outputs, valid); break;
        }
      }
    }
  });
}

#endif  // __AVX512F__

bool packs(at::ScalarType dtype) {
#if defined(__AVX512F__)
  if (dtype == at::kFloat) return true;
#endif
#if defined(__AVX512BF16__)
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

// [N, K] -> the packed layout above, zero-padded to whole blocks (and to an even K in bfloat16).
torch::Tensor pack_linear_weight(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && packs(weight.scalar_type()), "pack_linear_weight: a 2-d weight of a packed dtype");
  const int64_t outputs = weight.size(0), k_size = weight.size(1), blocks = (outputs + kBlock - 1) / kBlock;
  const int64_t pair = weight.scalar_type() == at::kBFloat16 ? 2 : 1, steps = (k_size + pair - 1) / pair;
  auto padded = at::zeros({blocks * kBlock, steps * pair}, weight.options());
  padded.narrow(0, 0, outputs).narrow(1, 0, k_size).copy_(weight);
  return padded.view({blocks, kBlock, steps, pair}).permute({0, 2, 1, 3}).contiguous();
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
#if defined(__AVX512F__)
  if (dtype == at::kFloat) packed_linear_rows<F32>(x, packed, bias, flat);
#endif
#if defined(__AVX512BF16__)
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

void register_linear(pybind11::module& m) {
  namespace py = pybind11;
  m.def("packed_linear_dtypes", &packed_linear_dtypes);
  m.def("pack_linear_weight", &pack_linear_weight, py::arg("weight"));
  m.def("packed_linear_out", &packed_linear_out, py::arg("input"), py::arg("packed"), py::arg("bias"), py::arg("out"));
  m.def("packed_linear", &packed_linear, py::arg("input"), py::arg("packed"), py::arg("bias"),
        py::arg("out_features"));
}
