//! Structural limits on SQL that clients send: text size, statements per
//! request and expression depth.
//!
//! DataFusion's planner, optimizer and `Expr`'s derived `Clone`/`Drop`
//! recurse over expressions, and sqlparser builds arbitrarily deep trees
//! from flat text (`1+1+...+1` is parsed by a loop, not by recursion, so its
//! recursion limit does not see it). A 4 KB statement could therefore
//! overflow a thread's stack and abort the process. [`parse_script_with`]
//! refuses such text before anything plans it: too many bytes or statements
//! before parsing, too deep an expression tree right after parsing (the depth
//! walk stops at the limit, so the check itself stays shallow).
//!
//! Parsing a deep tree and dropping it still recurse; the engine runs
//! client SQL on its SQL threads, whose stacks are large enough for the
//! deepest tree `max_sql_bytes` allows.
//!
//! [`parse_script_with`]: crate::parse::parse_script_with

use std::ops::ControlFlow;

use datafusion::sql::{
    parser::{CopyToSource, Statement as DFStatement},
    sqlparser::{
        ast::{Expr, Query, Visit, Visitor},
        dialect::PostgreSqlDialect,
        parser::Parser,
        tokenizer::Tokenizer,
    },
};

use crate::{parse::split_statements, SqlError};

/// Limits on the SQL text of one request (`[serving]` `max_sql_bytes`,
/// `max_statements`, `max_expression_depth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlLimits {
    /// Refuse SQL text longer than this many bytes.
    pub max_sql_bytes: usize,
    /// Refuse a request with more statements than this.
    pub max_statements: usize,
    /// Refuse a statement whose expression tree (expressions and nested
    /// queries) is deeper than this.
    pub max_expression_depth: usize,
}

impl SqlLimits {
    /// The defaults: 1 MiB of text, 100 statements, depth 1000 (DuckDB's
    /// `max_expression_depth` default too).
    pub const DEFAULT: SqlLimits = SqlLimits {
        max_sql_bytes: 1 << 20,
        max_statements: 100,
        max_expression_depth: 1000,
    };

    /// No limits: the operator's own scripts (configuration files).
    pub const NONE: SqlLimits = SqlLimits {
        max_sql_bytes: usize::MAX,
        max_statements: usize::MAX,
        max_expression_depth: usize::MAX,
    };

    /// Refuses text over `max_sql_bytes`.
    pub fn check_size(&self, sql: &str) -> Result<(), SqlError> {
        if sql.len() > self.max_sql_bytes {
            return Err(SqlError::TooLarge {
                bytes: sql.len(),
                max: self.max_sql_bytes,
            });
        }
        Ok(())
    }

    /// Refuses more than `max_statements` statements.
    pub fn check_statements(&self, count: usize) -> Result<(), SqlError> {
        if count > self.max_statements {
            return Err(SqlError::TooManyStatements {
                count,
                max: self.max_statements,
            });
        }
        Ok(())
    }

    /// Refuses a statement deeper than `max_expression_depth`.
    pub fn check_depth(&self, stmt: &DFStatement) -> Result<(), SqlError> {
        if self.max_expression_depth == usize::MAX {
            return Ok(());
        }
        match stmt {
            DFStatement::Statement(s) => self.check_tree(&**s),
            DFStatement::Explain(e) => self.check_depth(&e.statement),
            DFStatement::CopyTo(c) => match &c.source {
                CopyToSource::Query(q) => self.check_tree(&**q),
                CopyToSource::Relation(_) => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Refuses a query (an alert's condition, a view's body) deeper than
    /// `max_expression_depth`.
    pub fn check_query_depth(&self, query: &Query) -> Result<(), SqlError> {
        if self.max_expression_depth == usize::MAX {
            return Ok(());
        }
        self.check_tree(query)
    }

    /// Checks a client's SQL text in the Postgres dialect (what pgwire
    /// clients send) against these limits: size, statements, each
    /// statement's depth. Text that does not parse passes: the real parser
    /// reports it with its own message. Run it where a deep tree can be
    /// built and dropped (a SQL thread).
    pub fn check_postgres_text(&self, sql: &str) -> Result<(), SqlError> {
        self.check_size(sql)?;
        let dialect = PostgreSqlDialect {};
        let Ok(tokens) = Tokenizer::new(&dialect, sql).tokenize_with_location() else {
            return Ok(());
        };
        let groups = split_statements(&tokens);
        self.check_statements(groups.len())?;
        for group in groups {
            let parsed = Parser::new(&dialect)
                .with_tokens_with_locations(group.to_vec())
                .parse_statements();
            for stmt in parsed.into_iter().flatten() {
                self.check_depth(&DFStatement::Statement(Box::new(stmt)))?;
            }
        }
        Ok(())
    }

    fn check_tree(&self, node: &impl Visit) -> Result<(), SqlError> {
        let mut d = Depth {
            depth: 0,
            limit: self.max_expression_depth,
        };
        match node.visit(&mut d) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(()) => Err(SqlError::TooComplex {
                max: self.max_expression_depth,
            }),
        }
    }
}

impl Default for SqlLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Counts nesting of expressions and queries; breaks once past the limit,
/// so the walk never goes deeper than `limit + 1` levels.
struct Depth {
    depth: usize,
    limit: usize,
}

impl Depth {
    fn enter(&mut self) -> ControlFlow<()> {
        self.depth += 1;
        if self.depth > self.limit {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    fn leave(&mut self) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }
}

impl Visitor for Depth {
    type Break = ();

    fn pre_visit_expr(&mut self, _: &Expr) -> ControlFlow<()> {
        self.enter()
    }

    fn post_visit_expr(&mut self, _: &Expr) -> ControlFlow<()> {
        self.leave()
    }

    fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
        self.enter()
    }

    fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
        self.leave()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_script_with;

    fn chain(op: &str, n: usize) -> String {
        format!("SELECT 1{}", format!(" {op} 1").repeat(n - 1))
    }

    fn limits(depth: usize) -> SqlLimits {
        SqlLimits {
            max_expression_depth: depth,
            ..SqlLimits::DEFAULT
        }
    }

    #[test]
    fn depth_counts_chains_nesting_and_subqueries() {
        // The query, 9 nested `+` and the innermost literal: depth 11.
        assert!(parse_script_with(&chain("+", 10), &limits(11)).is_ok());
        let e = parse_script_with(&chain("+", 10), &limits(10)).unwrap_err();
        assert!(matches!(e, SqlError::TooComplex { max: 10 }), "{e}");
        assert_eq!(
            e.to_string(),
            "statement too complex: its expression depth exceeds 10 ([serving] max_expression_depth); \
             write long OR chains as IN (...) or split the statement"
        );
        // Nested subqueries count too.
        let mut q = "SELECT 1".to_string();
        for _ in 0..6 {
            q = format!("SELECT * FROM ({q}) t");
        }
        assert!(parse_script_with(&q, &limits(6)).is_err());
        assert!(parse_script_with(&q, &limits(20)).is_ok());
        // EXPLAIN and COPY are checked through to their query.
        let e = parse_script_with(&format!("EXPLAIN {}", chain("OR", 50)), &limits(20));
        assert!(matches!(e, Err(SqlError::TooComplex { .. })));
        let e = parse_script_with(
            &format!("COPY ({}) TO 'x.csv'", chain("AND", 50)),
            &limits(20),
        );
        assert!(matches!(e, Err(SqlError::TooComplex { .. })));
        // So is an alert's condition.
        let e = parse_script_with(
            &format!("CREATE ALERT a AS {} WITH (key = 'x')", chain("+", 50)),
            &limits(20),
        );
        assert!(matches!(e, Err(SqlError::TooComplex { .. })), "{e:?}");
    }

    #[test]
    fn postgres_text_is_checked_and_syntax_left_to_the_real_parser() {
        let l = limits(50);
        assert!(l
            .check_postgres_text("SELECT 1::int; SHOW search_path")
            .is_ok());
        assert!(l.check_postgres_text("SELECT FROM WHERE )").is_ok());
        let e = l.check_postgres_text(&format!("SELECT 1; {}", chain("OR", 60)));
        assert!(matches!(e, Err(SqlError::TooComplex { max: 50 })), "{e:?}");
        let e = l.check_postgres_text(&"SELECT 1;".repeat(101));
        assert!(
            matches!(e, Err(SqlError::TooManyStatements { .. })),
            "{e:?}"
        );
    }

    #[test]
    fn size_and_statement_count_are_refused_before_parsing() {
        let sql = "SELECT 1;".repeat(101);
        let e = parse_script_with(&sql, &SqlLimits::DEFAULT).unwrap_err();
        assert!(
            matches!(
                e,
                SqlError::TooManyStatements {
                    count: 101,
                    max: 100
                }
            ),
            "{e}"
        );
        let big = format!("SELECT '{}'", "x".repeat(2 << 20));
        let e = parse_script_with(&big, &SqlLimits::DEFAULT).unwrap_err();
        assert!(
            matches!(e, SqlError::TooLarge { max, .. } if max == 1 << 20),
            "{e}"
        );
        // A script that is only separators or comments has no statement.
        for empty in [";", " ; ;; ", "-- nothing", "/* x */ ;"] {
            let e = parse_script_with(empty, &SqlLimits::DEFAULT).unwrap_err();
            assert!(matches!(e, SqlError::Empty), "{empty:?}: {e}");
        }
    }
}
