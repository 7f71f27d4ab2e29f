//! The read side: what a client may run, the limits every analyst query
//! runs under, and how a read executes. The engine (`engine.rs`) keeps
//! applying batches, DDL and checkpoints.
//!
//! * [`EngineHandle`] (`handle.rs`): the front door for reads.
//! * [`Reads`] (`reads.rs`): the views and live state a plan reads.
//! * [`QueryLimits`]: one deadline per request (parse, plan, execution and
//!   encoding), rows, result bytes, and the structural SQL limits
//!   ([`SqlLimits`]: text size, statements, expression depth).
//! * `policy.rs`: the read-only rule of analysts' connections, one place
//!   for both protocols: by statement kind before planning
//!   ([`refuse_writes`], naming the statement) and by plan after
//!   ([`verify_read_only`]).
//! * [`execute`]: a planned read on a pinned snapshot; its physical plan is
//!   built on the SQL threads ([`crate::sqlrt`]); collected batches are
//!   reserved in the serving memory pool and held by the [`QueryOutput`]
//!   until it is dropped (after encoding).

use std::{future::Future, sync::Arc};

use datafusion::{
    arrow::{array::RecordBatch, datatypes::SchemaRef},
    execution::{
        context::SessionState,
        memory_pool::{MemoryConsumer, MemoryReservation},
    },
    logical_expr::LogicalPlan,
    physical_plan::execute_stream,
    prelude::SessionContext,
    sql::parser::Statement as DFStatement,
};
use storepulse_sql::SqlLimits;
use tokio::time::Instant;

use crate::{
    snapshot::PinnedSnapshot,
    sqlrt::{on_sql_thread_if, INLINE_PLAN_EXPRS, INLINE_SQL_BYTES},
    EngineError, Result, Snapshot,
};

mod handle;
mod policy;
mod reads;

pub use handle::EngineHandle;
pub(crate) use policy::refuse_df_writes;
pub use policy::{refuse_writes, verify_read_only, write_kind};
pub use reads::Reads;

/// Limits on one request of the serving side (`[serving]`); each is
/// answered with a typed error ([`EngineError::Timeout`],
/// [`EngineError::TooManyRows`], [`EngineError::ResultTooLarge`],
/// [`storepulse_sql::SqlError`]'s limits); the memory limit is the serving
/// context's memory pool ([`crate::EngineConfig::query_memory_limit`]),
/// which also holds every collected result until it is encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryLimits {
    /// The whole request (parsing, planning, execution, collecting and
    /// encoding the rows, every statement of a script) is cancelled after
    /// this long.
    pub timeout: Option<std::time::Duration>,
    /// Refuse results with more rows than this (execution stops as soon
    /// as the limit is passed).
    pub max_rows: Option<usize>,
    /// Refuse results larger than this many bytes (Arrow bytes while
    /// collecting; interfaces also check the encoded size).
    pub max_result_bytes: Option<usize>,
    /// Text size, statements per request, expression depth.
    pub sql: SqlLimits,
    /// When the request must be done: set once at its start
    /// ([`QueryLimits::start`]) so every step shares it.
    pub deadline: Option<Instant>,
}

impl QueryLimits {
    /// These limits with the request's deadline set from now (kept if
    /// already set: a request's steps share one deadline).
    pub fn start(mut self) -> Self {
        if self.deadline.is_none() {
            self.deadline = self.timeout.map(|t| Instant::now() + t);
        }
        self
    }

    /// Runs `fut` until the deadline; past it, [`EngineError::Timeout`]
    /// (the future is dropped: DataFusion's tasks stop).
    pub async fn within<T>(&self, fut: impl Future<Output = Result<T>>) -> Result<T> {
        match (self.start().deadline, self.timeout) {
            (Some(at), Some(t)) => tokio::time::timeout_at(at, fut)
                .await
                .map_err(|_| EngineError::Timeout(t))?,
            _ => fut.await,
        }
    }

    /// [`EngineError::Timeout`] if the deadline has passed (for work that
    /// checks between steps, such as encoding batch by batch).
    pub fn check_deadline(&self) -> Result<()> {
        match (self.deadline, self.timeout) {
            (Some(at), Some(t)) if Instant::now() >= at => Err(EngineError::Timeout(t)),
            _ => Ok(()),
        }
    }

    /// [`EngineError::ResultTooLarge`] if `bytes` of encoded result pass
    /// `max_result_bytes`.
    pub fn check_result_bytes(&self, bytes: usize) -> Result<()> {
        match self.max_result_bytes {
            Some(max) if bytes > max => Err(EngineError::ResultTooLarge(max)),
            _ => Ok(()),
        }
    }
}

/// Whether a request may run storepulse's view DDL (`CREATE [MATERIALIZED]
/// VIEW`, `DROP VIEW`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ddl {
    /// The operator's request.
    Allowed,
    /// Refused with [`EngineError::ReadOnly`]; the text says why and ends
    /// the message "CREATE VIEW ... is not allowed: ".
    Refused(&'static str),
}

/// The result of one SQL statement. A serving query's rows stay reserved
/// in the serving memory pool until the output (and every clone) is
/// dropped.
#[derive(Debug, Clone)]
pub struct QueryOutput {
    /// Result schema.
    pub schema: SchemaRef,
    /// Result rows.
    pub batches: Vec<RecordBatch>,
    /// The rows' reservation in the serving memory pool.
    memory: Option<Arc<MemoryReservation>>,
}

impl QueryOutput {
    /// Rows not counted in any memory pool.
    pub fn new(schema: SchemaRef, batches: Vec<RecordBatch>) -> Self {
        Self {
            schema,
            batches,
            memory: None,
        }
    }

    /// No columns, no rows (DDL).
    pub fn empty() -> Self {
        Self::new(
            Arc::new(datafusion::arrow::datatypes::Schema::empty()),
            Vec::new(),
        )
    }

    /// Schema, rows and the guard of their reservation (keep it until the
    /// rows are encoded and sent).
    pub fn into_parts(self) -> (SchemaRef, Vec<RecordBatch>, ResultMemory) {
        (self.schema, self.batches, ResultMemory(self.memory))
    }
}

/// Holds a result's memory reservation; dropping it gives the memory back.
#[derive(Debug, Default)]
pub struct ResultMemory(Option<Arc<MemoryReservation>>);

impl ResultMemory {
    /// The reservation itself, for whoever keeps the rows longer than the
    /// response (a cursor): `None` when the rows are not counted in a pool.
    /// Handing it over keeps the rows counted once, never twice.
    pub fn into_reservation(self) -> Option<MemoryReservation> {
        self.0.and_then(|m| Arc::try_unwrap(m).ok())
    }
}

/// Bytes of `b`'s rows (slices count only their own range, not the whole
/// buffers they share with the view's state).
pub fn batch_bytes(b: &RecordBatch) -> usize {
    b.columns()
        .iter()
        .map(|c| {
            c.to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size())
        })
        .sum()
}

/// Plans `stmt` (from `sql_bytes` of text) against `state`: on a SQL thread
/// unless the text is short (see [`crate::sqlrt`]).
pub async fn plan_statement(
    state: SessionState,
    stmt: DFStatement,
    sql_bytes: usize,
) -> Result<LogicalPlan> {
    on_sql_thread_if(sql_bytes >= INLINE_SQL_BYTES, async move {
        state.statement_to_plan(stmt).await
    })
    .await?
    .map_err(EngineError::from)
}

/// More than [`INLINE_PLAN_EXPRS`] expression nodes in `plan` (counting
/// stops there).
fn is_large(plan: &LogicalPlan) -> bool {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let mut n = 0usize;
    let _ = plan.apply_with_subqueries(|p| {
        p.apply_expressions(|e| {
            e.apply(|_| {
                n += 1;
                Ok(if n > INLINE_PLAN_EXPRS {
                    TreeNodeRecursion::Stop
                } else {
                    TreeNodeRecursion::Continue
                })
            })
        })
    });
    n > INLINE_PLAN_EXPRS
}

/// Runs a read-only `plan` of the serving context `ctx` on `snap`, within
/// `limits`: the physical plan is built on a SQL thread (for a large plan),
/// rows are collected
/// until the row, byte or memory limit (the serving pool) or the deadline.
pub(crate) async fn execute(
    ctx: &SessionContext,
    plan: LogicalPlan,
    snap: Arc<Snapshot>,
    limits: &QueryLimits,
) -> Result<QueryOutput> {
    verify_read_only(&plan)?;
    let limits = limits.start();
    let mut state = ctx.state();
    state
        .config_mut()
        .set_extension(Arc::new(PinnedSnapshot(Some(snap))));
    let pool = ctx.runtime_env().memory_pool.clone();
    limits
        .within(async move {
            let schema = Arc::new(plan.schema().as_arrow().clone());
            let task = state.task_ctx();
            let physical = on_sql_thread_if(is_large(&plan), async move {
                state.create_physical_plan(&plan).await
            })
            .await??;
            let mut stream = execute_stream(physical, task)?;
            let memory = MemoryConsumer::new("query result").register(&pool);
            let (mut rows, mut bytes, mut batches) = (0usize, 0usize, Vec::new());
            use futures::StreamExt;
            while let Some(b) = stream.next().await {
                let b = b?;
                limits.check_deadline()?;
                rows += b.num_rows();
                if limits.max_rows.is_some_and(|max| rows > max) {
                    return Err(EngineError::TooManyRows(limits.max_rows.unwrap_or(0)));
                }
                let n = batch_bytes(&b);
                bytes += n;
                limits.check_result_bytes(bytes)?;
                memory.try_grow(n)?;
                batches.push(b);
            }
            Ok(QueryOutput {
                schema,
                batches,
                memory: Some(Arc::new(memory)),
            })
        })
        .await
}
