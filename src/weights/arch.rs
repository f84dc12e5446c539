//! `ArchSpec`: the ordered list of named tensors (PyTorch `state_dict` names,
//! shapes, dtype) of an architecture, with its layer grouping.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Element type of stored weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit IEEE float.
    #[default]
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// The tch kind.
    pub fn kind(self) -> tch::Kind {
        match self {
            Self::F32 => tch::Kind::Float,
            Self::F16 => tch::Kind::Half,
            Self::BF16 => tch::Kind::BFloat16,
        }
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// One named tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// `state_dict` key, e.g. "layers.0.weight".
    pub name: String,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Stored element type.
    #[serde(default)]
    pub dtype: DType,
}

impl TensorSpec {
    /// A tensor spec.
    pub fn new(name: impl Into<String>, shape: &[usize], dtype: DType) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The shape as tch wants it.
    pub fn shape_i64(&self) -> Vec<i64> {
        self.shape.iter().map(|&d| d as i64).collect()
    }
}

/// Tensors that form one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerGroup {
    /// Layer name, e.g. "layers.0".
    pub name: String,
    /// Layer type, e.g. "linear", "conv2d", "norm"; the layer-factorized
    /// denoiser shares encoder weights between layers of one type.
    pub kind: String,
    /// Member tensor names, in order.
    pub tensors: Vec<String>,
}

/// Why a layout is invalid or a checkpoint does not match it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The spec itself is inconsistent.
    #[error("invalid architecture {name:?}: {reason}")]
    InvalidSpec {
        /// Architecture name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint's tensors differ from the spec.
    #[error("checkpoint does not match architecture {arch:?}: {}", differences.join("; "))]
    Mismatch {
        /// Architecture name.
        arch: String,
        /// One line per difference (missing, unexpected, wrong shape).
        differences: Vec<String>,
    },
    /// A flat vector has the wrong length.
    #[error("flat weights of architecture {arch:?} must have {expected} elements, got {got}")]
    Length {
        /// Architecture name.
        arch: String,
        /// D, the parameters the architecture has.
        expected: usize,
        /// Length given.
        got: usize,
    },
}

/// An architecture: ordered named tensors plus layer grouping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchSpec {
    /// Unique name, e.g. "digits-mlp-64-32-5".
    pub name: String,
    /// Task family, or empty.
    #[serde(default)]
    pub family: String,
    /// Tensors in flattening order.
    pub tensors: Vec<TensorSpec>,
    /// Layer grouping; every tensor belongs to exactly one layer.
    pub layers: Vec<LayerGroup>,
}

impl ArchSpec {
    /// Builds and validates a spec.
    pub fn new(
        name: impl Into<String>,
        family: impl Into<String>,
        tensors: Vec<TensorSpec>,
        layers: Vec<LayerGroup>,
    ) -> Result<Self, LayoutError> {
        let spec = Self {
            name: name.into(),
            family: family.into(),
            tensors,
            layers,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks names are unique, shapes non-empty in elements, and that the
    /// layers cover every tensor exactly once.
    pub fn validate(&self) -> Result<(), LayoutError> {
        let invalid = |reason: String| LayoutError::InvalidSpec {
            name: self.name.clone(),
            reason,
        };
        if self.tensors.is_empty() {
            return Err(invalid("no tensors".into()));
        }
        let mut names = HashSet::new();
        for t in &self.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(invalid(format!("tensor {:?} appears twice", t.name)));
            }
            if t.numel() == 0 {
                return Err(invalid(format!("tensor {:?} has no elements", t.name)));
            }
        }
        let mut covered = HashSet::new();
        for layer in &self.layers {
            for t in &layer.tensors {
                if !names.contains(t.as_str()) {
                    return Err(invalid(format!(
                        "layer {:?} names unknown tensor {t:?}",
                        layer.name
                    )));
                }
                if !covered.insert(t.as_str()) {
                    return Err(invalid(format!("tensor {t:?} is in two layers")));
                }
            }
        }
        if let Some(t) = self
            .tensors
            .iter()
            .find(|t| !covered.contains(t.name.as_str()))
        {
            return Err(invalid(format!("tensor {:?} is in no layer", t.name)));
        }
        Ok(())
    }

    /// A plain MLP as PyTorch's `nn.Sequential(Linear, act, Linear, ...)`
    /// names it ("0.weight", "0.bias", "2.weight", ...): `sizes` are the
    /// layer widths from input to output.
    pub fn sequential_mlp(
        name: impl Into<String>,
        family: impl Into<String>,
        sizes: &[usize],
    ) -> Result<Self, LayoutError> {
        let mut tensors = Vec::new();
        let mut layers = Vec::new();
        for (i, pair) in sizes.windows(2).enumerate() {
            let prefix = (2 * i).to_string();
            let weight = format!("{prefix}.weight");
            let bias = format!("{prefix}.bias");
            tensors.push(TensorSpec::new(&weight, &[pair[1], pair[0]], DType::F32));
            tensors.push(TensorSpec::new(&bias, &[pair[1]], DType::F32));
            layers.push(LayerGroup {
                name: prefix,
                kind: "linear".into(),
                tensors: vec![weight, bias],
            });
        }
        Self::new(name, family, tensors, layers)
    }

    /// Builds a spec from named shapes in order (e.g. a safetensors header
    /// sorted by data offset). Tensors are grouped into layers by the name
    /// without its last component ("enc.0.weight" → "enc.0"); the kind comes
    /// from the weight's rank: 2 → "linear", 4 → "conv2d", 3 → "conv1d",
    /// otherwise "norm" (1-D only) or "other".
    pub fn infer(
        name: impl Into<String>,
        family: impl Into<String>,
        tensors: Vec<TensorSpec>,
    ) -> Result<Self, LayoutError> {
        let mut order: Vec<String> = Vec::new();
        let mut members: HashMap<String, Vec<&TensorSpec>> = HashMap::new();
        for t in &tensors {
            let layer = t
                .name
                .rsplit_once('.')
                .map_or(t.name.as_str(), |(l, _)| l)
                .to_owned();
            if !members.contains_key(&layer) {
                order.push(layer.clone());
            }
            members.entry(layer).or_default().push(t);
        }
        let layers = order
            .into_iter()
            .map(|layer| {
                let ts = &members[&layer];
                let max_rank = ts.iter().map(|t| t.shape.len()).max().unwrap_or(0);
                let kind = match max_rank {
                    2 => "linear",
                    3 => "conv1d",
                    4 => "conv2d",
                    1 => "norm",
                    _ => "other",
                };
                LayerGroup {
                    tensors: ts.iter().map(|t| t.name.clone()).collect(),
                    name: layer,
                    kind: kind.to_owned(),
                }
            })
            .collect();
        Self::new(name, family, tensors, layers)
    }

    /// D, the total number of parameters.
    pub fn num_parameters(&self) -> usize {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }

    /// Each tensor's range in the flat vector, in order.
    pub fn offsets(&self) -> Vec<Range<usize>> {
        let mut start = 0;
        self.tensors
            .iter()
            .map(|t| {
                let range = start..start + t.numel();
                start = range.end;
                range
            })
            .collect()
    }

    /// Each layer's ranges in the flat vector (a layer's tensors need not be
    /// adjacent).
    pub fn layer_ranges(&self) -> Vec<(LayerGroup, Vec<Range<usize>>)> {
        let offsets: HashMap<&str, Range<usize>> = self
            .tensors
            .iter()
            .zip(self.offsets())
            .map(|(t, r)| (t.name.as_str(), r))
            .collect();
        self.layers
            .iter()
            .map(|l| {
                let ranges = l
                    .tensors
                    .iter()
                    .map(|t| offsets[t.as_str()].clone())
                    .collect();
                (l.clone(), ranges)
            })
            .collect()
    }

    /// Compares named shapes with the spec and lists every difference.
    pub fn check<'a>(
        &self,
        found: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ) -> Result<(), LayoutError> {
        let found: BTreeMap<&str, &[usize]> = found.into_iter().collect();
        let mut differences = Vec::new();
        for t in &self.tensors {
            match found.get(t.name.as_str()) {
                None => differences.push(format!("missing tensor {:?} {:?}", t.name, t.shape)),
                Some(shape) if *shape != t.shape.as_slice() => differences.push(format!(
                    "tensor {:?} has shape {:?}, expected {:?}",
                    t.name, shape, t.shape
                )),
                Some(_) => {}
            }
        }
        let expected: HashSet<&str> = self.tensors.iter().map(|t| t.name.as_str()).collect();
        for (name, shape) in &found {
            if !expected.contains(name) {
                differences.push(format!("unexpected tensor {name:?} {shape:?}"));
            }
        }
        if differences.is_empty() {
            Ok(())
        } else {
            Err(LayoutError::Mismatch {
                arch: self.name.clone(),
                differences,
            })
        }
    }

    /// The spec as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("ArchSpec serializes")
    }

    /// Reads and validates a spec from JSON.
    pub fn from_json(text: &str) -> Result<Self, LayoutError> {
        let spec: Self = serde_json::from_str(text).map_err(|e| LayoutError::InvalidSpec {
            name: "<json>".into(),
            reason: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mlp() -> ArchSpec {
        ArchSpec::sequential_mlp("mlp", "digits", &[64, 32, 5]).unwrap()
    }

    #[test]
    fn sequential_mlp_names_and_counts_like_pytorch() {
        let spec = mlp();
        let names: Vec<&str> = spec.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["0.weight", "0.bias", "2.weight", "2.bias"]);
        assert_eq!(spec.num_parameters(), 64 * 32 + 32 + 32 * 5 + 5);
        assert_eq!(spec.offsets()[2], 2080..2240);
        assert_eq!(spec.layers[1].kind, "linear");
    }

    #[test]
    fn check_lists_every_difference() {
        let spec = mlp();
        let err = spec
            .check([
                ("0.weight", &[32usize, 64][..]),
                ("0.bias", &[31][..]),
                ("2.weight", &[5, 32][..]),
                ("extra", &[1][..]),
            ])
            .unwrap_err();
        let LayoutError::Mismatch { differences, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(differences.len(), 3, "{differences:?}");
        let text = err.to_string();
        assert!(
            text.contains("\"0.bias\" has shape [31], expected [32]"),
            "{text}"
        );
        assert!(text.contains("missing tensor \"2.bias\""), "{text}");
        assert!(text.contains("unexpected tensor \"extra\""), "{text}");
    }

    #[test]
    fn infer_groups_by_prefix_and_json_round_trips() {
        let spec = ArchSpec::infer(
            "cnn",
            "",
            vec![
                TensorSpec::new("conv.weight", &[8, 1, 3, 3], DType::F32),
                TensorSpec::new("conv.bias", &[8], DType::F32),
                TensorSpec::new("norm.weight", &[8], DType::F32),
                TensorSpec::new("fc.weight", &[5, 8], DType::F32),
            ],
        )
        .unwrap();
        let kinds: Vec<&str> = spec.layers.iter().map(|l| l.kind.as_str()).collect();
        assert_eq!(kinds, ["conv2d", "norm", "linear"]);
        assert_eq!(ArchSpec::from_json(&spec.to_json()).unwrap(), spec);
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let t = TensorSpec::new("a", &[2], DType::F32);
        let err = ArchSpec::new("x", "", vec![t.clone(), t.clone()], vec![]).unwrap_err();
        assert!(err.to_string().contains("appears twice"));
        let err = ArchSpec::new("x", "", vec![t], vec![]).unwrap_err();
        assert!(err.to_string().contains("in no layer"));
    }
}
