//! Whether the server can generate: set by whatever loads denoisers, read by
//! ServerReady and mirrored into the health service.

use std::sync::Arc;

use tokio::sync::watch;

/// Shared readiness flag: true while at least one denoiser is loaded.
#[derive(Debug, Clone)]
pub struct Readiness {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// Starts not ready.
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    /// Records whether a denoiser is loaded.
    pub fn set_denoiser_loaded(&self, loaded: bool) {
        self.tx.send_replace(loaded);
    }

    /// Whether a denoiser is loaded.
    pub fn is_ready(&self) -> bool {
        *self.tx.borrow()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}
