//! Statement parsing: DataFusion's parser plus storepulse's classification
//! and its own statement, `CREATE ALERT name AS query WITH (option = 'value',
//! ...)` (see [`AlertStatement`]).

use datafusion::sql::{
    parser::{DFParserBuilder, Statement as DFStatement},
    sqlparser::{
        ast::{ObjectName, Query, Statement as SqlStatement},
        dialect::GenericDialect,
        parser::Parser,
        tokenizer::{Location, Token, TokenWithSpan, Tokenizer},
    },
};

use crate::guard::SqlLimits;

/// A SQL error found before planning (syntax, unsupported statement).
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The text does not parse; the message names line and column.
    #[error("SQL syntax error: {0}")]
    Syntax(String),
    /// The statement parses but is not accepted here.
    #[error("{0}")]
    Unsupported(String),
    /// The SQL text is longer than `[serving] max_sql_bytes`.
    #[error("statement too large: {bytes} bytes of SQL exceed {max} ([serving] max_sql_bytes)")]
    TooLarge {
        /// The text's length.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The request holds more statements than `[serving] max_statements`.
    #[error("too many statements: {count} in one request exceed {max} ([serving] max_statements); send them separately")]
    TooManyStatements {
        /// Statements in the request.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A statement's expression tree is deeper than `[serving]
    /// max_expression_depth` (refused before planning).
    #[error("statement too complex: its expression depth exceeds {max} ([serving] max_expression_depth); write long OR chains as IN (...) or split the statement")]
    TooComplex {
        /// The limit.
        max: usize,
    },
    /// The text holds no statement (only `;`, blanks or comments).
    #[error("no SQL statement in the request (only separators, blanks or comments)")]
    Empty,
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
    /// `CREATE ALERT name AS query WITH (...)`.
    CreateAlert(AlertStatement),
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

/// An alert rule as written: `CREATE ALERT name AS query WITH (...)`.
#[derive(Debug, Clone)]
pub struct AlertStatement {
    /// Rule name.
    pub name: String,
    /// The condition: every row it returns is an alert for its key.
    pub query: Box<Query>,
    /// The query's text.
    pub query_sql: String,
    /// The `WITH` options in order: (name, value, 1-based line, column).
    pub options: Vec<(String, String, u64, u64)>,
    /// 1-based line of the statement.
    pub line: u64,
}

/// Parses a script of `;`-separated statements (the operator's own SQL:
/// no limits). An empty script has no statements.
pub fn parse_script(sql: &str) -> Result<Vec<Statement>, SqlError> {
    parse(sql, &SqlLimits::NONE)
}

/// Parses a client's script within `limits`: its size is checked before
/// tokenizing, the number of statements before parsing them, each
/// statement's expression depth right after parsing it (before anything
/// plans or prints it). A script without a statement (only `;` or
/// comments) is [`SqlError::Empty`].
///
/// Linear in the text: one tokenizer pass, and each statement is parsed
/// from its own tokens (which keep their line and column for errors).
pub fn parse_script_with(sql: &str, limits: &SqlLimits) -> Result<Vec<Statement>, SqlError> {
    let out = parse(sql, limits)?;
    if out.is_empty() {
        return Err(SqlError::Empty);
    }
    Ok(out)
}

fn parse(sql: &str, limits: &SqlLimits) -> Result<Vec<Statement>, SqlError> {
    limits.check_size(sql)?;
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|e| SqlError::Syntax(e.to_string()))?;
    let groups = split_statements(&tokens);
    limits.check_statements(groups.len())?;
    // Byte offsets of every statement's start and end, in one pass.
    let spans = byte_offsets(
        sql,
        groups
            .iter()
            .flat_map(|g| [g[0].span.start, g[g.len() - 1].span.end]),
    );
    let mut out = Vec::with_capacity(groups.len());
    for (i, group) in groups.into_iter().enumerate() {
        let text = &sql[spans[2 * i]..spans[2 * i + 1].max(spans[2 * i])];
        let is_alert = matches!((&group[0].token, group.iter().skip(1).find(|t| !matches!(t.token, Token::Whitespace(_))).map(|t| &t.token)),
            (Token::Word(a), Some(Token::Word(b)))
                if a.value.eq_ignore_ascii_case("CREATE") && b.value.eq_ignore_ascii_case("ALERT"));
        if is_alert {
            let alert = parse_alert(text, group[0].span.start, &dialect, group)?;
            limits.check_query_depth(&alert.query)?;
            out.push(Statement::CreateAlert(alert));
        } else {
            let statements = DFParserBuilder::new(group.to_vec())
                .with_dialect(&dialect)
                .build()
                .and_then(|mut p| p.parse_statements())
                .map_err(|e| {
                    SqlError::Syntax(e.to_string().trim_start_matches("SQL error: ").to_string())
                })?;
            for s in statements {
                limits.check_depth(&s)?;
                out.push(classify(s, text));
            }
        }
    }
    Ok(out)
}

/// Each statement's tokens (split at `;`), without blanks at either end;
/// statements with no token but blanks and comments are left out.
pub(crate) fn split_statements(tokens: &[TokenWithSpan]) -> Vec<&[TokenWithSpan]> {
    let significant = |t: &TokenWithSpan| !matches!(t.token, Token::Whitespace(_) | Token::EOF);
    tokens
        .split(|t| t.token == Token::SemiColon)
        .filter_map(|group| {
            let a = group.iter().position(significant)?;
            let b = group.iter().rposition(significant)?;
            Some(&group[a..=b])
        })
        .collect()
}

/// Byte offsets in `sql` of `locations` (1-based line and column, the
/// column in characters), which must be in ascending order: one pass over
/// the text for all of them.
fn byte_offsets(sql: &str, locations: impl Iterator<Item = Location>) -> Vec<usize> {
    let mut out = Vec::new();
    let mut chars = sql.char_indices().peekable();
    let (mut line, mut col) = (1u64, 1u64);
    for at in locations {
        loop {
            let Some(&(i, c)) = chars.peek() else {
                out.push(sql.len());
                break;
            };
            if (line, col) >= (at.line, at.column) {
                out.push(i);
                break;
            }
            chars.next();
            if c == '\n' {
                line += 1;
                col = 1;
            } else {
                col += 1;
            }
        }
    }
    out
}

fn syntax(e: impl std::fmt::Display) -> SqlError {
    SqlError::Syntax(
        e.to_string()
            .trim_start_matches("sql parser error: ")
            .to_string(),
    )
}

/// Index of the statement's trailing top-level `WITH (...)` (the options),
/// or the end if there is none.
fn options_start(tokens: &[TokenWithSpan]) -> usize {
    let significant: Vec<usize> = (0..tokens.len())
        .filter(|&i| !matches!(tokens[i].token, Token::Whitespace(_) | Token::EOF))
        .collect();
    let mut depth = 0i32;
    let mut found = tokens.len();
    for (n, &i) in significant.iter().enumerate() {
        match &tokens[i].token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            Token::Word(w)
                if depth == 0
                    && w.value.eq_ignore_ascii_case("WITH")
                    && significant
                        .get(n + 1)
                        .is_some_and(|&j| tokens[j].token == Token::LParen) =>
            {
                found = i;
            }
            _ => {}
        }
    }
    // Only a WITH whose parenthesis closes the statement is the options.
    if found < tokens.len() {
        let mut d = 0i32;
        let last = significant.last().copied().unwrap_or(0);
        for &i in significant.iter().filter(|&&i| i > found) {
            match tokens[i].token {
                Token::LParen => d += 1,
                Token::RParen => {
                    d -= 1;
                    if d == 0 && i != last {
                        return tokens.len();
                    }
                }
                _ => {}
            }
        }
    }
    found
}

/// Errors unless `p` is at the end of alert `name`'s statement.
fn expect_end(p: &Parser<'_>, name: &ObjectName) -> Result<(), SqlError> {
    let rest = p.peek_token();
    if matches!(rest.token, Token::EOF) {
        return Ok(());
    }
    Err(SqlError::Syntax(format!(
        "CREATE ALERT {}: unexpected {} at Line: {}, Column: {} (expected WITH (...) or the end of the statement)",
        object_name(name),
        rest.token,
        rest.span.start.line,
        rest.span.start.column
    )))
}

/// `CREATE ALERT name AS query WITH (name = 'value', ...)`.
fn parse_alert(
    text: &str,
    text_start: Location,
    dialect: &GenericDialect,
    tokens: &[TokenWithSpan],
) -> Result<AlertStatement, SqlError> {
    // The trailing `WITH (...)` is split off first: inside the query the
    // parser would read `GROUP BY x WITH (` as a GROUP BY modifier.
    let split = options_start(tokens);
    let mut p = Parser::new(dialect).with_tokens_with_locations(tokens[..split].to_vec());
    let line = p.peek_token().span.start.line;
    p.next_token(); // CREATE
    p.next_token(); // ALERT
    let name = p.parse_object_name(false).map_err(syntax)?;
    p.expect_keyword(datafusion::sql::sqlparser::keywords::Keyword::AS)
        .map_err(syntax)?;
    let q_start = p.peek_token().span.start;
    let query = p.parse_query().map_err(syntax)?;
    let q_end = match tokens.get(split) {
        Some(t) => t.span.start,
        None => tokens
            .iter()
            .rev()
            .find(|t| !matches!(t.token, Token::Whitespace(_) | Token::EOF))
            .map_or(q_start, |t| t.span.end),
    };
    let at = byte_offsets(
        text,
        [relative(text_start, q_start), relative(text_start, q_end)].into_iter(),
    );
    let query_sql = text[at[0]..at[1].max(at[0])].trim().to_string();
    expect_end(&p, &name)?;
    let mut p = Parser::new(dialect).with_tokens_with_locations(tokens[split..].to_vec());
    let mut options = Vec::new();
    if p.parse_keyword(datafusion::sql::sqlparser::keywords::Keyword::WITH) {
        p.expect_token(&Token::LParen).map_err(syntax)?;
        loop {
            let at = p.peek_token().span.start;
            let key = p.parse_identifier().map_err(syntax)?;
            p.expect_token(&Token::Eq).map_err(syntax)?;
            let value = match p.next_token().token {
                Token::SingleQuotedString(v) | Token::Number(v, _) => v,
                Token::Word(w) => w.value,
                other => {
                    return Err(SqlError::Syntax(format!(
                        "CREATE ALERT {}: option '{}' at Line: {}, Column: {}: expected a quoted value, found {other}",
                        object_name(&name), key.value, at.line, at.column
                    )))
                }
            };
            options.push((key.value.to_lowercase(), value, at.line, at.column));
            if p.consume_token(&Token::RParen) {
                break;
            }
            p.expect_token(&Token::Comma).map_err(syntax)?;
        }
    }
    expect_end(&p, &name)?;
    Ok(AlertStatement {
        name: object_name(&name),
        query,
        query_sql,
        options,
        line,
    })
}

/// Where `at` lies in a text that starts at `start` of the script.
fn relative(start: Location, at: Location) -> Location {
    if at.line == start.line {
        Location::new(1, at.column.saturating_sub(start.column) + 1)
    } else {
        Location::new(at.line - start.line + 1, at.column)
    }
}

/// storepulse's view of a DataFusion statement (`text`: as written).
fn classify(s: DFStatement, text: &str) -> Statement {
    match s {
        DFStatement::Statement(inner) => match *inner {
            SqlStatement::CreateView(v) if v.materialized => Statement::CreateMaterializedView {
                name: object_name(&v.name),
                sql: v.to_string(),
                query: v.query,
                or_replace: v.or_replace,
                if_not_exists: v.if_not_exists,
            },
            other => Statement::DataFusion {
                sql: text.to_string(),
                statement: Box::new(DFStatement::Statement(Box::new(other))),
            },
        },
        other => Statement::DataFusion {
            sql: text.to_string(),
            statement: Box::new(other),
        },
    }
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
    fn alerts_are_parsed_with_their_options() {
        let s = parse_script(
            "CREATE VIEW a AS SELECT 1 AS x;\n\
             CREATE ALERT low_stock AS SELECT store_id, sku FROM stockout_risk WHERE p_stockout > 0.8\n\
             WITH (key = 'store_id, sku', every = '10s', severity = 'warning');\n\
             SELECT 2",
        )
        .unwrap();
        assert_eq!(s.len(), 3);
        let Statement::CreateAlert(a) = &s[1] else {
            panic!("{:?}", s[1]);
        };
        assert_eq!(a.name, "low_stock");
        assert_eq!(a.line, 2);
        assert_eq!(
            a.query_sql,
            "SELECT store_id, sku FROM stockout_risk WHERE p_stockout > 0.8"
        );
        let names: Vec<_> = a
            .options
            .iter()
            .map(|o| (o.0.as_str(), o.1.as_str(), o.2))
            .collect();
        assert_eq!(
            names,
            vec![
                ("key", "store_id, sku", 3),
                ("every", "10s", 3),
                ("severity", "warning", 3)
            ]
        );
        // A syntax error after an alert keeps its own line number.
        let e = parse_script("CREATE ALERT a AS SELECT 1;\nSELECT FROM WHERE )")
            .unwrap_err()
            .to_string();
        assert!(e.contains("Line: 2"), "{e}");
        let e = parse_script("CREATE ALERT a AS SELECT 1 WITH (every = '1s' extra)")
            .unwrap_err()
            .to_string();
        assert!(e.contains("Column"), "{e}");
    }

    #[test]
    fn long_scripts_are_split_in_one_pass() {
        // Each statement mentions "alert": that used to re-tokenize and
        // re-scan the script per statement (66 s of CPU for 16,000).
        let script = "SELECT 1 AS alert;\n".repeat(16_000);
        let s = parse_script(&script).unwrap();
        assert_eq!(s.len(), 16_000);
        let Statement::DataFusion { sql, .. } = &s[15_999] else {
            panic!("{:?}", s[15_999]);
        };
        assert_eq!(sql, "SELECT 1 AS alert");
        // Errors still name the script's line.
        let e = parse_script(&format!("{script}SELECT FROM WHERE )")).unwrap_err();
        assert!(e.to_string().contains("Line: 16001"), "{e}");
        // Alerts among them keep their text.
        let s = parse_script(&format!(
            "{}CREATE ALERT a AS SELECT 'é' AS x WITH (key = 'x'); SELECT 2",
            "SELECT 'ü';".repeat(3)
        ))
        .unwrap();
        let Statement::CreateAlert(a) = &s[3] else {
            panic!("{:?}", s[3]);
        };
        assert_eq!(a.query_sql, "SELECT 'é' AS x");
    }

    #[test]
    fn syntax_errors_point_at_the_position() {
        let e = parse_script("SELECT store_id FROM sales WHERE )")
            .unwrap_err()
            .to_string();
        assert!(e.contains("Line: 1, Column"), "{e}");
    }
}
