//! The replication protocol, behind one small module.
//!
//! pg_walstream 0.9 carries the walsender conversation (slot creation with an exported snapshot,
//! START_REPLICATION with pgoutput protocol v2 and `streaming 'on'`, keepalives and standby
//! status updates). It was chosen over pgwire-replication 0.5, which hard-codes protocol
//! version 1 and so cannot stream large in-progress transactions. sluice decodes the raw
//! pgoutput bytes itself with the crate's parser, keeping unchanged-TOAST markers.

use crate::config::{PgConnection, TlsMode};
use crate::error::{Error, Result};
use pg_walstream::{
    CancellationToken, LogicalReplicationMessage, LogicalReplicationParser, LogicalReplicationStream,
    ReplicationSlotOptions, ReplicationStreamConfig, RetryConfig, StreamingMode,
};
use std::time::Duration;

use super::values::SESSION_OPTIONS;

/// One decoded pgoutput message with its WAL positions.
pub struct WalMessage {
    pub wal_end: u64,
    pub message: LogicalReplicationMessage,
    /// The (sub)transaction of a change inside a streamed transaction.
    pub stream_xid: Option<u32>,
}

/// A replication connection: created, optionally used to export a snapshot, then started.
pub struct ReplicationStream {
    inner: LogicalReplicationStream,
    parser: LogicalReplicationParser,
    cancel: CancellationToken,
    /// Between Stream Start and Stream Stop, where changes carry their (sub)transaction xid.
    in_stream: bool,
}

impl ReplicationStream {
    /// Connects a replication session. `temporary` slots vanish when the session ends.
    pub async fn connect(
        conn: &PgConnection,
        slot: &str,
        publication: &str,
        temporary: bool,
        cancel: CancellationToken,
    ) -> Result<Self> {
        let config = ReplicationStreamConfig::new(
            slot.to_string(),
            publication.to_string(),
            2,
            StreamingMode::On,
            Duration::from_secs(1),
            Duration::from_secs(10),
            Duration::from_secs(60),
            RetryConfig { max_attempts: 1, ..RetryConfig::default() },
        )
        .with_messages(true)
        .with_slot_options(ReplicationSlotOptions {
            temporary,
            snapshot: Some("export".into()),
            ..Default::default()
        });
        let inner = LogicalReplicationStream::new(&conninfo(conn), config)
            .await
            .map_err(|e| Error::retryable(format!("replication connection to {}", conn.display_target()), e))?;
        Ok(Self { inner, parser: LogicalReplicationParser::with_protocol_version(2), cancel, in_stream: false })
    }

    /// Creates the slot if it does not exist; returns the exported snapshot's name if created.
    pub async fn create_slot(&mut self) -> Result<Option<String>> {
        self.inner.ensure_replication_slot().await.map_err(|e| Error::permanent("create replication slot", e))?;
        Ok(self.inner.exported_snapshot_name().map(str::to_string))
    }

    /// Starts streaming after `from` (the server's confirmed position when 0).
    pub async fn start(&mut self, from: u64) -> Result<()> {
        let from = (from > 0).then_some(from);
        self.inner.start(from).await.map_err(|e| Error::retryable("START_REPLICATION", e))
    }

    /// The next pgoutput message; `Ok(None)` once cancelled.
    pub async fn next(&mut self) -> Result<Option<WalMessage>> {
        let raw = match self.inner.next_raw_event(&self.cancel).await {
            Ok(raw) => raw,
            Err(e) if e.is_cancelled() => return Ok(None),
            Err(e) => return Err(Error::retryable("replication stream", e)),
        };
        let sub_xid = if self.in_stream { change_xid(&raw.data) } else { None };
        match raw.data.first() {
            Some(b'S') => self.in_stream = true,
            Some(b'E') => self.in_stream = false,
            _ => {}
        }
        let parsed =
            self.parser.parse_wal_message_bytes(raw.data).map_err(|e| Error::permanent("pgoutput decoding", e))?;
        Ok(Some(WalMessage {
            wal_end: raw.wal_end.value(),
            message: parsed.message,
            stream_xid: sub_xid.or(parsed.xid),
        }))
    }

    /// A handle for acknowledging positions while another task reads the stream.
    pub fn feedback(&self) -> Feedback {
        Feedback(self.inner.shared_lsn_feedback.clone())
    }

    /// Sends the acknowledged position now (at shutdown).
    pub async fn flush_feedback(&mut self) -> Result<()> {
        self.inner.send_feedback().await.map_err(|e| Error::retryable("standby status update", e))
    }
}

/// The (sub)transaction xid that protocol v2 puts after the type byte of a change inside a
/// streamed block. pg_walstream 0.9 reads and drops it, reporting the block's top-level xid for
/// every change, which cannot tell which changes a rolled-back savepoint removes.
fn change_xid(data: &[u8]) -> Option<u32> {
    match data.first()? {
        b'I' | b'U' | b'D' | b'T' | b'R' | b'Y' | b'M' => Some(u32::from_be_bytes(data.get(1..5)?.try_into().ok()?)),
        _ => None,
    }
}

/// Acknowledges durable positions; the stream sends them with its next status update.
#[derive(Clone)]
pub struct Feedback(std::sync::Arc<pg_walstream::SharedLsnFeedback>);

impl Feedback {
    /// Reports everything up to `lsn` as durable, so the server may recycle that WAL.
    pub fn acknowledge(&self, lsn: u64) {
        self.0.update_applied_lsn(lsn);
    }
}

/// A libpq connection string for a replication session. pg_walstream 0.9 does not forward
/// `options` or `application_name` to the server (observed: the walsender runs with server
/// defaults and no name), which is why the value decoder accepts every default text style.
fn conninfo(conn: &PgConnection) -> String {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let mut out = format!("postgresql://{}", enc(&conn.user));
    if let Some(pw) = &conn.password {
        out.push(':');
        out.push_str(&enc(pw.expose()));
    }
    let host = if conn.host.contains(':') { format!("[{}]", conn.host) } else { conn.host.clone() };
    out.push_str(&format!("@{host}:{}/{}?replication=database", conn.port, enc(&conn.dbname)));
    out.push_str(&format!("&sslmode={}", if conn.tls == TlsMode::Prefer { "prefer" } else { conn.tls.as_str() }));
    if let Some(ca) = &conn.root_cert {
        out.push_str(&format!("&sslrootcert={}", enc(&ca.display().to_string())));
    }
    out.push_str(&format!("&options={}&application_name=sluice", enc(SESSION_OPTIONS)));
    out
}
