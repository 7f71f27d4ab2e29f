//! View snapshots: every view's rows at one engine snapshot (one epoch),
//! written as zstd Parquet to `views/<view>/date=YYYY-MM-DD/<id>.parquet`
//! with a `snapshot_ts` column, then a manifest
//! `views/_manifest/<id>.json` listing the files. The manifest is written
//! last: a snapshot exists once its manifest does, and `snapshots.<view>`
//! reads only files of committed snapshots.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime, Utc};
use datafusion::{
    arrow::{
        array::{ArrayRef, RecordBatch, TimestampMillisecondArray},
        datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit},
    },
    datasource::TableType,
};
use parquet::{
    arrow::ArrowWriter,
    basic::{Compression, ZstdLevel},
    file::properties::WriterProperties,
};
use serde::{Deserialize, Serialize};
use storepulse_engine::EngineHandle;
use tokio::sync::{watch, Mutex};

use crate::{
    error::{LakeError, Result},
    store::Lake,
};

/// The column added to every snapshot row.
pub const SNAPSHOT_TS: &str = "snapshot_ts";
/// Where manifests live (relative to the lake root).
pub const MANIFEST_DIR: &str = "views/_manifest";
const ID_FORMAT: &str = "%Y%m%dT%H%M%S%3fZ";

/// A committed snapshot: `views/_manifest/<id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotManifest {
    /// `20261122T061500123Z`.
    pub id: String,
    /// Wall-clock time of the snapshot (ms since the epoch; the files'
    /// `snapshot_ts`).
    pub snapshot_ts: i64,
    /// The event time the views were "as of" (`engine_clock.as_of`).
    pub as_of: Option<i64>,
    /// The engine epoch read (batches applied).
    pub epoch: u64,
    /// One file per view.
    pub files: Vec<ManifestFile>,
}

/// One view's file in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestFile {
    /// View name.
    pub view: String,
    /// Path relative to the lake root.
    pub path: String,
    /// Rows.
    pub rows: usize,
    /// Parquet bytes.
    pub bytes: usize,
}

/// Snapshot id → time (ms), for manifest names.
pub fn parse_id(id: &str) -> Option<i64> {
    NaiveDateTime::parse_from_str(id, ID_FORMAT)
        .ok()
        .map(|t| t.and_utc().timestamp_millis())
}

/// Writes snapshots of a fixed list of views.
#[derive(Debug)]
pub struct Snapshotter {
    lake: Lake,
    handle: EngineHandle,
    views: Vec<(String, SchemaRef)>,
    running: Mutex<()>,
}

/// Every view the engine serves: materialized and `CREATE VIEW`, with the
/// schema a snapshot file has (the view's columns + `snapshot_ts`).
pub async fn snapshot_views(
    handle: &EngineHandle,
    only: &[String],
) -> Result<Vec<(String, SchemaRef)>> {
    let ctx = handle.serving_context().clone();
    let materialized: Vec<String> = handle
        .lock()
        .await
        .views()
        .into_iter()
        .map(|v| v.name)
        .collect();
    let schema = ctx
        .catalog("datafusion")
        .and_then(|c| c.schema("public"))
        .ok_or_else(|| LakeError::Config("no datafusion.public schema".into()))?;
    let mut names = Vec::new();
    for name in schema.table_names() {
        let Some(t) = schema.table(&name).await? else {
            continue;
        };
        if materialized.contains(&name) || t.table_type() == TableType::View {
            names.push((name, t.schema()));
        }
    }
    names.sort_by(|a, b| a.0.cmp(&b.0));
    if !only.is_empty() {
        for v in only {
            if !names.iter().any(|(n, _)| n == v) {
                return Err(LakeError::Config(format!(
                    "lake.snapshots.views: no view named '{v}'"
                )));
            }
        }
        names.retain(|(n, _)| only.contains(n));
    }
    let mut out = Vec::with_capacity(names.len());
    for (name, s) in names {
        if s.column_with_name(SNAPSHOT_TS).is_some() {
            return Err(LakeError::Config(format!(
                "view '{name}' has a column named {SNAPSHOT_TS}, which snapshots add"
            )));
        }
        out.push((name, with_snapshot_ts(&s)));
    }
    Ok(out)
}

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn with_snapshot_ts(s: &SchemaRef) -> SchemaRef {
    // Nullable: a view's declared nullability is not always what a query
    // returns, and a reader must accept every file.
    let mut fields: Vec<Field> = s
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    fields.push(Field::new(SNAPSHOT_TS, ts_type(), false));
    Arc::new(Schema::new(fields))
}

impl Snapshotter {
    /// Snapshots `views` (from [`snapshot_views`]).
    pub fn new(lake: Lake, handle: EngineHandle, views: Vec<(String, SchemaRef)>) -> Self {
        Self {
            lake,
            handle,
            views,
            running: Mutex::new(()),
        }
    }

    /// The views snapshotted, with their file schemas.
    pub fn views(&self) -> &[(String, SchemaRef)] {
        &self.views
    }

    /// Takes one snapshot (one at a time). Writes are retried until
    /// `timeout`; on failure the files already written are removed and no
    /// manifest is written, so nothing of it is visible.
    pub async fn take(&self, timeout: Duration) -> Result<SnapshotManifest> {
        let _one = self.running.lock().await;
        let started = std::time::Instant::now();
        let now = Utc::now();
        let ts = now.timestamp_millis();
        let id = now.format(ID_FORMAT).to_string();
        let date = now.format("%Y-%m-%d").to_string();
        let queries: Vec<String> = self
            .views
            .iter()
            .map(|(v, _)| format!("SELECT * FROM \"{v}\""))
            .collect();
        let (outputs, as_of, epoch) = self.handle.query_consistent(&queries).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut files = Vec::with_capacity(self.views.len());
        let mut written = Vec::new();
        let result: Result<()> = async {
            for ((view, schema), out) in self.views.iter().zip(outputs) {
                let (schema, batches) = (schema.clone(), out.batches);
                let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
                let bytes = tokio::task::spawn_blocking(move || encode(&schema, &batches, ts))
                    .await
                    .map_err(|e| LakeError::Encode {
                        what: view.clone(),
                        message: e.to_string(),
                    })??;
                let rel = format!("views/{view}/date={date}/{id}.parquet");
                let path = self.lake.path(&rel);
                let size = bytes.len();
                self.lake.put_retrying(&path, bytes, Some(deadline)).await?;
                written.push(path);
                files.push(ManifestFile {
                    view: view.clone(),
                    path: rel,
                    rows,
                    bytes: size,
                });
            }
            Ok(())
        }
        .await;
        let manifest = SnapshotManifest {
            id: id.clone(),
            snapshot_ts: ts,
            as_of,
            epoch,
            files,
        };
        let result = match result {
            Ok(()) => {
                let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
                let path = self.lake.path(&format!("{MANIFEST_DIR}/{id}.json"));
                self.lake
                    .put_retrying(&path, Bytes::from(json), Some(deadline))
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            for p in written {
                let _ = self.lake.delete(&p).await;
            }
            metrics::counter!(crate::metric_names::LAKE_SNAPSHOT_ERRORS_TOTAL).increment(1);
            return Err(e);
        }
        let status = self.lake.status();
        status
            .snapshots
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let total_bytes: usize = manifest.files.iter().map(|f| f.bytes).sum();
        status.set_last_snapshot(serde_json::json!({
            "id": manifest.id, "as_of": manifest.as_of, "epoch": manifest.epoch,
            "views": manifest.files.len(), "bytes": total_bytes,
            "seconds": started.elapsed().as_secs_f64(),
        }));
        metrics::counter!(crate::metric_names::LAKE_SNAPSHOTS_TOTAL).increment(1);
        metrics::histogram!(crate::metric_names::LAKE_SNAPSHOT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        tracing::info!(id = %manifest.id, views = manifest.files.len(), bytes = total_bytes, seconds = started.elapsed().as_secs_f64(), "snapshot committed");
        Ok(manifest)
    }

    /// Takes a snapshot every `interval` until `shutdown` (a failed one is
    /// logged and counted; the next interval tries again).
    pub async fn run(self: Arc<Self>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        if interval.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.take(interval.max(Duration::from_secs(60))).await {
                tracing::error!(error = %e, "snapshot failed");
            }
        }
    }

    /// Committed snapshots, oldest first.
    pub async fn manifests(&self) -> Result<Vec<SnapshotManifest>> {
        read_manifests(&self.lake).await
    }
}

/// Every committed manifest under the lake, oldest first.
pub async fn read_manifests(lake: &Lake) -> Result<Vec<SnapshotManifest>> {
    let mut metas = lake.list(MANIFEST_DIR).await?;
    metas.sort_by(|a, b| a.location.cmp(&b.location));
    let mut out = Vec::with_capacity(metas.len());
    for m in metas {
        if !m.location.as_ref().ends_with(".json") {
            continue;
        }
        let bytes = lake.get(&m.location).await?;
        let manifest: SnapshotManifest =
            serde_json::from_slice(&bytes).map_err(|e| LakeError::Encode {
                what: lake.url_of(&m.location),
                message: e.to_string(),
            })?;
        out.push(manifest);
    }
    Ok(out)
}

/// The `snapshot_ts` of every committed snapshot (from manifest names; one
/// LIST, no reads).
pub async fn committed_ids(lake: &Lake) -> Result<Vec<i64>> {
    let metas = lake.list(MANIFEST_DIR).await?;
    let mut out: Vec<i64> = metas
        .iter()
        .filter_map(|m| m.location.filename())
        .filter_map(|f| f.strip_suffix(".json"))
        .filter_map(parse_id)
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Parquet bytes of a view's rows with `snapshot_ts` appended.
fn encode(schema: &SchemaRef, batches: &[RecordBatch], ts: i64) -> Result<Bytes> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_created_by(format!("storepulse {}", env!("CARGO_PKG_VERSION")))
        .build();
    let mut w = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props))?;
    for b in batches {
        let mut cols: Vec<ArrayRef> = b.columns().to_vec();
        cols.push(Arc::new(
            TimestampMillisecondArray::from(vec![ts; b.num_rows()]).with_timezone("UTC"),
        ));
        w.write(&RecordBatch::try_new(schema.clone(), cols)?)?;
    }
    Ok(Bytes::from(w.into_inner()?))
}

/// When `id` was taken, as a UTC date-time.
pub fn id_time(id: &str) -> Option<DateTime<Utc>> {
    parse_id(id).and_then(DateTime::from_timestamp_millis)
}
