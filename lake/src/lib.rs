//! The storepulse lake: Parquet that any engine reads, on object_store
//! (a local directory or S3 and S3-compatible stores).
//!
//! ```text
//! <lake>/events/<stream>/date=YYYY-MM-DD/part-*.parquet          raw-event archive (archive.rs)
//! <lake>/views/<view>/date=YYYY-MM-DD/<id>.parquet               view snapshots (snapshot.rs)
//! <lake>/views/_manifest/<id>.json                                committed snapshots
//! <lake>/reports/<name>/date=YYYY-MM-DD/<name>-<time>.<ext>       scheduled reports (report.rs)
//! ```
//!
//! The same plumbing stores the engine's checkpoints (checkpoint.rs,
//! `<data_dir>/checkpoints/ckpt-<n>/...` by default, manifest last).
//!
//! `history.<stream>` and `snapshots.<view>` make it queryable in the same
//! SQL session (tables.rs); retention deletes old date partitions
//! (retention.rs). Every write is one atomic object PUT, retried with
//! backoff (store.rs); health and counters are in [`LakeStatus`].

pub mod archive;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod metric_names;
pub mod report;
pub mod retention;
pub mod schedule;
pub mod snapshot;
pub mod status;
pub mod store;
pub mod tables;

pub use archive::Archiver;
pub use checkpoint::{CheckpointConfig, CheckpointStore, Manifest as CheckpointManifest};
pub use config::{
    ArchiveConfig, LakeConfig, ReportConfig, ReportFormat, RetentionRule, S3Config, SnapshotConfig,
};
pub use error::{LakeError, Result};
pub use report::{ReportOutput, Reporter};
pub use schedule::Schedule;
pub use snapshot::{SnapshotManifest, Snapshotter};
pub use status::LakeStatus;
pub use store::Lake;
pub use tables::register_lake_tables;
