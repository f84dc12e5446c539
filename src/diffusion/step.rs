//! One reverse step for many cohorts at once. The step-level batcher
//! advances every cohort of a pass after the denoiser call; done one cohort
//! at a time that is a dozen small tensor operations per cohort, and 64
//! single-sample requests paid 64 dozen of them per pass. Here cohorts that
//! take the same kind of step (a [`StepClass`]) share one set of
//! operations on their rows concatenated, each row scaled by its own
//! cohort's coefficients: a `[rows, k]` table of f32 values built on the
//! host and copied to the device once per class, so the work per pass no
//! longer grows with the number of cohorts.
//!
//! The arithmetic is row-wise, and a single cohort goes through the same
//! code ([`super::Trajectory::advance`] is this with one member), so a
//! cohort's rows come out the same alone or among others, in the server
//! and in [`super::sample`].

use tch::{Device, Kind, Tensor};

use super::objective::Prediction;
use super::sampler::{ClipRange, SamplerKind};
use super::schedule::NoiseSchedule;

/// The kind of step a cohort takes now: cohorts of one class share the
/// same operations, with per-row coefficients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StepClass {
    /// DDIM; `noise`: σ z is added (η > 0 and not the last step).
    Ddim { noise: bool },
    /// DDPM with ε-prediction and no clip (the proposal's formula).
    DdpmEpsilon { noise: bool },
    /// DDPM through x̂₀ (clipped, or another prediction).
    DdpmPosterior { noise: bool },
    /// DPM-Solver++(2M)'s first step (first order).
    DpmFirst,
    /// DPM-Solver++(2M) after its first step (second order, with the x̂₀
    /// of the step before).
    DpmSecond,
    /// DPM-Solver++(2M)'s last step, to ᾱ = 1: returns x̂₀.
    DpmLast,
}

/// One cohort's part of a step.
pub(super) struct Member<'a> {
    /// The state w_t [rows, D].
    pub w: &'a Tensor,
    /// The denoiser's (guided) output for it.
    pub output: &'a Tensor,
    /// Its coefficients, in the order its class reads them.
    pub coefficients: &'a [f64],
    /// DPM-Solver's x̂₀ of the step before (class `DpmSecond`).
    pub previous_x0: Option<&'a Tensor>,
}

/// What a step gives each member: w at the next timestep and, for
/// DPM-Solver, the x̂₀ to remember.
pub(super) struct Stepped {
    pub w: Tensor,
    pub x0: Option<Tensor>,
}

impl StepClass {
    /// Whether the step adds σ z (drawn for all its cohorts at once).
    pub(super) fn adds_noise(self) -> bool {
        matches!(
            self,
            Self::Ddim { noise: true }
                | Self::DdpmEpsilon { noise: true }
                | Self::DdpmPosterior { noise: true }
        )
    }
}

/// The class of a step from t to `t_next`, its per-cohort coefficients,
/// and whether the cohort's sampler draws noise at this step (every DDPM
/// step and every DDIM step with η > 0, so a seed's stream stays aligned
/// whatever the step count — also where the class does not add it).
pub(super) fn plan(
    kind: SamplerKind,
    schedule: &NoiseSchedule,
    prediction: Prediction,
    clipped: bool,
    t: usize,
    t_next: usize,
    has_previous: Option<f64>,
) -> (StepClass, Vec<f64>, bool) {
    let alpha_bar = schedule.alpha_bar(t);
    let (a, b) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
    match kind {
        SamplerKind::Ddim { eta, .. } => {
            let alpha_bar_prev = schedule.alpha_bar(t_next);
            let sigma = eta
                * ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)).sqrt()
                * (1.0 - alpha_bar / alpha_bar_prev).sqrt();
            let direction = (1.0 - alpha_bar_prev - sigma * sigma).max(0.0).sqrt();
            let draws = eta > 0.0;
            (
                StepClass::Ddim {
                    noise: draws && t_next > 0,
                },
                vec![a, b, alpha_bar_prev.sqrt(), direction, sigma],
                draws,
            )
        }
        SamplerKind::Ddpm => {
            let alpha = schedule.alpha(t);
            let alpha_bar_prev = schedule.alpha_bar(t - 1);
            let add = t > 1;
            let sigma = schedule.posterior_variance(t).sqrt();
            let (class, coefficients) = if prediction == Prediction::Epsilon && !clipped {
                (
                    StepClass::DdpmEpsilon { noise: add },
                    vec![
                        (1.0 - alpha) / (1.0 - alpha_bar).sqrt(),
                        alpha.sqrt(),
                        sigma,
                    ],
                )
            } else {
                (
                    StepClass::DdpmPosterior { noise: add },
                    vec![
                        a,
                        b,
                        alpha_bar_prev.sqrt() * schedule.beta(t) / (1.0 - alpha_bar),
                        alpha.sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar),
                        sigma,
                    ],
                )
            };
            (class, coefficients, true)
        }
        SamplerKind::DpmSolver { .. } => {
            if t_next == 0 {
                return (StepClass::DpmLast, vec![a, b], false);
            }
            let alpha_bar_next = schedule.alpha_bar(t_next);
            let h = dpm_lambda(alpha_bar_next) - dpm_lambda(alpha_bar);
            let ratio = ((1.0 - alpha_bar_next) / (1.0 - alpha_bar)).sqrt();
            let scale = alpha_bar_next.sqrt() * ((-h).exp() - 1.0);
            match has_previous {
                None => (StepClass::DpmFirst, vec![a, b, ratio, scale, h], false),
                Some(h_before) => {
                    let r = h_before / h;
                    (
                        StepClass::DpmSecond,
                        vec![a, b, ratio, scale, h, 1.0 + 0.5 / r, 0.5 / r],
                        false,
                    )
                }
            }
        }
    }
}

/// DPM-Solver's λ = ln(α/σ) of ᾱ.
pub(super) fn dpm_lambda(alpha_bar: f64) -> f64 {
    0.5 * (alpha_bar / (1.0 - alpha_bar)).ln()
}

/// The step size h a DPM-Solver member's coefficients carry.
pub(super) fn dpm_h(coefficients: &[f64]) -> f64 {
    coefficients.get(4).copied().unwrap_or(f64::INFINITY)
}

/// Runs one class's step on all its `members` at once; `noise` holds the
/// members' fresh draws, rows in member order, exactly when the class adds
/// σ z ([`StepClass::adds_noise`]).
pub(super) fn run(
    class: StepClass,
    members: &[Member<'_>],
    noise: Option<&Tensor>,
    prediction: Prediction,
    clip: Option<&ClipRange>,
) -> Vec<Stepped> {
    let rows: Vec<i64> = members.iter().map(|m| m.w.size()[0]).collect();
    let cat = |pick: &dyn Fn(&Member<'_>) -> Tensor| -> Tensor {
        match members {
            [one] => pick(one),
            _ => Tensor::cat(&members.iter().map(pick).collect::<Vec<_>>(), 0),
        }
    };
    let w = cat(&|m| m.w.shallow_clone());
    let output = cat(&|m| m.output.shallow_clone());
    let columns = coefficient_columns(members, &rows, w.device());
    let c = |k: i64| columns.narrow(1, k, 1);
    // x̂₀ (clipped to the range) and, where the step needs it, ε̂ — from
    // the clipped x̂₀ when clipped.
    let x0_estimate = || {
        let (_, x0) = prediction.to_eps_x0(&output, &w, &c(0), &c(1));
        clip.map_or(x0.shallow_clone(), |range| range.apply(&x0))
    };
    let eps_x0_estimate = || {
        let (eps, x0) = prediction.to_eps_x0(&output, &w, &c(0), &c(1));
        match clip {
            Some(range) => {
                let x0 = range.apply(&x0);
                let eps = (&w - &x0 * c(0)) / c(1);
                (eps, x0)
            }
            None => (eps, x0),
        }
    };
    // σ z added where drawn (coefficient `k` is σ).
    let with_noise = |mean: Tensor, k: i64| match noise {
        Some(z) => mean + z * c(k),
        None => mean,
    };
    let (next, x0) = match class {
        StepClass::Ddim { .. } => {
            let (eps, x0) = eps_x0_estimate();
            (with_noise(x0 * c(2) + eps * c(3), 4), None)
        }
        StepClass::DdpmEpsilon { .. } => {
            let mean = (&w - &output * c(0)) / c(1);
            (with_noise(mean, 2), None)
        }
        StepClass::DdpmPosterior { .. } => {
            let x0 = x0_estimate();
            (with_noise(x0 * c(2) + &w * c(3), 4), None)
        }
        StepClass::DpmLast => {
            let x0 = x0_estimate();
            (x0.shallow_clone(), Some(x0))
        }
        StepClass::DpmFirst => {
            let x0 = x0_estimate();
            let next = &w * c(2) - &x0 * c(3);
            (next, Some(x0))
        }
        StepClass::DpmSecond => {
            let x0 = x0_estimate();
            let before = cat(&|m| {
                m.previous_x0
                    .expect("a second-order step has the x̂₀ before")
                    .shallow_clone()
            });
            let d = &x0 * c(5) - before * c(6);
            let next = &w * c(2) - d * c(3);
            (next, Some(x0))
        }
    };
    let mut offset = 0;
    rows.iter()
        .map(|&n| {
            let part = |t: &Tensor| t.narrow(0, offset, n);
            let stepped = Stepped {
                w: part(&next),
                x0: x0.as_ref().map(part),
            };
            offset += n;
            stepped
        })
        .collect()
}

/// Each member's coefficients repeated over its rows, as f32 [rows, k] on
/// `device` (one copy, not waited for).
fn coefficient_columns(members: &[Member<'_>], rows: &[i64], device: Device) -> Tensor {
    let k = members.first().map_or(0, |m| m.coefficients.len());
    let mut table = Vec::with_capacity(rows.iter().sum::<i64>() as usize * k);
    for (member, &n) in members.iter().zip(rows) {
        let values: Vec<f32> = member.coefficients.iter().map(|&v| v as f32).collect();
        for _ in 0..n {
            table.extend_from_slice(&values);
        }
    }
    Tensor::from_slice(&table)
        .view([-1, k as i64])
        .to_device_(device, Kind::Float, true, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::Trajectory;
    use crate::diffusion::sampler::{ddim_step, ddpm_step, dpm_solver_step, scalar_coefficients};
    use crate::diffusion::schedule::ScheduleKind;
    use crate::rng::SeededNoise;

    /// One cohort stepped by the one-cohort reference formulas.
    struct Reference {
        kind: SamplerKind,
        remaining: Vec<usize>,
        w: Tensor,
        noise: SeededNoise,
        previous: Option<(Tensor, f64)>,
    }

    impl Reference {
        fn step(
            &mut self,
            schedule: &NoiseSchedule,
            prediction: Prediction,
            output: &Tensor,
            clip: Option<&ClipRange>,
        ) {
            let t = self.remaining.pop().unwrap();
            let t_next = self.remaining.last().copied().unwrap_or(0);
            let d = self.w.size()[1];
            let cpu = Device::Cpu;
            self.w = match self.kind {
                SamplerKind::Ddpm => ddpm_step(
                    schedule,
                    prediction,
                    &self.w,
                    output,
                    t,
                    clip,
                    &mut self.noise,
                    d,
                    cpu,
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
                    d,
                    cpu,
                ),
                SamplerKind::DpmSolver { .. } => {
                    let (a, b) = scalar_coefficients(schedule.alpha_bar(t), cpu);
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
        }
    }

    #[test]
    fn cohorts_stepped_together_match_the_one_cohort_formulas_bit_for_bit() {
        let schedule = NoiseSchedule::new(ScheduleKind::cosine(), 40).unwrap();
        let d = 37;
        let zoo = SeededNoise::new(&[5], 9)
            .draw(&[20, d], Device::Cpu)
            .squeeze_dim(0);
        let clips = [None, Some(ClipRange::from_zoo(&zoo, 0.1))];
        let kinds = [
            SamplerKind::Ddpm,
            SamplerKind::ddim(7, 0.0),
            SamplerKind::ddim(5, 0.7),
            SamplerKind::DpmSolver { steps: 6 },
            SamplerKind::DpmSolver { steps: 3 },
        ];
        for prediction in [Prediction::Epsilon, Prediction::X0, Prediction::V] {
            for clip in &clips {
                // Cohorts of 1–3 rows, every sampler, started together.
                let mut cohorts: Vec<Trajectory> = Vec::new();
                let mut references: Vec<Reference> = Vec::new();
                for (i, &kind) in kinds.iter().enumerate() {
                    let seeds: Vec<u64> =
                        (0..=(i as u64 % 3)).map(|s| 100 * i as u64 + s).collect();
                    let noise = SeededNoise::new(&seeds, 2);
                    let cohort = Trajectory::start(&schedule, kind, noise.clone(), d, Device::Cpu);
                    let mut reference_noise = noise;
                    let w = reference_noise.draw(&[d], Device::Cpu);
                    let remaining = kind.grid(schedule.timesteps());
                    assert!(w.equal(cohort.state()));
                    references.push(Reference {
                        kind,
                        remaining,
                        w,
                        noise: reference_noise,
                        previous: None,
                    });
                    cohorts.push(cohort);
                }
                let mut round = 0u64;
                while cohorts.iter().any(|c| c.timestep().is_some()) {
                    // A made-up denoiser output per cohort: any values do.
                    let outputs: Vec<Tensor> = cohorts
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            SeededNoise::new(&vec![round * 31 + i as u64; c.rows() as usize], 7)
                                .draw(&[d], Device::Cpu)
                                * 1.5
                        })
                        .collect();
                    for ((cohort, reference), output) in
                        cohorts.iter().zip(references.iter_mut()).zip(&outputs)
                    {
                        if cohort.timestep().is_some() {
                            reference.step(&schedule, prediction, output, clip.as_ref());
                        }
                    }
                    let mut all: Vec<&mut Trajectory> = cohorts.iter_mut().collect();
                    let outs: Vec<&Tensor> = outputs.iter().collect();
                    Trajectory::advance_all(&mut all, &outs, &schedule, prediction, clip.as_ref());
                    for (i, (cohort, reference)) in cohorts.iter().zip(&references).enumerate() {
                        assert!(
                            cohort.state().equal(&reference.w),
                            "{prediction:?}, clip {}, cohort {i} ({:?}), round {round}",
                            clip.is_some(),
                            kinds[i]
                        );
                    }
                    round += 1;
                }
            }
        }
    }
}
