//! safetensors encoding and decoding of named tensors in f32, f16 or bf16,
//! with string metadata in the header (`__metadata__`). Files written here
//! load with Python's `safetensors` library.

use std::borrow::Cow;
use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

use super::arch::{DType, TensorSpec};
use super::flat::NamedTensors;

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The safetensors library rejected the data.
    #[error("safetensors: {0}")]
    Format(#[from] safetensors::SafeTensorError),
    /// A tensor has an element type weightgen does not handle.
    #[error("tensor {name:?} has unsupported dtype {dtype}; expected F32, F16 or BF16")]
    UnsupportedDtype {
        /// Tensor name.
        name: String,
        /// Its dtype.
        dtype: String,
    },
}

/// The safetensors dtype of a tch kind weightgen stores (f32, f64, f16, bf16).
fn stored_dtype(kind: Kind) -> Option<(Dtype, usize)> {
    match kind {
        Kind::Float => Some((Dtype::F32, 4)),
        Kind::Double => Some((Dtype::F64, 8)),
        Kind::Half => Some((Dtype::F16, 2)),
        Kind::BFloat16 => Some((Dtype::BF16, 2)),
        _ => None,
    }
}

/// The tch kind of a safetensors dtype weightgen reads.
fn read_kind(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::F64 => Some(Kind::Double),
        Dtype::F16 => Some(Kind::Half),
        Dtype::BF16 => Some(Kind::BFloat16),
        _ => None,
    }
}

fn from_safetensors_dtype(name: &str, dtype: Dtype) -> Result<DType, CodecError> {
    match dtype {
        Dtype::F32 => Ok(DType::F32),
        Dtype::F16 => Ok(DType::F16),
        Dtype::BF16 => Ok(DType::BF16),
        other => Err(CodecError::UnsupportedDtype {
            name: name.to_owned(),
            dtype: format!("{other:?}"),
        }),
    }
}

/// A tensor's bytes on the host, ready to be written.
struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl HostTensor {
    /// Copies a tensor to the host in its own kind (f32, f64, f16 or bf16).
    fn new(name: &str, tensor: &Tensor) -> Result<Self, CodecError> {
        let (dtype, size) =
            stored_dtype(tensor.kind()).ok_or_else(|| CodecError::UnsupportedDtype {
                name: name.to_owned(),
                dtype: format!("{:?}", tensor.kind()),
            })?;
        let host = tensor.to_device(Device::Cpu).contiguous();
        let numel = host.numel();
        let mut data = vec![0u8; numel * size];
        host.copy_data_u8(&mut data, numel);
        Ok(Self {
            dtype,
            shape: host.size().iter().map(|&d| d as usize).collect(),
            data,
        })
    }
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The header entry Hugging Face's loaders look for in a PyTorch file
/// (`__metadata__.format = "pt"`); every model file weightgen hands out
/// carries it (zoo models, adapters, their base, generated samples).
pub const TORCH_FORMAT: (&str, &str) = ("format", "pt");

/// Encodes named tensors as one safetensors file, every tensor converted to
/// `dtype`, with `metadata` in the header. The bytes depend only on the
/// tensors' values, names and the metadata (deterministic).
pub fn encode_safetensors(
    tensors: &[(String, Tensor)],
    dtype: DType,
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>, CodecError> {
    let converted: NamedTensors = tensors
        .iter()
        .map(|(name, t)| (name.clone(), t.to_kind(dtype.kind())))
        .collect();
    encode_tensors(&converted, metadata)
}

/// Encodes named tensors in their own kinds (f32, f64, f16, bf16), e.g. a
/// denoiser checkpoint whose statistics are f64.
pub fn encode_tensors(
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>, CodecError> {
    let host = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), HostTensor::new(name, t)?)))
        .collect::<Result<Vec<(String, HostTensor)>, CodecError>>()?;
    let metadata = (!metadata.is_empty()).then(|| metadata.clone());
    let bytes =
        safetensors::tensor::serialize(host.iter().map(|(n, t)| (n.as_str(), t)), metadata)?;
    Ok(canonical_header(bytes))
}

/// Rewrites the JSON header with its keys (and the metadata's) in sorted
/// order. The safetensors crate writes the metadata map in hash order, which
/// would make the same tensors encode to different bytes; data offsets are
/// relative to the end of the header, so only the header changes. The
/// header keeps its length (same content, other order; space padding).
fn canonical_header(mut bytes: Vec<u8>) -> Vec<u8> {
    const N_LEN: usize = 8;
    let Some(len_bytes) = bytes.get(..N_LEN) else {
        return bytes;
    };
    let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
    let Some(header) = bytes.get(N_LEN..N_LEN + len) else {
        return bytes;
    };
    let Ok(parsed) =
        serde_json::from_slice::<std::collections::BTreeMap<String, serde_json::Value>>(header)
    else {
        return bytes;
    };
    let sorted: std::collections::BTreeMap<String, serde_json::Value> = parsed
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::Object(map) => {
                let inner: std::collections::BTreeMap<String, serde_json::Value> =
                    map.into_iter().collect();
                (k, serde_json::to_value(inner).expect("JSON map"))
            }
            other => (k, other),
        })
        .collect();
    let mut text = serde_json::to_vec(&sorted).expect("JSON header");
    if text.len() > len {
        return bytes;
    }
    text.resize(len, b' ');
    bytes[N_LEN..N_LEN + len].copy_from_slice(&text);
    bytes
}

/// A decoded safetensors file.
#[derive(Debug)]
pub struct Decoded {
    /// Tensors in file (data offset) order, in their stored dtype, on the CPU.
    pub tensors: NamedTensors,
    /// Names, shapes and dtypes in file order.
    pub specs: Vec<TensorSpec>,
    /// The `__metadata__` header entries.
    pub metadata: HashMap<String, String>,
}

/// Decodes a safetensors file of f32/f16/bf16 tensors.
pub fn decode_safetensors(bytes: &[u8]) -> Result<Decoded, CodecError> {
    let (_, header) = SafeTensors::read_metadata(bytes)?;
    let file = SafeTensors::deserialize(bytes)?;
    let mut tensors = Vec::new();
    let mut specs = Vec::new();
    for name in header.offset_keys() {
        let view = file.tensor(&name)?;
        let dtype = from_safetensors_dtype(&name, view.dtype())?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let kind: Kind = dtype.kind();
        tensors.push((
            name.clone(),
            Tensor::from_data_size(view.data(), &shape, kind),
        ));
        specs.push(TensorSpec::new(name, view.shape(), dtype));
    }
    Ok(Decoded {
        tensors,
        specs,
        metadata: header.metadata().clone().unwrap_or_default(),
    })
}

/// Tensors by name.
pub type TensorMap = HashMap<String, Tensor>;

/// Decodes any file of f32/f64/f16/bf16 tensors into name → tensor (CPU,
/// stored kind) plus the header metadata.
pub fn decode_tensors(bytes: &[u8]) -> Result<(TensorMap, HashMap<String, String>), CodecError> {
    let (_, header) = SafeTensors::read_metadata(bytes)?;
    let file = SafeTensors::deserialize(bytes)?;
    let mut tensors = HashMap::new();
    for (name, view) in file.iter() {
        let kind = read_kind(view.dtype()).ok_or_else(|| CodecError::UnsupportedDtype {
            name: name.to_owned(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        tensors.insert(
            name.to_owned(),
            Tensor::from_data_size(view.data(), &shape, kind),
        );
    }
    Ok((tensors, header.metadata().clone().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NamedTensors {
        vec![
            (
                "b.weight".into(),
                Tensor::from_slice(&[1.5f32, -2.25, 3.0e-3, 7.0]).reshape([2, 2]),
            ),
            ("a.bias".into(), Tensor::from_slice(&[0.1f32, 1.0e6])),
        ]
    }

    #[test]
    fn f32_round_trip_is_bit_exact_with_metadata() {
        let metadata = HashMap::from([("config".to_owned(), "{\"t\":1000}".to_owned())]);
        let bytes = encode_safetensors(&sample(), DType::F32, &metadata).unwrap();
        let decoded = decode_safetensors(&bytes).unwrap();
        assert_eq!(decoded.metadata, metadata);
        for (name, original) in sample() {
            let (_, t) = decoded.tensors.iter().find(|(n, _)| *n == name).unwrap();
            assert!(t.equal(&original), "{name}");
        }
        // Same input, same bytes.
        assert_eq!(
            bytes,
            encode_safetensors(&sample(), DType::F32, &metadata).unwrap()
        );
    }

    #[test]
    fn half_precision_round_trips_through_its_own_dtype() {
        for dtype in [DType::F16, DType::BF16] {
            let bytes = encode_safetensors(&sample(), dtype, &HashMap::new()).unwrap();
            let decoded = decode_safetensors(&bytes).unwrap();
            assert!(decoded.specs.iter().all(|s| s.dtype == dtype));
            let again = encode_safetensors(&decoded.tensors, dtype, &HashMap::new()).unwrap();
            assert_eq!(bytes, again, "{dtype:?} re-encodes to the same bytes");
            let (_, w) = decoded
                .tensors
                .iter()
                .find(|(n, _)| n == "b.weight")
                .unwrap();
            assert_eq!(w.to_kind(Kind::Float).double_value(&[0, 0]), 1.5);
        }
    }

    #[test]
    fn bytes_do_not_depend_on_metadata_order() {
        let metadata: HashMap<String, String> = (0..20)
            .map(|i| (format!("key{i}"), format!("v{i}")))
            .collect();
        let first = encode_safetensors(&sample(), DType::F32, &metadata).unwrap();
        for _ in 0..5 {
            // A new HashMap has another hash seed, so another iteration order.
            let again: HashMap<String, String> = metadata.clone().into_iter().collect();
            assert_eq!(
                encode_safetensors(&sample(), DType::F32, &again).unwrap(),
                first
            );
        }
        assert_eq!(decode_safetensors(&first).unwrap().metadata, metadata);
    }

    #[test]
    fn rejects_garbage_and_foreign_dtypes() {
        assert!(decode_safetensors(b"not a safetensors file").is_err());
        let ints = [("i".to_owned(), Tensor::from_slice(&[1i64, 2]))];
        let host = HostTensor {
            dtype: Dtype::I64,
            shape: vec![2],
            data: {
                let mut d = vec![0u8; 16];
                ints[0].1.copy_data_u8(&mut d, 2);
                d
            },
        };
        let bytes = safetensors::tensor::serialize([("i", &host)], None).unwrap();
        let err = decode_safetensors(&bytes).unwrap_err();
        assert!(err.to_string().contains("unsupported dtype"), "{err}");
    }
}
