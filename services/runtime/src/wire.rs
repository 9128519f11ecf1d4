//! Wire tensors <-> `tch::Tensor`. Validation happens in `sd_proto::tensor` first; this module
//! only converts tensors whose bytes already match their shape and dtype.

use sd_proto::{
    stage::{DataType, Tensor as WireTensor},
    tensor::TensorError,
};
use tch::{Device, Kind, Tensor};

// The wire format is little-endian and tensors are copied byte for byte.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "wire tensors assume a little-endian host"
);

/// The tch kind of a wire dtype.
pub fn kind(dtype: DataType) -> Option<Kind> {
    match dtype {
        DataType::Float32 => Some(Kind::Float),
        DataType::Float16 => Some(Kind::Half),
        DataType::Bfloat16 => Some(Kind::BFloat16),
        DataType::Int64 => Some(Kind::Int64),
        DataType::Uint8 => Some(Kind::Uint8),
        DataType::Unspecified => None,
    }
}

/// The wire dtype of a tch kind, if the wire carries it.
pub fn data_type(kind: Kind) -> Option<DataType> {
    match kind {
        Kind::Float => Some(DataType::Float32),
        Kind::Half => Some(DataType::Float16),
        Kind::BFloat16 => Some(DataType::Bfloat16),
        Kind::Int64 => Some(DataType::Int64),
        Kind::Uint8 => Some(DataType::Uint8),
        _ => None,
    }
}

/// Validates `t` (see [`WireTensor::validate`]) and copies it into a CPU `tch::Tensor`.
pub fn to_tch(t: &WireTensor, field: &str) -> Result<Tensor, TensorError> {
    let dtype = t.validate(field)?;
    let kind = kind(dtype).expect("validate admits only known dtypes");
    Tensor::f_from_data_size(&t.data, &t.shape, kind).map_err(|e| TensorError::Missing {
        field: format!("{field} ({e})"),
    })
}

/// Copies a tensor (any device) into a wire tensor.
pub fn from_tch(t: &Tensor) -> Result<WireTensor, tch::TchError> {
    let dtype = data_type(t.kind())
        .ok_or_else(|| tch::TchError::Kind(format!("no wire dtype for {:?}", t.kind())))?;
    let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)?;
    Ok(WireTensor {
        dtype: dtype as i32,
        shape: t.size(),
        data: data.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_wire_dtype() {
        for kind in [
            Kind::Float,
            Kind::Half,
            Kind::BFloat16,
            Kind::Int64,
            Kind::Uint8,
        ] {
            let t = Tensor::arange(24, (Kind::Float, Device::Cpu))
                .reshape([2, 3, 4])
                .to_kind(kind);
            let wire = from_tch(&t).unwrap();
            assert_eq!(wire.shape, vec![2, 3, 4]);
            let back = to_tch(&wire, "x").unwrap();
            assert_eq!(back.kind(), kind);
            assert!(back.equal(&t), "{kind:?}");
        }
    }

    #[test]
    fn bad_bytes_are_an_error_not_a_panic() {
        let mut wire = from_tch(&Tensor::zeros([2, 2], (Kind::Float, Device::Cpu))).unwrap();
        wire.data = wire.data.slice(0..15);
        assert!(matches!(
            to_tch(&wire, "sample"),
            Err(TensorError::ByteLength { .. })
        ));
    }
}
