//! The conditioning inputs a denoiser understands: named features with
//! lengths and ranges, an optional embedding, and an optional support set
//! (mirrors `weightgen.v1.FeatureSchema`).

use serde::{Deserialize, Serialize};

/// One named feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpec {
    /// Name, e.g. "class_ids".
    pub name: String,
    /// What it means.
    #[serde(default)]
    pub description: String,
    /// Number of values (1 for a scalar).
    pub length: usize,
    /// Inclusive bounds of every value.
    pub min: f64,
    /// Inclusive upper bound.
    pub max: f64,
    /// Whether a request must give it.
    #[serde(default)]
    pub required: bool,
}

/// Shapes and bounds of a support set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupportSpec {
    /// Shape of one input.
    pub input_shape: Vec<usize>,
    /// Shape of one target (empty for class indices).
    pub target_shape: Vec<usize>,
    /// Targets are class indices.
    pub classification: bool,
    /// Fewest examples accepted.
    pub min_examples: usize,
    /// Most examples accepted.
    pub max_examples: usize,
    /// Whether a request must give a support set.
    #[serde(default)]
    pub required: bool,
    /// What an input row holds.
    #[serde(default)]
    pub inputs: SupportInputs,
}

/// What a support input row holds, and so how the task encoder sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SupportInputs {
    /// Numbers the encoder reads as they are (pixels, coordinates).
    #[default]
    Values,
    /// A word: its UTF-8 bytes (0–255), then the end token 256 to the end of
    /// the row. The encoder reads each word as its bag of bytes (256 byte
    /// shares and its length over the row's), not as magnitudes.
    ByteTokens,
}

/// The full schema.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FeatureSchema {
    /// Features in the order the featurizer writes them.
    pub features: Vec<FeatureSpec>,
    /// Length of the embedding (0 = none).
    #[serde(default)]
    pub embedding_dim: usize,
    /// The support set, if the denoiser takes one.
    #[serde(default)]
    pub support: Option<SupportSpec>,
}

impl FeatureSchema {
    /// Total number of feature values (the width of the feature vector).
    pub fn feature_width(&self) -> usize {
        self.features.iter().map(|f| f.length).sum()
    }
}
