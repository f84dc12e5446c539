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
use super::sampler::{ClipRange, SamplerKind};
use super::schedule::NoiseSchedule;
use super::step::{Member, StepClass, dpm_h, plan, run};
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
        let remaining = kind.grid(schedule.timesteps());
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
        Self::advance_all(&mut [self], &[output], schedule, prediction, clip);
    }

    /// Takes one step of each of `cohorts` with its `outputs[i]` (cohorts
    /// that are done are left as they are). Cohorts taking the same kind of
    /// step share one set of tensor operations (see [`super::step`]), so a
    /// pass of many small cohorts costs about what one cohort of all their
    /// rows does; each row comes out as it would alone.
    pub fn advance_all(
        cohorts: &mut [&mut Trajectory],
        outputs: &[&Tensor],
        schedule: &NoiseSchedule,
        prediction: Prediction,
        clip: Option<&ClipRange>,
    ) {
        struct Planned {
            cohort: usize,
            class: StepClass,
            coefficients: Vec<f64>,
        }
        let mut planned = Vec::with_capacity(cohorts.len());
        for (cohort, trajectory) in cohorts.iter_mut().enumerate() {
            let Some(t) = trajectory.remaining.pop() else {
                continue;
            };
            let t_next = trajectory.remaining.last().copied().unwrap_or(0);
            let previous_h = trajectory.previous.as_ref().map(|(_, h)| *h);
            let (class, coefficients, draws) = plan(
                trajectory.kind,
                schedule,
                prediction,
                clip.is_some(),
                t,
                t_next,
                previous_h,
            );
            if draws && !class.adds_noise() {
                trajectory.noise.skip();
            }
            planned.push(Planned {
                cohort,
                class,
                coefficients,
            });
        }
        let mut classes: Vec<StepClass> = Vec::new();
        for p in &planned {
            if !classes.contains(&p.class) {
                classes.push(p.class);
            }
        }
        for class in classes {
            let group: Vec<&Planned> = planned.iter().filter(|p| p.class == class).collect();
            // The group's noise, drawn for all its cohorts in one go (rows
            // in cohort order, as the group is).
            let noise = class.adds_noise().then(|| {
                let mut in_group = vec![false; cohorts.len()];
                for p in &group {
                    in_group[p.cohort] = true;
                }
                let first = &cohorts[group[0].cohort];
                let (dim, device) = (first.dim, first.w.device());
                let mut streams: Vec<&mut SeededNoise> = cohorts
                    .iter_mut()
                    .zip(&in_group)
                    .filter(|(_, member)| **member)
                    .map(|(c, _)| &mut c.noise)
                    .collect();
                SeededNoise::draw_all(&mut streams, &[dim], device)
            });
            let stepped = {
                let members: Vec<Member<'_>> = group
                    .iter()
                    .map(|p| Member {
                        w: &cohorts[p.cohort].w,
                        output: outputs[p.cohort],
                        coefficients: &p.coefficients,
                        previous_x0: cohorts[p.cohort].previous.as_ref().map(|(x0, _)| x0),
                    })
                    .collect();
                tch::no_grad(|| run(class, &members, noise.as_ref(), prediction, clip))
            };
            for (p, stepped) in group.iter().zip(stepped) {
                let trajectory = &mut cohorts[p.cohort];
                trajectory.w = stepped.w;
                if let Some(x0) = stepped.x0 {
                    trajectory.previous = Some((x0, dpm_h(&p.coefficients)));
                }
            }
        }
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
