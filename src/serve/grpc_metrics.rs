//! Per-call Prometheus metrics for every gRPC method: calls by method and
//! status code, call duration (until the response stream ends), calls in
//! flight. The same layer opens each call's trace span
//! ([`super::trace_context`]) and holds it until the stream ends.

use std::collections::HashSet;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics::{counter, gauge, histogram};
use prost::Message;
use tonic::Code;
use tower::{Layer, Service};
use tracing::Instrument;

use super::body::{ObservedBody, grpc_status};
use super::trace_context::{self, call_span};

/// Counter of finished calls, labelled `method` and `code`.
pub const REQUESTS_TOTAL: &str = "weightgen_grpc_requests_total";
/// Histogram of call durations in seconds, labelled `method`.
pub const REQUEST_DURATION: &str = "weightgen_grpc_request_duration_seconds";
/// Gauge of calls whose response has not ended yet.
pub const REQUESTS_IN_FLIGHT: &str = "weightgen_grpc_requests_in_flight";

/// Label used for paths that are not a known method, so that stray requests
/// cannot blow up the label space.
const UNKNOWN_METHOD: &str = "unknown";

/// The canonical upper-case name of a gRPC code (as in the gRPC spec).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The methods served, as `/package.Service/Method` paths.
#[derive(Debug, Clone, Default)]
pub struct KnownMethods(Arc<HashSet<String>>);

impl KnownMethods {
    /// Collects every method of every service in the encoded descriptor sets.
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Result<Self, prost::DecodeError> {
        let mut paths = HashSet::new();
        for bytes in sets {
            let set = prost_types::FileDescriptorSet::decode(*bytes)?;
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        paths.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        Ok(Self(Arc::new(paths)))
    }

    /// The metric label for a request path: the path without its leading
    /// slash when known, else "unknown".
    pub fn label(&self, path: &str) -> String {
        if self.0.contains(path) {
            path.trim_start_matches('/').to_owned()
        } else {
            UNKNOWN_METHOD.to_owned()
        }
    }
}

/// Records the call metrics of the services it wraps.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    methods: KnownMethods,
}

impl GrpcMetricsLayer {
    /// Labels calls by the given known methods.
    pub fn new(methods: KnownMethods) -> Self {
        Self { methods }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            methods: self.methods.clone(),
        }
    }
}

/// The service built by [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    methods: KnownMethods,
}

fn record_end(method: &str, started: Instant, code: Code) {
    gauge!(REQUESTS_IN_FLIGHT).decrement(1.0);
    counter!(REQUESTS_TOTAL, "method" => method.to_owned(), "code" => code_name(code)).increment(1);
    histogram!(REQUEST_DURATION, "method" => method.to_owned())
        .record(started.elapsed().as_secs_f64());
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = self.methods.label(request.uri().path());
        let span = call_span(&method, request.headers());
        let started = Instant::now();
        gauge!(REQUESTS_IN_FLIGHT).increment(1.0);
        let future = span.in_scope(|| self.inner.call(request));
        let call = span.clone();
        Box::pin(
            async move {
                let response = match future.await {
                    Ok(response) => response,
                    Err(error) => {
                        record_end(&method, started, Code::Internal);
                        trace_context::record_end(&call, Code::Internal);
                        return Err(error);
                    }
                };
                // A trailers-only response (most errors) has its status in the headers.
                let header_code = grpc_status(response.headers());
                Ok(response.map(|body| {
                    ObservedBody::new(
                        body,
                        Box::new(move |end| {
                            let code = end.code(header_code);
                            record_end(&method, started, code);
                            trace_context::record_end(&call, code);
                        }),
                    )
                }))
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_the_weightgen_and_health_methods() {
        let methods = KnownMethods::from_descriptor_sets(&[
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ])
        .unwrap();
        assert_eq!(
            methods.label("/weightgen.v1.GenerationService/GenerateInit"),
            "weightgen.v1.GenerationService/GenerateInit"
        );
        assert_eq!(
            methods.label("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        assert_eq!(methods.label("/wp-admin/login.php"), "unknown");
    }

    #[test]
    fn code_names_follow_the_spec() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::from_i32(12)), "UNIMPLEMENTED");
    }
}
