//! Continuous (materialized) views: planning and incremental maintenance.
//!
//! A view's logical plan is split at its single `Aggregate`:
//!
//! * **below** (the aggregate's input) must be stateless per row — scans of
//!   exactly one stream, filters, projections, `unnest` (hopping windows)
//!   and joins with dimension tables. It is planned once into a DataFusion
//!   `AggregateExec` in *partial* mode over a re-executable scan of the
//!   stream's [`BatchSlot`](crate::snapshot::BatchSlot), and executed once
//!   per micro-batch;
//! * the partial output is merged into the view's [`GroupState`];
//! * **above** (projection, `HAVING`, `ORDER BY`, joins with dimensions...)
//!   runs at query time: the `Aggregate` node is replaced by a scan of the
//!   evaluated state, and the result is registered as a DataFusion view.
//!
//! Anything that would need unbounded state or re-computation (nested
//! aggregation, window functions over the stream, `DISTINCT`/`ORDER BY`/
//! `LIMIT` below the aggregate, joins of two streams) is refused at creation
//! with a message saying why.
//!
//! Size: ~720 lines: planning a view (one short function per check, see
//! [`plan_view`]), the `hop` rewrite and applying a batch belong together.

use std::{collections::HashMap, sync::Arc};

use datafusion::{
    arrow::{
        array::RecordBatch,
        datatypes::{Field, Schema, SchemaRef},
    },
    common::{
        tree_node::{Transformed, TreeNode, TreeNodeRecursion},
        Column, TableReference,
    },
    datasource::provider_as_source,
    execution::{context::SessionState, TaskContext},
    logical_expr::{
        physical_planning_context::PhysicalPlanningContext, Aggregate, Expr, GroupingSet,
        LogicalPlan, LogicalPlanBuilder,
    },
    optimizer::{simplify_expressions::SimplifyExpressions, Optimizer},
    physical_expr::{aggregate::AggregateFunctionExpr, create_physical_expr},
    physical_plan::{
        aggregates::{AggregateExec, AggregateMode, PhysicalGroupBy},
        coalesce_partitions::CoalescePartitionsExec,
        execution_plan::reset_plan_states,
        ExecutionPlan, ExecutionPlanProperties,
    },
};
use futures::StreamExt;
use storepulse_ingest::StreamKind;

use crate::{
    error::{user_err, EngineError, Result},
    snapshot::{SnapshotCell, ViewStateTable},
    state::{GroupState, HopPanes, SessionSpec},
};

/// One incrementally maintained view.
#[derive(Debug)]
pub struct ContinuousView {
    /// The view's name (its table name in SQL).
    pub name: String,
    /// The defining statement.
    pub sql: String,
    /// The streams it reads (more than one only through `UNION ALL`).
    pub streams: Vec<StreamKind>,
    /// The query-time plan (reads the evaluated state).
    pub query_plan: LogicalPlan,
    /// The view's output schema.
    pub output_schema: SchemaRef,
    partial: Arc<dyn ExecutionPlan>,
    state: GroupState,
    state_schema: SchemaRef,
    version: u64,
    evaluated: Option<(u64, Arc<Vec<RecordBatch>>)>,
    /// Rows applied so far.
    pub rows_applied: u64,
    ttl: Option<StateTtl>,
    /// Its chain of stored checkpoint images.
    chain: crate::checkpoint::ImageChain,
}

/// One view's image for a checkpoint ([`ContinuousView::checkpoint_image`]).
#[derive(Debug)]
pub struct CheckpointImage {
    /// The rows (TTL stamps last, if any).
    pub rows: RecordBatch,
    /// Only the groups changed since the view's previous image.
    pub delta: bool,
    /// The generation it covers.
    pub generation: u32,
    /// The `state_ttl` bookkeeping.
    pub ttl: Option<crate::checkpoint::TtlMeta>,
}

/// Idle-group eviction of one view (`[engine] state_ttl`).
#[derive(Debug)]
struct StateTtl {
    ttl_ms: i64,
    /// Smallest clock step between two marks (a 64th of the TTL): bounds
    /// the marks kept and how late past the TTL a group is evicted.
    step_ms: i64,
    /// (batch number, the view's clock after that batch), oldest first.
    marks: std::collections::VecDeque<(u64, i64)>,
}

fn node_name(p: &LogicalPlan) -> &'static str {
    match p {
        LogicalPlan::Window(_) => "window functions (OVER ...)",
        LogicalPlan::Sort(_) => "ORDER BY",
        LogicalPlan::Limit(_) => "LIMIT",
        LogicalPlan::Distinct(_) => "SELECT DISTINCT",
        LogicalPlan::Union(_) => "UNION",
        LogicalPlan::RecursiveQuery(_) => "recursive queries",
        LogicalPlan::Repartition(_) => "repartitioning",
        _ => "this operator",
    }
}

/// The error of a view that cannot be maintained incrementally.
fn cannot(name: &str, reason: &str) -> EngineError {
    EngineError::User(format!(
        "materialized view '{name}' cannot be maintained incrementally: {reason}"
    ))
}

/// Plans a continuous view from its analyzed logical plan.
///
/// `streams` maps table names to the stream they are; `planning` is the
/// session whose catalog resolves streams (as slot scans) and dimensions.
/// The plan is checked ([`the_aggregate`], [`streams_read`]), its windows
/// recognised ([`hop_panes`], [`session_window`]), the part below the
/// aggregate planned as a partial aggregate ([`partial_aggregate`]) and the
/// part above it re-pointed at the kept state ([`query_plan_over_state`]).
pub async fn plan_view(
    name: &str,
    sql: &str,
    plan: LogicalPlan,
    planning: &SessionState,
    streams: &HashMap<String, StreamKind>,
    cell: SnapshotCell,
) -> Result<ContinuousView> {
    // Constant folding and rewrites (e.g. `coalesce` → `CASE`) that physical
    // planning expects; output names are preserved.
    let plan = Optimizer::with_rules(vec![Arc::new(SimplifyExpressions::new())]).optimize(
        plan,
        planning,
        |_, _| {},
    )?;
    let agg = the_aggregate(name, &plan)?;
    let read = streams_read(name, &plan, &agg, streams)?;
    // Hopping windows: keep panes, not windows (see `state::HopPanes`).
    let (input_plan, hop) = rewrite_hop(agg.input.as_ref().clone())?;
    let hop = hop_panes(name, &agg, hop)?;
    let session = session_window(name, &agg)?;
    if hop.is_some() && session.is_some() {
        return Err(cannot(
            name,
            "a view cannot combine hop() and session() windows",
        ));
    }
    let (partial, aggr_exprs) = partial_aggregate(&agg, &input_plan, planning).await?;
    let mut state = GroupState::try_new(&partial.schema(), agg.group_expr.len(), aggr_exprs)?;
    if let Some(h) = hop {
        state.set_hop(h);
    }
    if let Some(spec) = session {
        state.set_session(spec, &partial.schema())?;
    }
    let (query_plan, state_schema) = query_plan_over_state(name, &plan, &agg, cell)?;
    let output_schema = Arc::new(query_plan.schema().as_arrow().clone());
    Ok(ContinuousView {
        name: name.to_string(),
        sql: sql.to_string(),
        streams: read,
        query_plan,
        output_schema,
        partial,
        state,
        state_schema,
        version: 0,
        evaluated: None,
        rows_applied: 0,
        ttl: None,
        chain: Default::default(),
    })
}

/// The plan's one aggregate (no GROUPING SETS, ROLLUP or CUBE).
fn the_aggregate(name: &str, plan: &LogicalPlan) -> Result<Aggregate> {
    let mut aggregates = Vec::new();
    plan.apply(|p| {
        if let LogicalPlan::Aggregate(a) = p {
            aggregates.push(a.clone());
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let agg =
        match aggregates.as_slice() {
            [] => return Err(cannot(
                name,
                "it has no GROUP BY or aggregate function. A materialized view keeps per-group \
                 aggregate state; add GROUP BY, or use CREATE VIEW over a materialized view",
            )),
            [a] => a.clone(),
            _ => {
                return Err(cannot(
                    name,
                    "it aggregates more than once (a subquery with GROUP BY or DISTINCT inside an \
                 aggregate); only one level of aggregation can be maintained",
                ))
            }
        };
    if agg.group_expr.iter().any(|e| {
        matches!(
            e,
            Expr::GroupingSet(
                GroupingSet::Rollup(_) | GroupingSet::Cube(_) | GroupingSet::GroupingSets(_)
            )
        )
    }) {
        return Err(cannot(
            name,
            "GROUPING SETS, ROLLUP and CUBE are not supported",
        ));
    }
    Ok(agg)
}

/// The streams the view reads, checked: below the aggregate only stateless
/// operators over at least one stream (streams combined with UNION ALL,
/// never joined with each other), above it no stream.
fn streams_read(
    name: &str,
    plan: &LogicalPlan,
    agg: &Aggregate,
    streams: &HashMap<String, StreamKind>,
) -> Result<Vec<StreamKind>> {
    let stream_of = |p: &LogicalPlan| match p {
        LogicalPlan::TableScan(s) => streams.get(s.table_name.table()).copied(),
        _ => None,
    };
    let mut stream_scans = Vec::new();
    let mut bad: Option<&'static str> = None;
    agg.input.apply(|p| {
        if let Some(k) = stream_of(p) {
            stream_scans.push(k);
        }
        match p {
            LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::TableScan(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::Unnest(_)
            | LogicalPlan::Join(_)
            | LogicalPlan::Union(_)
            | LogicalPlan::EmptyRelation(_)
            | LogicalPlan::Values(_) => {}
            other => bad = bad.or(Some(node_name(other))),
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if let Some(op) = bad {
        return Err(cannot(
            name,
            &format!("{op} before the aggregation would need to see all past rows"),
        ));
    }
    if stream_scans.is_empty() {
        let names: Vec<&str> = StreamKind::ALL.iter().map(|k| k.name()).collect();
        return Err(cannot(
            name,
            &format!(
                "it reads no stream; FROM must name one of: {}",
                names.join(", ")
            ),
        ));
    }
    let mut joined = false;
    agg.input.apply(|p| {
        if let LogicalPlan::Join(j) = p {
            let count = |side: &LogicalPlan| {
                let mut n = 0;
                let _ = side.apply(|q| {
                    n += usize::from(stream_of(q).is_some());
                    Ok(TreeNodeRecursion::Continue)
                });
                n
            };
            if count(&j.left) > 0 && count(&j.right) > 0 {
                joined = true;
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if joined {
        return Err(cannot(
            name,
            "it joins two streams (stream-to-stream joins keep unbounded state); \
             combine streams with UNION ALL instead",
        ));
    }
    let mut streams_above = 0;
    plan.apply(|p| {
        if let LogicalPlan::Aggregate(_) = p {
            return Ok(TreeNodeRecursion::Jump);
        }
        if stream_of(p).is_some() {
            streams_above += 1;
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if streams_above > 0 {
        return Err(cannot(
            name,
            "it reads a stream outside the aggregation (e.g. in a subquery after GROUP BY)",
        ));
    }
    stream_scans.sort();
    stream_scans.dedup();
    Ok(stream_scans)
}

/// The pane layout of a hopping view (`hop`: the `(slide, size)` found by
/// [`rewrite_hop`]); the hop's value must be a group column.
fn hop_panes(name: &str, agg: &Aggregate, hop: Option<(i64, i64)>) -> Result<Option<HopPanes>> {
    let Some((slide_ms, size_ms)) = hop else {
        return Ok(None);
    };
    let col = agg.group_expr.iter().position(|e| match e {
        Expr::Column(c) => traces_to_hop(&agg.input, &c.name),
        _ => false,
    });
    match col {
        Some(col) if size_ms % slide_ms == 0 => Ok(Some(HopPanes {
            col,
            slide_ms,
            windows: size_ms / slide_ms,
        })),
        Some(_) => Err(cannot(name, "hop(): size must be a multiple of slide")),
        None => Err(cannot(
            name,
            "hop() must be unnested and its value grouped by: \
             FROM (SELECT *, unnest(hop(ts, slide, size)) AS window_start FROM stream) \
             ... GROUP BY ..., window_start",
        )),
    }
}

/// The session window of `session(ts, gap)` in GROUP BY, if any.
fn session_window(name: &str, agg: &Aggregate) -> Result<Option<SessionSpec>> {
    let mut session = None;
    for (i, e) in agg.group_expr.iter().enumerate() {
        if let Expr::ScalarFunction(f) = e {
            if f.func.name() == "session" {
                let gap = match &f.args[1] {
                    Expr::Literal(v, _) => storepulse_sql::udf::interval_literal_ms(v),
                    _ => None,
                };
                let Some(gap_ms) = gap else {
                    return Err(cannot(
                        name,
                        "session(): the gap must be a constant interval",
                    ));
                };
                if session.is_some() {
                    return Err(cannot(name, "a view can use only one session() window"));
                }
                session = Some(SessionSpec { col: i, gap_ms });
            }
        }
    }
    Ok(session)
}

/// The physical partial aggregate over the stateless input, and its
/// aggregate expressions (the state keeps one accumulator per expression).
async fn partial_aggregate(
    agg: &Aggregate,
    input_plan: &LogicalPlan,
    planning: &SessionState,
) -> Result<(Arc<AggregateExec>, Vec<Arc<AggregateFunctionExpr>>)> {
    let mut physical_input = planning.create_physical_plan(input_plan).await?;
    if physical_input.output_partitioning().partition_count() != 1 {
        physical_input = Arc::new(CoalescePartitionsExec::new(physical_input));
    }
    let props = planning.execution_props();
    let in_schema = agg.input.schema();
    let groups = agg
        .group_expr
        .iter()
        .map(|e| {
            Ok((
                create_physical_expr(e, in_schema, props, &PhysicalPlanningContext::default())?,
                e.schema_name().to_string(),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut aggr_exprs = Vec::new();
    let mut filters = Vec::new();
    for e in &agg.aggr_expr {
        #[allow(deprecated)]
        let (a, f, _) = datafusion::physical_planner::create_aggregate_expr_and_maybe_filter(
            e,
            in_schema,
            &physical_input.schema(),
            props,
        )?;
        aggr_exprs.push(a);
        filters.push(f);
    }
    let partial = Arc::new(AggregateExec::try_new(
        AggregateMode::Partial,
        PhysicalGroupBy::new_single(groups),
        aggr_exprs.clone(),
        filters,
        physical_input.clone(),
        physical_input.schema(),
    )?);
    Ok((partial, aggr_exprs))
}

/// The view's query-time plan: the aggregate replaced by a scan of the
/// evaluated state (an internal table `c0..cN`, re-aliased to the
/// aggregate's qualified names); also the state table's schema.
fn query_plan_over_state(
    name: &str,
    plan: &LogicalPlan,
    agg: &Aggregate,
    cell: SnapshotCell,
) -> Result<(LogicalPlan, SchemaRef)> {
    let state_schema: SchemaRef = Arc::new(Schema::new(
        agg.schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| Field::new(format!("c{i}"), f.data_type().clone(), f.is_nullable()))
            .collect::<Vec<_>>(),
    ));
    let scan_name = format!("__state_{name}");
    let provider = Arc::new(ViewStateTable {
        view: name.to_string(),
        schema: state_schema.clone(),
        cell,
    });
    let aliases: Vec<Expr> = agg
        .schema
        .iter()
        .enumerate()
        .map(|(i, (q, f))| {
            Expr::Column(Column::new(
                Some(TableReference::bare(scan_name.clone())),
                format!("c{i}"),
            ))
            .alias_qualified(q.cloned(), f.name())
        })
        .collect();
    let replacement =
        LogicalPlanBuilder::scan(scan_name.clone(), provider_as_source(provider), None)?
            .project(aliases)?
            .build()?;
    let query_plan = plan
        .clone()
        .transform_up(|p| match p {
            LogicalPlan::Aggregate(_) => Ok(Transformed::yes(replacement.clone())),
            other => Ok(Transformed::no(other)),
        })?
        .data;
    Ok((query_plan, state_schema))
}

/// Replaces every `hop(ts, slide, size)` in projections by
/// `__hop_pane(ts, slide)` (same type, same output name) and returns the
/// constant `(slide, size)` in milliseconds. More than one distinct hop, or
/// a non-constant interval, is refused.
fn rewrite_hop(plan: LogicalPlan) -> Result<(LogicalPlan, Option<(i64, i64)>)> {
    use datafusion::logical_expr::{expr::ScalarFunction, Projection};
    let mut found: Option<(i64, i64)> = None;
    let mut error: Option<String> = None;
    let pane = Arc::new(storepulse_sql::udf::hop_pane());
    let plan = plan
        .transform_up(|p| {
            let LogicalPlan::Projection(proj) = p else {
                return Ok(Transformed::no(p));
            };
            let mut changed = false;
            let mut exprs = Vec::with_capacity(proj.expr.len());
            for e in &proj.expr {
                let (inner, name) = match e {
                    Expr::Alias(a) => (a.expr.as_ref(), Some(a.name.clone())),
                    other => (other, None),
                };
                let Expr::ScalarFunction(f) = inner else {
                    exprs.push(e.clone());
                    continue;
                };
                if f.func.name() != "hop" {
                    exprs.push(e.clone());
                    continue;
                }
                let lit = |i: usize| match &f.args[i] {
                    Expr::Literal(v, _) => storepulse_sql::udf::interval_literal_ms(v),
                    _ => None,
                };
                match (lit(1), lit(2)) {
                    (Some(slide), Some(size)) => {
                        if found.is_some_and(|f| f != (slide, size)) {
                            error = Some("a view can use only one hop() window".into());
                        }
                        found = Some((slide, size));
                    }
                    _ => error = Some("hop(): slide and size must be constant intervals".into()),
                }
                let name = name.unwrap_or_else(|| inner.schema_name().to_string());
                let call = Expr::ScalarFunction(ScalarFunction::new_udf(
                    pane.clone(),
                    vec![f.args[0].clone(), f.args[1].clone()],
                ));
                exprs.push(call.alias(name));
                changed = true;
            }
            if !changed {
                return Ok(Transformed::no(LogicalPlan::Projection(proj)));
            }
            let new = Projection::try_new(exprs, proj.input.clone())?;
            Ok(Transformed::yes(LogicalPlan::Projection(new)))
        })?
        .data;
    if let Some(e) = error {
        return user_err(e);
    }
    Ok((plan, found))
}

/// True if column `name` of `plan`'s output is the unnested value of a
/// `hop(...)` call (following aliases through projections).
fn traces_to_hop(plan: &LogicalPlan, name: &str) -> bool {
    if name.starts_with("__unnest_placeholder(hop(") {
        return true;
    }
    match plan {
        LogicalPlan::Projection(p) => {
            for (e, (_, f)) in p.expr.iter().zip(p.schema.iter()) {
                if f.name() == name {
                    let mut inner = e;
                    while let Expr::Alias(a) = inner {
                        inner = a.expr.as_ref();
                    }
                    return match inner {
                        Expr::Column(c) => traces_to_hop(&p.input, &c.name),
                        _ => false,
                    };
                }
            }
            false
        }
        LogicalPlan::Filter(f) => traces_to_hop(&f.input, name),
        LogicalPlan::SubqueryAlias(s) => traces_to_hop(&s.input, name),
        LogicalPlan::Unnest(u) => traces_to_hop(&u.input, name),
        _ => false,
    }
}

impl ContinuousView {
    /// Evicts groups that received no row while the view's event-time
    /// clock (the largest watermark of its streams) advanced by `ttl`.
    /// Errors for session() window views.
    pub fn set_state_ttl(&mut self, ttl: std::time::Duration) -> std::result::Result<(), String> {
        self.state.enable_ttl().map_err(|e| {
            let reason = match e {
                datafusion::error::DataFusionError::Plan(m) => m,
                e => e.strip_backtrace(),
            };
            format!("engine.state_ttl: view '{}': {reason}", self.name)
        })?;
        let ttl_ms = ttl.as_millis().min(i64::MAX as u128) as i64;
        self.ttl = Some(StateTtl {
            ttl_ms,
            step_ms: (ttl_ms / 64).max(1),
            marks: Default::default(),
        });
        Ok(())
    }

    /// True if the view has a state TTL.
    pub fn has_state_ttl(&self) -> bool {
        self.ttl.is_some()
    }

    /// After a batch: records the view's clock and evicts the groups last
    /// touched before `clock - ttl` (never earlier; at most a 64th of the
    /// TTL later). Returns the number of groups evicted.
    pub fn expire(&mut self, clock: Option<i64>) -> Result<usize> {
        let (Some(ttl), Some(clock)) = (&mut self.ttl, clock) else {
            return Ok(0);
        };
        let batch = self.state.next_batch() - 1;
        if ttl
            .marks
            .back()
            .is_none_or(|(_, t)| clock >= t + ttl.step_ms)
        {
            ttl.marks.push_back((batch, clock));
        }
        let cutoff = clock.saturating_sub(ttl.ttl_ms);
        let mut upto = None;
        while let Some(&(b, t)) = ttl.marks.front() {
            if t >= cutoff {
                break;
            }
            upto = Some(b);
            ttl.marks.pop_front();
        }
        let Some(upto) = upto else {
            return Ok(0);
        };
        let n = self
            .state
            .evict_touched_up_to(upto, &self.partial.schema())?;
        if n > 0 {
            // A delta cannot say "gone": the next image is whole.
            self.chain.reset();
        }
        // A hop view's rows also drop the windows that went idle while
        // their panes stay for a neighbouring live window.
        if n > 0 || self.state.is_hop() {
            self.version += 1;
        }
        Ok(n)
    }

    /// Applies the micro-batch currently in the stream's slot.
    pub async fn apply(&mut self, task_ctx: Arc<TaskContext>, rows: usize) -> Result<()> {
        let plan = reset_plan_states(self.partial.clone())?;
        let mut out = plan.execute(0, task_ctx)?;
        while let Some(batch) = out.next().await {
            self.state.merge(&batch?)?;
        }
        self.version += 1;
        self.rows_applied += rows as u64;
        Ok(())
    }

    /// The view's image for a checkpoint: its partial-aggregate rows (see
    /// [`GroupState::export`]), with the `state_ttl` stamps as the last
    /// column if it has a TTL. The whole state, or, with `incremental` and
    /// when its chain allows, the groups changed since its last stored
    /// image (see [`crate::checkpoint`]).
    pub fn checkpoint_image(&mut self, incremental: bool) -> Result<CheckpointImage> {
        let generation = self.state.begin_checkpoint();
        let groups = match self.chain.delta_since() {
            Some(since) if incremental && self.state.supports_delta() => {
                Some(self.state.changed_since(since)).filter(|g| self.chain.delta_fits(g.len()))
            }
            _ => None,
        };
        let mut rows = self
            .state
            .export_groups(&self.partial.schema(), groups.as_deref())?;
        let ttl = match self.ttl_checkpoint() {
            Some((mut touched, meta)) => {
                if let Some(g) = &groups {
                    touched = g.iter().map(|&g| touched[g]).collect();
                }
                rows = crate::checkpoint::with_ttl_column(rows, touched)?;
                Some(meta)
            }
            None => None,
        };
        let delta = groups.is_some();
        self.chain.taken(generation, delta, rows.num_rows());
        Ok(CheckpointImage {
            rows,
            delta,
            generation,
            ttl,
        })
    }

    /// The store holds the image of `generation` (from
    /// [`Self::checkpoint_image`]): the next delta builds on it.
    pub fn checkpoint_stored(&mut self, generation: u32) {
        self.chain.stored(generation);
    }

    /// The view was just restored from a stored chain (a whole image of
    /// `base_rows` rows and `deltas` deltas of `delta_rows` rows): the next
    /// delta builds on it and holds only what changes from now on.
    pub fn checkpoint_restored(&mut self, base_rows: usize, deltas: u32, delta_rows: usize) {
        let generation = self.state.begin_checkpoint();
        self.chain.adopt(generation, base_rows, deltas, delta_rows);
    }

    /// Forgets the stored images: the next one is whole.
    pub fn checkpoint_reset(&mut self) {
        self.chain.reset();
    }

    /// The schema [`Self::checkpoint_image`] writes (without session columns).
    pub fn partial_schema(&self) -> SchemaRef {
        self.partial.schema()
    }

    /// Loads exported state into this (new, empty) view.
    pub fn import(&mut self, state: &RecordBatch, rows_applied: u64) -> Result<()> {
        self.state.import(state)?;
        self.version += 1;
        self.rows_applied = rows_applied;
        Ok(())
    }

    /// The `state_ttl` bookkeeping for a checkpoint: the per-group stamps
    /// (the [`crate::checkpoint::TTL_TOUCHED_COLUMN`] of the state file)
    /// and the rest. `None` without a TTL.
    pub fn ttl_checkpoint(&self) -> Option<(Vec<u64>, crate::checkpoint::TtlMeta)> {
        let ttl = self.ttl.as_ref()?;
        let (touched, batch_no, hop_floor) = self.state.ttl_export()?;
        Some((
            touched.to_vec(),
            crate::checkpoint::TtlMeta {
                batch_no,
                hop_floor,
                marks: ttl.marks.iter().copied().collect(),
            },
        ))
    }

    /// Restores [`Self::ttl_checkpoint`] after [`Self::import`]: `state`
    /// is the imported batch (its last column the stamps). Without either
    /// (no TTL now, or none when the checkpoint was taken) every group
    /// counts as touched at the restore.
    pub fn restore_ttl(
        &mut self,
        state: &RecordBatch,
        meta: Option<&crate::checkpoint::TtlMeta>,
    ) -> Result<()> {
        use datafusion::arrow::{array::AsArray, datatypes::UInt64Type};
        let (Some(ttl), Some(meta)) = (&mut self.ttl, meta) else {
            return Ok(());
        };
        let schema = state.schema();
        let Some(last) = schema.fields().last() else {
            return Ok(());
        };
        if last.name() != crate::checkpoint::TTL_TOUCHED_COLUMN {
            return Ok(());
        }
        let Some(stamps) = state
            .column(state.num_columns() - 1)
            .as_primitive_opt::<UInt64Type>()
        else {
            return Ok(());
        };
        self.state
            .ttl_import(stamps.values().to_vec(), meta.batch_no, meta.hop_floor)?;
        ttl.marks = meta.marks.iter().copied().collect();
        self.version += 1;
        Ok(())
    }

    /// The last evaluation, current or not.
    pub fn cached(&self) -> Option<Arc<Vec<RecordBatch>>> {
        self.evaluated.as_ref().map(|(_, b)| b.clone())
    }

    /// True if the state changed since the last evaluation.
    pub fn is_dirty(&self) -> bool {
        self.evaluated
            .as_ref()
            .is_none_or(|(v, _)| *v != self.version)
    }

    /// The evaluated aggregate rows (cached until the next batch).
    pub fn evaluate(&mut self) -> Result<Arc<Vec<RecordBatch>>> {
        if let Some((v, b)) = &self.evaluated {
            if *v == self.version {
                return Ok(b.clone());
            }
        }
        let out = Arc::new(self.state.evaluate(&self.state_schema)?);
        self.evaluated = Some((self.version, out.clone()));
        Ok(out)
    }

    /// Leading columns of [`Self::checkpoint_image`]'s rows that are the
    /// group key.
    pub fn key_columns(&self) -> usize {
        self.state.key_columns()
    }

    /// Number of groups held.
    pub fn groups(&self) -> usize {
        self.state.num_groups()
    }

    /// Approximate state size in bytes.
    pub fn state_bytes(&self) -> usize {
        self.state.size()
    }

    /// Bytes of the last evaluated rows (kept for snapshots and queries).
    pub fn output_bytes(&self) -> usize {
        self.evaluated.as_ref().map_or(0, |(_, b)| {
            b.iter().map(|b| b.get_array_memory_size()).sum()
        })
    }
}
