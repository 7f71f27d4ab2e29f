//! The durable outbox: notifications waiting for their sinks, the rules'
//! lifecycle state and the notification history, in one `redb` database
//! under the data dir (`alerts.redb`).
//!
//! An evaluation commits its notifications **and** the rule's new lifecycle
//! state in one transaction: after a crash either both are there (the
//! notifications are delivered after the restart) or neither (the rule is
//! evaluated again from the old state and produces the same ids). Each sink
//! has a cursor (the next sequence number it must deliver) advanced only
//! after the sink acknowledged, so delivery is at least once per sink and,
//! with the stable ids, effectively once for a de-duplicating receiver.
//! Entries every sink has passed are deleted.
//!
//! The outbox is bounded (`capacity` entries not yet delivered everywhere):
//! a commit that would exceed it fails with [`OutboxError::Full`] (and the
//! rule's state is not advanced, so nothing is lost: the next evaluation
//! tries again), counted in `storepulse_alerts_outbox_full_total`.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::lifecycle::{Lifecycle, Notification};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
const RULES: TableDefinition<&str, &[u8]> = TableDefinition::new("lifecycle");
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");
/// redb's page cache.
const CACHE_BYTES: usize = 32 << 20;

/// Outbox failures.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// Too many notifications not yet delivered everywhere.
    #[error(
        "alert outbox full: {batch} new notifications do not fit beside the {pending} not yet \
         delivered to every sink (capacity {capacity}); a sink is down or too slow — new \
         notifications wait until it catches up"
    )]
    Full {
        /// Notifications the commit tried to add.
        batch: u64,
        /// Entries waiting.
        pending: u64,
        /// The configured bound.
        capacity: u64,
    },
    /// The database failed.
    #[error("alert outbox {path}: {message}")]
    Store {
        /// Database file.
        path: String,
        /// What failed.
        message: String,
    },
}

/// One outbox entry: a notification and the sinks it goes to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// The notification.
    pub notification: Notification,
    /// Sink names (empty: every sink).
    pub sinks: Vec<String>,
}

impl Entry {
    /// True if sink `name` delivers this entry.
    pub fn for_sink(&self, name: &str) -> bool {
        self.sinks.is_empty() || self.sinks.iter().any(|s| s == name)
    }
}

/// The outbox (cheap to clone: one shared database).
#[derive(Clone)]
pub struct Outbox {
    db: Arc<Database>,
    path: String,
    capacity: u64,
    history_capacity: u64,
    sinks: Arc<Vec<String>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("path", &self.path).finish()
    }
}

impl Outbox {
    /// Opens (or creates) the outbox at `path` for the given sinks. A sink
    /// seen for the first time starts at the oldest entry still kept.
    pub fn open(
        path: &Path,
        capacity: u64,
        history_capacity: u64,
        sinks: &[String],
    ) -> Result<Self, OutboxError> {
        let p = path.display().to_string();
        let err = |e: &dyn std::fmt::Display| OutboxError::Store {
            path: p.clone(),
            message: e.to_string(),
        };
        // redb caches up to 1 GiB by default; the outbox is small and
        // mostly appended and trimmed, so 32 MiB keeps a storm (whose
        // lifecycle is rewritten at every evaluation) from growing the
        // process by a gigabyte of cache.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| err(&e))?;
        let w = db.begin_write().map_err(|e| err(&e))?;
        {
            let entries = w.open_table(ENTRIES).map_err(|e| err(&e))?;
            let first = entries
                .first()
                .map_err(|e| err(&e))?
                .map(|(k, _)| k.value());
            let next = entries
                .last()
                .map_err(|e| err(&e))?
                .map_or(0, |(k, _)| k.value() + 1);
            let mut cursors = w.open_table(CURSORS).map_err(|e| err(&e))?;
            for s in sinks {
                if cursors.get(s.as_str()).map_err(|e| err(&e))?.is_none() {
                    cursors
                        .insert(s.as_str(), first.unwrap_or(next))
                        .map_err(|e| err(&e))?;
                }
            }
            w.open_table(RULES).map_err(|e| err(&e))?;
            w.open_table(HISTORY).map_err(|e| err(&e))?;
        }
        w.commit().map_err(|e| err(&e))?;
        Ok(Self {
            db: Arc::new(db),
            path: p,
            capacity,
            history_capacity,
            sinks: Arc::new(sinks.to_vec()),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> OutboxError {
        OutboxError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// The saved lifecycle of every rule.
    pub fn lifecycles(&self) -> Result<BTreeMap<String, Lifecycle>, OutboxError> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(RULES).map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let l: Lifecycle = serde_json::from_slice(v.value()).map_err(|e| self.err(e))?;
            out.insert(k.value().to_string(), l);
        }
        Ok(out)
    }

    /// Entries not yet delivered to every sink.
    pub fn pending(&self) -> Result<u64, OutboxError> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(ENTRIES).map_err(|e| self.err(e))?;
        t.len().map_err(|e| self.err(e))
    }

    /// Commits a rule's notifications and its new lifecycle state together.
    /// Returns the entries' sequence numbers.
    pub fn commit(
        &self,
        rule: &str,
        lifecycle: &Lifecycle,
        notifications: &[Notification],
        sinks: &[String],
    ) -> Result<Vec<u64>, OutboxError> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut seqs = Vec::with_capacity(notifications.len());
        {
            let mut entries = w.open_table(ENTRIES).map_err(|e| self.err(e))?;
            let pending = entries.len().map_err(|e| self.err(e))?;
            if !notifications.is_empty() && pending + notifications.len() as u64 > self.capacity {
                metrics::counter!(crate::metric_names::ALERTS_OUTBOX_FULL_TOTAL).increment(1);
                return Err(OutboxError::Full {
                    batch: notifications.len() as u64,
                    pending,
                    capacity: self.capacity,
                });
            }
            let mut next = entries
                .last()
                .map_err(|e| self.err(e))?
                .map_or(0, |(k, _)| k.value() + 1);
            // Never reuse a sequence a sink's cursor has passed.
            let cursors = w.open_table(CURSORS).map_err(|e| self.err(e))?;
            for item in cursors.iter().map_err(|e| self.err(e))? {
                let (_, c) = item.map_err(|e| self.err(e))?;
                next = next.max(c.value());
            }
            drop(cursors);
            let mut history = w.open_table(HISTORY).map_err(|e| self.err(e))?;
            let mut h_next = history
                .last()
                .map_err(|e| self.err(e))?
                .map_or(0, |(k, _)| k.value() + 1);
            for n in notifications {
                let entry = Entry {
                    notification: n.clone(),
                    sinks: sinks.to_vec(),
                };
                let bytes = serde_json::to_vec(&entry).map_err(|e| self.err(e))?;
                entries
                    .insert(next, bytes.as_slice())
                    .map_err(|e| self.err(e))?;
                let hb = serde_json::to_vec(n).map_err(|e| self.err(e))?;
                history
                    .insert(h_next, hb.as_slice())
                    .map_err(|e| self.err(e))?;
                seqs.push(next);
                next += 1;
                h_next += 1;
            }
            // Bounded history: drop the oldest rows.
            let len = history.len().map_err(|e| self.err(e))?;
            if len > self.history_capacity {
                let cut = h_next - self.history_capacity;
                history
                    .retain_in(..cut, |_, _| false)
                    .map_err(|e| self.err(e))?;
            }
            let mut rules = w.open_table(RULES).map_err(|e| self.err(e))?;
            let state = serde_json::to_vec(lifecycle).map_err(|e| self.err(e))?;
            rules
                .insert(rule, state.as_slice())
                .map_err(|e| self.err(e))?;
        }
        w.commit().map_err(|e| self.err(e))?;
        metrics::gauge!(crate::metric_names::ALERTS_OUTBOX_PENDING).set(self.pending()? as f64);
        Ok(seqs)
    }

    /// Up to `limit` entries sink `sink` has not delivered, in order (with
    /// their sequence numbers). Entries routed elsewhere are skipped (and
    /// passed by the next [`Outbox::ack`]).
    pub fn next_for(
        &self,
        sink: &str,
        limit: usize,
    ) -> Result<(Vec<(u64, Entry)>, u64), OutboxError> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let cursors = r.open_table(CURSORS).map_err(|e| self.err(e))?;
        let from = cursors
            .get(sink)
            .map_err(|e| self.err(e))?
            .map_or(0, |v| v.value());
        let t = r.open_table(ENTRIES).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        let mut upto = from;
        for item in t.range(from..).map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let entry: Entry = serde_json::from_slice(v.value()).map_err(|e| self.err(e))?;
            upto = k.value() + 1;
            if entry.for_sink(sink) {
                out.push((k.value(), entry));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok((out, upto))
    }

    /// Records that `sink` delivered everything before sequence `upto`, and
    /// deletes entries every sink has passed.
    pub fn ack(&self, sink: &str, upto: u64) -> Result<(), OutboxError> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut cursors = w.open_table(CURSORS).map_err(|e| self.err(e))?;
            let cur = cursors
                .get(sink)
                .map_err(|e| self.err(e))?
                .map_or(0, |v| v.value());
            cursors
                .insert(sink, cur.max(upto))
                .map_err(|e| self.err(e))?;
            let mut min = u64::MAX;
            for s in self.sinks.iter() {
                let c = cursors
                    .get(s.as_str())
                    .map_err(|e| self.err(e))?
                    .map_or(0, |v| v.value());
                min = min.min(c);
            }
            drop(cursors);
            if min != u64::MAX {
                let mut entries = w.open_table(ENTRIES).map_err(|e| self.err(e))?;
                entries
                    .retain_in(..min, |_, _| false)
                    .map_err(|e| self.err(e))?;
            }
        }
        w.commit().map_err(|e| self.err(e))?;
        metrics::gauge!(crate::metric_names::ALERTS_OUTBOX_PENDING).set(self.pending()? as f64);
        Ok(())
    }

    /// The notification history, oldest first (at most the history bound).
    pub fn history(&self) -> Result<Vec<Notification>, OutboxError> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(HISTORY).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.err(e))? {
            let (_, v) = item.map_err(|e| self.err(e))?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| self.err(e))?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::AlertState;

    fn note(id: &str) -> Notification {
        Notification {
            alert_id: id.into(),
            rule: "r".into(),
            alert_key: id.into(),
            state: AlertState::Firing,
            severity: "warning".into(),
            first_seen: 1,
            last_seen: 2,
            notified_at: 2,
            sequence: 1,
            row: serde_json::json!({"k": id}),
        }
    }

    #[test]
    fn delivery_survives_reopen_and_every_sink_gets_everything_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.redb");
        let sinks = vec!["a".to_string(), "b".to_string()];
        let mut got_a = Vec::new();
        {
            let o = Outbox::open(&path, 100, 1000, &sinks).unwrap();
            let mut l = Lifecycle::default();
            l.sent.insert("x".into(), 1);
            o.commit("r", &l, &[note("1"), note("2"), note("3")], &[])
                .unwrap();
            let (batch, upto) = o.next_for("a", 2).unwrap();
            got_a.extend(batch.iter().map(|(_, e)| e.notification.alert_id.clone()));
            o.ack("a", upto).unwrap();
            // "Crash": b delivered nothing, a two of three.
        }
        let o = Outbox::open(&path, 100, 1000, &sinks).unwrap();
        assert_eq!(o.lifecycles().unwrap()["r"].sent["x"], 1, "state restored");
        let (rest, upto) = o.next_for("a", 10).unwrap();
        got_a.extend(rest.iter().map(|(_, e)| e.notification.alert_id.clone()));
        o.ack("a", upto).unwrap();
        assert_eq!(got_a, vec!["1", "2", "3"]);
        assert_eq!(o.pending().unwrap(), 3, "b has not delivered: entries kept");
        let (b, upto) = o.next_for("b", 10).unwrap();
        assert_eq!(b.len(), 3);
        o.ack("b", upto).unwrap();
        assert_eq!(o.pending().unwrap(), 0, "delivered everywhere: deleted");
        // New entries get new sequence numbers (never below a cursor).
        let seqs = o
            .commit("r", &Lifecycle::default(), &[note("4")], &[])
            .unwrap();
        assert_eq!(seqs, vec![3]);
        assert_eq!(o.history().unwrap().len(), 4);
    }

    #[test]
    fn routing_and_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let sinks = vec!["ops".to_string(), "shop".to_string()];
        let o = Outbox::open(&dir.path().join("o.redb"), 3, 2, &sinks).unwrap();
        o.commit("r", &Lifecycle::default(), &[note("1")], &["shop".into()])
            .unwrap();
        o.commit("r", &Lifecycle::default(), &[note("2")], &[])
            .unwrap();
        let (ops, upto) = o.next_for("ops", 10).unwrap();
        assert_eq!(ops.len(), 1, "entry 1 goes to shop only");
        assert_eq!(upto, 2);
        o.ack("ops", upto).unwrap();
        // shop is behind: 2 pending; the bound is 3.
        let full = o
            .commit("r", &Lifecycle::default(), &[note("3"), note("4")], &[])
            .unwrap_err();
        assert!(
            matches!(
                full,
                OutboxError::Full {
                    batch: 2,
                    pending: 2,
                    capacity: 3
                }
            ),
            "{full}"
        );
        assert!(full.to_string().contains("outbox full"));
        // History is bounded too.
        assert_eq!(o.history().unwrap().len(), 2);
    }
}
