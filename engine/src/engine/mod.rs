//! The engine: streams in, consistent view snapshots out.
//!
//! [`Engine`] owns all mutable state (gates, views, late events) and is
//! driven by one task; [`EngineHandle`] shares it with the query side. A
//! query locks the engine only long enough to take a [`Snapshot`] (views
//! that changed since the last one are evaluated), then runs in DataFusion
//! without holding the lock.
//!
//! This file holds the engine's state and the write path (`apply`, `tick`,
//! state limits and TTL); by concern: `ddl` (definitions), `snapshots`
//! (evaluation and consistent reads), `restore` (checkpoints).

mod ddl;
mod restore;
mod snapshots;

pub(crate) use ddl::is_view_ddl;
use ddl::normalize_sql;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Instant,
};

use datafusion::{
    arrow::{array::RecordBatch, datatypes::SchemaRef},
    catalog::{streaming::StreamingTable, TableProvider},
    execution::{
        cache::cache_manager::CacheManagerConfig,
        disk_manager::{DiskManagerBuilder, DiskManagerMode},
        memory_pool::{GreedyMemoryPool, TrackConsumersPool},
        runtime_env::RuntimeEnvBuilder,
    },
    prelude::{SessionConfig, SessionContext},
};
use serde::Serialize;
use storepulse_ingest::{AppliedPositions, SourceMessage, StreamKind};
use storepulse_sql::retail::FloorCell;

use crate::{
    config::EngineConfig,
    dims::{DimensionData, DimensionKind, DimensionPartition, DimensionTable},
    error::{user_err, EngineError, Result},
    gate::StreamGate,
    late::LateEvents,
    refresh::RefreshedView,
    snapshot::{
        BatchSlot, ClockTable, SlotPartition, SnapshotCell, SnapshotRows, SnapshotRowsTable,
        StreamStub,
    },
    view::{plan_view, ContinuousView},
    watermark::Watermark,
};

/// What applying one source message did.
#[derive(Debug, Default, Clone)]
pub struct IngestReport {
    /// Events accepted into views.
    pub accepted: u64,
    /// Duplicate events dropped.
    pub duplicates: u64,
    /// Events routed to `late_events`.
    pub late: u64,
    /// The stream of the applied batch.
    pub stream: Option<StreamKind>,
    /// The accepted rows (the stream's schema), for the raw-event archive.
    /// Cheap: shares the batch's buffers.
    pub accepted_rows: Option<RecordBatch>,
    /// The late rows as `late_events` rows.
    pub late_rows: Option<RecordBatch>,
}

/// Description of a view for `GET /api/v1/views`.
#[derive(Debug, Clone, Serialize)]
pub struct ViewInfo {
    /// Name.
    pub name: String,
    /// `materialized` or `view`.
    pub kind: &'static str,
    /// Streams it reads (materialized views).
    pub streams: Vec<StreamKind>,
    /// Columns: name and type.
    pub columns: Vec<(String, String)>,
    /// Current number of groups (materialized views).
    pub groups: Option<usize>,
    /// Approximate state size in bytes (materialized views).
    pub state_bytes: Option<usize>,
    /// Bytes of the view's last evaluated rows, which snapshots and
    /// queries read (materialized views; 0 before the first read).
    pub output_bytes: Option<usize>,
    /// The defining SQL.
    pub sql: Option<String>,
}

/// Status of one stream.
#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    /// Stream.
    pub stream: StreamKind,
    /// Stream watermark.
    pub watermark: Watermark,
    /// Events accepted.
    pub accepted_events: u64,
    /// Duplicates dropped.
    pub duplicate_events: u64,
    /// Late events.
    pub late_events: u64,
    /// Partitions: name, watermark (ms), finished, idle.
    pub partitions: Vec<(String, Option<i64>, bool, bool)>,
}

/// The engine. See the crate docs for the data flow.
pub struct Engine {
    cfg: EngineConfig,
    planning: SessionContext,
    pub(crate) serving: SessionContext,
    stream_tables: HashMap<String, StreamKind>,
    slots: BTreeMap<StreamKind, Arc<BatchSlot>>,
    gates: BTreeMap<StreamKind, StreamGate>,
    views: Vec<ContinuousView>,
    late: LateEvents,
    pub(crate) cell: SnapshotCell,
    epoch: u64,
    snapshot_epoch: Option<u64>,
    snapshot_as_of: Option<i64>,
    positions: Arc<AppliedPositions>,
    floor: FloorCell,
    dimensions: HashMap<String, DimensionData>,
    prices: crate::prices::PriceBook,
    /// The `stores` table's zones and hours (`local_time`, `store_open`).
    calendar: crate::calendar::StoreCalendar,
    last_evaluation: Vec<(String, f64)>,
    alerts: Vec<AlertDefinition>,
    pub(crate) refreshed: Vec<Arc<RefreshedView>>,
}

/// An alert rule, created with `CREATE ALERT` or from the config file
/// ([`Engine::define_alert`]); its condition is planned against the
/// catalog when defined.
#[derive(Debug, Clone)]
pub struct AlertDefinition {
    /// Rule name (unique: a new definition replaces the old).
    pub name: String,
    /// The condition query's text.
    pub query_sql: String,
    /// Its options, typed once.
    pub options: storepulse_sql::alert::RuleOptions,
    /// The condition's output columns.
    pub columns: Vec<String>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("views", &self.views.len())
            .field("epoch", &self.epoch)
            .finish()
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn new_context(target_partitions: usize, memory_limit: Option<usize>) -> Result<SessionContext> {
    let mut config = SessionConfig::new()
        .with_information_schema(true)
        .with_target_partitions(target_partitions);
    // Plans are re-executed per micro-batch: no cross-execution filters.
    config
        .options_mut()
        .optimizer
        .enable_dynamic_filter_pushdown = false;
    // DataFusion 55's leaf-expression pushdown (moving `ledger['on_hand']`
    // and other struct-field reads towards the scans) fails to plan valid
    // queries over joins ("Schema contains qualified field name
    // a.__datafusion_extracted_13 and unqualified field name ... ambiguous",
    // apache/datafusion#24241 and #25446): `stockout_risk` filtered on two
    // of its columns did. The views' state is in memory and the archive's
    // columns are flat, so there is nothing for it to gain here.
    config
        .options_mut()
        .optimizer
        .enable_leaf_expression_pushdown = false;
    // The lake's history tables grow while the engine runs: DataFusion's
    // list-files cache (infinite TTL by default) would hide every file
    // archived after the first query, so listings always go to the store.
    let mut runtime = RuntimeEnvBuilder::new()
        .with_cache_manager(CacheManagerConfig::default().with_list_files_cache_limit(0));
    if let Some(limit) = memory_limit {
        // One pool for all concurrent queries; the error names the top
        // consumers so the user sees which operator ran out.
        runtime = runtime
            .with_memory_pool(Arc::new(TrackConsumersPool::new(
                GreedyMemoryPool::new(limit),
                std::num::NonZeroUsize::new(3).expect("non-zero"),
            )))
            // Over the limit a query fails with a clear error instead of
            // spilling to (and possibly filling) the local disk.
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            );
    }
    let runtime = runtime.build_arc()?;
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    storepulse_sql::register(&ctx);
    Ok(ctx)
}

impl Engine {
    /// A new engine with no views.
    pub fn new(cfg: EngineConfig) -> Result<Self> {
        let planning = new_context(1, None)?;
        let serving = new_context(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            cfg.query_memory_limit,
        )?;
        let mut slots = BTreeMap::new();
        let mut stream_tables = HashMap::new();
        let mut gates = BTreeMap::new();
        for k in StreamKind::ALL {
            let slot = Arc::new(BatchSlot::default());
            let table = StreamingTable::try_new(
                k.schema(),
                vec![Arc::new(SlotPartition {
                    schema: k.schema(),
                    slot: slot.clone(),
                })],
            )?;
            planning.register_table(k.name(), Arc::new(table))?;
            serving.register_table(k.name(), Arc::new(StreamStub { stream: k }))?;
            slots.insert(k, slot);
            stream_tables.insert(k.name().to_string(), k);
            gates.insert(k, StreamGate::new(k, &cfg));
        }
        let cell = SnapshotCell::default();
        serving.register_table(
            "late_events",
            Arc::new(SnapshotRowsTable {
                cell: cell.clone(),
                rows: SnapshotRows::LateEvents,
            }),
        )?;
        serving.register_table("engine_clock", Arc::new(ClockTable { cell: cell.clone() }))?;
        serving.register_table(
            "store_duplicates",
            Arc::new(SnapshotRowsTable {
                cell: cell.clone(),
                rows: SnapshotRows::Duplicates,
            }),
        )?;
        let floor = FloorCell::default();
        planning.register_udf(floor.udf());
        // `price_in_force` reads whichever `prices` and `stores` tables are
        // registered (re-pointed by `register_dimension`).
        let empty = |k: DimensionKind| DimensionData::new(k.schema(), Vec::new());
        let prices = crate::prices::PriceBook::new(
            empty(DimensionKind::Prices),
            empty(DimensionKind::Stores),
        );
        planning.register_udf(prices.udf());
        serving.register_udf(prices.udf());
        // `local_time` and `store_open` read the registered `stores`.
        let calendar = crate::calendar::StoreCalendar::new(empty(DimensionKind::Stores));
        for f in calendar.udfs() {
            planning.register_udf(f.clone());
            serving.register_udf(f);
        }
        let late = LateEvents::new(cfg.late_events_capacity, cfg.data_dir.as_deref())?;
        let mut engine = Self {
            cfg,
            planning,
            serving,
            stream_tables,
            slots,
            gates,
            views: Vec::new(),
            late,
            cell,
            epoch: 0,
            snapshot_epoch: None,
            snapshot_as_of: None,
            positions: Arc::default(),
            floor,
            dimensions: HashMap::new(),
            prices,
            calendar,
            last_evaluation: Vec::new(),
            alerts: Vec::new(),
            refreshed: Vec::new(),
        };
        // The known dimension tables exist (empty) until files are configured,
        // so the built-in views can always be created.
        for k in DimensionKind::ALL {
            engine.register_dimension(k.name(), Vec::new(), k.schema())?;
        }
        Ok(engine)
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The session analysts query (views, dimensions, `late_events`).
    pub fn serving_context(&self) -> &SessionContext {
        &self.serving
    }

    /// Registers (or re-registers, with a new schema) a dimension table,
    /// queryable and joinable in views. The returned handle swaps its rows
    /// in place on reload ([`DimensionData::replace`]).
    pub fn register_dimension(
        &mut self,
        name: &str,
        batches: Vec<RecordBatch>,
        schema: SchemaRef,
    ) -> Result<DimensionData> {
        if self.stream_tables.contains_key(name) {
            return user_err(format!(
                "dimension table '{name}' clashes with a stream name"
            ));
        }
        let data = DimensionData::new(schema.clone(), batches);
        let serving: Arc<dyn TableProvider> = Arc::new(DimensionTable(data.clone()));
        let planning: Arc<dyn TableProvider> = Arc::new(StreamingTable::try_new(
            schema,
            vec![Arc::new(DimensionPartition(data.clone()))],
        )?);
        self.planning.deregister_table(name)?;
        self.serving.deregister_table(name)?;
        self.planning.register_table(name, planning)?;
        self.serving.register_table(name, serving)?;
        self.prices.set_table(name, &data);
        self.calendar.set_table(name, &data);
        self.dimensions.insert(name.to_string(), data.clone());
        Ok(data)
    }

    /// The handle of a registered dimension table.
    pub fn dimension(&self, name: &str) -> Option<DimensionData> {
        self.dimensions.get(name).cloned()
    }

    /// Applies one message from a source. `now_ms` is the wall clock, used
    /// for idle detection.
    pub async fn apply(&mut self, msg: SourceMessage, now_ms: i64) -> Result<IngestReport> {
        match msg {
            SourceMessage::EndOfPartition { stream, partition } => {
                let gate = self.gates.get_mut(&stream).expect("gate per stream");
                gate.watermark.finish(&partition);
                gate.watermark.advance(now_ms);
                self.epoch += 1;
                Ok(IngestReport::default())
            }
            SourceMessage::Assigned { stream, partition } => {
                let gate = self.gates.get_mut(&stream).expect("gate per stream");
                gate.watermark.observe(&partition, None, now_ms);
                Ok(IngestReport::default())
            }
            SourceMessage::Advance { position, .. } => {
                self.positions.record(&position);
                Ok(IngestReport::default())
            }
            SourceMessage::Batch(b) => {
                let started = Instant::now();
                self.follow_idle_streams(now_ms);
                let gate = self.gates.get_mut(&b.stream).expect("gate per stream");
                let gated = gate.gate(&b.position.partition, &b.batch, now_ms)?;
                let labels = [("stream", b.stream.name())];
                metrics::counter!(crate::metric_names::ENGINE_EVENTS_TOTAL, &labels)
                    .increment(gated.accepted_events);
                metrics::counter!(crate::metric_names::ENGINE_DUPLICATE_EVENTS_TOTAL, &labels)
                    .increment(gated.duplicates);
                metrics::counter!(crate::metric_names::ENGINE_LATE_EVENTS_TOTAL, &labels)
                    .increment(gated.late_events);
                metrics::counter!(crate::metric_names::ENGINE_BYTES_TOTAL, &labels)
                    .increment(b.bytes as u64);
                if let Some(w) = gate.watermark.current().as_ms() {
                    metrics::gauge!(crate::metric_names::ENGINE_WATERMARK_LAG_SECONDS, &labels)
                        .set((now_ms - w) as f64 / 1000.0);
                }
                let late_rows = match &gated.late {
                    Some((late, wm)) => Some(self.late.record(
                        b.stream,
                        &b.position.partition,
                        late,
                        *wm,
                        now_ms,
                    )?),
                    None => None,
                };
                let accepted_rows = gated.accepted.clone();
                if let Some(accepted) = gated.accepted {
                    let rows = accepted.num_rows();
                    self.slots[&b.stream].set(vec![accepted]);
                    let task_ctx = self.planning.task_ctx();
                    for v in self.views.iter_mut() {
                        if !v.streams.contains(&b.stream) {
                            continue;
                        }
                        // Rows before the floor can no longer be reordered
                        // by an arrival on any of the view's streams.
                        let floor = v
                            .streams
                            .iter()
                            .try_fold(i64::MAX, |m, k| self.gates[k].floor().map(|f| m.min(f)));
                        self.floor.set(floor);
                        v.apply(task_ctx.clone(), rows).await?;
                    }
                    self.floor.set(None);
                    self.slots[&b.stream].set(Vec::new());
                    self.expire_idle_groups()?;
                    self.check_state_limit()?;
                }
                self.epoch += 1;
                self.positions.record(&b.position);
                metrics::histogram!(crate::metric_names::ENGINE_BATCH_DURATION_SECONDS)
                    .record(started.elapsed().as_secs_f64());
                Ok(IngestReport {
                    accepted: gated.accepted_events,
                    duplicates: gated.duplicates,
                    late: gated.late_events,
                    stream: Some(b.stream),
                    accepted_rows,
                    late_rows,
                })
            }
        }
    }

    /// Evicts idle groups of the views with a `state_ttl`.
    fn expire_idle_groups(&mut self) -> Result<()> {
        for v in self.views.iter_mut().filter(|v| v.has_state_ttl()) {
            let clock = v
                .streams
                .iter()
                .filter_map(|k| self.gates[k].reached())
                .max();
            let n = v.expire(clock)?;
            if n > 0 {
                metrics::counter!(crate::metric_names::ENGINE_VIEW_EVICTED_GROUPS_TOTAL, "view" => v.name.clone())
                    .increment(n as u64);
                tracing::debug!(view = %v.name, groups = n, remaining = v.groups(), "idle groups evicted (state_ttl)");
            }
        }
        Ok(())
    }

    /// `[engine] state_ttl` entries that name no materialized view.
    pub fn unknown_state_ttl_views(&self) -> Vec<String> {
        self.cfg
            .state_ttl
            .keys()
            .filter(|n| !self.views.iter().any(|v| &v.name == *n))
            .cloned()
            .collect()
    }

    /// Fails with [`EngineError::StateLimit`] when the state is over
    /// `[engine] max_state_bytes`.
    fn check_state_limit(&self) -> Result<()> {
        let Some(limit) = self.cfg.max_state_bytes else {
            return Ok(());
        };
        let bytes = self.state_bytes();
        if (bytes as u64) <= limit.as_u64() {
            return Ok(());
        }
        let largest = self.views.iter().max_by_key(|v| v.state_bytes());
        Err(EngineError::StateLimit {
            bytes,
            limit,
            view: largest.map_or_else(|| "(none)".into(), |v| v.name.clone()),
            groups: largest.map_or(0, |v| v.groups()),
            view_bytes: largest.map_or(0, |v| v.state_bytes()),
        })
    }

    /// The source positions whose effects are applied (what sources may
    /// commit and checkpoints store).
    pub fn positions(&self) -> &Arc<AppliedPositions> {
        &self.positions
    }

    /// Re-evaluates watermarks at wall clock `now_ms` (idle partitions stop
    /// holding their stream back). Call periodically.
    pub fn tick(&mut self, now_ms: i64) {
        for g in self.gates.values_mut() {
            g.watermark.advance(now_ms);
        }
        self.follow_idle_streams(now_ms);
        self.report_state();
    }

    /// A stream whose every partition is idle (delivered nothing for
    /// `idle_timeout`, e.g. stock counts between nightly stock-takes) moves
    /// its watermark up to the slowest active stream's, as an idle
    /// partition stops holding its stream back: otherwise a quiet stream
    /// would hold back every view that reads it with others (the retail
    /// ledgers fold rows only below the minimum over their streams, and
    /// kept every row since the last stock count). Rows the quiet stream
    /// delivers later are late if older than its watermark − allowed
    /// lateness, as on any stream. Streams that never delivered are left
    /// alone.
    fn follow_idle_streams(&mut self, now_ms: i64) {
        let quiet = |g: &StreamGate| g.watermark.all_idle(now_ms) && g.watermark.max_ts().is_some();
        let Some(t) = self
            .gates
            .values()
            .filter(|g| !quiet(g))
            .filter_map(|g| g.watermark.current().as_ms())
            .min()
        else {
            return;
        };
        for (k, g) in self.gates.iter_mut() {
            if quiet(g) && g.watermark.current().as_ms().is_some_and(|w| w < t) {
                g.watermark.follow(t);
                tracing::debug!(stream = %k.name(), watermark_ms = t, "idle stream follows the others");
            }
        }
    }

    /// State size per view as gauges (on every tick and every read).
    fn report_state(&self) {
        for v in &self.views {
            metrics::gauge!(crate::metric_names::ENGINE_VIEW_GROUPS, "view" => v.name.clone())
                .set(v.groups() as f64);
            metrics::gauge!(crate::metric_names::ENGINE_VIEW_STATE_BYTES, "view" => v.name.clone())
                .set(v.state_bytes() as f64);
            metrics::gauge!(crate::metric_names::ENGINE_VIEW_OUTPUT_BYTES, "view" => v.name.clone())
                .set(v.output_bytes() as f64);
        }
    }

    /// Materialized and plain views with their schemas.
    pub fn views(&self) -> Vec<ViewInfo> {
        let columns = |s: &SchemaRef| {
            s.fields()
                .iter()
                .map(|f| (f.name().clone(), f.data_type().to_string()))
                .collect()
        };
        self.views
            .iter()
            .map(|v| ViewInfo {
                name: v.name.clone(),
                kind: "materialized",
                streams: v.streams.clone(),
                columns: columns(&v.output_schema),
                groups: Some(v.groups()),
                state_bytes: Some(v.state_bytes()),
                output_bytes: Some(v.output_bytes()),
                sql: Some(v.sql.clone()),
            })
            .collect()
    }

    /// Bytes of the views' last evaluated rows (see [`ViewInfo::output_bytes`]).
    pub fn output_bytes(&self) -> usize {
        self.views.iter().map(|v| v.output_bytes()).sum()
    }

    /// Total state held by all views, in bytes.
    pub fn state_bytes(&self) -> usize {
        self.views.iter().map(|v| v.state_bytes()).sum::<usize>()
            + self.gates.values().map(|g| g.dedup.size()).sum::<usize>()
    }

    /// Per-stream watermark and counters.
    pub fn streams(&self) -> Vec<StreamStatus> {
        let now = now_ms();
        self.gates
            .iter()
            .map(|(k, g)| StreamStatus {
                stream: *k,
                watermark: g.watermark.current(),
                accepted_events: g.accepted_events,
                duplicate_events: g.duplicate_events,
                late_events: g.late_events,
                partitions: g
                    .watermark
                    .partitions(now)
                    .into_iter()
                    .map(|(p, w, f, i)| (p.to_string(), w, f, i))
                    .collect(),
            })
            .collect()
    }

    /// Number of batches and partition ends applied.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}
