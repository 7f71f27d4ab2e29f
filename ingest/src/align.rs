//! Event-time alignment of the files of one bounded run.
//!
//! A replay reads one file per stream, each on its own thread. Without
//! alignment a small file (the fridges' readings) is read to its end while
//! the big one (the receipts) is still at its first hour, and the engine's
//! clock (`as_of`, the largest stream watermark) jumps to the end of the data
//! at once: rules evaluated along event time would all see the last instant.
//! Aligned, a file sends a batch only while that batch does not start more
//! than `max_drift` of event time ahead of the slowest unfinished file (the
//! slowest one always may), so the streams advance together, as they did
//! live. Like Flink's watermark alignment, for files.

use std::{
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use arrow::{array::AsArray, array::RecordBatch, datatypes::TimestampMillisecondType};

/// Progress of the files of one run.
#[derive(Debug)]
pub struct Alignment {
    /// Per member: largest event time sent (`i64::MIN`: none yet), or
    /// `None` once finished.
    progress: Mutex<Vec<Option<i64>>>,
    changed: Condvar,
    max_drift_ms: i64,
}

impl Alignment {
    /// Alignment of `members` files, each at most `max_drift` ahead.
    pub fn new(members: usize, max_drift: Duration) -> Arc<Self> {
        Arc::new(Self {
            progress: Mutex::new(vec![Some(i64::MIN); members]),
            changed: Condvar::new(),
            max_drift_ms: max_drift.as_millis().min(i64::MAX as u128) as i64,
        })
    }

    /// Blocks member `me` until a batch starting at event time `first_ts`
    /// may be sent (or `stop()` turns true; checked every 100 ms).
    pub fn wait_turn(&self, me: usize, first_ts: i64, stop: impl Fn() -> bool) {
        let mut p = self.progress.lock().expect("not poisoned");
        loop {
            let mine = p[me].unwrap_or(i64::MAX);
            let slowest_other = p
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != me)
                .filter_map(|(_, v)| *v)
                .min();
            let go = match slowest_other {
                None => true,
                Some(other) => mine <= other || first_ts <= other.saturating_add(self.max_drift_ms),
            };
            if go || stop() {
                return;
            }
            p = self
                .changed
                .wait_timeout(p, Duration::from_millis(100))
                .expect("not poisoned")
                .0;
        }
    }

    /// The largest lead (ms of event time) a member may have.
    pub fn max_drift_ms(&self) -> i64 {
        self.max_drift_ms
    }

    /// Member `me` sent events up to `max_ts`.
    pub fn sent(&self, me: usize, max_ts: i64) {
        let mut p = self.progress.lock().expect("not poisoned");
        if let Some(v) = &mut p[me] {
            *v = (*v).max(max_ts);
        }
        drop(p);
        self.changed.notify_all();
    }

    /// Member `me` has ended (or failed): the others no longer wait for it.
    pub fn finished(&self, me: usize) {
        self.progress.lock().expect("not poisoned")[me] = None;
        self.changed.notify_all();
    }
}

/// Cuts `batch` into contiguous runs of rows whose event times stay within
/// `span_ms` of the run's first row (a file's lines are roughly in time
/// order; rows of one receipt share a time, so a receipt is never cut). A
/// small file of counts covers days in one batch; sent whole, it would move
/// the clock days ahead at once.
pub fn split_by_event_time(batch: &RecordBatch, span_ms: i64) -> Vec<RecordBatch> {
    let Some(ts) = batch
        .column_by_name("ts")
        .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
    else {
        return vec![batch.clone()];
    };
    let mut out = Vec::new();
    let (mut start, mut first) = (0usize, None::<i64>);
    for i in 0..ts.len() {
        let t = ts.value(i);
        match first {
            Some(f) if t > f.saturating_add(span_ms) => {
                out.push(batch.slice(start, i - start));
                start = i;
                first = Some(t);
            }
            None => first = Some(t),
            _ => {}
        }
    }
    if start < batch.num_rows() || out.is_empty() {
        out.push(batch.slice(start, batch.num_rows() - start));
    }
    out
}

/// A file source's place in an [`Alignment`].
#[derive(Debug, Clone)]
pub struct AlignSlot {
    /// The shared progress.
    pub alignment: Arc<Alignment>,
    /// This file's index in it.
    pub member: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_file_waits_for_the_slow_one_and_never_deadlocks() {
        let a = Alignment::new(2, Duration::from_secs(60));
        // Nothing sent yet: both may go (the slowest may always go).
        a.wait_turn(0, 0, || false);
        a.sent(0, 10_000);
        // Member 1 at 0 is behind: it goes; member 0 at 10 s is within drift.
        a.wait_turn(1, 0, || false);
        a.sent(1, 0);
        a.wait_turn(0, 50_000, || false);
        a.sent(0, 120_000);
        // Member 0 would start at 130 s, 130 s ahead of member 1: it waits
        // until member 1 catches up (another thread here).
        let a2 = a.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            a2.sent(1, 80_000);
        });
        let started = std::time::Instant::now();
        a.wait_turn(0, 130_000, || false);
        assert!(started.elapsed() >= Duration::from_millis(40));
        t.join().unwrap();
        // A finished member no longer holds anyone back.
        a.finished(1);
        a.wait_turn(0, 10_000_000, || false);
    }

    #[test]
    fn batches_are_cut_where_event_time_runs_ahead() {
        use arrow::{
            array::TimestampMillisecondArray,
            datatypes::{DataType, Field, Schema, TimeUnit},
        };
        let schema = Arc::new(Schema::new(vec![Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        )]));
        let ts =
            TimestampMillisecondArray::from(vec![0, 10, 10, 70, 65, 200, 205]).with_timezone("UTC");
        let b = RecordBatch::try_new(schema, vec![Arc::new(ts)]).unwrap();
        let parts: Vec<usize> = split_by_event_time(&b, 60)
            .iter()
            .map(|p| p.num_rows())
            .collect();
        assert_eq!(parts, vec![3, 2, 2]);
        assert_eq!(split_by_event_time(&b, 1_000).len(), 1);
    }
}
