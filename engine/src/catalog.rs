//! The run-time catalog: view DDL accepted at run time (`CREATE [MATERIALIZED]
//! VIEW`, `DROP VIEW` by the admin over HTTP) is appended, in order, to
//! `<data_dir>/catalog.sql`, and replayed at the next start after the
//! configured scripts, before the checkpoint is restored. So a view created
//! at run time comes back with its definition (and, for a materialized
//! view, the checkpoint then restores its state) instead of making the next
//! start fail. The file is plain SQL a person can read and edit.

use std::{
    fs::OpenOptions,
    io::Write,
    path::{Path, PathBuf},
};

use crate::{EngineError, Result};

/// File name of the catalog under the data dir.
pub const CATALOG_FILE: &str = "catalog.sql";

/// The catalog file of `data_dir`.
pub fn catalog_path(data_dir: &Path) -> PathBuf {
    data_dir.join(CATALOG_FILE)
}

/// Appends one statement (terminated, on its own lines) and syncs it.
pub(crate) fn append(data_dir: &Path, sql: &str) -> Result<()> {
    let path = catalog_path(data_dir);
    let io = |e: std::io::Error| {
        EngineError::Checkpoint(format!("run-time catalog {}: {e}", path.display()))
    };
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io)?;
    let stmt = sql.trim().trim_end_matches(';').trim_end();
    writeln!(f, "{stmt};\n").map_err(io)?;
    f.sync_data().map_err(io)
}

/// The catalog's statements (empty if there is none).
pub fn read(data_dir: &Path) -> Result<Option<String>> {
    let path = catalog_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::Checkpoint(format!(
            "run-time catalog {}: {e}",
            path.display()
        ))),
    }
}
