//! The batching policy of the step-level engine ([`super::engine`]), apart
//! from any tensor so it can be tested on its own:
//!
//! - **which requests start**: in order of deadline (then arrival), each
//!   as soon as there is room for its samples among the rows in flight
//!   (`max_active`) and in its stream window (finished samples the client
//!   has not yet taken, bounded in bytes);
//! - **which rows share the next pass**: at most `max_batch` samples, whole
//!   cohorts (the rows of one request that started together), fewest steps
//!   left first — a one-step request sent behind a DDPM-1000 one finishes
//!   after one pass, not after the long one — with every pass a cohort has
//!   sat out since it started counting as one step less, so a long request
//!   behind a stream of short ones waits at most about its own length;
//!   ties go to the earlier deadline, then to the earlier arrival.

use std::time::{Duration, Instant};

/// How the model thread batches requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchConfig {
    /// Most samples in one denoiser pass (a guided sample runs two rows).
    pub max_batch: usize,
    /// Most samples in flight at once, of all requests (bounds the memory
    /// of the states they carry).
    pub max_active: usize,
    /// Requests that may be waiting or in flight; past it new ones are
    /// refused at once.
    pub max_queue: usize,
    /// Bytes of finished samples a request may hold that its client has
    /// not taken yet; its next samples start only when there is room (at
    /// least one sample always fits).
    pub stream_window: usize,
    /// On a CUDA device, record each denoiser pass as a CUDA graph per
    /// batch-size bucket and replay it ([`super::cuda_graph`]).
    pub cuda_graphs: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch: DEFAULT_MAX_BATCH,
            max_active: DEFAULT_MAX_ACTIVE,
            max_queue: DEFAULT_MAX_QUEUE,
            stream_window: DEFAULT_STREAM_WINDOW,
            cuda_graphs: true,
        }
    }
}

/// Default most samples per denoiser pass.
pub const DEFAULT_MAX_BATCH: usize = 64;
/// Default most samples in flight.
pub const DEFAULT_MAX_ACTIVE: usize = 256;
/// Default requests that may wait or run.
pub const DEFAULT_MAX_QUEUE: usize = 256;
/// Default stream window: 16 MiB of finished samples per request.
pub const DEFAULT_STREAM_WINDOW: usize = 16 << 20;

/// Samples a request may hold finished but not taken: the window in whole
/// files, at least one, at most what it asked for.
pub fn window_samples(stream_window: usize, file_bytes: usize, asked: usize) -> usize {
    (stream_window / file_bytes.max(1)).clamp(1, asked.max(1))
}

/// A request's place in the start order: earlier deadline first (none
/// last), then earlier arrival.
pub fn start_order(deadline: Option<Instant>, arrival: u64) -> (bool, Duration, u64) {
    match deadline {
        // Deadlines compared as durations from a fixed origin (Instant has
        // no zero); the origin is the earliest representable here.
        Some(d) => (false, d.saturating_duration_since(origin()), arrival),
        None => (true, Duration::ZERO, arrival),
    }
}

fn origin() -> Instant {
    use std::sync::OnceLock;
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// What the pass picker knows of one cohort.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Samples in the cohort.
    pub samples: usize,
    /// Denoiser passes it still needs.
    pub steps_left: usize,
    /// Passes it has sat out since it last advanced.
    pub skipped: u32,
    /// Its request's deadline.
    pub deadline: Option<Instant>,
    /// Its request's arrival number.
    pub arrival: u64,
}

impl Candidate {
    fn priority(&self) -> (usize, (bool, Duration, u64)) {
        (
            self.steps_left.saturating_sub(self.skipped as usize),
            start_order(self.deadline, self.arrival),
        )
    }
}

/// The cohorts that share the next pass: by priority (fewest steps left,
/// aged by passes sat out), each that still fits in `max_batch` samples.
/// The first always goes, so a pass is never empty while cohorts wait.
pub fn pick(candidates: &[Candidate], max_batch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by_key(|&i| candidates[i].priority());
    let mut taken = Vec::new();
    let mut samples = 0usize;
    for i in order {
        let n = candidates[i].samples;
        if taken.is_empty() || samples + n <= max_batch {
            samples += n;
            taken.push(i);
        }
    }
    taken.sort_unstable();
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cohort(samples: usize, steps_left: usize, arrival: u64) -> Candidate {
        Candidate {
            samples,
            steps_left,
            skipped: 0,
            deadline: None,
            arrival,
        }
    }

    #[test]
    fn a_short_request_passes_a_long_one_that_fills_the_batch() {
        // A DDPM-1000 request of 64 samples fills the batch; a DDIM-1
        // request of one sample arrives after it.
        let mut long = cohort(64, 1000, 0);
        let short = cohort(1, 1, 1);
        assert_eq!(pick(&[long, short], 64), vec![1]);
        // With the short one gone the long one runs.
        long.skipped = 1;
        assert_eq!(pick(&[long], 64), vec![0]);
        // Small cohorts fill the room the first one leaves.
        let cohorts = [cohort(40, 900, 0), cohort(30, 5, 1), cohort(20, 50, 2)];
        assert_eq!(pick(&cohorts, 64), vec![1, 2]);
        assert_eq!(pick(&cohorts, 100), vec![0, 1, 2]);
    }

    #[test]
    fn a_stream_of_short_requests_delays_a_long_one_by_at_most_its_length() {
        // A 64-sample DDPM-1000 cohort fills the batch; a one-sample DDIM-10
        // request arrives every 10 passes, so one is always waiting. Passes
        // sat out age the long cohort for its whole life: it finishes within
        // about twice its length, not (as with an age reset on every step)
        // hundreds of times it.
        let mut long = cohort(64, 1000, 0);
        let mut shorts: Vec<Candidate> = Vec::new();
        let mut passes = 0u64;
        while long.steps_left > 0 {
            if passes.is_multiple_of(10) {
                shorts.push(cohort(1, 10, 1 + passes));
            }
            let mut all = vec![long];
            all.extend(shorts.iter().copied());
            let picked = pick(&all, 64);
            for (i, c) in all.iter_mut().enumerate() {
                if picked.contains(&i) {
                    c.steps_left -= 1;
                } else {
                    c.skipped += 1;
                }
            }
            long = all[0];
            shorts = all[1..]
                .iter()
                .copied()
                .filter(|c| c.steps_left > 0)
                .collect();
            passes += 1;
            assert!(passes < 3_000, "starved: {} steps left", long.steps_left);
        }
        assert!(passes >= 1_000);
        eprintln!("DDPM-1000 × 64 behind a DDIM-10 request every 10 passes: {passes} passes");
        // The short requests were not starved either.
        assert!(shorts.iter().all(|c| c.skipped < 1_100), "{shorts:?}");
    }

    #[test]
    fn equal_work_goes_by_deadline_then_arrival() {
        let now = Instant::now();
        let mut early = cohort(40, 10, 5);
        early.deadline = Some(now + Duration::from_secs(1));
        let mut late = cohort(40, 10, 1);
        late.deadline = Some(now + Duration::from_secs(9));
        let none = cohort(40, 10, 0);
        assert_eq!(pick(&[late, none, early], 64), vec![2]);
        assert_eq!(pick(&[late, none], 64), vec![0]);
        assert_eq!(pick(&[cohort(40, 10, 3), cohort(40, 10, 2)], 64), vec![1]);
        assert!(start_order(Some(now), 9) < start_order(None, 0));
    }

    #[test]
    fn the_window_holds_at_least_one_sample_and_at_most_the_request() {
        assert_eq!(window_samples(16 << 20, 9_000, 64), 64);
        assert_eq!(window_samples(16 << 20, 4 << 20, 64), 4);
        assert_eq!(window_samples(1 << 20, 4 << 20, 64), 1);
        assert_eq!(window_samples(16 << 20, 0, 3), 3);
    }
}
