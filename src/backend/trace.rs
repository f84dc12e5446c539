//! The trace of one request on the model thread: a `queue` span from its
//! arrival to its first denoiser pass, then a `sampling` span until it
//! ends, both children of the call's span (`crate::serve::trace_context`),
//! so an exported trace shows where a call's time went.

use tracing::Span;

use super::{GenerationSummary, ModelError};

/// A request's spans; dropping it closes the open one.
pub(super) struct RequestTrace {
    call: Span,
    queue: Option<Span>,
    sampling: Option<Span>,
}

impl RequestTrace {
    /// A request of `samples` samples on denoiser `denoiser` starts
    /// waiting, under the current span (the call's).
    pub(super) fn arrive(denoiser: &str, samples: usize) -> Self {
        let call = Span::current();
        let queue = tracing::info_span!(
            parent: &call,
            "queue",
            denoiser,
            samples = samples as i64,
            otel.status_code = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        Self {
            call,
            queue: Some(queue),
            sampling: None,
        }
    }

    /// Its first samples joined a pass: the wait ends, sampling begins.
    /// Later cohorts of the same request change nothing.
    pub(super) fn first_pass(&mut self) {
        if self.sampling.is_some() {
            return;
        }
        self.queue = None;
        self.sampling = Some(tracing::info_span!(
            parent: &self.call,
            "sampling",
            batch_size = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            error = tracing::field::Empty,
        ));
    }

    /// Records how the request ended on the span open now, and that it
    /// ends now (an exported span ends when it was last exited; entering it
    /// here keeps its end before the call's, whatever the thread that
    /// drops it last).
    pub(super) fn end(&self, result: &Result<GenerationSummary, ModelError>) {
        let Some(open) = self.sampling.as_ref().or(self.queue.as_ref()) else {
            return;
        };
        let _entered = open.enter();
        match result {
            Ok(summary) => {
                open.record("batch_size", summary.batch_size as i64);
            }
            Err(e) => {
                open.record("otel.status_code", "error");
                open.record("error", tracing::field::display(e));
            }
        }
    }
}
