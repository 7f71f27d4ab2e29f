//! The starter views shipped with the binary and loaded by `demo` (and by
//! `run` unless `sql.builtin = false`). They live as plain `.sql` files under
//! `sql/views/` so they can be read, copied and overridden.

/// `(file name, SQL text)` of every built-in view script, in load order.
pub const VIEWS: &[(&str, &str)] = &[("starter.sql", include_str!("../views/starter.sql"))];
