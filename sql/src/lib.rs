//! storepulse's SQL surface on top of DataFusion's dialect.
//!
//! * [`parse`] — splits a script into statements and recognises the
//!   statements storepulse adds or treats specially
//!   (`CREATE MATERIALIZED VIEW`, `CREATE VIEW`), with errors that point at
//!   the line and column.
//! * [`alert`] — the typed options of an alert rule, from `CREATE ALERT
//!   ... WITH (...)` or from the config file.
//! * [`guard`] — limits on clients' SQL (size, statements, expression
//!   depth), checked while parsing, before anything plans it.
//! * [`udf`] — window functions usable in `GROUP BY`: `tumble` and `hop`
//!   (`date_bin` is a tumbling window too), `session`.
//! * [`ledger`], [`velocity`] — the order-independent aggregates the retail
//!   views are built from (`stock_ledger`, `stock_days`, `decayed_sum`,
//!   `hourly_units`), on the small kernel framework in `agg`; `kernels`
//!   is their one registry (registered as UDAFs, read in place by the
//!   engine).
//! * `distinct` — `count(DISTINCT x)` for every group of a view in one
//!   hash table (DataFusion keeps a hash set per group for strings).
//! * [`retail`] — scalar functions of the retail views (demand model,
//!   decayed rates, `watermark_floor()`).
//! * [`rank`] — `quintile_score(value, tiebreak) OVER ()`, the RFM
//!   quintiles in linear time.
//! * [`builtin`] — the views shipped with the binary (`views/*.sql`) and
//!   their parameters.

mod agg;
pub mod alert;
pub mod builtin;
mod distinct;
pub mod guard;
mod kernels;
pub mod ledger;
pub mod parse;
pub mod rank;
pub mod retail;
pub mod udf;
pub mod velocity;

use datafusion::prelude::SessionContext;

pub use agg::ReadableGroups;
pub use builtin::RetailParams;
pub use guard::SqlLimits;
pub use kernels::{aggregate_functions, readable_groups_accumulator};
pub use parse::{parse_script, parse_script_with, SqlError, Statement};

/// Registers every storepulse function in `ctx`; `watermark_floor()` is
/// registered returning `NULL` (an engine registers its own over it).
pub fn register(ctx: &SessionContext) {
    for f in udf::all().into_iter().chain(retail::scalar_functions()) {
        ctx.register_udf(f);
    }
    ctx.register_udf(retail::FloorCell::default().udf());
    for f in aggregate_functions() {
        ctx.register_udaf(f);
    }
    ctx.register_udwf(rank::quintile_score());
}
