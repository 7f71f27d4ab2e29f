//! Checkpoint storage: engine checkpoints on an object store (a local
//! directory by default, `<data_dir>/checkpoints`, or S3), each complete
//! only once its manifest is written.
//!
//! Layout, under the checkpoint root:
//!
//! ```text
//! ckpt-000000000042/engine.json               meta: epoch, streams, positions
//! ckpt-000000000042/views/<view>.arrow        partial-aggregate state (whole)
//! ckpt-000000000042/views/<view>.delta.arrow  or: the groups changed since
//!                                             the view's previous image
//! ckpt-000000000042/dedup/<stream>.arrow      seen event ids
//! ckpt-000000000042/late_events.arrow
//! ckpt-000000000042/_manifest.json            written last: files and sizes,
//!                                             each delta view's chain
//! ```
//!
//! **Incremental checkpoints** (`[checkpoint] incremental`, on by
//! default): a view written as a delta is restored from its *chain*, the
//! whole image in an earlier checkpoint and every delta since, which the
//! manifest lists (root-relative paths and sizes), so a checkpoint is
//! read from its manifest alone. Pruning keeps, besides the newest `keep`
//! checkpoints, every older one whose files a kept manifest's chains
//! name. The engine bounds a chain (`storepulse_engine::checkpoint`).
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
    /// Write each view's changed groups only, when it has an image in an
    /// earlier checkpoint to build on (a whole image at least every 16
    /// checkpoints, or once the changes add up to its size); `false`
    /// writes every view whole every time.
    #[serde(default = "yes")]
    pub incremental: bool,
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
            incremental: true,
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
    /// For each view written as a delta: its chain, the files (relative to
    /// the checkpoint root, with sizes) to restore it from, its whole image
    /// first and this checkpoint's delta last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chains: Vec<(String, Vec<(String, u64)>)>,
}

impl Manifest {
    /// Total bytes of the checkpoint's own files (what writing it cost).
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, n)| n).sum()
    }

    /// Total bytes a restore from it reads (its files and the earlier
    /// files its chains name).
    pub fn restore_bytes(&self) -> u64 {
        let own = format!("{}/", self.id);
        self.bytes()
            + self
                .chains
                .iter()
                .flat_map(|(_, files)| files)
                .filter(|(f, _)| !f.starts_with(&own))
                .map(|(_, n)| n)
                .sum::<u64>()
    }

    /// The chain of `view` that a delta written after this checkpoint
    /// extends: its own chain, or its whole image here.
    fn chain_for_next(&self, view: &str) -> Option<Vec<(String, u64)>> {
        if let Some((_, chain)) = self.chains.iter().find(|(v, _)| v == view) {
            return Some(chain.clone());
        }
        let whole = storepulse_engine::checkpoint::view_file(view, false);
        let (_, size) = self.files.iter().find(|(f, _)| *f == whole)?;
        Some(vec![(format!("{}/{whole}", self.id), *size)])
    }

    /// Sequence numbers of the earlier checkpoints its chains read from.
    fn depends_on(&self) -> impl Iterator<Item = u64> + '_ {
        self.chains
            .iter()
            .flat_map(|(_, files)| files)
            .filter_map(|(f, _)| sequence_of(f.split('/').next()?))
            .filter(move |s| *s != self.sequence)
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

    /// The newest complete checkpoint's manifest (the one the next
    /// checkpoint's deltas extend).
    pub async fn newest(&self) -> Result<Option<Manifest>> {
        for s in self.sequences().await?.into_iter().rev() {
            if let Some(m) = self.manifest(s).await? {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// Writes `cp` as the next checkpoint (files, then the manifest) and
    /// deletes all but the newest `keep` complete ones (and what their
    /// chains still read). Each PUT is retried until `deadline`. A view
    /// written as a delta extends its chain in the newest complete
    /// checkpoint; if that has no image of it, this is an error (take a
    /// whole checkpoint: `Engine::checkpoint_reset`).
    pub async fn write(
        &self,
        cp: &EngineCheckpoint,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Manifest> {
        let sequence = self.sequences().await?.last().map_or(1, |s| s + 1);
        let id = id_of(sequence);
        let deltas: Vec<&str> = cp
            .meta
            .views
            .iter()
            .filter(|v| v.delta)
            .map(|v| v.name.as_str())
            .collect();
        let mut chains = Vec::with_capacity(deltas.len());
        if !deltas.is_empty() {
            let prev = self.newest().await?;
            for view in deltas {
                let Some(chain) = prev.as_ref().and_then(|p| p.chain_for_next(view)) else {
                    return Err(LakeError::Config(format!(
                        "checkpoint {id}: view {view} is written as a delta, but the newest checkpoint \
                         in {} has no image of it to build on",
                        self.url()
                    )));
                };
                chains.push((view.to_string(), chain));
            }
        }
        let mut listed = Vec::new();
        // One file encoded and stored at a time (see `EngineCheckpoint::files`).
        for file in cp.files() {
            let (name, bytes) =
                file.map_err(|e| LakeError::Config(format!("checkpoint {id}: {e}")))?;
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
            positions: cp.meta.positions.clone(),
            chains: chains
                .into_iter()
                .map(|(view, mut chain)| {
                    let own = storepulse_engine::checkpoint::view_file(&view, true);
                    let size = listed
                        .iter()
                        .find(|(f, _)| *f == own)
                        .map_or(0, |(_, n)| *n);
                    chain.push((format!("{id}/{own}"), size));
                    (view, chain)
                })
                .collect(),
            files: listed,
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

    /// Deletes complete checkpoints beyond the newest `keep` (unless a
    /// kept one's chains read from them) and incomplete ones older than
    /// `newest`.
    async fn prune(&self, newest: u64) -> Result<()> {
        let mut complete = Vec::new();
        for s in self.sequences().await? {
            match self.manifest(s).await? {
                Some(m) => complete.push(m),
                None if s < newest => self.delete_dir(s).await?,
                None => {}
            }
        }
        let excess = complete.len().saturating_sub(self.keep);
        let needed: std::collections::HashSet<u64> = complete[excess..]
            .iter()
            .flat_map(Manifest::depends_on)
            .collect();
        for m in &complete[..excess] {
            if !needed.contains(&m.sequence) {
                self.delete_dir(m.sequence).await?;
            }
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
        let own = format!("{}/", m.id);
        let earlier = m
            .chains
            .iter()
            .flat_map(|(_, files)| files)
            .filter(|(f, _)| !f.starts_with(&own));
        let mut files = HashMap::with_capacity(m.files.len());
        for (name, size) in m
            .files
            .iter()
            .map(|(f, n)| (format!("{own}{f}"), n))
            .chain(earlier.map(|(f, n)| (f.clone(), n)))
        {
            if files.contains_key(&name) {
                continue;
            }
            let path = self.lake.path(&name);
            let bytes = self.lake.get(&path).await?;
            if bytes.len() as u64 != *size {
                return Err(LakeError::Config(format!(
                    "{}: {} bytes, the manifest says {size}",
                    self.lake.url_of(&path),
                    bytes.len()
                )));
            }
            files.insert(name, bytes);
        }
        // The engine reads its own files by their names in the checkpoint.
        let files: HashMap<String, Bytes> = files
            .into_iter()
            .map(|(k, v)| match k.strip_prefix(&own) {
                Some(rel) => (rel.to_string(), v),
                None => (k, v),
            })
            .collect();
        let chains: HashMap<String, Vec<String>> = m
            .chains
            .iter()
            .map(|(view, chain)| {
                let keys = chain
                    .iter()
                    .map(|(f, _)| f.strip_prefix(&own).unwrap_or(f).to_string())
                    .collect();
                (view.clone(), keys)
            })
            .collect();
        EngineCheckpoint::decode(&files, &chains)
            .map_err(|e| LakeError::Config(format!("checkpoint {}: {e}", m.id)))
    }
}
