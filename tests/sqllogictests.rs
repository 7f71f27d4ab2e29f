//! Runs the `.slt` files under `sql/slt/` against an embedded engine.
//!
//! Besides SQL, the harness understands two commands so that files can feed
//! events:
//!
//! ```text
//! statement ok
//! INGEST sales [partition]
//! {"event_id": "...", ...}
//! {"event_id": "...", ...}
//!
//! statement ok
//! FINISH
//! ```
//!
//! `INGEST` decodes the JSON lines as one micro-batch of the stream (a bad
//! line fails the statement with its dead-letter reason; the statement's
//! count is the number of events accepted), `FINISH` ends every partition
//! so all windows close. `DIMENSION <table>` loads the CSV that follows,
//! `BUILTIN` creates the shipped views, and `STATE_TTL <view> <duration>`
//! (before anything else) restarts the engine with that `[engine]
//! state_ttl`.
//!
//! Regenerate expected results with
//! `cargo test --test sqllogictests -- --complete`.

use std::{path::PathBuf, sync::Arc};

use async_trait::async_trait;
use datafusion::arrow::{
    array::RecordBatch,
    datatypes::DataType,
    util::display::{ArrayFormatter, FormatOptions},
};
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType};
use storepulse_engine::{Engine, EngineConfig};
use storepulse_ingest::{
    source::Position, EventDecoder, RawRecord, SourceBatch, SourceMessage, StreamKind,
};

#[derive(Debug)]
struct DbError(String);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for DbError {}

struct Db {
    engine: Engine,
    cfg: EngineConfig,
    partitions: Vec<(StreamKind, Arc<str>)>,
    line: u64,
}

fn column_type(t: &DataType) -> DefaultColumnType {
    match t {
        t if t.is_integer() => DefaultColumnType::Integer,
        DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Decimal128(..) => {
            DefaultColumnType::FloatingPoint
        }
        _ => DefaultColumnType::Text,
    }
}

fn rows(batches: &[RecordBatch]) -> Result<Vec<Vec<String>>, DbError> {
    let opts = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for b in batches {
        let fmts = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DbError(e.to_string()))?;
        for r in 0..b.num_rows() {
            out.push(fmts.iter().map(|f| f.value(r).to_string()).collect());
        }
    }
    Ok(out)
}

impl Db {
    async fn ingest(&mut self, header: &str, body: &str) -> Result<u64, DbError> {
        let mut parts = header.split_whitespace();
        let stream: StreamKind = parts
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|e: storepulse_ingest::IngestError| DbError(e.to_string()))?;
        let partition: Arc<str> = parts.next().unwrap_or("slt").into();
        if !self.partitions.contains(&(stream, partition.clone())) {
            self.partitions.push((stream, partition.clone()));
        }
        let lines: Vec<&str> = body.lines().filter(|l| !l.trim().is_empty()).collect();
        let records: Vec<RawRecord<'_>> = lines
            .iter()
            .map(|l| {
                self.line += 1;
                RawRecord {
                    bytes: l.as_bytes(),
                    position: self.line,
                }
            })
            .collect();
        let out = EventDecoder::new(stream, partition.clone())
            .decode(&records)
            .map_err(|e| DbError(e.to_string()))?;
        if let Some(d) = out.dead_letters.first() {
            return Err(DbError(format!("dead letter: {}", d.reason)));
        }
        let Some(batch) = out.batch else { return Ok(0) };
        let report = self
            .engine
            .apply(
                SourceMessage::Batch(SourceBatch {
                    stream,
                    batch,
                    events: out.events,
                    bytes: 0,
                    position: Position {
                        partition,
                        next_offset: self.line + 1,
                    },
                }),
                0,
            )
            .await
            .map_err(|e| DbError(e.to_string()))?;
        Ok(report.accepted)
    }
}

#[async_trait]
impl AsyncDB for Db {
    type Error = DbError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, DbError> {
        let trimmed = sql.trim();
        if let Some(rest) = trimmed.strip_prefix("INGEST ") {
            let (header, body) = rest.split_once('\n').unwrap_or((rest, ""));
            return Ok(DBOutput::StatementComplete(
                self.ingest(header, body).await?,
            ));
        }
        if let Some(rest) = trimmed.strip_prefix("DIMENSION ") {
            // DIMENSION <table>\n<csv with header>: loaded like a configured
            // dimension file (same validation and errors).
            let (name, body) = rest.split_once('\n').unwrap_or((rest, ""));
            let dir = tempfile::tempdir().map_err(|e| DbError(e.to_string()))?;
            let path = dir.path().join(format!("{}.csv", name.trim()));
            std::fs::write(&path, body).map_err(|e| DbError(e.to_string()))?;
            let source = storepulse_engine::DimensionSource {
                table: name.trim().to_string(),
                location: path.display().to_string(),
            };
            let (schema, batches) = source.load().await.map_err(|e| DbError(e.to_string()))?;
            let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
            self.engine
                .register_dimension(name.trim(), batches, schema)
                .map_err(|e| DbError(e.to_string()))?;
            return Ok(DBOutput::StatementComplete(rows));
        }
        if trimmed == "BUILTIN" {
            // The shipped views (starter.sql, retail.sql) with default parameters.
            let scripts = storepulse_sql::builtin::scripts(&Default::default())
                .map_err(|e| DbError(e.to_string()))?;
            for (file, sql) in scripts {
                self.engine
                    .execute_sql(&sql)
                    .await
                    .map_err(|e| DbError(format!("{file}: {e}")))?;
            }
            return Ok(DBOutput::StatementComplete(0));
        }
        if let Some(rest) = trimmed.strip_prefix("STATE_TTL ") {
            // STATE_TTL <view> <duration>: `[engine] state_ttl` for a view
            // created later in the file; the engine starts over with it.
            let (view, ttl) = rest.trim().split_once(' ').unwrap_or((rest, ""));
            let ttl = humantime::parse_duration(ttl.trim()).map_err(|e| DbError(e.to_string()))?;
            self.cfg.state_ttl.insert(view.to_string(), ttl.into());
            self.engine = Engine::new(self.cfg.clone()).map_err(|e| DbError(e.to_string()))?;
            return Ok(DBOutput::StatementComplete(0));
        }
        if trimmed == "FINISH" {
            for (stream, partition) in self.partitions.clone() {
                self.engine
                    .apply(SourceMessage::EndOfPartition { stream, partition }, 0)
                    .await
                    .map_err(|e| DbError(e.to_string()))?;
            }
            return Ok(DBOutput::StatementComplete(0));
        }
        let mut outs = self
            .engine
            .execute_sql(sql)
            .await
            .map_err(|e| DbError(e.to_string()))?;
        let out = outs.pop().ok_or_else(|| DbError("no statement".into()))?;
        if out.schema.fields().is_empty() {
            return Ok(DBOutput::StatementComplete(0));
        }
        Ok(DBOutput::Rows {
            types: out
                .schema
                .fields()
                .iter()
                .map(|f| column_type(f.data_type()))
                .collect(),
            rows: rows(&out.batches)?,
        })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "storepulse"
    }
}

fn new_db() -> Result<Db, DbError> {
    let cfg = EngineConfig {
        idle_timeout: std::time::Duration::from_secs(3600),
        ..Default::default()
    };
    Ok(Db {
        engine: Engine::new(cfg.clone()).map_err(|e| DbError(e.to_string()))?,
        cfg,
        partitions: Vec::new(),
        line: 0,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let complete = std::env::args().any(|a| a == "--complete");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sql/slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("sql/slt exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    let (mut passed, mut failed) = (0, 0);
    for f in &files {
        let mut runner = sqllogictest::Runner::new(|| async { new_db() });
        let result = if complete {
            runner
                .update_test_file(
                    f,
                    " ",
                    sqllogictest::default_validator,
                    sqllogictest::default_normalizer,
                    sqllogictest::default_column_validator,
                )
                .await
                .map_err(|e| e.to_string())
        } else {
            runner.run_file_async(f).await.map_err(|e| e.to_string())
        };
        match result {
            Ok(()) => {
                passed += 1;
                println!("ok   {}", f.display());
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {}\n{e}", f.display());
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    assert!(
        !files.is_empty(),
        "no .slt files found in {}",
        dir.display()
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
