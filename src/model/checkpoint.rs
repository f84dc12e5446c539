//! The denoiser checkpoint: one safetensors file holding the denoiser and
//! task-encoder weights ("model.*"), the standardization μ and σ
//! ("stats.*", f64), the optional latent (PCA: "latent.*"; autoencoder:
//! "latent_ae.*" with its shape in the header), x₀ clip range
//! ("clip.*"), task-feature standardization ("features.*") and the zoo
//! reference of the memorization guard ("novelty.zoo", with its spread in
//! the header), with JSON metadata in the header: format, config, ArchSpec,
//! schedule, feature schema and training summary. Loads onto any device.

use std::collections::{BTreeMap, HashMap};

use tch::{Device, Kind, Tensor};

use super::conditional::{ConditionalDenoiser, DenoiserConfig};
use super::latent::Latent;
use super::task_encoder::TaskBatch;
use super::variables::fill_variables;
use super::weight_autoencoder::{AutoencoderConfig, WeightAutoencoder};
use crate::diffusion::schedule::ScheduleError;
use crate::diffusion::{
    ClipRange, RecommendedSampling, SamplerKind, SamplingConfig, Trajectory, sample,
};
use crate::rng::SeededNoise;
use crate::tasks::FeatureSchema;
use crate::weights::{
    ArchSpec, ArchUnion, CodecError, PcaLatent, Stats, StatsMode, UnionError, ZooReference,
    ZooSpread, decode_tensors, encode_tensors,
};

/// Value of the "format" header entry.
pub const FORMAT: &str = "weightgen-denoiser-v1";

/// Noise stream of [`DenoiserCheckpoint::generate`] (a seed gives the same
/// weights whatever else shares its batch).
pub const SAMPLING_STREAM: u64 = 0;

/// Why a checkpoint cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The safetensors layer failed.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A header entry is missing or malformed.
    #[error("checkpoint header entry {key:?}: {reason}")]
    Header {
        /// The entry.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A tensor is missing or has the wrong shape.
    #[error("checkpoint tensors do not match the config: {0}")]
    Tensors(String),
    /// The config's schedule is invalid.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// A denoiser of several architectures cannot generate this one.
    #[error(transparent)]
    Union(#[from] UnionError),
}

/// Everything needed to sample weights for an architecture.
pub struct DenoiserCheckpoint {
    /// Denoiser + task encoder.
    pub model: ConditionalDenoiser,
    /// Architecture of the generated weights.
    pub arch: ArchSpec,
    /// Standardization of the zoo.
    pub stats: Stats,
    /// Latent the denoiser works in, if any.
    pub latent: Option<Latent>,
    /// Bounds of x̂₀ in the denoiser's space (from the zoo).
    pub clip: Option<(Tensor, Tensor)>,
    /// Conditioning inputs.
    pub feature_schema: FeatureSchema,
    /// Mean and std the task features were standardized with (the encoder
    /// sees (features − mean)/std), if any.
    pub feature_norm: Option<(Tensor, Tensor)>,
    /// Training summary (losses, metrics).
    pub summary: BTreeMap<String, f64>,
    /// The training zoo, kept to score samples' nearness to it (absent in
    /// checkpoints written before the memorization guard).
    pub zoo_reference: Option<ZooReference>,
    /// The sampling its training gate chose on validation tasks, used for
    /// what a request leaves unset (absent in older checkpoints).
    pub recommended: Option<RecommendedSampling>,
    /// For a denoiser of several architectures: the union it diffuses in
    /// (`stats`, `clip` and the model are the union's) and where `arch`
    /// sits in it.
    pub union: Option<UnionMembership>,
}

/// A checkpoint of several architectures, loaded for one of them (`arch`).
#[derive(Debug)]
pub struct UnionMembership {
    /// The architectures trained on and their union.
    pub union: ArchUnion,
    /// `arch`'s union coordinates [D_arch] (int64, on the model's device).
    pub indices: Tensor,
    /// Each member's zoo reference (the memorization guard), by member index.
    pub references: Vec<Option<ZooReference>>,
}

fn shallow_reference(reference: &ZooReference) -> ZooReference {
    ZooReference {
        weights: reference.weights.shallow_clone(),
        mean: reference.mean.shallow_clone(),
        spread: reference.spread,
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("serializable metadata")
}

fn header<T: serde::de::DeserializeOwned>(
    meta: &HashMap<String, String>,
    key: &'static str,
) -> Result<T, CheckpointError> {
    let text = meta.get(key).ok_or(CheckpointError::Header {
        key,
        reason: "missing".into(),
    })?;
    serde_json::from_str(text).map_err(|e| CheckpointError::Header {
        key,
        reason: e.to_string(),
    })
}

fn take(tensors: &mut HashMap<String, Tensor>, name: &str) -> Result<Tensor, CheckpointError> {
    tensors
        .remove(name)
        .ok_or_else(|| CheckpointError::Tensors(format!("missing tensor {name:?}")))
}

/// Task features standardized with the zoo's mean and std (floored), on
/// the norm's device.
pub fn standardize_features(features: &Tensor, norm: &(Tensor, Tensor)) -> Tensor {
    // The norm lives wherever the checkpoint was loaded (e.g. cuda:0); the
    // features usually come from the CPU.
    (features.to_device(norm.0.device()).to_kind(Kind::Float) - &norm.0) / &norm.1
}

impl DenoiserCheckpoint {
    /// Makes a checkpoint of several architectures generate `spec`: one it
    /// was trained on, or any other that fits its union (an unseen width),
    /// which has no zoo reference to guard against. Fails for a checkpoint
    /// of one architecture unless `spec` is that one.
    pub fn select_architecture(&mut self, spec: &ArchSpec) -> Result<(), CheckpointError> {
        let Some(membership) = &mut self.union else {
            if spec == &self.arch {
                return Ok(());
            }
            return Err(UnionError::DoesNotFit {
                name: spec.name.clone(),
                reason: format!("the denoiser generates {:?} only", self.arch.name),
            }
            .into());
        };
        let placement = membership.union.place(spec)?;
        let mask = placement.mask(membership.union.dim());
        self.model.set_architecture(&placement.descriptor, &mask);
        membership.indices = Tensor::from_slice(&placement.indices).to_device(self.model.device());
        self.zoo_reference = membership
            .union
            .members()
            .iter()
            .position(|m| m == spec)
            .and_then(|k| membership.references.get(k)?.as_ref())
            .map(shallow_reference);
        self.arch = spec.clone();
        Ok(())
    }

    /// The standardization of `arch`'s own coordinates (for a denoiser of
    /// several architectures, the union's at the selected architecture's
    /// places; `stats` otherwise).
    pub fn arch_stats(&self) -> Stats {
        match &self.union {
            Some(membership) => {
                let index = membership.indices.to_device(self.stats.mean.device());
                Stats {
                    mean: self.stats.mean.index_select(0, &index),
                    std: self.stats.std.index_select(0, &index),
                    mode: self.stats.mode,
                    floor: self.stats.floor,
                }
            }
            None => Stats {
                mean: self.stats.mean.shallow_clone(),
                std: self.stats.std.shallow_clone(),
                mode: self.stats.mode,
                floor: self.stats.floor,
            },
        }
    }

    /// Raw task features [B, F] (schema order) standardized as training did
    /// them (unchanged when the checkpoint records no norm).
    pub fn standardize(&self, features: &Tensor) -> Tensor {
        match &self.feature_norm {
            Some(norm) => standardize_features(features, norm),
            None => features.shallow_clone(),
        }
    }

    /// The denoiser's condition, on its device: raw task features [B, F]
    /// standardized as in training (None: a support-only request, to which
    /// the encoder adds no feature term) and support tensors [B, K, X] /
    /// [B, K, Y]. The one place serving, the quality gate and the
    /// evaluation harness build conditions.
    pub fn condition(
        &self,
        features: Option<&Tensor>,
        support: Option<(Tensor, Tensor)>,
    ) -> TaskBatch {
        let device = self.model.device();
        let (support_x, support_y) = match support {
            Some((x, y)) => (Some(x.to_device(device)), Some(y.to_device(device))),
            None => (None, None),
        };
        TaskBatch {
            features: features.map(|f| self.standardize(f).to_device(device)),
            support_x,
            support_y,
            features_dropped: None,
            support_dropped: None,
            arch_descriptor: None,
            arch_mask: None,
        }
    }

    /// The x₀ clip range for sampling, if recorded.
    pub fn clip_range(&self) -> Option<ClipRange> {
        self.clip.as_ref().map(|(low, high)| ClipRange::Box {
            low: low.shallow_clone(),
            high: high.shallow_clone(),
        })
    }

    /// Generates one weight vector per seed, in the architecture's units:
    /// reverse diffusion in the denoiser's space (x̂₀ clipped to the zoo's
    /// range when recorded), then the latent decoded (if any) and the
    /// standardization undone. `condition` holds one row per seed. Returns
    /// flat f32 weights [B, D] on the model's device, in `arch` order.
    pub fn generate(
        &self,
        condition: &TaskBatch,
        seeds: &[u64],
        kind: SamplerKind,
        guidance_scale: f64,
    ) -> Tensor {
        let device = self.model.device();
        let rows = seeds.len() as i64;
        let embedded = self.model.embed(condition, rows);
        let config = SamplingConfig {
            kind,
            guidance_scale,
            clip_x0: self.clip_range(),
        };
        let z = sample(
            &self.model.with_embeddings(),
            self.model.schedule(),
            &embedded,
            self.model.config().dim,
            &mut SeededNoise::new(seeds, SAMPLING_STREAM),
            &config,
            device,
        );
        self.weights(&z)
    }

    /// Starts the reverse diffusion of one row per seed (the noise stream
    /// [`Self::generate`] uses), for a caller that drives the denoiser
    /// itself: the server's step-level batcher.
    pub fn start(&self, seeds: &[u64], kind: SamplerKind) -> Trajectory {
        Trajectory::start(
            self.model.schedule(),
            kind,
            SeededNoise::new(seeds, SAMPLING_STREAM),
            self.model.config().dim,
            self.model.device(),
        )
    }

    /// Takes one step of each of `cohorts` with its (guided) `outputs[i]`,
    /// clipping x̂₀ as [`Self::generate`] does; cohorts taking the same kind
    /// of step share their tensor operations ([`Trajectory::advance_all`]).
    pub fn advance_all(&self, cohorts: &mut [&mut Trajectory], outputs: &[&Tensor]) {
        let clip = self.clip_range();
        Trajectory::advance_all(
            cohorts,
            outputs,
            self.model.schedule(),
            self.model.config().prediction,
            clip.as_ref(),
        );
    }

    /// Sampled rows [B, dim] in the architecture's units: the latent
    /// decoded (if any) and the standardization undone, as f32.
    pub fn weights(&self, z: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let standardized = match &self.latent {
                Some(latent) => latent.decode(z),
                None => z.shallow_clone(),
            };
            let weights = self
                .stats
                .denormalize(&standardized)
                .to_kind(tch::Kind::Float);
            match &self.union {
                Some(membership) => weights.index_select(1, &membership.indices),
                None => weights,
            }
        })
    }

    /// Encodes the checkpoint as one safetensors file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        let mut tensors: Vec<(String, Tensor)> = self
            .model
            .vs
            .variables()
            .into_iter()
            .map(|(name, t)| (format!("model.{name}"), t.detach()))
            .collect();
        tensors.push(("stats.mean".into(), self.stats.mean.shallow_clone()));
        tensors.push(("stats.std".into(), self.stats.std.shallow_clone()));
        // Each latent kind's tensors and its header entry.
        let latent_header = match &self.latent {
            Some(Latent::Pca(latent)) => {
                tensors.push(("latent.mean".into(), latent.mean.shallow_clone()));
                tensors.push((
                    "latent.components".into(),
                    latent.components.shallow_clone(),
                ));
                tensors.push(("latent.scales".into(), latent.scales.shallow_clone()));
                Some(("latent_explained", json(&latent.explained)))
            }
            Some(Latent::Autoencoder(ae)) => {
                for (name, t) in ae.named_tensors() {
                    tensors.push((format!("latent_ae.{name}"), t));
                }
                Some(("latent_autoencoder", json(&ae.config)))
            }
            None => None,
        };
        if let Some((low, high)) = &self.clip {
            tensors.push(("clip.low".into(), low.shallow_clone()));
            tensors.push(("clip.high".into(), high.shallow_clone()));
        }
        if let Some((mean, std)) = &self.feature_norm {
            tensors.push(("features.mean".into(), mean.shallow_clone()));
            tensors.push(("features.std".into(), std.shallow_clone()));
        }
        let mut spreads = Vec::new();
        match &self.union {
            // Every member's reference; `zoo_reference` is the selected one's.
            Some(membership) => {
                for (k, reference) in membership.references.iter().enumerate() {
                    if let Some(reference) = reference {
                        tensors.push((
                            format!("novelty.member{k}"),
                            reference.weights.shallow_clone(),
                        ));
                    }
                    spreads.push(reference.as_ref().map(|r| r.spread));
                }
            }
            None => {
                if let Some(reference) = &self.zoo_reference {
                    tensors.push(("novelty.zoo".into(), reference.weights.shallow_clone()));
                }
            }
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut meta = HashMap::new();
        meta.insert("format".to_owned(), FORMAT.to_owned());
        meta.insert("config".to_owned(), json(self.model.config()));
        meta.insert("arch".to_owned(), json(&self.arch));
        meta.insert(
            "stats".to_owned(),
            json(&(self.stats.mode, self.stats.floor)),
        );
        meta.insert("feature_schema".to_owned(), json(&self.feature_schema));
        meta.insert(
            "summary".to_owned(),
            json(&crate::figures::finite(&self.summary)),
        );
        if let Some((key, value)) = latent_header {
            meta.insert(key.to_owned(), value);
        }
        match &self.union {
            Some(membership) => {
                meta.insert(
                    "architectures".to_owned(),
                    json(&membership.union.members()),
                );
                meta.insert("novelty_spreads".to_owned(), json(&spreads));
            }
            None => {
                if let Some(reference) = &self.zoo_reference {
                    meta.insert("novelty_spread".to_owned(), json(&reference.spread));
                }
            }
        }
        if let Some(recommended) = &self.recommended {
            meta.insert("recommended_sampling".to_owned(), json(recommended));
        }
        Ok(encode_tensors(&tensors, &meta)?)
    }

    /// Reads a checkpoint and places the model on `device`.
    pub fn from_bytes(bytes: &[u8], device: Device) -> Result<Self, CheckpointError> {
        let (mut tensors, meta) = decode_tensors(bytes)?;
        match meta.get("format") {
            Some(f) if f == FORMAT => {}
            other => {
                return Err(CheckpointError::Header {
                    key: "format",
                    reason: format!("expected {FORMAT:?}, found {other:?}"),
                });
            }
        }
        let config: DenoiserConfig = header(&meta, "config")?;
        let arch: ArchSpec = header(&meta, "arch")?;
        let (mode, floor): (StatsMode, f64) = header(&meta, "stats")?;
        let feature_schema: FeatureSchema = header(&meta, "feature_schema")?;
        let summary = crate::figures::present(header(&meta, "summary")?);
        let mut model = ConditionalDenoiser::new(config, device)?;
        let mut problems = fill_variables(&model.vs, "model.", |name| {
            tensors.remove(&format!("model.{name}"))
        });
        if let Some(extra) = tensors.keys().find(|k| k.starts_with("model.")) {
            problems.push(format!("unexpected {extra}"));
        }
        if !problems.is_empty() {
            return Err(CheckpointError::Tensors(problems.join("; ")));
        }
        model.vs.set_device(device);
        model.prepare_for_sampling();
        let stats = Stats {
            mean: take(&mut tensors, "stats.mean")?,
            std: take(&mut tensors, "stats.std")?,
            mode,
            floor,
        };
        let latent = if tensors.contains_key("latent.components") {
            Some(Latent::Pca(PcaLatent {
                mean: take(&mut tensors, "latent.mean")?.to_device(device),
                components: take(&mut tensors, "latent.components")?.to_device(device),
                scales: take(&mut tensors, "latent.scales")?.to_device(device),
                explained: header(&meta, "latent_explained")?,
            }))
        } else if meta.contains_key("latent_autoencoder") {
            let config: AutoencoderConfig = header(&meta, "latent_autoencoder")?;
            let ae = WeightAutoencoder::from_tensors(
                config,
                |name| tensors.remove(&format!("latent_ae.{name}")),
                device,
            )
            .map_err(|e| CheckpointError::Tensors(format!("latent autoencoder: {e}")))?;
            Some(Latent::Autoencoder(Box::new(ae)))
        } else {
            None
        };
        let clip = match (tensors.remove("clip.low"), tensors.remove("clip.high")) {
            (Some(low), Some(high)) => Some((low.to_device(device), high.to_device(device))),
            _ => None,
        };
        let feature_norm = match (
            tensors.remove("features.mean"),
            tensors.remove("features.std"),
        ) {
            (Some(mean), Some(std)) => Some((mean.to_device(device), std.to_device(device))),
            _ => None,
        };
        let reference = |weights: Tensor, spread: ZooSpread| {
            let weights = weights.to_kind(tch::Kind::Float).to_device(device);
            let mean = weights.mean_dim(0, false, tch::Kind::Float);
            ZooReference {
                weights,
                mean,
                spread,
            }
        };
        let zoo_reference = match tensors.remove("novelty.zoo") {
            Some(weights) => Some(reference(weights, header(&meta, "novelty_spread")?)),
            None => None,
        };
        let union = match meta.contains_key("architectures") {
            false => None,
            true => {
                let members: Vec<ArchSpec> = header(&meta, "architectures")?;
                let spreads: Vec<Option<ZooSpread>> = header(&meta, "novelty_spreads")?;
                let references = spreads
                    .into_iter()
                    .enumerate()
                    .map(|(k, spread)| {
                        let weights = tensors.remove(&format!("novelty.member{k}"));
                        spread.zip(weights).map(|(s, w)| reference(w, s))
                    })
                    .collect();
                Some(UnionMembership {
                    union: ArchUnion::new(&members)?,
                    indices: Tensor::zeros([0], (tch::Kind::Int64, device)),
                    references,
                })
            }
        };
        let recommended: Option<RecommendedSampling> =
            match meta.contains_key("recommended_sampling") {
                true => Some(header(&meta, "recommended_sampling")?),
                false => None,
            };
        // Serving takes its steps and guidance as given: they must be usable.
        if let Some(r) = &recommended {
            let timesteps = model.config().timesteps;
            let usable =
                (1..=timesteps).contains(&r.steps) && r.guidance.is_finite() && r.guidance >= 0.0;
            if !usable {
                return Err(CheckpointError::Header {
                    key: "recommended_sampling",
                    reason: format!(
                        "{} steps (T = {timesteps}) at guidance {} cannot be sampled",
                        r.steps, r.guidance
                    ),
                });
            }
        }
        let mut checkpoint = Self {
            model,
            arch: arch.clone(),
            stats,
            latent,
            clip,
            feature_schema,
            feature_norm,
            summary,
            zoo_reference,
            recommended,
            union,
        };
        if checkpoint.union.is_some() {
            checkpoint.select_architecture(&arch)?;
        }
        Ok(checkpoint)
    }
}
