//! Reading a running `sluice`'s Prometheus page from a benchmark, to show where time went.

use std::io::{Read, Write};

/// The `/metrics` page of a sluice listening on loopback `port` (plain HTTP/1.0, so no client
/// library and no TLS provider).
pub fn metrics_page(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).unwrap();
    page
}

/// The `_sum` of a summary (sluice's histograms), over every label set.
pub fn summary_sum(page: &str, name: &str) -> f64 {
    let prefix = format!("{name}_sum");
    page.lines().filter(|l| l.starts_with(&prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// A quantile of a summary without labels, such as `sluice_log_commit_seconds{quantile="0.99"}`.
pub fn summary_quantile(page: &str, name: &str, quantile: &str) -> Option<f64> {
    let prefix = format!("{name}{{quantile=\"{quantile}\"}} ");
    page.lines().find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
}
