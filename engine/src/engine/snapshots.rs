//! Snapshots: the views evaluated once per epoch (all of them, or those a
//! query reads), pinned by a query for a consistent read.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use datafusion::arrow::array::RecordBatch;

use super::*;
use crate::{error::Result, snapshot::Snapshot};

impl Engine {
    /// Takes (and publishes) a consistent snapshot of all views.
    pub fn snapshot(&mut self) -> Result<Arc<Snapshot>> {
        let as_of = self.as_of();
        if self.snapshot_epoch == Some(self.epoch) && self.snapshot_as_of == as_of {
            return Ok(self.cell.load());
        }
        let mut views = HashMap::with_capacity(self.views.len());
        self.last_evaluation.clear();
        for v in &mut self.views {
            views.insert(
                v.name.clone(),
                evaluate_timed(v, &mut self.last_evaluation)?,
            );
        }
        let snap = Arc::new(Snapshot {
            epoch: self.epoch,
            views,
            late_events: Arc::new(self.late.batches()),
            duplicates: self.duplicates_batches()?,
            as_of,
        });
        self.cell.store(snap.clone());
        self.snapshot_epoch = Some(self.epoch);
        self.snapshot_as_of = as_of;
        Ok(snap)
    }

    /// Views evaluated by the last snapshot that had to evaluate any, with
    /// the seconds each took (diagnostics; also the histogram
    /// `storepulse_engine_view_evaluate_seconds{view}`).
    pub fn last_evaluation(&self) -> &[(String, f64)] {
        &self.last_evaluation
    }

    /// The event time the views are read "as of": the configured
    /// `as_of`, else the largest stream watermark (a final stream counts
    /// with its largest event time).
    pub fn as_of(&self) -> Option<i64> {
        if let Some(t) = self.cfg.as_of {
            return Some(match t.duration_since(std::time::UNIX_EPOCH) {
                Ok(d) => d.as_millis() as i64,
                Err(e) => -(e.duration().as_millis() as i64),
            });
        }
        self.gates.values().filter_map(|g| g.reached()).max()
    }

    /// A snapshot for one query that reads only `needed` views: those are
    /// evaluated if they changed; the others keep their last evaluation
    /// (the query does not read them). Not published as the latest
    /// snapshot unless every view is current.
    pub fn snapshot_for(&mut self, needed: &HashSet<String>) -> Result<Arc<Snapshot>> {
        self.report_state();
        let as_of = self.as_of();
        if self.snapshot_epoch == Some(self.epoch) && self.snapshot_as_of == as_of {
            return Ok(self.cell.load());
        }
        if self
            .views
            .iter()
            .all(|v| needed.contains(&v.name) || !v.is_dirty())
        {
            return self.snapshot();
        }
        let mut views = HashMap::with_capacity(self.views.len());
        self.last_evaluation.clear();
        for v in &mut self.views {
            if needed.contains(&v.name) {
                views.insert(
                    v.name.clone(),
                    evaluate_timed(v, &mut self.last_evaluation)?,
                );
            } else if let Some(b) = v.cached() {
                views.insert(v.name.clone(), b);
            }
        }
        Ok(Arc::new(Snapshot {
            epoch: self.epoch,
            views,
            late_events: Arc::new(self.late.batches()),
            duplicates: self.duplicates_batches()?,
            as_of,
        }))
    }

    /// The rows of `store_duplicates` (stores × streams with duplicates).
    fn duplicates_batches(&self) -> Result<Arc<Vec<RecordBatch>>> {
        let rows: Vec<(&str, &str, u64, i64)> = self
            .gates
            .iter()
            .flat_map(|(k, g)| {
                g.duplicates_by_store
                    .iter()
                    .map(move |(s, (n, t))| (k.name(), s.as_str(), *n, *t))
            })
            .collect();
        Ok(Arc::new(vec![crate::snapshot::duplicates_batch(&rows)?]))
    }
}

/// Evaluates `v` (cached if unchanged); a real evaluation is timed into
/// `log` and `storepulse_engine_view_evaluate_seconds{view}`.
pub(super) fn evaluate_timed(
    v: &mut ContinuousView,
    log: &mut Vec<(String, f64)>,
) -> Result<Arc<Vec<RecordBatch>>> {
    let t = Instant::now();
    let dirty = v.is_dirty();
    let out = v.evaluate()?;
    if dirty {
        let secs = t.elapsed().as_secs_f64();
        metrics::histogram!(crate::metric_names::ENGINE_VIEW_EVALUATE_SECONDS, "view" => v.name.clone())
            .record(secs);
        log.push((v.name.clone(), secs));
    }
    Ok(out)
}
