//! The benchmarks' PostgreSQL side: a connection to the services script's server, and the
//! `COPY ... TO STDOUT` baseline.

use std::time::Instant;
use tokio_postgres::{Client, NoTls};

pub async fn connect(db: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(&format!("host=127.0.0.1 user=cdc password=cdc dbname={db}"), NoTls)
        .await
        .expect("PostgreSQL from scripts/services.sh");
    tokio::spawn(conn);
    c
}

/// Rows/s of `COPY table TO STDOUT` read by a client that only counts rows.
pub async fn copy_rate(db: &Client, table: &str) -> f64 {
    let started = Instant::now();
    let stream = db.copy_out(&format!("COPY {table} TO STDOUT")).await.unwrap();
    futures::pin_mut!(stream);
    let mut copied = 0usize;
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        copied += chunk.unwrap().iter().filter(|&&b| b == b'\n').count();
    }
    copied as f64 / started.elapsed().as_secs_f64()
}
