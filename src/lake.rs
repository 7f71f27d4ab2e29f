//! Wiring the lake into the binary: open the store, register `history.*`
//! and `snapshots.*`, start the archive, snapshots, reports and retention.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use datafusion::arrow::datatypes::SchemaRef;
use storepulse_engine::{late::late_events_schema, EngineHandle};
use storepulse_ingest::StreamKind;
use storepulse_lake::{
    register_lake_tables, snapshot::snapshot_views, Archiver, Lake, LakeConfig, ReportConfig,
    Reporter, Snapshotter,
};
use tokio::sync::watch;

/// The running lake.
#[derive(Debug)]
pub(crate) struct LakeParts {
    pub(crate) lake: Lake,
    pub(crate) archiver: Option<Archiver>,
    pub(crate) snapshotter: Arc<Snapshotter>,
    pub(crate) reporter: Arc<Reporter>,
    cfg: LakeConfig,
}

impl LakeParts {
    /// Opens the lake and registers its tables in the serving context. Call
    /// after every view is created (snapshots cover the views that exist).
    pub(crate) async fn open(
        cfg: &LakeConfig,
        reports: &[ReportConfig],
        data_dir: &std::path::Path,
        handle: &EngineHandle,
    ) -> anyhow::Result<Option<Self>> {
        if !cfg.enabled {
            return Ok(None);
        }
        let lake = Lake::open(cfg, data_dir)?;
        let mut streams: Vec<(String, SchemaRef)> = StreamKind::ALL
            .iter()
            .map(|k| (k.name().to_string(), k.schema()))
            .collect();
        streams.push(("late_events".to_string(), late_events_schema()));
        let views = snapshot_views(handle, &cfg.snapshots.views).await?;
        register_lake_tables(&lake, handle.serving_context(), &streams, &views)
            .context("registering history.* and snapshots.*")?;
        let reporter = Arc::new(Reporter::new(lake.clone(), handle.clone(), reports).await?);
        let snapshotter = Arc::new(Snapshotter::new(lake.clone(), handle.clone(), views));
        tracing::info!(
            url = %lake.url(),
            archive = cfg.archive.enabled,
            snapshot_views = snapshotter.views().len(),
            snapshot_interval = %humantime::format_duration(cfg.snapshots.interval),
            reports = reports.len(),
            retention_rules = cfg.retention.len(),
            "lake ready"
        );
        Ok(Some(Self {
            archiver: None,
            lake,
            snapshotter,
            reporter,
            cfg: cfg.clone(),
        }))
    }

    /// Starts the archive (needs the runtime) and the periodic tasks.
    pub(crate) fn start(&mut self, shutdown: &watch::Receiver<bool>) {
        if self.cfg.archive.enabled {
            self.archiver = Some(Archiver::start(self.lake.clone(), self.cfg.archive.clone()));
        }
        tokio::spawn(
            self.snapshotter
                .clone()
                .run(self.cfg.snapshots.interval, shutdown.clone()),
        );
        tokio::spawn(self.reporter.clone().run(shutdown.clone()));
        tokio::spawn(storepulse_lake::retention::run(
            self.lake.clone(),
            self.cfg.retention.clone(),
            self.cfg.retention_interval,
            shutdown.clone(),
        ));
    }

    /// Writes out every archived event handed over so far (bounded runs and
    /// shutdown). Logs what could not be stored in time.
    pub(crate) async fn flush(&self, timeout: Duration) {
        let Some(a) = &self.archiver else { return };
        if a.flush(timeout).await {
            tracing::info!(url = %self.lake.url(), "archive flushed");
        } else {
            tracing::error!(
                url = %self.lake.url(),
                buffered_bytes = a.buffered_bytes(),
                "archive not flushed in time: events still buffered were not archived"
            );
        }
    }
}
