//! storepulse ingest: everything between the outside world and an Arrow
//! `RecordBatch` the engine can apply.
//!
//! * [`schema`] — the event contract v1: one [`StreamKind`] per stream, its
//!   JSON (nested) schema and its flat Arrow schema.
//! * [`decode`] — JSON lines → Arrow, receipts flattened to one row per line,
//!   every bad record turned into a [`DeadLetter`] with a reason.
//! * [`dead_letter`] — where bad records go (a JSONL file for now).
//! * [`source`] — the bounded file source (JSONL, CSV, Parquet) and the live
//!   generator source, both producing [`SourceBatch`]es.
//! * [`gen`] — the deterministic synthetic chain (`storepulse gen`, `demo`).

pub mod align;
pub mod dead_letter;
pub mod decode;
pub mod error;
pub mod gen;
pub mod metric_names;
pub mod schema;
pub mod source;

pub use dead_letter::{DeadLetter, DeadLetterSink, JsonlDeadLetterSink, MemoryDeadLetterSink};
pub use decode::{DecodeOutput, EventDecoder, RawRecord};
pub use error::{IngestError, Result};
pub use schema::StreamKind;
pub use source::{AppliedPositions, Position, SourceBatch, SourceMessage};
