//! What the denoiser predicts, the training target and loss, and the
//! conversion of a prediction into (ε̂, x̂₀).
//!
//! With a = sqrt(ᾱ_t), b = sqrt(1 − ᾱ_t) and w_t = a·w₀ + b·ε:
//! - ε-prediction (the proposal): target ε; x̂₀ = (w_t − b·ε̂)/a;
//! - x₀-prediction (G.pt, HyperDiffusion): target w₀; ε̂ = (w_t − a·x̂₀)/b;
//! - v-prediction (Salimans & Ho): target v = a·ε − b·w₀;
//!   x̂₀ = a·w_t − b·v̂, ε̂ = b·w_t + a·v̂.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// The denoiser's output parametrization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// ε_θ(w_t, t, e) ≈ ε, as in the proposal.
    #[default]
    #[value(alias = "eps")]
    Epsilon,
    /// The clean weights w₀.
    X0,
    /// v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·w₀.
    V,
}

impl Prediction {
    /// Its name in a training job ("epsilon", "x0" or "v").
    pub fn name(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::X0 => "x0",
            Self::V => "v",
        }
    }

    /// The regression target for w₀, ε with coefficients a, b ([B, 1]).
    pub fn target(self, w0: &Tensor, noise: &Tensor, a: &Tensor, b: &Tensor) -> Tensor {
        match self {
            Self::Epsilon => noise.shallow_clone(),
            Self::X0 => w0.shallow_clone(),
            Self::V => noise * a - w0 * b,
        }
    }

    /// (ε̂, x̂₀) from the model output at w_t.
    pub fn to_eps_x0(
        self,
        output: &Tensor,
        w_t: &Tensor,
        a: &Tensor,
        b: &Tensor,
    ) -> (Tensor, Tensor) {
        match self {
            Self::Epsilon => (output.shallow_clone(), (w_t - output * b) / a),
            Self::X0 => ((w_t - output * a) / b, output.shallow_clone()),
            Self::V => (w_t * b + output * a, w_t * a - output * b),
        }
    }
}

/// The proposal's loss: mean over the batch of ‖target − output‖² / D
/// (mean squared error per coordinate).
pub fn mse_loss(output: &Tensor, target: &Tensor) -> Tensor {
    (output - target).square().mean(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn every_parametrization_inverts_its_own_target() {
        let mut noise = crate::diffusion::SeededNoise::new(&[1, 2, 3], 0);
        let w0 = noise.draw(&[8], Device::Cpu);
        let eps = noise.draw(&[8], Device::Cpu);
        let a = Tensor::from_slice(&[0.9f32, 0.5, 0.1]).unsqueeze(1);
        let b = (a.square().neg() + 1.0).sqrt();
        let w_t = &w0 * &a + &eps * &b;
        for p in [Prediction::Epsilon, Prediction::X0, Prediction::V] {
            let target = p.target(&w0, &eps, &a, &b);
            let (e, x) = p.to_eps_x0(&target, &w_t, &a, &b);
            assert!(e.allclose(&eps, 1e-4, 1e-4, false), "{p:?} ε");
            assert!(x.allclose(&w0, 1e-4, 1e-4, false), "{p:?} x0");
        }
        assert_eq!(mse_loss(&w0, &w0).double_value(&[]), 0.0);
    }
}
