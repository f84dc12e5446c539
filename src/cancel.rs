//! A flag that asks long-running work (zoo builds, training) to stop at its
//! next safe point: set by the job runner when a job is cancelled or its
//! lease is lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared stop request; clones see the same flag. Starts unset.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    /// A new, unset flag.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the work to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether stopping was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_flag() {
        let flag = CancelFlag::new();
        let seen = flag.clone();
        assert!(!seen.is_cancelled());
        flag.cancel();
        assert!(seen.is_cancelled());
    }
}
