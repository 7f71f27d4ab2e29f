//! Refreshable query-time views (`[engine] refresh`).
//!
//! A query-time view (`CREATE VIEW`) is normally planned into every query
//! that reads it and recomputed from the current snapshot. A view named in
//! `[engine] refresh` (name → interval) is instead served from its last
//! computed result. The binary's refresher task recomputes it in the
//! background every `interval` (at ¾ of it), so the result is normally at
//! most `interval` old. When the refresher falls behind (overload: it needs
//! the engine lock that micro-batch applies hold), queries keep reading the
//! last result, stale-while-revalidate, up to `[engine]
//! refresh_max_staleness`; only a result older than that (or none) is
//! recomputed on the query path. So a query never waits for a recompute
//! while the refresher keeps up within the bound. This is ClickHouse's
//! refreshable materialized view: for whole-table reads of expensive views
//! (RFM quintiles over every member, risk over every (store, SKU)) at the
//! price of bounded staleness — the view's `as_of` column tells the instant
//! the rows reflect, `storepulse_engine_view_refresh_age_seconds{view}` how
//! old the result is, `storepulse_engine_view_stale_reads_total{view}` how
//! often a result older than the interval was served.
//!
//! Filters are not pushed into a refreshed view (it is read whole from
//! memory), so a point lookup costs a scan of the cached rows.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use datafusion::{
    arrow::{array::RecordBatch, datatypes::SchemaRef},
    catalog::{Session, TableProvider},
    common::Result,
    datasource::TableType,
    logical_expr::{Expr, LogicalPlan},
    physical_plan::{collect, ExecutionPlan},
};

/// One computed result.
#[derive(Debug)]
struct Computed {
    at: Instant,
    batches: Arc<Vec<RecordBatch>>,
}

/// A query-time view served from a periodically refreshed result.
#[derive(Debug)]
pub struct RefreshedView {
    name: String,
    plan: LogicalPlan,
    schema: SchemaRef,
    interval: Duration,
    /// Older than this, a query recomputes (≥ `interval`).
    max_age: Duration,
    cache: RwLock<Option<Computed>>,
    /// Serialises recomputation (one at a time per view).
    computing: tokio::sync::Mutex<()>,
}

impl RefreshedView {
    /// Wraps a view's logical plan: refreshed every `interval`, served
    /// while younger than `max_staleness` (at least `interval`).
    pub fn new(
        name: String,
        plan: LogicalPlan,
        interval: Duration,
        max_staleness: Duration,
    ) -> Self {
        let schema = Arc::new(plan.schema().as_arrow().clone());
        Self {
            name,
            plan,
            schema,
            interval,
            max_age: max_staleness.max(interval),
            cache: RwLock::new(None),
            computing: tokio::sync::Mutex::new(()),
        }
    }

    /// The view's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The view's defining plan.
    pub fn plan(&self) -> &LogicalPlan {
        &self.plan
    }

    /// Age of the cached result (`None`: never computed).
    pub fn age(&self) -> Option<Duration> {
        self.cache
            .read()
            .expect("refresh cache lock")
            .as_ref()
            .map(|c| c.at.elapsed())
    }

    /// True if a query must recompute before reading (no result, or one
    /// older than the staleness bound).
    pub fn is_stale(&self) -> bool {
        self.age().is_none_or(|a| a >= self.max_age)
    }

    /// True if the background refresher should recompute now (at 3/4 of
    /// the interval, so that queries do not find it stale).
    pub fn is_due(&self) -> bool {
        self.age().is_none_or(|a| a >= self.interval * 3 / 4)
    }

    /// Recomputes the result with `state` (whose pinned snapshot it reads).
    /// Unless `force`, a result computed meanwhile by another query is
    /// returned instead.
    pub async fn compute(&self, state: &dyn Session, force: bool) -> Result<Arc<Vec<RecordBatch>>> {
        let _one = self.computing.lock().await;
        if !force {
            if let Some(b) = self.cached() {
                return Ok(b);
            }
        }
        let t = Instant::now();
        let physical = state.create_physical_plan(&self.plan).await?;
        let batches = Arc::new(collect(physical, state.task_ctx()).await?);
        let secs = t.elapsed().as_secs_f64();
        metrics::histogram!("storepulse_engine_view_refresh_seconds", "view" => self.name.clone())
            .record(secs);
        tracing::debug!(view = %self.name, seconds = secs, "view refreshed");
        *self.cache.write().expect("refresh cache lock") = Some(Computed {
            at: t,
            batches: batches.clone(),
        });
        Ok(batches)
    }

    fn cached(&self) -> Option<Arc<Vec<RecordBatch>>> {
        let cache = self.cache.read().expect("refresh cache lock");
        let c = cache.as_ref()?;
        let age = c.at.elapsed();
        if age >= self.max_age {
            return None;
        }
        if age >= self.interval {
            metrics::counter!("storepulse_engine_view_stale_reads_total", "view" => self.name.clone())
                .increment(1);
        }
        Some(c.batches.clone())
    }
}

#[async_trait]
impl TableProvider for RefreshedView {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn table_type(&self) -> TableType {
        TableType::View
    }
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let batches = match self.cached() {
            Some(b) => b,
            None => self.compute(state, false).await?,
        };
        crate::snapshot::memory_exec(
            &batches,
            self.schema.clone(),
            projection,
            state.config().target_partitions(),
        )
    }
}
