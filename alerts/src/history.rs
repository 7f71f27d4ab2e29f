//! `alert_history`: one row per notification the rules produced (what the
//! sinks were given), from the outbox's bounded history.
//!
//! `alert_history(alert_id, rule, alert_key, state, severity, first_seen,
//! last_seen, notified_at, payload)`; times are event time, `payload` is
//! the notification as delivered (JSON).

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::{
    arrow::{
        array::{RecordBatch, StringBuilder, TimestampMillisecondBuilder},
        datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit},
    },
    catalog::{Session, TableProvider},
    common::{DataFusionError, Result},
    datasource::{memory::MemorySourceConfig, TableType},
    logical_expr::Expr,
    physical_plan::ExecutionPlan,
};

use crate::outbox::Outbox;

/// The `alert_history` table.
#[derive(Debug)]
pub struct HistoryTable {
    /// Where the history is kept.
    pub outbox: Outbox,
}

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

impl HistoryTable {
    /// The table's schema.
    pub fn table_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("alert_id", DataType::Utf8, false),
            Field::new("rule", DataType::Utf8, false),
            Field::new("alert_key", DataType::Utf8, false),
            Field::new("state", DataType::Utf8, false),
            Field::new("severity", DataType::Utf8, false),
            Field::new("first_seen", ts(), false),
            Field::new("last_seen", ts(), false),
            Field::new("notified_at", ts(), false),
            Field::new("payload", DataType::Utf8, false),
        ]))
    }

    fn batch(&self) -> Result<RecordBatch> {
        let rows = self
            .outbox
            .history()
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let mut s: Vec<StringBuilder> = (0..5).map(|_| StringBuilder::new()).collect();
        let mut t: Vec<TimestampMillisecondBuilder> = (0..3)
            .map(|_| TimestampMillisecondBuilder::new().with_timezone("UTC"))
            .collect();
        let mut payload = StringBuilder::new();
        for n in &rows {
            s[0].append_value(&n.alert_id);
            s[1].append_value(&n.rule);
            s[2].append_value(&n.alert_key);
            s[3].append_value(format!("{:?}", n.state).to_lowercase());
            s[4].append_value(&n.severity);
            t[0].append_value(n.first_seen);
            t[1].append_value(n.last_seen);
            t[2].append_value(n.notified_at);
            payload.append_value(serde_json::to_string(n).unwrap_or_default());
        }
        let mut cols: Vec<datafusion::arrow::array::ArrayRef> =
            s.iter_mut().map(|b| Arc::new(b.finish()) as _).collect();
        cols.extend(t.iter_mut().map(|b| Arc::new(b.finish()) as _));
        cols.push(Arc::new(payload.finish()));
        Ok(RecordBatch::try_new(Self::table_schema(), cols)?)
    }
}

#[async_trait]
impl TableProvider for HistoryTable {
    fn schema(&self) -> SchemaRef {
        Self::table_schema()
    }
    fn table_type(&self) -> TableType {
        TableType::Base
    }
    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let exec = MemorySourceConfig::try_new_exec(
            &[vec![self.batch()?]],
            Self::table_schema(),
            projection.cloned(),
        )?;
        Ok(exec)
    }
}
