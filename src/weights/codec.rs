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

fn to_safetensors_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
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
    fn new(tensor: &Tensor, dtype: DType) -> Self {
        let host = tensor
            .to_device(Device::Cpu)
            .to_kind(dtype.kind())
            .contiguous();
        let numel = host.numel();
        let mut data = vec![0u8; numel * dtype.size()];
        host.copy_data_u8(&mut data, numel);
        Self {
            dtype: to_safetensors_dtype(dtype),
            shape: host.size().iter().map(|&d| d as usize).collect(),
            data,
        }
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

/// Encodes named tensors as one safetensors file, every tensor converted to
/// `dtype`, with `metadata` in the header. The bytes depend only on the
/// tensors' values, names and the metadata (deterministic).
pub fn encode_safetensors(
    tensors: &[(String, Tensor)],
    dtype: DType,
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>, CodecError> {
    let host: Vec<(String, HostTensor)> = tensors
        .iter()
        .map(|(name, t)| (name.clone(), HostTensor::new(t, dtype)))
        .collect();
    let metadata = (!metadata.is_empty()).then(|| metadata.clone());
    Ok(safetensors::tensor::serialize(
        host.iter().map(|(n, t)| (n.as_str(), t)),
        metadata,
    )?)
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
