//! Configuration of `weightgen-server`: every flag is also a `WEIGHTGEN_*`
//! environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;

use crate::device::DeviceChoice;
use crate::storage::StorageArgs;

/// One mebibyte.
const MIB: usize = 1024 * 1024;

/// An address to listen on, or `off` (the metrics and the health ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsListen(pub Option<SocketAddr>);

impl FromStr for MetricsListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        s.parse()
            .map(|addr| Self(Some(addr)))
            .map_err(|e| format!("expected HOST:PORT or \"off\": {e}"))
    }
}

/// Everything the server needs to start. Build it with clap (flags and env
/// vars) or, in tests, with [`ServerConfig::with_defaults`] and field edits.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerConfig {
    /// Address the gRPC server listens on. Port 0 picks a free port. In a
    /// container use 0.0.0.0:50051.
    #[arg(long, env = "WEIGHTGEN_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Address of the Prometheus endpoint (GET /metrics), or "off".
    #[arg(
        long,
        env = "WEIGHTGEN_METRICS_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub metrics_listen: MetricsListen,

    /// Address of a second, plaintext port that serves only
    /// grpc.health.v1, without a token, or "off": for probes that cannot
    /// speak TLS (Kubernetes' gRPC probes) when the main port has --tls-cert.
    #[arg(long, env = "WEIGHTGEN_HEALTH_LISTEN", default_value = "off")]
    pub health_listen: MetricsListen,

    /// Data directory, catalog and blob store (embedded defaults under the
    /// data directory; `--catalog`/`--blobs` URLs switch backends).
    #[command(flatten)]
    pub storage: StorageArgs,

    /// Device denoisers run on: auto (first GPU if any, else CPU), cpu, or
    /// cuda:N. A GPU that is asked for but missing stops the server at start.
    #[arg(long, env = "WEIGHTGEN_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,

    /// Largest request message the server decodes, in bytes. Raise it for
    /// large few-shot support sets; uploads are chunked and need no more.
    #[arg(long, env = "WEIGHTGEN_MAX_REQUEST_BYTES", default_value_t = 4 * MIB)]
    pub max_request_bytes: usize,

    /// Largest response message the server encodes, in bytes (streamed
    /// checkpoints are sent in chunks of at most 1 MiB).
    #[arg(long, env = "WEIGHTGEN_MAX_RESPONSE_BYTES", default_value_t = 4 * MIB)]
    pub max_response_bytes: usize,

    /// Time a call may take to produce its response headers (the whole call
    /// for unary RPCs); past it the call is answered DEADLINE_EXCEEDED and its
    /// queued generation dropped. A client's shorter grpc-timeout wins. E.g. "60s".
    #[arg(long, env = "WEIGHTGEN_REQUEST_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Calls in flight across all connections (a stream counts until it
    /// ends). Past it new calls get RESOURCE_EXHAUSTED at once instead of
    /// queueing; size it to what the machine can serve within deadlines.
    #[arg(long, env = "WEIGHTGEN_MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,

    /// HTTP/2 streams one client connection may have open at once.
    #[arg(
        long,
        env = "WEIGHTGEN_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 128
    )]
    pub max_streams_per_connection: u32,

    /// Interval of HTTP/2 keepalive pings to idle clients, e.g. "30s".
    #[arg(long, env = "WEIGHTGEN_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is
    /// closed, e.g. "10s".
    #[arg(long, env = "WEIGHTGEN_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_timeout: Duration,

    /// On SIGTERM/ctrl-c: how long in-flight calls and streams may take to
    /// finish before the server stops anyway. Keep it below the orchestrator's
    /// termination grace period.
    #[arg(long, env = "WEIGHTGEN_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// How often the server checks the catalog for a newly activated
    /// denoiser and swaps it in (requests in flight finish on the old one).
    #[arg(long, env = "WEIGHTGEN_RELOAD_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,

    /// Most samples in one denoiser pass. Requests share passes step by
    /// step: a new request joins the running batch at the next pass and a
    /// finished one leaves at once.
    #[arg(long, env = "WEIGHTGEN_MAX_BATCH", default_value_t = crate::backend::DEFAULT_MAX_BATCH)]
    pub max_batch: usize,

    /// Most samples in flight at once, of all requests (each carries its
    /// state between passes; more wait to start).
    #[arg(long, env = "WEIGHTGEN_MAX_ACTIVE", default_value_t = crate::backend::DEFAULT_MAX_ACTIVE)]
    pub max_active: usize,

    /// Bytes of finished samples one GenerateInit stream may hold that its
    /// client has not taken yet; its next samples start only when there is
    /// room (one sample always fits). Bounds the server's memory per call.
    #[arg(long, env = "WEIGHTGEN_STREAM_WINDOW", default_value_t = crate::backend::DEFAULT_STREAM_WINDOW)]
    pub stream_window: usize,

    /// On a CUDA device: record each denoiser pass as a CUDA graph (one per
    /// batch-size bucket, at its first use) and replay it, so a step costs
    /// one launch instead of dozens. `false` runs every pass eagerly.
    #[arg(long, env = "WEIGHTGEN_CUDA_GRAPHS", default_value_t = true, action = clap::ArgAction::Set)]
    pub cuda_graphs: bool,

    /// Diagnostics on a CUDA device: libtorch's synchronization debugging
    /// (`warn` prints every operation that makes the server wait for the
    /// GPU — what keeps a pass from overlapping the next; `error` fails it).
    #[arg(
        long,
        env = "WEIGHTGEN_CUDA_SYNC_DEBUG",
        value_enum,
        default_value = "off"
    )]
    pub cuda_sync_debug: crate::backend::cuda_graph::SyncDebug,

    /// GenerateInit requests that may wait for the model or run on it; past
    /// it new ones get RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "WEIGHTGEN_MAX_QUEUE", default_value_t = crate::backend::DEFAULT_MAX_QUEUE)]
    pub max_queue: usize,

    /// Largest checkpoint UploadCheckpoint accepts, in bytes.
    #[arg(long, env = "WEIGHTGEN_MAX_UPLOAD_BYTES", default_value_t = super::catalog::DEFAULT_MAX_UPLOAD_BYTES)]
    pub max_upload_bytes: u64,

    /// Most samples one GenerateInit request may ask for.
    #[arg(long, env = "WEIGHTGEN_MAX_SAMPLES", default_value_t = super::generate_init::DEFAULT_MAX_SAMPLES)]
    pub max_samples: u32,

    /// At start-up the server sweeps the blob store in the background:
    /// partial writes and blobs no catalog row refers to (what a killed
    /// process leaves) are removed once older than this (`weightgen-worker
    /// gc` does the same on demand).
    #[arg(long, env = "WEIGHTGEN_GC_GRACE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub gc_grace: Duration,

    /// Token file: one `NAME ROLE sha256:HEX [CALLS/min]` per line (the
    /// SHA-256 of each bearer token; roles read, generate, admin; an optional
    /// quota of calls per minute). With it every call must
    /// send "authorization: Bearer TOKEN" with a role that allows the
    /// method; without it every call is allowed (keep the port private).
    #[arg(long, env = "WEIGHTGEN_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,

    /// How often the token file is re-read: a changed file that parses
    /// replaces the tokens without a restart (a rotated Kubernetes Secret);
    /// one that does not is logged and the previous tokens stay.
    #[arg(long, env = "WEIGHTGEN_AUTH_RELOAD_EVERY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub auth_reload_every: Duration,

    /// Require a token for health checks and reflection too (by default they
    /// stay open for probes and tooling).
    #[arg(long, env = "WEIGHTGEN_AUTH_HEALTH")]
    pub auth_health: bool,

    /// TLS on the gRPC port (and mutual TLS with a client CA).
    #[command(flatten)]
    pub tls: super::tls::TlsArgs,
}

/// Parses a `ServerConfig` alone, for [`ServerConfig::with_defaults`].
#[derive(Parser)]
struct DefaultsOnly {
    #[command(flatten)]
    config: ServerConfig,
}

impl ServerConfig {
    /// The documented defaults (environment variables still apply), as the
    /// binary would use them with no flags.
    pub fn with_defaults() -> Self {
        DefaultsOnly::parse_from(["weightgen-server"]).config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = DefaultsOnly::try_parse_from(["x"]).unwrap().config;
        assert_eq!(config.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(config.max_request_bytes, 4 * MIB);
        assert_eq!(config.shutdown_grace, Duration::from_secs(30));
        assert_eq!(config.device, DeviceChoice::Auto);
        assert_eq!(config.reload_interval, Duration::from_secs(5));
        assert_eq!(config.max_samples, 64);
    }

    #[test]
    fn flags_parse_durations_and_off() {
        let config = DefaultsOnly::try_parse_from([
            "x",
            "--metrics-listen",
            "off",
            "--shutdown-grace",
            "1500ms",
            "--device",
            "cuda:1",
        ])
        .unwrap()
        .config;
        assert_eq!(config.metrics_listen, MetricsListen(None));
        assert_eq!(config.shutdown_grace, Duration::from_millis(1500));
        assert_eq!(config.device, DeviceChoice::Cuda(1));
        let err = DefaultsOnly::try_parse_from(["x", "--device", "gpu"])
            .err()
            .unwrap();
        assert!(err.to_string().contains("expected auto, cpu"), "{err}");
    }
}
