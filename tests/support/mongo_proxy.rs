//! A MongoDB wire-protocol proxy in front of the test server, for the one answer that server
//! never gives: `ChangeStreamHistoryLost` (code 286), what MongoDB replies when a change stream
//! is resumed from a token the oplog has rolled past.
//!
//! Every message is forwarded unchanged, except that once [`MongoProxy::lose_history`] is armed,
//! the next `aggregate` opening a change stream from a stored point (`resumeAfter`, `startAfter`
//! or `startAtOperationTime`) is answered with that error instead of reaching the server.
//! It runs on a thread of its own, so a test may block on a `sluice` process meanwhile.

use mongodb::bson::{doc, Bson, Document};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// OP_MSG, the only opcode modern drivers send after the handshake.
const OP_MSG: i32 = 2013;

pub struct MongoProxy {
    pub port: u16,
    /// Armed: the next resumed change stream is told its history is lost.
    lose: Arc<AtomicBool>,
    /// Counts the proxy's answers with the error.
    lost: Arc<std::sync::atomic::AtomicUsize>,
}

impl MongoProxy {
    /// Listens on a free loopback port and forwards to `upstream` (host:port).
    pub fn start(upstream: &str) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let lose = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (upstream, arm, count) = (upstream.to_string(), lose.clone(), lost.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((client, _)) = listener.accept().await else { return };
                    let (upstream, arm, count) = (upstream.clone(), arm.clone(), count.clone());
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(&upstream).await {
                            let _ = relay(client, server, arm, count).await;
                        }
                    });
                }
            });
        });
        Self { port, lose, lost }
    }

    /// A connection string through the proxy.
    pub fn url(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// Arms the proxy: the next resumed change stream gets `ChangeStreamHistoryLost`.
    pub fn lose_history(&self) {
        self.lose.store(true, Ordering::SeqCst);
    }

    /// How many times the proxy has answered with the error.
    pub fn times_lost(&self) -> usize {
        self.lost.load(Ordering::SeqCst)
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    arm: Arc<AtomicBool>,
    count: Arc<std::sync::atomic::AtomicUsize>,
) -> std::io::Result<()> {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // The client's side is written by the server's replies and by the proxy's own answers.
    let (to_client, mut replies) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(frame) = replies.recv().await {
            if client_write.write_all(&frame).await.is_err() {
                return;
            }
        }
    });
    let from_server = to_client.clone();
    let reader = tokio::spawn(async move {
        while let Ok(frame) = read_frame(&mut server_read).await {
            if from_server.send(frame).is_err() {
                return;
            }
        }
    });
    while let Ok(frame) = read_frame(&mut client_read).await {
        if resumes_a_change_stream(&frame) && arm.swap(false, Ordering::SeqCst) {
            count.fetch_add(1, Ordering::SeqCst);
            let _ = to_client.send(history_lost_reply(&frame));
            continue;
        }
        server_write.write_all(&frame).await?;
    }
    reader.abort();
    writer.abort();
    Ok(())
}

/// One whole message: its 4-byte little-endian length counts itself.
async fn read_frame(r: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).await?;
    let len = i32::from_le_bytes(prefix) as usize;
    let mut frame = prefix.to_vec();
    frame.resize(len.max(4), 0);
    r.read_exact(&mut frame[4..]).await?;
    Ok(frame)
}

/// The command document of an OP_MSG (its body section), if the frame is one.
fn command(frame: &[u8]) -> Option<Document> {
    let opcode = i32::from_le_bytes(frame.get(12..16)?.try_into().ok()?);
    // Header (16 bytes), flag bits (4), then the body section: kind 0 and one document.
    if opcode != OP_MSG || *frame.get(20)? != 0 {
        return None;
    }
    Document::from_reader(frame.get(21..)?).ok()
}

fn resumes_a_change_stream(frame: &[u8]) -> bool {
    let Some(cmd) = command(frame) else { return false };
    if !cmd.contains_key("aggregate") {
        return false;
    }
    let Ok(pipeline) = cmd.get_array("pipeline") else { return false };
    let Some(Bson::Document(first)) = pipeline.first() else { return false };
    let Ok(stream) = first.get_document("$changeStream") else { return false };
    ["resumeAfter", "startAfter", "startAtOperationTime"].iter().any(|k| stream.contains_key(k))
}

/// An OP_MSG answering `request` with the server's error for a resume point past the oplog.
fn history_lost_reply(request: &[u8]) -> Vec<u8> {
    let body = doc! {
        "ok": 0.0,
        "errmsg": "Resume of change stream was not possible, as the resume point may no longer be in the oplog.",
        "code": 286,
        "codeName": "ChangeStreamHistoryLost",
    };
    let mut doc_bytes = Vec::new();
    body.to_writer(&mut doc_bytes).unwrap();
    let request_id = &request[4..8];
    let len = (16 + 4 + 1 + doc_bytes.len()) as i32;
    let mut out = Vec::with_capacity(len as usize);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&0x5eed_i32.to_le_bytes());
    out.extend_from_slice(request_id);
    out.extend_from_slice(&OP_MSG.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(0);
    out.extend_from_slice(&doc_bytes);
    out
}
