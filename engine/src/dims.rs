//! Dimension tables: `stores`, `products`, `replenishment_policy`,
//! `opening_stock`, `prices` (and any
//! other table a deployment adds), loaded from CSV or Parquet at a local path
//! or an object-store URL, validated, and swapped in place when reloaded.
//!
//! The known tables have typed required columns (see
//! [`DimensionKind`]); extra columns are kept (CSV: as text). A missing
//! required column, an unparsable value, an empty key or a duplicated key is
//! an error naming the file, the line (CSV: the 1-based line of the file,
//! header = line 1; Parquet: the row) and the column.
//!
//! [`DimensionData`] is the shared cell a table reads from. The serving
//! context scans it as an in-memory table (with statistics, for join
//! planning); the planning context, whose physical plans are built once per
//! continuous view, reads it at execution time, so a reload is seen by the
//! next micro-batch without re-planning.
//!
//! Size: ~630 lines of code and ~100 of tests; the table kinds, their
//! validation and the two providers change together.

use std::{
    collections::HashSet,
    fmt,
    sync::{Arc, RwLock},
};

use async_trait::async_trait;
use datafusion::{
    arrow::{
        array::{
            new_null_array, Array, ArrayRef, AsArray, Float64Builder, Int64Builder, RecordBatch,
            StringArray,
        },
        compute::cast,
        datatypes::{DataType, Decimal128Type, Field, Schema, SchemaRef, TimestampMillisecondType},
        util::display::array_value_to_string,
    },
    catalog::{Session, TableProvider},
    common::Result as DfResult,
    datasource::{memory::MemorySourceConfig, TableType},
    execution::TaskContext,
    logical_expr::Expr,
    physical_plan::{
        stream::RecordBatchStreamAdapter, streaming::PartitionStream, ExecutionPlan,
        SendableRecordBatchStream,
    },
};
use object_store::{path::Path as ObjectPath, ObjectStore, ObjectStoreExt};

/// A dimension-table error: what, where.
#[derive(Debug, thiserror::Error)]
pub enum DimensionError {
    /// The file cannot be read.
    #[error("dimension table '{table}': cannot read {location}: {message}")]
    Read {
        /// Table name.
        table: String,
        /// Path or URL.
        location: String,
        /// Why.
        message: String,
    },
    /// The content is invalid.
    #[error("dimension table '{table}': {location}:{line}: {message}")]
    Invalid {
        /// Table name.
        table: String,
        /// Path or URL.
        location: String,
        /// CSV: 1-based line (header = 1); Parquet: 1-based row + 1.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// The known dimension tables and their typed columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DimensionKind {
    /// `stores(store_id, name, city, format, timezone, opens, closes,
    /// ...)`, key `store_id`. `timezone` (an IANA name; empty: UTC) and the
    /// opening hours `opens`/`closes` (local `HH:MM`, both or neither; a
    /// `closes` at or before `opens` is past midnight; neither: open all
    /// day) are optional. Read by `local_time` and `store_open` (see
    /// `crate::calendar`).
    Stores,
    /// `products(sku, name, category, unit_cost, case_pack, ...)`, key `sku`.
    Products,
    /// `replenishment_policy(store_id, sku, city, format, category,
    /// lead_time_hours, service_level, review_hours, min_stock)`: each row
    /// sets thresholds at one [`PolicyLevel`] (its scope columns), key
    /// all five scope columns.
    ReplenishmentPolicy,
    /// `opening_stock(store_id, sku, on_hand)`, key `(store_id, sku)`: the
    /// on-hand of a (store, SKU) before the first event storepulse has for
    /// it (a stock count, when one arrives, takes over).
    OpeningStock,
    /// `prices(sku, store_id, city, format, price, valid_from, valid_to)`:
    /// the list price of a SKU from `valid_from` (until `valid_to`,
    /// exclusive, if set) at one scope: a store, a city, a format, or the
    /// chain (no scope column set); key `(sku, store_id, city, format,
    /// valid_from)`. Read by `price_in_force` (see `crate::prices`).
    Prices,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Col {
    Text,
    /// An IANA time zone name (`Europe/Berlin`), kept as text.
    TimeZone,
    /// A local time of day, `HH:MM` (`00:00` to `24:00`), kept as text
    /// `HH:MM`.
    LocalTime,
    /// Money, exact to six decimals (`Decimal(18, 6)`, as in the events).
    Money,
    /// A UTC timestamp (RFC 3339, or a date for its midnight UTC).
    Time,
    Float {
        min: f64,
        max: f64,
        open_min: bool,
        open_max: bool,
    },
    Int {
        min: i64,
    },
}

impl DimensionKind {
    /// The kind for a table name, if it is a known one.
    pub fn of(name: &str) -> Option<Self> {
        match name {
            "stores" => Some(Self::Stores),
            "products" => Some(Self::Products),
            "replenishment_policy" => Some(Self::ReplenishmentPolicy),
            "opening_stock" => Some(Self::OpeningStock),
            "prices" => Some(Self::Prices),
            _ => None,
        }
    }

    /// All known tables.
    pub const ALL: [DimensionKind; 5] = [
        DimensionKind::Stores,
        DimensionKind::Products,
        DimensionKind::ReplenishmentPolicy,
        DimensionKind::OpeningStock,
        DimensionKind::Prices,
    ];

    /// Table name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Stores => "stores",
            Self::Products => "products",
            Self::ReplenishmentPolicy => "replenishment_policy",
            Self::OpeningStock => "opening_stock",
            Self::Prices => "prices",
        }
    }

    fn columns(self) -> &'static [(&'static str, Col)] {
        const ANY: Col = Col::Float {
            min: 0.0,
            max: f64::INFINITY,
            open_min: false,
            open_max: true,
        };
        match self {
            Self::Stores => &[
                ("store_id", Col::Text),
                ("name", Col::Text),
                ("city", Col::Text),
                ("format", Col::Text),
                ("timezone", Col::TimeZone),
                ("opens", Col::LocalTime),
                ("closes", Col::LocalTime),
            ],
            Self::Products => &[
                ("sku", Col::Text),
                ("name", Col::Text),
                ("category", Col::Text),
                ("unit_cost", ANY),
                ("case_pack", Col::Int { min: 1 }),
            ],
            Self::ReplenishmentPolicy => &[
                ("store_id", Col::Text),
                ("sku", Col::Text),
                ("city", Col::Text),
                ("format", Col::Text),
                ("category", Col::Text),
                ("lead_time_hours", ANY),
                (
                    "service_level",
                    Col::Float {
                        min: 0.0,
                        max: 1.0,
                        open_min: true,
                        open_max: true,
                    },
                ),
                ("review_hours", ANY),
                ("min_stock", Col::Int { min: 0 }),
            ],
            Self::OpeningStock => &[
                ("store_id", Col::Text),
                ("sku", Col::Text),
                ("on_hand", Col::Int { min: 0 }),
            ],
            Self::Prices => &[
                ("sku", Col::Text),
                ("store_id", Col::Text),
                ("city", Col::Text),
                ("format", Col::Text),
                ("price", Col::Money),
                ("valid_from", Col::Time),
                ("valid_to", Col::Time),
            ],
        }
    }

    fn key(self) -> &'static [&'static str] {
        match self {
            Self::Stores => &["store_id"],
            Self::Products => &["sku"],
            Self::ReplenishmentPolicy => &["store_id", "sku", "city", "format", "category"],
            Self::OpeningStock => &["store_id", "sku"],
            Self::Prices => &["sku", "store_id", "city", "format", "valid_from"],
        }
    }

    /// Whether column `name` may be absent from the file or empty in a row:
    /// every column of `replenishment_policy` (a row names one level with
    /// its scope columns; an empty threshold is inherited from the next
    /// level, see [`PolicyLevel`]); the scope columns and `valid_to` of
    /// `prices`.
    fn optional(self, name: &str) -> bool {
        match self {
            Self::ReplenishmentPolicy => true,
            Self::Prices => matches!(name, "store_id" | "city" | "format" | "valid_to"),
            Self::Stores => matches!(name, "timezone" | "opens" | "closes"),
            _ => false,
        }
    }

    /// The table's schema with only its required columns (the empty table
    /// registered until a file is configured).
    pub fn schema(self) -> SchemaRef {
        Arc::new(Schema::new(
            self.columns()
                .iter()
                .map(|(n, c)| Field::new(*n, c.data_type(), true))
                .collect::<Vec<_>>(),
        ))
    }
}

impl Col {
    fn data_type(self) -> DataType {
        match self {
            Col::Text | Col::TimeZone | Col::LocalTime => DataType::Utf8,
            Col::Money => storepulse_ingest::schema::MONEY,
            Col::Time => storepulse_ingest::schema::ts_type(),
            Col::Float { .. } => DataType::Float64,
            Col::Int { .. } => DataType::Int64,
        }
    }
}

impl fmt::Display for DimensionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The level a `replenishment_policy` row sets thresholds at, from the
/// most specific: the scope columns a row fills name it, and the most
/// specific row matching a (store, SKU) wins (`stockout_risk.policy_source`).
/// A threshold a row leaves empty is inherited from the next matching level
/// (and finally from the `[retail] default_*` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyLevel {
    /// `store_id` + `sku`: one SKU in one store.
    StoreSku,
    /// `store_id` + `category`.
    StoreCategory,
    /// `city` + `category`: every store of a city (a region).
    CityCategory,
    /// `format` + `category`: every store of a format.
    FormatCategory,
}

impl PolicyLevel {
    /// The value of `policy_source` for rows of this level.
    pub fn name(self) -> &'static str {
        match self {
            Self::StoreSku => "store_sku",
            Self::StoreCategory => "store_category",
            Self::CityCategory => "city_category",
            Self::FormatCategory => "format_category",
        }
    }

    /// The level of row `r` of a validated policy batch (its first columns
    /// are the scope columns, the table's key), or why the row names none.
    fn of_row(arrays: &[ArrayRef], r: usize) -> Result<Self, String> {
        let scope = DimensionKind::ReplenishmentPolicy.key();
        let set: Vec<&str> = scope
            .iter()
            .zip(arrays)
            .filter(|(_, a)| !a.is_null(r))
            .map(|(n, _)| *n)
            .collect();
        let level = match set.as_slice() {
            ["store_id", "sku"] => Self::StoreSku,
            ["store_id", "category"] => Self::StoreCategory,
            ["city", "category"] => Self::CityCategory,
            ["format", "category"] => Self::FormatCategory,
            _ => {
                return Err(format!(
                    "a policy row sets one level: store_id + sku, store_id + category, city + \
                     category or format + category (this row sets: {})",
                    if set.is_empty() {
                        "none".to_string()
                    } else {
                        set.join(", ")
                    }
                ))
            }
        };
        if arrays[scope.len()..].iter().all(|a| a.is_null(r)) {
            return Err(format!(
                "the {} row sets no threshold (lead_time_hours, service_level, review_hours, \
                 min_stock)",
                level.name()
            ));
        }
        Ok(level)
    }
}

/// Why row `r` of a validated `prices` batch (columns in
/// [`DimensionKind::Prices`] order) is not a price, if it is not: it sets at
/// most one scope column, and its validity ends after it starts.
fn price_row_problem(arrays: &[ArrayRef], r: usize) -> Result<(), String> {
    let scopes: Vec<&str> = ["store_id", "city", "format"]
        .into_iter()
        .zip(&arrays[1..4])
        .filter(|(_, a)| !a.is_null(r))
        .map(|(n, _)| n)
        .collect();
    if scopes.len() > 1 {
        return Err(format!(
            "a price row sets one scope: store_id, city, format, or none for the chain (this row \
             sets: {})",
            scopes.join(", ")
        ));
    }
    let ts = |i: usize| {
        let a = arrays[i].as_primitive::<TimestampMillisecondType>();
        (!a.is_null(r)).then(|| a.value(r))
    };
    if let (Some(from), Some(to)) = (ts(5), ts(6)) {
        if to <= from {
            return Err("column 'valid_to' must be after valid_from".into());
        }
    }
    Ok(())
}

/// Where a dimension file lives: a local path or an object-store URL
/// (`file:///...`; `s3://` and others once their object store is enabled).
#[derive(Debug, Clone)]
pub struct DimensionSource {
    /// Table name.
    pub table: String,
    /// Path or URL as configured.
    pub location: String,
}

/// Where the bytes come from.
enum Location {
    Local(std::path::PathBuf),
    Store(Arc<dyn ObjectStore>, ObjectPath),
}

impl DimensionSource {
    fn read_err(&self, message: String) -> DimensionError {
        DimensionError::Read {
            table: self.table.clone(),
            location: self.location.clone(),
            message,
        }
    }

    fn resolve(&self) -> Result<Location, DimensionError> {
        if !self.location.contains("://") {
            return Ok(Location::Local(self.location.clone().into()));
        }
        let url =
            url::Url::parse(&self.location).map_err(|e| self.read_err(format!("bad URL: {e}")))?;
        if url.scheme() == "file" {
            return url
                .to_file_path()
                .map(Location::Local)
                .map_err(|_| self.read_err("not a local file URL".into()));
        }
        // s3:// (and S3-compatible stores) take their settings from the
        // standard AWS_* environment variables (AWS_ENDPOINT_URL,
        // AWS_ALLOW_HTTP, credentials, region).
        let env = std::env::vars()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.to_ascii_lowercase(), v));
        let (store, path) = object_store::parse_url_opts(&url, env).map_err(|e| {
            self.read_err(format!(
                "{e} (object stores available: file://, s3://, memory://)"
            ))
        })?;
        Ok(Location::Store(Arc::from(store), path))
    }

    /// A version tag of the current file (size, modification time, e-tag):
    /// when it changes, the table is reloaded.
    pub async fn version(&self) -> Result<String, DimensionError> {
        match self.resolve()? {
            Location::Local(p) => {
                let meta = tokio::fs::metadata(&p)
                    .await
                    .map_err(|e| self.read_err(e.to_string()))?;
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                Ok(format!("{}:{mtime}", meta.len()))
            }
            Location::Store(store, path) => {
                let meta = store
                    .head(&path)
                    .await
                    .map_err(|e| self.read_err(e.to_string()))?;
                Ok(format!(
                    "{}:{}:{}",
                    meta.size,
                    meta.last_modified.timestamp_millis(),
                    meta.e_tag.unwrap_or_default()
                ))
            }
        }
    }

    /// Reads and validates the file.
    pub async fn load(&self) -> Result<(SchemaRef, Vec<RecordBatch>), DimensionError> {
        let bytes: bytes::Bytes = match self.resolve()? {
            Location::Local(p) => tokio::fs::read(&p)
                .await
                .map_err(|e| self.read_err(e.to_string()))?
                .into(),
            Location::Store(store, path) => store
                .get(&path)
                .await
                .map_err(|e| self.read_err(e.to_string()))?
                .bytes()
                .await
                .map_err(|e| self.read_err(e.to_string()))?,
        };
        let read = |message: String| self.read_err(message);
        let parquet = self.location.to_ascii_lowercase().ends_with(".parquet");
        let (batch, csv) = if parquet {
            let reader =
                datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                    bytes,
                )
                .map_err(|e| read(format!("not a Parquet file: {e}")))?
                .build()
                .map_err(|e| read(e.to_string()))?;
            let schema = datafusion::arrow::array::RecordBatchReader::schema(&reader);
            let batches = reader
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| read(e.to_string()))?;
            let batch = datafusion::arrow::compute::concat_batches(&schema, &batches)
                .map_err(|e| read(e.to_string()))?;
            (batch, false)
        } else {
            (self.read_csv(&bytes)?, true)
        };
        let batch = match DimensionKind::of(&self.table) {
            Some(kind) => self.validate(kind, batch, csv)?,
            None => batch,
        };
        Ok((batch.schema(), vec![batch]))
    }

    fn invalid(&self, line: usize, message: String) -> DimensionError {
        DimensionError::Invalid {
            table: self.table.clone(),
            location: self.location.clone(),
            line,
            message,
        }
    }

    /// Every column as text; row `i` is line `i + 2` of the file.
    fn read_csv(&self, bytes: &[u8]) -> Result<RecordBatch, DimensionError> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1;
            self.invalid(line, "not UTF-8 text".into())
        })?;
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .from_reader(text.as_bytes());
        let headers: Vec<String> = rdr
            .headers()
            .map_err(|e| self.invalid(1, format!("bad header: {e}")))?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        if headers.iter().all(|h| h.is_empty()) {
            return Err(self.invalid(1, "empty file (a header line is required)".into()));
        }
        let mut seen = HashSet::new();
        for h in &headers {
            if !seen.insert(h) {
                return Err(self.invalid(1, format!("column '{h}' appears twice")));
            }
        }
        let mut cols: Vec<Vec<Option<String>>> = vec![Vec::new(); headers.len()];
        for rec in rdr.records() {
            let rec = rec.map_err(|e| {
                let line = e.position().map_or(0, |p| p.line() as usize);
                self.invalid(line, e.to_string())
            })?;
            for (c, v) in rec.iter().enumerate() {
                let v = v.trim();
                cols[c].push((!v.is_empty()).then(|| v.to_string()));
            }
        }
        let fields: Vec<Field> = headers
            .iter()
            .map(|h| Field::new(h, DataType::Utf8, true))
            .collect();
        let arrays: Vec<ArrayRef> = cols
            .into_iter()
            .map(|c| Arc::new(StringArray::from(c)) as ArrayRef)
            .collect();
        RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
            .map_err(|e| self.invalid(1, e.to_string()))
    }

    fn validate(
        &self,
        kind: DimensionKind,
        batch: RecordBatch,
        csv: bool,
    ) -> Result<RecordBatch, DimensionError> {
        let schema = batch.schema();
        let line = |row: usize| row + 2;
        let mut fields = Vec::new();
        let mut arrays: Vec<ArrayRef> = Vec::new();
        for (name, col) in kind.columns() {
            let optional = kind.optional(name);
            let Ok(idx) = schema.index_of(name) else {
                if optional {
                    fields.push(Field::new(*name, col.data_type(), true));
                    arrays.push(new_null_array(&col.data_type(), batch.num_rows()));
                    continue;
                }
                let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(self.invalid(
                    1,
                    format!(
                        "missing column '{name}' (required: {}; found: {})",
                        kind.columns()
                            .iter()
                            .map(|c| c.0)
                            .collect::<Vec<_>>()
                            .join(", "),
                        have.join(", ")
                    ),
                ));
            };
            let a = batch.column(idx);
            let text = cast(a, &DataType::Utf8)
                .map_err(|e| self.invalid(1, format!("column '{name}': {e}")))?;
            let text = text.as_string::<i32>();
            let empty = |r: usize| {
                if text.is_null(r) && !optional {
                    return Err(self.invalid(line(r), format!("column '{name}' is empty")));
                }
                Ok(())
            };
            let out: ArrayRef = match *col {
                Col::Text => Arc::new(text.clone()),
                Col::TimeZone => {
                    for r in 0..text.len() {
                        empty(r)?;
                        if !text.is_null(r) {
                            let s = text.value(r);
                            s.parse::<chrono_tz::Tz>().map_err(|_| {
                                self.invalid(
                                    line(r),
                                    format!(
                                        "column '{name}': unknown time zone '{s}' (IANA names, \
                                         e.g. Asia/Shanghai, Europe/Berlin, UTC)"
                                    ),
                                )
                            })?;
                        }
                    }
                    Arc::new(text.clone())
                }
                Col::LocalTime => {
                    let mut b = datafusion::arrow::array::StringBuilder::new();
                    for r in 0..text.len() {
                        empty(r)?;
                        if text.is_null(r) {
                            b.append_null();
                            continue;
                        }
                        let s = text.value(r);
                        let m = crate::calendar::parse_local_time(s).ok_or_else(|| {
                            self.invalid(
                                line(r),
                                format!(
                                    "column '{name}': '{s}' is not a local time of day (HH:MM, \
                                     00:00 to 24:00)"
                                ),
                            )
                        })?;
                        b.append_value(format!("{:02}:{:02}", m / 60, m % 60));
                    }
                    Arc::new(b.finish())
                }
                Col::Money => {
                    // Read at 18 decimals, then kept exactly or refused (as
                    // the events' money is).
                    let wide = cast(text, &storepulse_ingest::schema::JSON_MONEY)
                        .map_err(|e| self.invalid(1, format!("column '{name}': {e}")))?;
                    let wide = wide.as_primitive::<Decimal128Type>();
                    for r in 0..text.len() {
                        empty(r)?;
                        if text.is_null(r) {
                            continue;
                        }
                        let s = text.value(r);
                        if wide.is_null(r) {
                            return Err(self.invalid(
                                line(r),
                                format!("column '{name}': '{s}' is not a decimal number"),
                            ));
                        }
                        let v = wide.value(r);
                        if let Some(why) = storepulse_ingest::decode::money_problem(v) {
                            return Err(self.invalid(line(r), format!("column '{name}': {why}")));
                        }
                        if v < 0 {
                            return Err(
                                self.invalid(line(r), format!("column '{name}': {s} is negative"))
                            );
                        }
                    }
                    Arc::new(storepulse_ingest::decode::rescaled(wide))
                }
                Col::Time => {
                    let ts = cast(text, &col.data_type())
                        .map_err(|e| self.invalid(1, format!("column '{name}': {e}")))?;
                    for r in 0..text.len() {
                        empty(r)?;
                        if !text.is_null(r) && ts.is_null(r) {
                            return Err(self.invalid(
                                line(r),
                                format!(
                                    "column '{name}': '{}' is not a timestamp (RFC 3339, e.g. \
                                     2026-03-01T06:00:00Z, or a date for its midnight UTC)",
                                    text.value(r)
                                ),
                            ));
                        }
                    }
                    ts
                }
                Col::Float {
                    min,
                    max,
                    open_min,
                    open_max,
                } => {
                    let mut b = Float64Builder::with_capacity(text.len());
                    for r in 0..text.len() {
                        empty(r)?;
                        if text.is_null(r) {
                            b.append_null();
                            continue;
                        }
                        let s = text.value(r);
                        let v: f64 = s.parse().map_err(|_| {
                            self.invalid(line(r), format!("column '{name}': '{s}' is not a number"))
                        })?;
                        let low = if open_min { v > min } else { v >= min };
                        let high = if open_max { v < max } else { v <= max };
                        if !(low && high && v.is_finite()) {
                            let lo = if open_min { "(" } else { "[" };
                            let hi = if open_max { ")" } else { "]" };
                            return Err(self.invalid(
                                line(r),
                                format!("column '{name}': {s} is outside {lo}{min}, {max}{hi}"),
                            ));
                        }
                        b.append_value(v);
                    }
                    Arc::new(b.finish())
                }
                Col::Int { min } => {
                    let mut b = Int64Builder::with_capacity(text.len());
                    for r in 0..text.len() {
                        empty(r)?;
                        if text.is_null(r) {
                            b.append_null();
                            continue;
                        }
                        let s = text.value(r);
                        let v: i64 = s.parse().map_err(|_| {
                            self.invalid(
                                line(r),
                                format!("column '{name}': '{s}' is not an integer"),
                            )
                        })?;
                        if v < min {
                            return Err(self
                                .invalid(line(r), format!("column '{name}': {v} is below {min}")));
                        }
                        b.append_value(v);
                    }
                    Arc::new(b.finish())
                }
            };
            fields.push(Field::new(*name, col.data_type(), true));
            arrays.push(out);
        }
        // Keys: present and unique.
        let key_idx: Vec<usize> = kind
            .key()
            .iter()
            .map(|k| kind.columns().iter().position(|c| c.0 == *k).expect("key"))
            .collect();
        let mut seen: HashSet<Vec<Option<String>>> = HashSet::with_capacity(batch.num_rows());
        for r in 0..batch.num_rows() {
            let mut key = Vec::with_capacity(key_idx.len());
            for &i in &key_idx {
                let (name, a) = (kind.columns()[i].0, &arrays[i]);
                if a.is_null(r) && !kind.optional(name) {
                    return Err(self.invalid(line(r), format!("key column '{name}' is empty")));
                }
                key.push(match a.is_null(r) {
                    true => None,
                    false => Some(match a.as_string_opt::<i32>() {
                        Some(t) => t.value(r).to_string(),
                        None => array_value_to_string(a, r)
                            .map_err(|e| self.invalid(line(r), e.to_string()))?,
                    }),
                });
            }
            match kind {
                DimensionKind::ReplenishmentPolicy => {
                    PolicyLevel::of_row(&arrays, r).map_err(|m| self.invalid(line(r), m))?;
                }
                DimensionKind::Prices => {
                    price_row_problem(&arrays, r).map_err(|m| self.invalid(line(r), m))?
                }
                DimensionKind::Stores => {
                    // opens, closes: the last two typed columns.
                    let (o, c) = (&arrays[5], &arrays[6]);
                    if o.is_null(r) != c.is_null(r) {
                        return Err(self.invalid(
                            line(r),
                            "columns 'opens' and 'closes' are set together (neither: open all \
                             day)"
                                .into(),
                        ));
                    }
                }
                _ => {}
            }
            if !seen.insert(key.clone()) {
                let shown: Vec<String> = kind
                    .key()
                    .iter()
                    .zip(&key)
                    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k} = {v}")))
                    .collect();
                return Err(self.invalid(line(r), format!("duplicate key ({})", shown.join(", "))));
            }
        }
        // Extra columns as they are (CSV: text).
        for (i, f) in schema.fields().iter().enumerate() {
            if kind.columns().iter().any(|c| c.0 == f.name()) {
                continue;
            }
            fields.push(f.as_ref().clone().with_nullable(true));
            arrays.push(batch.column(i).clone());
        }
        let _ = csv;
        RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
            .map_err(|e| self.invalid(1, e.to_string()))
    }
}

/// The current contents of one dimension table, shared by its providers.
#[derive(Debug, Clone)]
pub struct DimensionData {
    schema: SchemaRef,
    batches: Arc<RwLock<Arc<Vec<RecordBatch>>>>,
}

impl DimensionData {
    /// A table with `schema` and these rows.
    pub fn new(schema: SchemaRef, batches: Vec<RecordBatch>) -> Self {
        Self {
            schema,
            batches: Arc::new(RwLock::new(Arc::new(batches))),
        }
    }
    /// The table's schema (fixed at registration).
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }
    /// The current rows.
    pub fn batches(&self) -> Arc<Vec<RecordBatch>> {
        self.batches.read().expect("dimension lock").clone()
    }
    /// Replaces the rows. Columns are matched by name to the registered
    /// schema (a reload cannot add, drop or retype a column).
    pub fn replace(&self, schema: &SchemaRef, batches: Vec<RecordBatch>) -> Result<usize, String> {
        if schema.fields().len() != self.schema.fields().len()
            || schema
                .fields()
                .iter()
                .zip(self.schema.fields())
                .any(|(a, b)| a.name() != b.name() || a.data_type() != b.data_type())
        {
            return Err(format!(
                "the columns changed (registered: {}; new: {}); restart to change a table's columns",
                describe(&self.schema),
                describe(schema)
            ));
        }
        let mut out = Vec::with_capacity(batches.len());
        let mut rows = 0;
        for b in batches {
            rows += b.num_rows();
            out.push(
                RecordBatch::try_new(self.schema.clone(), b.columns().to_vec())
                    .map_err(|e| e.to_string())?,
            );
        }
        *self.batches.write().expect("dimension lock") = Arc::new(out);
        Ok(rows)
    }
}

fn describe(s: &SchemaRef) -> String {
    s.fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Serving-side provider: an in-memory scan of the current rows.
#[derive(Debug)]
pub(crate) struct DimensionTable(pub(crate) DimensionData);

#[async_trait]
impl TableProvider for DimensionTable {
    fn schema(&self) -> SchemaRef {
        self.0.schema.clone()
    }
    fn table_type(&self) -> TableType {
        TableType::Base
    }
    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let batches = self.0.batches();
        let exec = MemorySourceConfig::try_new_exec(
            &[batches.as_ref().clone()],
            self.0.schema.clone(),
            projection.cloned(),
        )?;
        Ok(exec)
    }
}

/// Planning-side partition: reads the current rows at execution time.
#[derive(Debug)]
pub(crate) struct DimensionPartition(pub(crate) DimensionData);

impl PartitionStream for DimensionPartition {
    fn schema(&self) -> &SchemaRef {
        &self.0.schema
    }
    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batches = self.0.batches();
        let rows: Vec<DfResult<RecordBatch>> = batches.iter().cloned().map(Ok).collect();
        Box::pin(RecordBatchStreamAdapter::new(
            self.0.schema.clone(),
            futures::stream::iter(rows),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn load(name: &str, text: &str) -> Result<(SchemaRef, Vec<RecordBatch>), DimensionError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("{name}.csv"));
        std::fs::write(&path, text).unwrap();
        DimensionSource {
            table: name.into(),
            location: path.display().to_string(),
        }
        .load()
        .await
    }

    #[tokio::test]
    async fn typed_columns_and_extras() {
        let (schema, b) = load(
            "products",
            "sku,name,category,unit_cost,case_pack,unit_price\nA,Apple,produce,0.40,12,0.99\n",
        )
        .await
        .unwrap();
        assert_eq!(
            schema.field_with_name("unit_cost").unwrap().data_type(),
            &DataType::Float64
        );
        assert_eq!(
            schema.field_with_name("case_pack").unwrap().data_type(),
            &DataType::Int64
        );
        assert_eq!(
            schema.field_with_name("unit_price").unwrap().data_type(),
            &DataType::Utf8
        );
        assert_eq!(b[0].num_rows(), 1);
    }

    #[tokio::test]
    async fn policy_rows_name_one_level_and_may_leave_thresholds_empty() {
        // The old layout (format, category only) still loads: the other
        // scope columns are NULL.
        let (schema, b) = load(
            "replenishment_policy",
            "format,category,lead_time_hours,service_level,review_hours,min_stock\n\
             tea_shop,tea,24,0.95,48,4\n",
        )
        .await
        .unwrap();
        assert_eq!(schema, DimensionKind::ReplenishmentPolicy.schema());
        assert!(b[0].column(0).is_null(0) && !b[0].column(3).is_null(0));
        // Every level, thresholds left empty, an extra column kept.
        let (_, b) = load(
            "replenishment_policy",
            "store_id,sku,city,format,category,lead_time_hours,service_level,review_hours,min_stock,note\n\
             S1,A,,,,6,,,,x\nS1,,,,dairy,,,,3,\n,,Lyon,,dairy,12,0.9,,,\n,,,super,dairy,24,0.95,24,2,\n",
        )
        .await
        .unwrap();
        assert_eq!(b[0].num_rows(), 4);
        assert_eq!(b[0].column(5).null_count(), 1, "lead_time_hours");
        let bad = |rows: &'static str| async move {
            load(
                "replenishment_policy",
                &format!(
                    "store_id,sku,city,format,category,lead_time_hours,service_level,review_hours,min_stock\n{rows}"
                ),
            )
            .await
            .unwrap_err()
            .to_string()
        };
        let e = bad(",,,super,dairy,24,0.95,24,2\nS1,,Lyon,,dairy,1,,,\n").await;
        assert!(
            e.contains("replenishment_policy.csv:3:")
                && e.contains("one level")
                && e.contains("this row sets: store_id, city, category"),
            "{e}"
        );
        let e = bad(",,,,dairy,24,0.95,24,2\n").await;
        assert!(
            e.contains(":2:") && e.contains("this row sets: category"),
            "{e}"
        );
        let e = bad("S1,A,,,,,,,\n").await;
        assert!(e.contains("the store_sku row sets no threshold"), "{e}");
        let e = bad(",,Lyon,,dairy,1,,,\n,,Lyon,,dairy,2,,,\n").await;
        assert!(
            e.contains(":3:") && e.contains("duplicate key (city = Lyon, category = dairy)"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn bad_rows_name_file_line_and_column() {
        let e = load(
            "replenishment_policy",
            "format,category,lead_time_hours,service_level,review_hours,min_stock\n\
             tea_shop,tea,24,0.95,48,4\ntea_shop,milk,24,1.5,48,4\n",
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("replenishment_policy.csv:3:") && e.contains("service_level"),
            "{e}"
        );
        let e = load(
            "products",
            "sku,name,category,unit_cost,case_pack\nA,a,x,1,1\nB,b,x,oops,1\n",
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("products.csv:3:") && e.contains("'oops' is not a number"),
            "{e}"
        );
        let e = load("stores", "store_id,name,city,format\nS1,a,c,f\nS1,b,c,f\n")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("stores.csv:3:") && e.contains("duplicate key"),
            "{e}"
        );
        let e = load("stores", "store_id,name,format\nS1,a,f\n")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("stores.csv:1:") && e.contains("missing column 'city'"),
            "{e}"
        );
        let e = load("stores", "store_id,name,city,format\nS1,a,c\n")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("stores.csv:2:"), "{e}");
        // Time zones and opening hours.
        let head = "store_id,name,city,format,timezone,opens,closes\n";
        for (row, want) in [
            (
                "S1,a,c,f,Mars/Base,,",
                "column 'timezone': unknown time zone 'Mars/Base'",
            ),
            ("S1,a,c,f,,08:00,", "'opens' and 'closes' are set together"),
            (
                "S1,a,c,f,,08:00,25:00",
                "column 'closes': '25:00' is not a local time",
            ),
        ] {
            let e = load("stores", &format!("{head}S0,a,c,f,UTC,,\n{row}\n"))
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains("stores.csv:3:") && e.contains(want), "{e}");
        }
        let (_, b) = load(
            "stores",
            &format!("{head}S1,a,c,f,Asia/Shanghai,7:30,22:00\n"),
        )
        .await
        .unwrap();
        let opens = b[0].column_by_name("opens").unwrap();
        assert_eq!(opens.as_string::<i32>().value(0), "07:30");
        let e = DimensionSource {
            table: "stores".into(),
            location: "/nonexistent/stores.csv".into(),
        }
        .load()
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot read /nonexistent/stores.csv"), "{e}");
    }
}
