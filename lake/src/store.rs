//! The lake root on an object store: a local directory or an S3 bucket
//! prefix, with writes that are atomic per object and retried with backoff.
//!
//! `put` is atomic on both backends: S3 makes an object visible only when
//! its PUT completes, and object_store's local file system writes a staging
//! file and renames it. A reader listing a prefix therefore never sees a
//! partial file.

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use datafusion::{datasource::listing::ListingTableUrl, prelude::SessionContext};
use futures::TryStreamExt;
use object_store::{
    aws::AmazonS3Builder, local::LocalFileSystem, path::Path, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutPayload, RetryConfig,
};
use url::Url;

use crate::{
    config::{LakeConfig, S3Config},
    error::{LakeError, Result},
    status::LakeStatus,
};

/// The lake root: a store, the URL DataFusion knows it by, and a prefix.
#[derive(Debug, Clone)]
pub struct Lake {
    store: Arc<dyn ObjectStore>,
    /// `file:///` or `s3://bucket/`.
    store_url: Url,
    /// The lake root inside the store.
    prefix: Path,
    retry_max_delay: Duration,
    status: Arc<LakeStatus>,
}

impl Lake {
    /// Opens the configured lake (`[lake] url`, default `<data_dir>/lake`).
    /// Local roots are created; S3 settings come from `[lake.s3]` over the
    /// AWS environment. Nothing is contacted yet.
    pub fn open(cfg: &LakeConfig, data_dir: &std::path::Path) -> Result<Self> {
        let url = cfg
            .url
            .clone()
            .unwrap_or_else(|| data_dir.join("lake").display().to_string());
        let err = |m: String| LakeError::Config(format!("lake.url '{url}': {m}"));
        let (store, store_url, prefix): (Arc<dyn ObjectStore>, Url, Path) =
            if let Some(rest) = url.strip_prefix("s3://") {
                let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(err("no bucket".into()));
                }
                let store = s3_store(bucket, &cfg.s3).map_err(|e| err(e.to_string()))?;
                let store_url =
                    Url::parse(&format!("s3://{bucket}/")).map_err(|e| err(e.to_string()))?;
                (
                    Arc::new(store),
                    store_url,
                    Path::from(key.trim_matches('/')),
                )
            } else {
                let local = match url.strip_prefix("file://") {
                    Some(p) => std::path::PathBuf::from(p),
                    None if url.contains("://") => {
                        return Err(err(
                            "unsupported scheme (use a path, file:// or s3://)".into()
                        ))
                    }
                    None => std::path::PathBuf::from(&url),
                };
                std::fs::create_dir_all(&local)
                    .map_err(|e| err(format!("cannot create {}: {e}", local.display())))?;
                let abs = std::fs::canonicalize(&local)
                    .map_err(|e| err(format!("{}: {e}", local.display())))?;
                let prefix = Path::from_absolute_path(&abs).map_err(|e| err(e.to_string()))?;
                let store_url = Url::parse("file:///").expect("valid URL");
                (Arc::new(LocalFileSystem::new()), store_url, prefix)
            };
        Ok(Self::with_store(
            store,
            store_url,
            prefix,
            cfg.retry_max_delay,
        ))
    }

    /// A lake over an existing store (tests wrap stores to inject faults).
    /// `store_url` is the URL DataFusion registers the store under
    /// (`file:///`, `s3://bucket/`), `prefix` the lake root inside it.
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        store_url: Url,
        prefix: Path,
        retry_max_delay: Duration,
    ) -> Self {
        Self {
            store,
            store_url,
            prefix,
            retry_max_delay,
            status: Arc::new(LakeStatus::default()),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Health and counters of everything writing to this lake.
    pub fn status(&self) -> &Arc<LakeStatus> {
        &self.status
    }

    /// The lake root as a URL (`file:///data/lake`, `s3://bucket/prefix`).
    pub fn url(&self) -> String {
        self.url_of(&self.prefix)
    }

    /// The object path of `rel` (relative to the lake root).
    pub fn path(&self, rel: &str) -> Path {
        let rel = rel.trim_matches('/');
        if self.prefix.as_ref().is_empty() {
            Path::from(rel)
        } else if rel.is_empty() {
            self.prefix.clone()
        } else {
            Path::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// `rel` relative to the lake root, for an object path under it.
    pub fn relative<'a>(&self, path: &'a Path) -> &'a str {
        let p = path.as_ref();
        let root = self.prefix.as_ref();
        p.strip_prefix(root)
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(p)
    }

    /// An object's URL, for messages.
    pub fn url_of(&self, path: &Path) -> String {
        format!("{}{}", self.store_url, path)
    }

    /// A directory under the root as a DataFusion table URL.
    pub fn table_url(&self, rel_dir: &str) -> Result<ListingTableUrl> {
        let url = format!("{}/", self.url_of(&self.path(rel_dir)));
        ListingTableUrl::parse(&url).map_err(LakeError::from)
    }

    /// Registers the store with a DataFusion context so `history.*` and
    /// `snapshots.*` (and any `ListingTable` over the lake) can read it.
    pub fn register(&self, ctx: &SessionContext) {
        ctx.register_object_store(&self.store_url, self.store.clone());
    }

    /// One PUT (atomic).
    pub async fn put(&self, path: &Path, bytes: Bytes) -> Result<()> {
        self.store
            .put(path, PutPayload::from_bytes(bytes))
            .await
            .map(|_| ())
            .map_err(|source| LakeError::Store {
                op: "PUT",
                url: self.url_of(path),
                source,
            })
    }

    /// PUT, retried with exponential backoff (≤ `retry_max_delay`) until it
    /// succeeds or `deadline` passes. Each failure is logged with the URL,
    /// counted in `storepulse_lake_errors_total{op}` and shown in health.
    pub async fn put_retrying(
        &self,
        path: &Path,
        bytes: Bytes,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<()> {
        let mut backoff = self.backoff();
        loop {
            match self.put(path, bytes.clone()).await {
                Ok(()) => {
                    self.status.ok();
                    return Ok(());
                }
                Err(e) => {
                    let wait = backoff.next().unwrap_or(self.retry_max_delay);
                    self.status.error("PUT", &e);
                    if deadline.is_some_and(|d| tokio::time::Instant::now() + wait > d) {
                        return Err(e);
                    }
                    tracing::warn!(op = "PUT", url = %self.url_of(path), error = %e, retry_in_ms = wait.as_millis() as u64, "lake write failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Backoff for retries: 100 ms doubling to `retry_max_delay`, with
    /// jitter, forever.
    pub(crate) fn backoff(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(self.retry_max_delay)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// Every object under `rel` (recursively).
    pub async fn list(&self, rel: &str) -> Result<Vec<ObjectMeta>> {
        let path = self.path(rel);
        self.store
            .list(Some(&path))
            .try_collect()
            .await
            .map_err(|source| LakeError::Store {
                op: "LIST",
                url: self.url_of(&path),
                source,
            })
    }

    /// The immediate sub-"directories" of `rel` (full paths).
    pub async fn list_dirs(&self, rel: &str) -> Result<Vec<Path>> {
        let path = self.path(rel);
        self.store
            .list_with_delimiter(Some(&path))
            .await
            .map(|r| r.common_prefixes)
            .map_err(|source| LakeError::Store {
                op: "LIST",
                url: self.url_of(&path),
                source,
            })
    }

    /// Reads one object.
    pub async fn get(&self, path: &Path) -> Result<Bytes> {
        let err = |source| LakeError::Store {
            op: "GET",
            url: self.url_of(path),
            source,
        };
        self.store
            .get(path)
            .await
            .map_err(err)?
            .bytes()
            .await
            .map_err(err)
    }

    /// Deletes one object.
    pub async fn delete(&self, path: &Path) -> Result<()> {
        self.store
            .delete(path)
            .await
            .map_err(|source| LakeError::Store {
                op: "DELETE",
                url: self.url_of(path),
                source,
            })
    }
}

fn s3_store(bucket: &str, s3: &S3Config) -> Result<object_store::aws::AmazonS3> {
    let secret = |v: &Option<String>, key: &str| -> Result<Option<String>> {
        match v.as_deref() {
            Some(v) => match v.strip_prefix("env:") {
                Some(name) => std::env::var(name).map(Some).map_err(|_| {
                    LakeError::Config(format!(
                        "lake.s3.{key}: environment variable {name} is not set"
                    ))
                }),
                None => Ok(Some(v.to_string())),
            },
            None => Ok(None),
        }
    };
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_allow_http(s3.allow_http)
        .with_virtual_hosted_style_request(s3.virtual_hosted_style)
        // Short per-request retries; the lake retries whole writes itself
        // (keeping the data) with its own backoff.
        .with_retry(RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(20),
            ..Default::default()
        });
    if let Some(e) = &s3.endpoint {
        b = b.with_endpoint(e);
    }
    if let Some(r) = &s3.region {
        b = b.with_region(r);
    }
    if let Some(k) = secret(&s3.access_key_id, "access_key_id")? {
        b = b.with_access_key_id(k);
    }
    if let Some(k) = secret(&s3.secret_access_key, "secret_access_key")? {
        b = b.with_secret_access_key(k);
    }
    if let Some(k) = secret(&s3.session_token, "session_token")? {
        b = b.with_token(k);
    }
    b.build()
        .map_err(|e| LakeError::Config(format!("lake.s3: {e}")))
}
