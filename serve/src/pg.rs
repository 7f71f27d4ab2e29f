//! The Postgres wire protocol listener.
//!
//! Built from `datafusion-postgres`' pieces: its SQL parser (with the
//! rewrites Postgres clients need), `pg_catalog` and the `SET`/`SHOW` and
//! transaction hooks. Every other statement goes to [`ServeHook`], which
//! plans it against the serving context and runs it through
//! [`EngineHandle::run_read_only`]: one pinned snapshot per query (the same
//! answers as the HTTP API), read-only (DDL, DML, `COPY` and external tables
//! get SQLSTATE 42501), bounded by the [`QueryLimits`].
//!
//! The simple protocol (psql, Grafana) and the extended protocol (prepared
//! statements with parameters; text and binary results) both end in the
//! hook; for the extended one the portal's result format is carried to the
//! hook in a task-local, because `QueryHook` does not receive the portal.
//!
//! Cursors (`DECLARE ... CURSOR FOR`, `FETCH`, `CLOSE`; what psql's
//! `FETCH_COUNT`, psycopg's named cursors and drivers with a fetch size
//! use), over both protocols: [`ServeHook`] runs the cursor's query at
//! `DECLARE` like any other query (one snapshot, read-only, within the
//! limits: the row limit bounds what a cursor holds) and keeps its Arrow
//! rows per connection ([`Cursors`]); `FETCH` encodes the next rows in the
//! result format asked for (an extended-protocol `FETCH` is described with
//! the cursor's columns). Forward only; a connection's cursors go when it
//! closes, at `CLOSE`, and after [`CURSOR_IDLE`] unused.
//!
//! Hostile input (docs/serving.md, "Limits and isolation"):
//! * Every request's text is checked on a SQL thread (size, statements,
//!   expression depth; [`storepulse_engine::SqlLimits`]) before
//!   `datafusion-postgres` parses it ([`Simple`], [`CheckedParser`]), and
//!   reads are planned on the SQL threads, so no statement can overflow a
//!   connection task's stack. One deadline covers the whole request
//!   (the [`REQUEST`] task-local), including encoding the rows.
//! * `SET` is answered per connection ([`SessionHook`]): the client
//!   settings drivers send are kept in the connection's metadata; anything
//!   that would change the shared serving context (limits, spilling, paths,
//!   catalogs: every `datafusion.*` key) is refused with 42501.
//! * A socket must finish TLS and authentication within `startup_timeout`;
//!   sockets still logging in have their own cap (`max_startup_connections`)
//!   and take a session slot (`max_connections`) only while their final
//!   authentication message is processed, so silent sockets cannot lock real
//!   clients out. Both caps answer 53300.

use std::{
    collections::{HashMap, VecDeque},
    fmt::Debug,
    net::SocketAddr,
    sync::Arc,
    time::Instant,
};

use async_trait::async_trait;
use datafusion::{
    arrow::{array::RecordBatch, datatypes::SchemaRef},
    common::{DFSchema, ParamValues},
    execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation},
    logical_expr::{EmptyRelation, LogicalPlan},
    prelude::SessionContext,
    sql::{
        parser::Statement as DFStatement,
        sqlparser::ast::{CloseCursor, Declare, DeclareType, FetchDirection, Statement, Value},
    },
};
use datafusion_postgres::{
    arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch},
    datafusion_pg_catalog::{pg_catalog::context::EmptyContextProvider, setup_pg_catalog},
    hooks::{set_show::SetShowHook, transactions::TransactionStatementHook, HookClient},
    pgwire::{
        api::{
            auth::{
                noop::NoopStartupHandler,
                sasl::{
                    scram::{gen_salted_password, ScramAuth},
                    SASLAuthStartupHandler,
                },
                AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
            },
            cancel::DefaultCancelHandler,
            portal::{Format, Portal},
            query::{ExtendedQueryHandler, SimpleQueryHandler},
            results::FieldInfo,
            results::{QueryResponse, Response, Tag},
            stmt::QueryParser,
            store::PortalStore,
            ClientInfo, ClientPortalStore, ConnectionManager, ErrorHandler, PgWireConnectionState,
            PgWireServerHandlers, Type,
        },
        error::{ErrorInfo, PgWireError, PgWireResult},
        messages::{
            data::DataRow, startup::ParameterStatus, PgWireBackendMessage, PgWireFrontendMessage,
        },
        types::format::FormatOptions,
    },
    DfSessionService, Parser, QueryHook,
};
use futures::Sink;
use storepulse_engine::{
    query::plan_statement,
    refuse_writes,
    sqlrt::{on_sql_thread_if, INLINE_SQL_BYTES},
    EngineError, EngineHandle, QueryLimits, ResultMemory,
};
use tokio::{
    io::AsyncWriteExt,
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};

use crate::{config::check_exposure, PgConfig, ServeError};

tokio::task_local! {
    /// The result format of the extended-protocol portal being executed.
    static RESULT_FORMAT: Format;
    /// The limits of the request being served, with its deadline (one per
    /// simple-protocol message or extended-protocol execution).
    static REQUEST: QueryLimits;
    /// The length of the request's SQL text (short text is planned in place).
    static REQUEST_BYTES: usize;
}

/// SQLSTATE and message for an engine error.
fn pg_error(e: &EngineError) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        e.kind().sqlstate().into(),
        e.to_string(),
    )))
}

/// Runs every statement the session hooks do not answer.
struct ServeHook {
    engine: EngineHandle,
    limits: QueryLimits,
    cursors: Arc<Cursors>,
}

/// Open cursors at most per connection.
const CURSORS_PER_CONNECTION: usize = 16;
/// A cursor unused this long is dropped (a client that neither closes it
/// nor disconnects).
const CURSOR_IDLE: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// The open cursors of every connection, by (peer address, name).
#[derive(Default)]
struct Cursors(std::sync::Mutex<HashMap<(SocketAddr, String), Cursor>>);

/// A declared cursor: its columns and the rows not fetched yet.
struct Cursor {
    schema: SchemaRef,
    /// Rows not fetched yet, each batch with the bytes reserved for it.
    rows: VecDeque<(RecordBatch, usize)>,
    /// The rows' memory, reserved in the serving memory pool (`[serving]
    /// memory_limit`, shared with the queries): released as batches are
    /// fetched and when the cursor goes.
    memory: MemoryReservation,
    last_used: Instant,
}

impl Cursor {
    /// A cursor over `batches`, reserving their memory in `pool`; 53200
    /// if the pool cannot hold them.
    fn new(
        name: &str,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
        pool: &Arc<dyn MemoryPool>,
    ) -> PgWireResult<Cursor> {
        let rows: VecDeque<(RecordBatch, usize)> = batches
            .into_iter()
            .map(|b| {
                let bytes = storepulse_engine::batch_bytes(&b);
                (b, bytes)
            })
            .collect();
        let memory = MemoryConsumer::new(format!("pgwire cursor {name}")).register(pool);
        memory
            .try_grow(rows.iter().map(|(_, n)| n).sum())
            .map_err(|e| pg_error(&EngineError::from(e)))?;
        Ok(Cursor {
            schema,
            rows,
            memory,
            last_used: Instant::now(),
        })
    }
}

impl Cursors {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, String), Cursor>> {
        self.0.lock().expect("cursors lock")
    }

    /// Adds (or replaces) `name` of `peer`; drops idle cursors first.
    fn declare(&self, peer: SocketAddr, name: &str, cursor: Cursor) -> PgWireResult<()> {
        let mut all = self.lock();
        all.retain(|_, c| c.last_used.elapsed() < CURSOR_IDLE);
        let key = (peer, name.to_string());
        if !all.contains_key(&key)
            && all.keys().filter(|(p, _)| *p == peer).count() >= CURSORS_PER_CONNECTION
        {
            return Err(sql_error(
                "54000",
                format!("too many open cursors on this connection (at most {CURSORS_PER_CONNECTION}): CLOSE some"),
            ));
        }
        all.insert(key, cursor);
        metrics::gauge!("storepulse_pg_cursors").set(all.len() as f64);
        Ok(())
    }

    /// The columns of `name` of `peer`.
    fn schema(&self, peer: SocketAddr, name: &str) -> PgWireResult<SchemaRef> {
        self.lock()
            .get(&(peer, name.to_string()))
            .map(|c| c.schema.clone())
            .ok_or_else(|| no_cursor(name))
    }

    /// Takes up to `count` (all if `None`) of the next rows of `name`.
    fn fetch(
        &self,
        peer: SocketAddr,
        name: &str,
        count: Option<usize>,
    ) -> PgWireResult<(SchemaRef, Vec<RecordBatch>)> {
        let mut all = self.lock();
        let c = all
            .get_mut(&(peer, name.to_string()))
            .ok_or_else(|| no_cursor(name))?;
        c.last_used = Instant::now();
        let mut left = count.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        while left > 0 {
            let Some((b, bytes)) = c.rows.pop_front() else {
                break;
            };
            if b.num_rows() > left {
                // The rest keeps the whole batch's buffers (and bytes).
                out.push(b.slice(0, left));
                c.rows
                    .push_front((b.slice(left, b.num_rows() - left), bytes));
                break;
            }
            left -= b.num_rows();
            c.memory.shrink(bytes.min(c.memory.size()));
            out.push(b);
        }
        Ok((c.schema.clone(), out))
    }

    /// `CLOSE name` (`None`: `CLOSE ALL`) of `peer`.
    fn close(&self, peer: SocketAddr, name: Option<&str>) -> PgWireResult<()> {
        let mut all = self.lock();
        match name {
            Some(n) => {
                all.remove(&(peer, n.to_string()))
                    .ok_or_else(|| no_cursor(n))?;
            }
            None => all.retain(|(p, _), _| *p != peer),
        }
        metrics::gauge!("storepulse_pg_cursors").set(all.len() as f64);
        Ok(())
    }

    /// Drops the cursors of a connection that ended.
    fn close_connection(&self, peer: SocketAddr) {
        let _ = self.close(peer, None);
    }
}

/// An error with SQLSTATE `code`.
fn sql_error(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message,
    )))
}

/// 34000 invalid_cursor_name, as Postgres answers.
fn no_cursor(name: &str) -> PgWireError {
    sql_error("34000", format!("cursor \"{name}\" does not exist"))
}

/// The rows a `FETCH` asks for (`None`: all); backward and absolute
/// positions are refused (cursors scan forward only).
fn fetch_count(direction: &FetchDirection) -> PgWireResult<Option<usize>> {
    let number = |v: &Value| match v {
        Value::Number(n, _) => n
            .parse::<usize>()
            .map_err(|_| sql_error("22023", format!("FETCH count {n} is not a row count"))),
        other => Err(sql_error(
            "22023",
            format!("FETCH count {other} is not a row count"),
        )),
    };
    match direction {
        FetchDirection::Next | FetchDirection::Forward { limit: None } => Ok(Some(1)),
        FetchDirection::Count { limit } | FetchDirection::Forward { limit: Some(limit) } => {
            number(limit).map(Some)
        }
        FetchDirection::All | FetchDirection::ForwardAll => Ok(None),
        other => Err(not_supported(&format!("FETCH {other}"))),
    }
}

/// Session statements answered with their tag and no effect (clients send
/// them on connect; `SET` is [`SessionHook`]'s).
fn session_noop(stmt: &Statement) -> Option<&'static str> {
    match stmt {
        Statement::Discard { .. } => Some("DISCARD ALL"),
        Statement::Deallocate { .. } => Some("DEALLOCATE"),
        _ => None,
    }
}

/// Statements that are not reads are refused before planning, with the
/// statement's kind in the message (the engine's read-only rule,
/// [`storepulse_engine::refuse_writes`]); reads still pass
/// [`storepulse_engine::verify_read_only`].
fn refused(stmt: &Statement) -> Option<EngineError> {
    if is_cursor_statement(stmt) {
        return None;
    }
    refuse_writes(stmt).err()
}

/// `DECLARE`, `FETCH` or `CLOSE` (cursor statements; see the module docs).
fn is_cursor_statement(stmt: &Statement) -> bool {
    matches!(
        stmt,
        Statement::Declare { .. } | Statement::Fetch { .. } | Statement::Close { .. }
    )
}

/// A plan that returns no rows with `schema`'s columns: how a statement
/// answered at Execute is described at Parse.
fn no_rows(schema: SchemaRef) -> PgWireResult<LogicalPlan> {
    DFSchema::try_from(schema)
        .map(|schema| {
            LogicalPlan::EmptyRelation(EmptyRelation {
                produce_one_row: false,
                schema: Arc::new(schema),
            })
        })
        .map_err(|e| pg_error(&EngineError::from(e)))
}

/// A cursor feature storepulse does not have (SQLSTATE 0A000).
fn not_supported(what: &str) -> PgWireError {
    sql_error(
        "0A000",
        format!("{what} is not supported: storepulse's cursors are read-only, forward-only (DECLARE name [NO SCROLL] CURSOR [WITH[OUT] HOLD] FOR query; FETCH [FORWARD] [n | ALL])"),
    )
}

impl ServeHook {
    /// `DECLARE name CURSOR FOR query`: runs the query now, like any other
    /// (one snapshot, read-only, within the limits: the row limit bounds
    /// what a cursor holds), and parks the rows in the connection's portal
    /// store for `FETCH`.
    async fn declare(
        &self,
        stmts: &[Declare],
        ctx: &SessionContext,
        client: &dyn HookClient,
    ) -> PgWireResult<Response> {
        for d in stmts {
            if d.declare_type != Some(DeclareType::Cursor) {
                return Err(not_supported("DECLARE without CURSOR"));
            }
            if d.binary == Some(true) {
                return Err(not_supported("a BINARY cursor"));
            }
            if d.scroll == Some(true) {
                return Err(not_supported("a SCROLL cursor"));
            }
            let (Some(name), Some(query)) = (d.names.first(), &d.for_query) else {
                return Err(not_supported("DECLARE without a name or a FOR query"));
            };
            let stmt = Statement::Query(query.clone());
            let plan = self.plan(&stmt, ctx).await?;
            let out = self.execute(plan, &self.request_limits(client)).await?;
            let pool = ctx.runtime_env().memory_pool.clone();
            let cursor = Cursor::new(&name.value, out.schema, out.batches, &pool)?;
            self.cursors
                .declare(client.socket_addr(), &name.value, cursor)?;
        }
        Ok(Response::Execution(Tag::new("DECLARE CURSOR")))
    }

    /// `FETCH`: the next rows of a cursor, encoded in `format`.
    fn fetch(
        &self,
        name: &str,
        direction: &FetchDirection,
        format: &Format,
        client: &dyn HookClient,
    ) -> PgWireResult<Response> {
        let count = fetch_count(direction)?;
        let (schema, batches) = self.cursors.fetch(client.socket_addr(), name, count)?;
        let rows = batches.iter().map(|b| b.num_rows()).sum::<usize>();
        let limits = self.request_limits(client);
        let mut response = encode(
            schema,
            batches,
            ResultMemory::default(),
            limits,
            format,
            client,
        )?;
        response.set_command_tag(&format!("FETCH {rows}"));
        Ok(Response::Query(response))
    }

    /// Cursor statements, over either protocol (`format`: the result
    /// format asked for); `None` for any other statement.
    async fn cursor_statement(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        format: &Format,
        client: &dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        Some(match statement {
            Statement::Declare { stmts } => self.declare(stmts, ctx, client).await,
            Statement::Fetch {
                name,
                direction,
                into: None,
                ..
            } => self.fetch(&name.value, direction, format, client),
            Statement::Fetch { .. } => Err(not_supported("FETCH ... INTO")),
            Statement::Close { cursor } => {
                let name = match cursor {
                    CloseCursor::All => None,
                    CloseCursor::Specific { name } => Some(name.value.as_str()),
                };
                self.cursors
                    .close(client.socket_addr(), name)
                    .map(|()| Response::Execution(Tag::new("CLOSE CURSOR")))
            }
            _ => return None,
        })
    }

    /// Plans a read; on a SQL thread unless the request's text is short
    /// (deep expressions recurse there, not on the connection's task).
    async fn plan(&self, stmt: &Statement, ctx: &SessionContext) -> PgWireResult<LogicalPlan> {
        let sql_bytes = REQUEST_BYTES.try_with(|n| *n).unwrap_or(usize::MAX);
        plan_statement(
            ctx.state(),
            DFStatement::Statement(Box::new(stmt.clone())),
            sql_bytes,
        )
        .await
        .map_err(|e| {
            record(Err(&e), Instant::now());
            pg_error(&e)
        })
    }

    async fn run(
        &self,
        plan: LogicalPlan,
        format: &Format,
        client: &(dyn ClientInfo + Send + Sync),
    ) -> PgWireResult<Response> {
        let limits = self.request_limits(client);
        let out = self.execute(plan, &limits).await?;
        let (schema, batches, memory) = out.into_parts();
        Ok(Response::Query(encode(
            schema, batches, memory, limits, format, client,
        )?))
    }

    /// The request's limits and deadline ([`REQUEST`]), lowered by the
    /// client's `SET statement_timeout` (never raised).
    fn request_limits(&self, client: &(dyn ClientInfo + Send + Sync)) -> QueryLimits {
        let mut limits = REQUEST
            .try_with(|l| *l)
            .unwrap_or_else(|_| self.limits.start());
        if let Some(ms) = client
            .metadata()
            .get("statement_timeout_ms")
            .and_then(|s| s.parse::<u64>().ok())
        {
            let t = std::time::Duration::from_millis(ms);
            limits.timeout = Some(limits.timeout.map_or(t, |l| l.min(t)));
            let at = tokio::time::Instant::now() + t;
            limits.deadline = Some(limits.deadline.map_or(at, |d| d.min(at)));
        }
        limits
    }

    /// Runs a read within `limits`.
    async fn execute(
        &self,
        plan: LogicalPlan,
        limits: &QueryLimits,
    ) -> PgWireResult<storepulse_engine::QueryOutput> {
        let started = Instant::now();
        let out = self.engine.run_read_only(plan, limits).await;
        record(out.as_ref().map(|_| ()), started);
        out.map_err(|e| {
            tracing::info!(error = %e, "pgwire query failed");
            pg_error(&e)
        })
    }
}

/// Rows as a query response in `format`, encoded as the client reads them.
/// `memory` (the rows' reservation) is held until the last row is encoded;
/// past the request's deadline the next batch is an error (57014) instead.
fn encode(
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    memory: ResultMemory,
    limits: QueryLimits,
    format: &Format,
    client: &(dyn ClientInfo + Send + Sync),
) -> PgWireResult<QueryResponse> {
    let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
    let fields = Arc::new(arrow_schema_to_pg_fields(&schema, format, Some(options))?);
    let rows = Rows {
        fields: fields.clone(),
        batches: batches.into_iter(),
        current: None,
        limits,
        done: false,
        _memory: memory,
    };
    Ok(QueryResponse::new(fields, futures::stream::iter(rows)))
}

/// The data rows of a response, batch by batch (see [`encode`]).
struct Rows {
    fields: Arc<Vec<datafusion_postgres::pgwire::api::results::FieldInfo>>,
    batches: std::vec::IntoIter<RecordBatch>,
    current: Option<Box<dyn Iterator<Item = PgWireResult<DataRow>> + Send>>,
    limits: QueryLimits,
    done: bool,
    _memory: ResultMemory,
}

impl Iterator for Rows {
    type Item = PgWireResult<DataRow>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            if let Some(row) = self.current.as_mut().and_then(|rows| rows.next()) {
                return Some(row);
            }
            let batch = self.batches.next()?;
            if let Err(e) = self.limits.check_deadline() {
                self.done = true;
                record(Err(&e), Instant::now());
                return Some(Err(pg_error(&e)));
            }
            self.current = Some(Box::new(*encode_recordbatch(self.fields.clone(), batch)));
        }
    }
}

fn record(result: Result<(), &EngineError>, started: Instant) {
    metrics::histogram!("storepulse_query_duration_seconds", "interface" => "pgwire")
        .record(started.elapsed().as_secs_f64());
    if let Err(e) = result {
        metrics::counter!("storepulse_query_errors_total", "interface" => "pgwire", "kind" => e.kind().as_str())
            .increment(1);
    }
}

#[async_trait]
impl QueryHook for ServeHook {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        if let Some(tag) = session_noop(statement) {
            return Some(Ok(Response::Execution(Tag::new(tag))));
        }
        if let Some(r) = self
            .cursor_statement(statement, ctx, &Format::UnifiedText, &*client)
            .await
        {
            return Some(r);
        }
        if let Some(e) = refused(statement) {
            record(Err(&e), Instant::now());
            return Some(Err(pg_error(&e)));
        }
        let plan = match self.plan(statement, ctx).await {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        Some(self.run(plan, &Format::UnifiedText, &*client).await)
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        if session_noop(statement).is_some() {
            return None;
        }
        // Cursor statements are run at Execute; a FETCH is described with
        // its cursor's columns, the others return no rows.
        if is_cursor_statement(statement) {
            let schema = match statement {
                Statement::Fetch { name, .. } => {
                    match self.cursors.schema(client.socket_addr(), &name.value) {
                        Ok(s) => s,
                        Err(e) => return Some(Err(e)),
                    }
                }
                _ => Arc::new(datafusion::arrow::datatypes::Schema::empty()),
            };
            return Some(no_rows(schema));
        }
        // Writes fail at Parse (as Postgres does for a read-only
        // transaction); reads are planned on a SQL thread (parameter types
        // are inferred from the plan).
        if let Some(e) = refused(statement) {
            record(Err(&e), Instant::now());
            return Some(Err(pg_error(&e)));
        }
        Some(self.plan(statement, ctx).await)
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        plan: &LogicalPlan,
        params: &ParamValues,
        ctx: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        if let Some(tag) = session_noop(statement) {
            return Some(Ok(Response::Execution(Tag::new(tag))));
        }
        let format = RESULT_FORMAT
            .try_with(|f| f.clone())
            .unwrap_or(Format::UnifiedText);
        if let Some(r) = self
            .cursor_statement(statement, ctx, &format, &*client)
            .await
        {
            return Some(r);
        }
        if let Some(e) = refused(statement) {
            return Some(Err(pg_error(&e)));
        }
        let plan = match plan.clone().replace_params_with_values(params) {
            Ok(p) => p,
            Err(e) => return Some(Err(pg_error(&EngineError::from(e)))),
        };
        let format = RESULT_FORMAT
            .try_with(|f| f.clone())
            .unwrap_or(Format::UnifiedText);
        Some(self.run(plan, &format, &*client).await)
    }
}

/// Checks a request's text against the SQL limits on a SQL thread (the
/// check parses, and a deep tree is built and dropped there), before
/// `datafusion-postgres` parses it on the connection's task.
async fn check_text(sql: &str, limits: &QueryLimits) -> PgWireResult<()> {
    let refuse = |e: EngineError| {
        record(Err(&e), Instant::now());
        tracing::info!(error = %e, "pgwire request refused");
        pg_error(&e)
    };
    limits.sql.check_size(sql).map_err(|e| refuse(e.into()))?;
    let (text, sql_limits) = (sql.to_owned(), limits.sql);
    on_sql_thread_if(sql.len() >= INLINE_SQL_BYTES, async move {
        sql_limits.check_postgres_text(&text)
    })
    .await
    .map_err(refuse)?
    .map_err(|e| refuse(e.into()))
}

/// Runs `fut` (one request) with [`REQUEST`] set and within its deadline.
async fn within_request<T>(
    limits: QueryLimits,
    fut: impl std::future::Future<Output = PgWireResult<T>>,
) -> PgWireResult<T> {
    match limits
        .within(async { Ok(REQUEST.scope(limits, fut).await) })
        .await
    {
        Ok(r) => r,
        Err(e) => {
            record(Err(&e), Instant::now());
            Err(pg_error(&e))
        }
    }
}

/// The simple-query handler: `datafusion-postgres`' own, after the text
/// passed the SQL limits, under one deadline for the whole message.
struct Simple {
    inner: Arc<DfSessionService>,
    limits: QueryLimits,
}

#[async_trait]
impl SimpleQueryHandler for Simple {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let limits = self.limits.start();
        check_text(query, &limits).await?;
        within_request(
            limits,
            SimpleQueryHandler::do_query(&*self.inner, client, query),
        )
        .await
    }
}

/// `datafusion-postgres`' parser for the extended protocol, after the text
/// passed the SQL limits.
struct CheckedParser {
    inner: Arc<Parser>,
    limits: QueryLimits,
}

#[async_trait]
impl QueryParser for CheckedParser {
    type Statement = <Parser as QueryParser>::Statement;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Option<Self::Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let limits = self.limits.start();
        check_text(sql, &limits).await?;
        let parse = self.inner.parse_sql(client, sql, types);
        within_request(limits, REQUEST_BYTES.scope(sql.len(), parse)).await
    }

    fn get_parameter_types(&self, stmt: &Self::Statement) -> PgWireResult<Vec<Type>> {
        self.inner.get_parameter_types(stmt)
    }

    fn get_result_schema(
        &self,
        stmt: &Self::Statement,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        self.inner.get_result_schema(stmt, column_format)
    }
}

/// The extended-query handler: `datafusion-postgres`' own, with the checked
/// parser, one deadline per execution, and the portal's result format made
/// visible to [`ServeHook`].
struct Extended {
    inner: Arc<DfSessionService>,
    parser: Arc<CheckedParser>,
    limits: QueryLimits,
}

#[async_trait]
impl ExtendedQueryHandler for Extended {
    type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;
    type QueryParser = CheckedParser;

    fn query_parser(&self) -> Arc<CheckedParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        within_request(
            self.limits.start(),
            RESULT_FORMAT.scope(
                portal.result_column_format.clone(),
                ExtendedQueryHandler::do_query(&*self.inner, client, portal, max_rows),
            ),
        )
        .await
    }
}

/// What a `SET` does on a storepulse pgwire connection.
enum SetAction {
    /// `datafusion-postgres`' `SetShowHook` keeps it in the connection's
    /// metadata (`statement_timeout`, `SET TIME ZONE`).
    Delegate,
    /// Kept in the connection's metadata by [`SessionHook`], with the
    /// `ParameterStatus` name Postgres reports it under (if any).
    Store {
        key: &'static str,
        value: String,
        report: Option<&'static str>,
    },
    /// Accepted with no effect (Postgres client settings that mean nothing
    /// to storepulse, `SET TRANSACTION ...`: every session is read-only).
    Ignore,
    /// Refused (42501, or the error given).
    Refuse(PgWireError),
}

/// Client settings a session may change (kept per connection), with the
/// `ParameterStatus` name Postgres reports.
const CLIENT_SETTINGS: &[(&str, Option<&str>)] = &[
    ("application_name", Some("application_name")),
    ("datestyle", Some("DateStyle")),
    ("intervalstyle", Some("IntervalStyle")),
    ("extra_float_digits", Some("extra_float_digits")),
    ("bytea_output", None),
    ("timezone", Some("TimeZone")),
];

/// Postgres settings drivers send that change nothing in storepulse.
const IGNORED_SETTINGS: &[&str] = &[
    "client_min_messages",
    "lc_messages",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "idle_in_transaction_session_timeout",
    "lock_timeout",
    "default_transaction_read_only",
    "default_transaction_isolation",
    "transaction_isolation",
    "transaction_read_only",
    "jit",
];

/// The settings named in the refusal.
const SETTABLE: &str = "application_name, client_encoding (UTF8), DateStyle, IntervalStyle, \
    extra_float_digits, bytea_output, search_path (existing schemas), TimeZone, statement_timeout";

/// The text of a `SET` value: a string's contents, a word, a number.
fn set_value(e: &datafusion::sql::sqlparser::ast::Expr) -> String {
    use datafusion::sql::sqlparser::ast::Expr;
    match e {
        Expr::Value(v) => v.clone().into_string().unwrap_or_else(|| v.to_string()),
        Expr::Identifier(i) => i.value.clone(),
        other => other.to_string(),
    }
}

/// The policy for `SET` statements over pgwire (see [`SessionHook`]);
/// `None` for other statements.
fn set_action(stmt: &Statement, ctx: &SessionContext) -> Option<SetAction> {
    use datafusion::sql::sqlparser::ast::{ContextModifier, Set};
    let Statement::Set(set) = stmt else {
        return None;
    };
    let refuse = |what: &str| {
        SetAction::Refuse(sql_error(
            "42501",
            format!(
                "permission denied to set parameter \"{what}\": a storepulse session may set only {SETTABLE}; \
                 the server's limits, memory, spilling and paths are set in storepulse.toml"
            ),
        ))
    };
    Some(match set {
        Set::SingleAssignment {
            scope,
            hivevar,
            variable,
            values,
        } => {
            let var = variable.to_string().to_lowercase();
            if *hivevar || matches!(scope, Some(ContextModifier::Global)) {
                return Some(refuse(&var));
            }
            let value = values.iter().map(set_value).collect::<Vec<_>>().join(", ");
            match var.as_str() {
                "statement_timeout" => SetAction::Delegate,
                "client_encoding" | "names" => encoding(&value),
                "search_path" => search_path(&value, ctx),
                "standard_conforming_strings" if value.eq_ignore_ascii_case("on") => {
                    SetAction::Ignore
                }
                v if IGNORED_SETTINGS.contains(&v) => SetAction::Ignore,
                v => match CLIENT_SETTINGS.iter().find(|(k, _)| *k == v) {
                    Some((key, report)) => SetAction::Store {
                        key,
                        value,
                        report: *report,
                    },
                    None => refuse(&var),
                },
            }
        }
        Set::SetTimeZone { .. } => SetAction::Delegate,
        Set::SetNames { charset_name, .. } => encoding(&charset_name.value),
        Set::SetTransaction { .. } => SetAction::Ignore,
        other => refuse(&other.to_string()),
    })
}

/// `SET client_encoding` / `SET NAMES`: storepulse speaks UTF8 only.
fn encoding(value: &str) -> SetAction {
    if ["utf8", "utf-8", "unicode"].contains(&value.to_lowercase().as_str()) {
        SetAction::Store {
            key: "client_encoding",
            value: "UTF8".into(),
            report: Some("client_encoding"),
        }
    } else {
        SetAction::Refuse(sql_error(
            "22023",
            format!("invalid value for parameter \"client_encoding\": \"{value}\" (storepulse sends UTF8 only)"),
        ))
    }
}

/// `SET search_path`: every named schema must exist (unqualified names
/// resolve in `public` whatever the path; the setting is kept for `SHOW`).
fn search_path(value: &str, ctx: &SessionContext) -> SetAction {
    let catalog = ctx.catalog("datafusion");
    for name in value.split(',').map(|n| n.trim().trim_matches('"')) {
        let known = name.is_empty()
            || name == "$user"
            || catalog.as_ref().is_some_and(|c| {
                c.schema(name).is_some() || c.schema(&name.to_lowercase()).is_some()
            });
        if !known {
            return SetAction::Refuse(sql_error(
                "3F000",
                format!("schema \"{name}\" does not exist"),
            ));
        }
    }
    SetAction::Store {
        key: "search_path",
        value: value.to_string(),
        report: None,
    }
}

/// `SET` over pgwire, per connection and never on the shared serving
/// context (which `datafusion-postgres` would otherwise change for every
/// client): placed before its `SetShowHook`.
struct SessionHook;

impl SessionHook {
    async fn apply(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        match set_action(statement, ctx)? {
            SetAction::Delegate => None,
            SetAction::Ignore => Some(Ok(Response::Execution(Tag::new("SET")))),
            SetAction::Refuse(e) => {
                metrics::counter!("storepulse_query_errors_total", "interface" => "pgwire", "kind" => "read_only")
                    .increment(1);
                Some(Err(e))
            }
            SetAction::Store { key, value, report } => {
                client.metadata_mut().insert(key.to_string(), value.clone());
                if let Some(name) = report {
                    let status = PgWireBackendMessage::ParameterStatus(ParameterStatus::new(
                        name.to_string(),
                        value,
                    ));
                    if let Err(e) = client.send_message(status).await {
                        return Some(Err(e));
                    }
                }
                Some(Ok(Response::Execution(Tag::new("SET"))))
            }
        }
    }
}

#[async_trait]
impl QueryHook for SessionHook {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        self.apply(statement, ctx, client).await
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        match set_action(statement, ctx)? {
            SetAction::Delegate => None,
            SetAction::Refuse(e) => Some(Err(e)),
            SetAction::Store { .. } | SetAction::Ignore => Some(no_rows(Arc::new(
                datafusion::arrow::datatypes::Schema::empty(),
            ))),
        }
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        ctx: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        self.apply(statement, ctx, client).await
    }
}

/// The one configured user's password, for SCRAM-SHA-256.
#[derive(Debug)]
struct Credentials {
    user: String,
    password: String,
}

const SCRAM_ITERATIONS: usize = 4096;

#[async_trait]
impl AuthSource for Credentials {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        if user != self.user {
            metrics::counter!("storepulse_pg_auth_failures_total").increment(1);
            tracing::info!(
                user,
                host = login.host(),
                "pgwire login for an unknown user"
            );
            return Err(PgWireError::InvalidPassword(user.to_string()));
        }
        let salt: [u8; 16] = rand::random();
        let salted = gen_salted_password(&self.password, &salt, SCRAM_ITERATIONS);
        Ok(Password::new(Some(salt.to_vec()), salted))
    }
}

/// No authentication (loopback without a password).
struct Open(Arc<ConnectionManager>);

impl NoopStartupHandler for Open {
    fn connection_manager(&self) -> Option<Arc<ConnectionManager>> {
        Some(self.0.clone())
    }
}

/// How a connection authenticates.
enum Auth {
    Open(Open),
    Scram(SASLAuthStartupHandler<DefaultServerParameterProvider>),
}

/// The startup handler of one connection: authentication, then a session
/// slot. A slot (`max_connections`) is taken only while a message that may
/// complete authentication is handled and kept only if it did, so sockets
/// that stall before logging in never hold one; without a free slot the
/// client gets 53300 before `AuthenticationOk`, as from Postgres.
struct Startup {
    auth: Auth,
    slots: Arc<Semaphore>,
    max_connections: usize,
    slot: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
    /// The socket's place among those still logging in: released once
    /// authenticated.
    starting: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
    authenticated: tokio::sync::watch::Sender<bool>,
}

/// 53300 too_many_connections, fatal (the connection closes).
fn too_many_connections(message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".into(),
        "53300".into(),
        message,
    )))
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let may_complete = matches!(
            message,
            PgWireFrontendMessage::Startup(_) | PgWireFrontendMessage::PasswordMessageFamily(_)
        );
        if may_complete {
            let mut slot = self.slot.lock().expect("slot lock");
            if slot.is_none() {
                match self.slots.clone().try_acquire_owned() {
                    Ok(p) => *slot = Some(p),
                    Err(_) => {
                        metrics::counter!("storepulse_pg_connections_refused_total").increment(1);
                        tracing::warn!(peer = %client.socket_addr(), max = self.max_connections, "pgwire connection refused: max_connections reached");
                        return Err(too_many_connections(format!(
                            "sorry, too many clients already ([pg] max_connections = {})",
                            self.max_connections
                        )));
                    }
                }
            }
        }
        let result = match &self.auth {
            Auth::Open(h) => h.on_startup(client, message).await,
            Auth::Scram(h) => h.on_startup(client, message).await,
        };
        if matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
            self.starting.lock().expect("starting lock").take();
            self.authenticated.send_replace(true);
        } else {
            self.slot.lock().expect("slot lock").take();
        }
        result
    }
}

/// Logs errors sent to clients at debug level (they are the client's).
struct LogErrors;

impl ErrorHandler for LogErrors {
    fn on_error<C>(&self, _client: &C, error: &mut PgWireError)
    where
        C: ClientInfo,
    {
        tracing::debug!(%error, "pgwire error sent to client");
    }
}

struct Handlers {
    simple: Arc<Simple>,
    extended: Arc<Extended>,
    credentials: Option<Arc<Credentials>>,
    connections: Arc<ConnectionManager>,
    cancel: Arc<DefaultCancelHandler>,
    slots: Arc<Semaphore>,
    max_connections: usize,
}

/// The handlers of one connection: the shared ones, and its own startup
/// handler (authentication state, session slot).
struct Connection {
    shared: Arc<Handlers>,
    startup: Arc<Startup>,
}

impl Connection {
    fn new(
        shared: Arc<Handlers>,
        starting: OwnedSemaphorePermit,
        authenticated: tokio::sync::watch::Sender<bool>,
    ) -> Self {
        let auth = match &shared.credentials {
            None => Auth::Open(Open(shared.connections.clone())),
            Some(c) => {
                let mut scram = ScramAuth::new(c.clone());
                scram.set_iterations(SCRAM_ITERATIONS);
                Auth::Scram(
                    SASLAuthStartupHandler::new(
                        Arc::new(DefaultServerParameterProvider::default()),
                    )
                    .with_scram(scram)
                    .with_connection_manager(shared.connections.clone()),
                )
            }
        };
        let startup = Arc::new(Startup {
            auth,
            slots: shared.slots.clone(),
            max_connections: shared.max_connections,
            slot: std::sync::Mutex::new(None),
            starting: std::sync::Mutex::new(Some(starting)),
            authenticated,
        });
        Self { shared, startup }
    }
}

impl PgWireServerHandlers for Connection {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.shared.simple.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.shared.extended.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(LogErrors)
    }

    fn cancel_handler(&self) -> Arc<impl datafusion_postgres::pgwire::api::cancel::CancelHandler> {
        self.shared.cancel.clone()
    }
}

/// A bound pgwire listener; [`PgServer::run`] serves it.
pub struct PgServer {
    listener: TcpListener,
    handlers: Arc<Handlers>,
    cursors: Arc<Cursors>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    max_startup_connections: usize,
    startup_timeout: std::time::Duration,
}

impl PgServer {
    /// Registers `pg_catalog` in the engine's serving context (once) and
    /// binds `addr`. Refuses an address beyond loopback without a password,
    /// and TLS without `[tls]`.
    pub async fn bind(
        engine: EngineHandle,
        cfg: &PgConfig,
        addr: SocketAddr,
        limits: QueryLimits,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<PgServer, ServeError> {
        check_exposure(
            "pg.listen",
            addr,
            cfg.password.is_some(),
            "[pg] password or STOREPULSE_PG_PASSWORD",
        )?;
        if cfg.tls && tls.is_none() {
            return Err(ServeError::Config(
                "pg.tls = true needs [tls] cert and key".into(),
            ));
        }
        let cursors = Arc::new(Cursors::default());
        let ctx = Arc::new(engine.serving_context().clone());
        if ctx
            .catalog("datafusion")
            .and_then(|c| c.schema("pg_catalog"))
            .is_none()
        {
            setup_pg_catalog(&ctx, "datafusion", EmptyContextProvider)
                .map_err(|e| ServeError::Config(format!("pg_catalog: {e}")))?;
        }
        let hooks: Vec<Arc<dyn QueryHook>> = vec![
            Arc::new(SessionHook),
            Arc::new(SetShowHook),
            Arc::new(TransactionStatementHook),
            Arc::new(ServeHook {
                engine,
                limits,
                cursors: cursors.clone(),
            }),
        ];
        let service = Arc::new(DfSessionService::new_with_hooks(ctx, hooks));
        let connections = Arc::new(ConnectionManager::new());
        let max_connections = cfg.max_connections.max(1);
        let handlers = Arc::new(Handlers {
            simple: Arc::new(Simple {
                inner: service.clone(),
                limits,
            }),
            extended: Arc::new(Extended {
                parser: Arc::new(CheckedParser {
                    inner: service.query_parser(),
                    limits,
                }),
                inner: service,
                limits,
            }),
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            credentials: cfg.password.as_ref().map(|p| {
                Arc::new(Credentials {
                    user: cfg.user.clone(),
                    password: p.clone(),
                })
            }),
            cancel: Arc::new(DefaultCancelHandler::new(connections.clone())),
            connections,
        });
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind {
                what: "pg.listen",
                addr,
                source,
            })?;
        Ok(PgServer {
            listener,
            handlers,
            cursors,
            tls: if cfg.tls {
                tls.map(tokio_rustls::TlsAcceptor::from)
            } else {
                None
            },
            max_startup_connections: cfg.max_startup_connections.max(1),
            startup_timeout: cfg.startup_timeout,
        })
    }

    /// The bound address (the port, when `:0` was asked).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `shutdown` resolves; each connection is
    /// served on its own task. A socket must finish TLS and authentication
    /// within `startup_timeout`; beyond `max_startup_connections` sockets
    /// still logging in, a new one gets 53300 at once.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let starting = Arc::new(Semaphore::new(self.max_startup_connections));
        tokio::pin!(shutdown);
        loop {
            let (socket, peer) = tokio::select! {
                _ = &mut shutdown => break,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "pgwire accept failed");
                        continue;
                    }
                },
            };
            let Ok(permit) = starting.clone().try_acquire_owned() else {
                metrics::counter!("storepulse_pg_connections_refused_total").increment(1);
                tracing::warn!(%peer, max = self.max_startup_connections, "pgwire connection refused: max_startup_connections sockets are still logging in");
                let max = self.max_startup_connections;
                tokio::spawn(refuse(socket, max));
                continue;
            };
            let (authenticated, logged_in) = tokio::sync::watch::channel(false);
            let handlers = Connection::new(self.handlers.clone(), permit, authenticated);
            let tls = self.tls.clone();
            let cursors = self.cursors.clone();
            let startup_timeout = self.startup_timeout;
            tokio::spawn(async move {
                metrics::gauge!("storepulse_pg_connections").increment(1.0);
                let conn =
                    datafusion_postgres::pgwire::tokio::process_socket(socket, tls, handlers);
                let expired = async {
                    tokio::time::sleep(startup_timeout).await;
                    if *logged_in.borrow() {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    r = conn => if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "pgwire connection ended with an error");
                    },
                    _ = expired => {
                        metrics::counter!("storepulse_pg_startup_timeouts_total").increment(1);
                        tracing::info!(%peer, timeout = ?startup_timeout, "pgwire connection closed: it did not log in within [pg] startup_timeout");
                    }
                }
                cursors.close_connection(peer);
                metrics::gauge!("storepulse_pg_connections").decrement(1.0);
            });
        }
    }
}

/// Answers a socket over the startup cap with a fatal 53300 and closes it.
async fn refuse(mut socket: tokio::net::TcpStream, max: usize) {
    use datafusion_postgres::pgwire::messages::{response::ErrorResponse, Message};
    let info = ErrorInfo::new(
        "FATAL".into(),
        "53300".into(),
        format!("sorry, too many clients already: {max} connections are logging in ([pg] max_startup_connections)"),
    );
    let mut buf = bytes::BytesMut::new();
    if ErrorResponse::from(info).encode(&mut buf).is_ok() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            let _ = socket.write_all(&buf).await;
            let _ = socket.shutdown().await;
        })
        .await;
    }
}
