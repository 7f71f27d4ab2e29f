//! [`EngineHandle`]: the front door of the read side. A cloneable handle
//! on the engine (behind a lock, which micro-batch applies and DDL take) and
//! its serving context: client scripts ([`EngineHandle::query_with`]),
//! planned reads ([`EngineHandle::run_read_only`], pgwire's path), alert
//! rules ([`EngineHandle::query_at`]), lake snapshots
//! ([`EngineHandle::query_consistent`]) and refreshed views.

use std::sync::Arc;

use datafusion::{logical_expr::LogicalPlan, prelude::SessionContext};
use storepulse_sql::{parse_script, Statement};
use tokio::sync::Mutex;

use super::{
    execute, plan_statement, refuse_df_writes, verify_read_only, Ddl, QueryLimits, QueryOutput,
    Reads,
};
use crate::{
    engine::{is_view_ddl, now_ms, Engine},
    error::{user_err, Result},
    refresh::RefreshedView,
    snapshot::{PinnedSnapshot, SnapshotCell},
    sqlrt::{on_sql_thread_if, INLINE_SQL_BYTES},
};

/// A cloneable handle: the engine behind a lock plus its serving context.
#[derive(Clone)]
pub struct EngineHandle {
    engine: Arc<Mutex<Engine>>,
    serving: SessionContext,
    /// The latest published snapshot, for queries that read no live state.
    cell: SnapshotCell,
    changed: Arc<tokio::sync::watch::Sender<u64>>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").finish_non_exhaustive()
    }
}

impl EngineHandle {
    /// Wraps an engine.
    pub fn new(engine: Engine) -> Self {
        let serving = engine.serving.clone();
        let cell = engine.cell.clone();
        let (changed, _) = tokio::sync::watch::channel(engine.epoch());
        Self {
            engine: Arc::new(Mutex::new(engine)),
            serving,
            cell,
            changed: Arc::new(changed),
        }
    }

    /// Announces that applied batches changed the views (the pipeline calls
    /// this after applying; alert rules re-evaluate on it).
    pub fn notify_changed(&self, epoch: u64) {
        self.changed.send_replace(epoch);
    }

    /// Subscribes to [`EngineHandle::notify_changed`].
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Runs one read-only query and returns its rows with the event time
    /// the snapshot it read is "as of" (`engine_clock.as_of`).
    pub async fn query_at(&self, sql: &str) -> Result<(QueryOutput, Option<i64>)> {
        let plan = self.plan_one_query(sql).await?;
        let reads = Reads::of(&plan);
        let snap = self.engine.lock().await.snapshot_for(&reads.views)?;
        let as_of = snap.as_of;
        let out = execute(&self.serving, plan, snap, &QueryLimits::default()).await?;
        Ok((out, as_of))
    }

    /// Runs several read-only queries on one snapshot (one engine epoch), so
    /// their answers are mutually consistent; returns the rows, the
    /// snapshot's `as_of` and its epoch. Used for lake snapshots.
    pub async fn query_consistent(
        &self,
        sqls: &[String],
    ) -> Result<(Vec<QueryOutput>, Option<i64>, u64)> {
        let mut plans = Vec::with_capacity(sqls.len());
        let mut reads = Reads::default();
        for sql in sqls {
            let plan = self.plan_one_query(sql).await?;
            reads.add(&plan);
            plans.push(plan);
        }
        let snap = self.engine.lock().await.snapshot_for(&reads.views)?;
        let (as_of, epoch) = (snap.as_of, snap.epoch);
        let mut out = Vec::with_capacity(plans.len());
        for plan in plans {
            out.push(execute(&self.serving, plan, snap.clone(), &QueryLimits::default()).await?);
        }
        Ok((out, as_of, epoch))
    }

    /// Plans `sql`, which must be exactly one query (not DDL), on a SQL
    /// thread.
    async fn plan_one_query(&self, sql: &str) -> Result<LogicalPlan> {
        let mut stmts = parse_script(sql)?;
        let (1, Some(Statement::DataFusion { statement, .. })) = (stmts.len(), stmts.pop()) else {
            return user_err(format!("expected one query: {sql}"));
        };
        if is_view_ddl(&statement) {
            return user_err(format!("expected a query, not DDL: {sql}"));
        }
        plan_statement(self.serving.state(), *statement, sql.len()).await
    }

    /// The serving context (catalog of views, dimensions, lake tables).
    pub fn serving_context(&self) -> &SessionContext {
        &self.serving
    }

    /// Locks the engine (for applying batches or DDL).
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, Engine> {
        self.engine.lock().await
    }

    /// Runs a SQL script with view DDL allowed and the default structural
    /// limits only (the operator's path: tests, tools). See
    /// [`EngineHandle::query_with`].
    pub async fn query(&self, sql: &str) -> Result<Vec<QueryOutput>> {
        self.query_with(sql, &QueryLimits::default(), Ddl::Allowed)
            .await
    }

    /// Runs a client's SQL script within `limits` (one deadline for the
    /// whole script): parsed and checked on a SQL thread
    /// ([`storepulse_sql::parse_script_with`]: size, statements, expression
    /// depth) before anything runs. Read-only statements run on a pinned
    /// snapshot without holding the engine lock; storepulse's view DDL
    /// (`CREATE [MATERIALIZED] VIEW`, `DROP VIEW`) goes through the engine
    /// when `ddl` allows it, and is refused with [`EngineError::ReadOnly`]
    /// otherwise (analysts' connections, requests a browser could forge). `CREATE ALERT` is refused: rules
    /// are configured at start, where their sinks are built and checked.
    pub async fn query_with(
        &self,
        sql: &str,
        limits: &QueryLimits,
        ddl: Ddl,
    ) -> Result<Vec<QueryOutput>> {
        let limits = limits.start();
        limits.within(self.script(sql, &limits, ddl)).await
    }

    async fn script(&self, sql: &str, limits: &QueryLimits, ddl: Ddl) -> Result<Vec<QueryOutput>> {
        limits.sql.check_size(sql)?;
        let (text, sql_limits) = (sql.to_owned(), limits.sql);
        let offload = sql.len() >= INLINE_SQL_BYTES;
        let stmts = on_sql_thread_if(offload, async move {
            storepulse_sql::parse_script_with(&text, &sql_limits)
        })
        .await??;
        let mut out = Vec::new();
        for stmt in stmts {
            // Work that never waits (short statements planned in place, a
            // CPU-bound stream) gives the timeout no chance to fire: the
            // deadline is also checked between statements and batches.
            limits.check_deadline()?;
            match stmt {
                Statement::DataFusion { statement, sql } if !is_view_ddl(&statement) => {
                    refuse_df_writes(&statement)?;
                    let plan = plan_statement(self.serving.state(), *statement, sql.len()).await?;
                    out.push(self.run_read_only(plan, limits).await?);
                }
                Statement::CreateAlert(a) => {
                    return user_err(format!(
                        "CREATE ALERT {} is not accepted at run time: alert rules are configured at start \
                         (a SQL file in [sql] files, or [[alerts.rules]]), where their sinks are built and \
                         checked; add it there and restart",
                        a.name
                    ));
                }
                other => {
                    if let Ddl::Refused(why) = ddl {
                        let kind = match other {
                            Statement::CreateMaterializedView { .. } => "CREATE MATERIALIZED VIEW",
                            _ => "CREATE VIEW / DROP VIEW",
                        };
                        return Err(crate::EngineError::ReadOnly(format!(
                            "{kind} is not allowed: {why}"
                        )));
                    }
                    // Accepted at run time: recorded in the run-time
                    // catalog, so the view comes back at the next start.
                    let text = match &other {
                        Statement::CreateMaterializedView { sql, .. }
                        | Statement::DataFusion { sql, .. } => Some(sql.clone()),
                        Statement::CreateAlert(_) => None,
                    };
                    let mut engine = self.engine.lock().await;
                    let result = engine.execute_statement(other).await?;
                    if let (Some(dir), Some(text)) = (engine.config().data_dir.as_deref(), text) {
                        crate::catalog::append(dir, &text)?;
                    }
                    out.push(result)
                }
            }
        }
        Ok(out)
    }

    /// Runs one planned read-only query (pgwire plans with its own parser)
    /// on a snapshot pinned for it: only the materialized views the plan
    /// reads are evaluated. Refuses anything but reads
    /// ([`verify_read_only`]) and enforces `limits` (the deadline too, if
    /// [`QueryLimits::start`] set one for the whole request).
    pub async fn run_read_only(
        &self,
        plan: LogicalPlan,
        limits: &QueryLimits,
    ) -> Result<QueryOutput> {
        verify_read_only(&plan)?;
        let limits = limits.start();
        let reads = Reads::of(&plan);
        // A query that reads no materialized view and no live engine state
        // does not wait for the engine lock, which micro-batch applies hold.
        let snap = if reads.is_static() {
            self.cell.load()
        } else {
            limits
                .within(async { self.engine.lock().await.snapshot_for(&reads.views) })
                .await?
        };
        execute(&self.serving, plan, snap, &limits).await
    }

    /// Recomputes the refreshed views that are due (see
    /// [`RefreshedView::is_due`]); the binary calls this every second.
    /// Returns the views recomputed.
    pub async fn refresh_due(&self) -> Result<Vec<String>> {
        self.refresh_where(RefreshedView::is_due).await
    }

    /// Recomputes every refreshed view now, e.g. when a bounded run has
    /// applied its last batch (so that what they serve then is final).
    /// Returns the views recomputed.
    pub async fn refresh_all(&self) -> Result<Vec<String>> {
        self.refresh_where(|_| true).await
    }

    async fn refresh_where(&self, pick: impl Fn(&RefreshedView) -> bool) -> Result<Vec<String>> {
        let due: Vec<Arc<RefreshedView>> = {
            let e = self.engine.lock().await;
            for r in &e.refreshed {
                if let Some(age) = r.age() {
                    metrics::gauge!(crate::metric_names::ENGINE_VIEW_REFRESH_AGE_SECONDS, "view" => r.name().to_string())
                        .set(age.as_secs_f64());
                }
            }
            e.refreshed.iter().filter(|r| pick(r)).cloned().collect()
        };
        let mut done = Vec::new();
        for r in due {
            let snap = self
                .engine
                .lock()
                .await
                .snapshot_for(&Reads::of(r.plan()).views)?;
            let mut state = self.serving.state();
            state
                .config_mut()
                .set_extension(Arc::new(PinnedSnapshot(Some(snap))));
            r.compute(&state, true).await?;
            done.push(r.name().to_string());
        }
        Ok(done)
    }

    /// The wall clock used for watermark idleness.
    pub fn now_ms() -> i64 {
        now_ms()
    }
}
