//! The views shipped with the binary, loaded by `demo` (and by `run` unless
//! `sql.builtin = false`). They live as plain `.sql` files under
//! `sql/views/` so they can be read, copied and overridden:
//!
//! * `starter.sql` — sales per store and hour, 24-hour SKU windows, member
//!   activity, fridge temperatures, movement totals, sales per minute;
//! * `retail.sql` — stock on hand, sales velocity, stock-out risk,
//!   inventory turnover, slow movers, member RFM and transfer suggestions
//!   (documented column by column in `docs/views.md`).
//!
//! `${name}` placeholders in the scripts are filled from [`RetailParams`]
//! (the `[retail]` table of the config).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::parse::SqlError;

/// The raw scripts: `(file name, SQL text with ${placeholders})`, in load
/// order.
pub const VIEWS: &[(&str, &str)] = &[
    ("starter.sql", include_str!("../views/starter.sql")),
    ("retail.sql", include_str!("../views/retail.sql")),
];

/// Parameters of the retail views (`[retail]` in `storepulse.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetailParams {
    /// Half-life of the decayed sales rate `sales_velocity.units_per_hour`
    /// (a sale this long ago weighs half as much as one now).
    #[serde(with = "humantime_serde")]
    pub velocity_half_life: Duration,
    /// Days of per-day stock figures kept per (store, SKU) for
    /// `inventory_turnover` (at least 8, so the previous full week is there).
    pub turnover_days: u32,
    /// `slow_movers`: the look-back horizon.
    #[serde(with = "humantime_serde")]
    pub slow_mover_horizon: Duration,
    /// `slow_movers`: a SKU with stock that sold at most this many units
    /// over the horizon is slow.
    pub slow_mover_max_units: i64,
    /// `transfer_suggestions`: a store can give stock away when its cover
    /// exceeds this (and keeps at least this much cover and its reorder
    /// point after the transfer).
    #[serde(with = "humantime_serde")]
    pub transfer_excess_cover: Duration,
    /// Lead time used when no `replenishment_policy` row matches the store's
    /// format and the product's category.
    pub default_lead_time_hours: f64,
    /// Service level used when no policy row matches.
    pub default_service_level: f64,
    /// Review period used when no policy row matches.
    pub default_review_hours: f64,
    /// Minimum stock used when no policy row matches.
    pub default_min_stock: i64,
    /// Alert `low_stock`: fires when `p_stockout` exceeds this.
    pub low_stock_probability: f64,
    /// Alert `low_stock`: how long the risk must hold first.
    #[serde(with = "humantime_serde")]
    pub low_stock_for: Duration,
    /// Alert `low_cover`: warns this far ahead of the day the cover falls
    /// below lead time + review period (at the current demand).
    pub low_cover_days: f64,
    /// `member_churn_risk`: a member is lapsing after this many usual gaps
    /// between purchase days without a purchase.
    pub churn_gap_factor: f64,
    /// `member_churn_risk`: purchase days needed before a usual gap is
    /// estimated (fewer: no gap, never lapsing).
    pub churn_min_purchase_days: i64,
    /// `loss_rate.above_target`: the share of waste in the cost of what
    /// left the shelves (waste / (COGS + waste)) operators aim to stay under.
    pub loss_rate_target: f64,
    /// Alert `store_silent`: a store with no event on any stream for this
    /// long, while at least half of the chain's stores had one.
    #[serde(with = "humantime_serde")]
    pub store_silent_after: Duration,
    /// `open_orders.overdue` and alert `order_overdue`: an order line still
    /// open this long after its expected arrival.
    #[serde(with = "humantime_serde")]
    pub order_overdue_after: Duration,
    /// `stock_in_transit.overdue` and alert `transfer_overdue`: a transfer
    /// shipped this long ago and not (fully) received.
    #[serde(with = "humantime_serde")]
    pub transfer_overdue_after: Duration,
    /// Alert `near_expiry`: a lot with units on the shelf this close to its
    /// `expires_at` (or past it).
    #[serde(with = "humantime_serde")]
    pub near_expiry_within: Duration,
    /// `price_mismatches`: a line is off when its `unit_price` differs from the
    /// list price in force by more than this (money, up to six decimals).
    pub price_tolerance: f64,
    /// Alert `price_mismatch`: off-price lines needed in the current price
    /// period before it fires.
    pub price_mismatch_min_lines: i64,
    /// Alert `price_mismatch`: only while the latest off-price line is at
    /// most this old (at the chain clock): it resolves this long after the
    /// last one.
    #[serde(with = "humantime_serde")]
    pub price_mismatch_within: Duration,
    /// Alert `cold_chain`: fridge limit (°C).
    pub cold_chain_max_celsius: f64,
    /// Alert `cold_chain`: how long a fridge must read above the limit.
    #[serde(with = "humantime_serde")]
    pub cold_chain_duration: Duration,
    /// Alert `sales_stall`: only SKUs selling at least this many units per
    /// hour (decayed rate).
    pub sales_stall_min_units_per_hour: f64,
    /// Alert `sales_stall`: fires when the time since the last sale exceeds
    /// this many expected gaps between units (1 / units_per_hour).
    pub sales_stall_factor: f64,
}

impl Default for RetailParams {
    fn default() -> Self {
        Self {
            velocity_half_life: Duration::from_secs(24 * 3600),
            turnover_days: 14,
            slow_mover_horizon: Duration::from_secs(7 * 24 * 3600),
            slow_mover_max_units: 1,
            transfer_excess_cover: Duration::from_secs(14 * 24 * 3600),
            default_lead_time_hours: 48.0,
            default_service_level: 0.95,
            default_review_hours: 24.0,
            default_min_stock: 0,
            low_stock_probability: 0.8,
            low_stock_for: Duration::from_secs(60),
            low_cover_days: 7.0,
            churn_gap_factor: 3.0,
            churn_min_purchase_days: 3,
            store_silent_after: Duration::from_secs(3600),
            loss_rate_target: 0.03,
            order_overdue_after: Duration::from_secs(2 * 3600),
            transfer_overdue_after: Duration::from_secs(48 * 3600),
            near_expiry_within: Duration::from_secs(24 * 3600),
            price_tolerance: 0.005,
            price_mismatch_min_lines: 2,
            price_mismatch_within: Duration::from_secs(24 * 3600),
            cold_chain_max_celsius: 5.0,
            cold_chain_duration: Duration::from_secs(30 * 60),
            sales_stall_min_units_per_hour: 0.5,
            sales_stall_factor: 6.0,
        }
    }
}

fn interval(d: Duration) -> String {
    format!("INTERVAL '{} milliseconds'", d.as_millis())
}

fn hours(d: Duration) -> String {
    format!("{:?}", d.as_secs_f64() / 3600.0)
}

impl RetailParams {
    /// Checks the values (a bad one names its key).
    pub fn validate(&self) -> Result<(), String> {
        let positive = |d: Duration, k: &str| {
            if d.as_millis() == 0 {
                Err(format!("retail.{k} must be positive"))
            } else {
                Ok(())
            }
        };
        positive(self.velocity_half_life, "velocity_half_life")?;
        positive(self.slow_mover_horizon, "slow_mover_horizon")?;
        positive(self.transfer_excess_cover, "transfer_excess_cover")?;
        if self.turnover_days < 8 {
            return Err("retail.turnover_days must be at least 8".into());
        }
        if !(self.low_stock_probability >= 0.0 && self.low_stock_probability < 1.0) {
            return Err("retail.low_stock_probability must be in [0, 1)".into());
        }
        if !(self.low_cover_days >= 0.0 && self.low_cover_days.is_finite()) {
            return Err("retail.low_cover_days must be a number of days ≥ 0".into());
        }
        if !(self.churn_gap_factor > 0.0 && self.churn_gap_factor.is_finite()) {
            return Err("retail.churn_gap_factor must be > 0".into());
        }
        if self.churn_min_purchase_days < 2 {
            return Err("retail.churn_min_purchase_days must be at least 2".into());
        }
        positive(self.store_silent_after, "store_silent_after")?;
        positive(self.order_overdue_after, "order_overdue_after")?;
        positive(self.transfer_overdue_after, "transfer_overdue_after")?;
        if !(0.0..1.0).contains(&self.loss_rate_target) {
            return Err("retail.loss_rate_target must be in [0, 1)".into());
        }
        positive(self.cold_chain_duration, "cold_chain_duration")?;
        if !(self.price_tolerance >= 0.0 && self.price_tolerance < 1e12) {
            return Err("retail.price_tolerance must be an amount of money ≥ 0".into());
        }
        if self.price_mismatch_min_lines < 1 {
            return Err("retail.price_mismatch_min_lines must be at least 1".into());
        }
        positive(self.price_mismatch_within, "price_mismatch_within")?;
        positive(self.near_expiry_within, "near_expiry_within")?;
        if !(self.sales_stall_min_units_per_hour > 0.0 && self.sales_stall_factor > 0.0) {
            return Err(
                "retail.sales_stall_min_units_per_hour and sales_stall_factor must be > 0".into(),
            );
        }
        if !(self.default_service_level > 0.0 && self.default_service_level < 1.0) {
            return Err("retail.default_service_level must be in (0, 1)".into());
        }
        if !(self.default_lead_time_hours >= 0.0 && self.default_review_hours >= 0.0) {
            return Err(
                "retail.default_lead_time_hours and default_review_hours must be ≥ 0".into(),
            );
        }
        Ok(())
    }

    /// `(placeholder, SQL text)` pairs.
    fn values(&self) -> Vec<(&'static str, String)> {
        let panes = self
            .slow_mover_horizon
            .max(Duration::from_secs(7 * 24 * 3600));
        vec![
            ("velocity_half_life", interval(self.velocity_half_life)),
            ("velocity_half_life_hours", hours(self.velocity_half_life)),
            (
                "turnover_days",
                interval(Duration::from_secs(self.turnover_days as u64 * 86_400)),
            ),
            ("hourly_panes_kept", interval(panes)),
            (
                "slow_mover_horizon_hours",
                format!("{}", self.slow_mover_horizon.as_secs().div_ceil(3600)),
            ),
            (
                "slow_mover_max_units",
                self.slow_mover_max_units.to_string(),
            ),
            (
                "transfer_excess_cover_hours",
                hours(self.transfer_excess_cover),
            ),
            (
                "default_lead_time_hours",
                format!("{:?}", self.default_lead_time_hours),
            ),
            (
                "default_service_level",
                format!("{:?}", self.default_service_level),
            ),
            (
                "default_review_hours",
                format!("{:?}", self.default_review_hours),
            ),
            ("default_min_stock", self.default_min_stock.to_string()),
            (
                "low_stock_probability",
                format!("{:?}", self.low_stock_probability),
            ),
            (
                "low_stock_for",
                format!("{}ms", self.low_stock_for.as_millis()),
            ),
            (
                "low_cover_hours",
                format!("{:?}", self.low_cover_days * 24.0),
            ),
            ("churn_gap_factor", format!("{:?}", self.churn_gap_factor)),
            ("loss_rate_target", format!("{:?}", self.loss_rate_target)),
            (
                "order_overdue_hours",
                format!("{:?}", self.order_overdue_after.as_secs_f64() / 3600.0),
            ),
            (
                "transfer_overdue_hours",
                format!("{:?}", self.transfer_overdue_after.as_secs_f64() / 3600.0),
            ),
            (
                "store_silent_minutes",
                format!("{:?}", self.store_silent_after.as_secs_f64() / 60.0),
            ),
            (
                "churn_min_purchase_days",
                self.churn_min_purchase_days.to_string(),
            ),
            ("near_expiry_hours", hours(self.near_expiry_within)),
            (
                "price_tolerance",
                format!("CAST('{:.6}' AS DECIMAL(18, 6))", self.price_tolerance),
            ),
            (
                "price_mismatch_min_lines",
                self.price_mismatch_min_lines.to_string(),
            ),
            (
                "price_mismatch_within_secs",
                format!("{:?}", self.price_mismatch_within.as_secs_f64()),
            ),
            (
                "cold_chain_max_celsius",
                format!("{:?}", self.cold_chain_max_celsius),
            ),
            (
                "cold_chain_duration_secs",
                format!("{:?}", self.cold_chain_duration.as_secs_f64()),
            ),
            (
                "sales_stall_min_units_per_hour",
                format!("{:?}", self.sales_stall_min_units_per_hour),
            ),
            (
                "sales_stall_factor",
                format!("{:?}", self.sales_stall_factor),
            ),
        ]
    }

    /// `sql` with every `${name}` replaced; an unknown name is an error
    /// naming it and its line.
    pub fn render(&self, sql: &str) -> Result<String, SqlError> {
        let values = self.values();
        let mut out = String::with_capacity(sql.len());
        let mut rest = sql;
        while let Some(i) = rest.find("${") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let line = sql[..sql.len() - rest.len() + i].lines().count().max(1);
            let Some(end) = after.find('}') else {
                return Err(SqlError::Template {
                    line,
                    message: "unterminated ${".into(),
                });
            };
            let name = &after[..end];
            match values.iter().find(|(k, _)| *k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    return Err(SqlError::Template {
                        line,
                        message: format!(
                            "unknown parameter ${{{name}}} (known: {})",
                            values
                                .iter()
                                .map(|(k, _)| *k)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    })
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// The built-in alert rules (`sql/alerts/builtin.sql`): `(file name,
/// rendered SQL)`. They read the retail views, so load them after
/// [`scripts`].
pub fn alert_script(params: &RetailParams) -> Result<(&'static str, String), SqlError> {
    Ok(("alerts/builtin.sql", params.render(ALERTS)?))
}

/// The raw built-in alert rules (with `${placeholders}`).
pub const ALERTS: &str = include_str!("../alerts/builtin.sql");

/// The built-in scripts with parameters filled in: `(file name, SQL)`.
pub fn scripts(params: &RetailParams) -> Result<Vec<(&'static str, String)>, SqlError> {
    VIEWS
        .iter()
        .map(|(f, sql)| Ok((*f, params.render(sql)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_placeholder_and_names_unknown_ones() {
        let p = RetailParams::default();
        for (f, sql) in scripts(&p).unwrap() {
            assert!(!sql.contains("${"), "{f}");
        }
        let e = p
            .render("SELECT 1;\nSELECT ${nope}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("${nope}"), "{e}");
        assert!(RetailParams {
            turnover_days: 3,
            ..p
        }
        .validate()
        .unwrap_err()
        .contains("turnover_days"));
    }
}
