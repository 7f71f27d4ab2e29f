//! Periodic checkpoints of the engine and restore at start (`[checkpoint]`).
//!
//! Every `interval` the checkpointer locks the engine between two
//! micro-batches, takes an [`EngineCheckpoint`](storepulse_engine::EngineCheckpoint)
//! (views, de-duplication, watermarks, late rows, source positions),
//! releases the lock and writes it with [`CheckpointStore`] (manifest
//! last). With `[checkpoint] incremental` (the default) a view is written
//! as the groups changed since its previous image where its chain allows
//! (`storepulse_engine::checkpoint`); once the store holds the checkpoint
//! the engine's chains advance, and after a failed write the next
//! checkpoint is whole. Only then are its positions handed to the Kafka sources to
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
    /// Views written as deltas where their chains allow.
    incremental: bool,
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
    // Deltas extend the store's newest checkpoint: if this is not it (a
    // newer one was damaged), the next checkpoint is whole.
    let newest = store.newest().await.ok().flatten().map(|m| m.sequence);
    if newest != Some(manifest.sequence) {
        engine.checkpoint_reset();
    }
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
        incremental: bool,
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
            incremental,
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
            if self.incremental {
                engine.checkpoint_incremental()?
            } else {
                engine.checkpoint()?
            }
        };
        let captured = t.elapsed();
        let written = self.store.write(&cp, deadline).await;
        let m = match written {
            Ok(m) => {
                self.handle.lock().await.checkpoint_stored(&cp);
                m
            }
            Err(e) => {
                // Whatever the store kept, a whole image is always valid.
                self.handle.lock().await.checkpoint_reset();
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
            capture_ms = captured.as_millis() as u64, rows = cp.keys(),
            delta_views = m.chains.len(), restore_bytes = m.restore_bytes(),
            "checkpoint written"
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

    /// Checkpoints until `shutdown` (the final checkpoint is the caller's,
    /// once the pipeline has stopped), pausing `interval` between them, or
    /// [`PAUSE_FACTOR`] times the last checkpoint's duration when that is
    /// longer: a large state is not rewritten back to back (at chain size
    /// a 10 s interval spent half the run checkpointing; BENCHMARKS.md).
    /// A failed one is logged, counted and retried after the pause; the
    /// engine keeps running.
    pub(crate) async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut took = Duration::ZERO;
        loop {
            let pause = pause_after(self.interval, took);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            // Bounded so a store outage does not pin a checkpoint forever.
            let bound = self.interval.max(Duration::from_secs(5)).max(took * 2);
            let started = Instant::now();
            if let Err(e) = self.take(Some(tokio::time::Instant::now() + bound)).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "checkpoint failed; the next one retries"
                );
            }
            took = started.elapsed();
        }
    }
}

/// A checkpoint that took `d` is followed by a pause of at least
/// `PAUSE_FACTOR × d`, so checkpoints take at most a tenth of the time.
const PAUSE_FACTOR: u32 = 9;

/// The pause before the next periodic checkpoint.
fn pause_after(interval: Duration, took: Duration) -> Duration {
    interval.max(took * PAUSE_FACTOR)
}

fn record(commit: &AppliedPositions, positions: &[(String, u64)]) {
    for (p, o) in positions {
        commit.record(&Position {
            partition: p.as_str().into(),
            next_offset: *o,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_checkpoint_stretches_the_pause_to_keep_checkpoints_under_a_tenth() {
        let s = Duration::from_secs;
        assert_eq!(pause_after(s(10), Duration::ZERO), s(10));
        assert_eq!(pause_after(s(10), s(1)), s(10));
        assert_eq!(pause_after(s(10), s(15)), s(135));
        let share =
            |took: Duration| took.as_secs_f64() / (took + pause_after(s(10), took)).as_secs_f64();
        assert!(share(s(15)) <= 0.1 && share(s(1)) <= 0.1);
    }
}
