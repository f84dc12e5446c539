//! The `--device auto|cpu|cuda:N` choice and its resolution to a tch device.

use std::fmt;
use std::str::FromStr;

use tch::Device;

/// Gives the calling thread libtorch's intra-op thread count. The count is
/// set for the process by `tch::set_num_threads`, but OpenMP and MKL keep
/// theirs per thread: a thread started later (a runtime's blocking thread,
/// a batch part's) would otherwise spread every matrix product over all
/// cores, which for small matrices costs more than it gains.
pub fn adopt_intra_op_threads() {
    tch::set_num_threads(tch::get_num_threads());
}

/// Where denoisers run, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first CUDA device when libtorch sees one, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

/// Why a device choice cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// The text is not `auto`, `cpu`, `cuda` or `cuda:N`.
    #[error("invalid device {0:?}: expected auto, cpu, cuda or cuda:N")]
    Invalid(String),
    /// CUDA was asked for but libtorch sees fewer devices.
    #[error("device cuda:{requested} is not available: libtorch sees {available} CUDA device(s)")]
    Unavailable {
        /// The index asked for.
        requested: usize,
        /// How many CUDA devices libtorch sees.
        available: usize,
    },
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Invalid(s.to_owned())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Resolves the choice given how many CUDA devices libtorch sees.
    pub fn resolve_with(self, cuda_devices: usize) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto if cuda_devices > 0 => Ok(Device::Cuda(0)),
            Self::Auto => Ok(Device::Cpu),
            Self::Cuda(n) if n < cuda_devices => Ok(Device::Cuda(n)),
            Self::Cuda(requested) => Err(DeviceError::Unavailable {
                requested,
                available: cuda_devices,
            }),
        }
    }

    /// Resolves the choice against the devices libtorch sees now.
    pub fn resolve(self) -> Result<Device, DeviceError> {
        let count = if tch::Cuda::is_available() {
            usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
        } else {
            0
        };
        self.resolve_with(count)
    }
}

/// The name a device is reported by ("cpu", "cuda:0").
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        Device::Mps => "mps".to_owned(),
        Device::Vulkan => "vulkan".to_owned(),
        Device::Cpu => "cpu".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("CPU".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert_eq!(
            "gpu".parse::<DeviceChoice>(),
            Err(DeviceError::Invalid("gpu".into()))
        );
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn resolves_against_the_visible_devices() {
        assert_eq!(DeviceChoice::Auto.resolve_with(0), Ok(Device::Cpu));
        assert_eq!(DeviceChoice::Auto.resolve_with(2), Ok(Device::Cuda(0)));
        assert_eq!(DeviceChoice::Cpu.resolve_with(2), Ok(Device::Cpu));
        assert_eq!(DeviceChoice::Cuda(1).resolve_with(2), Ok(Device::Cuda(1)));
        assert_eq!(
            DeviceChoice::Cuda(1).resolve_with(1),
            Err(DeviceError::Unavailable {
                requested: 1,
                available: 1
            })
        );
        assert_eq!(device_name(Device::Cuda(1)), "cuda:1");
    }
}
