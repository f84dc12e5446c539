//! TLS on the gRPC port (rustls): a certificate chain and key from PEM
//! files, and optionally a client CA that every client certificate must be
//! signed by (mutual TLS). The files are re-read while the server runs
//! (`--tls-reload-every`): a rotated certificate serves new connections
//! without a restart; one that does not load is logged and the previous one
//! stays. Handshakes run beside the accept loop with a time limit, so a
//! client that connects and says nothing holds up no one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Default of `--tls-reload-every`.
pub const DEFAULT_RELOAD_EVERY: &str = "5s";

/// Default time a client has to finish its TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose handshake is done but that tonic has not taken yet.
const READY_CONNECTIONS: usize = 64;

/// The server's TLS flags.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain the gRPC port presents (leaf first). With
    /// --tls-key it turns TLS on; without, the port speaks plaintext.
    #[arg(long = "tls-cert", env = "WEIGHTGEN_TLS_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long = "tls-key", env = "WEIGHTGEN_TLS_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// PEM bundle of CAs for client certificates: with it every client must
    /// present a certificate one of them signed (mutual TLS).
    #[arg(
        long = "tls-client-ca",
        env = "WEIGHTGEN_TLS_CLIENT_CA",
        requires = "cert"
    )]
    pub client_ca: Option<PathBuf>,
    /// How often the certificate, key and client CA files are re-read; a
    /// change that loads serves new connections, one that does not is logged.
    #[arg(long, env = "WEIGHTGEN_TLS_RELOAD_EVERY", default_value = DEFAULT_RELOAD_EVERY, value_parser = humantime::parse_duration)]
    pub tls_reload_every: Duration,
}

impl TlsArgs {
    /// The files to serve TLS with, when TLS is on.
    pub fn files(&self) -> Option<TlsFiles> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.client_ca.clone(),
            }),
            _ => None,
        }
    }
}

/// Where the server's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM client CA bundle (mutual TLS), if any.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Every file, for the reload watcher.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.clone());
        paths
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }
}

/// Why the TLS files cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("reading TLS file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the expected kind.
    #[error("TLS file {path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the combination (e.g. the key does not match the
    /// certificate).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The rustls configuration of `files`, negotiating HTTP/2 (gRPC).
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = certificates(&files.cert)?;
    let bytes = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: files.key.clone(),
        reason: format!("no private key ({e})"),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(path) => builder.with_client_cert_verifier(client_verifier(path, provider)?),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        TlsError::Config(format!(
            "{} with {}: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn client_verifier(
    path: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(path)? {
        roots.add(certificate).map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: format!("not a usable CA certificate ({e})"),
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| TlsError::Config(format!("client CA {}: {e}", path.display())))
}

/// Every certificate of a PEM file; at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let pem_error = |reason: String| TlsError::Pem {
        path: path.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(format!("bad PEM ({e})")))?;
    if chain.is_empty() {
        return Err(pem_error("no CERTIFICATE block".to_owned()));
    }
    Ok(chain)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The configuration the server hands new connections: the files' as last
/// loaded successfully.
pub type ConfigSource = watch::Receiver<Arc<ServerConfig>>;

/// Loads `files` now (an error stops the start) and re-reads them every
/// `every` while the server runs.
pub fn watch(files: TlsFiles, every: Duration) -> Result<ConfigSource, TlsError> {
    let initial = server_config(&files)?;
    let paths = files.paths();
    Ok(super::reload::watch_files(
        "TLS files",
        paths,
        initial,
        every,
        move || server_config(&files),
    ))
}

/// TLS connections accepted on `listener`: each handshake runs in its own
/// task with the configuration current at accept time and at most
/// `handshake_timeout`; a failed one is logged, counted
/// (`weightgen_tls_handshake_failures_total`) and dropped. The listener
/// closes when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    configs: ConfigSource,
    handshake_timeout: Duration,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (ready, stream) = mpsc::channel(READY_CONNECTIONS);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = ready.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accepting a TCP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(configs.borrow().clone());
            let ready = ready.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = ready.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => handshake_failed(peer, &e.to_string()),
                    Err(_) => handshake_failed(peer, "timed out"),
                }
            });
        }
    });
    ReceiverStream::new(stream)
}

fn handshake_failed(peer: std::net::SocketAddr, reason: &str) {
    metrics::counter!("weightgen_tls_handshake_failures_total").increment(1);
    tracing::info!(%peer, reason, "TLS handshake failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn missing_and_malformed_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("absent.pem"),
            key: dir.path().join("absent.key"),
            client_ca: None,
        };
        let err = server_config(&files).unwrap_err().to_string();
        assert!(err.contains("absent.pem"), "{err}");

        let files = TlsFiles {
            cert: write(dir.path(), "empty.pem", "not PEM at all\n"),
            key: write(dir.path(), "empty.key", ""),
            client_ca: None,
        };
        let err = server_config(&files).unwrap_err().to_string();
        assert!(
            err.contains("empty.pem") && err.contains("no CERTIFICATE"),
            "{err}"
        );
    }

    #[test]
    fn the_file_list_includes_the_client_ca() {
        let files = TlsFiles {
            cert: "c".into(),
            key: "k".into(),
            client_ca: Some("ca".into()),
        };
        assert_eq!(files.paths().len(), 3);
        assert!(files.mutual());
    }
}
