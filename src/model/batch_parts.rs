//! Data parallelism on CPU: a batch split into row ranges, part 0 computed
//! on the training thread and the others on threads that live as long as
//! the trainer (a thread started per step costs more than the step gains:
//! libtorch and MKL set up per-thread state on first use). Each part runs
//! forward and backward against the same variables; part 0's gradients land
//! in `.grad`, the others' are returned and added in part order.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use tch::{Kind, Tensor};

use super::conditional::ConditionalDenoiser;
use super::task_encoder::TaskBatch;

/// One part's rows of a batch.
pub(crate) struct PartInput {
    /// Clean weights w₀ [rows, D].
    pub w0: Tensor,
    /// The rows' condition.
    pub condition: TaskBatch,
    /// Timesteps [rows].
    pub t: Tensor,
    /// Noise [rows, D].
    pub eps: Tensor,
    /// Rows trained unconditionally [rows] (bool).
    pub drop: Tensor,
    /// Its share of the batch's rows.
    pub share: f64,
    /// The attention windows the step trains (None: all).
    pub windows: Option<Vec<usize>>,
}

impl PartInput {
    /// Rows `start..end` of a batch of `rows`.
    #[allow(clippy::too_many_arguments)]
    pub fn rows(
        w0: &Tensor,
        condition: &TaskBatch,
        t: &Tensor,
        eps: &Tensor,
        drop: &Tensor,
        start: i64,
        end: i64,
    ) -> Self {
        let index = Tensor::arange_start(start, end, (Kind::Int64, w0.device()));
        Self {
            w0: w0.index_select(0, &index),
            condition: condition.select(&index),
            t: t.index_select(0, &index),
            eps: eps.index_select(0, &index),
            drop: drop.index_select(0, &index),
            share: (end - start) as f64 / w0.size()[0] as f64,
            windows: None,
        }
    }

    /// The part's loss weighted by its share of the rows, so the parts'
    /// losses add up to the batch's mean loss.
    pub fn loss(&self, model: &ConditionalDenoiser) -> Tensor {
        model
            .loss_on(
                &self.w0,
                &self.condition,
                &self.t,
                &self.eps,
                Some(&self.drop),
                self.windows.as_deref(),
            )
            .to_kind(Kind::Float)
            * self.share
    }
}

/// A pointer to the model that a part's thread dereferences while the
/// training thread waits for that part.
struct ModelRef(*const ConditionalDenoiser);

// SAFETY: a `ModelRef` is sent only by `BatchParts::run`, which does not
// return (nor unwind: `Outstanding`) before every part it sent has answered,
// so the model outlives each use. While parts run, every thread only reads
// the variables (forward, and backward through its own autograd graph); the
// one write, part 0's gradient accumulation into `.grad`, touches no tensor
// the other threads read, and libtorch's autograd engine runs concurrent
// backward passes on CPU (PyTorch's "Autograd mechanics: thread safety").
// The variables change (Adam) only after every part has answered.
unsafe impl Send for ModelRef {}

struct PartJob {
    model: ModelRef,
    input: PartInput,
    params: Vec<Tensor>,
}

/// (weighted loss, gradients in `params` order).
type PartResult = (f64, Vec<Tensor>);

struct PartThread {
    jobs: Option<Sender<PartJob>>,
    results: Receiver<PartResult>,
    handle: Option<JoinHandle<()>>,
}

/// The threads of parts 1.. of every batch.
pub(crate) struct BatchParts {
    threads: Vec<PartThread>,
}

impl std::fmt::Debug for BatchParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchParts")
            .field("parts", &(self.threads.len() + 1))
            .finish()
    }
}

/// Parts sent and not yet answered; dropping it waits for them, so the
/// model they point to stays alive even when the training thread unwinds.
struct Outstanding<'a> {
    threads: &'a [PartThread],
    waiting: Vec<bool>,
}

impl Outstanding<'_> {
    fn answer(&mut self, part: usize) -> PartResult {
        self.waiting[part] = false;
        match self.threads[part].results.recv() {
            Ok(result) => result,
            // The thread died (a panic inside libtorch's bindings): the
            // channel closed; its panic is resumed when the trainer drops.
            Err(_) => panic!("the thread of batch part {} stopped", part + 1),
        }
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        for (thread, waiting) in self.threads.iter().zip(&self.waiting) {
            if *waiting {
                let _ = thread.results.recv();
            }
        }
    }
}

impl BatchParts {
    /// Threads for `parts − 1` parts (the training thread takes part 0).
    pub fn new(parts: usize) -> Self {
        // Without it each part would spread its matrices over the cores
        // the other parts use.
        crate::device::adopt_intra_op_threads();
        let threads = (1..parts)
            .map(|part| {
                let (jobs, job_queue) = channel::<PartJob>();
                let (answers, results) = channel::<PartResult>();
                let handle = std::thread::Builder::new()
                    .name(format!("batch-part-{part}"))
                    .spawn(move || {
                        crate::device::adopt_intra_op_threads();
                        while let Ok(job) = job_queue.recv() {
                            // SAFETY: see `ModelRef`.
                            let model = unsafe { &*job.model.0 };
                            let loss = job.input.loss(model);
                            let grads = Tensor::run_backward(&[&loss], &job.params, false, false);
                            if answers.send((loss.double_value(&[]), grads)).is_err() {
                                break;
                            }
                        }
                    })
                    .expect("spawning a batch-part thread");
                PartThread {
                    jobs: Some(jobs),
                    results,
                    handle: Some(handle),
                }
            })
            .collect();
        Self { threads }
    }

    /// Parts, the training thread's included.
    pub fn parts(&self) -> usize {
        self.threads.len() + 1
    }

    /// Runs the parts' forward and backward passes: `inputs[0]` on this
    /// thread (gradients into the variables' `.grad`), the others on their
    /// threads. Returns part 0's loss and the other parts' results in order.
    pub fn run(
        &self,
        model: &ConditionalDenoiser,
        params: &[Tensor],
        inputs: Vec<PartInput>,
    ) -> (f64, Vec<PartResult>) {
        let mut inputs = inputs.into_iter();
        let first = inputs.next().expect("at least one part");
        let mut outstanding = Outstanding {
            threads: &self.threads,
            waiting: vec![false; self.threads.len()],
        };
        for (part, (thread, input)) in self.threads.iter().zip(inputs).enumerate() {
            let job = PartJob {
                model: ModelRef(model),
                input,
                params: params.iter().map(Tensor::shallow_clone).collect(),
            };
            let sent = thread
                .jobs
                .as_ref()
                .is_some_and(|jobs| jobs.send(job).is_ok());
            outstanding.waiting[part] = sent;
            if !sent {
                panic!("the thread of batch part {} stopped", part + 1);
            }
        }
        let loss = first.loss(model);
        loss.backward();
        let others = (0..self.threads.len())
            .map(|part| outstanding.answer(part))
            .collect();
        (loss.double_value(&[]), others)
    }
}

impl Drop for BatchParts {
    fn drop(&mut self) {
        for thread in &mut self.threads {
            thread.jobs = None;
        }
        for thread in &mut self.threads {
            if let Some(handle) = thread.handle.take()
                && let Err(panic) = handle.join()
                && !std::thread::panicking()
            {
                std::panic::resume_unwind(panic);
            }
        }
    }
}
