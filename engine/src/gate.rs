//! The stream gate: what happens to a decoded batch before any view sees it.
//!
//! For each row, in order: a duplicate `event_id` (seen within the horizon)
//! is dropped and counted; a row older than the stream watermark minus the
//! allowed lateness is routed to `late_events`; everything else is accepted.
//! Receipt lines share their receipt's `event_id`: a `sales` row with
//! `line_no > 0` follows the decision taken for its receipt's first line.
//! Finally the partition watermark advances to the batch's largest `ts`.

use std::{collections::BTreeMap, sync::Arc};

use datafusion::arrow::{
    array::{Array, AsArray, BooleanArray, RecordBatch},
    compute::filter_record_batch,
    datatypes::{Int32Type, TimestampMillisecondType},
};
use storepulse_ingest::StreamKind;

use crate::{
    dedup::Deduplicator,
    error::Result,
    watermark::{Watermark, WatermarkTracker},
};

/// Per-stream event-time state: watermark tracking and de-duplication.
#[derive(Debug, Clone)]
pub struct StreamGate {
    stream: StreamKind,
    allowed_lateness_ms: i64,
    /// Watermarks of the stream's partitions.
    pub watermark: WatermarkTracker,
    /// Seen event ids.
    pub dedup: Deduplicator,
    /// Events accepted so far.
    pub accepted_events: u64,
    /// Duplicates dropped so far.
    pub duplicate_events: u64,
    /// Late events routed to `late_events` so far.
    pub late_events: u64,
    /// Duplicates per store: how many, and the event time of the latest
    /// (a store re-uploading what it already sent; `store_duplicates`).
    pub duplicates_by_store: BTreeMap<String, (u64, i64)>,
}

/// The outcome of gating one batch.
#[derive(Debug)]
pub struct Gated {
    /// Rows the views must apply.
    pub accepted: Option<RecordBatch>,
    /// Rows later than the allowed lateness, with the watermark they missed.
    pub late: Option<(RecordBatch, i64)>,
    /// Events (not rows) accepted.
    pub accepted_events: u64,
    /// Duplicate events dropped.
    pub duplicates: u64,
    /// Late events.
    pub late_events: u64,
}

impl StreamGate {
    /// A gate for `stream`.
    pub fn new(stream: StreamKind, cfg: &crate::EngineConfig) -> Self {
        Self {
            stream,
            allowed_lateness_ms: cfg.allowed_lateness.as_millis() as i64,
            watermark: WatermarkTracker::new(cfg.idle_timeout),
            dedup: Deduplicator::new(cfg.dedup_horizon.as_millis() as i64),
            accepted_events: 0,
            duplicate_events: 0,
            late_events: 0,
            duplicates_by_store: BTreeMap::new(),
        }
    }

    /// The smallest event time a row accepted from now on can have
    /// (watermark − allowed lateness; `i64::MAX` once final; `None` before
    /// any watermark).
    pub fn floor(&self) -> Option<i64> {
        match self.watermark.current() {
            Watermark::None => None,
            Watermark::At(t) => Some(t.saturating_sub(self.allowed_lateness_ms)),
            Watermark::Final => Some(i64::MAX),
        }
    }

    /// Event time the stream has reached: its watermark, or once final the
    /// largest event time it delivered.
    pub fn reached(&self) -> Option<i64> {
        match self.watermark.current() {
            Watermark::None => None,
            Watermark::At(t) => Some(t),
            Watermark::Final => self.watermark.max_ts(),
        }
    }

    /// Applies de-duplication and lateness to `batch` from `partition`,
    /// then advances the watermark; `now_ms` is the wall clock.
    pub fn gate(
        &mut self,
        partition: &Arc<str>,
        batch: &RecordBatch,
        now_ms: i64,
    ) -> Result<Gated> {
        let wm = self.watermark.current();
        let threshold = match wm {
            Watermark::At(t) => t.saturating_sub(self.allowed_lateness_ms),
            Watermark::Final => i64::MAX,
            Watermark::None => i64::MIN,
        };
        let ids = batch.column(0).as_string::<i32>();
        let stores = batch
            .column_by_name("store_id")
            .and_then(|c| c.as_string_opt::<i32>());
        let ts = batch.column(1).as_primitive::<TimestampMillisecondType>();
        let line_no = (self.stream == StreamKind::Sales).then(|| {
            batch
                .column_by_name("line_no")
                .expect("sales has line_no")
                .as_primitive::<Int32Type>()
                .clone()
        });
        let n = batch.num_rows();
        let mut keep = Vec::with_capacity(n);
        let mut late = Vec::with_capacity(n);
        let (mut n_keep, mut n_late, mut n_dup) = (0u64, 0u64, 0u64);
        let mut decision = (true, false); // (keep, late) of the current event
        let mut max_ts = None::<i64>;
        for i in 0..n {
            let t = ts.value(i);
            max_ts = Some(max_ts.map_or(t, |m| m.max(t)));
            let first_line = line_no.as_ref().is_none_or(|l| l.value(i) == 0);
            if first_line {
                decision = if !self.dedup.first_time(ids.value(i), t) {
                    n_dup += 1;
                    if let Some(s) = stores.filter(|s| !s.is_null(i)) {
                        let e = match self.duplicates_by_store.get_mut(s.value(i)) {
                            Some(e) => e,
                            None => self
                                .duplicates_by_store
                                .entry(s.value(i).to_string())
                                .or_insert((0, t)),
                        };
                        e.0 += 1;
                        e.1 = e.1.max(t);
                    }
                    (false, false)
                } else if t < threshold {
                    n_late += 1;
                    (false, true)
                } else {
                    n_keep += 1;
                    (true, false)
                };
            }
            keep.push(decision.0);
            late.push(decision.1);
        }
        self.watermark.observe(partition, max_ts, now_ms);
        let wm_after = self.watermark.advance(now_ms);
        if let Some(w) = wm_after.as_ms() {
            self.dedup.evict(w);
        }
        self.accepted_events += n_keep;
        self.duplicate_events += n_dup;
        self.late_events += n_late;
        let pick = |mask: Vec<bool>, count: u64| -> Result<Option<RecordBatch>> {
            Ok(match count {
                0 => None,
                _ if mask.iter().all(|k| *k) => Some(batch.clone()),
                _ => Some(filter_record_batch(batch, &BooleanArray::from(mask))?),
            })
        };
        Ok(Gated {
            accepted: pick(keep, n_keep)?,
            late: pick(late, n_late)?
                .map(|b| (b, threshold.saturating_add(self.allowed_lateness_ms))),
            accepted_events: n_keep,
            duplicates: n_dup,
            late_events: n_late,
        })
    }
}
