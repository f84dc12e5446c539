//! Step-level continuous batching (Orca / vLLM's iteration-level
//! scheduling, applied to reverse diffusion). Every request in flight is a
//! set of cohorts — rows that started together, each a [`Trajectory`] —
//! and one pass of a denoiser advances every cohort [`batcher::pick`]
//! chose by one step, whatever their samplers, step counts, timesteps and
//! guidance scales: the denoiser takes a timestep and a task embedding
//! per row, and a guided cohort adds its rows once more with the null
//! embedding to the same pass. New requests join at the next pass; a
//! finished cohort leaves at once, and its samples are encoded and sent to
//! their client in request order while the others go on.
//!
//! A request's bytes do not depend on what it shared passes with: each row
//! draws its noise from its own seed, the arithmetic of a step is row-wise,
//! and every pass runs on a multiple of [`ROW_QUANTUM`] rows, at least
//! [`MIN_PASS_ROWS`] (padded with copies of its first row). On the CPU that
//! makes both kinds of kernel give each row the same bits wherever it sits:
//! MKL's sgemm takes another path for rows outside full blocks of 4, and
//! with AVX-512 another kernel for a product of exactly 8 rows; ATen's vectorized
//! element-wise loop takes 32 floats at a time (two AVX-512 vectors) and
//! finishes a tensor with a scalar loop whose SiLU (std's exp) rounds
//! differently — with a multiple of 8 rows and layer widths that are
//! multiples of 4 (every default) no tensor has such a tail (measured with
//! torch 2.11: `silu` of 4 × 132 values differs in row 3 from 8 × 132;
//! on CUDA, cuBLAS picks kernels by shape and the last bits may differ).
//! Sixteen rows cost a lone request little: a product with one row is bound
//! by reading the weights much as one with sixteen.
//!
//! A request leaves the batch when its client goes away or its deadline
//! passes; a sample out of finite arithmetic or a libtorch error fails
//! only the requests whose rows were in that pass.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use tokio::sync::{mpsc, oneshot};

use super::batcher::{self, BatchConfig, Candidate};
use super::cuda_graph::PassGraphs;
use super::generation::{condition, encode_one, finite, guarded, redraw_seed, sample_metadata};
use super::trace::RequestTrace;
use super::{GenerateJob, GenerationSummary, ModelError, SampleNearness, SampleOut};
use crate::diffusion::{Trajectory, is_guided};
use crate::model::DenoiserCheckpoint;

/// Every pass, decode and nearness score runs on a multiple of this many
/// rows, so that each row's result does not depend on how many rows share
/// it (see the module documentation).
pub const ROW_QUANTUM: i64 = 8;

/// ... and on at least this many: with AVX-512, MKL's sgemm computes a
/// product of exactly 8 rows by another kernel than 16 or more when the
/// inner dimension is 256 or more (measured with torch 2.11: the 512 → 256
/// product of 8 rows differs in the last bits from the same rows among 16,
/// while every multiple of 8 from 16 to 1,024 agrees, on 1 and 2 threads).
pub const MIN_PASS_ROWS: i64 = 16;

/// A request as it reaches the model thread.
pub(super) struct Pending {
    pub(super) id: String,
    pub(super) job: GenerateJob,
    pub(super) samples: mpsc::Sender<SampleOut>,
    pub(super) done: oneshot::Sender<Result<GenerationSummary, ModelError>>,
    pub(super) enqueued: Instant,
    pub(super) trace: RequestTrace,
}

/// One request in flight (keyed by its arrival number).
struct Flight {
    denoiser: String,
    job: GenerateJob,
    /// Its task embedding [1, E] (computed once).
    embedding: Tensor,
    /// Samples started so far (first draws; redraws not counted).
    started: usize,
    /// Finished samples waiting for earlier ones, by index.
    ready: BTreeMap<usize, SampleOut>,
    /// Samples sent to the client.
    sent: usize,
    /// Room reserved in the client's channel, one per started sample not
    /// yet sent.
    permits: Vec<mpsc::OwnedPermit<SampleOut>>,
    samples: mpsc::Sender<SampleOut>,
    done: Option<oneshot::Sender<Result<GenerationSummary, ModelError>>>,
    enqueued: Instant,
    first_pass: Option<Instant>,
    largest_pass: usize,
    trace: RequestTrace,
}

impl Flight {
    fn asked(&self) -> usize {
        self.job.seeds.len()
    }

    /// Ends the request with `result` (the samples' channel closes when the
    /// flight is dropped).
    fn finish(mut self, result: Result<GenerationSummary, ModelError>) {
        self.trace.end(&result);
        if let Some(done) = self.done.take() {
            let _ = done.send(result);
        }
    }

    fn summary(&self) -> GenerationSummary {
        let first = self.first_pass.unwrap_or(self.enqueued);
        GenerationSummary {
            queue_ms: first.duration_since(self.enqueued).as_secs_f64() * 1e3,
            sampling_ms: first.elapsed().as_secs_f64() * 1e3,
            batch_size: self.largest_pass,
        }
    }
}

/// Rows of one request that started together and step together.
struct Cohort {
    flight: u64,
    /// Each row's sample index in its request.
    indices: Vec<usize>,
    /// Each row's draw: 0 the first, k the k-th redraw.
    attempts: Vec<u32>,
    trajectory: Trajectory,
    /// Passes of its denoiser it has sat out since it started.
    skipped: u32,
}

/// Every request in flight and the checkpoints they run on.
pub(super) struct Engine {
    device: Device,
    config: BatchConfig,
    loaded: HashMap<String, DenoiserCheckpoint>,
    /// The recorded passes of each loaded denoiser (CUDA only).
    graphs: HashMap<String, PassGraphs>,
    /// Handles of each loaded id (a hot reload can load an id again while
    /// streams on its previous handle still run; each handle unloads once).
    handles: HashMap<String, usize>,
    flights: BTreeMap<u64, Flight>,
    cohorts: Vec<Cohort>,
    arrivals: u64,
    /// Denoiser of the previous pass (passes rotate among denoisers).
    last_denoiser: Option<String>,
    /// Requests waiting or in flight (shared with the handle).
    queued: Arc<AtomicUsize>,
}

impl Engine {
    pub(super) fn new(device: Device, config: BatchConfig, queued: Arc<AtomicUsize>) -> Self {
        Self {
            device,
            config,
            loaded: HashMap::new(),
            graphs: HashMap::new(),
            handles: HashMap::new(),
            flights: BTreeMap::new(),
            cohorts: Vec::new(),
            arrivals: 0,
            last_denoiser: None,
            queued,
        }
    }

    /// Loads a checkpoint under `id`; one of several architectures
    /// generates `architecture` (a checkpoint of one ignores it).
    pub(super) fn load(
        &mut self,
        id: String,
        bytes: &[u8],
        architecture: Option<&crate::weights::ArchSpec>,
    ) -> Result<&DenoiserCheckpoint, ModelError> {
        let checkpoint = guarded(|| {
            let mut checkpoint = DenoiserCheckpoint::from_bytes(bytes, self.device)
                .map_err(|e| ModelError::Checkpoint(e.to_string()))?;
            if let Some(spec) = architecture.filter(|_| checkpoint.union.is_some()) {
                checkpoint
                    .select_architecture(spec)
                    .map_err(|e| ModelError::Checkpoint(e.to_string()))?;
            }
            Ok(checkpoint)
        })?;
        *self.handles.entry(id.clone()).or_default() += 1;
        // Graphs recorded on a previous checkpoint of this id point at its
        // parameters: record afresh.
        self.graphs.remove(&id);
        if let Some(graphs) =
            PassGraphs::for_device(self.device).filter(|_| self.config.cuda_graphs)
        {
            self.graphs.insert(id.clone(), graphs);
        }
        Ok(self.loaded.entry(id).insert_entry(checkpoint).into_mut())
    }

    /// Drops one handle of `id`; with its last one it is freed, and any
    /// request still on it has no client left: those leave too.
    pub(super) fn unload(&mut self, id: &str) {
        match self.handles.get_mut(id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                return;
            }
            _ => {
                self.handles.remove(id);
            }
        }
        self.graphs.remove(id);
        if self.loaded.remove(id).is_some() {
            tracing::info!(denoiser = %id, "denoiser unloaded");
        }
        let orphans: Vec<u64> = self
            .flights
            .iter()
            .filter(|(_, f)| f.denoiser == id)
            .map(|(&k, _)| k)
            .collect();
        for key in orphans {
            self.end(key, Err(ModelError::NotLoaded(id.to_owned())));
        }
    }

    /// Whether nothing is in flight.
    pub(super) fn idle(&self) -> bool {
        self.flights.is_empty()
    }

    /// Takes a request in: computes its task embedding (a support set that
    /// does not fit is answered at once) and queues its samples.
    pub(super) fn add(&mut self, pending: Pending) {
        let Pending {
            id,
            job,
            samples,
            done,
            enqueued,
            trace,
        } = pending;
        let fail = |done: oneshot::Sender<_>, error| {
            let _ = done.send(Err(error));
            self.queued.fetch_sub(1, Ordering::SeqCst);
        };
        let Some(checkpoint) = self.loaded.get(&id) else {
            return fail(done, ModelError::NotLoaded(id));
        };
        let embedding = guarded(|| {
            let task = condition(checkpoint, &job)?;
            Ok(checkpoint.model.embed(&task, 1).embedding)
        });
        let embedding = match embedding {
            Ok(e) => e,
            Err(e) => return fail(done, e),
        };
        if job.seeds.is_empty() {
            let _ = done.send(Ok(GenerationSummary {
                queue_ms: 0.0,
                sampling_ms: 0.0,
                batch_size: 0,
            }));
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        self.arrivals += 1;
        self.flights.insert(
            self.arrivals,
            Flight {
                denoiser: id,
                job,
                embedding,
                started: 0,
                ready: BTreeMap::new(),
                sent: 0,
                permits: Vec::new(),
                samples,
                done: Some(done),
                enqueued,
                first_pass: None,
                largest_pass: 0,
                trace,
            },
        );
        self.publish_gauges();
    }

    /// One pass: requests that left or ran out of time go, waiting samples
    /// start where there is room, one denoiser advances the cohorts picked,
    /// and finished cohorts are delivered. Returns false when there was
    /// nothing to run (every request in flight waits for its client).
    pub(super) fn step(&mut self) -> bool {
        self.drop_gone();
        self.start_waiting();
        let Some(denoiser) = self.next_denoiser() else {
            self.publish_gauges();
            return false;
        };
        let picked = self.pick(&denoiser);
        let (rows, failed) = self.pass(&denoiser, &picked);
        metrics::histogram!("weightgen_batch_samples").record(rows as f64);
        // Passes sat out count for the cohort's whole life (never reset), so
        // a long cohort that cannot share a pass with short ones overtakes
        // them after at most its own length in passes.
        for (i, cohort) in self.cohorts.iter_mut().enumerate() {
            if cohort_denoiser(&self.flights, cohort) == Some(denoiser.as_str())
                && !picked.contains(&i)
            {
                cohort.skipped += 1;
            }
        }
        for (key, error) in failed {
            self.end(key, Err(error));
        }
        self.deliver_finished();
        self.publish_gauges();
        true
    }

    /// Ends requests whose client went away or whose deadline passed.
    fn drop_gone(&mut self) {
        let now = Instant::now();
        let mut gone = Vec::new();
        for (&key, flight) in &self.flights {
            let error = if flight.samples.is_closed() {
                ModelError::Stopped
            } else if flight.job.deadline.is_some_and(|d| d <= now) {
                ModelError::DeadlineExceeded {
                    done: flight.sent,
                    asked: flight.asked(),
                }
            } else {
                continue;
            };
            metrics::counter!("weightgen_generate_dropped_total").increment(1);
            gone.push((key, error));
        }
        for (key, error) in gone {
            self.end(key, Err(error));
        }
    }

    /// Starts waiting samples, requests in deadline order, while rows in
    /// flight and each request's stream window allow.
    fn start_waiting(&mut self) {
        let mut active: usize = self.cohorts.iter().map(|c| c.indices.len()).sum();
        let mut order: Vec<u64> = self
            .flights
            .iter()
            .filter(|(_, f)| f.started < f.asked())
            .map(|(&k, _)| k)
            .collect();
        order.sort_by_key(|&k| batcher::start_order(self.flights[&k].job.deadline, k));
        for key in order {
            let room = self
                .config
                .max_active
                .saturating_sub(active)
                .min(self.config.max_batch.max(1));
            if room == 0 {
                break;
            }
            match self.start_cohort(key, room) {
                Ok(n) => active += n,
                Err(e) => self.end(key, Err(e)),
            }
        }
    }

    /// Starts up to `room` more samples of request `key`; returns how many.
    fn start_cohort(&mut self, key: u64, room: usize) -> Result<usize, ModelError> {
        let Some(flight) = self.flights.get_mut(&key) else {
            return Ok(0);
        };
        let checkpoint = self
            .loaded
            .get(&flight.denoiser)
            .ok_or_else(|| ModelError::NotLoaded(flight.denoiser.clone()))?;
        // The channel holds at most the window; each started sample keeps a
        // reserved place in it until it is sent, so a request never holds
        // more finished samples than its window, however slow its client.
        let in_hand = flight.started - flight.sent;
        let wanted = (flight.asked() - flight.started)
            .min(room)
            .min(flight.samples.max_capacity().saturating_sub(in_hand));
        let mut n = 0;
        while n < wanted {
            match flight.samples.clone().try_reserve_owned() {
                Ok(permit) => {
                    flight.permits.push(permit);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        if n == 0 {
            return Ok(0);
        }
        let indices: Vec<usize> = (flight.started..flight.started + n).collect();
        let seeds: Vec<u64> = indices.iter().map(|&i| flight.job.seeds[i]).collect();
        let trajectory = guarded(|| Ok(checkpoint.start(&seeds, flight.job.sampler)))?;
        flight.started += n;
        flight.first_pass.get_or_insert_with(Instant::now);
        flight.trace.first_pass();
        self.cohorts.push(Cohort {
            flight: key,
            attempts: vec![0; n],
            indices,
            trajectory,
            skipped: 0,
        });
        Ok(n)
    }

    /// The denoiser of the next pass: the one after the previous pass's,
    /// among those with cohorts in flight.
    fn next_denoiser(&mut self) -> Option<String> {
        let mut names: Vec<&str> = self
            .cohorts
            .iter()
            .filter_map(|c| cohort_denoiser(&self.flights, c))
            .collect();
        names.sort_unstable();
        names.dedup();
        let next = match &self.last_denoiser {
            Some(last) => names.iter().find(|n| **n > last.as_str()).or(names.first()),
            None => names.first(),
        }
        .map(|n| (*n).to_owned());
        self.last_denoiser.clone_from(&next);
        next
    }

    /// Indices of the cohorts of `denoiser` that share the next pass.
    fn pick(&self, denoiser: &str) -> Vec<usize> {
        let mine: Vec<usize> = (0..self.cohorts.len())
            .filter(|&i| cohort_denoiser(&self.flights, &self.cohorts[i]) == Some(denoiser))
            .collect();
        let candidates: Vec<Candidate> = mine
            .iter()
            .map(|&i| {
                let c = &self.cohorts[i];
                let f = &self.flights[&c.flight];
                Candidate {
                    samples: c.indices.len(),
                    steps_left: c.trajectory.steps_left(),
                    skipped: c.skipped,
                    deadline: f.job.deadline,
                    arrival: c.flight,
                }
            })
            .collect();
        batcher::pick(&candidates, self.config.max_batch)
            .into_iter()
            .map(|k| mine[k])
            .collect()
    }

    /// One denoiser pass over the `picked` cohorts; returns the samples in
    /// it and the requests that failed in it (a libtorch error), to be
    /// ended by the caller (ending moves cohorts, `picked` indexes them).
    fn pass(&mut self, denoiser: &str, picked: &[usize]) -> (usize, Vec<(u64, ModelError)>) {
        let rows: usize = picked.iter().map(|&i| self.cohorts[i].indices.len()).sum();
        let Some(checkpoint) = self.loaded.get(denoiser) else {
            return (0, Vec::new());
        };
        let cohorts: Vec<&Cohort> = picked.iter().map(|&i| &self.cohorts[i]).collect();
        let embeddings: Vec<Tensor> = cohorts
            .iter()
            .map(|c| self.flights[&c.flight].embedding.shallow_clone())
            .collect();
        let guidance: Vec<f64> = cohorts
            .iter()
            .map(|c| self.flights[&c.flight].job.guidance)
            .collect();
        let graphs = self.graphs.get_mut(denoiser);
        let outputs = guarded(|| {
            Ok(denoise(
                checkpoint,
                graphs,
                &cohorts,
                &embeddings,
                &guidance,
            ))
        });
        let outputs = match outputs {
            Ok(outputs) => outputs,
            Err(e) => {
                let failed = cohorts
                    .iter()
                    .map(|c| (c.flight, e.for_another()))
                    .collect();
                return (rows, failed);
            }
        };
        // Every cohort of the pass steps at once (cohorts taking the same
        // kind of step share their tensor operations).
        let mut output_of: Vec<Option<&Tensor>> = vec![None; self.cohorts.len()];
        for (&i, output) in picked.iter().zip(&outputs) {
            output_of[i] = Some(output);
        }
        let (mut stepping, outputs_in_order): (Vec<&mut Trajectory>, Vec<&Tensor>) = self
            .cohorts
            .iter_mut()
            .zip(output_of)
            .filter_map(|(cohort, output)| Some((&mut cohort.trajectory, output?)))
            .unzip();
        let stepped = guarded(|| {
            checkpoint.advance_all(&mut stepping, &outputs_in_order);
            Ok(())
        });
        let mut failed = Vec::new();
        for &i in picked {
            let cohort = &self.cohorts[i];
            if let Err(e) = &stepped {
                failed.push((cohort.flight, e.for_another()));
            }
            if let Some(flight) = self.flights.get_mut(&cohort.flight) {
                flight.largest_pass = flight.largest_pass.max(rows);
            }
        }
        (rows, failed)
    }

    /// Decodes the cohorts that are done, redraws near copies of zoo models
    /// within their budgets, encodes the rest and sends what is in order.
    fn deliver_finished(&mut self) {
        let (done, running): (Vec<Cohort>, Vec<Cohort>) = std::mem::take(&mut self.cohorts)
            .into_iter()
            .partition(|c| c.trajectory.timestep().is_none());
        self.cohorts = running;
        for cohort in done {
            let key = cohort.flight;
            if let Err(e) = self.finish_cohort(cohort) {
                self.end(key, Err(e));
            }
        }
        let complete: Vec<u64> = self
            .flights
            .iter()
            .filter(|(_, f)| f.sent == f.asked())
            .map(|(&k, _)| k)
            .collect();
        for key in complete {
            let summary = self.flights[&key].summary();
            metrics::histogram!("weightgen_queue_wait_seconds").record(summary.queue_ms / 1e3);
            metrics::histogram!("weightgen_sampling_seconds").record(summary.sampling_ms / 1e3);
            self.end(key, Ok(summary));
        }
    }

    fn finish_cohort(&mut self, cohort: Cohort) -> Result<(), ModelError> {
        let Some(flight) = self.flights.get_mut(&cohort.flight) else {
            return Ok(());
        };
        let checkpoint = self
            .loaded
            .get(&flight.denoiser)
            .ok_or_else(|| ModelError::NotLoaded(flight.denoiser.clone()))?;
        let z = cohort.trajectory.into_sample();
        let flat =
            guarded(|| Ok(on_padded_rows(&z, |z| checkpoint.weights(z)).to_device(Device::Cpu)))?;
        if !finite(&flat) {
            metrics::counter!("weightgen_generate_rejected_total", "reason" => "non_finite")
                .increment(1);
            return Err(ModelError::NonFinite);
        }
        // Each row's nearness to the zoo, with the zoo's spread to judge it.
        let scored = match &checkpoint.zoo_reference {
            Some(reference) => Some((
                reference.spread,
                guarded(|| Ok(reference.nearest(&pad_rows(&flat))))?,
            )),
            None => None,
        };
        let mut again = Vec::new();
        for (row, (&index, &attempt)) in cohort.indices.iter().zip(&cohort.attempts).enumerate() {
            let nearness = scored.as_ref().map(|(spread, all)| SampleNearness {
                too_close: spread.too_close(&all[row]),
                nearness: all[row],
                redraws: attempt,
            });
            if nearness.is_some_and(|n| n.too_close) && attempt < flight.job.max_redraws {
                again.push((index, attempt + 1));
                continue;
            }
            if nearness.is_some_and(|n| n.too_close) {
                metrics::counter!("weightgen_samples_too_close_total").increment(1);
            }
            let metadata = sample_metadata(&flight.job, index, attempt);
            let file = guarded(|| {
                encode_one(
                    checkpoint,
                    &flat.get(row as i64),
                    flight.job.dtype,
                    &metadata,
                )
            })?;
            flight.ready.insert(
                index,
                SampleOut {
                    index,
                    file,
                    nearness,
                },
            );
        }
        // In order, each through the room reserved when it started.
        while let Some(sample) = flight.ready.remove(&flight.sent) {
            let Some(permit) = flight.permits.pop() else {
                flight.ready.insert(sample.index, sample);
                break;
            };
            permit.send(sample);
            flight.sent += 1;
        }
        if !again.is_empty() {
            metrics::counter!("weightgen_guard_redraws_total").increment(again.len() as u64);
            let seeds: Vec<u64> = again
                .iter()
                .map(|&(index, attempt)| redraw_seed(flight.job.seeds[index], attempt))
                .collect();
            let trajectory = guarded(|| Ok(checkpoint.start(&seeds, flight.job.sampler)))?;
            self.cohorts.push(Cohort {
                flight: cohort.flight,
                indices: again.iter().map(|&(i, _)| i).collect(),
                attempts: again.iter().map(|&(_, a)| a).collect(),
                trajectory,
                skipped: 0,
            });
        }
        Ok(())
    }

    /// Removes request `key` and its cohorts and answers it.
    fn end(&mut self, key: u64, result: Result<GenerationSummary, ModelError>) {
        self.cohorts.retain(|c| c.flight != key);
        if let Some(flight) = self.flights.remove(&key) {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            flight.finish(result);
        }
    }

    fn publish_gauges(&self) {
        let waiting = self.flights.values().filter(|f| f.started == 0).count();
        metrics::gauge!("weightgen_queue_depth").set(waiting as f64);
        let active: usize = self.cohorts.iter().map(|c| c.indices.len()).sum();
        metrics::gauge!("weightgen_active_samples").set(active as f64);
    }
}

/// The denoiser a cohort runs on.
fn cohort_denoiser<'a>(flights: &'a BTreeMap<u64, Flight>, cohort: &Cohort) -> Option<&'a str> {
    flights.get(&cohort.flight).map(|f| f.denoiser.as_str())
}

/// The guided model output of each cohort at its own timestep, from one
/// denoiser call: the guided cohorts' rows with their task embeddings, the
/// unguided cohorts' rows, then the guided cohorts' rows again with the null
/// embedding — so guidance is one operation over all guided rows (each
/// with its cohort's scale), whatever the number of cohorts. With `graphs`
/// the call is padded to its bucket and replayed from a CUDA graph.
fn denoise(
    checkpoint: &DenoiserCheckpoint,
    graphs: Option<&mut PassGraphs>,
    cohorts: &[&Cohort],
    embeddings: &[Tensor],
    guidance: &[f64],
) -> Vec<Tensor> {
    let model = &checkpoint.model;
    let device = model.device();
    let rows_of = |i: usize| cohorts[i].trajectory.rows();
    let (guided, unguided): (Vec<usize>, Vec<usize>) =
        (0..cohorts.len()).partition(|&i| is_guided(guidance[i]));
    let order: Vec<usize> = guided.iter().chain(&unguided).copied().collect();
    let mut states = Vec::with_capacity(order.len() + guided.len());
    let mut timesteps: Vec<i64> = Vec::new();
    let mut conditions = Vec::with_capacity(order.len() + guided.len());
    let mut push = |i: usize, embedding: Tensor| {
        let trajectory = &cohorts[i].trajectory;
        let t = trajectory.timestep().unwrap_or(1) as i64;
        states.push(trajectory.state().shallow_clone());
        timesteps.extend(std::iter::repeat_n(t, rows_of(i) as usize));
        conditions.push(embedding);
    };
    for &i in &order {
        push(i, embeddings[i].expand([rows_of(i), -1], false));
    }
    for &i in &guided {
        push(i, model.encoder().null(rows_of(i)));
    }
    let rows = timesteps.len() as i64;
    let conditional_rows: i64 = order.iter().map(|&i| rows_of(i)).sum();
    let guided_rows = rows - conditional_rows;
    let padded = match graphs {
        Some(_) => PassGraphs::bucket(rows),
        None => quantum_rows(rows),
    };
    let (output, guided_output) = tch::no_grad(|| {
        let w = pad_rows_to(&Tensor::cat(&states, 0), padded);
        let t = pad_rows_to(&rows_on(&timesteps, Kind::Int64, device), padded);
        let e = pad_rows_to(&Tensor::cat(&conditions, 0), padded);
        let output = match graphs {
            Some(graphs) => graphs.run(&[&w, &t, &e], |x| model.output(&x[0], &x[1], &x[2])),
            None => model.output(&w, &t, &e),
        };
        // out_∅ + s·(out_c − out_∅) for every guided row at once.
        let guided_output = (guided_rows > 0).then(|| {
            let scales: Vec<f32> = guided
                .iter()
                .flat_map(|&i| std::iter::repeat_n(guidance[i] as f32, rows_of(i) as usize))
                .collect();
            let scale = rows_on(&scales, Kind::Float, device).unsqueeze(1);
            let conditional = output.narrow(0, 0, guided_rows);
            let unconditional = output.narrow(0, conditional_rows, guided_rows);
            &unconditional + (&conditional - &unconditional) * scale
        });
        (output, guided_output)
    });
    let mut outputs: Vec<Option<Tensor>> = (0..cohorts.len()).map(|_| None).collect();
    let mut offset = 0i64;
    for &i in &order {
        let n = rows_of(i);
        outputs[i] = Some(match &guided_output {
            Some(g) if offset < guided_rows => g.narrow(0, offset, n),
            _ => output.narrow(0, offset, n),
        });
        offset += n;
    }
    outputs.into_iter().flatten().collect()
}

/// `values` as a 1-D tensor of `kind` on `device` (copied without waiting).
fn rows_on<T: tch::kind::Element>(values: &[T], kind: Kind, device: Device) -> Tensor {
    Tensor::from_slice(values).to_device_(device, kind, true, false)
}

/// `rows` rounded up to a multiple of [`ROW_QUANTUM`], at least
/// [`MIN_PASS_ROWS`].
fn quantum_rows(rows: i64) -> i64 {
    ((rows + ROW_QUANTUM - 1) / ROW_QUANTUM * ROW_QUANTUM).max(MIN_PASS_ROWS)
}

/// `x` with its first row repeated up to [`quantum_rows`] rows.
fn pad_rows(x: &Tensor) -> Tensor {
    pad_rows_to(x, quantum_rows(x.size()[0]))
}

/// `x` with its first row repeated up to `padded` rows.
fn pad_rows_to(x: &Tensor, padded: i64) -> Tensor {
    let rows = x.size()[0];
    if rows >= padded {
        return x.shallow_clone();
    }
    let first = x.narrow(0, 0, 1);
    let mut shape = vec![padded - rows];
    shape.extend(std::iter::repeat_n(1, first.dim() - 1));
    Tensor::cat(&[x.shallow_clone(), first.repeat(shape.as_slice())], 0)
}

/// `f` applied to `x` padded by [`pad_rows`], cut back to `x`'s rows.
fn on_padded_rows(x: &Tensor, f: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
    f(&pad_rows(x)).narrow(0, 0, x.size()[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::SamplerKind;
    use crate::tasks::featurizer::Descriptor;
    use crate::tasks::schema::FeatureSchema;
    use crate::weights::{ArchSpec, DType};

    type Done = oneshot::Receiver<Result<GenerationSummary, ModelError>>;

    /// A small untrained checkpoint: what batching does does not depend on
    /// how good the samples are.
    pub(in crate::backend) fn tiny_checkpoint() -> DenoiserCheckpoint {
        use crate::model::{ConditionalDenoiser, DenoiserConfig, TaskEncoderConfig};
        use crate::weights::{DEFAULT_STD_FLOOR, Stats, StatsMode};
        let arch = ArchSpec::sequential_mlp("mlp-4-3-2", "test", &[4, 3, 2]).unwrap();
        let d = arch.num_parameters() as i64;
        // Fixed values, not the global generator that parallel tests share.
        let zoo = crate::rng::SeededNoise::new(&[7], 1)
            .draw(&[30, d], Device::Cpu)
            .squeeze_dim(0);
        let encoder = TaskEncoderConfig::small_features_only(2, 4);
        let model = ConditionalDenoiser::new(DenoiserConfig::new(d, encoder), Device::Cpu).unwrap();
        model.set_test_weights(7);
        DenoiserCheckpoint {
            model,
            stats: Stats::fit(&zoo, StatsMode::PerDimension, &arch, DEFAULT_STD_FLOOR),
            arch,
            latent: None,
            clip: None,
            feature_schema: FeatureSchema::default(),
            feature_norm: None,
            summary: Default::default(),
            zoo_reference: None,
            recommended: None,
            union: None,
        }
    }

    fn job(seeds: std::ops::Range<u64>, sampler: SamplerKind, guidance: f64) -> GenerateJob {
        GenerateJob {
            descriptor: Descriptor {
                features: Default::default(),
                support_x: Vec::new(),
                support_y: Vec::new(),
            },
            features: vec![0.5, -0.25],
            ways: 1,
            seeds: seeds.collect(),
            sampler,
            guidance,
            dtype: DType::F32,
            max_redraws: 0,
            deadline: None,
            metadata: Default::default(),
        }
    }

    fn engine(max_batch: usize) -> Engine {
        let config = BatchConfig {
            max_batch,
            ..BatchConfig::default()
        };
        let mut engine = Engine::new(Device::Cpu, config, Arc::new(AtomicUsize::new(0)));
        engine.loaded.insert("a".into(), tiny_checkpoint());
        engine
    }

    /// Queues `job` on denoiser "a" with room for `window` unsent samples.
    fn submit(
        engine: &mut Engine,
        job: GenerateJob,
        window: usize,
    ) -> (mpsc::Receiver<SampleOut>, Done) {
        submit_to(engine, "a", job, window)
    }

    /// Queues `job` on denoiser `id`.
    fn submit_to(
        engine: &mut Engine,
        id: &str,
        job: GenerateJob,
        window: usize,
    ) -> (mpsc::Receiver<SampleOut>, Done) {
        let (samples, samples_rx) = mpsc::channel(window);
        let (done, done_rx) = oneshot::channel();
        engine.queued.fetch_add(1, Ordering::SeqCst);
        let trace = RequestTrace::arrive(id, job.seeds.len());
        engine.add(Pending {
            id: id.into(),
            job,
            samples,
            done,
            enqueued: Instant::now(),
            trace,
        });
        (samples_rx, done_rx)
    }

    /// Every sample received so far.
    fn drain(rx: &mut mpsc::Receiver<SampleOut>) -> Vec<SampleOut> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    /// Runs passes until nothing is in flight; returns how many.
    fn run(engine: &mut Engine) -> usize {
        let mut passes = 0;
        while !engine.idle() {
            engine.step();
            passes += 1;
            assert!(passes < 10_000, "the engine never went idle");
        }
        passes
    }

    fn files(samples: &[SampleOut]) -> Vec<bytes::Bytes> {
        samples.iter().map(|s| s.file.clone()).collect()
    }

    #[test]
    fn a_request_gets_the_same_bytes_alone_and_among_others() {
        let requests = [
            job(0..3, SamplerKind::ddim(10, 0.0), 1.0),
            job(10..12, SamplerKind::Ddpm, 3.0),
            job(20..21, SamplerKind::DpmSolver { steps: 4 }, 2.0),
            job(30..35, SamplerKind::ddim(7, 1.0), 1.0),
            job(40..60, SamplerKind::ddim(10, 0.0), 1.5),
        ];
        // Each alone.
        let mut alone = Vec::new();
        for request in &requests {
            let mut engine = engine(64);
            let (mut rx, mut done) = submit(&mut engine, request.clone(), 64);
            run(&mut engine);
            let summary = done.try_recv().unwrap().unwrap();
            assert_eq!(summary.batch_size, request.seeds.len());
            alone.push(files(&drain(&mut rx)));
        }
        // Together, joining at different passes, in a batch small enough
        // that they also take turns (passes of 3 to 40 rows).
        let mut engine = engine(24);
        let mut streams = Vec::new();
        streams.push(submit(&mut engine, requests[1].clone(), 64));
        for _ in 0..3 {
            engine.step();
        }
        streams.push(submit(&mut engine, requests[0].clone(), 64));
        engine.step();
        streams.push(submit(&mut engine, requests[3].clone(), 64));
        streams.push(submit(&mut engine, requests[2].clone(), 64));
        engine.step();
        streams.push(submit(&mut engine, requests[4].clone(), 64));
        run(&mut engine);
        let order = [1, 0, 3, 2, 4];
        for ((mut rx, mut done), &k) in streams.into_iter().zip(&order) {
            let summary = done.try_recv().unwrap().unwrap();
            assert!(summary.batch_size > requests[k].seeds.len(), "{summary:?}");
            let samples = drain(&mut rx);
            let indices: Vec<usize> = samples.iter().map(|s| s.index).collect();
            assert_eq!(indices, (0..requests[k].seeds.len()).collect::<Vec<_>>());
            assert_eq!(
                files(&samples),
                alone[k],
                "request {k} changed when batched"
            );
        }
    }

    #[test]
    fn a_one_step_request_passes_a_long_one() {
        let mut engine = engine(8);
        let (_long_rx, mut long_done) = submit(&mut engine, job(0..8, SamplerKind::Ddpm, 1.0), 64);
        engine.step();
        let (mut short_rx, mut short_done) = submit(
            &mut engine,
            job(100..101, SamplerKind::ddim(1, 0.0), 1.0),
            64,
        );
        let mut passes = 0;
        while short_done.try_recv().is_err() {
            engine.step();
            passes += 1;
            assert!(
                passes < 5,
                "the one-step request waited behind the long one"
            );
        }
        assert_eq!(drain(&mut short_rx).len(), 1);
        assert!(
            long_done.try_recv().is_err(),
            "the long request is still running"
        );
        assert!(run(&mut engine) > 900);
        assert!(long_done.try_recv().unwrap().is_ok());
    }

    #[test]
    fn requests_past_their_deadline_or_without_a_client_leave_the_batch() {
        let mut engine = engine(64);
        let mut late = job(0..2, SamplerKind::Ddpm, 1.0);
        late.deadline = Some(Instant::now() + std::time::Duration::from_millis(30));
        let (_late_rx, mut late_done) = submit(&mut engine, late, 64);
        let (gone_rx, _gone_done) = submit(&mut engine, job(5..7, SamplerKind::Ddpm, 1.0), 64);
        let (mut kept_rx, mut kept_done) =
            submit(&mut engine, job(9..10, SamplerKind::ddim(20, 0.0), 1.0), 64);
        engine.step();
        drop(gone_rx);
        std::thread::sleep(std::time::Duration::from_millis(40));
        engine.step();
        assert_eq!(engine.flights.len(), 1, "only the kept request is left");
        let late = late_done.try_recv().unwrap();
        assert!(
            matches!(
                late,
                Err(ModelError::DeadlineExceeded { done: 0, asked: 2 })
            ),
            "{late:?}"
        );
        run(&mut engine);
        assert!(kept_done.try_recv().unwrap().is_ok());
        assert_eq!(drain(&mut kept_rx).len(), 1);
        assert_eq!(engine.queued.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_slow_client_holds_at_most_its_window() {
        let mut engine = engine(64);
        let (mut rx, mut done) = submit(&mut engine, job(0..6, SamplerKind::ddim(3, 0.0), 1.0), 2);
        // Nobody reads: two samples are made and sent, the rest wait.
        for _ in 0..20 {
            engine.step();
        }
        let flight = engine.flights.values().next().unwrap();
        assert_eq!((flight.started, flight.sent), (2, 2));
        assert!(engine.cohorts.is_empty());
        // Reading makes room for the next ones.
        let mut received = drain(&mut rx);
        while done.try_recv().is_err() {
            engine.step();
            received.extend(drain(&mut rx));
            let flight = engine.flights.values().next();
            assert!(flight.is_none_or(|f| f.started - received.len() <= 2));
        }
        received.extend(drain(&mut rx));
        assert_eq!(
            received.iter().map(|s| s.index).collect::<Vec<_>>(),
            (0..6).collect::<Vec<_>>()
        );
    }

    #[test]
    fn denoisers_take_turns_and_an_unloaded_ones_requests_are_answered() {
        let mut engine = engine(64);
        let other = tiny_checkpoint();
        other.model.set_test_weights(8);
        engine.loaded.insert("b".into(), other);
        let (mut a_rx, mut a_done) = submit_to(
            &mut engine,
            "a",
            job(0..3, SamplerKind::ddim(10, 0.0), 1.0),
            64,
        );
        let (mut b_rx, mut b_done) = submit_to(
            &mut engine,
            "b",
            job(0..2, SamplerKind::ddim(10, 0.0), 1.0),
            64,
        );
        let (_c_rx, mut c_done) =
            submit_to(&mut engine, "b", job(5..6, SamplerKind::Ddpm, 1.0), 64);
        // Ten passes each, alternating: after 20 passes both DDIM requests
        // are done, each in passes of its own denoiser's rows only.
        for _ in 0..20 {
            engine.step();
        }
        let a = a_done.try_recv().unwrap().unwrap();
        let b = b_done.try_recv().unwrap().unwrap();
        assert_eq!((a.batch_size, b.batch_size), (3, 3));
        let (a_files, b_files) = (files(&drain(&mut a_rx)), files(&drain(&mut b_rx)));
        assert_eq!((a_files.len(), b_files.len()), (3, 2));
        assert_ne!(a_files[0], b_files[0], "another denoiser, other weights");
        // "b" loaded twice (a hot reload back to it while a stream on the
        // old handle ran): the first unload keeps it and its request.
        engine.handles.insert("b".into(), 2);
        engine.unload("b");
        assert!(c_done.try_recv().is_err() && engine.loaded.contains_key("b"));
        // The last handle's unload answers its request still in flight.
        engine.unload("b");
        let c = c_done.try_recv().unwrap();
        assert!(
            matches!(c, Err(ModelError::NotLoaded(ref id)) if id == "b"),
            "{c:?}"
        );
        assert!(engine.idle());
        assert_eq!(engine.queued.load(Ordering::SeqCst), 0);
        // A request for a denoiser that is not loaded is answered at once.
        let (_d_rx, mut d_done) =
            submit_to(&mut engine, "b", job(0..1, SamplerKind::Ddpm, 1.0), 64);
        assert!(matches!(
            d_done.try_recv().unwrap(),
            Err(ModelError::NotLoaded(_))
        ));
        assert_eq!(engine.queued.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_sample_out_of_finite_arithmetic_fails_its_own_request_only() {
        let mut engine = engine(64);
        let mut wild = job(0..1, SamplerKind::ddim(10, 0.0), 1.0);
        wild.features = vec![f32::MAX, -f32::MAX];
        let (_wild_rx, mut wild_done) = submit(&mut engine, wild, 64);
        let (mut fine_rx, mut fine_done) =
            submit(&mut engine, job(5..7, SamplerKind::ddim(10, 0.0), 1.0), 64);
        run(&mut engine);
        let wild = wild_done.try_recv().unwrap();
        assert!(matches!(wild, Err(ModelError::NonFinite)), "{wild:?}");
        let fine = fine_done.try_recv().unwrap().unwrap();
        assert_eq!(fine.batch_size, 3);
        assert_eq!(drain(&mut fine_rx).len(), 2);
    }

    #[test]
    fn the_guard_redraws_near_copies_within_each_samples_budget() {
        use crate::weights::ZooReference;
        use crate::weights::novelty::{DEFAULT_SPREAD_QUANTILE, MAX_REFERENCE_BYTES};
        let sampler = SamplerKind::ddim(10, 0.0);
        let first_draw = |engine: &mut Engine, job: GenerateJob| {
            let (mut rx, mut done) = submit(engine, job, 64);
            run(engine);
            done.try_recv().unwrap().unwrap();
            drain(&mut rx)
        };
        let as_tensor = |file: &bytes::Bytes| {
            let parsed = safetensors::SafeTensors::deserialize(file).unwrap();
            let arch = tiny_checkpoint().arch;
            let parts: Vec<Tensor> = arch
                .tensors
                .iter()
                .map(|spec| {
                    let view = parsed.tensor(&spec.name).unwrap();
                    Tensor::from_data_size(
                        view.data(),
                        &[view.data().len() as i64 / 4],
                        Kind::Float,
                    )
                })
                .collect();
            Tensor::cat(&parts, 0).unsqueeze(0)
        };
        let mut engine = engine(64);
        let plain = first_draw(&mut engine, job(11..14, sampler, 1.0));
        // The reference holds a zoo and, among it, sample 0's first draw:
        // that sample is a copy of a zoo model.
        let checkpoint = engine.loaded.get_mut("a").unwrap();
        let d = checkpoint.arch.num_parameters() as i64;
        let zoo = checkpoint.stats.denormalize(
            &crate::rng::SeededNoise::new(&[8], 1)
                .draw(&[30, d], Device::Cpu)
                .squeeze_dim(0),
        );
        let reference = Tensor::cat(&[zoo.to_kind(Kind::Float), as_tensor(&plain[0].file)], 0);
        checkpoint.zoo_reference =
            ZooReference::fit(&reference, MAX_REFERENCE_BYTES, DEFAULT_SPREAD_QUANTILE);

        // Budget 0 (the default): the copy is reported, not redrawn.
        let kept = first_draw(&mut engine, job(11..14, sampler, 1.0));
        assert_eq!(files(&kept), files(&plain));
        let n = kept[0].nearness.unwrap();
        assert!(n.too_close && n.redraws == 0 && (n.nearness.cosine - 1.0).abs() < 1e-4);
        assert!(kept[1..].iter().all(|s| !s.nearness.unwrap().too_close));

        // With a budget, sample 0 is redrawn once from its redraw seed; the
        // others are untouched, and the order is kept.
        let mut guarded_job = job(11..14, sampler, 1.0);
        guarded_job.max_redraws = 2;
        let redrawn = first_draw(&mut engine, guarded_job);
        let seen: Vec<(usize, u32, bool)> = redrawn
            .iter()
            .map(|s| {
                (
                    s.index,
                    s.nearness.unwrap().redraws,
                    s.nearness.unwrap().too_close,
                )
            })
            .collect();
        assert_eq!(seen, vec![(0, 1, false), (1, 0, false), (2, 0, false)]);
        assert_eq!(files(&redrawn[1..]), files(&plain[1..]));
        let again = first_draw(
            &mut engine,
            job(redraw_seed(11, 1)..redraw_seed(11, 1) + 1, sampler, 1.0),
        );
        // The same weights; the headers differ (seed 11 redrawn once, against
        // that seed drawn directly).
        assert!(as_tensor(&redrawn[0].file).equal(&as_tensor(&again[0].file)));
        assert_ne!(redrawn[0].file, again[0].file);
        assert_ne!(redraw_seed(11, 1), redraw_seed(11, 2));
    }
}
