//! One reverse diffusion as a state machine: a cohort of rows that started
//! together and advance one timestep per denoiser output. [`sample`] runs
//! one to its end; the server's step-level batcher keeps many, at
//! different timesteps and with different samplers, and feeds them all from
//! one denoiser pass per step. Both use the same arithmetic, so a cohort's
//! rows come out the same whichever way it was driven.
//!
//! [`sample`]: super::sample

use tch::{Device, Tensor};

use super::objective::Prediction;
use super::sampler::{
    ClipRange, DdimSpacing, SamplerKind, ddim_grid, ddim_step, ddpm_step, dpm_solver_step,
    scalar_coefficients,
};
use super::schedule::NoiseSchedule;
use crate::rng::SeededNoise;

/// Rows on their way from w_T to w_0 under one sampler.
#[derive(Debug)]
pub struct Trajectory {
    kind: SamplerKind,
    /// The timesteps still to visit, last one first (so `pop` is the next).
    remaining: Vec<usize>,
    /// The current state w_t [rows, dim].
    w: Tensor,
    noise: SeededNoise,
    dim: i64,
    /// DPM-Solver++(2M)'s x̂₀ and step size h of the step before.
    previous: Option<(Tensor, f64)>,
}

impl Trajectory {
    /// Starts at w_T ~ N(0, I), drawn from `noise` (one seed per row).
    pub fn start(
        schedule: &NoiseSchedule,
        kind: SamplerKind,
        mut noise: SeededNoise,
        dim: i64,
        device: Device,
    ) -> Self {
        let w = noise.draw(&[dim], device);
        // Ascending grids; the next timestep is the last element.
        let remaining = match kind {
            SamplerKind::Ddpm => (1..=schedule.timesteps()).collect(),
            SamplerKind::Ddim { steps, spacing, .. } => {
                ddim_grid(schedule.timesteps(), steps, spacing)
            }
            SamplerKind::DpmSolver { steps } => {
                ddim_grid(schedule.timesteps(), steps, DdimSpacing::Trailing)
            }
        };
        Self {
            kind,
            remaining,
            w,
            noise,
            dim,
            previous: None,
        }
    }

    /// The timestep the next denoiser output must be for; None when done.
    pub fn timestep(&self) -> Option<usize> {
        self.remaining.last().copied()
    }

    /// Denoiser outputs still needed.
    pub fn steps_left(&self) -> usize {
        self.remaining.len()
    }

    /// Rows.
    pub fn rows(&self) -> i64 {
        self.w.size()[0]
    }

    /// w_t [rows, dim] at the next timestep (the denoiser's input).
    pub fn state(&self) -> &Tensor {
        &self.w
    }

    /// The noise stream, positioned after the draws made so far.
    pub fn noise(&self) -> &SeededNoise {
        &self.noise
    }

    /// Takes one step with the denoiser's (guided) `output` for the
    /// current state at [`Self::timestep`]. Does nothing when done.
    pub fn advance(
        &mut self,
        schedule: &NoiseSchedule,
        prediction: Prediction,
        output: &Tensor,
        clip: Option<&ClipRange>,
    ) {
        let Some(t) = self.remaining.pop() else {
            return;
        };
        let t_next = self.remaining.last().copied().unwrap_or(0);
        let device = self.w.device();
        tch::no_grad(|| {
            self.w = match self.kind {
                SamplerKind::Ddpm => ddpm_step(
                    schedule,
                    prediction,
                    &self.w,
                    output,
                    t,
                    clip,
                    &mut self.noise,
                    self.dim,
                    device,
                ),
                SamplerKind::Ddim { eta, .. } => ddim_step(
                    schedule,
                    prediction,
                    &self.w,
                    output,
                    t,
                    t_next,
                    eta,
                    clip,
                    &mut self.noise,
                    self.dim,
                    device,
                ),
                SamplerKind::DpmSolver { .. } => {
                    let (a, b) = scalar_coefficients(schedule.alpha_bar(t), device);
                    let (_, mut x0) = prediction.to_eps_x0(output, &self.w, &a, &b);
                    if let Some(range) = clip {
                        x0 = range.apply(&x0);
                    }
                    let (next, h) =
                        dpm_solver_step(schedule, &self.w, &x0, self.previous.as_ref(), t, t_next);
                    self.previous = Some((x0, h));
                    next
                }
            };
        });
    }

    /// w_0 [rows, dim] once done (the current state otherwise).
    pub fn into_sample(self) -> Tensor {
        self.w
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::ScheduleKind;

    #[test]
    fn each_sampler_visits_its_grid_from_the_top() {
        let schedule = NoiseSchedule::new(ScheduleKind::cosine(), 100).unwrap();
        let cases = [
            (SamplerKind::Ddpm, 100, 100),
            (SamplerKind::ddim(10, 0.0), 10, 91),
            (SamplerKind::DpmSolver { steps: 4 }, 4, 100),
        ];
        for (kind, steps, first) in cases {
            let mut trajectory = Trajectory::start(
                &schedule,
                kind,
                SeededNoise::new(&[1, 2], 0),
                3,
                Device::Cpu,
            );
            assert_eq!(trajectory.rows(), 2);
            assert_eq!(trajectory.steps_left(), steps, "{kind:?}");
            assert_eq!(trajectory.timestep(), Some(first), "{kind:?}");
            let zero = Tensor::zeros([2, 3], (tch::Kind::Float, Device::Cpu));
            let mut seen = Vec::new();
            while let Some(t) = trajectory.timestep() {
                seen.push(t);
                trajectory.advance(&schedule, Prediction::Epsilon, &zero, None);
            }
            assert_eq!(seen.len(), steps);
            assert!(seen.windows(2).all(|w| w[0] > w[1]), "{kind:?}: {seen:?}");
            assert!(trajectory.into_sample().isfinite().all().int64_value(&[]) != 0);
        }
    }
}
