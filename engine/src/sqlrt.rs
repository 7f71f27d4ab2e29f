//! The SQL threads: where client SQL is parsed, checked and planned.
//!
//! Parsing, DataFusion's SQL-to-plan translation, its optimizers and
//! `Expr`'s derived `Clone`/`Drop` recurse over the expression tree. The
//! statement limits ([`storepulse_sql::SqlLimits`]) refuse trees deeper than
//! `max_expression_depth`, but the text still has to be parsed (and its tree
//! dropped) to know, and a legal statement near the limit still recurses a
//! thousand levels. That work runs here: two threads (`storepulse-sql`)
//! with [`STACK_BYTES`] stacks (address space; only the pages a deep
//! statement touches are ever committed), a Tokio runtime of their own so
//! planning can await catalog lookups. It also keeps CPU-heavy planning off
//! the async workers that serve connections, so one expensive statement
//! does not stall other clients' I/O.
//!
//! Small work stays where it is ([`on_sql_thread_if`]): text under
//! [`INLINE_SQL_BYTES`] cannot nest deeper than about half as many levels
//! (each level takes a token), which any thread's stack holds and which
//! plans in microseconds; a round trip to another runtime would cost more
//! than the work (its p99 is hundreds of µs on a busy 2-core machine:
//! BENCHMARKS.md, "Serving path checks").

use std::{future::Future, sync::OnceLock};

use tokio::runtime::Runtime;

use crate::{EngineError, Result};

/// Stack of each SQL thread: the deepest tree 1 MiB of SQL text can parse
/// into (`1+1+...`, ~500 K levels) is dropped in well under this.
pub const STACK_BYTES: usize = 512 << 20;

/// SQL text shorter than this is parsed and planned on the calling thread.
pub const INLINE_SQL_BYTES: usize = 1024;

/// Logical plans with more expression nodes than this are optimised and
/// turned into physical plans on a SQL thread.
pub const INLINE_PLAN_EXPRS: usize = 512;

/// Threads of the SQL runtime.
const THREADS: usize = 2;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(THREADS)
            .max_blocking_threads(THREADS)
            .thread_name("storepulse-sql")
            .thread_stack_size(STACK_BYTES)
            .enable_all()
            .build()
            .expect("cannot start the SQL threads")
    })
}

/// Runs `fut` on a SQL thread and waits for it (from any runtime). A panic
/// in it is an internal error of this query, not of the caller.
pub async fn on_sql_thread<F>(fut: F) -> Result<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    runtime().spawn(fut).await.map_err(|e| {
        tracing::error!(error = %e, "a SQL thread task failed");
        EngineError::Internal(format!("planning failed: {e}"))
    })
}

/// [`on_sql_thread`] when `offload`, else `fut` right here.
pub async fn on_sql_thread_if<F>(offload: bool, fut: F) -> Result<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    if offload {
        on_sql_thread(fut).await
    } else {
        Ok(fut.await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_the_sql_threads_with_their_stack() {
        let name = on_sql_thread(async { std::thread::current().name().map(str::to_string) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("storepulse-sql"));
        // 100 MiB of stack frames: far beyond a default thread's 2 MiB.
        fn deep(n: usize) -> usize {
            let pad = std::hint::black_box([n as u8; 1024]);
            if n == 0 {
                0
            } else {
                deep(n - 1) + pad[0] as usize % 2
            }
        }
        let r = on_sql_thread(async { deep(100_000) }).await.unwrap();
        assert!(r <= 100_000);
        let e = on_sql_thread(async { panic!("boom") }).await.unwrap_err();
        assert!(e.to_string().contains("planning failed"), "{e}");
    }
}
