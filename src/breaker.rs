//! Health of a storage backend (the catalog, the blob store) as seen by its
//! callers: a circuit breaker. After `failures_to_open` consecutive
//! connection-level failures the breaker opens and every call is refused at
//! once, naming the backend and the last cause, instead of each paying the
//! backend's own timeout; a probe (run by [`BackendGuard::watch`]) tries
//! the backend every `probe_every` and closes the breaker as soon as it
//! answers. Errors that are about the request (a missing row, a conflict)
//! say the backend is up. The state is published as the gauge
//! `weightgen_backend_up{backend}`, failures as
//! `weightgen_backend_errors_total{backend}`, and to subscribers (health).
//!
//! A call made while serving a request with a deadline ([`with_call_deadline`])
//! waits for the backend only until shortly before that deadline
//! ([`call_budget`]), so the client hears UNAVAILABLE naming the backend
//! instead of its own DEADLINE_EXCEEDED. Such a wait cut short by the
//! caller's deadline says nothing about the backend and is not counted: a
//! client with a 50 ms deadline must not open the breaker for everyone.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// Consecutive connection failures that open a breaker, by default.
pub const DEFAULT_FAILURES_TO_OPEN: u32 = 3;
/// How often an open breaker probes its backend, by default.
pub const DEFAULT_PROBE_EVERY: Duration = Duration::from_secs(1);

/// When a breaker opens and how it looks for the backend's return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive connection-level failures that open it (at least 1).
    pub failures_to_open: u32,
    /// Interval between probes while it is open.
    pub probe_every: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures_to_open: DEFAULT_FAILURES_TO_OPEN,
            probe_every: DEFAULT_PROBE_EVERY,
        }
    }
}

/// What one call said about the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered (successfully or with a request-level error).
    Answered,
    /// The backend could not be reached or did not answer; the cause.
    Unreachable(String),
}

/// A call refused because the breaker is open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {backend} is unavailable ({cause}); retry later")]
pub struct Unavailable {
    /// "catalog" or "blob store".
    pub backend: &'static str,
    /// The last failure seen.
    pub cause: String,
}

tokio::task_local! {
    /// The deadline of the request the current task is serving.
    static CALL_DEADLINE: CallDeadline;
}

/// When the request being served must be answered, and why then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallDeadline {
    /// The instant.
    pub at: tokio::time::Instant,
    /// The time the call was given.
    pub timeout: Duration,
    /// Whose limit it is, e.g. "the client's grpc-timeout".
    pub whose: &'static str,
}

/// The part of a call's remaining time kept for answering it (so the
/// answer reaches the client before its deadline), at most this much.
const ANSWER_MARGIN_MAX: Duration = Duration::from_millis(250);

/// Runs `work` as the serving of a request due at `deadline`: backend waits
/// inside it end before then ([`call_budget`]).
pub async fn with_call_deadline<F: Future>(deadline: tokio::time::Instant, work: F) -> F::Output {
    let call = CallDeadline {
        at: deadline,
        timeout: deadline.saturating_duration_since(tokio::time::Instant::now()),
        whose: "the call's deadline",
    };
    with_described_deadline(call, work).await
}

/// [`with_call_deadline`] with what the deadline is, for messages.
pub async fn with_described_deadline<F: Future>(deadline: CallDeadline, work: F) -> F::Output {
    CALL_DEADLINE.scope(deadline, work).await
}

/// The deadline of the request the current task is serving, if any.
pub fn call_deadline() -> Option<CallDeadline> {
    CALL_DEADLINE.try_with(|deadline| *deadline).ok()
}

/// How long a backend wait may last inside the current request: its
/// remaining time less a tenth (at most 250 ms) for the answer. None outside
/// a request with a deadline (workers, the CLI).
pub fn call_budget() -> Option<Duration> {
    CALL_DEADLINE
        .try_with(|deadline| {
            let left = deadline
                .at
                .saturating_duration_since(tokio::time::Instant::now());
            left.saturating_sub((left / 10).min(ANSWER_MARGIN_MAX))
        })
        .ok()
}

#[derive(Debug)]
struct State {
    consecutive_failures: u32,
    open: bool,
    last_cause: String,
}

/// One backend's breaker, shared by every caller.
#[derive(Debug, Clone)]
pub struct BackendGuard {
    backend: &'static str,
    /// Where the backend is, credentials removed ("" when not given).
    location: Arc<str>,
    /// `backend` as a metric label ("blob_store").
    label: String,
    config: BreakerConfig,
    state: Arc<Mutex<State>>,
    up: Arc<watch::Sender<bool>>,
}

impl BackendGuard {
    /// A closed breaker for `backend` ("catalog", "blob store").
    pub fn new(backend: &'static str, config: BreakerConfig) -> Self {
        let label = backend.replace(' ', "_");
        metrics::gauge!("weightgen_backend_up", "backend" => label.clone()).set(1.0);
        Self {
            backend,
            location: Arc::from(""),
            label,
            config: BreakerConfig {
                failures_to_open: config.failures_to_open.max(1),
                ..config
            },
            state: Arc::new(Mutex::new(State {
                consecutive_failures: 0,
                open: false,
                last_cause: String::new(),
            })),
            up: Arc::new(watch::channel(true).0),
        }
    }

    /// Names where the backend is (no credentials) in the messages the
    /// guard writes itself.
    pub fn at(mut self, location: impl Into<String>) -> Self {
        self.location = Arc::from(location.into());
        self
    }

    /// The backend's name in messages and metrics.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Whether calls are let through (the breaker is closed).
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// A receiver that sees every open and close.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// Refuses at once while the breaker is open.
    pub fn admit(&self) -> Result<(), Unavailable> {
        let state = self.lock();
        if state.open {
            Err(Unavailable {
                backend: self.backend,
                cause: state.last_cause.clone(),
            })
        } else {
            Ok(())
        }
    }

    /// Records what a call said about the backend.
    pub fn record(&self, outcome: Outcome) {
        let mut state = self.lock();
        match outcome {
            Outcome::Answered => {
                state.consecutive_failures = 0;
                if state.open {
                    state.open = false;
                    drop(state);
                    tracing::info!(backend = self.backend, "backend is back; breaker closed");
                    self.publish(true);
                }
            }
            Outcome::Unreachable(cause) => {
                metrics::counter!("weightgen_backend_errors_total", "backend" => self.label.clone())
                    .increment(1);
                state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                state.last_cause = cause;
                if !state.open && state.consecutive_failures >= self.config.failures_to_open {
                    state.open = true;
                    let cause = state.last_cause.clone();
                    drop(state);
                    tracing::warn!(
                        backend = self.backend,
                        %cause,
                        "backend unreachable; breaker open, calls refused until a probe succeeds"
                    );
                    self.publish(false);
                }
            }
        }
    }

    /// Runs `call` unless the breaker is open, recording its outcome as
    /// `classify` reads its error. Inside a request with a deadline the
    /// call is given up shortly before it (see the module doc), answered
    /// as `refused` and not recorded.
    pub async fn run<T, E>(
        &self,
        call: impl Future<Output = Result<T, E>>,
        classify: impl Fn(&E) -> Option<String>,
        refused: impl Fn(Unavailable) -> E,
    ) -> Result<T, E> {
        self.admit().map_err(&refused)?;
        let result = match call_budget() {
            None => call.await,
            Some(budget) => match tokio::time::timeout(budget, call).await {
                Ok(result) => result,
                Err(_) => {
                    return Err(refused(Unavailable {
                        backend: self.backend,
                        cause: format!(
                            "{}{}no answer within the {} the call's deadline left for it",
                            self.location,
                            if self.location.is_empty() { "" } else { ": " },
                            humantime::format_duration(rounded_to_millis(budget))
                        ),
                    }));
                }
            },
        };
        match &result {
            Err(error) => match classify(error) {
                Some(cause) => self.record(Outcome::Unreachable(cause)),
                None => self.record(Outcome::Answered),
            },
            Ok(_) => self.record(Outcome::Answered),
        }
        result
    }

    /// Probes the backend with `probe` every `probe_every` while the breaker
    /// is open, until `stop` resolves. Spawn it once per guard.
    pub async fn watch<F, Fut>(self, probe: F, stop: impl Future<Output = ()>)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Outcome>,
    {
        tokio::pin!(stop);
        let mut ticks = tokio::time::interval(self.config.probe_every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = ticks.tick() => {}
            }
            if self.is_up() {
                continue;
            }
            let outcome = tokio::select! {
                _ = &mut stop => return,
                outcome = probe() => outcome,
            };
            // A failed probe only refreshes the cause and the gauge (kept
            // true even if something else wrote it): the breaker is open.
            if let Outcome::Unreachable(cause) = &outcome {
                self.lock().last_cause.clone_from(cause);
                self.set_gauge(false);
            } else {
                self.record(outcome);
            }
        }
    }

    fn publish(&self, up: bool) {
        self.set_gauge(up);
        self.up.send_replace(up);
    }

    fn set_gauge(&self, up: bool) {
        let value = if up { 1.0 } else { 0.0 };
        metrics::gauge!("weightgen_backend_up", "backend" => self.label.clone()).set(value);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn rounded_to_millis(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// Resolves once the last strong reference behind `weak` is dropped: the
/// stop signal of a probe that should live as long as what it watches.
pub async fn dropped<T: ?Sized>(weak: std::sync::Weak<T>) {
    while weak.strong_count() > 0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(failures: u32) -> BackendGuard {
        BackendGuard::new(
            "catalog",
            BreakerConfig {
                failures_to_open: failures,
                probe_every: Duration::from_millis(10),
            },
        )
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let g = guard(3);
        g.record(Outcome::Unreachable("refused".into()));
        g.record(Outcome::Unreachable("refused".into()));
        g.record(Outcome::Answered);
        g.record(Outcome::Unreachable("refused".into()));
        g.record(Outcome::Unreachable("refused".into()));
        assert!(g.admit().is_ok(), "the answer in between reset the count");
        g.record(Outcome::Unreachable("connection refused".into()));
        let refused = g.admit().unwrap_err();
        assert_eq!(
            refused.to_string(),
            "the catalog is unavailable (connection refused); retry later"
        );
        assert!(!g.is_up());
    }

    #[tokio::test]
    async fn a_probe_closes_it_and_subscribers_see_both_changes() {
        let g = guard(1);
        let mut seen = g.subscribe();
        let result: Result<(), String> = g
            .run(
                async { Err("io".to_owned()) },
                |e| Some(e.clone()),
                |u| u.to_string(),
            )
            .await;
        assert_eq!(result.unwrap_err(), "io");
        seen.changed().await.unwrap();
        assert!(!*seen.borrow_and_update());
        // Refused without running the call.
        let ran = std::sync::atomic::AtomicBool::new(false);
        let result: Result<(), String> = g
            .run(
                async {
                    ran.store(true, std::sync::atomic::Ordering::SeqCst);
                    Ok(())
                },
                |e: &String| Some(e.clone()),
                |u| u.to_string(),
            )
            .await;
        assert_eq!(
            result.unwrap_err(),
            "the catalog is unavailable (io); retry later"
        );
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        // The first probe fails (the cause is refreshed), the second answers.
        let probes = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = probes.clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let watcher = tokio::spawn(g.clone().watch(
            move || {
                let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    if n == 0 {
                        Outcome::Unreachable("still down".into())
                    } else {
                        Outcome::Answered
                    }
                }
            },
            async {
                let _ = stop_rx.await;
            },
        ));
        seen.changed().await.unwrap();
        assert!(*seen.borrow());
        assert!(g.admit().is_ok());
        assert!(probes.load(std::sync::atomic::Ordering::SeqCst) >= 2);
        stop_tx.send(()).unwrap();
        watcher.await.unwrap();
    }

    #[tokio::test]
    async fn a_wait_ends_before_the_callers_deadline_without_opening_the_breaker() {
        let g = guard(1).at("postgres://db:5432/weightgen");
        for _ in 0..3 {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(400);
            let result: Result<(), String> = with_call_deadline(
                deadline,
                g.run(
                    std::future::pending(),
                    |e: &String| Some(e.clone()),
                    |u| u.to_string(),
                ),
            )
            .await;
            let message = result.unwrap_err();
            assert!(
                message.starts_with(
                    "the catalog is unavailable (postgres://db:5432/weightgen: no answer within"
                ) && message.ends_with("the call's deadline left for it); retry later"),
                "{message}"
            );
            // Answered before the deadline, with the margin kept for the answer.
            assert!(tokio::time::Instant::now() < deadline);
        }
        // Cut short by the caller, not failed by the backend: still closed.
        assert!(g.is_up());
        // Outside a request there is no budget.
        assert_eq!(call_budget(), None);
        let inside = with_call_deadline(
            tokio::time::Instant::now() + Duration::from_secs(10),
            async { call_budget() },
        )
        .await
        .unwrap();
        assert!(inside > Duration::from_millis(9_700) && inside <= Duration::from_millis(9_750));
    }

    #[test]
    fn request_level_errors_keep_it_closed() {
        let g = guard(1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let result: Result<(), &str> =
            rt.block_on(g.run(async { Err("not found") }, |_| None, |_| "refused"));
        assert_eq!(result.unwrap_err(), "not found");
        assert!(g.admit().is_ok());
    }
}
