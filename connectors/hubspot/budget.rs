//! One request budget per destination account, shared by every pipeline and sink in the process:
//! requests are spaced evenly at the account's 10-second rate (never a burst), so a sink that
//! keeps to its budget never meets a 429, and two sinks writing to one account share it.
//!
//! Other clients of the account (another process, a restarted sluice whose predecessor used the
//! window) are visible only in the server's `Remaining` header: when it reaches 0, or a 429
//! arrives, the budget pauses for a whole interval, after which the window is empty.

use crate::config::AccountLimits;
use dashmap::DashMap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

static ACCOUNTS: LazyLock<DashMap<String, Arc<Budget>>> = LazyLock::new(DashMap::new);

/// The length of HubSpot's rolling window.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// An account's request budget.
pub struct Budget {
    limiter: DefaultDirectRateLimiter,
    /// No request before this instant (the window is, or may be, full).
    paused_until: Mutex<Option<Instant>>,
}

impl Budget {
    /// Waits until a request fits the budget.
    pub async fn ready(&self) {
        let until = *self.paused_until.lock().expect("budget lock");
        if let Some(t) = until {
            tokio::time::sleep_until(t.into()).await;
        }
        self.limiter.until_ready().await;
    }

    /// Holds every request for `wait` (a full window, or the server's `Retry-After`).
    pub fn pause(&self, wait: Duration, why: &str) {
        let until = Instant::now() + wait;
        let mut p = self.paused_until.lock().expect("budget lock");
        if p.is_none_or(|t| t < until) {
            // Another client is using the account, or the server asked: worth knowing.
            tracing::warn!(?wait, why, "account budget paused");
            *p = Some(until);
        }
    }
}

/// Requests per window the budget spaces evenly: about 3% under the account's limit, so this
/// process alone never fills the window, and a `Remaining: 0` means someone else is using it.
fn spaced_rate(limit: u32) -> u32 {
    if limit <= 1 {
        1
    } else {
        limit - (limit / 32).max(1)
    }
}

/// The account's budget. `account` identifies the account (API base URL and a token digest);
/// the first sink to ask sets the limits.
pub fn for_account(account: &str, limits: AccountLimits) -> Arc<Budget> {
    ACCOUNTS
        .entry(account.to_string())
        .or_insert_with(|| {
            let period = INTERVAL / spaced_rate(limits.ten_second_max);
            let quota = Quota::with_period(period).expect("a positive period").allow_burst(NonZeroU32::MIN);
            Arc::new(Budget { limiter: RateLimiter::direct(quota), paused_until: Mutex::new(None) })
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_stays_just_under_the_limit() {
        assert_eq!((spaced_rate(100), spaced_rate(190), spaced_rate(20), spaced_rate(1)), (97, 185, 19, 1));
    }

    #[test]
    fn sinks_of_one_account_share_its_budget() {
        let limits =
            AccountLimits { ten_second_max: 10, daily_max: 1000, park_probe: std::time::Duration::from_secs(60) };
        let a = for_account("https://example.test|abc", limits);
        let b = for_account("https://example.test|abc", limits);
        let other = for_account("https://example.test|def", limits);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &other));
        assert!(a.limiter.check().is_ok());
        assert!(b.limiter.check().is_err(), "the second request within a second of the first waits");
        assert!(other.limiter.check().is_ok());
    }
}
