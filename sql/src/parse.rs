//! Statement parsing: DataFusion's parser plus storepulse's classification.

use datafusion::sql::{
    parser::{DFParser, Statement as DFStatement},
    sqlparser::{
        ast::{ObjectName, Query, Statement as SqlStatement},
        dialect::GenericDialect,
    },
};

/// A SQL error found before planning (syntax, unsupported statement).
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The text does not parse; the message names line and column.
    #[error("SQL syntax error: {0}")]
    Syntax(String),
    /// The statement parses but is not accepted here.
    #[error("{0}")]
    Unsupported(String),
    /// A `${parameter}` of a built-in script cannot be filled.
    #[error("line {line}: {message}")]
    Template {
        /// 1-based line of the placeholder.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// One statement of a script, classified.
#[derive(Debug, Clone)]
pub enum Statement {
    /// `CREATE [OR REPLACE] MATERIALIZED VIEW name AS query`.
    CreateMaterializedView {
        /// View name as written.
        name: String,
        /// The defining query.
        query: Box<Query>,
        /// `OR REPLACE` was given.
        or_replace: bool,
        /// `IF NOT EXISTS` was given.
        if_not_exists: bool,
        /// The statement's text (for `GET /api/v1/views`).
        sql: String,
    },
    /// Any other statement, left to DataFusion (`CREATE VIEW`, `SELECT`, ...).
    DataFusion {
        /// The parsed statement.
        statement: Box<DFStatement>,
        /// The statement's text.
        sql: String,
    },
}

fn object_name(n: &ObjectName) -> String {
    n.0.iter()
        .map(|p| match p.as_ident() {
            Some(i) => i.value.clone(),
            None => p.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Parses a script of `;`-separated statements.
pub fn parse_script(sql: &str) -> Result<Vec<Statement>, SqlError> {
    let statements = DFParser::parse_sql_with_dialect(sql, &GenericDialect {}).map_err(|e| {
        SqlError::Syntax(e.to_string().trim_start_matches("SQL error: ").to_string())
    })?;
    Ok(statements
        .into_iter()
        .map(|s| match s {
            DFStatement::Statement(inner) => match *inner {
                SqlStatement::CreateView(v) if v.materialized => {
                    Statement::CreateMaterializedView {
                        name: object_name(&v.name),
                        sql: v.to_string(),
                        query: v.query,
                        or_replace: v.or_replace,
                        if_not_exists: v.if_not_exists,
                    }
                }
                other => Statement::DataFusion {
                    sql: other.to_string(),
                    statement: Box::new(DFStatement::Statement(Box::new(other))),
                },
            },
            other => Statement::DataFusion {
                sql: other.to_string(),
                statement: Box::new(other),
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn materialized_views_are_recognised() {
        let s = parse_script(
            "CREATE MATERIALIZED VIEW v AS SELECT store_id, count(*) FROM sales GROUP BY store_id; SELECT 1",
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        match &s[0] {
            Statement::CreateMaterializedView { name, query, .. } => {
                assert_eq!(name, "v");
                assert!(query.to_string().starts_with("SELECT store_id"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(s[1], Statement::DataFusion { .. }));
    }

    #[test]
    fn syntax_errors_point_at_the_position() {
        let e = parse_script("SELECT store_id FROM sales WHERE )")
            .unwrap_err()
            .to_string();
        assert!(e.contains("Line: 1, Column"), "{e}");
    }
}
