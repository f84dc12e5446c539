//! Shared helpers for integration tests: start a real server on port 0 with
//! its own data directory and talk to it as a client would.

pub mod generation;
pub mod proxy;
pub mod raw;
pub mod services;
pub mod tls;

use std::process::Output;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use weightgen::serve::{self, MetricsListen, RunningServer, ServerConfig};

/// A `digits` zoo of `models` MLPs trained `steps` steps each, built by
/// two jobs on the CPU.
pub fn digits_zoo(
    zoo: &str,
    models: u64,
    steps: usize,
    seed: u64,
    shared_init: bool,
) -> weightgen::zoo::ZooBuildConfig {
    use weightgen::tasks::{Family, TrainConfig};
    weightgen::zoo::ZooBuildConfig {
        zoo: zoo.into(),
        family: Family::Digits,
        architecture: String::new(),
        num_models: models,
        seed,
        shared_init,
        train: TrainConfig {
            steps,
            ..Family::Digits.train_config()
        },
        worker: "test".into(),
        jobs: 2,
        lease: Duration::from_secs(600),
        device: tch::Device::Cpu,
        max_models: None,
        cancel: Default::default(),
        words_base: Default::default(),
    }
}

/// A server started for one test, with its data directory.
pub struct TestServer {
    pub server: RunningServer,
    pub data_dir: tempfile::TempDir,
}

impl TestServer {
    /// "127.0.0.1:PORT" of the gRPC listener.
    pub fn addr(&self) -> String {
        self.server.grpc_addr().to_string()
    }

    /// A fresh connection to the server.
    pub async fn channel(&self) -> Channel {
        weightgen::client::connect(&self.addr(), Some(Duration::from_secs(10)))
            .await
            .expect("connect to the test server")
    }

    /// The text of GET /metrics.
    pub async fn metrics(&self) -> String {
        let addr = self.server.metrics_addr().expect("metrics enabled");
        http_get(addr, "/metrics").await
    }

    /// Waits up to `within` for the metric `name{labels}` to read `want`.
    /// Gauges are process-wide: other tests' servers write them too, and
    /// each server re-publishes its own periodically.
    pub async fn wait_for_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
        within: Duration,
    ) {
        let started = std::time::Instant::now();
        loop {
            let value = metric_value(&self.metrics().await, name, labels);
            if value == Some(want) {
                return;
            }
            assert!(
                started.elapsed() < within,
                "{name}{labels:?} is {value:?}, not {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Starts a server on loopback port 0 (gRPC and metrics) with a fresh data
/// directory; `adjust` may change any other setting first.
pub async fn spawn_server(adjust: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let data_dir = tempfile::tempdir().expect("temp data dir");
    let mut config = ServerConfig::with_defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.metrics_listen = MetricsListen(Some("127.0.0.1:0".parse().unwrap()));
    config.storage = weightgen::storage::StorageArgs::embedded(data_dir.path().join("data"));
    config.device = weightgen::device::DeviceChoice::Cpu;
    config.shutdown_grace = Duration::from_secs(10);
    adjust(&mut config);
    let server = serve::start(config).await.expect("server starts");
    TestServer { server, data_dir }
}

/// A minimal HTTP/1.1 GET, returning the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The value of one Prometheus sample whose line starts with `prefix`
/// (metric name plus labels), or None.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .find(|line| {
            let (series, _) = line.rsplit_once(' ').unwrap_or((line, ""));
            series.split(['{', '}']).next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|line| line.rsplit_once(' '))
        .and_then(|(_, value)| value.parse().ok())
}

/// A finished process's stdout followed by its stderr, as text.
pub fn combined_output(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A server process started by a test: killed if the test fails half-way.
pub struct ServerProcess(pub std::process::Child);

impl ServerProcess {
    /// Sends SIGTERM and waits (at most `within`) for a successful exit.
    pub fn stop_with_sigterm(&mut self, within: std::time::Duration) {
        let pid = self.0.id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < within,
                "no exit {within:?} after SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(status.success(), "exit status {status:?}");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Downloads zoo model `id` with a 30 s deadline: its bytes, or the status.
pub async fn try_download(
    client: &mut weightgen::proto::v1::catalog_service_client::CatalogServiceClient<Channel>,
    id: &str,
) -> Result<Vec<u8>, tonic::Status> {
    use tokio_stream::StreamExt;
    use weightgen::proto::v1::DownloadCheckpointRequest;
    use weightgen::proto::v1::download_checkpoint_request::Target;
    use weightgen::proto::v1::download_checkpoint_response::Part;
    let mut request = tonic::Request::new(DownloadCheckpointRequest {
        target: Some(Target::ZooModelId(id.to_owned())),
    });
    request.set_timeout(Duration::from_secs(30));
    let mut stream = client.download_checkpoint(request).await?.into_inner();
    let mut bytes = Vec::new();
    while let Some(message) = stream.next().await {
        if let Some(Part::Chunk(c)) = message?.part {
            bytes.extend_from_slice(&c);
        }
    }
    Ok(bytes)
}

/// The bootstrap venv's python, with torch 2.11 (scripts/test.sh sets it up).
pub fn torch_python() -> String {
    let venv = std::env::var("WEIGHTGEN_TORCH_VENV")
        .expect("WEIGHTGEN_TORCH_VENV is unset: run the tests through scripts/test.sh (it bootstraps the torch venv)");
    format!("{venv}/bin/python")
}

/// Asserts that Hugging Face transformers' checkpoint loader
/// (`modeling_utils.load_state_dict`, what `from_pretrained` reads
/// safetensors with) reads `path` as safetensors' own loader does: the
/// same names, dtypes and values, and `format: pt` in the metadata (which
/// transformers before 5 required). scripts/tools.sh installs transformers.
pub fn transformers_reads(path: &std::path::Path) {
    const CHECK: &str = r#"
import sys, torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers.modeling_utils import load_state_dict
path = sys.argv[1]
theirs, ours = load_state_dict(path), load_file(path)
assert theirs.keys() == ours.keys(), (sorted(theirs), sorted(ours))
for name, value in ours.items():
    assert theirs[name].dtype == value.dtype and torch.equal(theirs[name], value), name
with safe_open(path, framework="pt") as f:
    assert f.metadata()["format"] == "pt", f.metadata()
print("transformers read", len(theirs), "tensors")
"#;
    let output = std::process::Command::new(torch_python())
        .arg("-c")
        .arg(CHECK)
        .arg(path)
        .output()
        .unwrap();
    let text = combined_output(&output);
    assert!(
        output.status.success() && text.contains("transformers read"),
        "{}: {text}",
        path.display()
    );
}
