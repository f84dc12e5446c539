//! Client helpers shared by the `weightgen` CLI, the demo and the tests:
//! connecting, health checks and server metadata.

use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::proto::v1::generation_service_client::GenerationServiceClient;
use crate::proto::v1::{ServerMetadataRequest, ServerMetadataResponse};

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
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// The cause.
        source: tonic::transport::Error,
    },
    /// The server answered with an error.
    #[error("{0}")]
    Rpc(#[from] tonic::Status),
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

/// Builds an endpoint for `addr` ("host:port" or "http://host:port") with a
/// connect timeout and, when given, a per-call timeout.
pub fn endpoint(addr: &str, call_timeout: Option<Duration>) -> Result<Endpoint, ClientError> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|e| ClientError::InvalidAddress {
        addr: addr.to_owned(),
        reason: e.to_string(),
    })?;
    let endpoint = endpoint.connect_timeout(Duration::from_secs(5));
    Ok(match call_timeout {
        Some(timeout) => endpoint.timeout(timeout),
        None => endpoint,
    })
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
pub async fn health_status(channel: Channel, service: &str) -> Result<ServingStatus, ClientError> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// Polls the health of `service` at `addr` until it is SERVING or `timeout`
/// passes; connection errors count as "not yet" while waiting.
pub async fn wait_until_serving(
    addr: &str,
    service: &str,
    timeout: Duration,
) -> Result<(), ClientError> {
    let started = Instant::now();
    let mut last;
    loop {
        match connect(addr, Some(Duration::from_secs(5))).await {
            Ok(channel) => match health_status(channel, service).await {
                Ok(ServingStatus::Serving) => return Ok(()),
                Ok(status) => last = status.as_str_name().to_owned(),
                Err(e) => last = e.to_string(),
            },
            Err(e @ ClientError::InvalidAddress { .. }) => return Err(e),
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
pub async fn server_metadata(channel: Channel) -> Result<ServerMetadataResponse, ClientError> {
    Ok(GenerationServiceClient::new(channel)
        .server_metadata(ServerMetadataRequest {})
        .await?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

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
