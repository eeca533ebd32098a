//! A MongoDB database of its own per test, on the server the services script starts.

use super::Running;
use mongodb::bson::{Bson, Document};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The server the services script starts (nx-27017 speaks the MongoDB protocol but is not a
/// replica set, so the driver must connect directly); override with SLUICE_TEST_MONGO_URL.
pub fn mongo_url() -> String {
    std::env::var("SLUICE_TEST_MONGO_URL").unwrap_or_else(|_| "mongodb://127.0.0.1:27017/?directConnection=true".into())
}

pub struct TestMongo {
    pub name: String,
    pub db: mongodb::Database,
    pub dir: tempfile::TempDir,
}

impl TestMongo {
    pub async fn new(test: &str) -> Self {
        let name = format!("t_{test}_{}", std::process::id());
        let client = mongodb::Client::with_uri_str(mongo_url()).await.unwrap();
        let db = client.database(&name);
        db.drop().await.unwrap_or_else(|e| panic!("cannot reach MongoDB ({e}); run scripts/services.sh first"));
        Self { name, db, dir: tempfile::tempdir().unwrap() }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn lake_dir(&self) -> PathBuf {
        self.dir.path().join("lake")
    }

    /// Writes a pipeline capturing `collections` (every collection when empty) into a file://
    /// lake; `extra_source` lines go into the source block.
    pub fn pipeline_file(&self, collections: &[&str], extra_source: &str) -> PathBuf {
        let colls = match collections {
            [] => String::new(),
            list => format!("  collections: [{}]\n", list.join(", ")),
        };
        let yaml = format!(
            "name: {name}\nsource:\n  type: mongodb\n  url: \"{url}\"\n  database: {name}\n{colls}\
             \x20 snapshot_chunk_rows: 100\n{extra_source}\
             transport:\n  type: embedded\n  path: {data}\nsinks:\n  - name: lake\n    type: parquet\n    url: file://{lake}/\n\
             \x20   roll: {{ max_rows: 2000, max_age: 1s }}\n",
            name = self.name,
            url = mongo_url(),
            data = self.data_dir().display(),
            lake = self.lake_dir().display(),
        );
        let path = self.dir.path().join("pipeline.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// Writes a pipeline capturing `collections` into the given `sinks:` list (YAML items).
    pub fn pipeline_with_sinks(&self, collections: &[&str], sinks: &str) -> PathBuf {
        let yaml = format!(
            "name: {name}\nsource:\n  type: mongodb\n  url: \"{url}\"\n  database: {name}\n  collections: [{colls}]\n\
             transport:\n  type: embedded\n  path: {data}\nsinks:\n{sinks}",
            name = self.name,
            url = mongo_url(),
            colls = collections.join(", "),
            data = self.data_dir().display(),
        );
        let path = self.dir.path().join("pipeline.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// Waits until `running` (that very process) has finished its snapshots.
    pub async fn await_streaming(&self, running: &Running) {
        let status = self.data_dir().join("status.json");
        let pid = running.child.id() as u64;
        super::eventually("the pipeline to stream", Duration::from_secs(60), || async {
            let raw = std::fs::read(&status).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
            v["pid"].as_u64().filter(|p| *p == pid)?;
            v["snapshot_done"].as_bool().filter(|d| *d).map(|_| ())
        })
        .await;
    }

    /// A collection's documents as relaxed Extended JSON, by `_id` as relaxed Extended JSON.
    pub async fn documents(&self, collection: &str) -> BTreeMap<String, serde_json::Value> {
        use futures::TryStreamExt;
        let docs: Vec<Document> = self
            .db
            .collection::<Document>(collection)
            .find(Document::new())
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        docs.into_iter()
            .map(|d| {
                let id = d.get("_id").unwrap().clone().into_relaxed_extjson().to_string();
                (id, Bson::Document(d).into_relaxed_extjson())
            })
            .collect()
    }
}

/// The lake's replayed state of a collection: `_id` text to the parsed document.
pub fn lake_documents(rows: &[super::lake::ChangeRow]) -> BTreeMap<String, serde_json::Value> {
    super::lake::replay(rows, "_id")
        .into_iter()
        .map(|(id, cols)| {
            let doc = cols["document"].as_deref().expect("a landed document has its JSON");
            (id, serde_json::from_str(doc).unwrap())
        })
        .collect()
}
