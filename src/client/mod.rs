//! Client helpers shared by the `weightgen` CLI, the demo and the tests:
//! connecting, health checks, server metadata, and GenerateInit with its
//! streamed files reassembled and checked against the trailer.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub mod task_file;

pub use task_file::{TaskFile, TaskFileError};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::blobs::sha256_hex;
use crate::proto::v1::generation_service_client::GenerationServiceClient;
use crate::proto::v1::{
    GenerateInitHeader, GenerateInitRequest, GenerateInitTrailer, ServerMetadataRequest,
    ServerMetadataResponse, generate_init_response::Part,
};
use crate::telemetry::error_chain;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address does not parse.
    #[error("invalid server address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address given.
        addr: String,
        /// Why it is invalid.
        reason: String,
    },
    /// No connection could be made.
    #[error("cannot connect to {addr}: {}", error_chain(.source))]
    Connect {
        /// The address.
        addr: String,
        /// The cause.
        source: tonic::transport::Error,
    },
    /// The server answered with an error.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    /// The response stream broke the protocol (missing header or trailer,
    /// chunks out of order, a digest that does not match).
    #[error("malformed GenerateInit response: {0}")]
    Protocol(String),
    /// A TLS file (CA bundle, client certificate or key) cannot be read.
    #[error("reading {path}: {source}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS settings cannot be used.
    #[error("TLS settings: {0}")]
    Tls(String),
    /// The bearer token cannot be sent as a header.
    #[error("the token must be printable ASCII (--token / WEIGHTGEN_TOKEN)")]
    InvalidToken,
    /// The trace context is not a W3C `traceparent`.
    #[error(
        "--traceparent / TRACEPARENT {0:?}: expected 00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>, ids not all zero"
    )]
    InvalidTraceparent(String),
    /// The wait for a status ran out.
    #[error("{service:?} did not become SERVING within {waited:?} (last: {last})")]
    Timeout {
        /// The health service name.
        service: String,
        /// How long it waited.
        waited: Duration,
        /// The last status or error seen.
        last: String,
    },
}

/// How the client secures its connection: the CAs it trusts for the
/// server's certificate and, for servers started with `--tls-client-ca`,
/// the certificate it presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM CA bundle the server's certificate must chain to (None: the
    /// system's roots).
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain and its key (mutual TLS).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Name the server's certificate must carry (None: the address's host).
    pub domain: Option<String>,
}

impl ClientTls {
    fn config(&self) -> Result<ClientTlsConfig, ClientError> {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(path) => config.ca_certificate(Certificate::from_pem(read_tls_file(path)?)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(
                read_tls_file(cert)?,
                read_tls_file(key)?,
            ));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

fn read_tls_file(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::TlsFile {
        path: path.to_owned(),
        source,
    })
}

/// Builds a plaintext endpoint for `addr` ("host:port" or "http://host:port";
/// "https://host:port" speaks TLS trusting the system's roots) with a
/// connect timeout and, when given, a per-call timeout.
pub fn endpoint(addr: &str, call_timeout: Option<Duration>) -> Result<Endpoint, ClientError> {
    endpoint_with(addr, call_timeout, None)
}

/// [`endpoint`] with TLS: `tls` (or an "https://" address) makes the
/// connection TLS; an "http://" address with `tls` is refused as a
/// contradiction rather than silently sent in the clear.
pub fn endpoint_with(
    addr: &str,
    call_timeout: Option<Duration>,
    tls: Option<&ClientTls>,
) -> Result<Endpoint, ClientError> {
    let invalid = |reason: String| ClientError::InvalidAddress {
        addr: addr.to_owned(),
        reason,
    };
    let https = addr.starts_with("https://");
    if addr.starts_with("http://") && tls.is_some() {
        return Err(invalid(
            "an http:// address with TLS options; use https:// or host:port".to_owned(),
        ));
    }
    let secure = https || tls.is_some();
    let uri = match (addr.contains("://"), secure) {
        (true, _) => addr.to_owned(),
        (false, true) => format!("https://{addr}"),
        (false, false) => format!("http://{addr}"),
    };
    let mut endpoint = Endpoint::from_shared(uri).map_err(|e| invalid(e.to_string()))?;
    if secure {
        let config = tls.cloned().unwrap_or_default().config()?;
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| ClientError::Tls(error_chain(&e)))?;
    }
    let endpoint = endpoint.connect_timeout(Duration::from_secs(5));
    Ok(match call_timeout {
        Some(timeout) => endpoint.timeout(timeout),
        None => endpoint,
    })
}

/// A server to call: its address, how to secure the connection and the
/// bearer token to send with every call.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// "host:port", "http://host:port" or "https://host:port".
    pub addr: String,
    /// TLS settings (None: plaintext unless the address is https://).
    pub tls: Option<ClientTls>,
    /// Bearer token (servers started with --auth-tokens).
    pub token: Option<String>,
    /// W3C trace context sent with every call, so the server's spans join
    /// the caller's trace.
    pub traceparent: Option<String>,
}

impl Target {
    /// A plaintext target without a token.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            ..Self::default()
        }
    }

    /// Connects, with `call_timeout` on every call when given.
    pub async fn connect(&self, call_timeout: Option<Duration>) -> Result<Connection, ClientError> {
        let headers = self.headers()?;
        let channel = endpoint_with(&self.addr, call_timeout, self.tls.as_ref())?
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        Ok(Connection { channel, headers })
    }

    /// The headers sent with every call, checked before connecting.
    fn headers(&self) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, ClientError> {
        let mut headers = Vec::new();
        if let Some(token) = &self.token {
            let mut value = http::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| ClientError::InvalidToken)?;
            value.set_sensitive(true);
            headers.push((http::header::AUTHORIZATION, value));
        }
        if let Some(traceparent) = &self.traceparent {
            let value = checked_traceparent(traceparent)?;
            headers.push((http::HeaderName::from_static("traceparent"), value));
        }
        Ok(headers)
    }
}

/// `text` as a `traceparent` header when it is one (W3C Trace Context,
/// version 00: lower-case hex, trace and parent ids not all zero).
pub fn checked_traceparent(text: &str) -> Result<http::HeaderValue, ClientError> {
    let invalid = || ClientError::InvalidTraceparent(text.to_owned());
    let parts: Vec<&str> = text.split('-').collect();
    let hex = |part: &str, len: usize| {
        part.len() == len
            && part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |part: &str| part.bytes().any(|b| b != b'0');
    let valid = matches!(parts.as_slice(), [version, trace, parent, flags]
        if *version == "00"
            && hex(trace, 32) && nonzero(trace)
            && hex(parent, 16) && nonzero(parent)
            && hex(flags, 2));
    if !valid {
        return Err(invalid());
    }
    http::HeaderValue::from_str(text).map_err(|_| invalid())
}

/// A channel that sends the same headers with every call: a bearer token
/// (`authorization: Bearer …`) for servers started with `--auth-tokens`, a
/// `traceparent`; without any it is the plain channel.
#[derive(Debug, Clone)]
pub struct Connection {
    channel: Channel,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl From<Channel> for Connection {
    fn from(channel: Channel) -> Self {
        Self {
            channel,
            headers: Vec::new(),
        }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Connection {
    type Response = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Response;
    type Error = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Error;
    type Future = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        for (name, value) in &self.headers {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        tower::Service::call(&mut self.channel, request)
    }
}

/// Connects to the server at `addr`.
pub async fn connect(addr: &str, call_timeout: Option<Duration>) -> Result<Channel, ClientError> {
    endpoint(addr, call_timeout)?
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        })
}

/// The health status of `service` ("" for the whole server).
pub async fn health_status(
    channel: impl Into<Connection>,
    service: &str,
) -> Result<ServingStatus, ClientError> {
    let response = HealthClient::new(channel.into())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// Polls the health of `service` at `target` until it is SERVING or
/// `timeout` passes; connection errors count as "not yet" while waiting.
pub async fn wait_until_serving(
    target: &Target,
    service: &str,
    timeout: Duration,
) -> Result<(), ClientError> {
    let started = Instant::now();
    let mut last;
    loop {
        match target.connect(Some(Duration::from_secs(5))).await {
            Ok(channel) => match health_status(channel, service).await {
                Ok(ServingStatus::Serving) => return Ok(()),
                Ok(status) => last = status.as_str_name().to_owned(),
                Err(e) => last = e.to_string(),
            },
            Err(
                e @ (ClientError::InvalidAddress { .. }
                | ClientError::TlsFile { .. }
                | ClientError::Tls(_)
                | ClientError::InvalidToken),
            ) => return Err(e),
            Err(e) => last = e.to_string(),
        }
        if started.elapsed() >= timeout {
            return Err(ClientError::Timeout {
                service: service.to_owned(),
                waited: timeout,
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The server's name, version, torch version and device.
pub async fn server_metadata(
    channel: impl Into<Connection>,
) -> Result<ServerMetadataResponse, ClientError> {
    Ok(GenerationServiceClient::new(channel.into())
        .server_metadata(ServerMetadataRequest {})
        .await?
        .into_inner())
}

/// What GenerateInit returned: the header, each sample's file (checked
/// against the trailer's size and SHA-256), and the trailer.
#[derive(Debug, Clone)]
pub struct GeneratedInits {
    /// Denoiser, architecture, tensors, seed and sampler.
    pub header: GenerateInitHeader,
    /// One safetensors file per sample, in sample order.
    pub files: Vec<Vec<u8>>,
    /// Digests, queue and sampling times, batch size.
    pub trailer: GenerateInitTrailer,
}

/// Calls GenerateInit and reassembles the streamed files; `on_chunk`
/// sees the bytes received so far (for progress).
pub async fn generate(
    channel: impl Into<Connection>,
    request: GenerateInitRequest,
    mut on_chunk: impl FnMut(u64),
) -> Result<GeneratedInits, ClientError> {
    let bad = |reason: String| ClientError::Protocol(reason);
    let mut stream = GenerationServiceClient::new(channel.into())
        .max_decoding_message_size(8 << 20)
        .generate_init(request)
        .await?
        .into_inner();
    let mut header = None;
    let mut files: Vec<Vec<u8>> = Vec::new();
    let mut received = 0u64;
    let mut trailer = None;
    while let Some(message) = stream.message().await? {
        match message.part {
            Some(Part::Header(h)) => {
                files = vec![Vec::new(); h.num_samples as usize];
                header = Some(h);
            }
            Some(Part::Chunk(c)) => {
                let file = files.get_mut(c.sample_index as usize).ok_or_else(|| {
                    bad(format!(
                        "chunk for sample {} before a header naming it",
                        c.sample_index
                    ))
                })?;
                if c.offset != file.len() as u64 {
                    return Err(bad(format!(
                        "sample {} chunk at offset {}, expected {}",
                        c.sample_index,
                        c.offset,
                        file.len()
                    )));
                }
                received += c.data.len() as u64;
                file.extend_from_slice(&c.data);
                on_chunk(received);
            }
            Some(Part::Trailer(t)) => trailer = Some(t),
            None => return Err(bad("an empty message".into())),
        }
    }
    let header = header.ok_or_else(|| bad("no header".into()))?;
    let trailer = trailer.ok_or_else(|| bad("no trailer".into()))?;
    if trailer.samples.len() != files.len() {
        return Err(bad(format!(
            "{} digests for {} samples",
            trailer.samples.len(),
            files.len()
        )));
    }
    for digest in &trailer.samples {
        let file = files
            .get(digest.sample_index as usize)
            .ok_or_else(|| bad(format!("digest for unknown sample {}", digest.sample_index)))?;
        if file.len() as u64 != digest.size_bytes || sha256_hex(file) != digest.sha256 {
            return Err(bad(format!(
                "sample {} does not match its digest (got {} bytes)",
                digest.sample_index,
                file.len()
            )));
        }
    }
    Ok(GeneratedInits {
        header,
        files,
        trailer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_checked_before_they_are_sent() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(checked_traceparent(valid).unwrap(), valid);
        for invalid in [
            "",
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let error = checked_traceparent(invalid).unwrap_err();
            assert!(
                error.to_string().contains("expected 00-<32 hex trace id>"),
                "{invalid:?}: {error}"
            );
        }
    }

    #[test]
    fn endpoint_accepts_bare_and_scheme_addresses() {
        assert_eq!(
            endpoint("127.0.0.1:50051", None).unwrap().uri().to_string(),
            "http://127.0.0.1:50051/"
        );
        assert_eq!(
            endpoint("http://localhost:1", None)
                .unwrap()
                .uri()
                .to_string(),
            "http://localhost:1/"
        );
        assert!(matches!(
            endpoint("http://bad host:1", None),
            Err(ClientError::InvalidAddress { .. })
        ));
    }
}
