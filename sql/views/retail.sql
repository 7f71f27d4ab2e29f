-- Retail views: what chains buy storepulse for. Documented column by column
-- in docs/views.md. Dollar-brace placeholders are filled from the [retail]
-- config table.
--
-- Three materialized views keep order-independent state per key:
--   sku_activity     (store, SKU): stock ledger, decayed velocity, hourly panes
--   sku_stock_days   (store, SKU): per-day on-hand figures for turnover
--   member_purchases (card) and member_identity (card → chain member)
--   store_stream_activity (store, stream): first/last event, events
--   store_category_losses (store, category, month): waste and sales at cost
--   order_lines      (store, order, SKU): ordered, cancelled, received
--   transfers        (transfer, SKU): shipped and received between stores
--   price_mismatches (store, SKU, price period): lines off the list price
--   stock_lots       (store, SKU, lot): units received, wasted, expiry
-- Everything else is a query-time view over them, the dimension tables
-- (stores, products, replenishment_policy, prices) and engine_clock (as_of).

-- Counts, movements and sales of one (store, SKU) as one event stream.
CREATE MATERIALIZED VIEW sku_activity AS
SELECT store_id, sku,
    stock_ledger(ts, counted, delta, sold, received, floor) AS ledger,
    decayed_sum(sold, ts, ${velocity_half_life}) AS units_decayed,
    decayed_sum(sold * sold, ts, ${velocity_half_life}) AS units_sq_decayed,
    hourly_units(sold, ts, ${hourly_panes_kept}) AS hourly,
    sum(sold) AS units_sold,
    max(ts) FILTER (WHERE sold > 0) AS last_sale_ts,
    min(ts) AS first_seen
FROM (
    SELECT store_id, sku, ts, on_hand AS counted, CAST(NULL AS BIGINT) AS delta,
           CAST(NULL AS BIGINT) AS sold, CAST(0 AS BIGINT) AS received,
           watermark_floor() AS floor
    FROM stock_counts
    UNION ALL
    SELECT store_id, sku, ts, CAST(NULL AS BIGINT), qty, CAST(NULL AS BIGINT),
           CASE WHEN kind IN ('receipt', 'transfer_in') THEN qty ELSE 0 END,
           watermark_floor()
    FROM stock_movements
    UNION ALL
    SELECT store_id, sku, ts, CAST(NULL AS BIGINT), -qty, qty, CAST(0 AS BIGINT),
           watermark_floor()
    FROM sales
)
GROUP BY store_id, sku;

-- The newest stock count per store and SKU (by event time; of two counts
-- at the same instant, the larger), read from the ledger: no state of its
-- own (it was a materialized view of its own, 173 bytes per pair).
CREATE VIEW latest_stock_count AS
SELECT store_id, sku, ledger['last_count'] AS on_hand, ledger['last_count_ts'] AS counted_at
FROM sku_activity
WHERE ledger['last_count_ts'] IS NOT NULL;

-- Per-day on-hand figures (begin, end, time integral, sold, received) by
-- the store's business day: the rows' times and the floor are on the
-- store's wall clock (local_time), so a day runs from local midnight.
CREATE MATERIALIZED VIEW sku_stock_days AS
SELECT store_id, sku,
    stock_days(local_time(store_id, ts), counted, delta, sold, received,
               local_time(store_id, floor), ${turnover_days}) AS days
FROM (
    SELECT store_id, sku, ts, on_hand AS counted, CAST(NULL AS BIGINT) AS delta,
           CAST(NULL AS BIGINT) AS sold, CAST(0 AS BIGINT) AS received,
           watermark_floor() AS floor
    FROM stock_counts
    UNION ALL
    SELECT store_id, sku, ts, CAST(NULL AS BIGINT), qty, CAST(NULL AS BIGINT),
           CASE WHEN kind IN ('receipt', 'transfer_in') THEN qty ELSE 0 END,
           watermark_floor()
    FROM stock_movements
    UNION ALL
    SELECT store_id, sku, ts, CAST(NULL AS BIGINT), -qty, qty, CAST(0 AS BIGINT),
           watermark_floor()
    FROM sales
)
GROUP BY store_id, sku;

-- Purchases per member card as written on the receipt.
CREATE MATERIALIZED VIEW member_purchases AS
SELECT member_id AS card_id,
    min(ts) AS first_purchase_ts,
    max(ts) AS last_purchase_ts,
    count(*) FILTER (WHERE line_no = 0) AS receipts,
    distinct_days(ts) AS purchase_days,
    sum(coalesce(amount, qty * unit_price - coalesce(discount, 0))) AS monetary
FROM sales
WHERE member_id IS NOT NULL
GROUP BY member_id;

-- Store-local card → chain-wide member id (the latest link wins).
CREATE MATERIALIZED VIEW member_identity AS
SELECT local_member_id,
    last_value(member_id ORDER BY ts, member_id) AS member_id,
    max(ts) AS linked_at
FROM member_links
GROUP BY local_member_id;

-- Per store and stream: when it last sent an event, and how many it sent.
-- Four groups per store per stream: a few KB for a chain.
CREATE MATERIALIZED VIEW store_stream_activity AS
SELECT store_id, stream, min(ts) AS first_event_ts, max(ts) AS last_event_ts,
    count(*) AS events
FROM (
    SELECT store_id, 'sales' AS stream, ts FROM sales WHERE line_no = 0
    UNION ALL SELECT store_id, 'stock_movements', ts FROM stock_movements
    UNION ALL SELECT store_id, 'stock_counts', ts FROM stock_counts
    UNION ALL SELECT store_id, 'iot_readings', ts FROM iot_readings
    UNION ALL SELECT store_id, 'member_links', ts FROM member_links
    UNION ALL SELECT store_id, 'purchase_orders', ts FROM purchase_orders
)
GROUP BY store_id, stream;

-- Losses per store, product category and business month (the store's
-- local calendar, local_time): waste (stock movements of kind 'waste',
-- recorded negative) against what sold, both valued at the product's
-- unit_cost when the event was applied (a later change of cost or category
-- does not rewrite past months). Stores x categories x months.
CREATE MATERIALIZED VIEW store_category_losses AS
SELECT x.store_id, coalesce(p.category, 'unknown') AS category,
    date_trunc('month', local_time(x.store_id, x.ts)) AS month,
    sum(x.waste_units) AS waste_units,
    sum(CAST(x.waste_units AS DOUBLE) * coalesce(p.unit_cost, 0.0)) AS waste_cost,
    sum(x.sold_units) AS sold_units,
    sum(CAST(x.sold_units AS DOUBLE) * coalesce(p.unit_cost, 0.0)) AS cogs
FROM (
    SELECT store_id, sku, ts, -qty AS waste_units, CAST(0 AS BIGINT) AS sold_units
    FROM stock_movements WHERE kind = 'waste'
    UNION ALL
    SELECT store_id, sku, ts, CAST(0 AS BIGINT), qty FROM sales
) x
LEFT JOIN products p ON p.sku = x.sku
GROUP BY x.store_id, coalesce(p.category, 'unknown'),
    date_trunc('month', local_time(x.store_id, x.ts));

-- Stock counts checked against the level derived before them (the
-- previous count plus the movements and sales after it), per store and SKU:
-- the latest count's variance and the shrinkage summed over every count
-- after the first, in units and at the product's current unit_cost.
CREATE VIEW count_variance AS
SELECT a.store_id, a.sku, p.category,
    a.ledger['last_count_ts'] AS last_count_ts,
    a.ledger['last_count'] AS last_count,
    a.ledger['last_count'] - a.ledger['last_count_variance'] AS derived_before_count,
    a.ledger['last_count_variance'] AS last_count_variance,
    CAST(a.ledger['last_count_variance'] AS DOUBLE) * coalesce(p.unit_cost, 0.0)
        AS last_count_variance_cost,
    a.ledger['counts_checked'] AS counts_checked,
    a.ledger['shrinkage_units'] AS shrinkage_units,
    CAST(a.ledger['shrinkage_units'] AS DOUBLE) * coalesce(p.unit_cost, 0.0) AS shrinkage_cost,
    c.as_of
FROM sku_activity a
CROSS JOIN engine_clock c
LEFT JOIN products p ON p.sku = a.sku
WHERE a.ledger['counts_checked'] > 0;

-- Loss rate per store, category and business month and year (local
-- calendar), against the operators' target.
CREATE VIEW loss_rate AS
WITH p AS (
    SELECT store_id, category, 'month' AS period, month AS period_start,
        waste_units, waste_cost, sold_units, cogs
    FROM store_category_losses
    UNION ALL
    SELECT store_id, category, 'year', date_trunc('year', month),
        sum(waste_units), sum(waste_cost), sum(sold_units), sum(cogs)
    FROM store_category_losses
    GROUP BY store_id, category, date_trunc('year', month)
)
SELECT store_id, category, period, period_start, waste_units, waste_cost, sold_units, cogs,
    CASE WHEN cogs + waste_cost > 0 THEN waste_cost / (cogs + waste_cost) END AS loss_rate,
    ${loss_rate_target} AS loss_rate_target,
    coalesce(cogs + waste_cost > 0 AND waste_cost / (cogs + waste_cost) > ${loss_rate_target}, false)
        AS above_target
FROM p;

-- Per store and stream: how far behind the chain's clock its last event
-- is, its rows kept in late_events (later than allowed lateness) and the
-- duplicates dropped (store_duplicates: events it sent again, as an
-- offline store's re-upload does).
CREATE VIEW store_sync_status AS
WITH l AS (
    SELECT store_id, stream, count(*) AS late_events, max(ts) AS last_late_ts
    FROM late_events GROUP BY store_id, stream
)
SELECT a.store_id, a.stream, a.first_event_ts, a.last_event_ts, a.events,
    (extract(epoch FROM c.as_of) - extract(epoch FROM a.last_event_ts)) / 60.0 AS minutes_behind,
    coalesce(l.late_events, 0) AS late_events,
    l.last_late_ts,
    coalesce(d.duplicates, 0) AS duplicates,
    d.last_duplicate_ts,
    c.as_of
FROM store_stream_activity a
CROSS JOIN engine_clock c
LEFT JOIN l ON l.store_id = a.store_id AND l.stream = a.stream
LEFT JOIN store_duplicates d ON d.store_id = a.store_id AND d.stream = a.stream;

-- Each store's clock: its time zone and opening hours (stores), its wall
-- clock and business day at the chain clock, and whether it is open.
CREATE VIEW store_clock AS
SELECT s.store_id, s.city, s.format, coalesce(s.timezone, 'UTC') AS timezone,
    s.opens, s.closes,
    local_time(s.store_id, c.as_of) AS local_time,
    date_trunc('day', local_time(s.store_id, c.as_of)) AS business_day,
    store_open(s.store_id, c.as_of) AS open_now,
    c.as_of
FROM stores s CROSS JOIN engine_clock c;

-- Purchase order lines and what arrived against them, per (store, order,
-- SKU): the ordered quantity and expected arrival of the newest `placed` or
-- `amended` event, whether the newest event is a cancellation, and the
-- units of the receipts (stock_movements of kind `receipt`) naming the
-- order. Of two events of a line at the same instant, either may count as
-- the newest.
CREATE MATERIALIZED VIEW order_lines AS
SELECT store_id, order_id, sku,
    last_value(ordered ORDER BY ts) FILTER (WHERE ordered IS NOT NULL) AS ordered_qty,
    last_value(expected_at ORDER BY ts) FILTER (WHERE expected_at IS NOT NULL) AS expected_at,
    last_value(cancelled ORDER BY ts) FILTER (WHERE cancelled IS NOT NULL) AS cancelled,
    min(ts) FILTER (WHERE cancelled IS NOT NULL) AS placed_at,
    max(ts) FILTER (WHERE cancelled IS NOT NULL) AS updated_at,
    sum(received) AS received_qty,
    max(ts) FILTER (WHERE received IS NOT NULL) AS last_receipt_at
FROM (
    SELECT store_id, order_id, sku, ts,
        CASE WHEN status = 'cancelled' THEN CAST(NULL AS BIGINT) ELSE qty END AS ordered,
        expected_at,
        CASE WHEN status = 'cancelled' THEN CAST(1 AS BIGINT) ELSE CAST(0 AS BIGINT) END
            AS cancelled,
        CAST(NULL AS BIGINT) AS received
    FROM purchase_orders
    UNION ALL
    -- (`CASE WHEN false THEN ts END`: a NULL of the timestamp type.)
    SELECT store_id, order_id, sku, ts, CAST(NULL AS BIGINT), CASE WHEN false THEN ts END,
        CAST(NULL AS BIGINT), qty
    FROM stock_movements
    WHERE order_id IS NOT NULL AND kind = 'receipt'
)
GROUP BY store_id, order_id, sku;

-- Transfers between stores, per (transfer, SKU): who shipped, who received
-- (or was meant to: the shipment's peer_store_id), units and times.
CREATE MATERIALIZED VIEW transfers AS
SELECT transfer_id, sku,
    max(store_id) FILTER (WHERE kind = 'transfer_out') AS from_store,
    max(peer_store_id) FILTER (WHERE kind = 'transfer_out') AS planned_to_store,
    max(store_id) FILTER (WHERE kind = 'transfer_in') AS received_by,
    -sum(qty) FILTER (WHERE kind = 'transfer_out') AS shipped_qty,
    sum(qty) FILTER (WHERE kind = 'transfer_in') AS received_qty,
    min(ts) FILTER (WHERE kind = 'transfer_out') AS shipped_at,
    max(ts) FILTER (WHERE kind = 'transfer_in') AS received_at
FROM stock_movements
WHERE transfer_id IS NOT NULL AND kind IN ('transfer_out', 'transfer_in')
GROUP BY transfer_id, sku;

-- Lots of perishables per (store, SKU, lot): the units received (receipts
-- and transfers in naming the lot), written off (waste naming it), when the
-- lot arrived and when it expires. A lot stays `[engine] state_ttl` after
-- its last movement (90 days unless set).
CREATE MATERIALIZED VIEW stock_lots AS
SELECT store_id, sku, lot,
    sum(qty) FILTER (WHERE kind IN ('receipt', 'transfer_in')) AS received_qty,
    -sum(qty) FILTER (WHERE kind = 'waste') AS wasted_qty,
    min(ts) FILTER (WHERE kind IN ('receipt', 'transfer_in')) AS received_at,
    min(expires_at) AS expires_at
FROM stock_movements
WHERE lot IS NOT NULL
GROUP BY store_id, sku, lot;

-- Sale lines charged off the list price in force at their time and place
-- (price_in_force: the prices dimension, the most specific scope with a row
-- in force), per (store, SKU, price period), a period being the prices row
-- in force. A line is off when its unit_price differs from the list price
-- by more than price_tolerance. Only lines off are kept (a few groups, not
-- one per pair sold); refunds and SKUs with no price in force are not
-- checked. The price is looked up when the line is applied: a prices row
-- added later does not re-check older lines.
CREATE MATERIALIZED VIEW price_mismatches AS
SELECT store_id, sku, price_valid_from, price_source, list_price,
    count(*) AS mismatched_lines,
    sum(qty) AS mismatched_qty,
    sum(qty * (list_price - unit_price)) FILTER (WHERE unit_price < list_price) AS lost_revenue,
    sum(qty * (unit_price - list_price)) FILTER (WHERE unit_price > list_price) AS excess_revenue,
    min(unit_price) AS min_charged_price,
    max(unit_price) AS max_charged_price,
    min(ts) AS first_mismatch_ts,
    max(ts) AS last_mismatch_ts
FROM (
    SELECT store_id, sku, ts, qty, unit_price, p['price'] AS list_price,
        p['valid_from'] AS price_valid_from, p['source'] AS price_source
    FROM (SELECT store_id, sku, ts, qty, unit_price,
              price_in_force(sku, store_id, ts) AS p
          FROM sales WHERE qty > 0)
    WHERE p IS NOT NULL AND abs(unit_price - p['price']) > ${price_tolerance}
)
GROUP BY store_id, sku, price_valid_from, price_source, list_price;

-- One row: the instant deliveries are checked at (`checked_at`): the
-- chain's clock, but no further than the stock movements (where receipts
-- and transfers in arrive) have been seen, so a movements stream read or
-- delivered behind the others (a backfill reading files at different
-- paces, a lagging topic) does not make every order look overdue.
CREATE VIEW receipts_clock AS
SELECT least(c.as_of, coalesce(m.movements_until, c.as_of)) AS checked_at, c.as_of
FROM engine_clock c
CROSS JOIN (SELECT max(last_event_ts) AS movements_until
            FROM store_stream_activity WHERE stream = 'stock_movements') m;

-- Order lines still expected: not cancelled, fewer units received than
-- ordered; overdue once order_overdue_after past the expected arrival, at
-- receipts_clock.checked_at.
CREATE VIEW open_orders AS
WITH o AS (
    SELECT o.store_id, o.order_id, o.sku, o.ordered_qty,
        coalesce(o.received_qty, 0) AS received_qty,
        o.placed_at, o.expected_at, o.last_receipt_at, k.checked_at, k.as_of
    FROM order_lines o CROSS JOIN receipts_clock k
    WHERE coalesce(o.cancelled, 0) = 0 AND o.ordered_qty > coalesce(o.received_qty, 0)
)
SELECT store_id, order_id, sku, ordered_qty, received_qty,
    ordered_qty - received_qty AS open_qty,
    placed_at, expected_at, last_receipt_at,
    (extract(epoch FROM as_of) - extract(epoch FROM placed_at)) / 3600.0 AS age_hours,
    greatest((extract(epoch FROM checked_at) - extract(epoch FROM expected_at)) / 3600.0, 0.0)
        AS hours_late,
    extract(epoch FROM checked_at) - extract(epoch FROM expected_at)
        > ${order_overdue_hours} * 3600 AS overdue,
    checked_at,
    as_of
FROM o;

-- Units shipped from one store to another and not (all) received yet: the
-- destination is the receiving store once a transfer_in arrived, else the
-- shipment's peer_store_id (NULL if it named none). Overdue after
-- transfer_overdue_after, at receipts_clock.checked_at.
CREATE VIEW stock_in_transit AS
WITH t AS (
    SELECT t.transfer_id, t.sku, t.from_store,
        coalesce(t.received_by, t.planned_to_store) AS to_store,
        t.shipped_qty, coalesce(t.received_qty, 0) AS received_qty,
        t.shipped_at, t.received_at, k.checked_at, k.as_of
    FROM transfers t CROSS JOIN receipts_clock k
    WHERE t.shipped_qty > coalesce(t.received_qty, 0)
)
SELECT transfer_id, sku, from_store, to_store, shipped_qty, received_qty,
    shipped_qty - received_qty AS in_transit_qty,
    shipped_at, received_at,
    (extract(epoch FROM checked_at) - extract(epoch FROM shipped_at)) / 3600.0 AS age_hours,
    extract(epoch FROM checked_at) - extract(epoch FROM shipped_at)
        > ${transfer_overdue_hours} * 3600 AS overdue,
    checked_at,
    as_of
FROM t;

-- Stock is known (counted), derived (a count or opening balance plus the
-- movements and sales after it) or unknown (neither: on_hand is NULL).
CREATE VIEW stock_on_hand AS
WITH l AS (
    SELECT a.store_id, a.sku, a.ledger, o.on_hand AS opening_on_hand, c.as_of
    FROM sku_activity a
    CROSS JOIN engine_clock c
    LEFT JOIN opening_stock o ON o.store_id = a.store_id AND o.sku = a.sku
)
SELECT store_id, sku,
    CASE WHEN ledger['last_count_ts'] IS NOT NULL THEN ledger['on_hand']
         ELSE opening_on_hand + ledger['on_hand'] END AS on_hand,
    CASE WHEN ledger['last_count_ts'] IS NULL AND opening_on_hand IS NULL THEN 'unknown'
         WHEN ledger['last_count_ts'] >= ledger['last_ts'] THEN 'counted'
         ELSE 'derived' END AS stock_status,
    ledger['last_count_ts'] AS last_count_ts,
    ledger['last_count'] AS last_count,
    opening_on_hand,
    ledger['last_ts'] AS last_event_ts,
    as_of
FROM l;

-- A derived on-hand below zero is not a stock-out but a data-quality signal:
-- receipts that were never recorded, shrinkage, or a missed count.
CREATE VIEW stock_anomalies AS
SELECT store_id, sku, 'negative_on_hand' AS anomaly, on_hand,
    -on_hand AS gap_units, stock_status, last_count_ts, last_count,
    opening_on_hand, last_event_ts, as_of
FROM stock_on_hand
WHERE on_hand < 0;

CREATE VIEW sales_velocity AS
SELECT a.store_id, a.sku,
    decayed_rate(a.units_decayed['sum'], a.units_decayed['at'], c.as_of,
                 ${velocity_half_life}) AS units_per_hour,
    units_in(a.hourly, c.as_of, 1) AS units_1h,
    units_in(a.hourly, c.as_of, 24) AS units_24h,
    units_in(a.hourly, c.as_of, 168) AS units_7d,
    a.units_sold AS units_total,
    a.last_sale_ts,
    ${velocity_half_life_hours} AS half_life_hours,
    c.as_of
FROM sku_activity a CROSS JOIN engine_clock c;

-- The thresholds in force for every store and product category, and the
-- level they come from: the most specific replenishment_policy row of
-- (store, category), (city, category), (format, category) wins; a threshold
-- it leaves empty is inherited from the next level, then from the [retail]
-- defaults. A (store, SKU) row overrides these in stockout_risk (which
-- resolves the same levels with its own joins).
CREATE VIEW store_category_policy AS
WITH sc AS (
    SELECT s.store_id, s.city, s.format, c.category
    FROM stores s
    CROSS JOIN (SELECT DISTINCT category FROM products WHERE category IS NOT NULL) c
)
SELECT sc.store_id, sc.city, sc.format, sc.category,
    coalesce(rs.lead_time_hours, rc.lead_time_hours, rf.lead_time_hours,
             ${default_lead_time_hours}) AS lead_time_hours,
    coalesce(rs.service_level, rc.service_level, rf.service_level,
             ${default_service_level}) AS service_level,
    coalesce(rs.review_hours, rc.review_hours, rf.review_hours,
             ${default_review_hours}) AS review_hours,
    coalesce(rs.min_stock, rc.min_stock, rf.min_stock, ${default_min_stock}) AS min_stock,
    CASE WHEN rs.category IS NOT NULL THEN 'store_category'
         WHEN rc.category IS NOT NULL THEN 'city_category'
         WHEN rf.category IS NOT NULL THEN 'format_category'
         ELSE 'default' END AS policy_source
FROM sc
-- A policy row fills exactly the scope columns of its level (checked when
-- the table loads), so each join matches rows of one level only.
LEFT JOIN replenishment_policy rs ON rs.store_id = sc.store_id AND rs.category = sc.category
LEFT JOIN replenishment_policy rc ON rc.city = sc.city AND rc.category = sc.category
LEFT JOIN replenishment_policy rf ON rf.format = sc.format AND rf.category = sc.category;

CREATE VIEW stockout_risk AS
WITH base AS (
    SELECT a.store_id, a.sku, s.city, s.format, p.category,
        coalesce(p.case_pack, 1) AS case_pack,
        CASE WHEN a.ledger['last_count_ts'] IS NOT NULL THEN a.ledger['on_hand']
             ELSE o.on_hand + a.ledger['on_hand'] END AS on_hand,
        CASE WHEN a.ledger['last_count_ts'] IS NULL AND o.on_hand IS NULL THEN 'unknown'
             WHEN a.ledger['last_count_ts'] >= a.ledger['last_ts'] THEN 'counted'
             ELSE 'derived' END AS stock_status,
        a.ledger['last_count_ts'] AS last_count_ts,
        decayed_rate(a.units_decayed['sum'], a.units_decayed['at'], c.as_of,
                     ${velocity_half_life}) AS units_per_hour,
        decayed_rate(a.units_sq_decayed['sum'], a.units_sq_decayed['at'], c.as_of,
                     ${velocity_half_life}) AS units_sq_per_hour,
        -- The most specific policy row first (store x SKU, store x category,
        -- city x category, format x category), each empty threshold from the
        -- next, then the [retail] defaults: store_category_policy's rule plus
        -- the store x SKU level. Joined to the policy table itself, not to
        -- that view: the table's row count lets the planner build its hash
        -- tables on the small side (a view has no statistics, and a join on
        -- it built a 400 MB table of the 3 M pairs instead).
        coalesce(r.lead_time_hours, rs.lead_time_hours, rc.lead_time_hours, rf.lead_time_hours,
                 ${default_lead_time_hours}) AS lead_time_hours,
        coalesce(r.service_level, rs.service_level, rc.service_level, rf.service_level,
                 ${default_service_level}) AS service_level,
        coalesce(r.review_hours, rs.review_hours, rc.review_hours, rf.review_hours,
                 ${default_review_hours}) AS review_hours,
        coalesce(r.min_stock, rs.min_stock, rc.min_stock, rf.min_stock,
                 ${default_min_stock}) AS min_stock,
        CASE WHEN r.sku IS NOT NULL THEN 'store_sku'
             WHEN rs.category IS NOT NULL THEN 'store_category'
             WHEN rc.category IS NOT NULL THEN 'city_category'
             WHEN rf.category IS NOT NULL THEN 'format_category'
             ELSE 'default' END AS policy_source,
        coalesce(po.qty, 0) AS on_order,
        coalesce(it.qty, 0) AS in_transit,
        c.as_of
    FROM sku_activity a
    CROSS JOIN engine_clock c
    LEFT JOIN stores s ON s.store_id = a.store_id
    LEFT JOIN products p ON p.sku = a.sku
    LEFT JOIN replenishment_policy r ON r.store_id = a.store_id AND r.sku = a.sku
    LEFT JOIN replenishment_policy rs ON rs.store_id = a.store_id AND rs.category = p.category
    LEFT JOIN replenishment_policy rc ON rc.city = s.city AND rc.category = p.category
    LEFT JOIN replenishment_policy rf ON rf.format = s.format AND rf.category = p.category
    LEFT JOIN opening_stock o ON o.store_id = a.store_id AND o.sku = a.sku
    -- Stock already coming: open order lines and transfers to this store.
    LEFT JOIN (SELECT store_id, sku, sum(open_qty) AS qty FROM open_orders
               GROUP BY store_id, sku) po ON po.store_id = a.store_id AND po.sku = a.sku
    LEFT JOIN (SELECT to_store, sku, sum(in_transit_qty) AS qty FROM stock_in_transit
               WHERE to_store IS NOT NULL
               GROUP BY to_store, sku) it ON it.to_store = a.store_id AND it.sku = a.sku
), demand AS (
    SELECT *,
        on_hand + on_order + in_transit AS inventory_position,
        units_per_hour * lead_time_hours AS lead_time_demand,
        greatest(units_sq_per_hour, 0) * lead_time_hours AS lead_time_variance,
        greatest(normal_quantile(service_level) * sqrt(greatest(units_sq_per_hour, 0) * lead_time_hours), 0)
            AS safety_stock
    FROM base
), policy AS (
    SELECT *,
        greatest(CAST(min_stock AS DOUBLE), lead_time_demand + safety_stock) AS reorder_point,
        greatest(CAST(min_stock AS DOUBLE),
                 units_per_hour * (lead_time_hours + review_hours) + safety_stock) AS order_up_to
    FROM demand
)
SELECT store_id, sku, city, format, category,
    on_hand,
    on_order,
    in_transit,
    inventory_position,
    stock_status,
    last_count_ts,
    units_per_hour,
    CASE WHEN units_per_hour > 0 AND on_hand >= 0 THEN on_hand / units_per_hour END AS hours_of_cover,
    lead_time_hours,
    review_hours,
    service_level,
    lead_time_demand,
    sqrt(lead_time_variance) AS lead_time_sigma,
    demand_model(lead_time_demand) AS demand_model,
    safety_stock,
    reorder_point,
    order_up_to,
    -- Unknown stock, or a derived level below zero (a data-quality problem,
    -- see stock_anomalies), gives no probability and no order.
    CASE WHEN on_hand >= 0
         THEN stockout_probability(on_hand, lead_time_demand, lead_time_variance) END AS p_stockout,
    CASE WHEN on_hand >= 0 THEN expected_shortage(on_hand, lead_time_demand, lead_time_variance) END
        AS expected_lost_units,
    -- Ordered up to order_up_to from the inventory position (on hand plus
    -- open orders plus stock in transit), so stock already coming is not
    -- ordered again.
    CASE WHEN on_hand < 0 OR on_hand IS NULL THEN CAST(NULL AS BIGINT)
         WHEN inventory_position <= reorder_point AND order_up_to > inventory_position
         THEN CAST(ceil((order_up_to - inventory_position) / case_pack) * case_pack AS BIGINT)
         ELSE CAST(0 AS BIGINT) END AS suggested_order_qty,
    case_pack,
    min_stock,
    policy_source,
    as_of
FROM policy;

CREATE VIEW slow_movers AS
WITH s AS (
    SELECT a.store_id, a.sku, p.category,
        CASE WHEN a.ledger['last_count_ts'] IS NOT NULL THEN a.ledger['on_hand']
             ELSE o.on_hand + a.ledger['on_hand'] END AS on_hand,
        units_in(a.hourly, c.as_of, ${slow_mover_horizon_hours}) AS units_in_horizon,
        a.last_sale_ts,
        coalesce(p.unit_cost, 0) AS unit_cost,
        c.as_of
    FROM sku_activity a
    CROSS JOIN engine_clock c
    LEFT JOIN products p ON p.sku = a.sku
    LEFT JOIN opening_stock o ON o.store_id = a.store_id AND o.sku = a.sku
)
SELECT store_id, sku, category, on_hand, units_in_horizon,
    ${slow_mover_horizon_hours} / 24.0 AS horizon_days,
    CASE WHEN units_in_horizon > 0
         THEN on_hand / (units_in_horizon / (${slow_mover_horizon_hours} / 24.0)) END AS days_of_inventory,
    last_sale_ts,
    (extract(epoch FROM as_of) - extract(epoch FROM last_sale_ts)) / 86400.0 AS days_since_last_sale,
    on_hand * unit_cost AS stock_value,
    as_of
FROM s
WHERE on_hand > 0 AND units_in_horizon <= ${slow_mover_max_units};

-- Turnover per period: COGS over the time-weighted average inventory cost of
-- the hours each SKU has data (from its first event, or the period start, to
-- the period end or as_of), so a period that began before the data does not
-- dilute the average. Only (store, SKU) pairs with a stock count: without
-- one the level is unknown (see stock_on_hand).
CREATE VIEW inventory_turnover AS
WITH base AS (
    -- Days are the store's business days: the figures, as_of and
    -- first_seen on its wall clock.
    SELECT x.store_id, x.sku, coalesce(p.category, 'unknown') AS category,
        coalesce(p.unit_cost, 0) AS unit_cost, c.as_of,
        local_time(x.store_id, c.as_of) AS local_as_of,
        local_time(x.store_id, a.first_seen) AS first_seen,
        stock_days_until(x.days, local_time(x.store_id, c.as_of), ${turnover_days}) AS days
    FROM sku_stock_days x
    JOIN sku_activity a ON a.store_id = x.store_id AND a.sku = x.sku
    CROSS JOIN engine_clock c
    LEFT JOIN products p ON p.sku = x.sku
    WHERE a.ledger['last_count_ts'] IS NOT NULL
), d AS (
    SELECT store_id, sku, category, unit_cost, as_of, local_as_of, first_seen,
        unnest(days) AS d
    FROM base
), f AS (
    SELECT store_id, sku, category, unit_cost, as_of, local_as_of,
        arrow_cast(d['day'], 'Timestamp(Millisecond, None)') AS day,
        d['begin_on_hand'] AS begin_on_hand,
        d['unit_hours'] AS unit_hours, d['units_sold'] AS units_sold,
        d['received'] AS received,
        greatest(d['hours'] - greatest(extract(epoch FROM first_seen) - extract(epoch FROM d['day']), 0)
                 / 3600.0, 0) AS covered_hours
    FROM d
), periods AS (
    SELECT store_id, sku, category, 'day' AS period, day AS period_start,
        day + INTERVAL '1 day' AS period_end, day, unit_cost, as_of, local_as_of,
        begin_on_hand, unit_hours, units_sold, received, covered_hours
    FROM f
    UNION ALL
    SELECT store_id, sku, category, 'week',
        date_trunc('week', day), date_trunc('week', day) + INTERVAL '7 days',
        day, unit_cost, as_of, local_as_of, begin_on_hand, unit_hours, units_sold, received,
        covered_hours
    FROM f
), s AS (
    -- Per SKU and period: its average inventory over the hours it has data.
    SELECT store_id, category, sku, period, period_start,
        (extract(epoch FROM least(max(period_end), max(local_as_of)))
            - extract(epoch FROM period_start)) / 3600.0 AS hours,
        sum(covered_hours) AS covered_hours,
        sum(units_sold) AS units_sold,
        sum(units_sold * unit_cost) AS cogs,
        sum(unit_hours * unit_cost) / nullif(sum(covered_hours), 0) AS avg_inventory_cost,
        -- On hand when the period (or the SKU's data) began.
        first_value(begin_on_hand ORDER BY day) AS begin_on_hand,
        sum(received) AS received,
        max(as_of) AS as_of,
        max(local_as_of) AS local_as_of
    FROM periods
    GROUP BY store_id, category, sku, period, period_start
), g AS (
    SELECT store_id, category, period, period_start,
        max(hours) AS hours,
        max(covered_hours) AS covered_hours,
        sum(units_sold) AS units_sold,
        sum(cogs) AS cogs,
        sum(avg_inventory_cost) AS avg_inventory_cost,
        sum(begin_on_hand) AS begin_on_hand,
        sum(received) AS received,
        max(as_of) AS as_of,
        max(local_as_of) AS local_as_of
    FROM s
    GROUP BY store_id, category, period, period_start
)
SELECT store_id, category, period, period_start,
    units_sold,
    cogs,
    avg_inventory_cost,
    CASE WHEN avg_inventory_cost > 0 THEN cogs / avg_inventory_cost END AS turnover,
    CASE WHEN cogs > 0 AND covered_hours > 0
         THEN avg_inventory_cost / (cogs / (covered_hours / 24.0)) END AS days_of_inventory,
    CASE WHEN coalesce(begin_on_hand, 0) + received > 0
         THEN CAST(units_sold AS DOUBLE) / (coalesce(begin_on_hand, 0) + received) END AS sell_through,
    hours / 24.0 AS elapsed_days,
    covered_hours / 24.0 AS covered_days,
    as_of
FROM g
-- Only periods that start inside the kept days (a week that began before
-- them would be partial).
WHERE period_start >= date_trunc('day', local_as_of) + INTERVAL '1 day' - ${turnover_days};

-- One row per chain-wide member: a sale's card mapped through
-- member_identity (a card with no link is its own member), its cards'
-- purchases merged. member_rfm, member_churn_risk and member_cohorts read it.
CREATE VIEW member_summary AS
SELECT coalesce(i.member_id, p.card_id) AS member_id,
    min(p.first_purchase_ts) AS first_purchase_ts,
    max(p.last_purchase_ts) AS last_purchase_ts,
    sum(p.receipts) AS frequency,
    distinct_days(p.purchase_days) AS days,
    sum(p.monetary) AS monetary,
    count(*) AS cards
FROM member_purchases p
LEFT JOIN member_identity i ON i.local_member_id = p.card_id
GROUP BY coalesce(i.member_id, p.card_id);

CREATE VIEW member_rfm AS
WITH m AS (
    SELECT member_id, first_purchase_ts, last_purchase_ts, frequency,
        CAST(cardinality(days) AS BIGINT) AS purchase_days, monetary, cards
    FROM member_summary
), scored AS (
    -- Quintiles by (value, member_id): linear-time selection, no sort.
    SELECT m.*, c.as_of,
        quintile_score(last_purchase_ts, member_id) OVER () AS r_score,
        quintile_score(frequency, member_id) OVER () AS f_score,
        quintile_score(monetary, member_id) OVER () AS m_score
    FROM m CROSS JOIN engine_clock c
)
SELECT member_id, first_purchase_ts, last_purchase_ts,
    (extract(epoch FROM as_of) - extract(epoch FROM last_purchase_ts)) / 86400.0 AS recency_days,
    frequency, purchase_days, monetary,
    CASE WHEN frequency > 0 THEN monetary / frequency END AS avg_order_value,
    r_score, f_score, m_score,
    CASE
        WHEN r_score = 5 AND f_score >= 4 THEN 'Champions'
        WHEN r_score IN (3, 4) AND f_score >= 4 THEN 'Loyal Customers'
        WHEN r_score >= 4 AND f_score IN (2, 3) THEN 'Potential Loyalists'
        WHEN r_score = 5 AND f_score = 1 THEN 'New Customers'
        WHEN r_score = 4 AND f_score = 1 THEN 'Promising'
        WHEN r_score = 3 AND f_score = 3 THEN 'Need Attention'
        WHEN r_score = 3 AND f_score <= 2 THEN 'About to Sleep'
        WHEN r_score <= 2 AND f_score IN (3, 4) THEN 'At Risk'
        WHEN r_score <= 2 AND f_score = 5 THEN 'Can''t Lose'
        ELSE 'Hibernating'
    END AS segment,
    cards,
    as_of
FROM scored;

-- Members beyond RFM: a member's usual gap between purchase days, and how
-- many of those gaps have passed since the last purchase. A member with at
-- least ${churn_min_purchase_days} purchase days whose silence exceeds
-- ${churn_gap_factor} usual gaps is lapsing (a win-back candidate).
CREATE VIEW member_churn_risk AS
WITH m AS (
    SELECT member_id, first_purchase_ts, last_purchase_ts,
        CAST(cardinality(days) AS BIGINT) AS purchase_days, monetary
    FROM member_summary
), g AS (
    SELECT m.*, c.as_of,
        CASE WHEN purchase_days >= ${churn_min_purchase_days}
             THEN (extract(epoch FROM last_purchase_ts) - extract(epoch FROM first_purchase_ts))
                  / 86400.0 / (purchase_days - 1) END AS usual_gap_days,
        (extract(epoch FROM c.as_of) - extract(epoch FROM last_purchase_ts)) / 86400.0
            AS days_since_last
    FROM m CROSS JOIN engine_clock c
)
SELECT member_id, first_purchase_ts, last_purchase_ts, purchase_days, monetary,
    usual_gap_days, days_since_last,
    CASE WHEN usual_gap_days > 0 THEN days_since_last / usual_gap_days END AS gaps_since_last,
    coalesce(usual_gap_days > 0 AND days_since_last > ${churn_gap_factor} * usual_gap_days, false)
        AS lapsing,
    as_of
FROM g;

-- Monthly repeat-purchase cohorts: members by the UTC month of their first
-- purchase, and how many of them bought in each later month.
CREATE VIEW member_cohorts AS
WITH months AS (
    SELECT DISTINCT member_id, date_trunc('month', day) AS month
    FROM (SELECT member_id, unnest(days) AS day FROM member_summary)
), firsts AS (
    SELECT member_id, min(month) AS cohort_month FROM months GROUP BY member_id
), sizes AS (
    SELECT cohort_month, count(*) AS cohort_members FROM firsts GROUP BY cohort_month
), active AS (
    SELECT f.cohort_month, m.month,
        CAST((extract(year FROM m.month) - extract(year FROM f.cohort_month)) * 12
             + extract(month FROM m.month) - extract(month FROM f.cohort_month) AS BIGINT)
            AS months_since_first,
        count(*) AS active_members
    FROM months m JOIN firsts f ON f.member_id = m.member_id
    GROUP BY f.cohort_month, m.month
)
SELECT a.cohort_month, a.month, a.months_since_first, s.cohort_members, a.active_members,
    CAST(a.active_members AS DOUBLE) / s.cohort_members AS retention
FROM active a JOIN sizes s ON s.cohort_month = a.cohort_month;

CREATE VIEW transfer_suggestions AS
WITH r AS (SELECT * FROM stockout_risk),
need AS (
    SELECT sku, store_id AS to_store, city, on_hand AS to_on_hand,
        CAST(ceil(order_up_to - inventory_position) AS BIGINT) AS need_qty,
        suggested_order_qty, p_stockout AS to_p_stockout
    FROM r
    -- No `city IS NOT NULL` here or in `spare`: the join on city already
    -- leaves out stores without one, and that filter turned stockout_risk's
    -- LEFT JOIN of stores into an inner join estimated at one row per store,
    -- so the planner built its hash tables on the 3 M-pair side (8.3 s for
    -- this view at 3 M pairs, 2.9 s without; same rows).
    WHERE suggested_order_qty > 0
),
spare AS (
    SELECT sku, store_id AS from_store, city, on_hand AS from_on_hand,
        hours_of_cover AS from_hours_of_cover, reorder_point AS from_reorder_point,
        -- Units that leave the source above both its reorder point and the
        -- excess-cover threshold (strictly), so it is not put at risk.
        CAST(ceil(on_hand - greatest(reorder_point,
                                     units_per_hour * ${transfer_excess_cover_hours})) AS BIGINT) - 1
            AS spare_qty
    FROM r
    WHERE hours_of_cover > ${transfer_excess_cover_hours}
       OR (units_per_hour = 0 AND on_hand > reorder_point)
),
pairs AS (
    SELECT n.sku, s.from_store, n.to_store, n.city,
        least(n.need_qty, s.spare_qty) AS qty,
        n.need_qty, n.suggested_order_qty, n.to_on_hand, n.to_p_stockout,
        s.from_on_hand, s.from_hours_of_cover, s.from_reorder_point, s.spare_qty,
        row_number() OVER (PARTITION BY n.sku, n.to_store
                           ORDER BY s.spare_qty DESC, s.from_store) AS choice
    FROM need n
    JOIN spare s ON s.sku = n.sku AND s.city = n.city AND s.from_store <> n.to_store
    WHERE s.spare_qty > 0
)
SELECT sku, from_store, to_store, qty, city, need_qty, suggested_order_qty,
    to_on_hand, to_p_stockout, from_on_hand, from_on_hand - qty AS from_on_hand_after,
    from_hours_of_cover, from_reorder_point
FROM pairs
WHERE choice = 1 AND qty > 0;

-- Price periods in which a store charged another price than the list
-- price in force (price_mismatches), with the revenue lost (charged below
-- the list price) and the excess (above). still_mismatched: the store's
-- latest sale of the SKU (sku_activity.last_sale_ts) was one of these
-- lines, so the till still charges the wrong price.
CREATE VIEW price_deviations AS
SELECT m.store_id, s.city, s.format, m.sku, m.list_price, m.price_valid_from, m.price_source,
    m.mismatched_lines, m.mismatched_qty, m.min_charged_price, m.max_charged_price,
    coalesce(m.lost_revenue, 0) AS lost_revenue,
    coalesce(m.excess_revenue, 0) AS excess_revenue,
    m.first_mismatch_ts, m.last_mismatch_ts, a.last_sale_ts,
    coalesce(m.last_mismatch_ts >= a.last_sale_ts, false) AS still_mismatched,
    k.as_of
FROM price_mismatches m
LEFT JOIN sku_activity a ON a.store_id = m.store_id AND a.sku = m.sku
LEFT JOIN stores s ON s.store_id = m.store_id
CROSS JOIN engine_clock k;

-- Lots still on the shelf and their expiry, first in, first out: the
-- (store, SKU)'s on-hand is taken to be its newest units, so a lot holds
-- what the on-hand leaves after the lots received after it (at most its
-- units received less those written off).
CREATE VIEW expiring_stock AS
WITH l AS (
    SELECT store_id, sku, lot, received_qty, coalesce(wasted_qty, 0) AS wasted_qty,
        received_at, expires_at,
        coalesce(sum(received_qty) OVER (
            PARTITION BY store_id, sku ORDER BY received_at DESC, lot DESC
            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS newer_qty
    FROM stock_lots
    WHERE received_qty > 0 AND expires_at IS NOT NULL
)
SELECT l.store_id, l.sku, l.lot, l.received_qty, l.wasted_qty, l.received_at, l.expires_at,
    greatest(least(l.received_qty - l.wasted_qty, s.on_hand - l.newer_qty), 0) AS on_hand_est,
    s.on_hand AS sku_on_hand,
    (extract(epoch FROM l.expires_at) - extract(epoch FROM c.as_of)) / 3600.0 AS hours_to_expiry,
    l.expires_at <= c.as_of AS expired,
    c.as_of
FROM l
JOIN stock_on_hand s ON s.store_id = l.store_id AND s.sku = l.sku
CROSS JOIN engine_clock c
WHERE s.on_hand > l.newer_qty AND l.received_qty > l.wasted_qty;
