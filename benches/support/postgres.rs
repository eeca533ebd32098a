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

/// Vacuums and analyzes a freshly loaded table and checkpoints, so the load's dirty pages are
/// written out before anything is measured; returns the table's size in bytes.
pub async fn settle_table(db: &Client, table: &str) -> i64 {
    db.batch_execute(&format!("VACUUM ANALYZE {table}")).await.unwrap();
    db.batch_execute("CHECKPOINT").await.unwrap();
    db.query_one(&format!("SELECT pg_table_size('{table}')"), &[]).await.unwrap().get(0)
}
