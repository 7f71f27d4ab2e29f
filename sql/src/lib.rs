//! storepulse's SQL surface on top of DataFusion's dialect.
//!
//! * [`parse`] — splits a script into statements and recognises the
//!   statements storepulse adds or treats specially
//!   (`CREATE MATERIALIZED VIEW`, `CREATE VIEW`), with errors that point at
//!   the line and column.
//! * [`udf`] — window functions usable in `GROUP BY`: `tumble` and `hop`
//!   (`date_bin` is a tumbling window too).
//! * [`builtin`] — the starter views shipped with the binary (`views/*.sql`).

pub mod builtin;
pub mod parse;
pub mod udf;

pub use parse::{parse_script, SqlError, Statement};
