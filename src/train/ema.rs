//! Exponential moving average of a model's variables: the weights that get
//! published (smoother than the last optimizer step).

use tch::Tensor;
use tch::nn::VarStore;

/// Shadow copies, one per variable name.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    /// Starts at the current weights; `decay` 0 means "last weights".
    pub fn new(vs: &VarStore, decay: f64) -> Self {
        let mut shadow: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(name, t)| (name, t.detach().copy()))
            .collect();
        shadow.sort_by(|a, b| a.0.cmp(&b.0));
        Self { decay, shadow }
    }

    /// shadow ← decay·shadow + (1 − decay)·weights.
    pub fn update(&mut self, vs: &VarStore) {
        let variables = vs.variables();
        tch::no_grad(|| {
            for (name, shadow) in &mut self.shadow {
                if let Some(current) = variables.get(name) {
                    // decay·shadow + (1 − decay)·current, in one in-place pass.
                    let _ = shadow.lerp_(current, 1.0 - self.decay);
                }
            }
        });
    }

    /// The averaged weights, in name order (shallow handles).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.shadow
            .iter()
            .map(|(name, t)| (name.clone(), t.shallow_clone()))
            .collect()
    }

    /// Overwrites the averages with saved ones (`tensor` looks them up by
    /// variable name).
    pub fn restore(
        &mut self,
        mut tensor: impl FnMut(&str) -> Option<Tensor>,
    ) -> Result<(), String> {
        for (name, shadow) in &mut self.shadow {
            let saved = tensor(name).ok_or_else(|| format!("missing EMA of {name}"))?;
            if saved.size() != shadow.size() {
                return Err(format!(
                    "EMA of {name}: shape {:?}, expected {:?}",
                    saved.size(),
                    shadow.size()
                ));
            }
            tch::no_grad(|| shadow.copy_(&saved));
        }
        Ok(())
    }

    /// Writes the averaged weights into `vs`.
    pub fn copy_into(&self, vs: &VarStore) {
        let mut variables = vs.variables();
        tch::no_grad(|| {
            for (name, shadow) in &self.shadow {
                if let Some(var) = variables.get_mut(name) {
                    var.copy_(shadow);
                }
            }
        });
    }

    /// Runs `f` with the averaged weights in `vs`, then puts the live ones back.
    pub fn with_averaged<T>(&self, vs: &VarStore, f: impl FnOnce() -> T) -> T {
        let live: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(name, t)| (name, t.detach().copy()))
            .collect();
        self.copy_into(vs);
        let out = f();
        let mut variables = vs.variables();
        tch::no_grad(|| {
            for (name, saved) in &live {
                if let Some(var) = variables.get_mut(name) {
                    var.copy_(saved);
                }
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, nn};

    #[test]
    fn the_average_follows_the_weights_and_restores_them() {
        let vs = VarStore::new(Device::Cpu);
        let mut w = vs.root().var("w", &[3], nn::Init::Const(0.0));
        let mut ema = Ema::new(&vs, 0.5);
        tch::no_grad(|| w.copy_(&Tensor::ones([3], (Kind::Float, Device::Cpu))));
        ema.update(&vs); // 0.5
        ema.update(&vs); // 0.75
        let seen = ema.with_averaged(&vs, || w.mean(Kind::Double).double_value(&[]));
        assert!((seen - 0.75).abs() < 1e-6, "{seen}");
        assert_eq!(
            w.mean(Kind::Double).double_value(&[]),
            1.0,
            "live weights restored"
        );
        ema.copy_into(&vs);
        assert!((w.mean(Kind::Double).double_value(&[]) - 0.75).abs() < 1e-6);
    }
}
