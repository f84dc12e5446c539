//! GenerateInit: check a request against the denoiser that will serve it,
//! run it on the model thread, and stream each sample's safetensors file as
//! header, chunks of at most 1 MiB, and a trailer with every file's SHA-256.
//! The model thread runs every request in flight step by step in shared
//! denoiser passes (see `crate::backend`); each sample is sent as soon as
//! it is encoded, and the call's memory is its stream window plus a few
//! messages.

use std::sync::Arc;
use std::time::Instant;

use tonic::Status;
use tracing::Instrument;

use super::convert::{descriptor_from_proto, dtype_to_proto, served_arch_to_proto, tensor_specs};
use super::denoisers::{DenoiserRegistry, LoadedDenoiser};
use super::status::{bounded_name, checked_name};
use crate::backend::{
    GenerateJob, GenerationSummary, MAX_REDRAWS, ModelError, SampleNearness, SampleOut, StreamEvent,
};
use crate::blobs::sha256_hex;
use crate::catalog::Catalog;
use crate::diffusion::{RecommendedSampler, RecommendedSampling, SamplerKind};
use crate::proto::v1 as pb;
use crate::weights::DType;

/// Largest chunk of a sample file in one message.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;
/// DDIM steps when the request leaves them unset: the fewest whose
/// zero-shot quality is DDIM-50's or better on the validation tasks of every
/// family, every request form, guidance 1 and 3 (docs/RESULTS.md, "Few-step
/// sampling"); 5 steps lose on `digits` at guidance 3. The evaluation
/// harness and the training gate keep DDIM-50 for their rows.
pub const DEFAULT_DDIM_STEPS: usize = 10;
/// DPM-Solver++(2M) steps when the request leaves them unset (chosen on
/// validation tasks: docs/RESULTS.md, issue 18).
pub const DEFAULT_DPM_SOLVER_STEPS: usize = 10;
/// Samples one request may ask for, unless configured otherwise.
pub const DEFAULT_MAX_SAMPLES: u32 = 64;
/// Largest classifier-free guidance scale accepted: far past any useful
/// one (the gate chooses 3), short of pushing samples to infinity.
pub const MAX_GUIDANCE: f64 = 100.0;

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

/// The denoiser a request names: its pin, or the active one of its
/// architecture.
pub async fn denoiser_for(
    registry: &DenoiserRegistry,
    catalog: &Arc<dyn Catalog>,
    request: &pb::GenerateInitRequest,
) -> Result<Arc<LoadedDenoiser>, Status> {
    let task = request
        .task
        .as_ref()
        .ok_or_else(|| invalid("task", "required"))?;
    checked_name("task.architecture", &task.architecture)?;
    bounded_name("denoiser_id", &request.denoiser_id)?;
    if !request.denoiser_id.is_empty() {
        let loaded = registry.by_id(&request.denoiser_id).ok_or_else(|| {
            Status::not_found(format!(
                "denoiser_id: {:?} is not loaded on this server (it serves the active version of each architecture)",
                request.denoiser_id
            ))
        })?;
        if loaded.record.architecture != task.architecture {
            return Err(invalid(
                "denoiser_id",
                format!(
                    "{:?} generates {:?}, not {:?}",
                    request.denoiser_id, loaded.record.architecture, task.architecture
                ),
            ));
        }
        return Ok(loaded);
    }
    if let Some(loaded) = registry.active(&task.architecture) {
        return Ok(loaded);
    }
    let known = catalog
        .architecture(&task.architecture)
        .await
        .map_err(super::status::catalog_status)?;
    match known {
        None => Err(Status::not_found(format!(
            "task.architecture: unknown architecture {:?}",
            task.architecture
        ))),
        Some(_) => Err(Status::unavailable(format!(
            "no denoiser is loaded for architecture {:?} yet",
            task.architecture
        ))),
    }
}

/// The steps of a sampler on a grid of the T timesteps: the request's, or
/// `default` (at most T) when it leaves them at 0; more than T is refused.
fn grid_steps(requested: u32, default: usize, timesteps: usize) -> Result<usize, Status> {
    let steps = match requested {
        0 => default.min(timesteps),
        steps => steps as usize,
    };
    if steps > timesteps {
        return Err(invalid(
            "options.steps",
            format!("{steps} is more than T = {timesteps}"),
        ));
    }
    Ok(steps)
}

/// What the header reports about how the samples were drawn.
#[derive(Debug, Clone)]
pub struct SamplingChoice {
    /// DDPM, DDIM or DPM-Solver, as the request named it (the server's
    /// default when unset).
    pub sampler: pb::Sampler,
    /// Reverse steps.
    pub steps: usize,
    /// DDIM η.
    pub eta: f64,
    /// Guidance scale.
    pub guidance: f64,
    /// First seed.
    pub seed: u64,
    /// Weight vectors to generate, each from its own seed (seed, seed + 1, …).
    pub num_samples: u32,
    /// Output dtype.
    pub dtype: DType,
}

/// The API's name of a recommended sampler.
fn recommended_sampler(sampler: RecommendedSampler) -> pb::Sampler {
    match sampler {
        RecommendedSampler::Ddim => pb::Sampler::Ddim,
        RecommendedSampler::DpmSolver => pb::Sampler::DpmSolver,
    }
}

/// What a request leaving sampler, steps and guidance unset gets from a
/// denoiser that recommends `recommended` (T = `timesteps`): DenoiserInfo's
/// `default_sampler`, `default_steps` and `default_guidance`.
pub fn sampling_defaults(
    recommended: Option<RecommendedSampling>,
    timesteps: usize,
) -> (pb::Sampler, usize, f64) {
    match recommended {
        Some(r) => (
            recommended_sampler(r.sampler),
            r.steps.min(timesteps),
            r.guidance,
        ),
        None => (pb::Sampler::Ddim, DEFAULT_DDIM_STEPS.min(timesteps), 1.0),
    }
}

/// Checks `request` against `denoiser` and returns the job and how it samples.
pub fn job_for(
    request: &pb::GenerateInitRequest,
    denoiser: &LoadedDenoiser,
    max_samples: u32,
) -> Result<(GenerateJob, SamplingChoice), Status> {
    let task = request
        .task
        .as_ref()
        .ok_or_else(|| invalid("task", "required"))?;
    let schema = &denoiser.facts.schema;
    if task.embedding.len() != schema.embedding_dim {
        return Err(invalid(
            "task.embedding",
            format!(
                "has {} values, the denoiser takes {}",
                task.embedding.len(),
                schema.embedding_dim
            ),
        ));
    }
    let descriptor = descriptor_from_proto(task, "task")?;
    // No features at all but a support set, for a denoiser that reads
    // support sets: condition on the support set alone (what the harness's
    // support-only row measures). Otherwise the features are checked.
    let support_only = descriptor.features.is_empty()
        && !descriptor.support_x.is_empty()
        && schema.support.is_some();
    let features = if support_only {
        Vec::new()
    } else {
        descriptor
            .feature_vector(schema)
            .map_err(|e| invalid(&format!("task.features.{}", e.field), e.reason))?
    };
    // The class count is the denoiser's: its classifiers have that many
    // outputs and its encoder reads support sets over that many labels.
    if let Some(labels) = denoiser.facts.support_labels
        && task.num_classes != 0
        && task.num_classes as usize != labels
    {
        return Err(invalid(
            "task.num_classes",
            format!(
                "{} classes; this denoiser generates {labels}-way classifiers",
                task.num_classes
            ),
        ));
    }
    let ways = match &schema.support {
        Some(s) if s.classification && !descriptor.support_x.is_empty() => {
            if task.num_classes < 2 {
                return Err(invalid(
                    "task.num_classes",
                    "at least 2 with a classification support set",
                ));
            }
            task.num_classes as usize
        }
        _ => 1,
    };
    // Shapes, counts and labels of the support set, checked before queueing
    // (pure Rust: all tch work happens on the model thread).
    descriptor
        .support_values(schema, ways)
        .map_err(|e| invalid(&format!("task.{}", e.field), e.reason))?;

    let options = request.options.unwrap_or_default();
    let num_samples = if options.num_samples == 0 {
        1
    } else {
        options.num_samples
    };
    if num_samples > max_samples {
        return Err(invalid(
            "options.num_samples",
            format!("{num_samples} is more than this server's limit of {max_samples}"),
        ));
    }
    let timesteps = denoiser.facts.timesteps;
    let eta = f64::from(options.eta.unwrap_or(0.0));
    let sampler = pb::Sampler::try_from(options.sampler).map_err(|_| {
        invalid(
            "options.sampler",
            format!("unknown value {}", options.sampler),
        )
    })?;
    // What the request leaves unset comes from the sampling the denoiser's
    // training gate chose (its sampler, and its steps and guidance when the
    // request runs that sampler); without one, DDIM-10 unguided.
    let recommended = denoiser.facts.recommended;
    let defaulted = sampler == pb::Sampler::Unspecified;
    let sampler = match (sampler, recommended) {
        (pb::Sampler::Unspecified, Some(r)) => recommended_sampler(r.sampler),
        (pb::Sampler::Unspecified, None) => pb::Sampler::Ddim,
        (named, _) => named,
    };
    let recommended = recommended.filter(|r| recommended_sampler(r.sampler) == sampler);
    let default_steps = |server_default: usize| recommended.map_or(server_default, |r| r.steps);
    let guidance = options
        .guidance_scale
        .map(f64::from)
        .unwrap_or_else(|| recommended.map_or(1.0, |r| r.guidance));
    if !(guidance.is_finite() && (0.0..=MAX_GUIDANCE).contains(&guidance)) {
        return Err(invalid(
            "options.guidance_scale",
            format!("{guidance} is not a number in [0, {MAX_GUIDANCE}]"),
        ));
    }
    let (sampler, kind, steps) = match sampler {
        pb::Sampler::Ddpm => {
            if options.steps != 0 && options.steps as usize != timesteps {
                return Err(invalid(
                    "options.steps",
                    format!("DDPM runs all T = {timesteps} steps; got {}", options.steps),
                ));
            }
            if options.eta.is_some() {
                return Err(invalid("options.eta", "applies to DDIM only"));
            }
            (pb::Sampler::Ddpm, SamplerKind::Ddpm, timesteps)
        }
        pb::Sampler::Unspecified | pb::Sampler::Ddim => {
            let steps = grid_steps(options.steps, default_steps(DEFAULT_DDIM_STEPS), timesteps)?;
            // DDIM's grid starts one stride below T (see `DdimSpacing`): with
            // one step that is t = 1, where pure noise passes for clean weights.
            if steps == 1 && timesteps > 1 {
                return Err(invalid(
                    "options.steps",
                    "DDIM needs at least 2 steps (its one step would be t = 1, from pure noise); \
                     DPM-Solver takes 1",
                ));
            }
            if !(0.0..=1.0).contains(&eta) {
                return Err(invalid("options.eta", format!("{eta} is not in [0, 1]")));
            }
            (pb::Sampler::Ddim, SamplerKind::ddim(steps, eta), steps)
        }
        pb::Sampler::DpmSolver => {
            let steps = grid_steps(
                options.steps,
                default_steps(DEFAULT_DPM_SOLVER_STEPS),
                timesteps,
            )?;
            if options.eta.is_some() {
                let reason = if defaulted {
                    "applies to DDIM only, and this denoiser's default sampler (sampler unset) is \
                     DPM-Solver; ask for SAMPLER_DDIM"
                } else {
                    "applies to DDIM only"
                };
                return Err(invalid("options.eta", reason));
            }
            let kind = SamplerKind::DpmSolver { steps };
            (pb::Sampler::DpmSolver, kind, steps)
        }
    };
    let dtype = match pb::DType::try_from(options.output_dtype) {
        Ok(pb::DType::DtypeUnspecified | pb::DType::DtypeF32) => DType::F32,
        Ok(pb::DType::DtypeF16) => DType::F16,
        Ok(pb::DType::DtypeBf16) => DType::BF16,
        Err(_) => {
            return Err(invalid(
                "options.output_dtype",
                format!("unknown value {}", options.output_dtype),
            ));
        }
    };
    if options.max_redraws > MAX_REDRAWS {
        return Err(invalid(
            "options.max_redraws",
            format!("{} is more than {MAX_REDRAWS}", options.max_redraws),
        ));
    }
    if options.max_redraws > 0 && denoiser.facts.zoo_spread.is_none() {
        return Err(Status::failed_precondition(format!(
            "options.max_redraws: denoiser {:?} carries no zoo reference (it was trained before \
             the memorization guard); retrain it, or leave max_redraws at 0",
            denoiser.record.id
        )));
    }
    let seed = options.seed.unwrap_or_else(rand::random);
    let seeds = (0..u64::from(num_samples))
        .map(|i| seed.wrapping_add(i))
        .collect();
    let choice = SamplingChoice {
        sampler,
        steps,
        eta,
        guidance,
        seed,
        num_samples,
        dtype,
    };
    let metadata = provenance(denoiser, &choice, &descriptor);
    Ok((
        GenerateJob {
            descriptor,
            features,
            ways,
            seeds,
            sampler: kind,
            guidance,
            dtype,
            max_redraws: options.max_redraws,
            deadline: None,
            metadata,
        },
        choice,
    ))
}

/// What every sample file's header says about where it came from: `format:
/// pt` (what Hugging Face's loaders look for), the denoiser and how it was
/// sampled — with the sample's own seed and redraws (added by the model
/// thread) enough to regenerate the same bytes from the same task, asking
/// for at least that many redraws — and a SHA-256 of the task descriptor
/// (canonical JSON). A sample the guard did not redraw has the same bytes
/// whatever `max_redraws` the request allowed. A LoRA adapter's file also carries
/// PEFT's `peft_type`, `r`, `lora_alpha` and `target_modules`.
fn provenance(
    denoiser: &LoadedDenoiser,
    choice: &SamplingChoice,
    descriptor: &crate::tasks::featurizer::Descriptor,
) -> std::collections::BTreeMap<String, String> {
    let sampler = match choice.sampler {
        pb::Sampler::Ddpm => "ddpm",
        pb::Sampler::DpmSolver => "dpm_solver",
        _ => "ddim",
    };
    let dtype = match choice.dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
    };
    let task = serde_json::to_vec(descriptor).unwrap_or_default();
    let mut metadata = denoiser.provenance.clone();
    metadata.extend(
        [
            ("weightgen.sampler", sampler.to_owned()),
            ("weightgen.steps", choice.steps.to_string()),
            ("weightgen.guidance", choice.guidance.to_string()),
            ("weightgen.dtype", dtype.to_owned()),
            ("weightgen.task_sha256", sha256_hex(&task)),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    if choice.sampler == pb::Sampler::Ddim {
        metadata.insert("weightgen.eta".to_owned(), choice.eta.to_string());
    }
    metadata
}

/// The part of every file's provenance that a loaded denoiser fixes (see
/// [`provenance`]), computed once when it is loaded: `format: pt`, its id,
/// version and architecture, and PEFT's config for an adapter architecture.
pub(super) fn denoiser_provenance(
    id: &str,
    version: u32,
    arch: &crate::weights::ArchSpec,
) -> std::collections::BTreeMap<String, String> {
    let mut metadata: std::collections::BTreeMap<String, String> = [
        (
            crate::weights::TORCH_FORMAT.0,
            crate::weights::TORCH_FORMAT.1.to_owned(),
        ),
        ("weightgen.denoiser_id", id.to_owned()),
        ("weightgen.denoiser_version", version.to_string()),
        ("weightgen.architecture", arch.name.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    metadata.extend(adapter_metadata(arch));
    metadata
}

/// PEFT's metadata when `arch` is a built-in LoRA adapter architecture;
/// nothing otherwise.
fn adapter_metadata(arch: &crate::weights::ArchSpec) -> std::collections::HashMap<String, String> {
    let network = crate::tasks::Family::parse(&arch.family).and_then(|f| f.network(&arch.name));
    match network {
        Ok(crate::tasks::Network {
            kind: crate::tasks::NetKind::LoraAdapter { lora, .. },
            ..
        }) => crate::tasks::words::lm::peft_metadata(lora),
        _ => Default::default(),
    }
}

/// Response messages a call may have made and not yet sent.
const RESPONSE_BUFFER: usize = 4;

/// The stream of a GenerateInit response.
pub type ResponseStream =
    tokio_stream::wrappers::ReceiverStream<Result<pb::GenerateInitResponse, Status>>;

/// Runs the job on `denoiser` under the current call's deadline and returns
/// the response stream: the header once the first sample is done (an error
/// before it is the call's status), each sample's chunks as soon as it is
/// encoded, then the trailer. An error after the first sample ends the
/// stream with its status. The stream holds `denoiser` until it ends. A
/// call holds at most its stream window of finished samples on the model
/// thread, plus the sample being sent and [`RESPONSE_BUFFER`] messages.
pub async fn generate(
    denoiser: Arc<LoadedDenoiser>,
    mut job: GenerateJob,
    choice: SamplingChoice,
    received: Instant,
) -> Result<ResponseStream, Status> {
    let call_deadline = crate::breaker::call_deadline();
    // The model thread stops the request a little before the call's
    // deadline (the answer margin backend waits keep), so the client hears
    // the server's DEADLINE_EXCEEDED, saying how far it got, rather than
    // its own timer.
    job.deadline = crate::breaker::call_budget().map(|budget| Instant::now() + budget);
    let status_of = move |e: ModelError| model_status(e, call_deadline);
    let arch = &denoiser.facts.arch;
    let file_bytes = arch.num_parameters() * choice.dtype.size_bytes();
    let mut samples = denoiser
        .model()
        .generate(&denoiser.record.id, job, file_bytes)
        .map_err(status_of)?;
    let first = samples.next().await.map_err(status_of)?;
    let part = |p: pb::generate_init_response::Part| pb::GenerateInitResponse { part: Some(p) };
    let header = part(pb::generate_init_response::Part::Header(
        pb::GenerateInitHeader {
            denoiser_id: denoiser.record.id.clone(),
            denoiser_version: denoiser.version,
            architecture: Some(served_arch_to_proto(&denoiser)),
            tensors: tensor_specs(arch, choice.dtype),
            seed: choice.seed,
            sampler: choice.sampler as i32,
            steps: choice.steps as u32,
            eta: choice.eta as f32,
            guidance_scale: choice.guidance as f32,
            num_samples: choice.num_samples,
            output_dtype: dtype_to_proto(choice.dtype) as i32,
        },
    ));
    let (tx, rx) = tokio::sync::mpsc::channel(RESPONSE_BUFFER);
    // From the header to the trailer, a child of the call's span.
    let stream_span = tracing::info_span!(
        "stream",
        samples = i64::from(choice.num_samples),
        sent_samples = tracing::field::Empty,
        sent_bytes = tracing::field::Empty,
    );
    let mut sent = SentSoFar::new(stream_span.clone());
    let task = async move {
        if tx.send(Ok(header)).await.is_err() {
            return;
        }
        let mut digests = Vec::with_capacity(choice.num_samples as usize);
        let mut event = Ok(first);
        loop {
            let message = match event {
                Ok(StreamEvent::Sample(sample)) => {
                    digests.push(digest(&sample));
                    let size = sample.file.len();
                    for chunk in sample_chunks(sample.index, sample.file) {
                        if tx
                            .send(Ok(part(pb::generate_init_response::Part::Chunk(chunk))))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    sent.sample(size);
                    // A client that went away ends the request at the next
                    // pass, not when its next sample is done.
                    event = tokio::select! {
                        next = samples.next() => next,
                        () = tx.closed() => return,
                    };
                    continue;
                }
                Ok(StreamEvent::Done(summary)) => {
                    Ok(part(pb::generate_init_response::Part::Trailer(trailer(
                        &denoiser,
                        std::mem::take(&mut digests),
                        summary,
                        received,
                    ))))
                }
                Err(e) => Err(status_of(e)),
            };
            let _ = tx.send(message).await;
            return;
        }
    };
    tokio::spawn(task.instrument(stream_span));
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// What a stream sent, recorded on its span once, when the stream ends
/// (however it ends: trailer, error or a client gone).
struct SentSoFar {
    span: tracing::Span,
    samples: i64,
    bytes: i64,
}

impl SentSoFar {
    fn new(span: tracing::Span) -> Self {
        Self {
            span,
            samples: 0,
            bytes: 0,
        }
    }

    fn sample(&mut self, bytes: usize) {
        self.samples += 1;
        self.bytes += bytes as i64;
    }
}

impl Drop for SentSoFar {
    fn drop(&mut self) {
        self.span.record("sent_samples", self.samples);
        self.span.record("sent_bytes", self.bytes);
    }
}

/// The status a model error is answered with; a deadline the model thread
/// ran into is described as the `DeadlineLayer` describes its own.
fn model_status(e: ModelError, deadline: Option<crate::breaker::CallDeadline>) -> Status {
    match e {
        ModelError::DeadlineExceeded { done, asked } => {
            metrics::counter!("weightgen_deadline_exceeded_total").increment(1);
            let within = deadline
                .map(|d| format!(" within {:?} ({})", d.timeout, d.whose))
                .unwrap_or_default();
            Status::deadline_exceeded(format!(
                "deadline exceeded: {done} of {asked} samples were done{within}"
            ))
        }
        ModelError::Feature(f) => invalid(&format!("task.{}", f.field), f.reason),
        ModelError::QueueFull(_) => Status::resource_exhausted(e.to_string()),
        ModelError::NonFinite => Status::invalid_argument(e.to_string()),
        other => Status::internal(without_backtrace(&other.to_string())),
    }
}

/// A sample's digest for the trailer.
fn digest(sample: &SampleOut) -> pb::SampleDigest {
    pb::SampleDigest {
        sample_index: sample.index as u32,
        size_bytes: sample.file.len() as u64,
        sha256: sha256_hex(&sample.file),
        nearest_zoo: sample.nearness.as_ref().map(nearest_zoo_to_proto),
    }
}

/// The trailer: every sample's digest and how the call went.
fn trailer(
    denoiser: &LoadedDenoiser,
    samples: Vec<pb::SampleDigest>,
    summary: GenerationSummary,
    received: Instant,
) -> pb::GenerateInitTrailer {
    pb::GenerateInitTrailer {
        samples,
        queue_ms: summary.queue_ms,
        sampling_ms: summary.sampling_ms,
        total_ms: received.elapsed().as_secs_f64() * 1e3,
        batch_size: summary.batch_size as u32,
        zoo_spread: denoiser
            .facts
            .zoo_spread
            .map(|(spread, models)| pb::ZooSpread {
                quantile: spread.quantile as f32,
                too_close_cosine: spread.cosine as f32,
                too_close_l2: spread.l2 as f32,
                mean_cosine: spread.mean_cosine as f32,
                reference_models: models as u32,
            }),
    }
}

/// Sample `index`'s file in chunks of at most [`MAX_CHUNK_BYTES`], each
/// copied out when pulled; the file is dropped after its last chunk.
fn sample_chunks(index: usize, file: bytes::Bytes) -> impl Iterator<Item = pb::SampleChunk> + Send {
    (0..file.len().div_ceil(MAX_CHUNK_BYTES)).map(move |n| {
        let start = n * MAX_CHUNK_BYTES;
        let end = (start + MAX_CHUNK_BYTES).min(file.len());
        pb::SampleChunk {
            sample_index: index as u32,
            offset: start as u64,
            data: file[start..end].to_vec(),
        }
    })
}

/// The first line of an error, at most 300 characters: libtorch's messages
/// carry a C++ backtrace with host paths and load addresses, which belong in
/// the server's log, not in a client's status.
fn without_backtrace(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default();
    match line.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_owned(),
    }
}

fn nearest_zoo_to_proto(n: &SampleNearness) -> pb::NearestZoo {
    pb::NearestZoo {
        cosine: n.nearness.cosine as f32,
        l2: n.nearness.l2 as f32,
        too_close: n.too_close,
        redraws: n.redraws,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{CheckpointFacts, ModelThread};
    use crate::catalog::DenoiserRecord;
    use crate::tasks::Family;
    use crate::tasks::families::TaskSpec;
    use crate::tasks::featurizer::{describe, schema};

    fn digits_denoiser() -> LoadedDenoiser {
        digits_denoiser_recommending(None)
    }

    fn digits_denoiser_recommending(
        recommended: Option<crate::diffusion::RecommendedSampling>,
    ) -> LoadedDenoiser {
        let family = Family::Digits;
        let facts = CheckpointFacts {
            arch: family.network("").unwrap().spec,
            schema: schema(family),
            timesteps: 1000,
            schedule: "cosine".into(),
            kind: "mlp_unet".into(),
            latent_dim: 0,
            latent_space: String::new(),
            recommended,
            zoo_spread: None,
            support_labels: Some(5),
        };
        let record = DenoiserRecord {
            id: "d1".into(),
            architecture: facts.arch.name.clone(),
            sha256: "0".repeat(64),
            size_bytes: 1,
            config: serde_json::json!({}),
            summary: Default::default(),
            active: true,
            created_at_ms: 0,
        };
        LoadedDenoiser::new(
            record,
            1,
            facts,
            ModelThread::spawn(tch::Device::Cpu, Default::default()).unwrap(),
        )
    }

    fn request() -> pb::GenerateInitRequest {
        let task = TaskSpec::Digits {
            classes: vec![0, 1, 2, 3, 4],
        };
        let data = Family::Digits.data(&task, tch::Device::Cpu).unwrap();
        let d = describe(Family::Digits, &task, &data);
        pb::GenerateInitRequest {
            task: Some(pb::TaskDescriptor {
                architecture: "digits-mlp-64-32-5".into(),
                features: d
                    .features
                    .into_iter()
                    .map(|(k, values)| (k, pb::FeatureValue { values }))
                    .collect(),
                num_classes: 5,
                ..Default::default()
            }),
            options: Some(pb::SamplingOptions {
                num_samples: 3,
                seed: Some(40),
                ..Default::default()
            }),
            denoiser_id: String::new(),
        }
    }

    fn refused(change: impl FnOnce(&mut pb::GenerateInitRequest)) -> String {
        let mut r = request();
        change(&mut r);
        let err = job_for(&r, &digits_denoiser(), 8).unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{}",
            err.message()
        );
        err.message().to_owned()
    }

    #[test]
    fn a_valid_request_gets_ddim_10_and_consecutive_seeds() {
        let (job, choice) = job_for(&request(), &digits_denoiser(), 8).unwrap();
        assert_eq!(job.seeds, vec![40, 41, 42]);
        assert_eq!(
            (choice.sampler, choice.steps, choice.guidance),
            (pb::Sampler::Ddim, 10, 1.0)
        );
        assert_eq!(job.features.len(), schema(Family::Digits).feature_width());
        let mut dpm = request();
        if let Some(options) = dpm.options.as_mut() {
            options.sampler = pb::Sampler::DpmSolver as i32;
        }
        let (job, choice) = job_for(&dpm, &digits_denoiser(), 8).unwrap();
        assert_eq!((choice.sampler, choice.steps), (pb::Sampler::DpmSolver, 10));
        assert_eq!(job.sampler, SamplerKind::DpmSolver { steps: 10 });
    }

    #[test]
    fn files_are_cut_into_ordered_chunks_of_at_most_the_limit() {
        let big: Vec<u8> = (0..2 * MAX_CHUNK_BYTES + 5)
            .map(|i| (i % 251) as u8)
            .collect();
        let files = vec![
            bytes::Bytes::from(big.clone()),
            bytes::Bytes::from_static(b"small"),
        ];
        let chunks: Vec<pb::SampleChunk> = files
            .into_iter()
            .enumerate()
            .flat_map(|(index, file)| sample_chunks(index, file))
            .collect();
        let shape: Vec<(u32, u64, usize)> = chunks
            .iter()
            .map(|c| (c.sample_index, c.offset, c.data.len()))
            .collect();
        let m = MAX_CHUNK_BYTES;
        assert_eq!(
            shape,
            [(0, 0, m), (0, m as u64, m), (0, 2 * m as u64, 5), (1, 0, 5)]
        );
        let first: Vec<u8> = chunks[..3].iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(first, big);
        assert_eq!(chunks[3].data, b"small");
    }

    #[test]
    fn unset_options_take_the_denoisers_recommended_sampling() {
        let one_step = crate::diffusion::RecommendedSampling {
            sampler: RecommendedSampler::DpmSolver,
            steps: 1,
            guidance: 1.5,
        };
        let denoiser = digits_denoiser_recommending(Some(one_step));
        let with = |change: fn(&mut pb::SamplingOptions)| {
            let mut r = request();
            change(r.options.as_mut().unwrap());
            let (job, choice) = job_for(&r, &denoiser, 8).unwrap();
            (job.sampler, choice.sampler, choice.steps, choice.guidance)
        };
        let dpm1 = SamplerKind::DpmSolver { steps: 1 };
        // Nothing set: all three from the recommendation.
        assert_eq!(with(|_| {}), (dpm1, pb::Sampler::DpmSolver, 1, 1.5));
        // Its sampler named: still its steps and guidance.
        assert_eq!(
            with(|o| o.sampler = pb::Sampler::DpmSolver as i32),
            (dpm1, pb::Sampler::DpmSolver, 1, 1.5)
        );
        // What the request sets wins.
        let (kind, _, steps, guidance) = with(|o| {
            o.steps = 4;
            o.guidance_scale = Some(2.0);
        });
        assert_eq!(
            (kind, steps, guidance),
            (SamplerKind::DpmSolver { steps: 4 }, 4, 2.0)
        );
        // η belongs to DDIM: with the default DPM-Solver the error says so.
        let mut r = request();
        r.options.as_mut().unwrap().eta = Some(0.5);
        let err = job_for(&r, &denoiser, 8).unwrap_err();
        assert!(
            err.message().starts_with("options.eta:") && err.message().contains("SAMPLER_DDIM"),
            "{}",
            err.message()
        );
        // Another sampler: the server's defaults for it, unguided.
        assert_eq!(
            with(|o| o.sampler = pb::Sampler::Ddim as i32),
            (SamplerKind::ddim(10, 0.0), pb::Sampler::Ddim, 10, 1.0)
        );
    }

    #[test]
    fn a_support_set_without_features_conditions_on_the_support_set_alone() {
        let task = TaskSpec::Digits {
            classes: vec![0, 1, 2, 3, 4],
        };
        let data = Family::Digits.data(&task, tch::Device::Cpu).unwrap();
        let d = describe(Family::Digits, &task, &data);
        let k = d.support_x.len() as u64;
        let mut r = request();
        let t = r.task.as_mut().unwrap();
        t.features.clear();
        t.support = Some(pb::SupportSet {
            inputs: Some(pb::FloatTensor {
                shape: vec![k, 64],
                values: d.support_x.concat(),
            }),
            targets: Some(pb::FloatTensor {
                shape: vec![k],
                values: d.support_y.iter().map(|y| y[0]).collect(),
            }),
        });
        let (job, _) = job_for(&r, &digits_denoiser(), 8).unwrap();
        assert!(job.features.is_empty());
        assert_eq!((job.descriptor.support_x.len(), job.ways), (k as usize, 5));
        // Neither features nor a support set: the features are required.
        let message = refused(|r| r.task.as_mut().unwrap().features.clear());
        assert!(
            message.starts_with("task.features.") && message.contains("required and missing"),
            "{message}"
        );
    }

    #[test]
    fn the_class_count_and_guidance_are_bounded_by_the_denoiser() {
        for n in [2, 6, 100, u32::MAX] {
            let message = refused(|r| r.task.as_mut().unwrap().num_classes = n);
            assert_eq!(
                message,
                format!("task.num_classes: {n} classes; this denoiser generates 5-way classifiers")
            );
        }
        let mut r = request();
        r.task.as_mut().unwrap().num_classes = 0;
        assert!(job_for(&r, &digits_denoiser(), 8).is_ok());
        for g in [100.5f32, 1e30] {
            assert!(
                refused(|r| r.options.as_mut().unwrap().guidance_scale = Some(g))
                    .starts_with("options.guidance_scale:")
            );
        }
        let mut r = request();
        r.options.as_mut().unwrap().guidance_scale = Some(100.0);
        assert!(job_for(&r, &digits_denoiser(), 8).is_ok());
    }

    #[test]
    fn internal_errors_keep_only_their_first_line() {
        let torch = "mat1 and mat2 shapes cannot be multiplied (10x70 and 69x128)\nException raised from meta at /pytorch/aten/src/ATen/native/LinearAlgebra.cpp:197\nframe #0: c10::Error::Error(...) + 0x9c (0x7f0 in /venv/lib/libc10.so)";
        assert_eq!(
            without_backtrace(torch),
            "mat1 and mat2 shapes cannot be multiplied (10x70 and 69x128)"
        );
        let long = "x".repeat(1000);
        assert_eq!(without_backtrace(&long).chars().count(), 301);
    }

    #[test]
    fn redraws_are_bounded_and_need_a_zoo_reference() {
        assert!(
            refused(|r| r.options.as_mut().unwrap().max_redraws = MAX_REDRAWS + 1)
                .starts_with("options.max_redraws: 9 is more than 8")
        );
        let mut r = request();
        r.options.as_mut().unwrap().max_redraws = 2;
        let err = job_for(&r, &digits_denoiser(), 8).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message()
                .starts_with("options.max_redraws: denoiser \"d1\" carries no zoo reference"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn bad_fields_are_named() {
        assert!(refused(|r| r.task = None).starts_with("task: required"));
        assert!(
            refused(|r| {
                r.task
                    .as_mut()
                    .unwrap()
                    .features
                    .insert("colour".into(), pb::FeatureValue { values: vec![1.0] });
            })
            .starts_with("task.features.colour: unknown feature")
        );
        assert!(
            refused(|r| {
                r.task
                    .as_mut()
                    .unwrap()
                    .features
                    .get_mut("input_mean")
                    .unwrap()
                    .values = vec![f64::NAN];
            })
            .starts_with("task.features.input_mean: value 0 is NaN")
        );
        assert!(
            refused(|r| r.task.as_mut().unwrap().embedding = vec![1.0])
                .starts_with("task.embedding:")
        );
        assert!(
            refused(|r| r.options.as_mut().unwrap().num_samples = 9)
                .starts_with("options.num_samples:")
        );
        assert!(
            refused(|r| {
                let o = r.options.as_mut().unwrap();
                o.sampler = pb::Sampler::Ddpm as i32;
                o.steps = 50;
            })
            .starts_with("options.steps: DDPM runs all T = 1000")
        );
        assert!(
            refused(|r| r.options.as_mut().unwrap().eta = Some(1.5)).starts_with("options.eta:")
        );
        assert!(
            refused(|r| r.options.as_mut().unwrap().guidance_scale = Some(-1.0))
                .starts_with("options.guidance_scale:")
        );
        assert!(
            refused(|r| r.options.as_mut().unwrap().output_dtype = 9)
                .starts_with("options.output_dtype:")
        );
        assert!(
            refused(|r| r.options.as_mut().unwrap().steps = 1001).starts_with("options.steps:")
        );
    }

    #[test]
    fn an_adapters_files_carry_pefts_config_and_other_files_none() {
        use crate::tasks::Family;
        let words = Family::Words.network("").unwrap().spec;
        let peft = adapter_metadata(&words);
        assert_eq!(peft["peft_type"], "LORA");
        assert_eq!(peft["r"], "4");
        assert_eq!(peft["lora_alpha"], "8");
        assert_eq!(peft["target_modules"], r#"["qkv","proj","up","down"]"#);
        let digits = Family::Digits.network("").unwrap().spec;
        assert!(adapter_metadata(&digits).is_empty());
    }
}
