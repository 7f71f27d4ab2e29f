//! Hostile SQL against the serving path (`EngineHandle::query_with`, what
//! the HTTP API runs; pgwire checks the same limits on its own parser's
//! text, see tests/e2e_hostile.rs): deep and wide expressions, many
//! statements, huge results, long scripts. Every request is answered (rows
//! or a typed error); nothing overflows a stack or runs past its deadline,
//! and the engine keeps applying batches afterwards.

use std::{sync::Arc, time::Duration};

use datafusion::{
    arrow::datatypes::DataType,
    logical_expr::{create_udf, ColumnarValue, Volatility},
};
use proptest::prelude::*;
use storepulse_engine::{
    Ddl, Engine, EngineConfig, EngineError, EngineHandle, ErrorKind, QueryLimits, SqlLimits,
};
use storepulse_ingest::StreamKind;

const READ_ONLY: Ddl = Ddl::Refused("read-only test");

fn limits() -> QueryLimits {
    QueryLimits {
        timeout: Some(Duration::from_secs(20)),
        max_rows: Some(100_000),
        max_result_bytes: Some(64 << 20),
        sql: SqlLimits::DEFAULT,
        deadline: None,
    }
}

async fn engine(memory_limit: Option<usize>) -> EngineHandle {
    let mut e = Engine::new(EngineConfig {
        query_memory_limit: memory_limit,
        ..Default::default()
    })
    .unwrap();
    e.execute_sql(
        "CREATE MATERIALIZED VIEW per_device AS
         SELECT device_id, count(*) AS n FROM iot_readings GROUP BY device_id",
    )
    .await
    .unwrap();
    EngineHandle::new(e)
}

/// Applies `n` readings of new devices (batch `seq`).
async fn ingest(h: &EngineHandle, seq: u64, n: u64) {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let d = seq * 1000 + i;
            format!(
                r#"{{"event_id":"e{d}","ts":{},"store_id":"S1","device_id":"d{d}","metric":"fridge_temp_c","value":4.0}}"#,
                1_767_600_000_000i64 + d as i64
            )
        })
        .collect();
    let msg = storepulse_testkit::json_message(StreamKind::IotReadings, &lines, "p0", seq)
        .unwrap()
        .unwrap();
    h.lock().await.apply(msg, 0).await.unwrap();
}

async fn devices(h: &EngineHandle) -> i64 {
    let out = h
        .query_with("SELECT count(*) AS c FROM per_device", &limits(), READ_ONLY)
        .await
        .unwrap();
    let b = &out[0].batches[0];
    datafusion::arrow::array::cast::as_primitive_array::<datafusion::arrow::datatypes::Int64Type>(
        b.column(0),
    )
    .value(0)
}

fn chain(op: &str, n: usize) -> String {
    let mut s = String::from("SELECT 1");
    for _ in 1..n {
        s.push(' ');
        s.push_str(op);
        s.push_str(" 1");
    }
    s
}

#[tokio::test]
async fn deep_statements_are_refused_before_planning_and_the_engine_goes_on() {
    let h = engine(None).await;
    ingest(&h, 1, 10).await;
    let deep = [
        chain("+", 2_000),
        chain("+", 10_000),
        chain("+", 100_000),
        format!("SELECT count(*) FROM per_device WHERE {}", {
            let terms: Vec<String> = (0..5_000).map(|i| format!("n = {i}")).collect();
            terms.join(" OR ")
        }),
        format!(
            "SELECT 1 WHERE {}",
            chain("AND", 3_000).trim_start_matches("SELECT ")
        ),
    ];
    for sql in &deep {
        let e = h.query_with(sql, &limits(), READ_ONLY).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TooComplex, "{}...: {e}", &sql[..40]);
        assert!(
            e.to_string().contains("expression depth exceeds 1000"),
            "{e}"
        );
    }
    // Nesting that sqlparser itself bounds (CASE, parentheses, subqueries)
    // is a syntax error, not a crash.
    let mut case = "1".to_string();
    let mut subquery = "SELECT 1 AS x".to_string();
    let mut parens = "1".to_string();
    for _ in 0..300 {
        case = format!("CASE WHEN true THEN {case} ELSE 0 END");
        subquery = format!("SELECT x FROM ({subquery}) t");
        parens = format!("({parens})");
    }
    for sql in [
        format!("SELECT {case}"),
        subquery,
        format!("SELECT {parens}"),
        format!("SELECT {}1", "- ".repeat(5_000)),
        format!("SELECT {}true", "NOT ".repeat(5_000)),
    ] {
        let e = h.query_with(&sql, &limits(), READ_ONLY).await.unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::TooComplex | ErrorKind::User),
            "{}...: {e}",
            &sql[..30]
        );
    }
    // A deep but legal statement is answered.
    let out = h
        .query_with(&chain("+", 900), &limits(), READ_ONLY)
        .await
        .unwrap();
    assert_eq!(
        datafusion::arrow::util::display::array_value_to_string(out[0].batches[0].column(0), 0)
            .unwrap(),
        "900"
    );
    // The engine still applies batches and answers.
    ingest(&h, 2, 5).await;
    assert_eq!(devices(&h).await, 15);
}

#[tokio::test]
async fn size_statement_count_and_empty_requests_are_clear_errors() {
    let h = engine(None).await;
    let e = h
        .query_with(&"SELECT 1;".repeat(101), &limits(), READ_ONLY)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooComplex);
    assert!(
        e.to_string().contains("101 in one request exceed 100"),
        "{e}"
    );
    let big = format!("SELECT '{}'", "x".repeat(2 << 20));
    let e = h.query_with(&big, &limits(), READ_ONLY).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooComplex);
    assert!(e.to_string().contains("max_sql_bytes"), "{e}");
    for empty in [";", "-- only a comment", " ;; /* x */ "] {
        let e = h.query_with(empty, &limits(), READ_ONLY).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::User, "{empty:?}: {e}");
        assert!(e.to_string().contains("no SQL statement"), "{e}");
    }
    // A higher cap lets a longer script run (splitting is one tokenizer
    // pass: sql/src/parse.rs has the 16,000-statement case).
    let script = "SELECT 1 AS alert;".repeat(300);
    let mut many = limits();
    many.sql.max_statements = 300;
    let out = h.query_with(&script, &many, READ_ONLY).await.unwrap();
    assert_eq!(out.len(), 300);
}

#[tokio::test]
async fn create_alert_at_run_time_is_refused_with_where_rules_go() {
    let h = engine(None).await;
    let e = h
        .query_with(
            "CREATE ALERT hot AS SELECT device_id FROM per_device WHERE n > 1 WITH (key = 'device_id')",
            &limits(),
            Ddl::Allowed,
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::User);
    assert!(
        e.to_string().contains("configured at start") && e.to_string().contains("hot"),
        "{e}"
    );
    assert!(h.lock().await.alerts().is_empty());
}

/// `sleep_ms(x)`: sleeps x ms per batch, returns x (a statement of known
/// duration, to test the one deadline of a script).
fn register_sleep(h: &EngineHandle) {
    let sleep = create_udf(
        "sleep_ms",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Volatile,
        Arc::new(|args: &[ColumnarValue]| {
            if let ColumnarValue::Scalar(datafusion::common::ScalarValue::Int64(Some(ms))) =
                &args[0]
            {
                std::thread::sleep(Duration::from_millis(*ms as u64));
            }
            Ok(args[0].clone())
        }),
    );
    h.serving_context().register_udf(sleep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_deadline_covers_every_statement_of_a_request() {
    let h = engine(None).await;
    register_sleep(&h);
    let l = QueryLimits {
        timeout: Some(Duration::from_millis(1000)),
        ..limits()
    };
    // Each statement alone fits the timeout ...
    h.query_with("SELECT sleep_ms(300)", &l, READ_ONLY)
        .await
        .unwrap();
    // ... five of them in one request do not.
    let e = h
        .query_with(&"SELECT sleep_ms(300);".repeat(5), &l, READ_ONLY)
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::Timeout(_)), "{e}");
}

#[tokio::test]
async fn results_are_bounded_by_bytes_and_by_the_memory_pool_which_gets_its_memory_back() {
    let h = engine(Some(64 << 20)).await;
    let pool = h.serving_context().runtime_env().memory_pool.clone();
    let huge = "SELECT repeat('x', 1000000) AS s FROM generate_series(1, 150)";
    // 150 MB of rows: over the 32 MiB result limit ...
    let l = QueryLimits {
        max_result_bytes: Some(32 << 20),
        ..limits()
    };
    let e = h.query_with(huge, &l, READ_ONLY).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResultLimit, "{e}");
    assert!(e.to_string().contains("max_result_bytes"), "{e}");
    // ... and, without it, over the 64 MiB pool that holds results.
    let l = QueryLimits {
        max_result_bytes: None,
        ..limits()
    };
    let e = h.query_with(huge, &l, READ_ONLY).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::MemoryLimit, "{e}");
    assert_eq!(pool.reserved(), 0, "a failed query gives its memory back");
    // A result that fits is held in the pool until it is dropped.
    let out = h
        .query_with(
            "SELECT repeat('x', 1000000) AS s FROM generate_series(1, 10)",
            &l,
            READ_ONLY,
        )
        .await
        .unwrap();
    assert!(pool.reserved() >= 10_000_000, "{}", pool.reserved());
    drop(out);
    assert_eq!(pool.reserved(), 0);
}

/// SQL-ish text: tokens glued at random (what a fuzzer would send).
fn token_soup() -> impl Strategy<Value = String> {
    let token = prop::sample::select(vec![
        "SELECT",
        "FROM",
        "WHERE",
        "(",
        ")",
        ",",
        ";",
        "1",
        "'x'",
        "n",
        "device_id",
        "per_device",
        "+",
        "-",
        "*",
        "/",
        "=",
        "AND",
        "OR",
        "NOT",
        "CASE",
        "WHEN",
        "THEN",
        "END",
        "ELSE",
        "IN",
        "EXISTS",
        "GROUP BY",
        "ORDER BY",
        "LIMIT",
        "UNION ALL",
        "AS",
        "CREATE",
        "ALERT",
        "VIEW",
        "MATERIALIZED",
        "WITH",
        "::int",
        "--",
        "/*",
        "*/",
        "\n",
        "generate_series(1, 3)",
        "count(*)",
        "NULL",
        "ARRAY[",
        "]",
        "$1",
        "\"q\"",
    ]);
    prop::collection::vec(token, 0..80).prop_map(|t| t.join(" "))
}

/// Deep and wide expressions: `depth` levels of `op`-chains or nesting,
/// `width` terms per level.
fn deep_and_wide() -> impl Strategy<Value = (String, usize)> {
    (
        1usize..3_000,
        1usize..40,
        prop::sample::select(vec!["+", "OR", "AND", "*", "||", "nest", "case", "in"]),
    )
        .prop_map(|(depth, width, op)| {
            let sql = match op {
                "nest" => {
                    let mut e = "1".to_string();
                    for _ in 0..depth.min(200) {
                        e = format!("({e} + {})", vec!["1"; width].join(" + "));
                    }
                    format!("SELECT {e}")
                }
                "case" => {
                    let mut e = "1".to_string();
                    for _ in 0..depth.min(200) {
                        e = format!("CASE WHEN n > {width} THEN {e} ELSE 0 END");
                    }
                    format!("SELECT {e} FROM per_device")
                }
                "in" => format!(
                    "SELECT count(*) FROM per_device WHERE n IN ({})",
                    (0..(depth * width).min(20_000))
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                op => chain(op, depth),
            };
            (sql, depth)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_text_is_answered_or_refused_with_a_typed_error(sql in token_soup()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let h = engine(None).await;
            if let Err(e) = h.query_with(&sql, &limits(), READ_ONLY).await {
                // Whatever DataFusion thinks of the text, the request ends
                // with its error; a panic on a SQL thread would be Internal.
                prop_assert!(!matches!(e, EngineError::Internal(_)), "{sql}: {e}");
            }
            Ok(())
        })?;
    }

    #[test]
    fn deep_and_wide_expressions_never_crash((sql, depth) in deep_and_wide()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let h = engine(None).await;
            match h.query_with(&sql, &limits(), READ_ONLY).await {
                Ok(_) => {}
                Err(e) => {
                    prop_assert!(
                        matches!(e.kind(), ErrorKind::TooComplex | ErrorKind::User | ErrorKind::ResultLimit),
                        "depth {depth}: {}: {e}", &sql[..sql.len().min(60)]
                    );
                    if e.kind() == ErrorKind::TooComplex {
                        prop_assert!(depth > 500, "refused a shallow statement: {e}");
                    }
                }
            }
            Ok(())
        })?;
    }
}
