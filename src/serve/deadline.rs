//! Call deadlines: the shorter of the client's `grpc-timeout` and the
//! server's `--request-timeout`. A call whose response has not started by
//! then is answered DEADLINE_EXCEEDED, as the gRPC protocol and the proto
//! promise (tonic's own timeout answers CANCELLED "Timeout expired"). The
//! handler's future is dropped with it, so a generation still queued for the
//! model thread is dropped before it is sampled (its reply channel closes).
//! The handler runs under [`crate::breaker::with_call_deadline`], so a wait
//! for the catalog or blob store ends shortly before the deadline and the
//! client hears UNAVAILABLE naming the backend rather than a bare timeout.

use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderMap;
use tower::{Layer, Service};

/// The header a gRPC client states its deadline in.
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Applies deadlines to every call.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    server_timeout: Duration,
}

impl DeadlineLayer {
    /// Calls last at most `server_timeout` (a client may ask for less).
    pub fn new(server_timeout: Duration) -> Self {
        Self { server_timeout }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            server_timeout: self.server_timeout,
        }
    }
}

/// The service built by [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    inner: S,
    server_timeout: Duration,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for DeadlineService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let client = client_timeout(request.headers());
        let (timeout, whose) = match client {
            Some(asked) if asked < self.server_timeout => (asked, "the client's grpc-timeout"),
            _ => (self.server_timeout, "the server's --request-timeout"),
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let path = request.uri().path().to_owned();
        let call = crate::breaker::CallDeadline {
            at: deadline,
            timeout,
            whose,
        };
        let future = crate::breaker::with_described_deadline(call, self.inner.call(request));
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, future).await {
                Ok(response) => response,
                Err(_) => {
                    metrics::counter!("weightgen_deadline_exceeded_total").increment(1);
                    tracing::info!(%path, ?timeout, whose, "deadline exceeded");
                    Ok(tonic::Status::deadline_exceeded(format!(
                        "deadline exceeded: no answer within {timeout:?} ({whose})"
                    ))
                    .into_http::<ResBody>())
                }
            }
        })
    }
}

/// The client's `grpc-timeout` (1 to 8 digits and a unit: H, M, S, m, u or
/// n); None when absent or malformed (the server's timeout applies).
fn client_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert(GRPC_TIMEOUT, value.parse().unwrap());
        client_timeout(&headers)
    }

    #[test]
    fn reads_every_grpc_timeout_unit_and_ignores_malformed_values() {
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "123456789S", "10s", "1.5S", "-1S", "10"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(client_timeout(&HeaderMap::new()), None);
    }
}
