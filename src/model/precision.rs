//! Mixed precision for training on CUDA: the forward pass under libtorch's
//! autocast (float16 matmuls) and a dynamic loss scale that keeps small
//! gradients representable, as `torch.cuda.amp.GradScaler` does.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::Device;

/// Initial loss scale (PyTorch's GradScaler default).
pub const DEFAULT_INITIAL_SCALE: f64 = 65_536.0;
/// Steps without overflow before the scale doubles (PyTorch's default).
pub const DEFAULT_GROWTH_INTERVAL: u64 = 2000;

/// How training computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// float32 everywhere.
    Fp32,
    /// float16 autocast with dynamic loss scaling (CUDA only).
    Fp16,
}

impl Precision {
    /// Runs `f` under fp16 autocast when this is `Fp16`, plainly otherwise.
    /// Open it once around a whole training run, not per step: libtorch
    /// 2.11 prints a deprecation warning for every autocast toggle that tch
    /// makes (thousands of lines over a run).
    ///
    /// Inside one scope autocast keeps fp16 copies of the weights it casts
    /// (libtorch empties that cache only when the outermost scope closes), so
    /// call `fresh_casts` before every forward pass whose weights may have
    /// changed since the last one (after an optimizer step, around EMA swaps).
    pub fn scope<T>(self, f: impl FnOnce() -> T) -> T {
        match self {
            Self::Fp16 => tch::autocast(true, f),
            Self::Fp32 => f(),
        }
    }

    /// Empties autocast's cache of fp16 weight copies (a no-op for fp32).
    pub fn fresh_casts(self) {
        if self == Self::Fp16 && tch::Cuda::is_available() {
            // SAFETY: a plain call into libtorch's autocast state, which
            // has no preconditions (at::autocast::clear_cache).
            unsafe { torch_sys::at_autocast_clear_cache() };
        }
    }
}

/// What the user asked for: a precision, or `auto` (fp16 on CUDA, fp32 otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrecisionChoice {
    /// fp16 on CUDA, fp32 elsewhere.
    Auto,
    /// This precision.
    Fixed(Precision),
}

impl FromStr for PrecisionChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "fp32" => Ok(Self::Fixed(Precision::Fp32)),
            "fp16" => Ok(Self::Fixed(Precision::Fp16)),
            other => Err(format!("precision {other:?}: expected auto, fp32 or fp16")),
        }
    }
}

impl std::fmt::Display for PrecisionChoice {
    /// The name [`FromStr`] reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Fixed(Precision::Fp32) => "fp32",
            Self::Fixed(Precision::Fp16) => "fp16",
        })
    }
}

impl PrecisionChoice {
    /// The precision to use on `device`; fp16 is refused off CUDA, where
    /// libtorch's autocast does nothing.
    pub fn resolve(self, device: Device) -> Result<Precision, String> {
        match (self, device) {
            (Self::Auto, Device::Cuda(_)) => Ok(Precision::Fp16),
            (Self::Auto, _) => Ok(Precision::Fp32),
            (Self::Fixed(Precision::Fp16), Device::Cuda(_)) => Ok(Precision::Fp16),
            (Self::Fixed(Precision::Fp16), other) => Err(format!(
                "precision fp16 needs a CUDA device, training runs on {other:?}"
            )),
            (Self::Fixed(p), _) => Ok(p),
        }
    }
}

/// Dynamic loss scale: multiply the loss by `scale` before backward, divide
/// the gradients by it after; halve it and skip the step on overflow, double
/// it after `growth_interval` clean steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    /// Current factor (1 = no scaling).
    pub scale: f64,
    /// Clean steps since the last change.
    pub clean_steps: u64,
    /// Clean steps before doubling.
    pub growth_interval: u64,
}

impl LossScale {
    /// No scaling (fp32).
    pub fn none() -> Self {
        Self {
            scale: 1.0,
            clean_steps: 0,
            growth_interval: u64::MAX,
        }
    }

    /// PyTorch's GradScaler defaults.
    pub fn dynamic() -> Self {
        Self {
            scale: DEFAULT_INITIAL_SCALE,
            clean_steps: 0,
            growth_interval: DEFAULT_GROWTH_INTERVAL,
        }
    }

    /// The scale for `precision`.
    pub fn for_precision(precision: Precision) -> Self {
        match precision {
            Precision::Fp32 => Self::none(),
            Precision::Fp16 => Self::dynamic(),
        }
    }

    /// Records whether the unscaled gradients were finite; returns whether
    /// the optimizer step should be taken.
    pub fn update(&mut self, gradients_finite: bool) -> bool {
        if !gradients_finite {
            self.scale = (self.scale / 2.0).max(1.0);
            self.clean_steps = 0;
            return false;
        }
        self.clean_steps += 1;
        if self.clean_steps >= self.growth_interval {
            self.scale *= 2.0;
            self.clean_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_fp16_only_on_cuda() {
        let auto = PrecisionChoice::Auto;
        assert_eq!(auto.resolve(Device::Cpu), Ok(Precision::Fp32));
        assert_eq!(auto.resolve(Device::Cuda(0)), Ok(Precision::Fp16));
        let fp16: PrecisionChoice = "fp16".parse().unwrap();
        assert!(fp16.resolve(Device::Cpu).unwrap_err().contains("CUDA"));
        assert!("bf8".parse::<PrecisionChoice>().is_err());
    }

    #[test]
    fn overflow_halves_and_skips_clean_steps_grow() {
        let mut s = LossScale {
            scale: 8.0,
            clean_steps: 0,
            growth_interval: 3,
        };
        assert!(!s.update(false));
        assert_eq!(s.scale, 4.0);
        assert!(s.update(true) && s.update(true));
        assert_eq!(s.scale, 4.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.clean_steps), (8.0, 0));
        let mut none = LossScale::none();
        assert!(none.update(true));
        assert_eq!(none.scale, 1.0);
    }
}
