//! Parsing of the `--device` and `--dtype` choices shared by every stage.

use std::{fmt, str::FromStr};
use tch::{Device, Kind};

/// Where a stage computes: `cpu`, `cuda` (device 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSpec(pub Device);

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self(Device::Cpu)),
            "cuda" => Ok(Self(Device::Cuda(0))),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(|n| Self(Device::Cuda(n)))
                .ok_or_else(|| format!("unknown device {s:?}: expected cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            other => write!(f, "{other:?}"),
        }
    }
}

impl DeviceSpec {
    /// Checks that the device exists on this machine, so a stage fails at start-up rather
    /// than on its first request.
    pub fn check_available(self) -> Result<(), String> {
        match self.0 {
            Device::Cuda(n) => {
                let count = tch::Cuda::device_count();
                if (n as i64) < count {
                    Ok(())
                } else {
                    Err(format!(
                        "device cuda:{n} requested but libtorch sees {count} CUDA device(s)"
                    ))
                }
            }
            _ => Ok(()),
        }
    }
}

/// Element type a stage computes in: `f32` (the default, and the only choice on CPU, where
/// half-precision kernels are slow or missing), `f16` or `bf16` on CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DTypeSpec(pub Kind);

impl FromStr for DTypeSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self(Kind::Float)),
            "f16" | "fp16" | "float16" => Ok(Self(Kind::Half)),
            "bf16" | "bfloat16" => Ok(Self(Kind::BFloat16)),
            _ => Err(format!("unknown dtype {s:?}: expected f32, f16 or bf16")),
        }
    }
}

impl fmt::Display for DTypeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Kind::Half => "f16",
            Kind::BFloat16 => "bf16",
            _ => "f32",
        })
    }
}

impl DTypeSpec {
    /// Refuses half precision on CPU.
    pub fn check_device(self, device: DeviceSpec) -> Result<(), String> {
        if self.0 != Kind::Float && device.0 == Device::Cpu {
            return Err(format!("dtype {self} needs a CUDA device; use f32 on cpu"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_dtypes() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec(Device::Cpu)));
        assert_eq!(
            "cuda".parse::<DeviceSpec>(),
            Ok(DeviceSpec(Device::Cuda(0)))
        );
        assert_eq!(
            "cuda:3".parse::<DeviceSpec>(),
            Ok(DeviceSpec(Device::Cuda(3)))
        );
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().contains("tpu"));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert_eq!("bf16".parse::<DTypeSpec>(), Ok(DTypeSpec(Kind::BFloat16)));
        assert!(
            "f16"
                .parse::<DTypeSpec>()
                .unwrap()
                .check_device(DeviceSpec(Device::Cpu))
                .is_err()
        );
        assert!("f8".parse::<DTypeSpec>().is_err());
    }
}
