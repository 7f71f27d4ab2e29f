//! Checkpoints: the engine's whole state (gates, views, late events,
//! positions) out to an [`EngineCheckpoint`](crate::EngineCheckpoint) and
//! back.

use std::{collections::HashMap, sync::Arc};

use datafusion::arrow::array::RecordBatch;

use super::*;
use crate::error::{EngineError, Result};

impl Engine {
    /// A consistent image of the engine's state (views, de-duplication,
    /// watermarks, late rows, source positions) at the current epoch,
    /// taken between micro-batches (see [`crate::checkpoint`]); every view
    /// whole.
    pub fn checkpoint(&mut self) -> Result<crate::checkpoint::EngineCheckpoint> {
        self.checkpoint_with(false)
    }

    /// [`Self::checkpoint`] with each view written as a delta (the groups
    /// changed since its last stored image) where its chain allows (see
    /// [`crate::checkpoint`]). Hand the checkpoint to
    /// [`Self::checkpoint_stored`] once the store holds it.
    pub fn checkpoint_incremental(&mut self) -> Result<crate::checkpoint::EngineCheckpoint> {
        self.checkpoint_with(true)
    }

    /// The store holds `cp` (taken by this engine): the views' next deltas
    /// build on it.
    pub fn checkpoint_stored(&mut self, cp: &crate::checkpoint::EngineCheckpoint) {
        for image in &cp.views {
            if let Some(v) = self.views.iter_mut().find(|v| v.name == image.name) {
                v.checkpoint_stored(image.generation);
            }
        }
    }

    /// Forgets every view's stored images: the next checkpoint is whole
    /// (after the store lost or could not read them).
    pub fn checkpoint_reset(&mut self) {
        for v in self.views.iter_mut() {
            v.checkpoint_reset();
        }
    }

    fn checkpoint_with(
        &mut self,
        incremental: bool,
    ) -> Result<crate::checkpoint::EngineCheckpoint> {
        use crate::checkpoint::{
            dedup_batch, CheckpointMeta, StreamMeta, ViewImage, ViewMeta, FORMAT_VERSION,
        };
        let mut views = Vec::with_capacity(self.views.len());
        let mut view_meta = Vec::with_capacity(self.views.len());
        for v in self.views.iter_mut() {
            let image = v.checkpoint_image(incremental)?;
            view_meta.push(ViewMeta {
                name: v.name.clone(),
                sql: v.sql.clone(),
                rows_applied: v.rows_applied,
                groups: v.groups() as u64,
                delta: image.delta,
                ttl: image.ttl,
            });
            views.push(ViewImage {
                name: v.name.clone(),
                parts: vec![image.rows],
                generation: image.generation,
            });
        }
        let mut streams = Vec::with_capacity(self.gates.len());
        let mut dedup = Vec::with_capacity(self.gates.len());
        for (kind, g) in &self.gates {
            let (wm, parts) = g.watermark.export();
            let (hi, lo, ts) = g.dedup.export();
            dedup.push((kind.name().to_string(), dedup_batch(hi, lo, ts)?));
            streams.push(StreamMeta {
                stream: kind.name().to_string(),
                watermark: match wm {
                    Watermark::At(t) => Some(t),
                    Watermark::Final => g.watermark.max_ts(),
                    Watermark::None => None,
                },
                watermark_final: wm == Watermark::Final,
                partitions: parts.into_iter().map(|(k, t)| (k.to_string(), t)).collect(),
                accepted_events: g.accepted_events,
                duplicate_events: g.duplicate_events,
                late_events: g.late_events,
                duplicates_by_store: g
                    .duplicates_by_store
                    .iter()
                    .map(|(s, (n, t))| (s.clone(), *n, *t))
                    .collect(),
            });
        }
        Ok(crate::checkpoint::EngineCheckpoint {
            meta: CheckpointMeta {
                format_version: FORMAT_VERSION,
                epoch: self.epoch,
                views: view_meta,
                streams,
                late_total: self.late.total(),
                positions: self
                    .positions
                    .snapshot()
                    .into_iter()
                    .map(|p| (p.partition.to_string(), p.next_offset))
                    .collect(),
            },
            views,
            dedup,
            late: self.late.batches(),
        })
    }

    /// Restores a checkpoint into this engine, which must have its views
    /// defined (the same SQL as when the checkpoint was taken) and nothing
    /// applied yet. The next incremental checkpoint builds on it: call
    /// [`Self::checkpoint_reset`] if it is not the store's newest. A view of the checkpoint that no longer exists, or
    /// whose state does not fit its current definition, is an error naming
    /// it; a view new since the checkpoint starts empty (logged).
    pub fn restore(&mut self, cp: crate::checkpoint::EngineCheckpoint, now_ms: i64) -> Result<()> {
        use crate::checkpoint::check_view_schema;
        if !self.positions.snapshot().is_empty() || self.views.iter().any(|v| v.groups() > 0) {
            return Err(EngineError::Checkpoint(
                "restore into an engine that already applied input".into(),
            ));
        }
        let mut states: HashMap<String, Vec<RecordBatch>> =
            cp.views.into_iter().map(|v| (v.name, v.parts)).collect();
        for m in &cp.meta.views {
            let Some(v) = self.views.iter_mut().find(|v| v.name == m.name) else {
                if self.serving.table_exist(m.name.as_str()).unwrap_or(false) {
                    // Materialized when the checkpoint was taken, computed at
                    // query time now (e.g. the built-in latest_stock_count):
                    // its rows come from other views; the state is not needed.
                    tracing::warn!(view = %m.name, "view is no longer materialized: its checkpointed state is dropped");
                    continue;
                }
                return Err(EngineError::Checkpoint(format!(
                    "view {} is in the checkpoint but no longer defined; restore it, or remove \
                     the checkpoints to start from empty state",
                    m.name
                )));
            };
            let parts = states
                .remove(&m.name)
                .ok_or_else(|| EngineError::Checkpoint(format!("view {}: no state", m.name)))?;
            let deltas = parts.len().saturating_sub(1);
            let base_rows = parts.first().map_or(0, RecordBatch::num_rows);
            let delta_rows = parts.iter().skip(1).map(RecordBatch::num_rows).sum();
            let state = crate::checkpoint::resolve_chain(parts, v.key_columns())
                .map_err(|e| EngineError::Checkpoint(format!("view {}: {e}", m.name)))?;
            if state.num_rows() as u64 != m.groups {
                return Err(EngineError::Checkpoint(format!(
                    "view {}: its image and {deltas} deltas hold {} groups, the checkpoint says {}",
                    m.name,
                    state.num_rows(),
                    m.groups
                )));
            }
            check_view_schema(&m.name, &state, &v.partial_schema())?;
            if normalize_sql(&v.sql) != normalize_sql(&m.sql) {
                tracing::warn!(view = %m.name, "view SQL differs from the checkpoint's (same state schema): restoring its state");
            }
            v.import(&state, m.rows_applied)?;
            v.restore_ttl(&state, m.ttl.as_ref())?;
            // The next checkpoint's delta extends the restored chain (the
            // caller resets it if that was not the store's newest).
            v.checkpoint_restored(base_rows, deltas as u32, delta_rows);
        }
        for v in &self.views {
            if !cp.meta.views.iter().any(|m| m.name == v.name) {
                tracing::warn!(view = %v.name, "view is new since the checkpoint: it starts empty");
            }
        }
        let dedup: HashMap<String, RecordBatch> = cp.dedup.into_iter().collect();
        for s in &cp.meta.streams {
            let Some((_, gate)) = self.gates.iter_mut().find(|(k, _)| k.name() == s.stream) else {
                return Err(EngineError::Checkpoint(format!(
                    "unknown stream {}",
                    s.stream
                )));
            };
            let parts: Vec<(Arc<str>, i64)> = s
                .partitions
                .iter()
                .map(|(k, t)| (Arc::from(k.as_str()), *t))
                .collect();
            gate.watermark.import(s.watermark(), &parts, now_ms);
            if let Some(b) = dedup.get(&s.stream) {
                let (hi, lo, ts) = crate::checkpoint::dedup_columns(b)?;
                gate.dedup.import(hi, lo, ts);
            }
            gate.accepted_events = s.accepted_events;
            gate.duplicate_events = s.duplicate_events;
            gate.duplicates_by_store = s
                .duplicates_by_store
                .iter()
                .map(|(st, n, t)| (st.clone(), (*n, *t)))
                .collect();
            gate.late_events = s.late_events;
        }
        self.late.import(cp.late, cp.meta.late_total);
        for (partition, next_offset) in &cp.meta.positions {
            self.positions.record(&storepulse_ingest::Position {
                partition: Arc::from(partition.as_str()),
                next_offset: *next_offset,
            });
        }
        self.epoch = self.epoch.max(cp.meta.epoch);
        self.snapshot_epoch = None;
        Ok(())
    }
}
