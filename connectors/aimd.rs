//! Additive increase, multiplicative decrease: how CRM sinks size their calls and how many they
//! keep in flight. Each round of calls that went well (no throttling, latency under target)
//! grows the value by a step; throttling or slow answers halve it. The account's rate budget
//! still bounds the request rate; AIMD finds how much of it latency lets one sink use.

use crate::error::Result;
use futures::StreamExt;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One adaptive value between `min` and `max`.
#[derive(Debug, Clone)]
pub struct Aimd {
    value: f64,
    min: f64,
    max: f64,
    step: f64,
}

impl Aimd {
    pub fn new(min: usize, start: usize, max: usize, step: usize) -> Self {
        let (min, max) = (min.max(1) as f64, max.max(1) as f64);
        Self { value: (start as f64).clamp(min, max), min, max, step: step.max(1) as f64 }
    }

    pub fn get(&self) -> usize {
        self.value as usize
    }

    pub fn increase(&mut self) {
        self.value = (self.value + self.step).min(self.max);
    }

    pub fn decrease(&mut self) {
        self.value = (self.value / 2.0).max(self.min);
    }
}

/// What a round of calls came to, for [`Adaptive::after_round`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Round {
    /// A call was throttled or the server was overloaded (429, 503, concurrency limits).
    pub throttled: bool,
    /// The slowest call of the round.
    pub slowest: Duration,
}

/// Call size and concurrency of one sink.
#[derive(Debug, Clone)]
pub struct Adaptive {
    pub size: Aimd,
    pub concurrency: Aimd,
    /// Calls slower than this count as a sign of overload.
    target_latency: Duration,
}

impl Adaptive {
    /// Calls of up to `max_size` records (the API's limit), up to `max_concurrency` at once.
    pub fn new(max_size: usize, max_concurrency: usize, target_latency: Duration) -> Self {
        Self {
            size: Aimd::new((max_size / 8).max(1), max_size, max_size, (max_size / 10).max(1)),
            concurrency: Aimd::new(1, 2, max_concurrency, 1),
            target_latency,
        }
    }

    pub fn after_round(&mut self, round: Round) {
        if round.throttled {
            self.concurrency.decrease();
            self.size.decrease();
        } else if round.slowest > self.target_latency {
            self.concurrency.decrease();
        } else {
            self.concurrency.increase();
            self.size.increase();
        }
        metrics::gauge!("sluice_sink_concurrency").set(self.concurrency.get() as f64);
        metrics::gauge!("sluice_sink_call_size").set(self.size.get() as f64);
    }
}

/// Runs one round of `calls`, as many in flight as `adaptive` allows, then adapts it to how the
/// round went: a failed call, or an answer `throttled` says was throttled, counts as throttling.
/// The answers come back in completion order; the first error, if any, instead.
pub async fn round<T, Fut>(
    adaptive: &Mutex<Adaptive>,
    calls: Vec<Fut>,
    throttled: impl Fn(&T) -> bool,
) -> Result<Vec<T>>
where
    Fut: Future<Output = Result<T>>,
{
    let concurrency = adaptive.lock().expect("adaptive lock").concurrency.get();
    let timed: Vec<_> = calls
        .into_iter()
        .map(|call| async move {
            let started = Instant::now();
            let answer = call.await;
            (started.elapsed(), answer)
        })
        .collect();
    let mut in_flight = futures::stream::iter(timed).buffer_unordered(concurrency);
    let (mut round, mut answers, mut failure) = (Round::default(), Vec::new(), None);
    while let Some((took, answer)) = in_flight.next().await {
        round.slowest = round.slowest.max(took);
        match answer {
            Ok(a) => {
                round.throttled |= throttled(&a);
                answers.push(a);
            }
            Err(e) => {
                round.throttled = true;
                failure.get_or_insert(e);
            }
        }
    }
    drop(in_flight);
    adaptive.lock().expect("adaptive lock").after_round(round);
    failure.map_or(Ok(answers), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_steps_and_halves_on_throttling() {
        let mut a = Adaptive::new(200, 8, Duration::from_secs(2));
        assert_eq!((a.size.get(), a.concurrency.get()), (200, 2));
        let fast = Round { throttled: false, slowest: Duration::from_millis(100) };
        for _ in 0..10 {
            a.after_round(fast);
        }
        assert_eq!(a.concurrency.get(), 8, "capped at the maximum");
        a.after_round(Round { throttled: true, slowest: Duration::ZERO });
        assert_eq!((a.size.get(), a.concurrency.get()), (100, 4));
        a.after_round(Round { throttled: false, slowest: Duration::from_secs(3) });
        assert_eq!((a.size.get(), a.concurrency.get()), (100, 2), "slow calls shed concurrency, not size");
        for _ in 0..5 {
            a.after_round(Round { throttled: true, slowest: Duration::ZERO });
        }
        assert_eq!((a.size.get(), a.concurrency.get()), (25, 1), "floors: an eighth of the size, one call");
        a.after_round(fast);
        assert_eq!((a.size.get(), a.concurrency.get()), (45, 2));
    }
}
