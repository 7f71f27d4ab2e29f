//! storepulse engine: continuous SQL views maintained incrementally on event
//! time.
//!
//! Data flow inside the engine, per [`storepulse_ingest::SourceBatch`]:
//!
//! 1. [`gate`]: drop duplicate `event_id`s within the horizon ([`dedup`]),
//!    route rows older than the stream watermark minus the allowed lateness
//!    to [`late`] (`late_events`), advance the per-partition [`watermark`].
//! 2. [`view`]: for every materialized view over that stream, run the view's
//!    stateless part (filters, projections, unnest, dimension joins) and a
//!    *partial* aggregate over the accepted rows with DataFusion, then merge
//!    the partial states into the view's keyed [`state`] with DataFusion's
//!    `GroupsAccumulator::merge_batch`. Cost per batch is proportional to the
//!    batch, not to history.
//! 3. [`snapshot`]: on read, each dirty view's state is evaluated once into
//!    Arrow batches; all views of one query read the same [`Snapshot`]
//!    (one engine epoch), through table providers in a DataFusion
//!    `SessionContext` that also holds plain views and dimension tables.

pub mod calendar;
pub mod catalog;
pub mod checkpoint;
pub mod config;
pub mod dedup;
pub mod dims;
pub mod engine;
pub mod error;
pub mod gate;
pub mod late;
pub mod metric_names;
pub mod prices;
pub mod query;
pub mod refresh;
pub mod snapshot;
pub mod sqlrt;
pub mod state;
pub mod view;
pub mod watermark;

pub use checkpoint::EngineCheckpoint;
pub use config::EngineConfig;
pub use dims::{DimensionData, DimensionError, DimensionKind, DimensionSource, PolicyLevel};
pub use engine::{AlertDefinition, Engine, IngestReport, StreamStatus, ViewInfo};
pub use error::{EngineError, ErrorKind, Result};
pub use query::{
    batch_bytes, refuse_writes, verify_read_only, write_kind, Ddl, EngineHandle, QueryLimits,
    QueryOutput, Reads, ResultMemory,
};
pub use snapshot::Snapshot;
pub use storepulse_sql::SqlLimits;
