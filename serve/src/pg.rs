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
            results::{QueryResponse, Response, Tag},
            store::PortalStore,
            ClientInfo, ClientPortalStore, ConnectionManager, ErrorHandler, PgWireServerHandlers,
        },
        error::{ErrorInfo, PgWireError, PgWireResult},
        messages::{PgWireBackendMessage, PgWireFrontendMessage},
        types::format::FormatOptions,
    },
    DfSessionService, Parser, QueryHook,
};
use futures::Sink;
use storepulse_engine::{write_kind, EngineError, EngineHandle, QueryLimits};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::{config::check_exposure, PgConfig, ServeError};

tokio::task_local! {
    /// The result format of the extended-protocol portal being executed.
    static RESULT_FORMAT: Format;
}

/// SQLSTATE and message for an engine error.
fn pg_error(e: &EngineError) -> PgWireError {
    let code = match e.kind() {
        "read_only" => "42501",    // insufficient_privilege
        "timeout" => "57014",      // query_canceled
        "row_limit" => "54000",    // program_limit_exceeded
        "memory_limit" => "53200", // out_of_memory
        "user_error" => "42000",   // syntax_error_or_access_rule_violation
        _ => "XX000",              // internal_error
    };
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
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
                let bytes = b.get_array_memory_size();
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
/// them on connect; storepulse has no session state they could change).
fn session_noop(stmt: &Statement) -> Option<&'static str> {
    match stmt {
        Statement::Set(_) => Some("SET"),
        Statement::Discard { .. } => Some("DISCARD ALL"),
        Statement::Deallocate { .. } => Some("DEALLOCATE"),
        _ => None,
    }
}

/// Statements that are not reads are refused before planning, with the
/// statement's kind in the message; reads still pass
/// [`storepulse_engine::verify_read_only`].
fn refused(stmt: &Statement) -> Option<EngineError> {
    if is_cursor_statement(stmt) {
        return None;
    }
    write_kind(stmt).map(|kind| {
        EngineError::ReadOnly(format!(
            "{kind} is not allowed: storepulse serves read-only SQL over the Postgres protocol (views are defined in the server's SQL files)"
        ))
    })
}

/// `DECLARE`, `FETCH` or `CLOSE` (cursor statements; see the module docs).
fn is_cursor_statement(stmt: &Statement) -> bool {
    matches!(
        stmt,
        Statement::Declare { .. } | Statement::Fetch { .. } | Statement::Close { .. }
    )
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
            let out = self.execute(plan, client).await?;
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
        let mut response = encode(schema, batches, format, client)?;
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

    async fn plan(&self, stmt: &Statement, ctx: &SessionContext) -> PgWireResult<LogicalPlan> {
        ctx.state()
            .statement_to_plan(DFStatement::Statement(Box::new(stmt.clone())))
            .await
            .map_err(|e| {
                let e = EngineError::from(e);
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
        let out = self.execute(plan, client).await?;
        Ok(Response::Query(encode(
            out.schema,
            out.batches,
            format,
            client,
        )?))
    }

    /// Runs a read within the limits (`SET statement_timeout` may lower
    /// the server's timeout, never raise it).
    async fn execute(
        &self,
        plan: LogicalPlan,
        client: &(dyn ClientInfo + Send + Sync),
    ) -> PgWireResult<storepulse_engine::QueryOutput> {
        let started = Instant::now();
        let mut limits = self.limits;
        if let Some(ms) = client
            .metadata()
            .get("statement_timeout_ms")
            .and_then(|s| s.parse::<u64>().ok())
        {
            let t = std::time::Duration::from_millis(ms);
            limits.timeout = Some(limits.timeout.map_or(t, |l| l.min(t)));
        }
        let out = self.engine.run_read_only(plan, &limits).await;
        record(out.as_ref().map(|_| ()), started);
        out.map_err(|e| {
            tracing::info!(error = %e, "pgwire query failed");
            pg_error(&e)
        })
    }
}

/// Rows as a query response in `format`.
fn encode(
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    format: &Format,
    client: &(dyn ClientInfo + Send + Sync),
) -> PgWireResult<QueryResponse> {
    let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
    let fields = Arc::new(arrow_schema_to_pg_fields(&schema, format, Some(options))?);
    let f = fields.clone();
    let rows = futures::stream::iter(
        batches
            .into_iter()
            .flat_map(move |b| encode_recordbatch(f.clone(), b)),
    );
    Ok(QueryResponse::new(fields, rows))
}

fn record(result: Result<(), &EngineError>, started: Instant) {
    metrics::histogram!("storepulse_query_duration_seconds", "interface" => "pgwire")
        .record(started.elapsed().as_secs_f64());
    if let Err(e) = result {
        metrics::counter!("storepulse_query_errors_total", "interface" => "pgwire", "kind" => e.kind())
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
        _ctx: &SessionContext,
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
            return Some(
                DFSchema::try_from(schema)
                    .map(|schema| {
                        LogicalPlan::EmptyRelation(EmptyRelation {
                            produce_one_row: false,
                            schema: Arc::new(schema),
                        })
                    })
                    .map_err(|e| pg_error(&EngineError::from(e))),
            );
        }
        // Writes fail at Parse (as Postgres does for a read-only
        // transaction); reads get the default planning, with parameter
        // type inference.
        refused(statement).map(|e| {
            record(Err(&e), Instant::now());
            Err(pg_error(&e))
        })
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

/// The extended-query handler: `datafusion-postgres`' own, with the
/// portal's result format made visible to [`ServeHook`].
struct Extended(Arc<DfSessionService>);

#[async_trait]
impl ExtendedQueryHandler for Extended {
    type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.0.query_parser()
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
        RESULT_FORMAT
            .scope(
                portal.result_column_format.clone(),
                ExtendedQueryHandler::do_query(&*self.0, client, portal, max_rows),
            )
            .await
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

/// The startup handler of one connection.
enum Startup {
    Open(Open),
    Scram(SASLAuthStartupHandler<DefaultServerParameterProvider>),
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
        match self {
            Startup::Open(h) => h.on_startup(client, message).await,
            Startup::Scram(h) => h.on_startup(client, message).await,
        }
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
    simple: Arc<DfSessionService>,
    extended: Arc<Extended>,
    credentials: Option<Arc<Credentials>>,
    connections: Arc<ConnectionManager>,
    cancel: Arc<DefaultCancelHandler>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.simple.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.extended.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        // Called once per connection: the SASL handler holds the state of
        // one exchange.
        Arc::new(match &self.credentials {
            None => Startup::Open(Open(self.connections.clone())),
            Some(c) => {
                let mut scram = ScramAuth::new(c.clone());
                scram.set_iterations(SCRAM_ITERATIONS);
                Startup::Scram(
                    SASLAuthStartupHandler::new(
                        Arc::new(DefaultServerParameterProvider::default()),
                    )
                    .with_scram(scram)
                    .with_connection_manager(self.connections.clone()),
                )
            }
        })
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(LogErrors)
    }

    fn cancel_handler(&self) -> Arc<impl datafusion_postgres::pgwire::api::cancel::CancelHandler> {
        self.cancel.clone()
    }
}

/// A bound pgwire listener; [`PgServer::run`] serves it.
pub struct PgServer {
    listener: TcpListener,
    handlers: Arc<Handlers>,
    cursors: Arc<Cursors>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    max_connections: usize,
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
        let handlers = Arc::new(Handlers {
            simple: service.clone(),
            extended: Arc::new(Extended(service)),
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
            max_connections: cfg.max_connections.max(1),
        })
    }

    /// The bound address (the port, when `:0` was asked).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `shutdown` resolves; each connection is
    /// served on its own task.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let limiter = Arc::new(Semaphore::new(self.max_connections));
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
            let Ok(permit) = limiter.clone().try_acquire_owned() else {
                metrics::counter!("storepulse_pg_connections_refused_total").increment(1);
                tracing::warn!(%peer, max = self.max_connections, "pgwire connection refused: max_connections reached");
                drop(socket);
                continue;
            };
            let handlers = self.handlers.clone();
            let tls = self.tls.clone();
            let cursors = self.cursors.clone();
            tokio::spawn(async move {
                let _permit = permit;
                metrics::gauge!("storepulse_pg_connections").increment(1.0);
                if let Err(e) =
                    datafusion_postgres::pgwire::tokio::process_socket(socket, tls, handlers).await
                {
                    tracing::debug!(%peer, error = %e, "pgwire connection ended with an error");
                }
                cursors.close_connection(peer);
                metrics::gauge!("storepulse_pg_connections").decrement(1.0);
            });
        }
    }
}
