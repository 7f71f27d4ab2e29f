//! Definitions: `CREATE MATERIALIZED VIEW`, `CREATE VIEW` / `DROP VIEW`,
//! `CREATE ALERT` and rules from the config file, and the other statements
//! an operator's script may hold.

use std::sync::Arc;

use datafusion::{
    datasource::view::ViewTable,
    execution::context::SessionState,
    logical_expr::LogicalPlan,
    prelude::SessionContext,
    sql::{parser::Statement as DFStatement, sqlparser::ast::Statement as SqlStatement},
};
use storepulse_sql::{parse_script, Statement};

use super::*;
use crate::{
    error::{user_err, EngineError, Result},
    query::{self, QueryLimits, QueryOutput},
    snapshot::Snapshot,
};

impl Engine {
    /// Runs a SQL script: `CREATE MATERIALIZED VIEW`, `CREATE VIEW`, queries.
    /// Returns the output of every statement.
    pub async fn execute_sql(&mut self, sql: &str) -> Result<Vec<QueryOutput>> {
        let mut out = Vec::new();
        for stmt in parse_script(sql)? {
            out.push(self.execute_statement(stmt).await?);
        }
        Ok(out)
    }

    pub(crate) async fn execute_statement(&mut self, stmt: Statement) -> Result<QueryOutput> {
        match stmt {
            Statement::CreateMaterializedView {
                name,
                query,
                or_replace,
                if_not_exists,
                sql,
            } => {
                let exists = self.views.iter().position(|v| v.name == name);
                if exists.is_some() && if_not_exists {
                    return Ok(empty_output());
                }
                if exists.is_some() && !or_replace {
                    return user_err(format!("materialized view '{name}' already exists"));
                }
                if exists.is_none() && self.serving.table_exist(name.as_str())? {
                    return user_err(format!("a table or view named '{name}' already exists"));
                }
                let state = self.planning.state();
                let plan = state
                    .statement_to_plan(DFStatement::Statement(Box::new(SqlStatement::Query(query))))
                    .await?;
                let plan = analyze(&state, plan)?;
                let view = plan_view(
                    &name,
                    &sql,
                    plan,
                    &state,
                    &self.stream_tables,
                    self.cell.clone(),
                )
                .await?;
                let table = ViewTable::new(view.query_plan.clone(), Some(sql.clone()));
                if let Some(i) = exists {
                    self.serving.deregister_table(name.as_str())?;
                    self.views.remove(i);
                }
                self.serving
                    .register_table(name.as_str(), Arc::new(table))?;
                let mut view = view;
                if let Some(ttl) = self.cfg.state_ttl.get(&name) {
                    if let Err(e) = view.set_state_ttl(**ttl) {
                        return user_err(e);
                    }
                }
                tracing::info!(view = %name, streams = ?view.streams, "materialized view created");
                self.views.push(view);
                self.snapshot_epoch = None;
                Ok(empty_output())
            }
            Statement::CreateAlert(alert) => {
                let options =
                    storepulse_sql::alert::RuleOptions::from_sql(&alert.name, &alert.options)
                        .map_err(|e| EngineError::User(e.to_string()))?;
                let at = format!("line {}", alert.line);
                self.add_alert(&alert.name, alert.query, alert.query_sql, options, &at)
                    .await?;
                Ok(empty_output())
            }
            Statement::DataFusion { statement, .. } => {
                if is_view_ddl(&statement) {
                    let created = created_view_name(&statement);
                    let plan = self.serving.state().statement_to_plan(*statement).await?;
                    let df = self.serving.execute_logical_plan(plan).await?;
                    let schema = Arc::new(df.schema().as_arrow().clone());
                    let batches = df.collect().await?;
                    if let Some(name) = created {
                        self.wrap_refreshed(&name).await?;
                    }
                    return Ok(QueryOutput::new(schema, batches));
                }
                let snap = self.snapshot()?;
                run_query(&self.serving, *statement, snap).await
            }
        }
    }

    /// If `[engine] refresh` lists view `name`, serves it from a refreshed
    /// result (see [`RefreshedView`]).
    pub(super) async fn wrap_refreshed(&mut self, name: &str) -> Result<()> {
        self.refreshed.retain(|r| r.name() != name);
        let Some(interval) = self.cfg.refresh.get(name) else {
            return Ok(());
        };
        let Some(provider) = self.serving.table_provider(name).await.ok() else {
            return Ok(());
        };
        let Some(view) = provider.downcast_ref::<ViewTable>() else {
            return Ok(());
        };
        let r = Arc::new(RefreshedView::new(
            name.to_string(),
            view.logical_plan().clone(),
            **interval,
            self.cfg.refresh_max_staleness,
        ));
        self.serving.deregister_table(name)?;
        self.serving.register_table(name, r.clone())?;
        tracing::info!(view = %name, interval = ?**interval, "query-time view served from a refreshed result");
        self.refreshed.push(r);
        Ok(())
    }

    /// Names in `[engine] refresh` that no `CREATE VIEW` defined (a
    /// configuration error the binary reports after loading the scripts).
    pub fn unknown_refresh_views(&self) -> Vec<String> {
        self.cfg
            .refresh
            .keys()
            .filter(|n| !self.refreshed.iter().any(|r| r.name() == n.as_str()))
            .cloned()
            .collect()
    }

    /// The alert rules, in order of definition.
    pub fn alerts(&self) -> &[AlertDefinition] {
        &self.alerts
    }

    /// Defines (or replaces) alert rule `name` over the condition `query`
    /// (one `SELECT`) with typed `options`: a rule from the config file,
    /// without going through `CREATE ALERT` text.
    pub async fn define_alert(
        &mut self,
        name: &str,
        query: &str,
        options: storepulse_sql::alert::RuleOptions,
    ) -> Result<()> {
        let text = query.trim().trim_end_matches(';').trim();
        let mut stmts = parse_script(text)?;
        let parsed = match (stmts.len(), stmts.pop()) {
            (1, Some(Statement::DataFusion { statement, .. })) => match *statement {
                DFStatement::Statement(inner) => match *inner {
                    SqlStatement::Query(q) => Some(q),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        let Some(q) = parsed else {
            return user_err(format!(
                "alert '{name}': the query must be one SELECT statement"
            ));
        };
        self.add_alert(name, q, text.to_string(), options, "config")
            .await
    }

    /// Plans the condition now, so an unknown table or column is an error
    /// at definition, not at the first evaluation; `at` says where the rule
    /// was written.
    pub(super) async fn add_alert(
        &mut self,
        name: &str,
        query: Box<datafusion::sql::sqlparser::ast::Query>,
        query_sql: String,
        options: storepulse_sql::alert::RuleOptions,
        at: &str,
    ) -> Result<()> {
        let plan = self
            .serving
            .state()
            .statement_to_plan(DFStatement::Statement(Box::new(SqlStatement::Query(query))))
            .await
            .map_err(|e| crate::EngineError::User(format!("alert '{name}' ({at}): {e}")))?;
        let columns = plan
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        self.alerts.retain(|a| a.name != name);
        tracing::info!(alert = %name, "alert rule created");
        self.alerts.push(AlertDefinition {
            name: name.to_string(),
            query_sql,
            options,
            columns,
        });
        Ok(())
    }
}

pub(super) fn empty_output() -> QueryOutput {
    QueryOutput::empty()
}

/// The name a `CREATE [OR REPLACE] VIEW` statement defines.
pub(super) fn created_view_name(s: &DFStatement) -> Option<String> {
    match s {
        DFStatement::Statement(s) => match s.as_ref() {
            SqlStatement::CreateView(v) if !v.materialized => Some(v.name.to_string()),
            _ => None,
        },
        _ => None,
    }
}

pub(crate) fn is_view_ddl(s: &DFStatement) -> bool {
    match s {
        DFStatement::Statement(s) => match s.as_ref() {
            SqlStatement::CreateView(v) => !v.materialized,
            SqlStatement::Drop { object_type, .. } => {
                *object_type == datafusion::sql::sqlparser::ast::ObjectType::View
            }
            _ => false,
        },
        _ => false,
    }
}

pub(super) fn analyze(state: &SessionState, plan: LogicalPlan) -> Result<LogicalPlan> {
    Ok(state
        .analyzer()
        .execute_and_check(plan, state.config_options(), |_, _| {})?)
}

/// Runs a read-only statement against `ctx`, with `snap` pinned.
pub(super) async fn run_query(
    ctx: &SessionContext,
    stmt: DFStatement,
    snap: Arc<Snapshot>,
) -> Result<QueryOutput> {
    let plan = ctx.state().statement_to_plan(stmt).await?;
    query::execute(ctx, plan, snap, &QueryLimits::default()).await
}

/// SQL with whitespace runs collapsed (to compare definitions).
pub(super) fn normalize_sql(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}
