//! Adam as `torch.optim.Adam` computes it (no AMSGrad), and with decoupled
//! weight decay as `torch.optim.AdamW` computes it, written out so that its
//! moments can be saved in a training checkpoint and restored: libtorch's
//! built-in optimizer keeps them out of reach.

use tch::{Kind, Tensor};

/// Default Adam β₁ (PyTorch's).
pub const DEFAULT_BETA1: f64 = 0.9;
/// Default Adam β₂ (PyTorch's).
pub const DEFAULT_BETA2: f64 = 0.999;
/// Default Adam ε (PyTorch's).
pub const DEFAULT_EPS: f64 = 1e-8;

/// Adam over a named, ordered set of parameters.
#[derive(Debug)]
pub struct Adam {
    learning_rate: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    steps: u64,
    params: Vec<(String, Tensor)>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
}

impl Adam {
    /// Adam with PyTorch's defaults over `params` (sorted by name so the
    /// state has a stable order).
    pub fn new(mut params: Vec<(String, Tensor)>, learning_rate: f64) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = |params: &[(String, Tensor)]| -> Vec<Tensor> {
            params.iter().map(|(_, p)| p.zeros_like()).collect()
        };
        Self {
            learning_rate,
            beta1: DEFAULT_BETA1,
            beta2: DEFAULT_BETA2,
            eps: DEFAULT_EPS,
            weight_decay: 0.0,
            steps: 0,
            first: zeros(&params),
            second: zeros(&params),
            params,
        }
    }

    /// AdamW: every step first shrinks each parameter by `lr · weight_decay`
    /// (decoupled from the gradient's moments, as `torch.optim.AdamW`; 0 is
    /// plain Adam).
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = weight_decay;
        self
    }

    /// Sets the learning rate of the next steps (a schedule's).
    pub fn set_learning_rate(&mut self, learning_rate: f64) {
        self.learning_rate = learning_rate;
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Clears every parameter's gradient.
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// The parameters (shallow handles), in parameter order.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, p)| p.shallow_clone()).collect()
    }

    /// Gives every parameter without one a zero gradient, so that
    /// [`Self::add_gradients`] has somewhere to add (a parameter gets its
    /// `.grad` from its first backward pass otherwise).
    pub fn define_gradients(&self) {
        let undefined: Vec<Tensor> = self
            .params
            .iter()
            .filter(|(_, p)| !p.grad().defined())
            .map(|(_, p)| (p * 0.0).sum(Kind::Float))
            .collect();
        if !undefined.is_empty() {
            Tensor::stack(&undefined, 0).sum(Kind::Float).backward();
        }
    }

    /// Adds `grads` (in parameter order, as `parameters` lists them; an
    /// undefined one adds nothing) to the gradients in place. Call
    /// [`Self::define_gradients`] before the backward pass that fills them.
    pub fn add_gradients(&self, grads: &[Tensor]) {
        tch::no_grad(|| {
            for ((_, p), g) in self.params.iter().zip(grads) {
                let mut existing = p.grad();
                if g.defined() && existing.defined() {
                    let _ = existing.g_add_(g);
                }
            }
        });
    }

    /// The gradients that exist, in parameter order.
    pub fn gradients(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(Tensor::defined)
            .collect()
    }

    /// Multiplies every gradient by `factor` in place.
    pub fn scale_gradients(&self, factor: f64) {
        tch::no_grad(|| {
            for mut g in self.gradients() {
                let _ = g.g_mul_scalar_(factor);
            }
        });
    }

    /// L2 norm of all gradients together (NaN or ∞ when one is not finite).
    pub fn gradient_norm(&self) -> f64 {
        tch::no_grad(|| {
            let norms: Vec<Tensor> = self
                .gradients()
                .iter()
                .map(|g| g.to_kind(Kind::Float).norm())
                .collect();
            if norms.is_empty() {
                return 0.0;
            }
            Tensor::stack(&norms, 0).norm().double_value(&[])
        })
    }

    /// Scales gradients so their joint norm is at most `max_norm` (as
    /// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
    pub fn clip_gradient_norm(&self, max_norm: f64) -> f64 {
        let total = self.gradient_norm();
        self.clip_known_norm(max_norm, total);
        total
    }

    /// Clipping when the joint norm `total` is already known.
    pub fn clip_known_norm(&self, max_norm: f64, total: f64) {
        let coefficient = max_norm / (total + 1e-6);
        if coefficient < 1.0 {
            self.scale_gradients(coefficient);
        }
    }

    /// One Adam update of every parameter that has a gradient.
    pub fn step(&mut self) {
        self.steps += 1;
        let step = self.steps as i32;
        let bias1 = 1.0 - self.beta1.powi(step);
        let bias2_sqrt = (1.0 - self.beta2.powi(step)).sqrt();
        let step_size = self.learning_rate / bias1;
        let shrink = 1.0 - self.learning_rate * self.weight_decay;
        tch::no_grad(|| {
            for (((_, p), m), v) in self
                .params
                .iter_mut()
                .zip(&mut self.first)
                .zip(&mut self.second)
            {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                if self.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(shrink);
                }
                // In place, with two temporaries per parameter (PyTorch's
                // single-tensor Adam has three): at D = 100k the moments are
                // hundreds of MB and memory traffic is the cost.
                let _ = m.lerp_(&g, 1.0 - self.beta1);
                let _ = v.g_mul_scalar_(self.beta2);
                let _ = v.addcmul_(&(&g * (1.0 - self.beta2)), &g);
                let mut denom = v.sqrt();
                let _ = denom.g_div_scalar_(bias2_sqrt);
                let _ = denom.g_add_scalar_(self.eps);
                // p += m / (denom · (−1/step)) = p − step · m / denom.
                let _ = denom.g_mul_scalar_(-1.0 / step_size);
                let _ = p.addcdiv_(m, &denom);
            }
        });
    }

    /// The moments as named tensors ("m.<param>", "v.<param>").
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (((name, _), m), v) in self.params.iter().zip(&self.first).zip(&self.second) {
            out.push((format!("m.{name}"), m.shallow_clone()));
            out.push((format!("v.{name}"), v.shallow_clone()));
        }
        out
    }

    /// Restores the moments and the step count saved by `state_tensors`.
    pub fn restore(
        &mut self,
        steps: u64,
        mut tensor: impl FnMut(&str) -> Option<Tensor>,
    ) -> Result<(), String> {
        for (((name, p), m), v) in self
            .params
            .iter()
            .zip(&mut self.first)
            .zip(&mut self.second)
        {
            for (prefix, slot) in [("m", m), ("v", v)] {
                let key = format!("{prefix}.{name}");
                let saved = tensor(&key).ok_or_else(|| format!("missing {key}"))?;
                if saved.size() != p.size() {
                    return Err(format!(
                        "{key}: shape {:?}, parameter has {:?}",
                        saved.size(),
                        p.size()
                    ));
                }
                tch::no_grad(|| slot.copy_(&saved));
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, OptimizerConfig};
    use tch::{Device, Kind};

    fn quadratic_loss(p: &Tensor, target: &Tensor) -> Tensor {
        (p - target).pow_tensor_scalar(2).sum(Kind::Float)
    }

    /// Runs 50 steps of our Adam (with `weight_decay`) and of libtorch's
    /// `reference` optimizer from the same weights on a quadratic loss;
    /// returns our weights and the loss before the first step and after the last.
    fn beside_libtorch<O: OptimizerConfig>(
        weight_decay: f64,
        reference: O,
        seed: i64,
    ) -> (Tensor, f64, f64) {
        tch::manual_seed(seed);
        let target = Tensor::randn([5, 7], (Kind::Float, Device::Cpu));
        let init = Tensor::randn([5, 7], (Kind::Float, Device::Cpu)) * 3.0;
        let vs_ours = nn::VarStore::new(Device::Cpu);
        let vs_ref = nn::VarStore::new(Device::Cpu);
        let ours = vs_ours.root().var_copy("w", &init);
        let theirs = vs_ref.root().var_copy("w", &init);
        let mut adam = Adam::new(vec![("w".into(), ours.shallow_clone())], 1e-2)
            .with_weight_decay(weight_decay);
        let mut torch_adam = reference.build(&vs_ref, 1e-2).unwrap();
        let initial = quadratic_loss(&ours, &target).double_value(&[]);
        for _ in 0..50 {
            adam.zero_grad();
            quadratic_loss(&ours, &target).backward();
            adam.step();
            torch_adam.backward_step(&quadratic_loss(&theirs, &target));
        }
        let diff = (&ours - &theirs).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "max difference {diff}");
        let last = quadratic_loss(&ours, &target).double_value(&[]);
        (ours, initial, last)
    }

    #[test]
    fn matches_libtorch_adam_step_for_step() {
        let (_, initial, last) = beside_libtorch(0.0, nn::Adam::default(), 3);
        assert!(last < 0.8 * initial);
    }

    #[test]
    fn weight_decay_matches_libtorch_adamw_step_for_step() {
        let adamw = nn::AdamW {
            wd: 0.5,
            ..Default::default()
        };
        let (decayed, _, _) = beside_libtorch(0.5, adamw, 4);
        let (plain, _, _) = beside_libtorch(0.0, nn::Adam::default(), 4);
        // The decay pulls toward zero: smaller weights than plain Adam's.
        let norm = |t: &Tensor| t.norm().double_value(&[]);
        assert!(norm(&decayed) < norm(&plain) - 1e-3);
    }

    #[test]
    fn clipping_bounds_the_joint_norm() {
        let vs = nn::VarStore::new(Device::Cpu);
        let a = vs
            .root()
            .var_copy("a", &Tensor::zeros([3], (Kind::Float, Device::Cpu)));
        let adam = Adam::new(vec![("a".into(), a.shallow_clone())], 1e-3);
        (&a * Tensor::from_slice(&[3.0f32, 4.0, 0.0]))
            .sum(Kind::Float)
            .backward();
        let before = adam.clip_gradient_norm(1.0);
        assert!((before - 5.0).abs() < 1e-6);
        assert!((adam.gradient_norm() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn restored_state_continues_identically() {
        let target = Tensor::from_slice(&[1.0f32, -2.0, 0.5]);
        let run = |split: Option<usize>| {
            let vs = nn::VarStore::new(Device::Cpu);
            let p = vs
                .root()
                .var_copy("p", &Tensor::zeros([3], (Kind::Float, Device::Cpu)));
            let mut adam = Adam::new(vec![("p".into(), p.shallow_clone())], 0.1);
            for i in 0..20 {
                if Some(i) == split {
                    let saved: Vec<(String, Tensor)> = adam
                        .state_tensors()
                        .into_iter()
                        .map(|(k, t)| (k, t.copy()))
                        .collect();
                    let steps = adam.steps();
                    adam = Adam::new(vec![("p".into(), p.shallow_clone())], 0.1);
                    adam.restore(steps, |k| {
                        saved.iter().find(|(n, _)| n == k).map(|(_, t)| t.copy())
                    })
                    .unwrap();
                }
                adam.zero_grad();
                quadratic_loss(&p, &target).backward();
                adam.step();
            }
            p.copy()
        };
        assert!(run(None).equal(&run(Some(7))));
    }
}
