//! Periodic checkpoints of the engine and restore at start (`[checkpoint]`).
//!
//! Every `interval` the checkpointer locks the engine between two
//! micro-batches, takes an [`EngineCheckpoint`](storepulse_engine::EngineCheckpoint)
//! (views, de-duplication, watermarks, late rows, source positions),
//! releases the lock and writes it with [`CheckpointStore`] (manifest
//! last). Only then are its positions handed to the Kafka sources to
//! commit, so the consumer group's committed offsets never pass the newest
//! complete checkpoint: after a crash, the restored state plus re-delivery
//! from those offsets is the uninterrupted run (re-delivered events the
//! checkpoint already holds are dropped by the restored de-duplication
//! set). File sources resume at the checkpoint's line. At shutdown a final
//! checkpoint is written after the sources stopped and the last batch was
//! applied.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Serialize;
use storepulse_engine::{Engine, EngineHandle};
use storepulse_ingest::{AppliedPositions, Position};
use storepulse_lake::{CheckpointManifest, CheckpointStore};
use tokio::sync::watch;

/// Checkpoint health for `/api/v1/health`.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct CheckpointStatus {
    /// Where checkpoints go.
    pub(crate) url: String,
    /// The newest checkpoint written (or restored).
    pub(crate) last_id: Option<String>,
    /// When it was written (epoch ms).
    pub(crate) last_written_at_ms: Option<i64>,
    /// Its size in bytes.
    pub(crate) last_bytes: Option<u64>,
    /// The last failure, if the last attempt failed.
    pub(crate) error: Option<String>,
}

/// Takes and writes checkpoints.
pub(crate) struct Checkpointer {
    store: CheckpointStore,
    handle: EngineHandle,
    /// What Kafka sources may commit (positions of the newest checkpoint).
    commit: Arc<AppliedPositions>,
    interval: Duration,
    status: Mutex<CheckpointStatus>,
}

/// Restores the newest complete checkpoint into `engine` (views defined,
/// nothing applied). Returns its manifest; `None` if there is none.
pub(crate) async fn restore(
    engine: &mut Engine,
    store: &CheckpointStore,
) -> anyhow::Result<Option<CheckpointManifest>> {
    let t = Instant::now();
    let Some((manifest, cp)) = store
        .latest()
        .await
        .with_context(|| format!("checkpoint: reading {}", store.url()))?
    else {
        tracing::info!(url = %store.url(), "no checkpoint: starting from empty state");
        return Ok(None);
    };
    let keys = cp.keys();
    engine
        .restore(cp, EngineHandle::now_ms())
        .with_context(|| {
            format!(
                "restoring checkpoint {} from {} (move it away to start from empty state)",
                manifest.id,
                store.url()
            )
        })?;
    let secs = t.elapsed().as_secs_f64();
    metrics::gauge!(crate::metric_names::CHECKPOINT_RESTORE_SECONDS).set(secs);
    tracing::info!(
        checkpoint = %manifest.id, epoch = manifest.epoch, keys, bytes = manifest.bytes(),
        seconds = secs, positions = manifest.positions.len(),
        "state restored from checkpoint"
    );
    Ok(Some(manifest))
}

impl Checkpointer {
    /// A checkpointer writing to `store`; `restored` is the checkpoint the
    /// engine started from (its positions are what Kafka may commit).
    pub(crate) fn new(
        store: CheckpointStore,
        handle: EngineHandle,
        interval: Duration,
        restored: Option<&CheckpointManifest>,
    ) -> Self {
        let commit = Arc::new(AppliedPositions::default());
        let mut status = CheckpointStatus {
            url: store.url(),
            ..Default::default()
        };
        if let Some(m) = restored {
            record(&commit, &m.positions);
            status.last_id = Some(m.id.clone());
            status.last_written_at_ms = Some(m.written_at_ms);
            status.last_bytes = Some(m.bytes());
        }
        Self {
            store,
            handle,
            commit,
            interval,
            status: Mutex::new(status),
        }
    }

    /// The positions Kafka sources commit.
    pub(crate) fn commit_positions(&self) -> Arc<AppliedPositions> {
        self.commit.clone()
    }

    /// Health snapshot.
    pub(crate) fn status(&self) -> CheckpointStatus {
        self.status.lock().expect("checkpoint status").clone()
    }

    /// Takes one checkpoint and writes it (PUTs retried until `deadline`).
    pub(crate) async fn take(
        &self,
        deadline: Option<tokio::time::Instant>,
    ) -> anyhow::Result<CheckpointManifest> {
        let t = Instant::now();
        let cp = {
            let mut engine = self.handle.lock().await;
            engine.checkpoint()?
        };
        let captured = t.elapsed();
        let written = self.store.write(&cp, deadline).await;
        let m = match written {
            Ok(m) => m,
            Err(e) => {
                metrics::counter!(crate::metric_names::CHECKPOINT_ERRORS_TOTAL).increment(1);
                self.status.lock().expect("checkpoint status").error = Some(e.to_string());
                return Err(e).context("checkpoint");
            }
        };
        record(&self.commit, &m.positions);
        let secs = t.elapsed().as_secs_f64();
        metrics::histogram!(crate::metric_names::CHECKPOINT_DURATION_SECONDS).record(secs);
        metrics::gauge!(crate::metric_names::CHECKPOINT_BYTES).set(m.bytes() as f64);
        metrics::gauge!(crate::metric_names::CHECKPOINT_LAST_SUCCESS_TIMESTAMP_SECONDS)
            .set(m.written_at_ms as f64 / 1000.0);
        metrics::counter!(crate::metric_names::CHECKPOINT_WRITTEN_TOTAL).increment(1);
        tracing::debug!(
            checkpoint = %m.id, epoch = m.epoch, bytes = m.bytes(), seconds = secs,
            capture_ms = captured.as_millis() as u64, "checkpoint written"
        );
        *self.status.lock().expect("checkpoint status") = CheckpointStatus {
            url: self.store.url(),
            last_id: Some(m.id.clone()),
            last_written_at_ms: Some(m.written_at_ms),
            last_bytes: Some(m.bytes()),
            error: None,
        };
        Ok(m)
    }

    /// Checkpoints every `interval` until `shutdown` (the final checkpoint
    /// is the caller's, once the pipeline has stopped). A failed one is
    /// logged, counted and retried at the next tick; the engine keeps
    /// running.
    pub(crate) async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            // Bounded so a store outage does not pin a checkpoint forever.
            let deadline = tokio::time::Instant::now() + self.interval.max(Duration::from_secs(5));
            if let Err(e) = self.take(Some(deadline)).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "checkpoint failed; the next one retries"
                );
            }
        }
    }
}

fn record(commit: &AppliedPositions, positions: &[(String, u64)]) {
    for (p, o) in positions {
        commit.record(&Position {
            partition: p.as_str().into(),
            next_offset: *o,
        });
    }
}
