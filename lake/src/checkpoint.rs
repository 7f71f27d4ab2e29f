//! Checkpoint storage: engine checkpoints on an object store (a local
//! directory by default, `<data_dir>/checkpoints`, or S3), each complete
//! only once its manifest is written.
//!
//! Layout, under the checkpoint root:
//!
//! ```text
//! ckpt-000000000042/engine.json            meta: epoch, streams, positions
//! ckpt-000000000042/views/<view>.arrow     partial-aggregate state
//! ckpt-000000000042/dedup/<stream>.arrow   seen event ids
//! ckpt-000000000042/late_events.arrow
//! ckpt-000000000042/_manifest.json         written last: files and sizes
//! ```
//!
//! A crash while writing leaves a directory without a manifest, which
//! [`CheckpointStore::latest`] ignores (and the next prune deletes). A
//! manifest whose files do not match (missing, other size, undecodable) is
//! skipped with a warning and the next older checkpoint is used, so `keep`
//! ≥ 2 survives one damaged checkpoint. The store lives here because the
//! lake owns the object-store plumbing ([`Lake`]: atomic PUTs, retries,
//! S3 settings).

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use storepulse_engine::EngineCheckpoint;

use crate::{
    config::{LakeConfig, S3Config},
    error::{LakeError, Result},
    store::Lake,
};

/// `[checkpoint]`: periodic checkpoints of the engine's state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Take checkpoints and restore the latest at start.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Time between checkpoints.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Complete checkpoints kept (older ones are deleted); at least 1.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Root: a path, `file:///path` or `s3://bucket/prefix`. Default:
    /// `<data_dir>/checkpoints`.
    #[serde(default)]
    pub url: Option<String>,
    /// S3 settings (as `[lake.s3]`).
    #[serde(default)]
    pub s3: S3Config,
}

fn yes() -> bool {
    true
}
fn default_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_keep() -> usize {
    3
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: default_interval(),
            keep: default_keep(),
            url: None,
            s3: S3Config::default(),
        }
    }
}

/// Name of the manifest (written last).
pub const MANIFEST: &str = "_manifest.json";

/// What a complete checkpoint holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Checkpoint id (`ckpt-<sequence>`).
    pub id: String,
    /// Sequence number (increasing).
    pub sequence: u64,
    /// Wall clock when written (epoch ms).
    pub written_at_ms: i64,
    /// Engine epoch.
    pub epoch: u64,
    /// Files (relative to the checkpoint directory) and their sizes.
    pub files: Vec<(String, u64)>,
    /// Source positions the state reflects (partition, next offset).
    pub positions: Vec<(String, u64)>,
}

impl Manifest {
    /// Total bytes of the checkpoint's files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, n)| n).sum()
    }
}

/// Checkpoints under one root.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    lake: Lake,
    keep: usize,
}

fn id_of(sequence: u64) -> String {
    format!("ckpt-{sequence:012}")
}

fn sequence_of(dir: &str) -> Option<u64> {
    dir.trim_end_matches('/')
        .rsplit('/')
        .next()?
        .strip_prefix("ckpt-")?
        .parse()
        .ok()
}

impl CheckpointStore {
    /// Opens the configured root (created if local). Nothing is read yet.
    pub fn open(cfg: &CheckpointConfig, data_dir: &std::path::Path) -> Result<Self> {
        if cfg.keep == 0 {
            return Err(LakeError::Config(
                "checkpoint.keep: must be at least 1".into(),
            ));
        }
        let url = cfg
            .url
            .clone()
            .unwrap_or_else(|| data_dir.join("checkpoints").display().to_string());
        let lake_cfg = LakeConfig {
            url: Some(url),
            s3: cfg.s3.clone(),
            ..LakeConfig::default()
        };
        let lake = Lake::open(&lake_cfg, data_dir)
            .map_err(|e| LakeError::Config(e.to_string().replace("lake.url", "checkpoint.url")))?;
        Ok(Self::with_lake(lake, cfg.keep))
    }

    /// Checkpoints on an existing [`Lake`] root (tests inject faults).
    pub fn with_lake(lake: Lake, keep: usize) -> Self {
        Self {
            lake,
            keep: keep.max(1),
        }
    }

    /// The root as a URL, for messages.
    pub fn url(&self) -> String {
        self.lake.url()
    }

    /// Sequence numbers of every checkpoint directory, complete or not,
    /// ascending.
    async fn sequences(&self) -> Result<Vec<u64>> {
        let mut seqs: Vec<u64> = self
            .lake
            .list_dirs("")
            .await?
            .iter()
            .filter_map(|p| sequence_of(p.as_ref()))
            .collect();
        seqs.sort_unstable();
        Ok(seqs)
    }

    async fn manifest(&self, sequence: u64) -> Result<Option<Manifest>> {
        let path = self.lake.path(&format!("{}/{MANIFEST}", id_of(sequence)));
        match self.lake.get(&path).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| LakeError::Config(format!("{}: {e}", self.lake.url_of(&path)))),
            Err(LakeError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `cp` as the next checkpoint (files, then the manifest) and
    /// deletes all but the newest `keep` complete ones. Each PUT is
    /// retried until `deadline`.
    pub async fn write(
        &self,
        cp: &EngineCheckpoint,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Manifest> {
        let sequence = self.sequences().await?.last().map_or(1, |s| s + 1);
        let id = id_of(sequence);
        let files = cp
            .encode()
            .map_err(|e| LakeError::Config(format!("checkpoint {id}: {e}")))?;
        let mut listed = Vec::with_capacity(files.len());
        for (name, bytes) in files {
            listed.push((name.clone(), bytes.len() as u64));
            let path = self.lake.path(&format!("{id}/{name}"));
            self.lake
                .put_retrying(&path, Bytes::from(bytes), deadline)
                .await?;
        }
        let manifest = Manifest {
            id: id.clone(),
            sequence,
            written_at_ms: chrono::Utc::now().timestamp_millis(),
            epoch: cp.meta.epoch,
            files: listed,
            positions: cp.meta.positions.clone(),
        };
        let body = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        let path = self.lake.path(&format!("{id}/{MANIFEST}"));
        self.lake
            .put_retrying(&path, Bytes::from(body), deadline)
            .await?;
        if let Err(e) = self.prune(sequence).await {
            tracing::warn!(error = %e, "deleting old checkpoints failed; retried after the next one");
        }
        Ok(manifest)
    }

    /// Deletes complete checkpoints beyond the newest `keep` and
    /// incomplete ones older than `newest`.
    async fn prune(&self, newest: u64) -> Result<()> {
        let mut complete = Vec::new();
        for s in self.sequences().await? {
            if s == newest || self.manifest(s).await?.is_some() {
                complete.push(s);
            } else if s < newest {
                self.delete_dir(s).await?;
            }
        }
        let excess = complete.len().saturating_sub(self.keep);
        for s in &complete[..excess] {
            self.delete_dir(*s).await?;
        }
        Ok(())
    }

    async fn delete_dir(&self, sequence: u64) -> Result<()> {
        let id = id_of(sequence);
        // Manifest first: a half-deleted checkpoint is never "complete".
        let manifest = self.lake.path(&format!("{id}/{MANIFEST}"));
        let objects = self.lake.list(&id).await?;
        if objects.iter().any(|o| o.location == manifest) {
            self.lake.delete(&manifest).await?;
        }
        for o in objects.iter().filter(|o| o.location != manifest) {
            self.lake.delete(&o.location).await?;
        }
        tracing::debug!(checkpoint = %id, "old checkpoint deleted");
        Ok(())
    }

    /// Manifests of the complete checkpoints, newest first.
    pub async fn list(&self) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        for s in self.sequences().await?.into_iter().rev() {
            if let Some(m) = self.manifest(s).await? {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// The newest complete checkpoint that reads back whole, with its
    /// manifest; damaged ones are skipped with a warning.
    pub async fn latest(&self) -> Result<Option<(Manifest, EngineCheckpoint)>> {
        for m in self.list().await? {
            match self.read(&m).await {
                Ok(cp) => return Ok(Some((m, cp))),
                Err(e) => {
                    metrics::counter!(crate::metric_names::CHECKPOINT_DAMAGED_TOTAL).increment(1);
                    tracing::warn!(checkpoint = %m.id, error = %e, "checkpoint damaged; trying an older one");
                }
            }
        }
        Ok(None)
    }

    async fn read(&self, m: &Manifest) -> Result<EngineCheckpoint> {
        let mut files = HashMap::with_capacity(m.files.len());
        for (name, size) in &m.files {
            let path = self.lake.path(&format!("{}/{name}", m.id));
            let bytes = self.lake.get(&path).await?;
            if bytes.len() as u64 != *size {
                return Err(LakeError::Config(format!(
                    "{}: {} bytes, the manifest says {size}",
                    self.lake.url_of(&path),
                    bytes.len()
                )));
            }
            files.insert(name.clone(), bytes);
        }
        EngineCheckpoint::decode(&files)
            .map_err(|e| LakeError::Config(format!("checkpoint {}: {e}", m.id)))
    }
}
