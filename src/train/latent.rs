//! Which space the denoiser diffuses in: the standardized weights, a PCA
//! latent of them fitted on the training split of the zoo (a given size, or
//! the smallest size whose rebuilt zoo models still do their tasks), or a
//! learned autoencoder latent of a given size trained on the same split.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::quality::score;
use crate::model::weight_autoencoder::DEFAULT_AE_HIDDEN;
use crate::model::{AutoencoderFit, Latent, WeightAutoencoder};
use crate::tasks::Objective;
use crate::weights::{MetricGoal, PcaLatent, Stats, choose_latent_size};
use crate::zoo::ZooDataset;

/// The largest latent size a spec may ask for.
pub const MAX_LATENT_SIZE: i64 = 65_536;
/// Candidate sizes of `pca:auto`, smallest first.
pub const AUTO_LATENT_SIZES: [i64; 6] = [16, 32, 64, 128, 256, 512];
/// Zoo models `pca:auto` rebuilds and scores per candidate size.
pub const AUTO_LATENT_PROBE_MODELS: usize = 64;
/// `pca:auto` on accuracy: the rebuilt zoo may lose at most this much.
/// Chosen on the digits validation gate: a bigger latent keeps the zoo
/// more exactly but is harder to learn (2,000 steps: 64 components, 2.8
/// points lost by the rebuilt zoo, scored 0.81 / 0.86 / 0.69 zero-shot with
/// both inputs / features / support set; 256 components, 0.7 points lost,
/// 0.64 / 0.68 / 0.54 — docs/RESULTS.md).
pub const AUTO_LATENT_ACCURACY_TOLERANCE: f64 = 0.03;
/// `pca:auto` on MSE: the rebuilt zoo's MSE may grow by at most this factor
/// (not yet chosen on a validation gate).
pub const AUTO_LATENT_MSE_FACTOR: f64 = 1.1;

/// The space the denoiser works in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "size")]
pub enum LatentChoice {
    /// The standardized weights themselves (D coordinates).
    None,
    /// A PCA latent of this many components.
    Pca(i64),
    /// A PCA latent of the size `choose_latent_size` picks.
    PcaAuto,
    /// A learned autoencoder latent of this size.
    Autoencoder(i64),
}

impl std::fmt::Display for LatentChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Pca(k) => write!(f, "pca:{k}"),
            Self::PcaAuto => f.write_str("pca:auto"),
            Self::Autoencoder(k) => write!(f, "ae:{k}"),
        }
    }
}

impl std::str::FromStr for LatentChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "{s:?} is not \"none\", \"pca:auto\", \"pca:K\" or \"ae:K\" with K in [1, {MAX_LATENT_SIZE}]"
            )
        };
        let size = |text: &str| match text.parse::<i64>() {
            Ok(k) if (1..=MAX_LATENT_SIZE).contains(&k) => Ok(k),
            _ => Err(bad()),
        };
        match s {
            "none" => Ok(Self::None),
            "pca" | "pca:auto" => Ok(Self::PcaAuto),
            _ => match (s.strip_prefix("pca:"), s.strip_prefix("ae:")) {
                (Some(k), _) => size(k).map(Self::Pca),
                (_, Some(k)) => size(k).map(Self::Autoencoder),
                _ => Err(bad()),
            },
        }
    }
}

/// Fits the latent `choice` asks for on the standardized training weights
/// `train` [N, D] (rows `rows` of `data`), or `None` for no latent. An
/// autoencoder trains `autoencoder_steps` Adam steps on `device` and keeps
/// the weights that rebuild the validation models `val` best.
#[allow(clippy::too_many_arguments)]
pub fn fit_latent(
    choice: LatentChoice,
    autoencoder_steps: usize,
    train: &Tensor,
    val: &Tensor,
    rows: &[i64],
    data: &ZooDataset,
    stats: &Stats,
    seed: u64,
    device: Device,
) -> Option<Latent> {
    let size = match choice {
        LatentChoice::None => return None,
        LatentChoice::Pca(k) => k,
        LatentChoice::PcaAuto => auto_size(train, rows, data, stats, seed)?,
        LatentChoice::Autoencoder(k) => {
            let fit = AutoencoderFit {
                steps: autoencoder_steps,
                seed,
                ..Default::default()
            };
            let ae = WeightAutoencoder::fit(
                &train.to_device(device),
                Some(val),
                k,
                DEFAULT_AE_HIDDEN,
                &fit,
            );
            let latent = Latent::Autoencoder(Box::new(ae));
            tracing::info!(
                size = latent.dim(),
                train_mse = latent.reconstruction_mse(train),
                steps = fit.steps,
                "autoencoder latent trained on the training zoo"
            );
            return Some(latent);
        }
    };
    let latent = PcaLatent::fit(train, size, seed);
    tracing::info!(
        size = latent.dim(),
        explained = latent.explained_total(),
        "PCA latent fitted on the training zoo"
    );
    Some(Latent::Pca(latent))
}

/// The smallest candidate size whose rebuilt zoo models score within the
/// tolerance of the originals on their own tasks; `None` if none does.
fn auto_size(
    train: &Tensor,
    rows: &[i64],
    data: &ZooDataset,
    stats: &Stats,
    seed: u64,
) -> Option<i64> {
    let probe = rows.len().min(AUTO_LATENT_PROBE_MODELS);
    let tasks: Vec<_> = rows[..probe]
        .iter()
        .map(|&r| data.tasks[r as usize].clone())
        .collect();
    let objective = data.family.objective();
    let evaluate = |standardized: &Tensor| {
        let weights = stats.denormalize(standardized).to_kind(Kind::Float);
        let scores: Vec<f64> = tasks
            .iter()
            .enumerate()
            .map(|(i, task)| score(data, task, &weights.get(i as i64)))
            .collect();
        let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
        match objective {
            Objective::Classification => mean,
            Objective::Regression | Objective::LanguageModel => mean.max(f64::MIN_POSITIVE).ln(),
        }
    };
    let (goal, tolerance) = match objective {
        Objective::Classification => (MetricGoal::HigherIsBetter, AUTO_LATENT_ACCURACY_TOLERANCE),
        Objective::Regression | Objective::LanguageModel => {
            (MetricGoal::LowerIsBetter, AUTO_LATENT_MSE_FACTOR.ln())
        }
    };
    let sizes: Vec<i64> = AUTO_LATENT_SIZES
        .iter()
        .copied()
        .filter(|&k| k < train.size()[0].min(train.size()[1]))
        .collect();
    let (chosen, original, reports) =
        choose_latent_size(train, probe as i64, &sizes, evaluate, goal, tolerance, seed);
    tracing::info!(
        ?chosen,
        original,
        ?reports,
        "latent size chosen by rebuilt zoo quality"
    );
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print_back() {
        for text in ["none", "pca:auto", "pca:128", "ae:64"] {
            let choice: LatentChoice = text.parse().unwrap();
            assert_eq!(choice.to_string(), text);
        }
        assert_eq!("pca".parse::<LatentChoice>(), Ok(LatentChoice::PcaAuto));
        for bad in [
            "pca:0",
            "pca:-3",
            "pca:x",
            "ae:0",
            "ae:",
            "ae",
            "ae:auto",
            "pca:70000",
            "",
        ] {
            assert!(bad.parse::<LatentChoice>().is_err(), "{bad}");
        }
    }
}
