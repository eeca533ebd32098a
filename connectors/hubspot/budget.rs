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

    /// Holds every request for one interval (the server says the window is full).
    pub fn pause(&self) {
        let until = Instant::now() + INTERVAL;
        let mut p = self.paused_until.lock().expect("budget lock");
        if p.is_none_or(|t| t < until) {
            *p = Some(until);
        }
    }
}

/// The account's budget. `account` identifies the account (API base URL and a token digest);
/// the first sink to ask sets the limits.
pub fn for_account(account: &str, limits: AccountLimits) -> Arc<Budget> {
    ACCOUNTS
        .entry(account.to_string())
        .or_insert_with(|| {
            // Evenly spaced with no burst: any 10-second window holds at most the limit.
            let period = INTERVAL / limits.ten_second_max.max(1);
            let quota = Quota::with_period(period).expect("a positive period").allow_burst(NonZeroU32::MIN);
            Arc::new(Budget { limiter: RateLimiter::direct(quota), paused_until: Mutex::new(None) })
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_of_one_account_share_its_budget() {
        let limits = AccountLimits { ten_second_max: 10, daily_max: 1000 };
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
