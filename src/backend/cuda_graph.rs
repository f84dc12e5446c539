//! CUDA graphs for the denoiser pass. On a GPU a step of a small denoiser
//! is a few dozen tiny kernels, and launching them costs more than running
//! them: a DDIM-50 request took ≈ 0.2 s on an H200 whatever its batch size.
//! [`PassGraphs`] records the pass once per batch-size bucket with
//! libtorch's `at::cuda::CUDAGraph` (through `cuda_graph.cpp`, a C shim
//! that build.rs compiles where the linked libtorch has CUDA) and then
//! replays it: one launch per pass, on input tensors at fixed addresses.
//!
//! A capture that fails (an op that waits for the device or copies from
//! the host inside the pass, a libtorch without the shim) turns graphs off
//! for that denoiser with one warning: the pass runs eagerly as before.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::panic::{AssertUnwindSafe, catch_unwind};

use tch::{Device, Tensor};

use super::engine::ROW_QUANTUM;

/// Why a CUDA graph could not be made or run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GraphError {
    /// This build's libtorch has no CUDA (or its headers were missing).
    #[error("this build has no CUDA graph support (its libtorch has no CUDA headers)")]
    Unavailable,
    /// libtorch or the CUDA runtime refused a step of the capture or replay.
    #[error("CUDA graph {step}: {message}")]
    Cuda {
        /// The step that failed ("capture begin", "replay", …).
        step: &'static str,
        /// libtorch's message, without its backtrace.
        message: String,
    },
    /// The pass itself failed while being recorded.
    #[error("the pass failed while being recorded: {0}")]
    Pass(String),
}

/// Whether this build can capture CUDA graphs.
pub const fn available() -> bool {
    cfg!(weightgen_cuda_graphs)
}

/// libtorch's synchronization debugging (PyTorch's
/// `torch.cuda.set_sync_debug_mode`): every operation that makes the host
/// wait for the GPU warns (`Warn`) or fails (`Error`). For finding what
/// stalls a pass; a no-op without CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncDebug {
    /// Off.
    Off = 0,
    /// A warning at each synchronizing operation.
    Warn = 1,
    /// An error at each synchronizing operation.
    Error = 2,
}

/// Sets libtorch's synchronization debugging for the whole process.
pub fn set_sync_debug(level: SyncDebug) {
    #[cfg(weightgen_cuda_graphs)]
    // SAFETY: sets a plain global of libtorch's; any value 0..=2 is valid.
    unsafe {
        ffi::wg_cuda_sync_debug(level as i32)
    };
    #[cfg(not(weightgen_cuda_graphs))]
    let _ = level;
}

#[cfg(weightgen_cuda_graphs)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    unsafe extern "C" {
        pub fn wg_graph_new(error: *mut *mut c_char) -> *mut c_void;
        pub fn wg_graph_free(graph: *mut c_void);
        pub fn wg_graph_free_error(error: *mut c_char);
        pub fn wg_graph_side_stream(
            graph: *mut c_void,
            device: c_int,
            error: *mut *mut c_char,
        ) -> c_int;
        pub fn wg_graph_default_stream(graph: *mut c_void, error: *mut *mut c_char) -> c_int;
        pub fn wg_graph_capture_begin(graph: *mut c_void, error: *mut *mut c_char) -> c_int;
        pub fn wg_graph_capture_end(graph: *mut c_void, error: *mut *mut c_char) -> c_int;
        pub fn wg_graph_replay(graph: *mut c_void, error: *mut *mut c_char) -> c_int;
        pub fn wg_cuda_sync_debug(level: c_int);
    }
}

/// One `at::cuda::CUDAGraph`.
struct CudaGraph {
    #[cfg(weightgen_cuda_graphs)]
    raw: std::ptr::NonNull<std::ffi::c_void>,
}

// SAFETY: the graph is used by one thread at a time (the model thread owns
// it); libtorch's CUDAGraph has no thread affinity.
unsafe impl Send for CudaGraph {}

#[cfg(weightgen_cuda_graphs)]
impl CudaGraph {
    /// Runs one shim call, turning its error message into a [`GraphError`].
    fn call(
        step: &'static str,
        f: impl FnOnce(*mut *mut std::ffi::c_char) -> std::ffi::c_int,
    ) -> Result<(), GraphError> {
        let mut error: *mut std::ffi::c_char = std::ptr::null_mut();
        if f(&mut error) == 0 {
            return Ok(());
        }
        let message = if error.is_null() {
            "unknown error".to_owned()
        } else {
            // SAFETY: the shim returns a NUL-terminated string it allocated.
            let text = unsafe { std::ffi::CStr::from_ptr(error) }
                .to_string_lossy()
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            // SAFETY: freed once, by the shim that allocated it.
            unsafe { ffi::wg_graph_free_error(error) };
            text
        };
        Err(GraphError::Cuda { step, message })
    }

    fn new() -> Result<Self, GraphError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: the shim writes an error or returns a new graph.
        Self::call("creation", |error| {
            raw = unsafe { ffi::wg_graph_new(error) };
            i32::from(raw.is_null())
        })?;
        let raw = std::ptr::NonNull::new(raw).ok_or(GraphError::Cuda {
            step: "creation",
            message: "no graph".into(),
        })?;
        Ok(Self { raw })
    }

    fn side_stream(&mut self, device: usize) -> Result<(), GraphError> {
        let raw = self.raw.as_ptr();
        // SAFETY: `raw` is a live graph; the shim checks the device index.
        Self::call("side stream", |error| unsafe {
            ffi::wg_graph_side_stream(raw, device as i32, error)
        })
    }

    /// One shim call on this graph.
    fn on_graph(
        &mut self,
        step: &'static str,
        f: unsafe extern "C" fn(
            *mut std::ffi::c_void,
            *mut *mut std::ffi::c_char,
        ) -> std::ffi::c_int,
    ) -> Result<(), GraphError> {
        let raw = self.raw.as_ptr();
        // SAFETY: `raw` is a live graph; each shim function checks its state.
        Self::call(step, |error| unsafe { f(raw, error) })
    }

    fn default_stream(&mut self) -> Result<(), GraphError> {
        self.on_graph("stream restore", ffi::wg_graph_default_stream)
    }

    fn capture_begin(&mut self) -> Result<(), GraphError> {
        self.on_graph("capture begin", ffi::wg_graph_capture_begin)
    }

    fn capture_end(&mut self) -> Result<(), GraphError> {
        self.on_graph("capture end", ffi::wg_graph_capture_end)
    }

    fn replay(&mut self) -> Result<(), GraphError> {
        self.on_graph("replay", ffi::wg_graph_replay)
    }
}

#[cfg(not(weightgen_cuda_graphs))]
impl CudaGraph {
    fn new() -> Result<Self, GraphError> {
        Err(GraphError::Unavailable)
    }
    fn side_stream(&mut self, _device: usize) -> Result<(), GraphError> {
        Err(GraphError::Unavailable)
    }
    fn default_stream(&mut self) -> Result<(), GraphError> {
        Err(GraphError::Unavailable)
    }
    fn capture_begin(&mut self) -> Result<(), GraphError> {
        Err(GraphError::Unavailable)
    }
    fn capture_end(&mut self) -> Result<(), GraphError> {
        Err(GraphError::Unavailable)
    }
    fn replay(&mut self) -> Result<(), GraphError> {
        Err(GraphError::Unavailable)
    }
}

#[cfg(weightgen_cuda_graphs)]
impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: made by wg_graph_new, freed once.
        unsafe { ffi::wg_graph_free(self.raw.as_ptr()) }
    }
}

/// A recorded pass: its inputs and output live at fixed addresses.
struct Captured {
    graph: CudaGraph,
    inputs: Vec<Tensor>,
    output: Tensor,
}

/// The recorded passes of one loaded denoiser, one per bucket of rows.
pub struct PassGraphs {
    device: usize,
    buckets: HashMap<i64, Captured>,
    /// Why graphs were turned off for this denoiser, once they were.
    off: Option<GraphError>,
}

impl std::fmt::Debug for PassGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassGraphs")
            .field("device", &self.device)
            .field("buckets", &self.buckets.keys().collect::<Vec<_>>())
            .field("off", &self.off)
            .finish()
    }
}

impl PassGraphs {
    /// Graphs for a denoiser on `device`: None on the CPU, where a pass
    /// is not launch-bound.
    pub fn for_device(device: Device) -> Option<Self> {
        match device {
            Device::Cuda(index) => Some(Self {
                device: index,
                buckets: HashMap::new(),
                off: None,
            }),
            _ => None,
        }
    }

    /// The rows a pass of `rows` runs on: the next power of two, at least
    /// [`ROW_QUANTUM`], so a few graphs cover every batch size.
    pub fn bucket(rows: i64) -> i64 {
        (rows.max(ROW_QUANTUM) as u64).next_power_of_two() as i64
    }

    /// Why graphs are off for this denoiser, if they are.
    pub fn off(&self) -> Option<&GraphError> {
        self.off.as_ref()
    }

    /// Buckets recorded so far.
    pub fn recorded(&self) -> usize {
        self.buckets.len()
    }

    /// `pass` of `inputs` (each with [`Self::bucket`] rows): replayed from
    /// the graph of their bucket, recorded at its first use; eager when
    /// graphs are off. The result is a fresh tensor (the graph's output is
    /// overwritten by the next replay).
    pub fn run(&mut self, inputs: &[&Tensor], pass: impl Fn(&[Tensor]) -> Tensor) -> Tensor {
        if self.off.is_none() {
            match self.replay(inputs, &pass) {
                Ok(output) => return output,
                Err(e) => {
                    tracing::warn!(error = %e, "CUDA graphs off for this denoiser; passes run eagerly");
                    self.off = Some(e);
                    self.buckets.clear();
                }
            }
        }
        pass(&inputs.iter().map(|t| t.shallow_clone()).collect::<Vec<_>>())
    }

    /// The graph of `inputs`' bucket (recorded now if new) replayed on them.
    fn replay(
        &mut self,
        inputs: &[&Tensor],
        pass: &impl Fn(&[Tensor]) -> Tensor,
    ) -> Result<Tensor, GraphError> {
        let rows = inputs.first().map_or(0, |t| t.size()[0]);
        let device = self.device;
        let captured = match self.buckets.entry(rows) {
            Entry::Occupied(recorded) => recorded.into_mut(),
            Entry::Vacant(slot) => {
                let captured = record(device, inputs, pass)?;
                tracing::info!(rows, "denoiser pass recorded as a CUDA graph");
                slot.insert(captured)
            }
        };
        for (fixed, input) in captured.inputs.iter_mut().zip(inputs) {
            fixed.copy_(input);
        }
        captured.graph.replay()?;
        Ok(captured.output.copy())
    }
}

/// Records `pass` on copies of `inputs`: two warm-up runs on a side stream
/// (libtorch initializes cuBLAS workspaces and the like lazily, which a
/// capture may not do), then the capture.
fn record(
    device: usize,
    inputs: &[&Tensor],
    pass: &impl Fn(&[Tensor]) -> Tensor,
) -> Result<Captured, GraphError> {
    let fixed: Vec<Tensor> = inputs.iter().map(|t| t.copy()).collect();
    let mut graph = CudaGraph::new()?;
    graph.side_stream(device)?;
    let recorded = (|| {
        for _ in 0..2 {
            let _warm_up = run_caught(pass, &fixed)?;
        }
        graph.capture_begin()?;
        let output = run_caught(pass, &fixed);
        // End the capture whatever happened inside it.
        let ended = graph.capture_end();
        let output = output?;
        ended?;
        Ok(output)
    })();
    let restored = graph.default_stream();
    let output = recorded?;
    restored?;
    Ok(Captured {
        graph,
        inputs: fixed,
        output,
    })
}

/// `pass(inputs)`, with a libtorch panic turned into an error.
fn run_caught(
    pass: &impl Fn(&[Tensor]) -> Tensor,
    inputs: &[Tensor],
) -> Result<Tensor, GraphError> {
    catch_unwind(AssertUnwindSafe(|| pass(inputs))).map_err(|panic| {
        let reason = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        GraphError::Pass(reason.lines().next().unwrap_or_default().to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_from_the_row_quantum() {
        let buckets: Vec<i64> = [1, 8, 9, 16, 17, 100, 128, 129]
            .into_iter()
            .map(PassGraphs::bucket)
            .collect();
        assert_eq!(buckets, [8, 8, 16, 16, 32, 128, 128, 256]);
    }

    #[test]
    fn no_graphs_on_the_cpu() {
        assert!(PassGraphs::for_device(Device::Cpu).is_none());
        assert!(PassGraphs::for_device(Device::Cuda(0)).is_some());
    }

    #[test]
    fn a_failed_recording_turns_graphs_off_and_runs_the_pass_eagerly() {
        // The pass fails the first time it runs (a warm-up, where a GPU
        // lets the recording get that far; without one the recording fails
        // before). Either way graphs go off and every call runs eagerly once.
        let mut graphs = PassGraphs::for_device(Device::Cuda(0)).expect("a CUDA device");
        let x = Tensor::from_slice(&[1f32, 2.0]).view([2, 1]);
        let calls = std::cell::Cell::new(0);
        let first_panics = |inputs: &[Tensor]| {
            calls.set(calls.get() + 1);
            assert!(
                calls.get() > 1 || !tch::Cuda::is_available(),
                "a failing op"
            );
            &inputs[0] * 2.0
        };
        let out = graphs.run(&[&x], first_panics);
        assert!(graphs.off().is_some());
        assert_eq!(graphs.recorded(), 0);
        assert_eq!(Vec::<f32>::try_from(out.view([-1])).unwrap(), [2.0, 4.0]);
        let before = calls.get();
        let again = graphs.run(&[&x], first_panics);
        assert!(again.equal(&out));
        assert_eq!(calls.get(), before + 1, "no second recording");
    }
}
