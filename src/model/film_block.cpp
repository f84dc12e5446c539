// A FiLM block's sampling pass on the CPU as one call (issue 18, CPU
// efficiency; docs/BENCHMARKS.md, "Where a denoiser pass's time goes"):
//
//   out = h + down(silu(up(LayerNorm(h) ⊙ scale + shift)))
//
// At the rows a sampling step runs, each ATen kernel costs ≈ 7 µs of
// dispatch on this machine whatever its size; the plain block runs six
// (LayerNorm, addcmul, two addmm — each copying its bias into the output
// first — SiLU, the residual add). Here the LayerNorm, its affine, FiLM and
// h + down's bias are one loop over the rows; the up product runs without
// its bias, and one loop adds that bias and applies SiLU; the down product
// lands through addmm_ into the first loop's sum: two GEMMs and two loops
// of our own, no other kernel. build.rs compiles this file against
// libtorch's headers; src/model/film_block.rs is the Rust side (it calls
// this for every float CPU pass). C++ exceptions come back as a message
// (freed with wg_film_free_error), so nothing unwinds into Rust.

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>

namespace {

char* copy_message(const char* what) {
  size_t n = std::strlen(what);
  char* out = new char[n + 1];
  std::memcpy(out, what, n + 1);
  return out;
}

// A [rows, width] float tensor on the CPU whose rows are contiguous.
void check_rows(const at::Tensor& t, int64_t rows, int64_t width, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name,
              " must be a float CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == width, name, " must be [",
              rows, ", ", width, "], got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, name, " must have contiguous rows");
}

void check_vector(const at::Tensor& t, int64_t width, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 &&
                  t.size(0) == width && t.is_contiguous(),
              name, " must be a contiguous float CPU vector of ", width);
}

// x = LayerNorm(h) ⊙ scale + shift and out = h + down_bias, row by row
// (two-pass mean and variance, biased, as ATen's LayerNorm). Compiled for
// AVX-512 (x86-64-v4), AVX2 + FMA (x86-64-v3) and the baseline, picked at
// load time (GCC's target_clones), and vectorized by the simd pragmas (-fopenmp-simd: no
// OpenMP runtime); with plain sequential sums the reductions alone cost more
// than ATen's vectorized LayerNorm at 64 rows.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void normalize_rows(
    int64_t rows, int64_t width, const float* h, const float* norm_weight,
    const float* norm_bias, float eps, const float* scale, int64_t scale_stride,
    const float* shift, int64_t shift_stride, const float* down_bias, float* x, float* out) {
  const float inverse_width = 1.0f / static_cast<float>(width);
  for (int64_t r = 0; r < rows; ++r) {
    const float* hr = h + r * width;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < width; ++j) sum += hr[j];
    const float mean = sum * inverse_width;
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t j = 0; j < width; ++j) {
      const float d = hr[j] - mean;
      squares += d * d;
    }
    const float rstd = 1.0f / std::sqrt(squares * inverse_width + eps);
    const float* sr = scale + r * scale_stride;
    const float* tr = shift + r * shift_stride;
    float* xr = x + r * width;
    float* orow = out + r * width;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const float normed = (hr[j] - mean) * rstd * norm_weight[j] + norm_bias[j];
      xr[j] = normed * sr[j] + tr[j];
      orow[j] = hr[j] + down_bias[j];
    }
  }
}

// e^x for x ≤ 0 (clamped at -87: no subnormal results), in plain float
// arithmetic so a simd loop vectorizes it: Cephes' expf (2^n from rounding
// x·log2 e, a degree-5 polynomial on the remainder; within 1.4 ulp of e^x
// over the range). The rounding uses the 1.5·2^23 trick rather than a libm
// call.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float round_magic = 12582912.0f;
  const float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  const float r = x - n * 0.693359375f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof two_to_n);
  return e * two_to_n;
}

// u = SiLU(u + bias) in place, row by row: the up product's bias and its
// activation in one pass over the hidden units, where ATen copies the bias
// into the output before the product and runs SiLU as a kernel of its own.
// SiLU(v) = v·σ(v) with σ from e = e^-|v| (σ = 1/(1+e) for v ≥ 0, e/(1+e)
// below), so the exponential never overflows. Each row is computed alone,
// so a row's values never depend on the rows beside it. Clones for
// AVX-512 (x86-64-v4), AVX2 + FMA (x86-64-v3) and the baseline: on this
// machine's AMD EPYC the AVX-512 clone runs 64 × 256 units in ≈ 7 µs, the
// baseline in ≈ 30.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void
bias_silu_rows(int64_t rows, int64_t width, const float* bias, float* u) {
  for (int64_t r = 0; r < rows; ++r) {
    float* ur = u + r * width;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const float v = ur[j] + bias[j];
      const float e = exp_nonpositive(v < 0.0f ? v : -v);
      ur[j] = v * (v < 0.0f ? e : 1.0f) / (1.0f + e);
    }
  }
}

at::Tensor film_block(const at::Tensor& h, const at::Tensor& norm_weight,
                      const at::Tensor& norm_bias, double eps, const at::Tensor& scale,
                      const at::Tensor& shift, const at::Tensor& up_weight,
                      const at::Tensor& up_bias, const at::Tensor& down_weight,
                      const at::Tensor& down_bias) {
  TORCH_CHECK(h.dim() == 2, "h must be [rows, width]");
  const int64_t rows = h.size(0);
  const int64_t width = h.size(1);
  TORCH_CHECK(h.is_contiguous(), "h must be contiguous");
  check_rows(h, rows, width, "h");
  check_rows(scale, rows, width, "scale");
  check_rows(shift, rows, width, "shift");
  check_vector(norm_weight, width, "norm weight");
  check_vector(norm_bias, width, "norm bias");
  check_vector(down_bias, width, "down bias");

  at::Tensor x = at::empty({rows, width}, h.options());
  at::Tensor out = at::empty({rows, width}, h.options());
  normalize_rows(rows, width, h.const_data_ptr<float>(), norm_weight.const_data_ptr<float>(),
                 norm_bias.const_data_ptr<float>(), static_cast<float>(eps),
                 scale.const_data_ptr<float>(), scale.stride(0), shift.const_data_ptr<float>(),
                 shift.stride(0), down_bias.const_data_ptr<float>(),
                 x.mutable_data_ptr<float>(), out.mutable_data_ptr<float>());
  const int64_t hidden = up_weight.size(0);
  check_vector(up_bias, hidden, "up bias");
  at::Tensor u = at::mm(x, up_weight.t());
  TORCH_CHECK(u.is_contiguous(), "the up product must be contiguous");
  bias_silu_rows(rows, hidden, up_bias.const_data_ptr<float>(), u.mutable_data_ptr<float>());
  out.addmm_(u, down_weight.t());
  return out;
}

}  // namespace

extern "C" {

void wg_film_free_error(char* error) { delete[] error; }

// The block's output as a new tensor in *out (freed by tch's at_free like any
// tensor it owns); 0 on success, 1 with *error set otherwise. Weights are as
// nn::Linear holds them: [out, in].
int wg_film_block(const at::Tensor* h, const at::Tensor* norm_weight,
                  const at::Tensor* norm_bias, double eps, const at::Tensor* scale,
                  const at::Tensor* shift, const at::Tensor* up_weight,
                  const at::Tensor* up_bias, const at::Tensor* down_weight,
                  const at::Tensor* down_bias, at::Tensor** out, char** error) {
  try {
    *out = new at::Tensor(film_block(*h, *norm_weight, *norm_bias, eps, *scale, *shift,
                                     *up_weight, *up_bias, *down_weight, *down_bias));
    return 0;
  } catch (const c10::Error& e) {
    *error = copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
  } catch (...) {
    *error = copy_message("unknown C++ exception");
  }
  return 1;
}

}  // extern "C"
