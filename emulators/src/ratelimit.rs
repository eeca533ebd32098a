//! HubSpot's two per-account buckets: a rolling 10-second window and a daily quota that resets
//! at midnight (UTC here; the account's time zone in HubSpot).

use std::collections::VecDeque;
use std::time::Duration;

/// Which bucket refused a request (`policyName` in the 429 body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    TenSecondlyRolling,
    Daily,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::TenSecondlyRolling => "TEN_SECONDLY_ROLLING",
            Policy::Daily => "DAILY",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Policy::TenSecondlyRolling => "You have reached your ten_secondly_rolling limit.",
            Policy::Daily => "You have reached your daily limit.",
        }
    }
}

/// What the rate-limit headers report after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub interval_max: u32,
    pub interval_remaining: u32,
    pub daily_max: u64,
    pub daily_remaining: u64,
}

/// The buckets of one account. Times are milliseconds on the emulator's clock.
#[derive(Debug)]
pub struct RateLimits {
    pub interval: Duration,
    pub interval_max: u32,
    pub daily_max: u64,
    window: VecDeque<u64>,
    day: u64,
    used_today: u64,
}

impl RateLimits {
    pub fn new(interval_max: u32, daily_max: u64) -> Self {
        Self {
            interval: Duration::from_secs(10),
            interval_max,
            daily_max,
            window: VecDeque::new(),
            day: 0,
            used_today: 0,
        }
    }

    /// Counts a request at `now_ms`, or refuses it without counting it.
    pub fn take(&mut self, now_ms: u64) -> Result<Usage, (Policy, Usage)> {
        let day = now_ms / 86_400_000;
        if day != self.day {
            self.day = day;
            self.used_today = 0;
        }
        let horizon = now_ms.saturating_sub(self.interval.as_millis() as u64);
        while self.window.front().is_some_and(|&t| t <= horizon) {
            self.window.pop_front();
        }
        if self.used_today >= self.daily_max {
            return Err((Policy::Daily, self.usage()));
        }
        if self.window.len() as u32 >= self.interval_max {
            return Err((Policy::TenSecondlyRolling, self.usage()));
        }
        self.window.push_back(now_ms);
        self.used_today += 1;
        Ok(self.usage())
    }

    fn usage(&self) -> Usage {
        Usage {
            interval_max: self.interval_max,
            interval_remaining: self.interval_max.saturating_sub(self.window.len() as u32),
            daily_max: self.daily_max,
            daily_remaining: self.daily_max.saturating_sub(self.used_today),
        }
    }

    /// Milliseconds until the daily quota resets.
    pub fn daily_reset_in(&self, now_ms: u64) -> u64 {
        86_400_000 - now_ms % 86_400_000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_rolls_and_the_day_resets() {
        let mut r = RateLimits::new(3, 5);
        let t0 = 86_400_000 * 10;
        for i in 0..3 {
            assert!(r.take(t0 + i).is_ok());
        }
        let (policy, usage) = r.take(t0 + 5).unwrap_err();
        assert_eq!((policy, usage.interval_remaining), (Policy::TenSecondlyRolling, 0));
        // 10 s after the first request, one slot is free again.
        assert_eq!(r.take(t0 + 10_000).unwrap().interval_remaining, 0);
        assert!(r.take(t0 + 10_002).is_ok());
        assert_eq!(r.take(t0 + 30_000).unwrap_err().0, Policy::Daily);
        // Midnight resets the day.
        assert!(r.take(t0 + 86_400_000).is_ok());
        assert_eq!(r.daily_reset_in(t0 + 1000), 86_399_000);
    }
}
