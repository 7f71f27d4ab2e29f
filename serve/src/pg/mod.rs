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

mod cursors;
mod query;
mod session;
mod startup;

use cursors::*;
use query::*;
use session::*;
use startup::*;

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
                metrics::counter!(crate::metric_names::PG_CONNECTIONS_REFUSED_TOTAL).increment(1);
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
                metrics::gauge!(crate::metric_names::PG_CONNECTIONS).increment(1.0);
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
                        metrics::counter!(crate::metric_names::PG_STARTUP_TIMEOUTS_TOTAL).increment(1);
                        tracing::info!(%peer, timeout = ?startup_timeout, "pgwire connection closed: it did not log in within [pg] startup_timeout");
                    }
                }
                cursors.close_connection(peer);
                metrics::gauge!(crate::metric_names::PG_CONNECTIONS).decrement(1.0);
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
