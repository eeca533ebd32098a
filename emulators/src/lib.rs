//! Conformance emulators of the SaaS APIs sluice writes to. They reproduce the contracts that
//! matter to a sync client (authentication and token expiry, batch limits, partial failures,
//! rate limits with the real status codes, headers and bodies) and add a control plane under
//! `/_emu/` for tests: inspection, fault and latency injection, limits, and a movable clock.
//! Sources of each behaviour: `shared/reference/crm-erp-contracts.md` in the team's notes.

pub mod hubspot;
pub mod ratelimit;
pub mod salesforce;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds on an emulator's clock: the wall clock moved forward by `offset_ms`
/// (`/_emu/clock`), so tests can reach token expiry or a daily reset without waiting.
pub(crate) fn clock_ms(offset_ms: u64) -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0) + offset_ms
}

/// A running emulator; dropping it stops the server.
pub struct Emulator {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Emulator {
    /// Serves `app` on `addr` (port 0 picks a free one).
    pub(crate) async fn serve(app: axum::Router, addr: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Emulator { addr, task })
    }

    /// The base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}
