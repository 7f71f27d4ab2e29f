-- Built-in alert rules (loaded with the built-in views unless
-- [alerts] builtin = false). Documented in docs/alerts.md. Dollar-brace
-- placeholders are filled from the [retail] config table.

-- Stock-out risk: the replenishment trigger. The payload carries the
-- suggested order and, where a nearby store can spare stock, the transfer.
-- A level below the policy's min_stock fires too, even with no demand
-- (p_stockout is then 0): `reason` says which.
CREATE ALERT low_stock AS
SELECT r.store_id, r.sku, r.city, r.category, r.on_hand, r.units_per_hour,
    r.hours_of_cover, r.lead_time_hours, r.reorder_point, r.p_stockout,
    r.suggested_order_qty, r.case_pack, r.demand_model, r.min_stock, r.policy_source,
    CASE WHEN r.p_stockout > ${low_stock_probability} THEN 'stockout_risk'
         ELSE 'below_min_stock' END AS reason,
    t.from_store AS transfer_from_store, t.qty AS transfer_qty,
    r.as_of
FROM stockout_risk r
LEFT JOIN transfer_suggestions t ON t.sku = r.sku AND t.to_store = r.store_id
WHERE (r.p_stockout > ${low_stock_probability} OR r.on_hand < r.min_stock)
  AND r.suggested_order_qty > 0
WITH (key = 'store_id, sku', every = '10s', for = '${low_stock_for}',
      keep_firing_for = '30m', renotify = '6h', severity = 'warning');

-- Low cover ahead: at the current demand the cover falls below lead time +
-- review period within low_cover_days, so the order is due soon; a heads-up
-- before low_stock (which takes over once an order is suggested). Evaluated
-- every 5 minutes: it reads every (store, SKU) like low_stock.
CREATE ALERT low_cover AS
SELECT store_id, sku, city, category, on_hand, units_per_hour, hours_of_cover,
    lead_time_hours, review_hours,
    (hours_of_cover - lead_time_hours - review_hours) / 24.0 AS days_until_order,
    policy_source, as_of
FROM stockout_risk
WHERE hours_of_cover IS NOT NULL
  AND hours_of_cover < lead_time_hours + review_hours + ${low_cover_hours}
  AND suggested_order_qty = 0
  AND on_order + in_transit = 0
WITH (key = 'store_id, sku', every = '5m', keep_firing_for = '1h', renotify = '24h',
      severity = 'info');

-- A purchase order line still open order_overdue_after past its expected
-- arrival: the supplier is late, or the receipt was booked without the
-- order_id (then on_order counts it twice until it is closed).
CREATE ALERT order_overdue AS
SELECT store_id, order_id, sku, ordered_qty, received_qty, open_qty, placed_at,
    expected_at, hours_late, as_of
FROM open_orders
WHERE overdue
WITH (key = 'store_id, order_id, sku', every = '1m', keep_firing_for = '10m',
      renotify = '24h', severity = 'warning');

-- Stock shipped to another store and not (all) received within
-- transfer_overdue_after: lost in transit, or a transfer_in not recorded.
CREATE ALERT transfer_overdue AS
SELECT transfer_id, sku, from_store, to_store, shipped_qty, received_qty, in_transit_qty,
    shipped_at, age_hours, as_of
FROM stock_in_transit
WHERE overdue
WITH (key = 'transfer_id, sku', every = '1m', keep_firing_for = '10m', renotify = '24h',
      severity = 'warning');

-- A store charging another price than the list price in force
-- (price_mismatches): at least price_mismatch_min_lines lines of a price
-- period off the list price, the latest within price_mismatch_within of the
-- chain clock (a backfill does not page about last year). It resolves
-- once no line has been off for price_mismatch_within. It reads only the
-- lines off (a few groups), not price_deviations, whose still_mismatched
-- needs every pair's latest sale (sku_activity, millions of pairs).
CREATE ALERT price_mismatch AS
SELECT m.store_id, m.sku, s.city, m.list_price, m.min_charged_price, m.max_charged_price,
    m.price_valid_from, m.price_source, m.mismatched_lines,
    coalesce(m.lost_revenue, 0) AS lost_revenue,
    coalesce(m.excess_revenue, 0) AS excess_revenue,
    m.first_mismatch_ts, m.last_mismatch_ts, k.as_of
FROM price_mismatches m
CROSS JOIN engine_clock k
LEFT JOIN stores s ON s.store_id = m.store_id
WHERE m.mismatched_lines >= ${price_mismatch_min_lines}
  AND extract(epoch FROM k.as_of) - extract(epoch FROM m.last_mismatch_ts)
      <= ${price_mismatch_within_secs}
WITH (key = 'store_id, sku', every = '1m', keep_firing_for = '30m', renotify = '24h',
      severity = 'warning');

-- Perishable stock about to expire (or just expired) on the shelf
-- (expiring_stock: first in, first out): mark it down, move it, or write it
-- off before it is sold past its date. A lot expired longer ago than
-- near_expiry_within resolves (expiring_stock still lists it): a long-tail
-- SKU's lot left unsold for months would otherwise renotify for ever.
CREATE ALERT near_expiry AS
SELECT store_id, sku, lot, on_hand_est, received_qty, expires_at, hours_to_expiry,
    CASE WHEN expired THEN 'expired' ELSE 'near_expiry' END AS reason, as_of
FROM expiring_stock
WHERE hours_to_expiry <= ${near_expiry_hours} AND hours_to_expiry > -${near_expiry_hours}
WITH (key = 'store_id, sku, lot', every = '15m', keep_firing_for = '1h', renotify = '24h',
      severity = 'warning');

-- Fridge readings per device: the last reading, the last one at or below
-- the limit, the first one (order independent: max/min of event time).
CREATE MATERIALIZED VIEW fridge_status AS
SELECT store_id, device_id,
    min(ts) AS first_reading_ts,
    max(ts) AS last_reading_ts,
    max(ts) FILTER (WHERE value <= ${cold_chain_max_celsius}) AS last_ok_ts,
    last_value(value ORDER BY ts) AS last_value_c,
    max(value) AS max_value_c
FROM iot_readings
WHERE metric = 'fridge_temp_c'
GROUP BY store_id, device_id;

-- Cold chain: the fridge has read above the limit continuously (no reading
-- at or below it) for the configured time, up to its latest reading.
CREATE ALERT cold_chain AS
SELECT store_id, device_id, last_value_c AS temperature_c,
    ${cold_chain_max_celsius} AS limit_c,
    coalesce(last_ok_ts, first_reading_ts) AS above_since,
    last_reading_ts,
    (extract(epoch FROM last_reading_ts)
        - extract(epoch FROM coalesce(last_ok_ts, first_reading_ts))) / 60.0 AS minutes_above
FROM fridge_status
WHERE last_value_c > ${cold_chain_max_celsius}
  AND extract(epoch FROM last_reading_ts)
      - extract(epoch FROM coalesce(last_ok_ts, first_reading_ts)) >= ${cold_chain_duration_secs}
WITH (key = 'store_id, device_id', every = '10s', keep_firing_for = '10m',
      renotify = '1h', severity = 'critical');

-- Sales stall: a SKU that normally sells, with stock on the shelf, in a
-- store that is open and selling other things, has not sold for far longer
-- than its velocity predicts (an empty shelf face, a wrong price, a broken
-- scanner). Time counts only while the store is open (open_hours: its
-- opening hours in stores; a store without them is always open), so a SKU
-- last sold before closing does not stall overnight, and "selling other
-- things" is a sale within the last 30 minutes of opening time.
CREATE ALERT sales_stall AS
WITH v AS (
    SELECT v.store_id, v.sku, v.units_per_hour, v.last_sale_ts, v.as_of,
        open_hours(v.store_id, v.last_sale_ts, v.as_of) AS hours_since_sale
    FROM sales_velocity v
    WHERE v.units_per_hour >= ${sales_stall_min_units_per_hour}
), open_stores AS (
    SELECT store_id, max(last_sale_ts) AS store_last_sale_ts, max(as_of) AS as_of
    FROM sales_velocity GROUP BY store_id
)
SELECT v.store_id, v.sku, v.units_per_hour, v.last_sale_ts, v.hours_since_sale,
    ${sales_stall_factor} / v.units_per_hour AS expected_gap_hours,
    s.on_hand
FROM v
JOIN stock_on_hand s ON s.store_id = v.store_id AND s.sku = v.sku
JOIN open_stores o ON o.store_id = v.store_id
WHERE s.on_hand > 0
  AND v.hours_since_sale > ${sales_stall_factor} / v.units_per_hour
  AND store_open(o.store_id, o.as_of)
  AND open_hours(o.store_id, o.store_last_sale_ts, o.as_of) <= 0.5
WITH (key = 'store_id, sku', every = '1m', for = '10m', keep_firing_for = '30m',
      renotify = '12h', severity = 'info');

-- A member lapsing: silent for more than churn_gap_factor times their usual
-- gap between purchase days (member_churn_risk), for win-back campaigns.
CREATE ALERT member_lapsing AS
SELECT member_id, last_purchase_ts, purchase_days, usual_gap_days, days_since_last,
    gaps_since_last, monetary, as_of
FROM member_churn_risk
WHERE lapsing
WITH (key = 'member_id', every = '1h', keep_firing_for = '1d', renotify = '30d',
      severity = 'info');

-- A store fallen silent: no event on any stream for store_silent_after of
-- its opening time (open_hours: a store with opening hours in stores is
-- silent only while open; the night does not count). A store without
-- opening hours is silent after store_silent_after of wall-clock time, and
-- only while at least half of the chain's stores sent an event in that
-- time (so a chain closed for the night does not fire). A store back
-- online resolves it.
CREATE ALERT store_silent AS
WITH s AS (
    SELECT store_id, max(last_event_ts) AS last_event_ts, max(as_of) AS as_of
    FROM store_sync_status GROUP BY store_id
), t AS (
    SELECT s.store_id, s.last_event_ts, s.as_of,
        open_hours(s.store_id, s.last_event_ts, s.as_of) * 60.0 AS minutes_silent,
        st.opens IS NOT NULL AS has_hours
    FROM s LEFT JOIN stores st ON st.store_id = s.store_id
), chain AS (
    SELECT count(*) AS stores,
        count(*) FILTER (WHERE minutes_silent <= ${store_silent_minutes}) AS active_stores
    FROM t
)
SELECT t.store_id, t.last_event_ts, t.minutes_silent, t.has_hours, chain.active_stores,
    chain.stores, t.as_of
FROM t CROSS JOIN chain
WHERE t.minutes_silent > ${store_silent_minutes}
  AND (t.has_hours OR chain.active_stores * 2 >= chain.stores)
WITH (key = 'store_id', every = '1m', for = '5m', keep_firing_for = '30m', renotify = '6h',
      severity = 'warning');
