//! Bearer-token authentication with three roles, and the audit log.
//!
//! With `--auth-tokens FILE` every call but health and reflection (unless
//! `--auth-health`) must carry `authorization: Bearer TOKEN`. The file holds
//! one token per line, `NAME ROLE sha256:HEX` — the SHA-256 of the token, so
//! the file (a Kubernetes Secret) never holds a usable token — with `#`
//! comments. Roles nest: `read` (metadata, catalog and job reads), `generate`
//! (also GenerateInit), `admin` (also uploads, activation, job submission and
//! cancellation). A missing or unknown token is UNAUTHENTICATED, a token
//! without the method's role PERMISSION_DENIED. Optional further fields are
//! the token's quotas per one-minute window: `600/min` or `calls=600/min`
//! (calls), `samples=5000/min` (samples GenerateInit draws for it); past one,
//! calls are RESOURCE_EXHAUSTED naming the quota until the window turns.
//! Tokens are never logged and
//! never become metric labels: calls are counted by token *name*
//! (`weightgen_calls_by_token_total`). Every mutating call, allowed or not,
//! writes one line to the tracing target `audit`: who, which method, outcome.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;

use tonic::{Code, Status};
use tower::{Layer, Service};

use super::body::{ObservedBody, grpc_status};
use crate::blobs::sha256_hex;

/// What a token may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Metadata, catalog and job reads, health.
    Read,
    /// Also GenerateInit.
    Generate,
    /// Also uploads, activation, job submission and cancellation.
    Admin,
}

impl Role {
    /// The role's name in the token file and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Generate => "generate",
            Self::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::Read, Self::Generate, Self::Admin]
            .into_iter()
            .find(|r| r.name() == text)
    }
}

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file cannot be read.
    #[error("--auth-tokens {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is malformed (the message names the line, never its hash).
    #[error("--auth-tokens {path}, line {line}: {reason}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// No token in the file: every call would be refused.
    #[error("--auth-tokens {0}: the file names no token")]
    Empty(PathBuf),
}

/// A known token's name and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name (safe to log and to use as a metric label).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Calls it may make per minute (None: no quota).
    pub calls_per_minute: Option<u32>,
    /// Samples GenerateInit may draw for it per minute (None: no quota).
    pub samples_per_minute: Option<u32>,
}

/// The tokens the server accepts, by the SHA-256 of the token.
#[derive(Debug, Clone, Default)]
pub struct Tokens(HashMap<String, Caller>);

impl Tokens {
    /// Reads a token file (`NAME ROLE sha256:HEX` per line).
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
            .map_err(|(line, reason)| AuthError::Line {
                path: path.to_owned(),
                line,
                reason,
            })
            .and_then(|tokens| match tokens.0.is_empty() {
                true => Err(AuthError::Empty(path.to_owned())),
                false => Ok(tokens),
            })
    }

    /// Parses a token file's text; errors carry the 1-based line.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut tokens = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let &[name, role, hash, ref quotas @ ..] = fields.as_slice() else {
                return Err((
                    i + 1,
                    "expected NAME ROLE sha256:HEX [CALLS/min] [samples=N/min]".into(),
                ));
            };
            let (mut calls_per_minute, mut samples_per_minute) = (None, None);
            for text in quotas {
                let (slot, amount) = match text.split_once('=') {
                    None => (&mut calls_per_minute, *text),
                    Some(("calls", amount)) => (&mut calls_per_minute, amount),
                    Some(("samples", amount)) => (&mut samples_per_minute, amount),
                    Some(_) => (&mut calls_per_minute, ""),
                };
                let limit = amount
                    .strip_suffix("/min")
                    .and_then(|n| n.parse::<u32>().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| {
                        (
                            i + 1,
                            format!(
                                "quota {text:?}: expected calls per minute (600/min or calls=600/min) or samples=N/min"
                            ),
                        )
                    })?;
                if slot.replace(limit).is_some() {
                    return Err((i + 1, format!("quota {text:?}: given twice")));
                }
            }
            let valid_name = name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !valid_name {
                return Err((
                    i + 1,
                    "the name must be 1 to 64 letters, digits, '.', '_' or '-'".into(),
                ));
            }
            let role = Role::parse(role).ok_or_else(|| {
                (
                    i + 1,
                    format!("role {role:?}: expected read, generate or admin"),
                )
            })?;
            let hex = hash
                .strip_prefix("sha256:")
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| {
                    (
                        i + 1,
                        "the token must be given as sha256:<64 hex digits> (its SHA-256, not the token)"
                            .to_owned(),
                    )
                })?;
            if !names.insert(name.to_owned()) {
                return Err((i + 1, format!("the name {name:?} is used twice")));
            }
            let caller = Caller {
                name: name.to_owned(),
                role,
                calls_per_minute,
                samples_per_minute,
            };
            if tokens.insert(hex.to_ascii_lowercase(), caller).is_some() {
                return Err((i + 1, "the same token is listed twice".into()));
            }
        }
        Ok(Self(tokens))
    }

    /// Tokens in the file.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the file holds none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The caller a presented token belongs to.
    pub fn caller(&self, token: &str) -> Option<&Caller> {
        self.0.get(&sha256_hex(token.as_bytes()))
    }
}

/// The role a method needs: None for health and reflection when they are
/// open.
pub fn required_role(path: &str, open_health: bool) -> Option<Role> {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    match (service, method) {
        ("grpc.health.v1.Health", _)
        | ("grpc.reflection.v1.ServerReflection", _)
        | ("grpc.reflection.v1alpha.ServerReflection", _)
            if open_health =>
        {
            None
        }
        ("weightgen.v1.GenerationService", "GenerateInit") => Some(Role::Generate),
        ("weightgen.v1.CatalogService", "UploadCheckpoint" | "ActivateDenoiser")
        | ("weightgen.v1.JobService", "SubmitJob" | "CancelJob") => Some(Role::Admin),
        _ => Some(Role::Read),
    }
}

/// The token file as the server last read it: replaced when the file
/// changes and parses, kept when a change does not parse (a typo must not
/// lock every client out).
pub type TokenSource = watch::Receiver<Arc<Tokens>>;

/// Reads `path` every `every` and publishes its tokens when its text
/// changed and parses; stops once every receiver is gone. Needs a Tokio
/// runtime.
pub fn watch_token_file(path: PathBuf, initial: Tokens, every: Duration) -> TokenSource {
    let paths = vec![path.clone()];
    super::reload::watch_files("token file", paths, initial, every, move || {
        Tokens::load(&path)
    })
}

/// What a quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metered {
    /// Calls of any method.
    Calls,
    /// Samples GenerateInit draws.
    Samples,
}

impl Metered {
    fn name(self) -> &'static str {
        match self {
            Self::Calls => "calls",
            Self::Samples => "samples",
        }
    }

    fn limit(self, caller: &Caller) -> Option<u32> {
        match self {
            Self::Calls => caller.calls_per_minute,
            Self::Samples => caller.samples_per_minute,
        }
    }
}

/// What each token used in its current one-minute windows, shared by the
/// auth layer (calls) and GenerateInit (samples).
#[derive(Debug, Clone, Default)]
pub struct Quotas(Arc<std::sync::Mutex<HashMap<(String, Metered), Window>>>);

/// What a token used in the current one-minute window.
#[derive(Debug, Clone, Copy)]
struct Window {
    started: std::time::Instant,
    used: u64,
}

/// Length of a quota window.
const QUOTA_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl Quotas {
    /// Counts `amount` of `what` against `caller`'s quota; the status
    /// refusing it (nothing counted) when it does not fit the current window.
    pub fn spend(&self, caller: &Caller, what: Metered, amount: u64) -> Result<(), Status> {
        let Some(limit) = what.limit(caller) else {
            return Ok(());
        };
        let now = std::time::Instant::now();
        let mut windows = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let window = windows
            .entry((caller.name.clone(), what))
            .or_insert(Window {
                started: now,
                used: 0,
            });
        if now.duration_since(window.started) >= QUOTA_WINDOW {
            *window = Window {
                started: now,
                used: 0,
            };
        }
        let (name, unit) = (&caller.name, what.name());
        if amount > u64::from(limit) {
            return Err(Status::resource_exhausted(format!(
                "token {name:?} asks for {amount} {unit} at once, more than its quota of {limit} {unit} per minute"
            )));
        }
        if window.used + amount > u64::from(limit) {
            let wait = QUOTA_WINDOW.saturating_sub(now.duration_since(window.started));
            return Err(Status::resource_exhausted(format!(
                "token {name:?} is over its quota of {limit} {unit} per minute ({} used); retry in {} s",
                window.used,
                wait.as_secs().max(1)
            )));
        }
        window.used += amount;
        Ok(())
    }
}

/// How calls are authenticated. An authenticated call carries its
/// [`Caller`] in the request's extensions (for the sample quota).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    tokens: Option<TokenSource>,
    open_health: bool,
    quotas: Quotas,
}

impl AuthLayer {
    /// Checks tokens against `tokens` (as they are at each call); `None`
    /// lets every call through (no `--auth-tokens`), still writing the
    /// audit log. Call quotas are counted in `quotas`.
    pub fn new(tokens: Option<TokenSource>, open_health: bool, quotas: Quotas) -> Self {
        Self {
            tokens,
            open_health,
            quotas,
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.clone(),
        }
    }
}

/// The service built by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: AuthLayer,
}

/// The caller of `headers`' bearer token, or the status refusing it.
fn authenticate<'t>(tokens: &'t Tokens, headers: &http::HeaderMap) -> Result<&'t Caller, Status> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Err(Status::unauthenticated(
            "missing credentials: send the metadata \"authorization: Bearer <token>\"",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization: expected \"Bearer <token>\""))?;
    tokens
        .caller(token)
        .ok_or_else(|| Status::unauthenticated("authorization: unknown token"))
}

fn audit(caller: &str, method: &str, code: Code) {
    tracing::info!(
        target: "audit",
        caller,
        method,
        outcome = super::grpc_metrics::code_name(code),
        "mutating call"
    );
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AuthService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let needed = required_role(&path, self.auth.open_health);
        let mutating = needed == Some(Role::Admin);
        let tokens = self.auth.tokens.as_ref().map(|rx| rx.borrow().clone());
        let checked = match (&tokens, needed) {
            (None, _) | (_, None) => Ok(None),
            (Some(tokens), Some(role)) => authenticate(tokens, request.headers()).and_then(|c| {
                if c.role >= role {
                    self.auth.quotas.spend(c, Metered::Calls, 1)?;
                    Ok(Some(c))
                } else {
                    Err(Status::permission_denied(format!(
                        "token {:?} has the role {}; {path} needs {}",
                        c.name,
                        c.role.name(),
                        role.name()
                    )))
                }
            }),
        };
        let name = match &checked {
            Ok(Some(caller)) => caller.name.clone(),
            Ok(None) if tokens.is_some() => "open".to_owned(),
            Ok(None) => "anonymous".to_owned(),
            Err(_) => "refused".to_owned(),
        };
        metrics::counter!("weightgen_calls_by_token_total", "token" => name.clone()).increment(1);
        if let Err(status) = checked {
            tracing::warn!(%path, code = ?status.code(), "call refused: {}", status.message());
            if mutating {
                audit(&name, &path, status.code());
            }
            let response = status.into_http::<ObservedBody<ResBody>>();
            return Box::pin(async move { Ok(response) });
        }
        if let Ok(Some(caller)) = checked {
            request.extensions_mut().insert(caller.clone());
        }
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            let header_code = grpc_status(response.headers());
            Ok(response.map(|body| {
                ObservedBody::new(
                    body,
                    Box::new(move |end| {
                        if mutating {
                            audit(&name, &path, end.code(header_code));
                        }
                    }),
                )
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_quotas_count_amounts_and_refuse_what_does_not_fit() {
        let caller = Caller {
            name: "batch".into(),
            role: Role::Generate,
            calls_per_minute: None,
            samples_per_minute: Some(10),
        };
        let quotas = Quotas::default();
        quotas.spend(&caller, Metered::Samples, 6).unwrap();
        let err = quotas.spend(&caller, Metered::Samples, 5).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(
            err.message()
                .contains("quota of 10 samples per minute (6 used)"),
            "{}",
            err.message()
        );
        // A refusal counts nothing: what fits still fits.
        quotas.spend(&caller, Metered::Samples, 4).unwrap();
        let err = quotas.spend(&caller, Metered::Samples, 64).unwrap_err();
        assert!(
            err.message().contains("64 samples at once"),
            "{}",
            err.message()
        );
        // No call quota: calls are not limited.
        for _ in 0..100 {
            quotas.spend(&caller, Metered::Calls, 1).unwrap();
        }
    }

    #[test]
    fn token_files_are_parsed_and_bad_lines_named() {
        let admin = sha256_hex(b"s3cret-admin");
        let text = format!(
            "# name role hash\nops admin sha256:{admin}\n\nbatch generate sha256:{}  # CI\n",
            sha256_hex(b"gen")
        );
        let tokens = Tokens::parse(&text).unwrap();
        assert_eq!(
            tokens.caller("s3cret-admin"),
            Some(&Caller {
                name: "ops".into(),
                role: Role::Admin,
                calls_per_minute: None,
                samples_per_minute: None,
            })
        );
        assert_eq!(tokens.caller("gen").map(|c| c.role), Some(Role::Generate));
        let limited = Tokens::parse(&format!("ci generate sha256:{admin} 600/min")).unwrap();
        assert_eq!(
            limited.caller("s3cret-admin").unwrap().calls_per_minute,
            Some(600)
        );
        let both = Tokens::parse(&format!(
            "ci generate sha256:{admin} samples=5000/min calls=60/min"
        ))
        .unwrap();
        let caller = both.caller("s3cret-admin").unwrap();
        assert_eq!(
            (caller.calls_per_minute, caller.samples_per_minute),
            (Some(60), Some(5000))
        );
        for quota in [
            "600",
            "0/min",
            "x/min",
            "600/s",
            "bytes=5/min",
            "samples=0/min",
            "60/min calls=60/min",
        ] {
            let (line, reason) =
                Tokens::parse(&format!("ci read sha256:{admin} {quota}")).unwrap_err();
            assert_eq!(line, 1);
            assert!(
                reason.contains("calls per minute") || reason.contains("given twice"),
                "{quota}: {reason}"
            );
        }
        assert_eq!(tokens.caller("s3cret-admin "), None);
        let bad = [
            ("x admin", 1),
            ("x owner sha256:00", 1),
            (&format!("x read {admin}") as &str, 1),
            (
                &format!(
                    "ok read sha256:{admin}\nbad/name read sha256:{}",
                    sha256_hex(b"a")
                ),
                2,
            ),
            (&format!("a read sha256:{admin}\nb read sha256:{admin}"), 2),
            (
                &format!("a read sha256:{admin}\na read sha256:{}", sha256_hex(b"b")),
                2,
            ),
        ];
        for (text, line) in bad {
            let (at, reason) = Tokens::parse(text).unwrap_err();
            assert_eq!(at, line, "{text}: {reason}");
            assert!(
                !reason.contains(&admin),
                "the hash is never echoed: {reason}"
            );
        }
    }

    /// A log sink the test reads back.
    #[derive(Clone, Default)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn mutating_calls_are_audited_with_caller_and_outcome_and_reads_are_not() {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let tokens = Tokens::parse(&format!("ops admin sha256:{}\n", sha256_hex(b"t"))).unwrap();
        let inner = tower::service_fn(|_: http::Request<()>| async {
            let mut response = http::Response::new(String::new());
            response
                .headers_mut()
                .insert("grpc-status", "0".parse().unwrap());
            Ok::<_, std::convert::Infallible>(response)
        });
        let source = watch::channel(Arc::new(tokens)).1;
        let mut service = AuthLayer::new(Some(source), true, Quotas::default()).layer(inner);
        let call = |path: &str, token: Option<&str>| {
            let mut request = http::Request::builder().uri(path);
            if let Some(token) = token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            request.body(()).unwrap()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            for (path, token) in [
                ("/weightgen.v1.JobService/SubmitJob", Some("t")),
                ("/weightgen.v1.JobService/CancelJob", None),
                ("/weightgen.v1.CatalogService/ListZooModels", Some("t")),
            ] {
                // The body ends (here: is dropped) before the line is written.
                drop(service.call(call(path, token)).await.unwrap());
            }
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let audit: Vec<&str> = text.lines().filter(|l| l.contains("\"audit\"")).collect();
        assert_eq!(audit.len(), 2, "{text}");
        assert!(
            audit[0].contains("\"caller\":\"ops\"")
                && audit[0].contains("SubmitJob")
                && audit[0].contains("\"outcome\":\"OK\""),
            "{}",
            audit[0]
        );
        assert!(
            audit[1].contains("\"caller\":\"refused\"")
                && audit[1].contains("CancelJob")
                && audit[1].contains("\"outcome\":\"UNAUTHENTICATED\""),
            "{}",
            audit[1]
        );
        // Neither the token nor its hash is ever logged.
        assert!(
            !text.contains(&sha256_hex(b"t")) && !text.contains("Bearer t"),
            "{text}"
        );
    }

    #[test]
    fn methods_need_their_role_and_roles_nest() {
        let role = |p| required_role(p, true);
        assert_eq!(
            role("/weightgen.v1.GenerationService/GenerateInit"),
            Some(Role::Generate)
        );
        assert_eq!(
            role("/weightgen.v1.GenerationService/ServerMetadata"),
            Some(Role::Read)
        );
        for admin in [
            "/weightgen.v1.CatalogService/UploadCheckpoint",
            "/weightgen.v1.CatalogService/ActivateDenoiser",
            "/weightgen.v1.JobService/SubmitJob",
            "/weightgen.v1.JobService/CancelJob",
        ] {
            assert_eq!(role(admin), Some(Role::Admin), "{admin}");
        }
        assert_eq!(role("/weightgen.v1.JobService/ListJobs"), Some(Role::Read));
        assert_eq!(role("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            required_role("/grpc.health.v1.Health/Check", false),
            Some(Role::Read)
        );
        assert_eq!(role("/unknown/Path"), Some(Role::Read));
        assert!(Role::Admin > Role::Generate && Role::Generate > Role::Read);
    }
}
