//! The read-only rule of analysts' connections (HTTP analyst token, every
//! pgwire session): statements that are not reads are refused by kind
//! before planning, so the error names the statement ([`refuse_writes`]),
//! and every plan is checked again before it runs ([`verify_read_only`]).

use datafusion::{
    logical_expr::LogicalPlan,
    prelude::SQLOptions,
    sql::{parser::Statement as DFStatement, sqlparser::ast::Statement as SqlStatement},
};

use crate::{EngineError, Result};

/// [`EngineError::ReadOnly`] for a statement of kind `kind`.
fn refusal(kind: &str) -> EngineError {
    EngineError::ReadOnly(format!(
        "{kind} is not allowed: storepulse serves read-only SQL (views are defined in the server's SQL files, or by the operator with CREATE [MATERIALIZED] VIEW)"
    ))
}

/// Refuses a statement that is not a read (see [`write_kind`]).
pub fn refuse_writes(stmt: &SqlStatement) -> Result<()> {
    match write_kind(stmt) {
        Some(kind) => Err(refusal(&kind)),
        None => Ok(()),
    }
}

/// [`refuse_writes`] for DataFusion's statements (`CREATE EXTERNAL TABLE`
/// and `COPY ... TO` are its own).
pub(crate) fn refuse_df_writes(stmt: &DFStatement) -> Result<()> {
    let kind = match stmt {
        DFStatement::Statement(s) => return refuse_writes(s),
        DFStatement::Explain(_) => return Ok(()),
        DFStatement::CreateExternalTable(_) => "CREATE EXTERNAL TABLE",
        DFStatement::CopyTo(_) => "COPY",
        _ => "this statement",
    };
    Err(refusal(kind))
}

/// The kind of a statement that is not a read (`CREATE TABLE`, `INSERT
/// INTO`, `COPY`, `DROP VIEW`, `SET`, ...), for the read-only error; `None`
/// for queries, `EXPLAIN` and `SHOW`.
pub fn write_kind(stmt: &SqlStatement) -> Option<String> {
    if matches!(
        stmt,
        SqlStatement::Query(_) | SqlStatement::Explain { .. } | SqlStatement::ExplainTable { .. }
    ) {
        return None;
    }
    let text = stmt.to_string();
    let words: Vec<&str> = text.split_whitespace().take(3).collect();
    let is = |w: &str, k: &str| w.eq_ignore_ascii_case(k);
    if words.first().is_some_and(|w| is(w, "SHOW")) {
        return None;
    }
    let kind = match words.as_slice() {
        [a, b, c, ..]
            if is(a, "CREATE")
                && ["MATERIALIZED", "EXTERNAL", "OR", "TEMPORARY", "UNIQUE"]
                    .iter()
                    .any(|k| is(b, k)) =>
        {
            format!("{a} {b} {c}")
        }
        [a, b, ..]
            if ["CREATE", "DROP", "ALTER", "INSERT", "TRUNCATE", "GRANT"]
                .iter()
                .any(|k| is(a, k)) =>
        {
            format!("{a} {b}")
        }
        [a, ..] => a.to_string(),
        [] => "this statement".into(),
    };
    Some(kind.to_uppercase())
}

/// Checks that `plan` only reads: DDL (`CREATE TABLE`, `CREATE EXTERNAL
/// TABLE`), DML (`INSERT`, `COPY`) and statements (`SET`, transactions)
/// are refused with [`EngineError::ReadOnly`].
pub fn verify_read_only(plan: &LogicalPlan) -> Result<()> {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(plan)
        .map_err(|e| {
            let what = match e.find_root() {
                datafusion::error::DataFusionError::Plan(m) => m.clone(),
                other => other.to_string(),
            };
            EngineError::ReadOnly(format!(
                "storepulse serves read-only SQL ({what}); views are defined in the server's SQL files"
            ))
        })
}
