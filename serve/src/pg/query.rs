//! The query path of a pgwire connection: the hook that plans and runs
//! every statement the session hooks do not answer (read-only, one
//! snapshot, within the request's limits), the encoding of its rows, and
//! the simple and extended protocol handlers that check the text first.

use super::*;

/// Runs every statement the session hooks do not answer.
pub(super) struct ServeHook {
    pub(super) engine: EngineHandle,
    pub(super) limits: QueryLimits,
    pub(super) cursors: Arc<Cursors>,
}

/// An error with SQLSTATE `code`.
pub(super) fn sql_error(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message,
    )))
}

/// 34000 invalid_cursor_name, as Postgres answers.
pub(super) fn no_cursor(name: &str) -> PgWireError {
    sql_error("34000", format!("cursor \"{name}\" does not exist"))
}

/// The rows a `FETCH` asks for (`None`: all); backward and absolute
/// positions are refused (cursors scan forward only).
pub(super) fn fetch_count(direction: &FetchDirection) -> PgWireResult<Option<usize>> {
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
pub(super) fn session_noop(stmt: &Statement) -> Option<&'static str> {
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
pub(super) fn refused(stmt: &Statement) -> Option<EngineError> {
    if is_cursor_statement(stmt) {
        return None;
    }
    refuse_writes(stmt).err()
}

/// `DECLARE`, `FETCH` or `CLOSE` (cursor statements; see the module docs).
pub(super) fn is_cursor_statement(stmt: &Statement) -> bool {
    matches!(
        stmt,
        Statement::Declare { .. } | Statement::Fetch { .. } | Statement::Close { .. }
    )
}

/// A plan that returns no rows with `schema`'s columns: how a statement
/// answered at Execute is described at Parse.
pub(super) fn no_rows(schema: SchemaRef) -> PgWireResult<LogicalPlan> {
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
pub(super) fn not_supported(what: &str) -> PgWireError {
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
    pub(super) async fn declare(
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
            let (schema, batches, memory) = out.into_parts();
            let cursor = Cursor::new(&name.value, schema, batches, memory, &pool)?;
            self.cursors
                .declare(client.socket_addr(), &name.value, cursor)?;
        }
        Ok(Response::Execution(Tag::new("DECLARE CURSOR")))
    }

    /// `FETCH`: the next rows of a cursor, encoded in `format`.
    pub(super) fn fetch(
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
    pub(super) async fn cursor_statement(
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
    pub(super) async fn plan(
        &self,
        stmt: &Statement,
        ctx: &SessionContext,
    ) -> PgWireResult<LogicalPlan> {
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

    pub(super) async fn run(
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
    pub(super) fn request_limits(&self, client: &(dyn ClientInfo + Send + Sync)) -> QueryLimits {
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
    pub(super) async fn execute(
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
pub(super) fn encode(
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
pub(super) struct Rows {
    pub(super) fields: Arc<Vec<datafusion_postgres::pgwire::api::results::FieldInfo>>,
    pub(super) batches: std::vec::IntoIter<RecordBatch>,
    pub(super) current: Option<Box<dyn Iterator<Item = PgWireResult<DataRow>> + Send>>,
    pub(super) limits: QueryLimits,
    pub(super) done: bool,
    pub(super) _memory: ResultMemory,
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

pub(super) fn record(result: Result<(), &EngineError>, started: Instant) {
    metrics::histogram!(crate::metric_names::QUERY_DURATION_SECONDS, "interface" => "pgwire")
        .record(started.elapsed().as_secs_f64());
    if let Err(e) = result {
        metrics::counter!(crate::metric_names::QUERY_ERRORS_TOTAL, "interface" => "pgwire", "kind" => e.kind().as_str())
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
pub(super) async fn check_text(sql: &str, limits: &QueryLimits) -> PgWireResult<()> {
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
pub(super) async fn within_request<T>(
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
pub(super) struct Simple {
    pub(super) inner: Arc<DfSessionService>,
    pub(super) limits: QueryLimits,
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
pub(super) struct CheckedParser {
    pub(super) inner: Arc<Parser>,
    pub(super) limits: QueryLimits,
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
pub(super) struct Extended {
    pub(super) inner: Arc<DfSessionService>,
    pub(super) parser: Arc<CheckedParser>,
    pub(super) limits: QueryLimits,
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
