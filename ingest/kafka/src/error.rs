//! Typed errors of the Kafka source and replay producer.

use std::{path::PathBuf, time::Duration};

use storepulse_ingest::IngestError;

/// Result alias for the Kafka crate.
pub type Result<T, E = KafkaSourceError> = std::result::Result<T, E>;

/// Everything that stops a Kafka source or a replay.
///
/// A malformed *message* is not an error: it goes to the dead-letter topic
/// and consumption goes on. Transient broker trouble is not an error either:
/// librdkafka reconnects and the source keeps retrying.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSourceError {
    /// The configuration is invalid (a bad librdkafka property, an unknown
    /// stream name, ...).
    #[error("Kafka configuration: {0}")]
    Config(String),
    /// No broker answered within the connect timeout.
    #[error("cannot reach Kafka brokers '{brokers}' within {timeout:?}: {source}")]
    Unreachable {
        /// The bootstrap list that was tried.
        brokers: String,
        /// The bound that passed.
        timeout: Duration,
        /// librdkafka's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// A configured topic does not exist.
    #[error(
        "topic '{topic}' ({what}) does not exist on brokers '{brokers}'; create it \
         (`storepulse replay --create-topics` does) or point the source at another topic"
    )]
    UnknownTopic {
        /// The topic.
        topic: String,
        /// What it is for (`stream sales`, `dead letters`).
        what: String,
        /// The bootstrap list.
        brokers: String,
    },
    /// A client operation failed.
    #[error("Kafka {operation} failed: {source}")]
    Client {
        /// What was being done.
        operation: &'static str,
        /// librdkafka's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// Messages could not be delivered by the replay producer.
    #[error("{failed} of {total} messages could not be delivered; first error: {first}")]
    Delivery {
        /// Messages that failed.
        failed: u64,
        /// Messages attempted.
        total: u64,
        /// The first failure.
        first: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Decoding or channel trouble from the ingest crate.
    #[error(transparent)]
    Ingest(#[from] IngestError),
}

impl KafkaSourceError {
    pub(crate) fn client(
        operation: &'static str,
    ) -> impl FnOnce(rdkafka::error::KafkaError) -> Self {
        move |source| Self::Client { operation, source }
    }
}
