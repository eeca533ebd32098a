//! Measuring `sluice` runs from a benchmark: wall time, CPU seconds and peak RSS of the child.

use nix::sys::resource::{getrusage, UsageWho};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// CPU seconds (user + system) and peak RSS (MiB) of `who`, cumulative.
pub fn usage(who: UsageWho) -> (f64, f64) {
    let u = getrusage(who).unwrap();
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    (secs(u.user_time()) + secs(u.system_time()), u.max_rss() as f64 / 1024.0)
}

/// One `sluice run FILE --until-idle 1s`.
pub struct Measured {
    /// Wall time including the 1 s idle window.
    pub wall: Duration,
    pub cpu: f64,
    /// Peak RSS of any child so far (getrusage keeps the maximum).
    pub peak_rss_mib: f64,
}

/// Runs `sluice run FILE --until-idle 1s` to success and measures it.
pub fn run_sluice(file: &Path) -> Measured {
    let (cpu0, _) = usage(UsageWho::RUSAGE_CHILDREN);
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", file.to_str().unwrap(), "--until-idle", "1s"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let wall = start.elapsed();
    let (cpu1, rss) = usage(UsageWho::RUSAGE_CHILDREN);
    // A warning during a measured run (a paused budget, a retry) explains an odd figure: show it.
    for line in String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.contains("WARN")) {
        println!("  sluice warned: {line}");
    }
    Measured { wall, cpu: cpu1 - cpu0, peak_rss_mib: rss }
}
