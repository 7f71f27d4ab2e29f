//! storepulse Kafka: the production way in and the replay tool.
//!
//! * [`config`] — `[[sources]] type = "kafka"`: brokers, consumer group,
//!   topic per stream, start position, micro-batch bounds, dead-letter
//!   topic, librdkafka pass-through properties (TLS, SASL).
//! * [`source`] — [`KafkaSource`]: per-partition micro-batches decoded into
//!   the engine's channel, dead letters to a topic, pause on backpressure,
//!   offsets committed only once applied, drained on rebalance.
//! * [`replay`] — publish a dataset (`storepulse gen` output or any event
//!   contract files) with an idempotent producer keyed by `store_id`.
//! * [`admin`] — topic creation and checks.

pub mod admin;
pub mod config;
mod context;
pub mod error;
pub mod metric_names;
pub mod replay;
pub mod source;

pub use config::{KafkaSourceConfig, StartFrom};
pub use error::{KafkaSourceError, Result};
pub use source::{KafkaSource, KafkaStatus};
