//! Engine configuration (the `[engine]` table of `storepulse.toml`).

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// Event-time and state settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// How far behind the stream watermark an event may be and still count.
    /// Older events go to `late_events`. The watermark is the event time up
    /// to which a source partition has delivered (its maximum `ts`).
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// A partition that delivered nothing for this long (wall clock) no
    /// longer holds the stream watermark back (a store closed for the night).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Duplicate `event_id`s are dropped while the first copy is younger
    /// than this (in event time, relative to the watermark).
    #[serde(with = "humantime_serde")]
    pub dedup_horizon: Duration,
    /// Rows of `late_events` kept in memory for SQL; every late row is also
    /// appended to `late_events.jsonl` under the data dir.
    pub late_events_capacity: usize,
    /// Read every view "as of" this event time (RFC 3339, e.g.
    /// `2026-03-01T00:00:00Z`) instead of the current watermark: recency,
    /// velocity and cover in the retail views are measured at this instant.
    /// For reports over a finished period; unset in live use.
    #[serde(with = "humantime_serde")]
    pub as_of: Option<std::time::SystemTime>,
    /// Query-time views served from a result refreshed in the background,
    /// at most this old (view name → interval, e.g. `member_rfm = "30s"`):
    /// whole-table reads of expensive views answer from memory at the price
    /// of bounded staleness (see `refresh.rs`). Unlisted views are computed
    /// per query. A name that no `CREATE VIEW` defines is an error.
    pub refresh: BTreeMap<String, humantime_serde::Serde<Duration>>,
    /// When the background refresh of a `refresh` view falls behind
    /// (overload), queries keep reading its last result until it is this
    /// old (at least the view's interval); older, a query recomputes it
    /// first. Bounds staleness without putting recomputation on the query
    /// path in the common case.
    #[serde(with = "humantime_serde")]
    pub refresh_max_staleness: Duration,
    /// Upper bound of the engine's state (every view's groups plus the
    /// de-duplication sets), e.g. `"2GiB"`. A micro-batch that takes the
    /// state past it fails the pipeline with an error naming the largest
    /// view (a key explosion stops with a clear message instead of the
    /// process being OOM-killed); unset is unbounded.
    pub max_state_bytes: Option<bytesize::ByteSize>,
    /// Idle-key eviction per materialized view (view name → TTL, e.g.
    /// `member_activity = "30d"`): a group (key) that received no event
    /// while the view's event-time clock (the largest watermark of its
    /// streams) advanced by the TTL is dropped from the state and from the
    /// view. If the key comes back it starts again from that event. Bounds
    /// the state of views over an ever-growing key space (members, devices,
    /// hourly windows) without an error; never evicts before the TTL, at
    /// most a 64th of it later. On a hop() window view a window row goes
    /// when none of its panes received an event for the TTL. Not for
    /// session() window views. A name that no `CREATE MATERIALIZED VIEW`
    /// defines is an error.
    pub state_ttl: BTreeMap<String, humantime_serde::Serde<Duration>>,
    /// Directory for the late-events log (set by the binary from `data_dir`).
    #[serde(skip)]
    pub data_dir: Option<PathBuf>,
    /// Memory pool of the serving context in bytes: all concurrent queries
    /// (HTTP, pgwire, reports) share it; a query that needs more fails with
    /// "Resources exhausted". Set by the binary from `[serving]
    /// memory_limit`; `None` is unbounded.
    #[serde(skip)]
    pub query_memory_limit: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            allowed_lateness: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(30),
            dedup_horizon: Duration::from_secs(24 * 3600),
            late_events_capacity: 100_000,
            as_of: None,
            refresh: BTreeMap::new(),
            refresh_max_staleness: Duration::from_secs(30),
            max_state_bytes: None,
            state_ttl: BTreeMap::new(),
            data_dir: None,
            query_memory_limit: None,
        }
    }
}
