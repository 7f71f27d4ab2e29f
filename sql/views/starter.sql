-- Starter views: loaded by `storepulse demo` and by `run` unless
-- `[sql] builtin = false`. Each is maintained incrementally per micro-batch.
-- Receipts are counted once each through their first line (`line_no = 0`):
-- duplicates are already dropped, and no set of receipt ids is kept.

-- Receipts, units and revenue per store and hour (tumbling window).
CREATE MATERIALIZED VIEW sales_by_store_hourly AS
SELECT
    store_id,
    date_bin(INTERVAL '1 hour', ts) AS window_start,
    date_bin(INTERVAL '1 hour', ts) + INTERVAL '1 hour' AS window_end,
    count(*) FILTER (WHERE line_no = 0) AS receipts,
    sum(qty) AS units,
    sum(coalesce(amount, qty * unit_price - coalesce(discount, 0))) AS revenue
FROM sales
GROUP BY store_id, date_bin(INTERVAL '1 hour', ts);

-- Units per store and SKU over the last 24 hours, sliding every hour.
CREATE MATERIALIZED VIEW sku_sales_24h AS
SELECT
    store_id,
    sku,
    window_start,
    window_start + INTERVAL '24 hours' AS window_end,
    sum(qty) AS units,
    count(*) AS lines
FROM (SELECT *, unnest(hop(ts, INTERVAL '1 hour', INTERVAL '24 hours')) AS window_start FROM sales)
GROUP BY store_id, sku, window_start;

-- Per member, chain-wide (an updating view, no window).
CREATE MATERIALIZED VIEW member_activity AS
SELECT
    member_id,
    count(*) FILTER (WHERE line_no = 0) AS receipts,
    count(DISTINCT store_id) AS stores_visited,
    sum(coalesce(amount, qty * unit_price - coalesce(discount, 0))) AS spend,
    min(ts) AS first_seen,
    max(ts) AS last_seen,
    last_value(store_id ORDER BY ts) AS last_store
FROM sales
WHERE member_id IS NOT NULL
GROUP BY member_id;

-- Fridge temperature per device and 15 minutes.
CREATE MATERIALIZED VIEW fridge_temp_15m AS
SELECT
    store_id,
    device_id,
    date_bin(INTERVAL '15 minutes', ts) AS window_start,
    min(value) AS min_c,
    max(value) AS max_c,
    avg(value) AS avg_c,
    count(*) AS readings
FROM iot_readings
WHERE metric = 'fridge_temp_c'
GROUP BY store_id, device_id, date_bin(INTERVAL '15 minutes', ts);

-- Net stock movement per store, SKU and kind (updating).
CREATE MATERIALIZED VIEW stock_movement_totals AS
SELECT store_id, sku, kind, sum(qty) AS qty, count(*) AS movements, max(ts) AS last_ts
FROM stock_movements
GROUP BY store_id, sku, kind;

-- (latest_stock_count, the newest count per store and SKU, is in
-- retail.sql: it reads the stock ledger of sku_activity.)

-- Sales per store and minute (the dashboard's live chart; sum over stores
-- for the chain, or filter by store or city through `stores`).
CREATE MATERIALIZED VIEW sales_per_minute AS
SELECT store_id, date_bin(INTERVAL '1 minute', ts) AS minute,
    count(*) FILTER (WHERE line_no = 0) AS receipts,
    sum(coalesce(amount, qty * unit_price - coalesce(discount, 0))) AS revenue
FROM sales
GROUP BY store_id, date_bin(INTERVAL '1 minute', ts);

-- A query-time view over a live view: revenue per store today.
CREATE VIEW store_revenue AS
SELECT store_id, sum(revenue) AS revenue, sum(receipts) AS receipts
FROM sales_by_store_hourly
GROUP BY store_id;
