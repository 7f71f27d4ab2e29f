//! Event-time watermarks per source partition.
//!
//! A partition's watermark is the largest event time it has delivered. The
//! stream watermark is the minimum over partitions that are neither finished
//! (end of a bounded input) nor idle (nothing delivered for `idle_timeout`),
//! so a closed store or a quiet Kafka partition does not stall it. When every
//! partition is finished the watermark is [`Watermark::Final`]: all windows
//! are closed. The stream watermark never goes backwards.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

/// A stream's watermark. Serialized as `null` (none yet), an RFC 3339 time,
/// or `"final"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Watermark {
    /// No partition has delivered yet.
    None,
    /// Event time (epoch ms) up to which the stream is complete.
    At(i64),
    /// Every partition has ended: nothing more will arrive.
    Final,
}

impl Watermark {
    /// The watermark as epoch ms, if it is a time.
    pub fn as_ms(self) -> Option<i64> {
        match self {
            Watermark::At(t) => Some(t),
            _ => None,
        }
    }
}

impl serde::Serialize for Watermark {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Watermark::None => s.serialize_none(),
            Watermark::Final => s.serialize_str("final"),
            Watermark::At(t) => {
                match datafusion::arrow::temporal_conversions::timestamp_ms_to_datetime(*t) {
                    Some(dt) => s.serialize_str(&dt.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()),
                    None => s.serialize_i64(*t),
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Partition {
    max_ts: i64,
    last_seen_ms: i64,
    finished: bool,
}

/// Watermark bookkeeping for one stream.
#[derive(Debug, Clone)]
pub struct WatermarkTracker {
    idle_timeout_ms: i64,
    partitions: BTreeMap<Arc<str>, Partition>,
    current: Watermark,
}

impl WatermarkTracker {
    /// A tracker with the given idle timeout.
    pub fn new(idle_timeout: Duration) -> Self {
        Self {
            idle_timeout_ms: idle_timeout.as_millis() as i64,
            partitions: BTreeMap::new(),
            current: Watermark::None,
        }
    }

    /// The largest event time any partition delivered.
    pub fn max_ts(&self) -> Option<i64> {
        self.partitions
            .values()
            .map(|p| p.max_ts)
            .max()
            .filter(|t| *t != i64::MIN)
    }

    /// The stream watermark as of the last [`Self::advance`].
    pub fn current(&self) -> Watermark {
        self.current
    }

    /// Records that `partition` delivered events up to `max_ts` at wall
    /// clock `now_ms`.
    pub fn observe(&mut self, partition: &Arc<str>, max_ts: Option<i64>, now_ms: i64) {
        let p = self
            .partitions
            .entry(partition.clone())
            .or_insert(Partition {
                max_ts: i64::MIN,
                last_seen_ms: now_ms,
                finished: false,
            });
        if let Some(t) = max_ts {
            p.max_ts = p.max_ts.max(t);
        }
        p.last_seen_ms = now_ms;
        p.finished = false;
    }

    /// Marks `partition` as finished (bounded input ended).
    pub fn finish(&mut self, partition: &Arc<str>) {
        if let Some(p) = self.partitions.get_mut(partition) {
            p.finished = true;
        } else {
            self.partitions.insert(
                partition.clone(),
                Partition {
                    max_ts: i64::MIN,
                    last_seen_ms: 0,
                    finished: true,
                },
            );
        }
    }

    /// Recomputes the stream watermark at wall clock `now_ms`.
    pub fn advance(&mut self, now_ms: i64) -> Watermark {
        if self.partitions.is_empty() {
            return self.current;
        }
        let mut active_min: Option<i64> = None;
        let mut any_max = i64::MIN;
        let mut all_finished = true;
        for p in self.partitions.values() {
            any_max = any_max.max(p.max_ts);
            if p.finished {
                continue;
            }
            all_finished = false;
            if self.idle(p, now_ms) {
                continue; // idle: does not hold the watermark back
            }
            active_min = Some(active_min.map_or(p.max_ts, |m: i64| m.min(p.max_ts)));
        }
        let candidate = if all_finished {
            Watermark::Final
        } else {
            match active_min.unwrap_or(any_max) {
                i64::MIN => Watermark::None,
                t => Watermark::At(t),
            }
        };
        self.current = self.current.max(candidate);
        self.current
    }

    /// True if partition `p` delivered nothing for `idle_timeout`.
    fn idle(&self, p: &Partition, now_ms: i64) -> bool {
        now_ms - p.last_seen_ms >= self.idle_timeout_ms
    }

    /// True if every partition that is not finished has delivered nothing
    /// for `idle_timeout` (and at least one is not finished): the whole
    /// stream is quiet (stock counts between nightly stock-takes).
    pub fn all_idle(&self, now_ms: i64) -> bool {
        let mut open = self.partitions.values().filter(|p| !p.finished).peekable();
        open.peek().is_some() && open.all(|p| self.idle(p, now_ms))
    }

    /// Moves the stream watermark up to `t` (never back): an idle stream
    /// follows the engine's other streams, so it does not hold back what
    /// depends on all of them (the retail ledgers' folding floor). Rows it
    /// delivers later are late if older than `t` − allowed lateness, as on
    /// any stream.
    pub fn follow(&mut self, t: i64) {
        if let Watermark::None | Watermark::At(_) = self.current {
            self.current = self.current.max(Watermark::At(t));
        }
    }

    /// The tracker's state for a checkpoint: the stream watermark and
    /// `(partition, largest event time)` per partition.
    pub fn export(&self) -> (Watermark, Vec<(Arc<str>, i64)>) {
        let parts = self
            .partitions
            .iter()
            .map(|(k, p)| (k.clone(), p.max_ts))
            .collect();
        (self.current, parts)
    }

    /// Restores a state from [`Self::export`]; partitions count as seen at
    /// `now_ms` (idleness restarts with the process). Bounded inputs are
    /// read again from their positions after a restart and report their
    /// end again, so a `Final` watermark comes back as the largest event
    /// time and no partition as finished.
    pub fn import(&mut self, current: Watermark, partitions: &[(Arc<str>, i64)], now_ms: i64) {
        for (k, max_ts) in partitions {
            self.partitions.insert(
                k.clone(),
                Partition {
                    max_ts: *max_ts,
                    last_seen_ms: now_ms,
                    finished: false,
                },
            );
        }
        self.current = match current {
            Watermark::Final => match self.max_ts() {
                Some(t) => Watermark::At(t),
                None => Watermark::None,
            },
            w => w,
        };
    }

    /// `(partition, partition watermark, finished, idle)` for status pages.
    pub fn partitions(&self, now_ms: i64) -> Vec<(Arc<str>, Option<i64>, bool, bool)> {
        self.partitions
            .iter()
            .map(|(k, p)| {
                (
                    k.clone(),
                    (p.max_ts != i64::MIN).then_some(p.max_ts),
                    p.finished,
                    self.idle(p, now_ms),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_over_active_partitions_and_idle_ones_do_not_stall() {
        let mut w = WatermarkTracker::new(Duration::from_secs(10));
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        w.observe(&a, Some(1_000), 0);
        w.observe(&b, Some(5_000), 0);
        assert_eq!(w.advance(0), Watermark::At(1_000));
        // b keeps delivering, a goes quiet: after the idle timeout a no longer counts.
        w.observe(&b, Some(9_000), 9_000);
        assert_eq!(w.advance(9_000), Watermark::At(1_000));
        w.observe(&b, Some(20_000), 10_001);
        assert_eq!(w.advance(10_001), Watermark::At(20_000));
        // a wakes up with old data: the watermark does not go backwards.
        w.observe(&a, Some(2_000), 10_002);
        assert_eq!(w.advance(10_002), Watermark::At(20_000));
        w.finish(&a);
        w.finish(&b);
        assert_eq!(w.advance(10_003), Watermark::Final);
    }
}
