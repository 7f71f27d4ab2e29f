//! Topic administration: creating the event-contract topics for a replay or
//! a test.

use std::{collections::BTreeMap, time::Duration};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    types::RDKafkaErrorCode,
};

use crate::{
    config::producer_config,
    context::LoggingContext,
    error::{KafkaSourceError, Result},
};

/// Creates the `topics` that do not exist yet with `partitions` partitions
/// and replication factor `replication`; returns those it created. Fails
/// (naming the brokers) if they cannot be reached within `timeout`.
pub async fn ensure_topics(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topics: &[String],
    partitions: i32,
    replication: i32,
    timeout: Duration,
) -> Result<Vec<String>> {
    let admin: AdminClient<LoggingContext> = producer_config(brokers, properties, timeout)
        .create_with_context(LoggingContext)
        .map_err(|e| KafkaSourceError::Config(format!("admin client: {e}")))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(|source| KafkaSourceError::Unreachable {
            brokers: brokers.to_string(),
            timeout,
            source,
        })?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(t) => created.push(t),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                return Err(KafkaSourceError::Config(format!(
                    "cannot create topic '{t}' on '{brokers}': {code}"
                )))
            }
        }
    }
    if !created.is_empty() {
        tracing::info!(topics = ?created, partitions, "Kafka topics created");
    }
    Ok(created)
}
