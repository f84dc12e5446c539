//! Fine-tuning from an initialization: the test metric after every step,
//! and the first step that reaches a fraction of the fully trained result.

use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};

use crate::tasks::Network;
use crate::tasks::train::{Objective, TaskData, evaluate, loss};
use crate::weights::{CodecError, LayoutError, decode_safetensors, flatten, unflatten};

/// "Reaching the target" means this fraction of the fully trained accuracy
/// (classification), or an MSE within 1 / fraction of the fully trained one.
pub const DEFAULT_TARGET_FRACTION: f64 = 0.9;

/// How an init is fine-tuned.
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneConfig {
    /// Full-batch Adam steps.
    pub steps: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
}

/// The test metric of `params` on `data`: accuracy for classification,
/// MSE for regression (NaN for a network that does not run alone).
pub fn test_metric(net: &Network, params: &[Tensor], data: &TaskData, objective: Objective) -> f64 {
    evaluate(net, params, data, objective)
        .ok()
        .and_then(|scores| scores.get(objective.test_metric()).copied())
        .unwrap_or(f64::NAN)
}

/// A copy of `init` as f32 variables of a new store (on `init`'s device),
/// for an optimizer to train.
pub(super) fn trainable_copy(init: &[Tensor]) -> (nn::VarStore, Vec<Tensor>) {
    let device = init.first().map_or(tch::Device::Cpu, Tensor::device);
    let vs = nn::VarStore::new(device);
    let params = init
        .iter()
        .enumerate()
        .map(|(i, t)| {
            vs.root()
                .var_copy(&format!("p{i}"), &t.to_kind(Kind::Float))
        })
        .collect();
    (vs, params)
}

/// The test metric (accuracy or MSE) of `init` fine-tuned on `data`, before
/// the first step and after each of `config.steps` full-batch Adam steps.
pub fn curve(
    net: &Network,
    init: &[Tensor],
    data: &TaskData,
    objective: Objective,
    config: &FinetuneConfig,
) -> Result<Vec<f64>, tch::TchError> {
    let (vs, params) = trainable_copy(init);
    let mut optimizer = nn::Adam::default().build(&vs, config.learning_rate)?;
    let metric = |params: &[Tensor]| test_metric(net, params, data, objective);
    let mut out = Vec::with_capacity(config.steps + 1);
    out.push(metric(&params));
    for _ in 0..config.steps {
        let Ok(outputs) = net.forward(&params, &data.train_x) else {
            break;
        };
        optimizer.backward_step(&loss(objective, &outputs, &data.train_y));
        out.push(metric(&params));
    }
    Ok(out)
}

/// The metric value that counts as reaching `fraction` of `fully_trained`.
pub fn target_of(objective: Objective, fully_trained: f64, fraction: f64) -> f64 {
    match objective.lower_is_better() {
        false => fraction * fully_trained,
        true => fully_trained / fraction,
    }
}

/// The metric value that closes `fraction` of the gap from `start` (the
/// untrained model's) to `fully_trained`: the `words` family's target, 90 %
/// of the gain a fully trained adapter makes over the base.
pub fn gain_target(start: f64, fully_trained: f64, fraction: f64) -> f64 {
    start + fraction * (fully_trained - start)
}

/// The first step whose metric reaches `target` (0 = the init already does).
pub fn steps_to_target(curve: &[f64], objective: Objective, target: f64) -> Option<usize> {
    curve
        .iter()
        .position(|&m| match objective.lower_is_better() {
            false => m >= target,
            true => m <= target,
        })
}

/// Why a file does not give a network's parameters.
#[derive(Debug, thiserror::Error)]
pub enum InitFileError {
    /// Not a readable safetensors file.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Names or shapes do not match the network.
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// The parameters of a safetensors file in `net`'s order, as f32.
pub fn params_from_safetensors(net: &Network, bytes: &[u8]) -> Result<Vec<Tensor>, InitFileError> {
    let decoded = decode_safetensors(bytes)?;
    let named: Vec<(String, Tensor)> = decoded
        .tensors
        .into_iter()
        .map(|(name, t)| (name, t.to_kind(Kind::Float)))
        .collect();
    let flat = flatten(&net.spec, &named)?;
    Ok(unflatten(&net.spec, &flat)?
        .into_iter()
        .map(|(_, t)| t)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::{Family, TaskSpec};
    use crate::weights::{DType, encode_safetensors};

    #[test]
    fn targets_and_steps_follow_the_objective() {
        assert_eq!(target_of(Objective::Classification, 0.9, 0.9), 0.81);
        assert!((target_of(Objective::Regression, 0.09, 0.9) - 0.1).abs() < 1e-12);
        let accuracy = [0.2, 0.5, 0.85, 0.9];
        assert_eq!(
            steps_to_target(&accuracy, Objective::Classification, 0.81),
            Some(2)
        );
        assert_eq!(
            steps_to_target(&accuracy, Objective::Classification, 0.95),
            None
        );
        assert!((gain_target(11.0, 3.0, 0.9) - 3.8).abs() < 1e-12);
        let mse = [3.0, 0.5, 0.09];
        assert_eq!(steps_to_target(&mse, Objective::Regression, 0.1), Some(2));
    }

    #[test]
    fn fine_tuning_a_random_digits_init_learns_and_files_round_trip() {
        let family = Family::Digits;
        let net = family.network("digits-mlp-64-32-5").unwrap();
        let task = TaskSpec::Digits {
            classes: vec![0, 1, 2, 3, 4],
        };
        let data = family.data(&task, tch::Device::Cpu).unwrap();
        let init = net.init(7, tch::Device::Cpu);
        let config = FinetuneConfig {
            steps: 60,
            learning_rate: 1e-2,
        };
        let accuracy = curve(&net, &init, &data, family.objective(), &config).unwrap();
        assert_eq!(accuracy.len(), 61);
        assert!(accuracy[0] < 0.5, "random init: {}", accuracy[0]);
        assert!(accuracy[60] > 0.85, "after 60 steps: {}", accuracy[60]);
        // An init written as safetensors reads back in the network's order.
        let named: Vec<(String, Tensor)> = net
            .spec
            .tensors
            .iter()
            .zip(&init)
            .map(|(s, t)| (s.name.clone(), t.shallow_clone()))
            .collect();
        let bytes = encode_safetensors(&named, DType::F32, &Default::default()).unwrap();
        let back = params_from_safetensors(&net, &bytes).unwrap();
        for (a, b) in init.iter().zip(&back) {
            assert!(a.equal(b));
        }
    }
}
