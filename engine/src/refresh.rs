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
//! Point lookups are indexed: the result is kept as one batch, and an
//! equality filter `column = literal` on it (a `WHERE store_id = $1 AND sku
//! = $2` lookup) is answered from a hash index of that column instead of a
//! scan of every cached row. An index is built the first time a column is
//! looked up and then rebuilt with every refresh (off the query path). The
//! index only narrows the rows; DataFusion still applies the filters
//! (pushdown is `Inexact`), so an index can never change an answer.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use datafusion::{
    arrow::{
        array::{RecordBatch, UInt32Array},
        compute::{concat_batches, take_record_batch},
        datatypes::SchemaRef,
    },
    catalog::{Session, TableProvider},
    common::{Result, ScalarValue},
    datasource::TableType,
    logical_expr::{
        utils::split_conjunction, BinaryExpr, Expr, LogicalPlan, Operator,
        TableProviderFilterPushDown,
    },
    physical_plan::{collect, ExecutionPlan},
};

/// Row numbers of `Computed::rows` by the value of one column.
type KeyIndex = HashMap<ScalarValue, Vec<u32>>;

/// One computed result.
#[derive(Debug)]
struct Computed {
    at: Instant,
    /// Every row of the result, in one batch (so that an index addresses
    /// rows by number; scans read slices of it).
    rows: RecordBatch,
    /// Hash indexes by column number, built on first lookup of a column.
    indexes: Mutex<HashMap<usize, Arc<KeyIndex>>>,
}

impl Computed {
    fn new(at: Instant, rows: RecordBatch, hot: &BTreeSet<usize>) -> Result<Self> {
        let mut indexes = HashMap::new();
        for &c in hot {
            indexes.insert(c, Arc::new(build_index(&rows, c)?));
        }
        Ok(Self {
            at,
            rows,
            indexes: Mutex::new(indexes),
        })
    }

    fn index(&self, column: usize) -> Result<Arc<KeyIndex>> {
        if let Some(i) = self.indexes.lock().expect("index lock").get(&column) {
            return Ok(i.clone());
        }
        let built = Arc::new(build_index(&self.rows, column)?);
        self.indexes
            .lock()
            .expect("index lock")
            .insert(column, built.clone());
        Ok(built)
    }
}

fn build_index(rows: &RecordBatch, column: usize) -> Result<KeyIndex> {
    let col = rows.column(column);
    let mut index: KeyIndex = HashMap::new();
    for i in 0..rows.num_rows() {
        if col.is_null(i) {
            // `column = literal` is never true for a null.
            continue;
        }
        index
            .entry(ScalarValue::try_from_array(col, i)?)
            .or_default()
            .push(i as u32);
    }
    Ok(index)
}

/// `column = literal` (either way round) on a column of `schema`: the
/// column's number and the literal cast to the column's type.
fn equality(expr: &Expr, schema: &SchemaRef) -> Option<(usize, ScalarValue)> {
    let Expr::BinaryExpr(BinaryExpr {
        left,
        op: Operator::Eq,
        right,
    }) = expr
    else {
        return None;
    };
    let (col, lit) = match (left.as_ref(), right.as_ref()) {
        (Expr::Column(c), Expr::Literal(v, _)) | (Expr::Literal(v, _), Expr::Column(c)) => (c, v),
        _ => return None,
    };
    let i = schema.index_of(&col.name).ok()?;
    let v = lit.cast_to(schema.field(i).data_type()).ok()?;
    Some((i, v))
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
    cache: RwLock<Option<Arc<Computed>>>,
    /// Columns point lookups have used: indexed at every refresh.
    hot: Mutex<BTreeSet<usize>>,
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
            hot: Mutex::new(BTreeSet::new()),
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
    pub async fn compute(&self, state: &dyn Session, force: bool) -> Result<()> {
        self.computed(state, force).await.map(|_| ())
    }

    async fn computed(&self, state: &dyn Session, force: bool) -> Result<Arc<Computed>> {
        let _one = self.computing.lock().await;
        if !force {
            if let Some(b) = self.cached() {
                return Ok(b);
            }
        }
        let t = Instant::now();
        let physical = state.create_physical_plan(&self.plan).await?;
        let batches = collect(physical, state.task_ctx()).await?;
        let rows = concat_batches(&self.schema, &batches)?;
        drop(batches);
        let hot = self.hot.lock().expect("hot columns lock").clone();
        let computed = Arc::new(Computed::new(t, rows, &hot)?);
        let secs = t.elapsed().as_secs_f64();
        metrics::histogram!(crate::metric_names::ENGINE_VIEW_REFRESH_SECONDS, "view" => self.name.clone())
            .record(secs);
        tracing::debug!(view = %self.name, seconds = secs, "view refreshed");
        *self.cache.write().expect("refresh cache lock") = Some(computed.clone());
        Ok(computed)
    }

    fn cached(&self) -> Option<Arc<Computed>> {
        let cache = self.cache.read().expect("refresh cache lock");
        let c = cache.as_ref()?;
        let age = c.at.elapsed();
        if age >= self.max_age {
            return None;
        }
        if age >= self.interval {
            metrics::counter!(crate::metric_names::ENGINE_VIEW_STALE_READS_TOTAL, "view" => self.name.clone())
                .increment(1);
        }
        Some(c.clone())
    }

    /// The rows an equality filter among `filters` narrows the result to
    /// (the fewest, if several columns are compared); `None` if no filter
    /// is an equality on a column.
    fn lookup(&self, c: &Computed, filters: &[Expr]) -> Result<Option<RecordBatch>> {
        let mut best: Option<Vec<u32>> = None;
        for (column, value) in filters
            .iter()
            .flat_map(split_conjunction)
            .filter_map(|e| equality(e, &self.schema))
        {
            self.hot.lock().expect("hot columns lock").insert(column);
            let rows = if value.is_null() {
                Vec::new()
            } else {
                c.index(column)?.get(&value).cloned().unwrap_or_default()
            };
            if best.as_ref().is_none_or(|b| rows.len() < b.len()) {
                best = Some(rows);
            }
        }
        let Some(rows) = best else {
            return Ok(None);
        };
        metrics::counter!(crate::metric_names::ENGINE_VIEW_INDEX_LOOKUPS_TOTAL, "view" => self.name.clone())
            .increment(1);
        Ok(Some(take_record_batch(&c.rows, &UInt32Array::from(rows))?))
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
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let computed = match self.cached() {
            Some(c) => c,
            None => self.computed(state, false).await?,
        };
        if let Some(rows) = self.lookup(&computed, filters)? {
            return crate::snapshot::memory_exec(&[rows], self.schema.clone(), projection, 1);
        }
        crate::snapshot::memory_exec(
            std::slice::from_ref(&computed.rows),
            self.schema.clone(),
            projection,
            state.config().target_partitions(),
        )
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // The index narrows; DataFusion still applies every filter.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }
}
