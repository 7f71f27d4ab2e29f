//! The runtime's answers to the HTTP API ([`storepulse_serve::http::Operations`]):
//! health of the pipeline, Kafka sources, alert sinks and rules, the lake
//! and the checkpointer; the alert list; snapshots and reports on demand;
//! the Prometheus text.

use std::{sync::Arc, time::Duration};

use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Map, Value};
use storepulse_alerts::{AlertManager, RuleHealth};
use storepulse_kafka::KafkaStatus;
use storepulse_serve::http::{OpError, Operations, RuntimeHealth};

use crate::{checkpoint::Checkpointer, lake::LakeParts, pipeline::PipelineState};

/// How long an on-demand snapshot or report may take.
const ON_DEMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The parts of a running process the HTTP API reports on.
pub(crate) struct Runtime {
    /// Lifecycle of the ingest pipeline.
    pub(crate) pipeline: Arc<PipelineState>,
    /// Prometheus renderer.
    pub(crate) metrics: Option<PrometheusHandle>,
    /// Kafka sources' assignment and backpressure state.
    pub(crate) kafka: Vec<KafkaStatus>,
    /// The alert manager (`None` if no rule is defined).
    pub(crate) alerts: Option<Arc<AlertManager>>,
    /// The lake (`None` with `[lake] enabled = false`).
    pub(crate) lake: Option<Arc<LakeParts>>,
    /// The checkpointer (`None` with `[checkpoint] enabled = false`).
    pub(crate) checkpoint: Option<Arc<Checkpointer>>,
}

impl Runtime {
    fn lake(&self) -> Result<&LakeParts, OpError> {
        self.lake.as_deref().ok_or(OpError::LakeDisabled)
    }

    /// One line per Kafka source that reaches none of its brokers.
    fn kafka_faults(&self, faults: &mut Vec<String>) {
        for k in &self.kafka {
            if let Some((0, known)) = k.brokers_up().filter(|(_, known)| *known > 0) {
                let last = k.last_error().map(|(_, m)| m).unwrap_or_default();
                faults.push(format!(
                    "kafka {}: none of {known} brokers reachable (librdkafka retries; last error: {last})",
                    k.brokers
                ));
            }
        }
    }

    /// Alert sinks failing in a row and rules failing to evaluate, with
    /// the `alerts` part of the health answer.
    fn alert_health(&self, faults: &mut Vec<String>) -> Value {
        let Some(m) = &self.alerts else {
            return Value::Null;
        };
        let sinks = m.sink_health();
        for h in sinks.iter().filter(|h| h.consecutive_failures > 0) {
            faults.push(format!(
                "alert sink {}: {} failed deliveries in a row (retrying; notifications wait in the outbox): {}",
                h.name,
                h.consecutive_failures,
                h.last_error.as_deref().unwrap_or("")
            ));
        }
        let rules = m.rule_health();
        for h in rules
            .iter()
            .filter(|h| h.consecutive_failures >= RuleHealth::FAULT_AFTER)
        {
            faults.push(format!(
                "alert rule {}: {} evaluations failed in a row (it fires nothing meanwhile): {}",
                h.name,
                h.consecutive_failures,
                h.last_error.as_deref().unwrap_or("")
            ));
        }
        json!({
            "outbox_pending": m.outbox().pending().ok(),
            "sinks": sinks,
            "rules": rules,
        })
    }
}

#[async_trait::async_trait]
impl Operations for Runtime {
    async fn health(&self) -> RuntimeHealth {
        let mut faults = Vec::new();
        self.kafka_faults(&mut faults);
        let alerts = self.alert_health(&mut faults);
        if let Some(e) = self
            .lake
            .as_ref()
            .and_then(|l| l.lake.status().last_error())
        {
            faults.push(format!("lake {}: {}", e.op, e.message));
        }
        let checkpoint = self.checkpoint.as_ref().map(|c| c.status());
        if let Some(e) = checkpoint.as_ref().and_then(|c| c.error.as_ref()) {
            faults.push(format!("checkpoint: {e} (retried at the next interval)"));
        }
        let kafka: Vec<Value> = self
            .kafka
            .iter()
            .map(|k| {
                json!({
                    "brokers": k.brokers,
                    "group_id": k.group_id,
                    "brokers_up": k.brokers_up().map(|(u, _)| u),
                    "brokers_known": k.brokers_up().map(|(_, n)| n),
                    "last_error": k.last_error().map(|(at, m)| json!({"at_ms": at, "message": m})),
                    "assigned": k.assigned(),
                    "paused": k.paused(),
                    "pending_batches": k.pending_batches(),
                    "lag_messages": k.lag_messages(),
                })
            })
            .collect();
        let mut parts = Map::new();
        parts.insert("kafka".into(), Value::Array(kafka));
        parts.insert("alerts".into(), alerts);
        parts.insert(
            "lake".into(),
            self.lake
                .as_ref()
                .map_or(Value::Null, |l| l.lake.status().to_json(&l.lake.url())),
        );
        parts.insert("checkpoint".into(), json!(checkpoint));
        RuntimeHealth {
            faults,
            pipeline: self.pipeline.name(),
            parts,
        }
    }

    async fn alerts(&self, limit: usize) -> Value {
        let Some(m) = &self.alerts else {
            return json!({"active": [], "active_total": 0, "rules": [], "outbox_pending": 0});
        };
        let rules: Vec<Value> = m
            .rules()
            .iter()
            .map(|r| {
                json!({
                    "name": r.name, "sql": r.sql, "key": r.key,
                    "every_ms": r.every.as_millis() as u64, "for_ms": r.for_.as_millis() as u64,
                    "keep_firing_for_ms": r.keep_firing_for.as_millis() as u64,
                    "renotify_ms": r.renotify.as_millis() as u64,
                    "severity": r.severity.as_str(), "sinks": r.sinks,
                    "group_by": r.group_by, "group_wait_ms": r.group_wait.as_millis() as u64,
                    "group_interval_ms": r.group_interval.as_millis() as u64,
                    "max_notifications_per_evaluation": r.max_notifications,
                })
            })
            .collect();
        let (active, pending, firing) = m.active_page(limit).await;
        json!({
            "active": active,
            "active_total": pending + firing,
            "active_pending": pending,
            "active_firing": firing,
            "rules": rules,
            "outbox_pending": m.outbox().pending().unwrap_or(0),
        })
    }

    async fn take_snapshot(&self) -> Result<Value, OpError> {
        let manifest = self
            .lake()?
            .snapshotter
            .take(ON_DEMAND_TIMEOUT)
            .await
            .map_err(|e| OpError::Failed {
                code: "snapshot_failed",
                message: e.to_string(),
            })?;
        Ok(json!(manifest))
    }

    async fn list_snapshots(&self) -> Result<Value, OpError> {
        let manifests =
            self.lake()?
                .snapshotter
                .manifests()
                .await
                .map_err(|e| OpError::Failed {
                    code: "lake_unavailable",
                    message: e.to_string(),
                })?;
        Ok(json!({ "snapshots": manifests }))
    }

    async fn run_report(&self, name: &str) -> Result<Value, OpError> {
        let lake = self.lake()?;
        if !lake.reporter.names().iter().any(|n| n == name) {
            return Err(OpError::UnknownReport(name.to_string()));
        }
        let outcome = lake
            .reporter
            .run_one(name, ON_DEMAND_TIMEOUT)
            .await
            .map_err(|e| OpError::Failed {
                code: "report_failed",
                message: e.to_string(),
            })?;
        Ok(json!(outcome))
    }

    fn render_metrics(&self) -> Option<String> {
        self.metrics.as_ref().map(|h| h.render())
    }
}
