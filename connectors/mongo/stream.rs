//! One collection's change stream, read in its own task and handed to the source's writer.

use super::change::{decode, Change, ChangeKind, Reassembly};
use super::{classify, is_history_lost};
use crate::config::{FullDocument, MongoSourceConfig};
use crate::error::{Error, Result};
use mongodb::bson::{self, doc, Bson, Document, RawDocumentBuf};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::options::{FullDocumentBeforeChangeType, FullDocumentType};
use mongodb::Collection;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long the server holds a `getMore` open waiting for changes.
const MAX_AWAIT: Duration = Duration::from_millis(500);
/// A server that answers an empty `getMore` at once (no await) is asked again after this.
const EMPTY_POLL_PAUSE: Duration = Duration::from_millis(50);
/// The server error for a stage it does not know.
const UNKNOWN_STAGE: i32 = 40324;

/// What a stream task hands the writer, in stream order per collection.
#[derive(Debug)]
pub enum Item {
    /// A change of collection `.0`.
    Change(usize, Box<Change>),
    /// Collection `.0`'s stream came back empty; the token resumes after everything so far.
    Idle(usize, Option<Document>),
    /// Collection `.0`'s resume point has left the oplog.
    HistoryLost(usize, String),
}

/// The stream options every collection shares.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    full_document: FullDocumentType,
    before_change: Option<FullDocumentBeforeChangeType>,
}

impl StreamOptions {
    pub fn new(cfg: &MongoSourceConfig) -> Self {
        let (full_document, before_change) = match cfg.full_document {
            FullDocument::UpdateLookup => (FullDocumentType::UpdateLookup, None),
            FullDocument::WhenAvailable => {
                (FullDocumentType::WhenAvailable, Some(FullDocumentBeforeChangeType::WhenAvailable))
            }
            FullDocument::Required => (FullDocumentType::Required, Some(FullDocumentBeforeChangeType::Required)),
        };
        Self { full_document, before_change }
    }
}

fn to_token(token: &Document) -> Result<ResumeToken> {
    bson::from_bson(Bson::Document(token.clone())).map_err(|e| Error::Storage(format!("resume token: {e}")))
}

fn from_token(token: ResumeToken) -> Option<Document> {
    match bson::to_bson(&token) {
        Ok(Bson::Document(d)) => Some(d),
        _ => None,
    }
}

/// Opens a stream at `start` (a token, and whether it is an invalidate's).
async fn open(
    coll: &Collection<Document>,
    options: &StreamOptions,
    start: Option<&(Document, bool)>,
    split: bool,
) -> std::result::Result<ChangeStream<RawDocumentBuf>, mongodb::error::Error> {
    // Events over 16 MiB come in fragments instead of failing the stream (MongoDB 7.0+).
    let pipeline = if split { vec![doc! { "$changeStreamSplitLargeEvent": {} }] } else { Vec::new() };
    let mut watch =
        coll.watch().pipeline(pipeline).full_document(options.full_document.clone()).max_await_time(MAX_AWAIT);
    if let Some(before) = &options.before_change {
        watch = watch.full_document_before_change(before.clone());
    }
    if let Some((token, after_invalidate)) = start {
        let token = to_token(token).map_err(|e| mongodb::error::Error::custom(e.to_string()))?;
        watch = if *after_invalidate { watch.start_after(token) } else { watch.resume_after(token) };
    }
    // Raw, so that no `$`-key of a document is read as Extended JSON on the way in.
    Ok(watch.await?.with_type::<RawDocumentBuf>())
}

fn to_document(raw: RawDocumentBuf) -> std::result::Result<Document, super::change::DecodeError> {
    Document::try_from(raw.as_ref()).map_err(|e| super::change::DecodeError { what: format!("is not valid BSON: {e}") })
}

/// Whether the server refused the split stage as unknown (before MongoDB 7.0).
fn unknown_stage(e: &mongodb::error::Error) -> bool {
    matches!(&*e.kind, mongodb::error::ErrorKind::Command(c) if c.code == UNKNOWN_STAGE)
}

/// Opens a stream at the current point and returns its resume token: where a new capture starts.
pub async fn current_token(coll: &Collection<Document>, options: &StreamOptions) -> Result<Document> {
    let ns = coll.namespace().to_string();
    let stream = match open(coll, options, None, true).await {
        Err(e) if unknown_stage(&e) => open(coll, options, None, false).await,
        other => other,
    }
    .map_err(|e| classify("watch", &ns, e))?;
    stream.resume_token().and_then(from_token).ok_or_else(|| {
        Error::permanent(
            format!("watch {ns}"),
            "the server gave no resume token for a new change stream (postBatchResumeToken)",
        )
    })
}

/// Reads collection `index`'s stream from `start` until cancelled or failed, reopening it after
/// an invalidate (`startAfter`) and when the driver's own resume gives up.
pub async fn watch(
    coll: Collection<Document>,
    index: usize,
    mut start: Option<(Document, bool)>,
    options: StreamOptions,
    tx: mpsc::Sender<Result<Item>>,
    cancel: CancellationToken,
) {
    let ns = coll.namespace().to_string();
    let mut split = true;
    loop {
        let opened = tokio::select! {
            _ = cancel.cancelled() => return,
            s = open(&coll, &options, start.as_ref(), split) => s,
        };
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) if split && unknown_stage(&e) => {
                tracing::info!(collection = %coll.namespace(), "server has no $changeStreamSplitLargeEvent; events over 16 MiB will fail the stream");
                split = false;
                continue;
            }
            Err(e) => {
                let item = if is_history_lost(&e) {
                    Ok(Item::HistoryLost(index, e.to_string()))
                } else {
                    Err(classify("watch", &ns, e))
                };
                let _ = tx.send(item).await;
                return;
            }
        };
        let mut parts = Reassembly::default();
        loop {
            let asked = tokio::time::Instant::now();
            let next = tokio::select! {
                _ = cancel.cancelled() => return,
                n = stream.next_if_any() => n,
            };
            let item = match next {
                Ok(Some(raw)) => {
                    match to_document(raw).and_then(|d| parts.push(d)).and_then(|whole| whole.map(decode).transpose()) {
                        Ok(None) => continue,
                        Ok(Some(change)) => {
                            let invalidate = change.kind == ChangeKind::Invalidate;
                            start = Some((change.token.clone(), invalidate));
                            let sent = tx.send(Ok(Item::Change(index, Box::new(change)))).await;
                            if sent.is_err() {
                                return;
                            }
                            if invalidate {
                                break;
                            }
                            continue;
                        }
                        Err(e) => Err(Error::permanent(format!("watch {ns}"), e)),
                    }
                }
                Ok(None) => {
                    // Mid-way through a split event the stream's token would skip its start.
                    let token = if parts.is_empty() { stream.resume_token().and_then(from_token) } else { None };
                    if let Some(t) = &token {
                        start = Some((t.clone(), false));
                    }
                    if tx.send(Ok(Item::Idle(index, token))).await.is_err() {
                        return;
                    }
                    if !stream.is_alive() {
                        break;
                    }
                    if asked.elapsed() < EMPTY_POLL_PAUSE {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(EMPTY_POLL_PAUSE) => {}
                        }
                    }
                    continue;
                }
                Err(e) if is_history_lost(&e) => Ok(Item::HistoryLost(index, e.to_string())),
                Err(e) => Err(classify("watch", &ns, e)),
            };
            let _ = tx.send(item).await;
            return;
        }
    }
}
