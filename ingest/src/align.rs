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

/// Where one file is: the largest event time sent (`i64::MIN`: none yet)
/// and the first event time of the batch it waits to send.
#[derive(Debug, Clone, Copy)]
struct Member {
    sent: i64,
    waiting: Option<i64>,
}

impl Member {
    /// The batch it waits to send, else what it sent.
    fn frontier(self) -> i64 {
        self.waiting.unwrap_or(self.sent)
    }
}

/// Progress of the files of one run.
#[derive(Debug)]
pub struct Alignment {
    /// Per member (`None` once finished).
    progress: Mutex<Vec<Option<Member>>>,
    changed: Condvar,
    max_drift_ms: i64,
}

impl Alignment {
    /// Alignment of `members` files, each at most `max_drift` ahead.
    pub fn new(members: usize, max_drift: Duration) -> Arc<Self> {
        Arc::new(Self {
            progress: Mutex::new(vec![
                Some(Member {
                    sent: i64::MIN,
                    waiting: None,
                });
                members
            ]),
            changed: Condvar::new(),
            max_drift_ms: max_drift.as_millis().min(i64::MAX as u128) as i64,
        })
    }

    /// Blocks member `me` until a batch starting at event time `first_ts`
    /// may be sent (or `stop()` turns true; checked every 100 ms): when it
    /// starts within `max_drift` of every other unfinished member's
    /// frontier. A member that has neither sent nor asked yet holds the
    /// others back, so a sparse file whose first event is days ahead (the
    /// purchase orders of each morning) waits for the others to get there
    /// instead of moving the clock at once. The member with the earliest
    /// frontier always may go, so nobody waits forever.
    pub fn wait_turn(&self, me: usize, first_ts: i64, stop: impl Fn() -> bool) {
        let mut p = self.progress.lock().expect("not poisoned");
        if let Some(m) = &mut p[me] {
            m.waiting = Some(first_ts);
        }
        self.changed.notify_all();
        loop {
            let slowest_other = p
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != me)
                .filter_map(|(_, v)| v.map(Member::frontier))
                .min();
            let go = match slowest_other {
                None => true,
                Some(other) => first_ts <= other.saturating_add(self.max_drift_ms),
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
        if let Some(m) = &mut p[me] {
            m.sent = m.sent.max(max_ts);
            m.waiting = None;
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
        let log = Arc::new(Mutex::new(Vec::new()));
        // Member 1 is sparse: its first batch starts at 1,000 s. It waits
        // until member 0 has sent up to within the drift (60 s) of it.
        let (a1, log1) = (a.clone(), log.clone());
        let sparse = std::thread::spawn(move || {
            a1.wait_turn(1, 1_000_000, || false);
            log1.lock().unwrap().push(("sparse", 1_000_000));
            a1.sent(1, 1_000_000);
            a1.finished(1);
        });
        // Member 0 sends a batch every 100 s, each spanning 50 s.
        for t in (0..=1_200_000).step_by(100_000) {
            a.wait_turn(0, t, || false);
            log.lock().unwrap().push(("dense", t));
            a.sent(0, t + 50_000);
        }
        sparse.join().unwrap();
        let log = log.lock().unwrap();
        let at = |e| log.iter().position(|x| *x == e).unwrap();
        // Not before member 0 sent up to 950 s (the 900 s batch)...
        assert!(
            at(("sparse", 1_000_000)) > at(("dense", 900_000)),
            "{log:?}"
        );
        // ...and member 0 did not start 1,100 s (over 60 s past the sparse
        // member's 1,000 s) before the sparse member sent.
        assert!(
            at(("sparse", 1_000_000)) < at(("dense", 1_100_000)),
            "{log:?}"
        );
        // A finished member no longer holds anyone back.
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
