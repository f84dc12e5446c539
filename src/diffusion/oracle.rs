//! The exact noise predictor for Gaussian (mixture) data, used to check the
//! samplers against the maths and as a benchmark reference.
//!
//! For w₀ ~ N(μ, Σ) and w_t = a·w₀ + b·ε (a = sqrt(ᾱ_t), b = sqrt(1−ᾱ_t)),
//! w_t ~ N(a·μ, Σ_t) with Σ_t = a²Σ + b²I, and the MMSE noise estimate is
//! E[ε | w_t] = b·Σ_t⁻¹(w_t − a·μ). For an equal-weight mixture of such
//! components the unconditional estimate is Σ_k r_k(w_t)·E_k[ε | w_t] with
//! responsibilities r_k ∝ N(w_t; a·μ_k, Σ_t,k).

use tch::{Kind, Tensor};

use super::objective::Prediction;
use super::sampler::Denoiser;
use super::schedule::NoiseSchedule;

/// A mixture of Gaussians; the condition picks a component per row.
#[derive(Debug)]
pub struct GaussianOracle {
    means: Vec<Tensor>,
    covariances: Vec<Tensor>,
    alpha_bars: Vec<f64>,
    /// A constant bias added to every coordinate of the optimal ε̂, to mimic
    /// an imperfect model (0 = exact).
    pub perturbation: f64,
}

impl GaussianOracle {
    /// Components (μ_k [D], Σ_k [D, D]) under `schedule`.
    pub fn new(components: Vec<(Tensor, Tensor)>, schedule: &NoiseSchedule) -> Self {
        let (means, covariances) = components
            .into_iter()
            .map(|(m, c)| (m.to_kind(Kind::Double), c.to_kind(Kind::Double)))
            .unzip();
        Self {
            means,
            covariances,
            alpha_bars: (0..=schedule.timesteps())
                .map(|t| schedule.alpha_bar(t))
                .collect(),
            perturbation: 0.0,
        }
    }

    /// Per-component ε̂ [B, D] and log-densities [B] at one timestep.
    fn component(&self, k: usize, w: &Tensor, t: usize) -> (Tensor, Tensor) {
        let ab = self.alpha_bars[t];
        let (a, b) = (ab.sqrt(), (1.0 - ab).sqrt());
        let d = self.means[k].size()[0];
        let eye = Tensor::eye(d, (Kind::Double, w.device()));
        let sigma_t = self.covariances[k].to_device(w.device()) * (a * a) + eye * (b * b);
        let precision = sigma_t.inverse();
        let centered = w - self.means[k].to_device(w.device()) * a;
        let eps = centered.matmul(&precision) * b;
        let log_det = sigma_t.logdet();
        let maha = (centered.matmul(&precision) * &centered).sum_dim_intlist(
            [1].as_slice(),
            false,
            Kind::Double,
        );
        (eps, (maha + log_det) * -0.5)
    }
}

impl Denoiser for GaussianOracle {
    /// Component index per row, [B] int64.
    type Condition = Tensor;

    fn forward(
        &self,
        w_t: &Tensor,
        t: &Tensor,
        condition: &Tensor,
        drop_condition: bool,
    ) -> Tensor {
        let step = t.int64_value(&[0]) as usize;
        let w = w_t.to_kind(Kind::Double);
        let parts: Vec<(Tensor, Tensor)> = (0..self.means.len())
            .map(|k| self.component(k, &w, step))
            .collect();
        let eps = if drop_condition {
            let log_densities = Tensor::stack(
                &parts
                    .iter()
                    .map(|(_, l)| l.shallow_clone())
                    .collect::<Vec<_>>(),
                1,
            );
            let resp = log_densities.softmax(1, Kind::Double);
            let stacked = Tensor::stack(
                &parts
                    .iter()
                    .map(|(e, _)| e.shallow_clone())
                    .collect::<Vec<_>>(),
                1,
            );
            (stacked * resp.unsqueeze(2)).sum_dim_intlist([1].as_slice(), false, Kind::Double)
        } else {
            let stacked = Tensor::stack(
                &parts
                    .iter()
                    .map(|(e, _)| e.shallow_clone())
                    .collect::<Vec<_>>(),
                1,
            );
            let index = condition
                .to_device(w.device())
                .view([-1, 1, 1])
                .expand([-1, 1, w.size()[1]], false);
            stacked.gather(1, &index, false).squeeze_dim(1)
        };
        let eps = eps.to_kind(Kind::Float);
        eps + self.perturbation
    }

    fn prediction(&self) -> Prediction {
        Prediction::Epsilon
    }
}
