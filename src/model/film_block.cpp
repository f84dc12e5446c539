// A FiLM block's sampling pass on the CPU as one call (issue 18, CPU
// efficiency; docs/BENCHMARKS.md, "Where a denoiser pass's time goes"):
//
//   out = h + down(silu(up(LayerNorm(h) ⊙ scale + shift)))
//
// At the rows a sampling step runs, each ATen kernel costs ≈ 7 µs of
// dispatch on this machine whatever its size; the plain block runs six
// (LayerNorm, addcmul, two addmm, SiLU, the residual add). Here the
// LayerNorm, its affine, FiLM and h + down's bias are one loop over the rows,
// and the residual lands through addmm_ into that sum: four kernels, two of
// them the GEMMs. build.rs compiles this file against libtorch's headers;
// src/model/film_block.rs is the Rust side (it calls this only for float
// CPU tensors of at most ATen's grain size, below which ATen's own kernels
// run on one thread too). C++ exceptions come back as a message (freed with
// wg_film_free_error), so nothing unwinds into Rust.

#include <ATen/ATen.h>

#include <cmath>
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
// AVX2 + FMA and for the baseline, picked at load time (GCC's
// target_clones), and vectorized by the simd pragmas (-fopenmp-simd: no
// OpenMP runtime); with plain sequential sums the reductions alone cost more
// than ATen's vectorized LayerNorm at 64 rows.
__attribute__((target_clones("avx2", "default"))) void normalize_rows(
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
  at::Tensor u = at::linear(x, up_weight, up_bias);
  at::silu_(u);
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
