//! `SET` per connection: the client settings drivers send are kept in the
//! connection's metadata; anything that would change the shared serving
//! context is refused with 42501.

use super::*;

/// What a `SET` does on a storepulse pgwire connection.
pub(super) enum SetAction {
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
pub(super) const CLIENT_SETTINGS: &[(&str, Option<&str>)] = &[
    ("application_name", Some("application_name")),
    ("datestyle", Some("DateStyle")),
    ("intervalstyle", Some("IntervalStyle")),
    ("extra_float_digits", Some("extra_float_digits")),
    ("bytea_output", None),
    ("timezone", Some("TimeZone")),
];

/// Postgres settings drivers send that change nothing in storepulse.
pub(super) const IGNORED_SETTINGS: &[&str] = &[
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
pub(super) const SETTABLE: &str =
    "application_name, client_encoding (UTF8), DateStyle, IntervalStyle, \
    extra_float_digits, bytea_output, search_path (existing schemas), TimeZone, statement_timeout";

/// The text of a `SET` value: a string's contents, a word, a number.
pub(super) fn set_value(e: &datafusion::sql::sqlparser::ast::Expr) -> String {
    use datafusion::sql::sqlparser::ast::Expr;
    match e {
        Expr::Value(v) => v.clone().into_string().unwrap_or_else(|| v.to_string()),
        Expr::Identifier(i) => i.value.clone(),
        other => other.to_string(),
    }
}

/// The policy for `SET` statements over pgwire (see [`SessionHook`]);
/// `None` for other statements.
pub(super) fn set_action(stmt: &Statement, ctx: &SessionContext) -> Option<SetAction> {
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
pub(super) fn encoding(value: &str) -> SetAction {
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
pub(super) fn search_path(value: &str, ctx: &SessionContext) -> SetAction {
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
pub(super) struct SessionHook;

impl SessionHook {
    pub(super) async fn apply(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        match set_action(statement, ctx)? {
            SetAction::Delegate => None,
            SetAction::Ignore => Some(Ok(Response::Execution(Tag::new("SET")))),
            SetAction::Refuse(e) => {
                metrics::counter!(crate::metric_names::QUERY_ERRORS_TOTAL, "interface" => "pgwire", "kind" => "read_only")
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
