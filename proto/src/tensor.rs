//! Wire tensors: validation and conversion to and from Rust vectors.
//!
//! The wire layout is the KServe/Triton raw-contents rule: row-major, contiguous,
//! little-endian. Everything a peer sends is checked here (dtype known, dimensions
//! non-negative, byte length equal to the product of the shape times the element size, rank
//! and named dimensions as the receiver expects) before libtorch is asked to touch it.

use crate::stage::{DataType, Tensor};
use half::{bf16, f16};

/// Largest number of elements a wire tensor may claim (2^31), far above any real latent or
/// context, so a hostile shape cannot make a receiver allocate without bound.
pub const MAX_ELEMENTS: u64 = 1 << 31;

/// Why a wire tensor was refused. `field` names the request field that carried it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TensorError {
    #[error("{field}: missing tensor")]
    Missing { field: String },
    #[error("{field}: unknown or unspecified dtype {dtype}")]
    UnknownDType { field: String, dtype: i32 },
    #[error("{field}: dtype {actual:?} not accepted here (expected one of {expected:?})")]
    WrongDType {
        field: String,
        actual: DataType,
        expected: Vec<DataType>,
    },
    #[error("{field}: negative dimension in shape {shape:?}")]
    NegativeDim { field: String, shape: Vec<i64> },
    #[error("{field}: shape {shape:?} has more than {MAX_ELEMENTS} elements")]
    TooLarge { field: String, shape: Vec<i64> },
    #[error("{field}: {actual} data bytes, but shape {shape:?} of {dtype:?} needs {expected}")]
    ByteLength {
        field: String,
        shape: Vec<i64>,
        dtype: DataType,
        actual: usize,
        expected: u64,
    },
    #[error("{field}: expected rank {expected} ({layout}), got shape {shape:?}")]
    Rank {
        field: String,
        expected: usize,
        layout: &'static str,
        shape: Vec<i64>,
    },
    #[error("{field}: dimension {dim} ({name}) is {actual}, expected {expected}")]
    Dim {
        field: String,
        dim: usize,
        name: &'static str,
        actual: i64,
        expected: i64,
    },
}

impl DataType {
    /// Bytes per element; `None` for `Unspecified`.
    pub fn size_bytes(self) -> Option<usize> {
        match self {
            DataType::Unspecified => None,
            DataType::Float32 => Some(4),
            DataType::Float16 | DataType::Bfloat16 => Some(2),
            DataType::Int64 => Some(8),
            DataType::Uint8 => Some(1),
        }
    }

    /// Whether this is one of the floating point types.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DataType::Float32 | DataType::Float16 | DataType::Bfloat16
        )
    }
}

impl Tensor {
    /// Builds a float32 tensor. Panics if `values.len()` does not match `shape`, which is a
    /// programming error on the sending side.
    pub fn from_f32(shape: &[i64], values: &[f32]) -> Tensor {
        assert_eq!(
            shape.iter().product::<i64>() as usize,
            values.len(),
            "shape {shape:?} does not match {} values",
            values.len()
        );
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Tensor {
            dtype: DataType::Float32 as i32,
            shape: shape.to_vec(),
            data: data.into(),
        }
    }

    /// Number of elements the shape describes (1 for a scalar).
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d.max(0) as u64).product()
    }

    /// Checks dtype, dimensions and byte length; returns the dtype. `field` names the request
    /// field in errors.
    pub fn validate(&self, field: &str) -> Result<DataType, TensorError> {
        let dtype = DataType::try_from(self.dtype)
            .ok()
            .filter(|d| *d != DataType::Unspecified)
            .ok_or_else(|| TensorError::UnknownDType {
                field: field.into(),
                dtype: self.dtype,
            })?;
        if self.shape.iter().any(|&d| d < 0) {
            return Err(TensorError::NegativeDim {
                field: field.into(),
                shape: self.shape.clone(),
            });
        }
        let numel = self
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| {
                acc.checked_mul(d as u64).filter(|n| *n <= MAX_ELEMENTS)
            })
            .ok_or_else(|| TensorError::TooLarge {
                field: field.into(),
                shape: self.shape.clone(),
            })?;
        let size = dtype.size_bytes().unwrap_or(0) as u64;
        let expected = numel * size;
        if self.data.len() as u64 != expected {
            return Err(TensorError::ByteLength {
                field: field.into(),
                shape: self.shape.clone(),
                dtype,
                actual: self.data.len(),
                expected,
            });
        }
        Ok(dtype)
    }

    /// [`validate`](Self::validate), then checks the rank and the dimensions given as
    /// `(name, Some(expected))`; `None` accepts any positive size. Zero-sized dimensions are
    /// refused: no stage has anything to do with an empty batch or image.
    pub fn validate_shape(
        &self,
        field: &str,
        layout: &'static str,
        dims: &[(&'static str, Option<i64>)],
    ) -> Result<DataType, TensorError> {
        let dtype = self.validate(field)?;
        if self.shape.len() != dims.len() {
            return Err(TensorError::Rank {
                field: field.into(),
                expected: dims.len(),
                layout,
                shape: self.shape.clone(),
            });
        }
        for (i, ((name, expected), &actual)) in dims.iter().zip(&self.shape).enumerate() {
            let ok = match expected {
                Some(e) => actual == *e,
                None => actual > 0,
            };
            if !ok {
                return Err(TensorError::Dim {
                    field: field.into(),
                    dim: i,
                    name,
                    actual,
                    expected: expected.unwrap_or(1),
                });
            }
        }
        Ok(dtype)
    }

    /// Refuses dtypes outside `allowed`. Call after [`validate`](Self::validate).
    pub fn require_dtype(
        &self,
        field: &str,
        allowed: &[DataType],
    ) -> Result<DataType, TensorError> {
        let dtype = self.validate(field)?;
        if allowed.contains(&dtype) {
            Ok(dtype)
        } else {
            Err(TensorError::WrongDType {
                field: field.into(),
                actual: dtype,
                expected: allowed.to_vec(),
            })
        }
    }

    /// Decodes a validated float tensor (f32, f16 or bf16) into f32 values.
    pub fn to_f32_vec(&self, field: &str) -> Result<Vec<f32>, TensorError> {
        let dtype = self.require_dtype(
            field,
            &[DataType::Float32, DataType::Float16, DataType::Bfloat16],
        )?;
        let d = &self.data;
        Ok(match dtype {
            DataType::Float32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DataType::Float16 => d
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DataType::Bfloat16 => d
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => unreachable!("require_dtype admitted only float types"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(dtype: DataType, shape: &[i64], bytes: usize) -> Tensor {
        Tensor {
            dtype: dtype as i32,
            shape: shape.to_vec(),
            data: vec![0u8; bytes].into(),
        }
    }

    #[test]
    fn f32_round_trip() {
        let v = [1.5f32, -2.0, 0.0, 3.25, f32::MIN_POSITIVE, 1e30];
        let tensor = Tensor::from_f32(&[2, 3], &v);
        assert_eq!(tensor.validate("x"), Ok(DataType::Float32));
        assert_eq!(tensor.to_f32_vec("x").unwrap(), v);
    }

    #[test]
    fn half_precision_decodes() {
        let vals = [0.5f32, -1.0, 65504.0];
        let mut data = Vec::new();
        for v in vals {
            data.extend_from_slice(&f16::from_f32(v).to_le_bytes());
        }
        let tensor = Tensor {
            dtype: DataType::Float16 as i32,
            shape: vec![3],
            data: data.into(),
        };
        assert_eq!(tensor.to_f32_vec("x").unwrap(), vals);
    }

    #[test]
    fn byte_length_mismatch_is_refused_with_field_name() {
        let err = t(DataType::Float32, &[1, 4, 8, 8], 255)
            .validate("sample")
            .unwrap_err();
        assert!(matches!(
            err,
            TensorError::ByteLength {
                expected: 1024,
                actual: 255,
                ..
            }
        ));
        assert!(err.to_string().starts_with("sample:"), "{err}");
    }

    #[test]
    fn unknown_dtype_negative_and_huge_shapes_are_refused() {
        let mut x = t(DataType::Float32, &[2], 8);
        x.dtype = 99;
        assert!(matches!(
            x.validate("x"),
            Err(TensorError::UnknownDType { dtype: 99, .. })
        ));
        x.dtype = 0;
        assert!(matches!(
            x.validate("x"),
            Err(TensorError::UnknownDType { dtype: 0, .. })
        ));
        assert!(matches!(
            t(DataType::Float32, &[-1, 2], 8).validate("x"),
            Err(TensorError::NegativeDim { .. })
        ));
        assert!(matches!(
            t(DataType::Float32, &[1 << 40, 1 << 40], 8).validate("x"),
            Err(TensorError::TooLarge { .. })
        ));
    }

    #[test]
    fn shape_checks_name_the_dimension() {
        let x = t(DataType::Float32, &[2, 3, 8, 8], 2 * 3 * 64 * 4);
        let dims = [
            ("batch", None),
            ("channels", Some(4)),
            ("height", None),
            ("width", None),
        ];
        let err = x
            .validate_shape("sample", "[B, C, H, W]", &dims)
            .unwrap_err();
        assert!(err.to_string().contains("channels"), "{err}");
        assert!(matches!(
            x.validate_shape("sample", "[B, C]", &dims[..2]),
            Err(TensorError::Rank { expected: 2, .. })
        ));
        let ok = [
            ("batch", None),
            ("channels", Some(3)),
            ("height", None),
            ("width", None),
        ];
        assert_eq!(
            x.validate_shape("sample", "[B, C, H, W]", &ok),
            Ok(DataType::Float32)
        );
        let empty = t(DataType::Float32, &[0, 3, 8, 8], 0);
        assert!(matches!(
            empty.validate_shape("sample", "[B, C, H, W]", &ok),
            Err(TensorError::Dim { name: "batch", .. })
        ));
    }

    #[test]
    fn dtype_allow_list() {
        let x = t(DataType::Int64, &[2], 16);
        assert!(matches!(
            x.to_f32_vec("timesteps"),
            Err(TensorError::WrongDType {
                actual: DataType::Int64,
                ..
            })
        ));
    }
}
