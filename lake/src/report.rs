//! Scheduled reports: `[[reports]]` queries run on a cron schedule (in a
//! time zone) or at a fixed interval, written as CSV, Parquet or XLSX to
//! `reports/<name>/date=YYYY-MM-DD/<name>-<local time>.<ext>`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use datafusion::{
    arrow::{
        array::{Array, AsArray, RecordBatch},
        compute::cast,
        datatypes::{DataType, Float64Type, Int64Type, SchemaRef, TimeUnit},
        util::display::{ArrayFormatter, FormatOptions},
    },
    logical_expr::LogicalPlan,
};
use parquet::{
    arrow::ArrowWriter,
    basic::{Compression, ZstdLevel},
    file::properties::WriterProperties,
};
use rust_xlsxwriter::{Format, Workbook};
use serde::Serialize;
use storepulse_engine::EngineHandle;
use tokio::sync::watch;

use crate::{
    config::{ReportConfig, ReportFormat},
    error::{LakeError, Result},
    schedule::Schedule,
    store::Lake,
};

/// XLSX's row limit (1,048,576 including the header row).
const XLSX_MAX_ROWS: usize = 1_048_575;

/// What one run wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ReportOutput {
    /// Report name.
    pub report: String,
    /// Path relative to the lake root.
    pub path: String,
    /// Rows written.
    pub rows: usize,
    /// File size.
    pub bytes: usize,
}

struct Report {
    cfg: ReportConfig,
    schedule: Schedule,
}

/// Runs the configured reports.
pub struct Reporter {
    lake: Lake,
    handle: EngineHandle,
    reports: BTreeMap<String, Report>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("reports", &self.reports.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Reporter {
    /// Checks every report (schedule, time zone, and that its SQL plans as
    /// a read-only query against the loaded catalog).
    pub async fn new(lake: Lake, handle: EngineHandle, reports: &[ReportConfig]) -> Result<Self> {
        let schedules = crate::config::validate_reports(reports)?;
        let mut out = BTreeMap::new();
        for ((i, r), schedule) in reports.iter().enumerate().zip(schedules) {
            let at = |m: String| LakeError::Config(format!("reports[{i}] ({}).sql: {m}", r.name));
            let plan = handle
                .serving_context()
                .state()
                .create_logical_plan(&r.sql)
                .await
                .map_err(|e| at(e.to_string()))?;
            if matches!(
                plan,
                LogicalPlan::Dml(_)
                    | LogicalPlan::Ddl(_)
                    | LogicalPlan::Copy(_)
                    | LogicalPlan::Statement(_)
            ) {
                return Err(at("must be a query (SELECT ...)".into()));
            }
            out.insert(
                r.name.clone(),
                Report {
                    cfg: r.clone(),
                    schedule,
                },
            );
        }
        Ok(Self {
            lake,
            handle,
            reports: out,
        })
    }

    /// Report names.
    pub fn names(&self) -> Vec<String> {
        self.reports.keys().cloned().collect()
    }

    /// Runs one report now and writes it (retrying the write for up to
    /// `timeout`).
    pub async fn run_one(&self, name: &str, timeout: Duration) -> Result<ReportOutput> {
        let r = self.reports.get(name).ok_or_else(|| LakeError::Report {
            report: name.to_string(),
            message: "no such report".into(),
        })?;
        let started = std::time::Instant::now();
        let fail = |message: String| LakeError::Report {
            report: name.to_string(),
            message,
        };
        let result: Result<ReportOutput> = async {
            let (out, _) = self.handle.query_at(&r.cfg.sql).await?;
            let rows: usize = out.batches.iter().map(|b| b.num_rows()).sum();
            let tz = r.schedule.tz();
            let now = Utc::now().with_timezone(&tz);
            let format = r.cfg.format;
            let (schema, batches) = (out.schema.clone(), out.batches);
            let bytes = tokio::task::spawn_blocking(move || encode(format, &schema, &batches, tz))
                .await
                .map_err(|e| fail(e.to_string()))?
                .map_err(fail)?;
            let rel = format!(
                "reports/{name}/date={}/{name}-{}.{}",
                now.format("%Y-%m-%d"),
                now.format("%Y%m%dT%H%M%S"),
                format.extension()
            );
            let size = bytes.len();
            let deadline = tokio::time::Instant::now() + timeout;
            self.lake
                .put_retrying(&self.lake.path(&rel), Bytes::from(bytes), Some(deadline))
                .await?;
            Ok(ReportOutput {
                report: name.to_string(),
                path: rel,
                rows,
                bytes: size,
            })
        }
        .await;
        match &result {
            Ok(o) => {
                self.lake
                    .status()
                    .reports
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                metrics::counter!(crate::metric_names::LAKE_REPORTS_TOTAL, "report" => name.to_string())
                    .increment(1);
                tracing::info!(report = name, path = %o.path, rows = o.rows, bytes = o.bytes, seconds = started.elapsed().as_secs_f64(), "report written");
            }
            Err(e) => {
                metrics::counter!(crate::metric_names::LAKE_REPORT_ERRORS_TOTAL, "report" => name.to_string())
                    .increment(1);
                tracing::error!(report = name, error = %e, "report failed");
            }
        }
        result
    }

    /// Runs reports as they fall due until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut next: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
        let now = Utc::now();
        for (name, r) in &self.reports {
            if let Some(t) = r.schedule.next_after(now) {
                tracing::info!(report = %name, next = %t.with_timezone(&r.schedule.tz()), "report scheduled");
                next.insert(name.clone(), t);
            }
        }
        loop {
            let Some((name, at)) = next
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(n, t)| (n.clone(), *t))
            else {
                return;
            };
            let wait = (at - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            let r = &self.reports[&name];
            let after = Utc::now().max(at);
            match r.schedule.next_after(after) {
                Some(t) => next.insert(name.clone(), t),
                None => next.remove(&name),
            };
            let timeout = match &r.schedule {
                Schedule::Every(d, _) => (*d).max(Duration::from_secs(30)),
                Schedule::Cron(..) => Duration::from_secs(300),
            };
            // Failures are logged and counted by run_one; the next run is
            // already scheduled.
            let _ = self.run_one(&name, timeout).await;
        }
    }
}

/// Encodes rows as a report file.
pub fn encode(
    format: ReportFormat,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    tz: Tz,
) -> std::result::Result<Vec<u8>, String> {
    match format {
        ReportFormat::Csv => {
            let mut buf = Vec::new();
            {
                let mut w = datafusion::arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut buf);
                for b in batches {
                    w.write(b).map_err(|e| e.to_string())?;
                }
            }
            if batches.is_empty() {
                let header: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                buf.extend_from_slice(header.join(",").as_bytes());
                buf.push(b'\n');
            }
            Ok(buf)
        }
        ReportFormat::Parquet => {
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(
                    ZstdLevel::try_new(3).map_err(|e| e.to_string())?,
                ))
                .build();
            let mut w = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props))
                .map_err(|e| e.to_string())?;
            for b in batches {
                w.write(b).map_err(|e| e.to_string())?;
            }
            w.into_inner().map_err(|e| e.to_string())
        }
        ReportFormat::Xlsx => xlsx(schema, batches, tz),
    }
}

/// One worksheet: a bold, frozen header row; numbers as numbers, times as
/// Excel date-times in the report's time zone, dates as dates, everything
/// else as text; columns autofitted.
fn xlsx(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    tz: Tz,
) -> std::result::Result<Vec<u8>, String> {
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    if rows > XLSX_MAX_ROWS {
        return Err(format!(
            "{rows} rows exceed XLSX's {XLSX_MAX_ROWS} data rows; use format = \"csv\" or \"parquet\""
        ));
    }
    let e = |e: rust_xlsxwriter::XlsxError| e.to_string();
    let mut wb = Workbook::new();
    let ws = wb.add_worksheet();
    let bold = Format::new().set_bold();
    let datetime = Format::new().set_num_format("yyyy-mm-dd hh:mm:ss");
    let date = Format::new().set_num_format("yyyy-mm-dd");
    for (c, f) in schema.fields().iter().enumerate() {
        ws.write_string_with_format(0, c as u16, f.name(), &bold)
            .map_err(e)?;
    }
    ws.set_freeze_panes(1, 0).map_err(e)?;
    let mut row0 = 1u32;
    let opts = FormatOptions::default();
    for b in batches {
        for (c, col) in b.columns().iter().enumerate() {
            let c = c as u16;
            let write_err =
                |m: String| format!("column '{}': {m}", schema.field(c as usize).name());
            match col.data_type() {
                DataType::Boolean => {
                    let a = col.as_boolean();
                    for i in 0..a.len() {
                        if a.is_valid(i) {
                            ws.write_boolean(row0 + i as u32, c, a.value(i))
                                .map_err(e)?;
                        }
                    }
                }
                t if t.is_numeric() => {
                    let f = cast(col, &DataType::Float64).map_err(|x| write_err(x.to_string()))?;
                    let a = f.as_primitive::<Float64Type>();
                    for i in 0..a.len() {
                        if a.is_valid(i) && a.value(i).is_finite() {
                            ws.write_number(row0 + i as u32, c, a.value(i)).map_err(e)?;
                        }
                    }
                }
                DataType::Timestamp(_, _) => {
                    let ms = cast(col, &DataType::Timestamp(TimeUnit::Millisecond, None))
                        .and_then(|a| cast(&a, &DataType::Int64))
                        .map_err(|x| write_err(x.to_string()))?;
                    let a = ms.as_primitive::<Int64Type>();
                    for i in 0..a.len() {
                        if let Some(t) = a
                            .is_valid(i)
                            .then(|| DateTime::from_timestamp_millis(a.value(i)))
                            .flatten()
                        {
                            let local = t.with_timezone(&tz).naive_local();
                            ws.write_datetime_with_format(row0 + i as u32, c, local, &datetime)
                                .map_err(e)?;
                        }
                    }
                }
                DataType::Date32 => {
                    let a = col.as_primitive::<datafusion::arrow::datatypes::Date32Type>();
                    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date");
                    for i in 0..a.len() {
                        if a.is_valid(i) {
                            let d = epoch + chrono::Duration::days(a.value(i) as i64);
                            ws.write_datetime_with_format(row0 + i as u32, c, d, &date)
                                .map_err(e)?;
                        }
                    }
                }
                _ => {
                    let fmt = ArrayFormatter::try_new(col.as_ref(), &opts)
                        .map_err(|x| write_err(x.to_string()))?;
                    for i in 0..col.len() {
                        if col.is_valid(i) {
                            ws.write_string(row0 + i as u32, c, fmt.value(i).to_string())
                                .map_err(e)?;
                        }
                    }
                }
            }
        }
        row0 += b.num_rows() as u32;
    }
    ws.autofit();
    wb.save_to_buffer().map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(schedule: Option<&str>, every: Option<u64>, tz: &str) -> ReportConfig {
        ReportConfig {
            name: "r".into(),
            sql: "SELECT 1".into(),
            schedule: schedule.map(str::to_string),
            every: every.map(Duration::from_secs),
            timezone: tz.into(),
            format: ReportFormat::Csv,
        }
    }

    #[test]
    fn daily_at_six_in_a_time_zone() {
        let s = cfg(Some("0 6 * * *"), None, "Europe/Berlin")
            .schedule()
            .unwrap();
        // 2026-11-22 07:00 UTC = 08:00 in Berlin: next 06:00 Berlin is the
        // 23rd at 05:00 UTC (CET = UTC+1).
        let t = DateTime::parse_from_rfc3339("2026-11-22T07:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            s.next_after(t).unwrap().to_rfc3339(),
            "2026-11-23T05:00:00+00:00"
        );
        // In July Berlin is UTC+2.
        let t = DateTime::parse_from_rfc3339("2026-07-01T03:59:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            s.next_after(t).unwrap().to_rfc3339(),
            "2026-07-01T04:00:00+00:00"
        );
    }

    #[test]
    fn bad_schedules_name_the_key() {
        let e = cfg(Some("61 * * * *"), None, "UTC").schedule().unwrap_err();
        assert!(e.starts_with("schedule: '61 * * * *'"), "{e}");
        let e = cfg(None, Some(60), "Mars/Base").schedule().unwrap_err();
        assert!(
            e.starts_with("timezone: unknown time zone 'Mars/Base'"),
            "{e}"
        );
        let e = cfg(Some("0 6 * * *"), Some(60), "UTC")
            .schedule()
            .unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = cfg(None, None, "UTC").schedule().unwrap_err();
        assert!(e.starts_with("schedule: missing"), "{e}");
    }
}
