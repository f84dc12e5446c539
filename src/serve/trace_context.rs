//! Each call's trace span: it continues the caller's W3C trace context
//! (`traceparent` and `tracestate` metadata), is named and attributed as
//! OpenTelemetry's gRPC conventions name server spans, and ends with the
//! call's status when its response stream ends. Spans of the work a call
//! causes (queue wait, sampling, streaming) are its children; with
//! `--otlp-endpoint` they are exported (see `crate::telemetry`).

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TraceContextExt;
use tonic::Code;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// gRPC metadata (HTTP/2 headers) as the propagator reads it.
struct MetadataExtractor<'a>(&'a http::HeaderMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The span of a call to `method` (`package.Service/Method`, or the
/// metrics' "unknown"), a child of the caller's span when `headers` carry a
/// valid `traceparent`.
pub fn call_span(method: &str, headers: &http::HeaderMap) -> Span {
    let (service, name) = method.split_once('/').unwrap_or((method, ""));
    let span = tracing::info_span!(
        "grpc.call",
        otel.name = method,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = name,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&MetadataExtractor(headers))
    });
    if parent.span().span_context().is_valid() {
        // Fails only without the OpenTelemetry layer (no export configured),
        // where there is no trace to continue.
        let _ = span.set_parent(parent);
    }
    span
}

/// The W3C `traceparent` of the current span, to hand its trace on to
/// work done elsewhere later (a queued job); None when the span is not
/// traced (no OpenTelemetry layer: `--otlp-endpoint` unset).
pub fn current_traceparent() -> Option<String> {
    let context = Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut carrier);
    });
    carrier.remove("traceparent")
}

/// Makes `span` a child of the span `traceparent` names (a stored
/// [`current_traceparent`]); nothing when it does not parse or nothing is
/// traced.
pub fn continue_trace(span: &Span, traceparent: &str) {
    let carrier =
        std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&carrier));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Whether a server span that ended with `code` failed, by OpenTelemetry's
/// gRPC conventions: the codes that mean the server did not do its part
/// (a client's mistake, like INVALID_ARGUMENT, is not the server's error).
pub fn is_server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// Records how the call ended on its span, and that it ended now: an
/// exported span ends when it was last exited, which for a streaming call
/// is when its handler returned the stream, not when the stream ended.
pub fn record_end(span: &Span, code: Code) {
    span.in_scope(|| {
        span.record("rpc.grpc.status_code", code as i64);
        if is_server_error(code) {
            span.record("otel.status_code", "error");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_trace_context_headers() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let carrier = MetadataExtractor(&headers);
        assert_eq!(
            carrier.get("traceparent"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(carrier.keys(), vec!["traceparent"]);
        assert_eq!(carrier.get("tracestate"), None);
    }

    #[test]
    fn only_the_servers_own_failures_are_errors() {
        assert!(is_server_error(Code::Internal));
        assert!(is_server_error(Code::DeadlineExceeded));
        assert!(!is_server_error(Code::InvalidArgument));
        assert!(!is_server_error(Code::NotFound));
        assert!(!is_server_error(Code::Ok));
    }
}
