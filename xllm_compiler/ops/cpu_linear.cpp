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
// Sums are float; the output is rounded once. Built only where the compiler targets AVX-512 (float32)
// and AVX-512 BF16 (bfloat16); elsewhere packed_linear_dtypes() is empty and graphs keep aten.linear.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
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

// [N, K] -> the packed layout above, zero-padded to whole blocks (and to an even K in bfloat16).
torch::Tensor pack_linear_weight(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && packs(weight.scalar_type()), "pack_linear_weight: a 2-d weight of a packed dtype");
  const int64_t outputs = weight.size(0), k_size = weight.size(1), blocks = (outputs + kBlock - 1) / kBlock;
  const int64_t pair = weight.scalar_type() == at::kBFloat16 ? 2 : 1, steps = (k_size + pair - 1) / pair;
  auto source = weight.contiguous();
  if (blocks * kBlock != outputs || steps * pair != k_size) {  // rare shapes: pad, then pack as any other
    source = at::zeros({blocks * kBlock, steps * pair}, weight.options());
    source.narrow(0, 0, outputs).narrow(1, 0, k_size).copy_(weight);
  }
  auto packed = at::empty({blocks, steps, kBlock, pair}, weight.options());
  transpose_blocks(static_cast<const uint32_t*>(source.data_ptr()), blocks, steps,
                   static_cast<uint32_t*>(packed.data_ptr()));
  return packed;
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
  m.def("packed_embedding_out", &packed_embedding_out, py::arg("packed"), py::arg("indices"), py::arg("rows"),
        py::arg("out"));
  m.def("packed_embedding", &packed_embedding, py::arg("packed"), py::arg("indices"), py::arg("rows"),
        py::arg("k_size"));
  m.def("packed_linear", &packed_linear, py::arg("input"), py::arg("packed"), py::arg("bias"),
        py::arg("out_features"));
}
