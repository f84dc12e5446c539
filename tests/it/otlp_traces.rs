//! Traces over OTLP, as a tracing backend receives them: the worker's zoo
//! build and training, and a GenerateInit call that carries a W3C
//! `traceparent`, exported by the real binaries to a collector in the test.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio_stream::StreamExt;
use weightgen::proto::v1::{GenerateInitRequest, SamplingOptions};

use crate::common::generation::{Client, WORKER, descriptor, wait_ready};
use crate::common::{ServerProcess, combined_output};

const SERVER: &str = env!("CARGO_BIN_EXE_weightgen-server");
const CLI: &str = env!("CARGO_BIN_EXE_weightgen");

/// An OTLP trace collector: every span it is sent, with its service's name.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start() -> (Self, SocketAddr) {
        let collector = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (collector, addr)
    }

    fn of(&self, service: &str) -> Vec<Span> {
        let spans = self.spans.lock().unwrap();
        spans
            .iter()
            .filter(|(s, _)| s == service)
            .map(|(_, span)| span.clone())
            .collect()
    }
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.clone())
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn worker_traced(data: &Path, endpoint: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(WORKER)
        .args(["--log-format", "json", "--otlp-endpoint", endpoint])
        .args(args)
        .env("WEIGHTGEN_DATA_DIR", data)
        .output()
        .unwrap();
    (output.status.success(), combined_output(&output))
}

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_trace_continues_through_queue_sampling_and_streaming_and_the_worker_is_traced() {
    let (collector, collector_addr) = Collector::start().await;
    let endpoint = format!("http://{collector_addr}");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    // The worker: a zoo and a denoiser, each command exporting its spans.
    let zoo = [
        "zoo",
        "build",
        "--family",
        "digits",
        "--models",
        "12",
        "--shared-init",
        "--steps",
        "20",
    ];
    // A bad endpoint is refused before any work.
    let (ok, text) = worker_traced(&data, "ftp://collector", &zoo);
    assert!(!ok && text.contains("invalid --otlp-endpoint"), "{text}");
    assert!(!data.exists(), "worked despite a bad endpoint");
    let (ok, text) = worker_traced(&data, &endpoint, &zoo);
    assert!(ok, "{text}");
    // The span leaves with the process's last export. Under the whole
    // suite's load it has gone missing now and then (CI logs of stops 41 and
    // 42; never alone): run the command once more, which builds nothing but
    // is traced as well, and keep the first run's log for the failure.
    if named(&collector.of("weightgen-worker"), "zoo.build").is_empty() {
        eprintln!("no zoo.build span after the first run; its log:\n{text}");
        let (ok, again) = worker_traced(&data, &endpoint, &zoo);
        assert!(ok, "{again}");
        assert!(
            !named(&collector.of("weightgen-worker"), "zoo.build").is_empty(),
            "no zoo.build span after two runs; the first's log:\n{text}\nthe second's:\n{again}"
        );
    }
    let train = [
        "train",
        "--zoo",
        "digits",
        "--denoiser-id",
        "digits-traced",
        "--steps",
        "60",
        "--widths",
        "32,16",
        "--eval-tasks",
        "1",
        "--device",
        "cpu",
        "--activate",
    ];
    let (ok, text) = worker_traced(&data, &endpoint, &train);
    assert!(ok, "{text}");
    // A collector that is down costs a traced command nothing but its spans.
    let closed = format!("http://{}", free_addr());
    let started = Instant::now();
    let (ok, text) = worker_traced(&data, &closed, &zoo);
    assert!(ok, "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?} with the collector down",
        started.elapsed()
    );

    let worker_spans = collector.of("weightgen-worker");
    let zoo_builds = named(&worker_spans, "zoo.build");
    assert!(!zoo_builds.is_empty(), "{worker_spans:?}");
    assert_eq!(
        attribute(zoo_builds[0], "zoo"),
        Some(Value::StringValue("digits".into()))
    );
    let trainings = named(&worker_spans, "train.denoiser");
    assert_eq!(trainings.len(), 1, "{worker_spans:?}");
    assert_eq!(
        attribute(trainings[0], "denoiser_id"),
        Some(Value::StringValue("digits-traced".into()))
    );

    // The server, continuing the caller's trace.
    let addr = free_addr();
    let child = Command::new(SERVER)
        .args([
            "--listen",
            &addr,
            "--metrics-listen",
            "off",
            "--device",
            "cpu",
        ])
        .args(["--otlp-endpoint", &endpoint, "--log-format", "json"])
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = ServerProcess(child);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1));
    let channel = {
        let started = Instant::now();
        loop {
            match channel.connect().await {
                Ok(channel) => break channel,
                Err(e) if started.elapsed() < Duration::from_secs(60) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the server did not come up: {e}"),
            }
        }
    };
    let mut client = Client::new(channel);
    wait_ready(&mut client).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let request = |samples| GenerateInitRequest {
        task: Some(descriptor()),
        options: Some(SamplingOptions {
            num_samples: samples,
            seed: Some(5),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut call = tonic::Request::new(request(2));
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let mut stream = client.generate_init(call).await.unwrap().into_inner();
    let mut messages = 0;
    while let Some(message) = stream.next().await {
        message.unwrap();
        messages += 1;
    }
    assert!(messages >= 4, "header, two samples, trailer: {messages}");
    // A call without a trace context starts its own; a refused one is not
    // the server's error.
    let mut untraced = client.generate_init(request(1)).await.unwrap().into_inner();
    while let Some(message) = untraced.next().await {
        message.unwrap();
    }
    let mut bad = request(1);
    bad.task.as_mut().unwrap().embedding = vec![1.0; 3];
    let refused = client.generate_init(bad).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // The CLI hands its caller's trace on (TRACEPARENT, as OpenTelemetry
    // passes a trace to a child process).
    let cli_trace = "0af7651916cd43dd8448eb211c80319c";
    let cli_parent = "b7ad6b7169203331";
    let output = Command::new(CLI)
        .args(["--addr", &addr, "server-info"])
        .env("TRACEPARENT", format!("00-{cli_trace}-{cli_parent}-01"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", combined_output(&output));
    let output = Command::new(CLI)
        .args([
            "--addr",
            &addr,
            "--traceparent",
            "00-not-a-trace-01",
            "server-info",
        ])
        .output()
        .unwrap();
    let text = combined_output(&output);
    assert!(
        !output.status.success() && text.contains("expected 00-<32 hex trace id>"),
        "{text}"
    );

    // A job carries its submitter's trace to the worker that runs it.
    let job_trace = "5b8efff798038103d269b633813fc60c";
    let output = Command::new(CLI)
        .args([
            "--addr",
            &addr,
            "jobs",
            "submit-zoo",
            "--zoo",
            "digits-job",
            "--family",
            "digits",
            "--num-models",
            "2",
            "--steps",
            "5",
        ])
        .env("TRACEPARENT", format!("00-{job_trace}-eee19b7ec3c1b174-01"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", combined_output(&output));

    // SIGTERM: the server drains and exports what it still holds.
    server.stop_with_sigterm(Duration::from_secs(20));
    let (ok, text) = worker_traced(&data, &endpoint, &["run", "--exit-when-idle"]);
    assert!(ok, "{text}");

    let spans = collector.of("weightgen-server");
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let generate_calls = named(&spans, "weightgen.v1.GenerationService/GenerateInit");
    assert_eq!(generate_calls.len(), 3, "{spans:#?}");
    let call = generate_calls
        .iter()
        .find(|s| hex(&s.trace_id) == trace_id)
        .unwrap_or_else(|| panic!("no span of trace {trace_id}: {generate_calls:#?}"));
    assert_eq!(hex(&call.parent_span_id), caller_span);
    assert_eq!(call.kind, SpanKind::Server as i32);
    assert_eq!(
        attribute(call, "rpc.system"),
        Some(Value::StringValue("grpc".into()))
    );
    assert_eq!(
        attribute(call, "rpc.method"),
        Some(Value::StringValue("GenerateInit".into()))
    );
    assert_eq!(
        attribute(call, "rpc.grpc.status_code"),
        Some(Value::IntValue(0))
    );

    let children: HashMap<&str, &Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == call.span_id)
        .map(|s| (s.name.as_str(), s))
        .collect();
    for name in ["queue", "sampling", "stream"] {
        let child = children
            .get(name)
            .unwrap_or_else(|| panic!("no {name:?} span under the call: {spans:#?}"));
        assert_eq!(hex(&child.trace_id), trace_id);
        assert!(
            child.start_time_unix_nano >= call.start_time_unix_nano
                && child.end_time_unix_nano <= call.end_time_unix_nano,
            "{name} outside its call: {:?} vs {:?}",
            (child.start_time_unix_nano, child.end_time_unix_nano),
            (call.start_time_unix_nano, call.end_time_unix_nano)
        );
    }
    let (queue, sampling, stream) = (children["queue"], children["sampling"], children["stream"]);
    assert!(queue.end_time_unix_nano <= sampling.start_time_unix_nano);
    let batch = attribute(sampling, "batch_size");
    assert!(
        matches!(batch, Some(Value::IntValue(n)) if n >= 2),
        "{sampling:#?}"
    );
    assert_eq!(attribute(stream, "sent_samples"), Some(Value::IntValue(2)));

    let submitted = named(&spans, "weightgen.v1.JobService/SubmitJob");
    let submitted = submitted
        .iter()
        .find(|s| hex(&s.trace_id) == job_trace)
        .unwrap_or_else(|| panic!("no SubmitJob span of trace {job_trace}: {spans:#?}"));
    let worker_spans = collector.of("weightgen-worker");
    let jobs = named(&worker_spans, "job");
    assert_eq!(jobs.len(), 1, "{worker_spans:#?}");
    assert_eq!(hex(&jobs[0].trace_id), job_trace);
    assert_eq!(jobs[0].parent_span_id, submitted.span_id);
    assert!(jobs[0].start_time_unix_nano >= submitted.end_time_unix_nano);
    assert!(
        named(&worker_spans, "zoo.build")
            .iter()
            .any(|s| hex(&s.trace_id) == job_trace),
        "the job's zoo build is not in the submitter's trace"
    );

    let metadata_calls = named(&spans, "weightgen.v1.GenerationService/ServerMetadata");
    assert!(
        metadata_calls
            .iter()
            .any(|s| hex(&s.trace_id) == cli_trace && hex(&s.parent_span_id) == cli_parent),
        "{metadata_calls:#?}"
    );

    let others: Vec<_> = generate_calls
        .iter()
        .filter(|s| hex(&s.trace_id) != trace_id)
        .collect();
    assert_eq!(others.len(), 2);
    assert!(others.iter().all(|s| s.parent_span_id.is_empty()));
    assert!(others.iter().any(|s| {
        attribute(s, "rpc.grpc.status_code") == Some(Value::IntValue(3))
            && s.status.as_ref().is_none_or(|status| status.code != 2)
    }));
}
