//! A tiny shutdown signal shared by every task of a pipeline.

use tokio_util::sync::CancellationToken;

/// Cloneable; `request` once, every clone observes it.
#[derive(Clone, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn request(&self) {
        self.0.cancel();
    }

    pub fn is_requested(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves once shutdown is requested.
    pub async fn requested(&self) {
        self.0.cancelled().await
    }

    /// The underlying token, for libraries that take one.
    pub fn token(&self) -> CancellationToken {
        self.0.clone()
    }
}
