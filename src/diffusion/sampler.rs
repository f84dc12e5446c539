//! Reverse diffusion: DDPM ancestral sampling exactly as the proposal writes
//! it, DDIM (Song et al. 2021) with η on a grid of S ≤ T steps,
//! DPM-Solver++(2M) (Lu et al. 2022) for few steps, and classifier-free
//! guidance (Ho & Salimans 2022). The steps themselves run in
//! [`super::step`], many cohorts at once; the one-cohort step functions here
//! (`ddpm_step`, `ddim_step`, `dpm_solver_step`) are the formulas as
//! written, kept as the reference its tests compare against bit for bit.

use tch::{Device, Kind, Tensor};

use super::objective::Prediction;
use super::schedule::NoiseSchedule;
use super::trajectory::Trajectory;
use crate::rng::SeededNoise;

/// A trained noise (or x₀/v) predictor.
pub trait Denoiser {
    /// Whatever the model is conditioned on, for a batch.
    type Condition;

    /// The model output for w_t [B, D] at timesteps `t` [B] (int64 in
    /// 1..=T). With `drop_condition` the model sees its null condition (the
    /// unconditional branch of classifier-free guidance).
    fn forward(
        &self,
        w_t: &Tensor,
        t: &Tensor,
        condition: &Self::Condition,
        drop_condition: bool,
    ) -> Tensor;

    /// How the output is parametrized.
    fn prediction(&self) -> Prediction;
}

/// Which reverse process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerKind {
    /// Ancestral DDPM over all T steps.
    Ddpm,
    /// DDIM over a grid of `steps` timesteps with stochasticity η
    /// (0 = deterministic).
    Ddim {
        /// S ≤ T timesteps on the grid (one denoiser call each, two under guidance).
        steps: usize,
        /// η ∈ [0, 1].
        eta: f64,
        /// Where the S timesteps sit.
        spacing: DdimSpacing,
    },
    /// DPM-Solver++(2M): a second-order multistep solver of the
    /// probability-flow ODE in data (x₀) prediction, on `steps` timesteps
    /// ending at T (the trailing grid); deterministic, one denoiser call a
    /// step (two under guidance). Made for few steps.
    DpmSolver {
        /// S ≤ T timesteps.
        steps: usize,
    },
}

impl SamplerKind {
    /// The timesteps this sampler visits, ascending (DDPM all T, DDIM its
    /// grid, DPM-Solver the trailing grid ending at T).
    pub fn grid(self, timesteps: usize) -> Vec<usize> {
        match self {
            Self::Ddpm => (1..=timesteps).collect(),
            Self::Ddim { steps, spacing, .. } => ddim_grid(timesteps, steps, spacing),
            Self::DpmSolver { steps } => ddim_grid(timesteps, steps, DdimSpacing::Trailing),
        }
    }

    /// DDIM with S steps, η and the default (leading) spacing.
    pub fn ddim(steps: usize, eta: f64) -> Self {
        Self::Ddim {
            steps,
            eta,
            spacing: DdimSpacing::default(),
        }
    }
}

/// The DDIM timestep grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DdimSpacing {
    /// τ_i = 1 + (i−1)·T/S: starts one stride below T. Under the cosine
    /// schedule ᾱ_T ≈ 0 (β_T is clipped), so the first x₀ estimate
    /// (w_t − sqrt(1−ᾱ_t) ε̂)/sqrt(ᾱ_t) divides by ~5e-5 and any model error
    /// explodes; the leading grid's first step has sqrt(ᾱ) ≈ 0.04 instead.
    #[default]
    Leading,
    /// τ_i = round(i·T/S): ends exactly at T (needs x₀ clipping under the
    /// cosine schedule).
    Trailing,
}

/// Bounds for the x₀ estimate (in standardized weight space).
#[derive(Debug)]
pub enum ClipRange {
    /// The same bound ±c for every coordinate.
    Symmetric(f64),
    /// Per-coordinate bounds [D] (e.g. the zoo's min and max).
    Box {
        /// Lower bounds.
        low: Tensor,
        /// Upper bounds.
        high: Tensor,
    },
}

impl ClipRange {
    /// Per-coordinate bounds from a standardized zoo [N, D], widened by
    /// `margin` times each coordinate's range.
    pub fn from_zoo(zoo: &Tensor, margin: f64) -> Self {
        let low = zoo.amin([0].as_slice(), false);
        let high = zoo.amax([0].as_slice(), false);
        let span = (&high - &low) * margin;
        Self::Box {
            low: (&low - &span).to_kind(Kind::Float),
            high: (&high + &span).to_kind(Kind::Float),
        }
    }

    pub(super) fn apply(&self, x0: &Tensor) -> Tensor {
        match self {
            Self::Symmetric(c) => x0.clamp(-c, *c),
            Self::Box { low, high } => {
                let device = x0.device();
                x0.clamp_tensor(Some(&low.to_device(device)), Some(&high.to_device(device)))
            }
        }
    }
}

/// How to sample.
#[derive(Debug)]
pub struct SamplingConfig {
    /// DDPM or DDIM.
    pub kind: SamplerKind,
    /// Classifier-free guidance scale s: output = out_∅ + s·(out_c − out_∅);
    /// 1 is plain conditional sampling (one forward pass per step).
    pub guidance_scale: f64,
    /// Clip the x₀ estimate in DDIM and DDPM steps (needed under the cosine
    /// schedule, where ᾱ_T ≈ 0 makes (w_t − sqrt(1−ᾱ_t)ε̂)/sqrt(ᾱ_t) explode,
    /// and under strong guidance).
    pub clip_x0: Option<ClipRange>,
}

/// Model output with classifier-free guidance applied.
fn guided_output<D: Denoiser>(
    denoiser: &D,
    w_t: &Tensor,
    t: &Tensor,
    condition: &D::Condition,
    scale: f64,
) -> Tensor {
    let conditional = denoiser.forward(w_t, t, condition, false);
    if !is_guided(scale) {
        return conditional;
    }
    let unconditional = denoiser.forward(w_t, t, condition, true);
    guide(&conditional, &unconditional, scale)
}

/// Whether `scale` needs the unconditional branch (1 is plain conditional
/// sampling).
pub fn is_guided(scale: f64) -> bool {
    (scale - 1.0).abs() >= f64::EPSILON
}

/// Classifier-free guidance: out_∅ + s·(out_c − out_∅).
pub fn guide(conditional: &Tensor, unconditional: &Tensor, scale: f64) -> Tensor {
    unconditional + (conditional - unconditional) * scale
}

/// The DDIM timestep grid τ_1 < … < τ_S within 1..=T.
pub fn ddim_grid(timesteps: usize, steps: usize, spacing: DdimSpacing) -> Vec<usize> {
    let steps = steps.clamp(1, timesteps);
    let mut grid: Vec<usize> = (1..=steps)
        .map(|i| match spacing {
            DdimSpacing::Leading => 1 + (i - 1) * timesteps / steps,
            DdimSpacing::Trailing => ((i * timesteps) as f64 / steps as f64).round() as usize,
        })
        .collect();
    grid.dedup();
    grid
}

/// Draws samples w₀ [B, D] for a batch: starts from w_T ~ N(0, I) drawn
/// from `noise` (one seed per row) and runs the reverse process (a
/// [`Trajectory`] driven to its end). Runs without gradients; `noise` ends
/// positioned after the draws made.
pub fn sample<D: Denoiser>(
    denoiser: &D,
    schedule: &NoiseSchedule,
    condition: &D::Condition,
    dim: i64,
    noise: &mut SeededNoise,
    config: &SamplingConfig,
    device: Device,
) -> Tensor {
    tch::no_grad(|| {
        let mut trajectory = Trajectory::start(schedule, config.kind, noise.clone(), dim, device);
        let prediction = denoiser.prediction();
        let batch = trajectory.rows();
        while let Some(t) = trajectory.timestep() {
            let t = Tensor::full([batch], t as i64, (Kind::Int64, device));
            let output = guided_output(
                denoiser,
                trajectory.state(),
                &t,
                condition,
                config.guidance_scale,
            );
            trajectory.advance(schedule, prediction, &output, config.clip_x0.as_ref());
        }
        *noise = trajectory.noise().clone();
        trajectory.into_sample()
    })
}

#[cfg(test)]
/// One DPM-Solver++(2M) step from t to t_next < t, given the data
/// prediction x̂₀ at t and, after the first step, (x̂₀, h) of the step
/// before. With α = sqrt(ᾱ), σ = sqrt(1 − ᾱ), λ = ln(α/σ) and h = λ_next −
/// λ_t: w_next = (σ_next/σ_t) w_t − α_next (e^{−h} − 1) D, where D = x̂₀ on
/// the first step and (1 + 1/2r) x̂₀ − (1/2r) x̂₀′ afterwards (r = h′/h).
/// The last step, to ᾱ = 1 (t_next = 0), is first order and returns x̂₀.
/// Returns w_next and h.
pub(super) fn dpm_solver_step(
    schedule: &NoiseSchedule,
    w_t: &Tensor,
    x0: &Tensor,
    previous: Option<&(Tensor, f64)>,
    t: usize,
    t_next: usize,
) -> (Tensor, f64) {
    if t_next == 0 {
        return (x0.shallow_clone(), f64::INFINITY);
    }
    let lambda = |alpha_bar: f64| 0.5 * (alpha_bar / (1.0 - alpha_bar)).ln();
    let (alpha_bar, alpha_bar_next) = (schedule.alpha_bar(t), schedule.alpha_bar(t_next));
    let h = lambda(alpha_bar_next) - lambda(alpha_bar);
    let d = match previous {
        Some((x0_before, h_before)) => {
            let r = h_before / h;
            x0 * (1.0 + 0.5 / r) - x0_before * (0.5 / r)
        }
        None => x0.shallow_clone(),
    };
    let ratio = ((1.0 - alpha_bar_next) / (1.0 - alpha_bar)).sqrt();
    let next = w_t * ratio - d * (alpha_bar_next.sqrt() * ((-h).exp() - 1.0));
    (next, h)
}

#[cfg(test)]
/// sqrt(ᾱ) and sqrt(1 − ᾱ) of one timestep as scalar f32 tensors on `device`,
/// filled there (a copy from the host would make a CUDA step wait for the
/// device; the values are the same f32s either way).
pub(super) fn scalar_coefficients(alpha_bar: f64, device: Device) -> (Tensor, Tensor) {
    let scalar = |v: f64| {
        Tensor::full(
            [0i64; 0].as_slice(),
            f64::from(v as f32),
            (Kind::Float, device),
        )
    };
    (scalar(alpha_bar.sqrt()), scalar((1.0 - alpha_bar).sqrt()))
}

#[cfg(test)]
/// One DDPM step from t to t − 1. For ε-prediction this is the proposal's
/// w_{t−1} = (w_t − (1−α_t)/sqrt(1−ᾱ_t) · ε̂)/sqrt(α_t) + σ_t z with
/// σ_t² = β̃_t = (1−α_t)(1−ᾱ_{t−1})/(1−ᾱ_t) and z = 0 at t = 1. Other
/// parametrizations use the equal posterior mean
/// μ̃ = sqrt(ᾱ_{t−1})β_t/(1−ᾱ_t) · x̂₀ + sqrt(α_t)(1−ᾱ_{t−1})/(1−ᾱ_t) · w_t.
/// With a clip range, x̂₀ is clipped first and μ̃ taken from it (as in DDIM):
/// without it a guided ε̂ far outside what the denoiser learned compounds
/// over T steps into weights of ~1e15.
#[allow(clippy::too_many_arguments)]
pub(super) fn ddpm_step(
    schedule: &NoiseSchedule,
    prediction: Prediction,
    w_t: &Tensor,
    output: &Tensor,
    t: usize,
    clip: Option<&ClipRange>,
    noise: &mut SeededNoise,
    dim: i64,
    device: Device,
) -> Tensor {
    let alpha = schedule.alpha(t);
    let alpha_bar = schedule.alpha_bar(t);
    let alpha_bar_prev = schedule.alpha_bar(t - 1);
    let mean = match (prediction, clip) {
        (Prediction::Epsilon, None) => {
            (w_t - output * ((1.0 - alpha) / (1.0 - alpha_bar).sqrt())) / alpha.sqrt()
        }
        _ => {
            let (a, b) = scalar_coefficients(alpha_bar, device);
            let (_, mut x0) = prediction.to_eps_x0(output, w_t, &a, &b);
            if let Some(range) = clip {
                x0 = range.apply(&x0);
            }
            x0 * (alpha_bar_prev.sqrt() * schedule.beta(t) / (1.0 - alpha_bar))
                + w_t * (alpha.sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
        }
    };
    // The draw happens at every step (also t = 1) so that a seed's stream
    // stays aligned whatever the step count.
    let z = noise.draw(&[dim], device);
    if t > 1 {
        mean + z * schedule.posterior_variance(t).sqrt()
    } else {
        mean
    }
}

#[cfg(test)]
/// One DDIM step from t to t_prev < t:
/// x̂₀ = clip((w_t − sqrt(1−ᾱ_t) ε̂)/sqrt(ᾱ_t)), ε̂ recomputed from the
/// clipped x̂₀, σ = η·sqrt((1−ᾱ_prev)/(1−ᾱ_t))·sqrt(1−ᾱ_t/ᾱ_prev),
/// w_prev = sqrt(ᾱ_prev) x̂₀ + sqrt(1−ᾱ_prev−σ²) ε̂ + σ z.
#[allow(clippy::too_many_arguments)]
pub(super) fn ddim_step(
    schedule: &NoiseSchedule,
    prediction: Prediction,
    w_t: &Tensor,
    output: &Tensor,
    t: usize,
    t_prev: usize,
    eta: f64,
    clip: Option<&ClipRange>,
    noise: &mut SeededNoise,
    dim: i64,
    device: Device,
) -> Tensor {
    let alpha_bar = schedule.alpha_bar(t);
    let alpha_bar_prev = schedule.alpha_bar(t_prev);
    let (a, b) = scalar_coefficients(alpha_bar, device);
    let (mut eps, mut x0) = prediction.to_eps_x0(output, w_t, &a, &b);
    if let Some(range) = clip {
        x0 = range.apply(&x0);
        eps = (w_t - &x0 * &a) / &b;
    }
    let sigma = eta
        * ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)).sqrt()
        * (1.0 - alpha_bar / alpha_bar_prev).sqrt();
    let direction = (1.0 - alpha_bar_prev - sigma * sigma).max(0.0).sqrt();
    let mut next = x0 * alpha_bar_prev.sqrt() + eps * direction;
    if eta > 0.0 {
        let z = noise.draw(&[dim], device);
        if t_prev > 0 {
            next += z * sigma;
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::ScheduleKind;

    #[test]
    fn a_clipped_ddpm_step_cannot_leave_the_clip_box_however_wild_the_output() {
        let schedule = NoiseSchedule::new(ScheduleKind::cosine(), 1000).unwrap();
        let w_t = Tensor::from_slice(&[0.5f32, -0.5, 2.0]);
        let wild = Tensor::from_slice(&[1e6f32, -1e6, 1e6]);
        let range = ClipRange::Symmetric(3.0);
        let mut noise = SeededNoise::new(&[1], 0);
        for t in [1000, 500, 2] {
            let step = |clip| {
                let mut noise = SeededNoise::new(&[1], 0);
                ddpm_step(
                    &schedule,
                    Prediction::Epsilon,
                    &w_t,
                    &wild,
                    t,
                    clip,
                    &mut noise,
                    3,
                    Device::Cpu,
                )
            };
            let unclipped = step(None).abs().max().double_value(&[]);
            let clipped = step(Some(&range));
            // The posterior mean mixes the clipped x̂₀ and w_t; the noise adds
            // at most a few posterior standard deviations.
            let bound = 3.0 + 2.0 + 6.0 * schedule.posterior_variance(t).sqrt();
            let largest = clipped.abs().max().double_value(&[]);
            assert!(largest <= bound, "t = {t}: {largest} > {bound}");
            assert!(unclipped > 1e3, "t = {t}: the wild output did not matter");
        }
        // Without a clip range an ε step is the proposal's formula, unchanged.
        let plain = ddpm_step(
            &schedule,
            Prediction::Epsilon,
            &w_t,
            &Tensor::zeros([3], (Kind::Float, Device::Cpu)),
            1,
            None,
            &mut noise,
            3,
            Device::Cpu,
        );
        let expected = &w_t / schedule.alpha(1).sqrt();
        assert!(plain.allclose(&expected, 1e-6, 1e-6, false));
    }

    #[test]
    fn scalar_coefficients_are_the_host_f32s_and_match_the_batched_table() {
        let schedule = NoiseSchedule::new(ScheduleKind::cosine(), 1000).unwrap();
        for t in [1usize, 17, 500, 999, 1000] {
            let alpha_bar = schedule.alpha_bar(t);
            let (a, b) = scalar_coefficients(alpha_bar, Device::Cpu);
            assert_eq!(a.size(), Vec::<i64>::new());
            assert_eq!(f32::try_from(&a).unwrap(), alpha_bar.sqrt() as f32);
            assert_eq!(f32::try_from(&b).unwrap(), (1.0 - alpha_bar).sqrt() as f32);
            let (ta, tb) = schedule.coefficients(&Tensor::from_slice(&[t as i64, 3]));
            assert_eq!(
                f32::try_from(ta.get(0).get(0)).unwrap(),
                alpha_bar.sqrt() as f32
            );
            assert_eq!(
                f32::try_from(tb.get(0).get(0)).unwrap(),
                (1.0 - alpha_bar).sqrt() as f32
            );
        }
    }

    #[test]
    fn ddim_grids_have_s_steps_within_1_to_t() {
        assert_eq!(
            ddim_grid(1000, 4, DdimSpacing::Trailing),
            vec![250, 500, 750, 1000]
        );
        assert_eq!(
            ddim_grid(1000, 4, DdimSpacing::Leading),
            vec![1, 251, 501, 751]
        );
        for spacing in [DdimSpacing::Leading, DdimSpacing::Trailing] {
            assert_eq!(ddim_grid(1000, 50, spacing).len(), 50);
            assert_eq!(ddim_grid(10, 50, spacing), (1..=10).collect::<Vec<_>>());
            assert_eq!(ddim_grid(1000, 1, spacing).len(), 1);
        }
    }
}
