//! Fuzzes the serving SQL path: arbitrary text goes through the same parse
//! → limits check → plan → execute path the HTTP API runs
//! (`EngineHandle::query_with`, read-only, under the default limits), and
//! through the Postgres-dialect check pgwire runs before
//! `datafusion-postgres` parses. Every input must end in rows or a typed
//! error: no panic, no stack overflow (a crash of the process), no
//! `Internal` error (a panic on a SQL thread).
#![no_main]

use std::{sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use storepulse_engine::{
    sqlrt::on_sql_thread, Ddl, Engine, EngineConfig, EngineError, EngineHandle, QueryLimits,
    SqlLimits,
};

fn engine() -> &'static (tokio::runtime::Runtime, EngineHandle) {
    static E: OnceLock<(tokio::runtime::Runtime, EngineHandle)> = OnceLock::new();
    E.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let h = rt.block_on(async {
            let mut e = Engine::new(EngineConfig {
                query_memory_limit: Some(256 << 20),
                ..Default::default()
            })
            .unwrap();
            e.execute_sql(
                "CREATE MATERIALIZED VIEW per_device AS \
                 SELECT device_id, count(*) AS n FROM iot_readings GROUP BY device_id",
            )
            .await
            .unwrap();
            EngineHandle::new(e)
        });
        (rt, h)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let (rt, h) = engine();
    let limits = QueryLimits {
        timeout: Some(Duration::from_secs(5)),
        max_rows: Some(10_000),
        max_result_bytes: Some(16 << 20),
        sql: SqlLimits::DEFAULT,
        deadline: None,
    };
    rt.block_on(async {
        if let Err(e) = h.query_with(sql, &limits, Ddl::Refused("fuzz")).await {
            assert!(!matches!(e, EngineError::Internal(_)), "{sql:?}: {e}");
        }
        let text = sql.to_string();
        on_sql_thread(async move { SqlLimits::DEFAULT.check_postgres_text(&text) })
            .await
            .expect("the pgwire check does not panic")
            .ok();
    });
});
