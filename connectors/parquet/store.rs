//! Where finished files go: a local directory or any S3-compatible server.

use crate::config::{ObjectTarget, S3Target};
use crate::error::{Error, Result};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use std::path::{Path, PathBuf};

/// Parts of a multipart upload; S3 requires at least 5 MiB for all but the last.
const PART_SIZE: u64 = 8 * 1024 * 1024;

pub enum ObjectStore {
    File { root: PathBuf },
    S3 { client: aws_sdk_s3::Client, bucket: String, prefix: String, multipart_threshold: u64 },
}

impl ObjectStore {
    /// Connects (for S3: creates the bucket when it does not exist).
    pub async fn build(target: &ObjectTarget) -> Result<Self> {
        match target {
            ObjectTarget::File { root } => {
                std::fs::create_dir_all(root)
                    .map_err(|e| Error::config(format!("cannot create sink directory {}: {e}", root.display())))?;
                Ok(ObjectStore::File { root: root.clone() })
            }
            ObjectTarget::S3(s3) => {
                let client = s3_client(s3);
                let exists = client.head_bucket().bucket(&s3.bucket).send().await;
                if exists.is_err() {
                    client.create_bucket().bucket(&s3.bucket).send().await.map_err(|e| {
                        Error::config(format!(
                            "S3 bucket {} is not reachable and cannot be created: {}",
                            s3.bucket,
                            error_text(&e)
                        ))
                    })?;
                    tracing::info!(bucket = %s3.bucket, "created bucket");
                }
                Ok(ObjectStore::S3 {
                    client,
                    bucket: s3.bucket.clone(),
                    prefix: s3.prefix.clone(),
                    multipart_threshold: s3.multipart_threshold,
                })
            }
        }
    }

    /// Publishes a finished local file under `key`, replacing any object of that name. The local
    /// file is gone afterwards (moved into place, or removed once uploaded).
    pub async fn put(&self, local: &Path, key: &str) -> Result<()> {
        match self {
            ObjectStore::File { root } => put_file(local, &root.join(key)).await,
            ObjectStore::S3 { client, bucket, prefix, multipart_threshold } => {
                let key = format!("{prefix}{key}");
                let size = tokio::fs::metadata(local).await.map_err(|e| Error::retryable("s3 upload", e))?.len();
                if size < *multipart_threshold {
                    let body = ByteStream::from_path(local).await.map_err(|e| Error::retryable("s3 upload", e))?;
                    client
                        .put_object()
                        .bucket(bucket)
                        .key(&key)
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| s3_error("put object", &e))?;
                } else {
                    multipart(client, bucket, &key, local, size).await?;
                }
                remove_spooled(local).await;
                Ok(())
            }
        }
    }
}

/// Moves (or, across file systems, copies) a finished file to `dest` durably.
async fn put_file(local: &Path, dest: &Path) -> Result<()> {
    let io = |e| Error::retryable("file sink", e);
    let dir = dest.parent().expect("keys have a directory");
    tokio::fs::create_dir_all(dir).await.map_err(io)?;
    // A retry after a failed directory sync finds the file already in place.
    let moved_earlier =
        !tokio::fs::try_exists(local).await.map_err(io)? && tokio::fs::try_exists(dest).await.map_err(io)?;
    if !moved_earlier {
        tokio::fs::File::open(local).await.map_err(io)?.sync_all().await.map_err(io)?;
        match tokio::fs::rename(local, dest).await {
            Ok(()) => {}
            // Copied beside the destination first, so readers never see a partial file.
            Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
                let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("part");
                let tmp = dir.join(format!(".{name}.tmp"));
                tokio::fs::copy(local, &tmp).await.map_err(io)?;
                tokio::fs::File::open(&tmp).await.map_err(io)?.sync_all().await.map_err(io)?;
                tokio::fs::rename(&tmp, dest).await.map_err(io)?;
                remove_spooled(local).await;
            }
            Err(e) => return Err(io(e)),
        }
    }
    // The rename itself is durable once the directory is.
    tokio::fs::File::open(dir).await.map_err(io)?.sync_all().await.map_err(io)?;
    Ok(())
}

/// Removes a spooled file once its content is published. A failure only leaves a stray file
/// in the spool directory, which is emptied at the next start, so it is reported, not retried.
async fn remove_spooled(local: &Path) {
    if let Err(error) = tokio::fs::remove_file(local).await {
        tracing::warn!(path = %local.display(), %error, "cannot remove spooled file");
    }
}

async fn multipart(client: &aws_sdk_s3::Client, bucket: &str, key: &str, local: &Path, size: u64) -> Result<()> {
    let created = client
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| s3_error("create multipart upload", &e))?;
    let upload_id = created.upload_id().ok_or_else(|| Error::retryable("s3 upload", "no upload id"))?.to_string();
    let result = async {
        let mut parts = Vec::new();
        let mut offset = 0;
        let mut number = 1;
        while offset < size {
            let len = PART_SIZE.min(size - offset);
            let body = ByteStream::read_from()
                .path(local)
                .offset(offset)
                .length(aws_smithy_types::byte_stream::Length::Exact(len))
                .build()
                .await
                .map_err(|e| Error::retryable("s3 upload", e))?;
            let part = client
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(&upload_id)
                .part_number(number)
                .body(body)
                .send()
                .await
                .map_err(|e| s3_error("upload part", &e))?;
            parts
                .push(CompletedPart::builder().part_number(number).set_e_tag(part.e_tag().map(str::to_string)).build());
            offset += len;
            number += 1;
        }
        client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(&upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(|e| s3_error("complete multipart upload", &e))?;
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = client.abort_multipart_upload().bucket(bucket).key(key).upload_id(&upload_id).send().await;
    }
    result
}

fn s3_client(s3: &S3Target) -> aws_sdk_s3::Client {
    let env = |k: &str| std::env::var(k).ok();
    let access = s3
        .access_key_id
        .as_ref()
        .map(|s| s.expose().to_string())
        .or_else(|| env("AWS_ACCESS_KEY_ID"))
        .unwrap_or_default();
    let secret = s3
        .secret_access_key
        .as_ref()
        .map(|s| s.expose().to_string())
        .or_else(|| env("AWS_SECRET_ACCESS_KEY"))
        .unwrap_or_default();
    let creds = aws_credential_types::Credentials::new(access, secret, env("AWS_SESSION_TOKEN"), None, "sluice");
    let mut conf = aws_sdk_s3::Config::builder()
        .behavior_version_latest()
        .region(aws_sdk_s3::config::Region::new(s3.region.clone()))
        .credentials_provider(creds)
        .force_path_style(s3.path_style);
    if let Some(endpoint) = &s3.endpoint {
        conf = conf.endpoint_url(endpoint);
    }
    aws_sdk_s3::Client::from_conf(conf.build())
}

fn error_text<E: std::error::Error>(e: &E) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn s3_error<E: std::error::Error + 'static>(what: &str, e: &aws_sdk_s3::error::SdkError<E>) -> Error {
    use aws_sdk_s3::error::SdkError;
    let text = error_text(e);
    match e {
        SdkError::ServiceError(se) if matches!(se.raw().status().as_u16(), 400 | 403 | 404) => {
            Error::permanent(format!("s3 {what}"), text)
        }
        _ => Error::retryable(format!("s3 {what}"), text),
    }
}
