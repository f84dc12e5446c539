//! A response body wrapper that reports how a call ended: the gRPC status of
//! its trailers, or that the client went away first.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Trailers (or trailers-only headers) carried this status.
    Status(Code),
    /// The body ended without a status (an HTTP-level error).
    NoStatus,
    /// The body was dropped before it ended: the client left or the
    /// connection broke.
    Abandoned,
}

impl BodyEnd {
    /// The call's status: `header_code` (a trailers-only response carries
    /// it in its headers) or else how the body ended; a body that ended
    /// without a status is UNKNOWN, one dropped early CANCELLED.
    pub fn code(self, header_code: Option<Code>) -> Code {
        header_code.unwrap_or(match self {
            Self::Status(code) => code,
            Self::NoStatus => Code::Unknown,
            Self::Abandoned => Code::Cancelled,
        })
    }
}

/// Called once, when the body ends or is dropped.
pub type OnEnd = Box<dyn FnOnce(BodyEnd) + Send + Sync>;

pin_project! {
    /// Wraps a response body and calls its `OnEnd` exactly once.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        on_end: Option<OnEnd>,
    }

    impl<B> PinnedDrop for ObservedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(on_end) = this.project().on_end.take() {
                on_end(BodyEnd::Abandoned);
            }
        }
    }
}

impl<B> ObservedBody<B> {
    /// Observes `inner`; `on_end` runs when it ends.
    pub fn new(inner: B, on_end: OnEnd) -> Self {
        Self {
            inner,
            on_end: Some(on_end),
        }
    }
}

impl<B: Default> Default for ObservedBody<B> {
    /// An empty body nobody observes (for a layer that answers a call
    /// itself, in front of one that observes bodies).
    fn default() -> Self {
        Self::new(B::default(), Box::new(|_| {}))
    }
}

/// The `grpc-status` of a header or trailer map.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok())
        .map(Code::from_i32)
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        let end = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|t| grpc_status(t).map_or(BodyEnd::NoStatus, BodyEnd::Status)),
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => Some(BodyEnd::NoStatus),
            Poll::Pending => None,
        };
        if let Some(end) = end
            && let Some(on_end) = this.on_end.take()
        {
            on_end(end);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn recorder() -> (Arc<Mutex<Vec<BodyEnd>>>, OnEnd) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        (seen, Box::new(move |end| sink.lock().unwrap().push(end)))
    }

    #[test]
    fn dropped_body_reports_abandoned_once() {
        let (seen, on_end) = recorder();
        drop(ObservedBody::new(tonic::body::Body::empty(), on_end));
        assert_eq!(*seen.lock().unwrap(), vec![BodyEnd::Abandoned]);
    }

    #[test]
    fn reads_grpc_status_headers() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-status", "8".parse().unwrap());
        assert_eq!(grpc_status(&headers), Some(Code::ResourceExhausted));
    }
}
