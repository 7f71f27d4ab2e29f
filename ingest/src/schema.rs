//! The event contract v1 (see `DESIGN.md`): stream names and Arrow schemas.
//!
//! Each stream has two schemas:
//! * the **JSON schema** used to decode one JSON object per event (for
//!   `sales`, `lines` is a list of structs), and
//! * the **flat schema** the engine and SQL see (for `sales`, one row per
//!   receipt line with a `line_no`).
//!
//! Event time is `ts: Timestamp(Millisecond, "UTC")`; money is
//! `Decimal128(18, 6)` (six decimals: a price per gram or millilitre is
//! exact); quantities are signed integers (weighed goods are counted in
//! their smallest unit, e.g. grams). JSON money is read at 18 decimals
//! ([`JSON_MONEY`]) so that a value with more than six is refused (a dead
//! letter), never truncated.

use std::{fmt, str::FromStr, sync::Arc, sync::OnceLock};

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

use crate::error::IngestError;

/// Timezone of every event-time column.
pub const TS_TZ: &str = "UTC";
/// Decimal places money keeps.
pub const MONEY_SCALE: i8 = 6;
/// Precision and scale of money columns.
pub const MONEY: DataType = DataType::Decimal128(18, MONEY_SCALE);
/// How JSON money is read before it is checked and rescaled to [`MONEY`].
pub const JSON_MONEY: DataType = DataType::Decimal128(38, 18);
/// Money fields of a receipt line.
pub const LINE_MONEY_FIELDS: [&str; 3] = ["unit_price", "discount", "amount"];

/// The Arrow type of event-time columns.
pub fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some(TS_TZ.into()))
}

/// The streams of the event contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// POS receipts, one row per receipt line.
    Sales,
    /// Signed stock deltas (receipt, transfer, waste, ...).
    StockMovements,
    /// Absolute on-hand from stock-takes or shelf sensors.
    StockCounts,
    /// Generic telemetry (fridge temperature, shelf weight, ...).
    IotReadings,
    /// Store-local member card → chain-wide member id.
    MemberLinks,
    /// Purchase order lines: placed, amended, cancelled.
    PurchaseOrders,
}

/// Valid values of `purchase_orders.status`: `placed` and `amended` set the
/// line's ordered quantity (the new total), `cancelled` withdraws it.
pub const ORDER_STATUSES: &[&str] = &["placed", "amended", "cancelled"];

/// Valid values of `stock_movements.kind`.
pub const MOVEMENT_KINDS: &[&str] = &[
    "receipt",
    "transfer_in",
    "transfer_out",
    "waste",
    "return",
    "adjustment",
];

impl StreamKind {
    /// All streams, in contract order.
    pub const ALL: [StreamKind; 6] = [
        StreamKind::Sales,
        StreamKind::StockMovements,
        StreamKind::StockCounts,
        StreamKind::IotReadings,
        StreamKind::MemberLinks,
        StreamKind::PurchaseOrders,
    ];

    /// The stream's name: its SQL table name and file stem.
    pub fn name(self) -> &'static str {
        match self {
            StreamKind::Sales => "sales",
            StreamKind::StockMovements => "stock_movements",
            StreamKind::StockCounts => "stock_counts",
            StreamKind::IotReadings => "iot_readings",
            StreamKind::MemberLinks => "member_links",
            StreamKind::PurchaseOrders => "purchase_orders",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Fields every event of this stream must carry (non-null).
    pub fn required_fields(self) -> &'static [&'static str] {
        match self {
            StreamKind::Sales => &["event_id", "ts", "store_id", "receipt_id", "lines"],
            StreamKind::StockMovements => &["event_id", "ts", "store_id", "sku", "kind", "qty"],
            StreamKind::StockCounts => &["event_id", "ts", "store_id", "sku", "on_hand"],
            StreamKind::IotReadings => {
                &["event_id", "ts", "store_id", "device_id", "metric", "value"]
            }
            StreamKind::MemberLinks => {
                &["event_id", "ts", "store_id", "local_member_id", "member_id"]
            }
            StreamKind::PurchaseOrders => {
                &["event_id", "ts", "store_id", "order_id", "sku", "status"]
            }
        }
    }

    /// Required fields of one `sales.lines[]` element.
    pub const SALES_LINE_REQUIRED: &'static [&'static str] = &["sku", "qty", "unit_price"];

    /// The schema one JSON event is decoded with.
    pub fn json_schema(self) -> SchemaRef {
        static CELLS: OnceLock<[SchemaRef; 6]> = OnceLock::new();
        CELLS.get_or_init(|| StreamKind::ALL.map(build_json_schema))[self.index()].clone()
    }

    /// The flat schema of the stream's rows, as the engine and SQL see them.
    pub fn schema(self) -> SchemaRef {
        static CELLS: OnceLock<[SchemaRef; 6]> = OnceLock::new();
        CELLS.get_or_init(|| StreamKind::ALL.map(build_flat_schema))[self.index()].clone()
    }
}

fn utf8(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

fn common(fields: &mut Vec<Field>) {
    fields.push(utf8("event_id", false));
    fields.push(Field::new("ts", ts_type(), false));
    fields.push(utf8("store_id", false));
}

/// The struct type of one receipt line (`money`: the type of its money
/// fields, [`MONEY`] or [`JSON_MONEY`]). `amount` is the net line amount as
/// the till printed it (optional; when present it is the line's revenue).
pub fn sales_line_fields_with(money: DataType) -> Fields {
    Fields::from(vec![
        utf8("sku", false),
        Field::new("qty", DataType::Int64, false),
        Field::new("unit_price", money.clone(), false),
        Field::new("discount", money.clone(), true),
        Field::new("amount", money, true),
    ])
}

/// The struct type of one receipt line as the engine sees it.
pub fn sales_line_fields() -> Fields {
    sales_line_fields_with(MONEY)
}

fn build_json_schema(kind: StreamKind) -> SchemaRef {
    if kind != StreamKind::Sales {
        return build_flat_schema(kind);
    }
    let mut f = Vec::new();
    common(&mut f);
    f.push(utf8("receipt_id", false));
    f.push(utf8("member_id", true));
    f.push(utf8("channel", true));
    f.push(Field::new(
        "lines",
        DataType::List(Arc::new(Field::new(
            "item",
            DataType::Struct(sales_line_fields_with(JSON_MONEY)),
            false,
        ))),
        false,
    ));
    Arc::new(Schema::new(f))
}

fn build_flat_schema(kind: StreamKind) -> SchemaRef {
    let mut f = Vec::new();
    common(&mut f);
    match kind {
        StreamKind::Sales => {
            f.push(utf8("receipt_id", false));
            f.push(utf8("member_id", true));
            f.push(utf8("channel", true));
            f.push(Field::new("line_no", DataType::Int32, false));
            f.extend(sales_line_fields().iter().map(|f| f.as_ref().clone()));
        }
        StreamKind::StockMovements => {
            f.push(utf8("sku", false));
            f.push(utf8("kind", false));
            f.push(Field::new("qty", DataType::Int64, false));
            // Optional links: the purchase order a receipt fulfils, the
            // transfer a transfer_out/transfer_in belongs to, and the other
            // store of a transfer (where it goes, where it came from).
            f.push(utf8("order_id", true));
            f.push(utf8("transfer_id", true));
            f.push(utf8("peer_store_id", true));
            // Optional lot of a receipt (or transfer in, or waste) and the
            // date its units expire (`expiring_stock`).
            f.push(utf8("lot", true));
            f.push(Field::new("expires_at", ts_type(), true));
        }
        StreamKind::StockCounts => {
            f.push(utf8("sku", false));
            f.push(Field::new("on_hand", DataType::Int64, false));
            f.push(utf8("source", true));
        }
        StreamKind::IotReadings => {
            f.push(utf8("device_id", false));
            f.push(utf8("metric", false));
            f.push(Field::new("value", DataType::Float64, false));
        }
        StreamKind::MemberLinks => {
            f.push(utf8("local_member_id", false));
            f.push(utf8("member_id", false));
        }
        StreamKind::PurchaseOrders => {
            f.push(utf8("order_id", false));
            f.push(utf8("sku", false));
            f.push(utf8("status", false));
            f.push(Field::new("qty", DataType::Int64, true));
            f.push(Field::new("expected_at", ts_type(), true));
        }
    }
    Arc::new(Schema::new(f))
}

impl fmt::Display for StreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for StreamKind {
    type Err = IngestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StreamKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| IngestError::UnknownStream {
                name: s.to_string(),
                expected: StreamKind::ALL.map(|k| k.name()).join(", "),
            })
    }
}

impl<'de> serde::Deserialize<'de> for StreamKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_named() {
        for k in StreamKind::ALL {
            assert_eq!(k.name().parse::<StreamKind>().unwrap(), k);
            assert!(k.schema().field_with_name("ts").is_ok());
        }
        let err = "salez".parse::<StreamKind>().unwrap_err().to_string();
        assert!(
            err.contains("'salez'") && err.contains("stock_movements"),
            "{err}"
        );
    }

    #[test]
    fn sales_flat_schema_has_one_row_per_line() {
        let s = StreamKind::Sales.schema();
        let names: Vec<_> = s.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names,
            [
                "event_id",
                "ts",
                "store_id",
                "receipt_id",
                "member_id",
                "channel",
                "line_no",
                "sku",
                "qty",
                "unit_price",
                "discount",
                "amount"
            ]
        );
    }
}
