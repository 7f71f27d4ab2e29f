//! The metric names storepulse-kafka records, in one place (each is recorded
//! where its comment says; `/metrics` renders them in the Prometheus
//! text format). Names follow `storepulse_<component>_<name>_<unit>`.

/// `storepulse_ingest_dead_letters_total` (counter), recorded in `source.rs`.
pub const INGEST_DEAD_LETTERS_TOTAL: &str = "storepulse_ingest_dead_letters_total";
/// `storepulse_kafka_aligned_paused_partitions` (gauge), recorded in `source.rs`.
pub const KAFKA_ALIGNED_PAUSED_PARTITIONS: &str = "storepulse_kafka_aligned_paused_partitions";
/// `storepulse_kafka_brokers_up` (gauge), recorded in `context.rs`.
pub const KAFKA_BROKERS_UP: &str = "storepulse_kafka_brokers_up";
/// `storepulse_kafka_bytes_total` (counter), recorded in `source.rs`.
pub const KAFKA_BYTES_TOTAL: &str = "storepulse_kafka_bytes_total";
/// `storepulse_kafka_client_errors_total` (counter), recorded in `context.rs`.
pub const KAFKA_CLIENT_ERRORS_TOTAL: &str = "storepulse_kafka_client_errors_total";
/// `storepulse_kafka_commit_errors_total` (counter), recorded in `context.rs`.
pub const KAFKA_COMMIT_ERRORS_TOTAL: &str = "storepulse_kafka_commit_errors_total";
/// `storepulse_kafka_commits_total` (counter), recorded in `context.rs`.
pub const KAFKA_COMMITS_TOTAL: &str = "storepulse_kafka_commits_total";
/// `storepulse_kafka_consume_errors_total` (counter), recorded in `source.rs`.
pub const KAFKA_CONSUME_ERRORS_TOTAL: &str = "storepulse_kafka_consume_errors_total";
/// `storepulse_kafka_consumer_lag_messages` (gauge), recorded in `context.rs`.
pub const KAFKA_CONSUMER_LAG_MESSAGES: &str = "storepulse_kafka_consumer_lag_messages";
/// `storepulse_kafka_consumer_lag_total_messages` (gauge), recorded in `context.rs`.
pub const KAFKA_CONSUMER_LAG_TOTAL_MESSAGES: &str = "storepulse_kafka_consumer_lag_total_messages";
/// `storepulse_kafka_dead_letter_errors_total` (counter), recorded in `source.rs`.
pub const KAFKA_DEAD_LETTER_ERRORS_TOTAL: &str = "storepulse_kafka_dead_letter_errors_total";
/// `storepulse_kafka_dead_letters_total` (counter), recorded in `source.rs`.
pub const KAFKA_DEAD_LETTERS_TOTAL: &str = "storepulse_kafka_dead_letters_total";
/// `storepulse_kafka_messages_total` (counter), recorded in `source.rs`.
pub const KAFKA_MESSAGES_TOTAL: &str = "storepulse_kafka_messages_total";
/// `storepulse_kafka_paused` (gauge), recorded in `source.rs`.
pub const KAFKA_PAUSED: &str = "storepulse_kafka_paused";
/// `storepulse_kafka_rebalances_total` (counter), recorded in `context.rs`.
pub const KAFKA_REBALANCES_TOTAL: &str = "storepulse_kafka_rebalances_total";
