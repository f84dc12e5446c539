//! Noise schedules {β_t}, α_t = 1 − β_t and ᾱ_t = ∏_{s≤t} α_s for t = 1..T,
//! with ᾱ_0 = 1; the posterior variance β̃_t; and the closed-form forward
//! process w_t = sqrt(ᾱ_t) w_0 + sqrt(1 − ᾱ_t) ε.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Number of diffusion steps T of the proposal.
pub const DEFAULT_TIMESTEPS: usize = 1000;
/// Offset s of the cosine schedule (Nichol & Dhariwal 2021).
pub const DEFAULT_COSINE_OFFSET: f64 = 0.008;
/// Largest β_t of the cosine schedule (Nichol & Dhariwal clip at 0.999).
pub const DEFAULT_MAX_BETA: f64 = 0.999;
/// β_1 and β_T of the linear schedule (Ho et al. 2020, for T = 1000).
pub const DEFAULT_LINEAR_BETAS: (f64, f64) = (1e-4, 0.02);

/// Which schedule, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScheduleKind {
    /// β_t linear from `beta_start` (t = 1) to `beta_end` (t = T).
    Linear {
        /// β_1.
        beta_start: f64,
        /// β_T.
        beta_end: f64,
    },
    /// ᾱ_t = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s)) · π/2), with β_t
    /// clipped to `max_beta`.
    Cosine {
        /// The offset s.
        s: f64,
        /// Upper clip of β_t.
        max_beta: f64,
    },
}

impl ScheduleKind {
    /// The cosine schedule with its published defaults (the proposal's default).
    pub fn cosine() -> Self {
        Self::Cosine {
            s: DEFAULT_COSINE_OFFSET,
            max_beta: DEFAULT_MAX_BETA,
        }
    }

    /// The linear schedule with its published defaults.
    pub fn linear() -> Self {
        Self::Linear {
            beta_start: DEFAULT_LINEAR_BETAS.0,
            beta_end: DEFAULT_LINEAR_BETAS.1,
        }
    }
}

impl Default for ScheduleKind {
    fn default() -> Self {
        Self::cosine()
    }
}

/// Why a schedule cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    /// T must be at least 1.
    #[error("the number of timesteps T must be at least 1")]
    NoSteps,
    /// Parameters give β outside (0, 1).
    #[error("schedule parameters give β_{t} = {beta}, outside (0, 1)")]
    BadBeta {
        /// The timestep (1-based) whose β is out of range.
        t: usize,
        /// Its β.
        beta: f64,
    },
}

/// A schedule of T steps, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    kind: ScheduleKind,
    /// β_t at index t − 1.
    betas: Vec<f64>,
    /// ᾱ_t at index t (ᾱ_0 = 1).
    alpha_bars: Vec<f64>,
    /// `alpha_bars` as a tensor on the device last asked for.
    table: DeviceTable,
}

/// A tensor kept on the device it was last asked for. Uploading the ᾱ
/// table at every call would be a host-to-device copy per denoiser pass:
/// on CUDA a wait for the device, and not allowed inside a CUDA graph.
#[derive(Debug, Default)]
struct DeviceTable(std::sync::Mutex<Option<Tensor>>);

impl DeviceTable {
    fn on(&self, device: tch::Device, values: &[f64]) -> Tensor {
        let mut slot = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(table) = slot.as_ref().filter(|t| t.device() == device) {
            return table.shallow_clone();
        }
        let table = Tensor::from_slice(values).to_device(device);
        *slot = Some(table.shallow_clone());
        table
    }
}

/// A cache: a copy starts empty.
impl Clone for DeviceTable {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// A cache of the values it is compared by.
impl PartialEq for DeviceTable {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The cosine schedule's f(t) = cos²(((t/T + s)/(1 + s)) · π/2).
fn cosine_f(t: f64, timesteps: f64, s: f64) -> f64 {
    (((t / timesteps + s) / (1.0 + s)) * std::f64::consts::FRAC_PI_2)
        .cos()
        .powi(2)
}

impl NoiseSchedule {
    /// Builds the schedule for T = `timesteps`.
    pub fn new(kind: ScheduleKind, timesteps: usize) -> Result<Self, ScheduleError> {
        if timesteps == 0 {
            return Err(ScheduleError::NoSteps);
        }
        let t_max = timesteps as f64;
        let betas: Vec<f64> = (1..=timesteps)
            .map(|t| match kind {
                ScheduleKind::Linear {
                    beta_start,
                    beta_end,
                } => {
                    if timesteps == 1 {
                        beta_start
                    } else {
                        beta_start + (beta_end - beta_start) * (t - 1) as f64 / (t_max - 1.0)
                    }
                }
                ScheduleKind::Cosine { s, max_beta } => {
                    let ratio = cosine_f(t as f64, t_max, s) / cosine_f(t as f64 - 1.0, t_max, s);
                    (1.0 - ratio).min(max_beta)
                }
            })
            .collect();
        if let Some((i, &beta)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(**b > 0.0 && **b < 1.0))
        {
            return Err(ScheduleError::BadBeta { t: i + 1, beta });
        }
        let mut alpha_bars = Vec::with_capacity(timesteps + 1);
        alpha_bars.push(1.0);
        for beta in &betas {
            let last = *alpha_bars.last().expect("starts with ᾱ_0");
            alpha_bars.push(last * (1.0 - beta));
        }
        Ok(Self {
            kind,
            betas,
            alpha_bars,
            table: DeviceTable::default(),
        })
    }

    /// The schedule's kind and parameters.
    pub fn kind(&self) -> ScheduleKind {
        self.kind
    }

    /// The number of diffusion steps T.
    pub fn timesteps(&self) -> usize {
        self.betas.len()
    }

    /// β_t for t in 1..=T.
    pub fn beta(&self, t: usize) -> f64 {
        self.betas[t - 1]
    }

    /// α_t = 1 − β_t for t in 1..=T.
    pub fn alpha(&self, t: usize) -> f64 {
        1.0 - self.beta(t)
    }

    /// ᾱ_t for t in 0..=T (ᾱ_0 = 1).
    pub fn alpha_bar(&self, t: usize) -> f64 {
        self.alpha_bars[t]
    }

    /// β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) · β_t, the variance σ_t² of the DDPM
    /// step, for t in 1..=T.
    pub fn posterior_variance(&self, t: usize) -> f64 {
        (1.0 - self.alpha_bar(t - 1)) / (1.0 - self.alpha_bar(t)) * self.beta(t)
    }

    /// sqrt(ᾱ_t) and sqrt(1 − ᾱ_t) for a batch of timesteps `t` ([B], int64),
    /// each as a [B, 1] f32 tensor on `t`'s device.
    pub fn coefficients(&self, t: &Tensor) -> (Tensor, Tensor) {
        let table = self.table.on(t.device(), &self.alpha_bars);
        let alpha_bar = table.index_select(0, t).unsqueeze(1);
        (
            alpha_bar.sqrt().to_kind(Kind::Float),
            (alpha_bar.neg() + 1.0).sqrt().to_kind(Kind::Float),
        )
    }

    /// q(w_t | w_0): w_t = sqrt(ᾱ_t) w_0 + sqrt(1 − ᾱ_t) ε for w_0 [B, D],
    /// timesteps `t` [B] and noise ε [B, D].
    pub fn q_sample(&self, w0: &Tensor, t: &Tensor, noise: &Tensor) -> Tensor {
        let (a, b) = self.coefficients(t);
        w0 * a + noise * b
    }

    /// Timesteps drawn uniformly from {1, …, T}, as the proposal's loss asks.
    pub fn sample_timesteps(&self, batch: i64, device: Device) -> Tensor {
        Tensor::randint_low(
            1,
            self.timesteps() as i64 + 1,
            [batch],
            (Kind::Int64, device),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_bar_is_the_cumulative_product_for_both_schedules() {
        for kind in [ScheduleKind::linear(), ScheduleKind::cosine()] {
            let s = NoiseSchedule::new(kind, 1000).unwrap();
            let mut product = 1.0;
            for t in 1..=1000 {
                product *= s.alpha(t);
                assert!((s.alpha_bar(t) - product).abs() < 1e-15, "{kind:?} t={t}");
            }
            assert_eq!(s.alpha_bar(0), 1.0);
        }
    }

    #[test]
    fn cosine_matches_its_closed_form() {
        let s = NoiseSchedule::new(ScheduleKind::cosine(), 1000).unwrap();
        let f0 = cosine_f(0.0, 1000.0, DEFAULT_COSINE_OFFSET);
        // Before β reaches its clip, ᾱ_t = f(t)/f(0) exactly.
        for t in [1, 10, 100, 500, 900, 990] {
            let closed = cosine_f(t as f64, 1000.0, DEFAULT_COSINE_OFFSET) / f0;
            assert!((s.alpha_bar(t) - closed).abs() < 1e-12, "t={t}");
        }
        // The last step is clipped and ᾱ_T is nearly 0 — the DDIM trap.
        assert_eq!(s.beta(1000), DEFAULT_MAX_BETA);
        assert!(s.alpha_bar(1000) < 1e-8);
    }

    #[test]
    fn linear_endpoints_and_posterior_variance() {
        let s = NoiseSchedule::new(ScheduleKind::linear(), 1000).unwrap();
        assert!((s.beta(1) - 1e-4).abs() < 1e-18);
        assert!((s.beta(1000) - 0.02).abs() < 1e-15);
        for t in [2, 50, 999] {
            let expected = (1.0 - s.alpha_bar(t - 1)) / (1.0 - s.alpha_bar(t)) * s.beta(t);
            assert_eq!(s.posterior_variance(t), expected);
            assert!(s.posterior_variance(t) < s.beta(t));
        }
        assert_eq!(s.posterior_variance(1), 0.0);
    }

    #[test]
    fn q_sample_has_the_closed_form_mean_and_variance() {
        let s = NoiseSchedule::new(ScheduleKind::cosine(), 1000).unwrap();
        let n = 200_000;
        let w0 = Tensor::full([n, 1], 2.0, (Kind::Float, Device::Cpu));
        let t = Tensor::full([n], 300, (Kind::Int64, Device::Cpu));
        let noise = crate::diffusion::SeededNoise::new(&[11], 0).draw(&[n, 1], Device::Cpu);
        let wt = s.q_sample(&w0, &t, &noise.reshape([n, 1]));
        let mean = wt.mean(Kind::Double).double_value(&[]);
        let var = wt.var(false).double_value(&[]);
        let ab = s.alpha_bar(300);
        assert!((mean - 2.0 * ab.sqrt()).abs() < 0.01, "mean {mean}");
        assert!((var - (1.0 - ab)).abs() < 0.01, "var {var}");
    }

    #[test]
    fn rejects_empty_and_invalid_schedules() {
        assert_eq!(
            NoiseSchedule::new(ScheduleKind::cosine(), 0),
            Err(ScheduleError::NoSteps)
        );
        let bad = ScheduleKind::Linear {
            beta_start: 0.5,
            beta_end: 1.5,
        };
        assert!(matches!(
            NoiseSchedule::new(bad, 10),
            Err(ScheduleError::BadBeta { .. })
        ));
    }
}
