//! A FiLM block's sampling pass on the CPU in one call to
//! `film_block.cpp` (a C shim build.rs compiles against libtorch's headers):
//! LayerNorm, its affine, FiLM and the residual's bias in one loop, the up
//! product, its bias and SiLU in a second, and the down product accumulated
//! into the first's sum — two GEMMs and two loops where the plain block runs
//! six ATen kernels and two bias copies. On this
//! machine a kernel's dispatch costs ≈ 7 µs at the rows a sampling step
//! runs, so the small ones are most of what a latent denoiser's pass spends
//! beyond its matrix products (docs/BENCHMARKS.md, "Where a denoiser pass's
//! time goes").
//!
//! [`film_block`] answers `None` where it does not apply — a GPU tensor
//! (CUDA graphs replay the plain block there), another dtype, a block
//! without biases, a build without the shim, or [`set_enabled`]`(false)` —
//! and the caller runs the plain block.
//!
//! The choice never depends on the number of rows: the fused loop rounds
//! unlike ATen's LayerNorm, and a request's bytes must not depend on the
//! company it shares a pass with (docs/ARCHITECTURE.md, the engine's row
//! quantum). The loop runs on one thread; at large batches it is a small
//! share of a pass next to its GEMMs, which use every core.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::nn::{LayerNorm, Linear};
use tch::{Device, Kind, Tensor};

/// LayerNorm's ε as the blocks build it (`LayerNormConfig::default`).
fn layer_norm_eps() -> f64 {
    tch::nn::LayerNormConfig::default().eps
}

#[cfg(weightgen_fused_cpu)]
mod ffi {
    use std::ffi::{c_char, c_double, c_int};
    use torch_sys::C_tensor;

    unsafe extern "C" {
        pub fn wg_film_free_error(error: *mut c_char);
        #[allow(clippy::too_many_arguments)]
        pub fn wg_film_block(
            h: *const C_tensor,
            norm_weight: *const C_tensor,
            norm_bias: *const C_tensor,
            eps: c_double,
            scale: *const C_tensor,
            shift: *const C_tensor,
            up_weight: *const C_tensor,
            up_bias: *const C_tensor,
            down_weight: *const C_tensor,
            down_bias: *const C_tensor,
            out: *mut *mut C_tensor,
            error: *mut *mut c_char,
        ) -> c_int;
    }
}

/// Whether this build has the fused CPU block.
pub const fn available() -> bool {
    cfg!(weightgen_fused_cpu)
}

/// Off: every block runs plain (for A/B timing, `examples/pass_cost.rs`).
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the fused block on or off for the whole process (on by default).
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// h + down(SiLU(up(LayerNorm(h) ⊙ scale + shift))) in one shim call, or
/// `None` where the shim does not apply (module docs) or refused (its
/// message logged once; the plain block then reports the same fault).
pub fn film_block(
    h: &Tensor,
    norm: &LayerNorm,
    scale: &Tensor,
    shift: &Tensor,
    up: &Linear,
    down: &Linear,
) -> Option<Tensor> {
    let (norm_weight, norm_bias) = (norm.ws.as_ref()?, norm.bs.as_ref()?);
    let (up_bias, down_bias) = (up.bs.as_ref()?, down.bs.as_ref()?);
    if !available()
        || !ENABLED.load(Ordering::Relaxed)
        || h.device() != Device::Cpu
        || h.kind() != Kind::Float
        || h.dim() != 2
    {
        return None;
    }
    call(
        h,
        [norm_weight, norm_bias, scale, shift],
        [&up.ws, up_bias, &down.ws, down_bias],
    )
}

#[cfg(weightgen_fused_cpu)]
fn call(h: &Tensor, film: [&Tensor; 4], mlp: [&Tensor; 4]) -> Option<Tensor> {
    use std::sync::Once;
    let [norm_weight, norm_bias, scale, shift] = film;
    let [up_weight, up_bias, down_weight, down_bias] = mlp;
    let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
    let mut error: *mut std::ffi::c_char = std::ptr::null_mut();
    // SAFETY: every pointer is a live tensor borrowed for the call; the shim
    // only reads them, writes a tensor it allocated into `out` or a message
    // it allocated into `error`, and catches every C++ exception.
    let status = unsafe {
        ffi::wg_film_block(
            h.as_ptr(),
            norm_weight.as_ptr(),
            norm_bias.as_ptr(),
            layer_norm_eps(),
            scale.as_ptr(),
            shift.as_ptr(),
            up_weight.as_ptr(),
            up_bias.as_ptr(),
            down_weight.as_ptr(),
            down_bias.as_ptr(),
            &mut out,
            &mut error,
        )
    };
    if status == 0 && !out.is_null() {
        // SAFETY: a tensor the shim allocated with `new at::Tensor`, owned
        // from here on (tch frees it with `at_free`).
        return Some(unsafe { Tensor::from_ptr(out) });
    }
    static REFUSED: Once = Once::new();
    let message = if error.is_null() {
        "unknown error".to_owned()
    } else {
        // SAFETY: a NUL-terminated string the shim allocated.
        let text = unsafe { std::ffi::CStr::from_ptr(error) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: freed once, by the shim that allocated it.
        unsafe { ffi::wg_film_free_error(error) };
        text
    };
    REFUSED.call_once(|| {
        tracing::warn!(%message, "the fused CPU FiLM block refused its input; running the plain block");
    });
    None
}

#[cfg(not(weightgen_fused_cpu))]
fn call(_h: &Tensor, _film: [&Tensor; 4], _mlp: [&Tensor; 4]) -> Option<Tensor> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::blocks::FilmBlock;
    use tch::nn;

    fn block(width: i64, cond_dim: i64) -> (nn::VarStore, FilmBlock) {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let block = FilmBlock::new(&vs.root(), width, cond_dim);
        // The zero-initialized projections would hide the FiLM and the
        // residual's terms: give every variable a value.
        tch::no_grad(|| {
            for (_, mut var) in vs.variables() {
                let values = Tensor::randn(var.size(), (Kind::Float, Device::Cpu)) * 0.3;
                var.copy_(&values);
            }
        });
        (vs, block)
    }

    #[test]
    fn the_fused_block_equals_the_plain_one() {
        assert!(
            available(),
            "build.rs compiles the shim wherever libtorch is found"
        );
        let (_vs, block) = block(48, 10);
        for rows in [1_i64, 8, 64] {
            let h = Tensor::randn([rows, 48], (Kind::Float, Device::Cpu));
            // Column slices of one stacked product, as the U-Net passes them.
            let modulation = Tensor::randn([rows, 4 * 48], (Kind::Float, Device::Cpu));
            let scale = modulation.narrow(1, 48, 48);
            let shift = modulation.narrow(1, 144, 48);
            let plain = tch::no_grad(|| block.forward_plain(&h, &scale, &shift));
            let fused = tch::no_grad(|| block.forward_modulated(&h, &scale, &shift));
            let error = (&fused - &plain).abs().max().double_value(&[]);
            let size = plain.abs().max().double_value(&[]);
            assert!(
                error <= 1e-5 * size.max(1.0),
                "rows {rows}: {error} of {size}"
            );
        }
    }

    #[test]
    fn silu_of_huge_activations_stays_finite_and_exact() {
        // Up-product outputs of ±10⁴: the shim's exponential must neither
        // overflow (v ≪ 0) nor lose SiLU(v) ≈ v (v ≫ 0).
        let (vs, block) = block(32, 4);
        tch::no_grad(|| {
            for (name, mut var) in vs.variables() {
                if name.contains("up") {
                    let values = &var * 2000.0;
                    var.copy_(&values);
                }
            }
        });
        let h = Tensor::randn([16, 32], (Kind::Float, Device::Cpu));
        let film = Tensor::randn([16, 64], (Kind::Float, Device::Cpu));
        let (scale, shift) = (film.narrow(1, 0, 32), film.narrow(1, 32, 32));
        let plain = tch::no_grad(|| block.forward_plain(&h, &scale, &shift));
        let fused = tch::no_grad(|| block.forward_modulated(&h, &scale, &shift));
        assert!(bool::try_from(fused.isfinite().all()).expect("bool"));
        let error = (&fused - &plain).abs().max().double_value(&[]);
        let size = plain.abs().max().double_value(&[]);
        assert!(size > 1e4, "the activations are meant to be huge: {size}");
        assert!(error <= 1e-5 * size, "{error} of {size}");
    }

    #[test]
    fn a_double_tensor_takes_the_plain_block() {
        let (_vs, block) = block(16, 4);
        let (norm, up, down) = block.parts();
        let h = Tensor::randn([4, 16], (Kind::Double, Device::Cpu));
        let ones = Tensor::ones([4, 16], (Kind::Double, Device::Cpu));
        assert!(film_block(&h, norm, &ones, &ones, up, down).is_none());
    }

    #[test]
    fn a_row_comes_out_the_same_whatever_rows_share_the_call() {
        // Row counts as the engine pads them (multiples of 8, at least 16).
        let (_vs, block) = block(64, 4);
        let (norm, up, down) = block.parts();
        let many = 2048;
        let h = Tensor::randn([many, 64], (Kind::Float, Device::Cpu));
        let film = Tensor::randn([many, 128], (Kind::Float, Device::Cpu));
        let (scale, shift) = (film.narrow(1, 0, 64), film.narrow(1, 64, 64));
        let run = |rows: i64| {
            tch::no_grad(|| {
                film_block(
                    &h.narrow(0, 0, rows),
                    norm,
                    &scale.narrow(0, 0, rows),
                    &shift.narrow(0, 0, rows),
                    up,
                    down,
                )
            })
            .expect("fused")
        };
        let all = run(many);
        for rows in [16, 64, 512] {
            assert!(run(rows).equal(&all.narrow(0, 0, rows)), "{rows} rows");
        }
    }

    #[test]
    fn a_refused_input_is_none_not_a_panic() {
        let (_vs, block) = block(16, 4);
        let (norm, up, down) = block.parts();
        let h = Tensor::randn([4, 16], (Kind::Float, Device::Cpu));
        let wrong = Tensor::ones([4, 15], (Kind::Float, Device::Cpu));
        assert!(film_block(&h, norm, &wrong, &wrong, up, down).is_none());
    }
}
