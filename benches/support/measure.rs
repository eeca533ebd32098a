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

/// CPU seconds (user + system) of any running process of this machine (a server's, too), from
/// /proc.
#[allow(dead_code)]
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// The `sluice` measured: this build's, or `SLUICE_BENCH_BIN` (another build of it: a
/// `--profile production` one, or an earlier commit's, for a same-machine comparison).
pub fn sluice_bin() -> String {
    std::env::var("SLUICE_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sluice").to_string())
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
    run(file, "warn", &[]).0
}

/// As [`run_sluice`], also returning what it logged as JSON lines at `info`, for timings taken
/// from the log's events.
#[allow(dead_code)]
pub fn run_sluice_logged(file: &Path) -> (Measured, String) {
    run(file, "info", &["--log-format", "json"])
}

fn run(file: &Path, level: &str, global_args: &[&str]) -> (Measured, String) {
    let (cpu0, _) = usage(UsageWho::RUSAGE_CHILDREN);
    let start = Instant::now();
    let out = Command::new(sluice_bin())
        .args(global_args)
        .args(["run", file.to_str().unwrap(), "--until-idle", "1s"])
        .env("RUST_LOG", level)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{log}");
    let wall = start.elapsed();
    let (cpu1, rss) = usage(UsageWho::RUSAGE_CHILDREN);
    // A warning during a measured run (a paused budget, a retry) explains an odd figure: show it.
    for line in log.lines().filter(|l| l.contains("WARN")) {
        println!("  sluice warned: {line}");
    }
    (Measured { wall, cpu: cpu1 - cpu0, peak_rss_mib: rss }, log)
}
