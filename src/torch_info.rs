//! What libtorch this build runs on, and whether it sees a GPU.

use tch::{Cuda, Device, Kind, Tensor};

/// libtorch version this crate was built against (read from the torch
/// install by build.rs), e.g. "2.11.0+cu130".
pub const TORCH_VERSION: &str = env!("WEIGHTGEN_TORCH_VERSION");

/// Facts about the libtorch runtime, read at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchInfo {
    /// Version of the libtorch the binary was built against.
    pub version: &'static str,
    /// Whether libtorch sees a usable CUDA device.
    pub cuda_available: bool,
    /// Number of CUDA devices libtorch sees.
    pub cuda_device_count: usize,
    /// Whether cuDNN is usable.
    pub cudnn_available: bool,
}

impl TorchInfo {
    /// Asks libtorch (this initializes CUDA when present, which can take a
    /// second or two).
    pub fn detect() -> Self {
        let cuda_device_count = usize::try_from(Cuda::device_count()).unwrap_or(0);
        Self {
            version: TORCH_VERSION,
            cuda_available: Cuda::is_available(),
            cuda_device_count,
            cudnn_available: Cuda::cudnn_is_available(),
        }
    }

    /// One line per fact, as printed by the binaries' `--version`.
    pub fn report(&self, binary: &str) -> String {
        let cuda = if self.cuda_available {
            format!(
                "available ({} device{}, cuDNN {})",
                self.cuda_device_count,
                if self.cuda_device_count == 1 { "" } else { "s" },
                if self.cudnn_available { "yes" } else { "no" }
            )
        } else {
            "not available".to_owned()
        };
        format!(
            "{binary} {}\ntorch {} (tch 0.24.0)\ncuda: {cuda}\n",
            env!("CARGO_PKG_VERSION"),
            self.version
        )
    }
}

/// Runs a small matrix product on `device` and checks the result against the
/// closed form, proving that libtorch (and its CUDA kernels, for a GPU) work.
/// Returns the computed value.
pub fn smoke_test(device: Device) -> Result<f64, String> {
    // ones(n, n) @ arange(n) has every entry equal to n(n-1)/2.
    let n: i64 = 64;
    let ones = Tensor::ones([n, n], (Kind::Float, device));
    let ramp = Tensor::arange(n, (Kind::Float, device));
    let product = ones.f_matmul(&ramp).map_err(|e| e.to_string())?;
    let first = product
        .f_double_value(&[0])
        .map_err(|e| format!("reading result from {device:?}: {e}"))?;
    let expected = (n * (n - 1) / 2) as f64;
    if (first - expected).abs() > 1e-3 {
        return Err(format!(
            "matmul on {device:?} gave {first}, expected {expected}"
        ));
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_pinned_torch_version() {
        let info = TorchInfo::detect();
        assert!(info.version.starts_with("2.11.0"), "{}", info.version);
        let report = info.report("weightgen-test");
        assert!(report.contains("torch 2.11.0"), "{report}");
        assert!(report.contains("cuda: "), "{report}");
        assert_eq!(info.cuda_available, info.cuda_device_count > 0);
    }

    #[test]
    fn smoke_test_computes_on_cpu() {
        assert_eq!(smoke_test(Device::Cpu), Ok(2016.0));
    }
}
