//! Connection start-up: password authentication (SCRAM-SHA-256), the
//! session and start-up caps (53300), and the error log.

use super::*;

/// The one configured user's password, for SCRAM-SHA-256.
#[derive(Debug)]
pub(super) struct Credentials {
    pub(super) user: String,
    pub(super) password: String,
}

pub(super) const SCRAM_ITERATIONS: usize = 4096;

#[async_trait]
impl AuthSource for Credentials {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        if user != self.user {
            metrics::counter!(crate::metric_names::PG_AUTH_FAILURES_TOTAL).increment(1);
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
pub(super) struct Open(pub(super) Arc<ConnectionManager>);

impl NoopStartupHandler for Open {
    fn connection_manager(&self) -> Option<Arc<ConnectionManager>> {
        Some(self.0.clone())
    }
}

/// How a connection authenticates.
pub(super) enum Auth {
    Open(Open),
    Scram(SASLAuthStartupHandler<DefaultServerParameterProvider>),
}

/// The startup handler of one connection: authentication, then a session
/// slot. A slot (`max_connections`) is taken only while a message that may
/// complete authentication is handled and kept only if it did, so sockets
/// that stall before logging in never hold one; without a free slot the
/// client gets 53300 before `AuthenticationOk`, as from Postgres.
pub(super) struct Startup {
    pub(super) auth: Auth,
    pub(super) slots: Arc<Semaphore>,
    pub(super) max_connections: usize,
    pub(super) slot: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
    /// The socket's place among those still logging in: released once
    /// authenticated.
    pub(super) starting: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
    pub(super) authenticated: tokio::sync::watch::Sender<bool>,
}

/// 53300 too_many_connections, fatal (the connection closes).
pub(super) fn too_many_connections(message: String) -> PgWireError {
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
                        metrics::counter!(crate::metric_names::PG_CONNECTIONS_REFUSED_TOTAL)
                            .increment(1);
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
pub(super) struct LogErrors;

impl ErrorHandler for LogErrors {
    fn on_error<C>(&self, _client: &C, error: &mut PgWireError)
    where
        C: ClientInfo,
    {
        tracing::debug!(%error, "pgwire error sent to client");
    }
}
