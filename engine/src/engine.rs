//! The engine: streams in, consistent view snapshots out.
//!
//! [`Engine`] owns all mutable state (gates, views, late events) and is
//! driven by one task; [`EngineHandle`] shares it with the query side. A
//! query locks the engine only long enough to take a [`Snapshot`] (views
//! that changed since the last one are evaluated), then runs in DataFusion
//! without holding the lock.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use datafusion::{
    arrow::{array::RecordBatch, datatypes::SchemaRef},
    catalog::{streaming::StreamingTable, TableProvider},
    datasource::view::ViewTable,
    execution::{
        cache::cache_manager::CacheManagerConfig,
        context::SessionState,
        disk_manager::{DiskManagerBuilder, DiskManagerMode},
        memory_pool::{GreedyMemoryPool, TrackConsumersPool},
        runtime_env::RuntimeEnvBuilder,
    },
    logical_expr::LogicalPlan,
    prelude::{SessionConfig, SessionContext},
    sql::{parser::Statement as DFStatement, sqlparser::ast::Statement as SqlStatement},
};
use serde::Serialize;
use storepulse_ingest::{AppliedPositions, SourceMessage, StreamKind};
use storepulse_sql::{parse_script, retail::FloorCell, Statement};

use crate::{
    config::EngineConfig,
    dims::{DimensionData, DimensionKind, DimensionPartition, DimensionTable},
    error::{user_err, EngineError, Result},
    gate::StreamGate,
    late::LateEvents,
    query::{self, QueryLimits, QueryOutput},
    refresh::RefreshedView,
    snapshot::{
        BatchSlot, ClockTable, LateEventsTable, SlotPartition, Snapshot, SnapshotCell, StreamStub,
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
    last_evaluation: Vec<(String, f64)>,
    alerts: Vec<AlertDefinition>,
    pub(crate) refreshed: Vec<Arc<RefreshedView>>,
}

/// An alert rule created with `CREATE ALERT` (checked against the catalog).
#[derive(Debug, Clone)]
pub struct AlertDefinition {
    /// The statement as written (name, query, options, line).
    pub statement: storepulse_sql::parse::AlertStatement,
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
            Arc::new(LateEventsTable { cell: cell.clone() }),
        )?;
        serving.register_table("engine_clock", Arc::new(ClockTable { cell: cell.clone() }))?;
        let floor = FloorCell::default();
        planning.register_udf(floor.udf());
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
        self.dimensions.insert(name.to_string(), data.clone());
        Ok(data)
    }

    /// The handle of a registered dimension table.
    pub fn dimension(&self, name: &str) -> Option<DimensionData> {
        self.dimensions.get(name).cloned()
    }

    /// Runs a SQL script: `CREATE MATERIALIZED VIEW`, `CREATE VIEW`, queries.
    /// Returns the output of every statement.
    pub async fn execute_sql(&mut self, sql: &str) -> Result<Vec<QueryOutput>> {
        let mut out = Vec::new();
        for stmt in parse_script(sql)? {
            out.push(self.execute_statement(stmt).await?);
        }
        Ok(out)
    }

    pub(crate) async fn execute_statement(&mut self, stmt: Statement) -> Result<QueryOutput> {
        match stmt {
            Statement::CreateMaterializedView {
                name,
                query,
                or_replace,
                if_not_exists,
                sql,
            } => {
                let exists = self.views.iter().position(|v| v.name == name);
                if exists.is_some() && if_not_exists {
                    return Ok(empty_output());
                }
                if exists.is_some() && !or_replace {
                    return user_err(format!("materialized view '{name}' already exists"));
                }
                if exists.is_none() && self.serving.table_exist(name.as_str())? {
                    return user_err(format!("a table or view named '{name}' already exists"));
                }
                let state = self.planning.state();
                let plan = state
                    .statement_to_plan(DFStatement::Statement(Box::new(SqlStatement::Query(query))))
                    .await?;
                let plan = analyze(&state, plan)?;
                let view = plan_view(
                    &name,
                    &sql,
                    plan,
                    &state,
                    &self.stream_tables,
                    self.cell.clone(),
                )
                .await?;
                let table = ViewTable::new(view.query_plan.clone(), Some(sql.clone()));
                if let Some(i) = exists {
                    self.serving.deregister_table(name.as_str())?;
                    self.views.remove(i);
                }
                self.serving
                    .register_table(name.as_str(), Arc::new(table))?;
                let mut view = view;
                if let Some(ttl) = self.cfg.state_ttl.get(&name) {
                    if let Err(e) = view.set_state_ttl(**ttl) {
                        return user_err(e);
                    }
                }
                tracing::info!(view = %name, streams = ?view.streams, "materialized view created");
                self.views.push(view);
                self.snapshot_epoch = None;
                Ok(empty_output())
            }
            Statement::CreateAlert(alert) => {
                // Plan the condition now so an unknown table or column is an
                // error at creation, not at the first evaluation.
                let plan = self
                    .serving
                    .state()
                    .statement_to_plan(DFStatement::Statement(Box::new(SqlStatement::Query(
                        alert.query.clone(),
                    ))))
                    .await
                    .map_err(|e| {
                        crate::EngineError::User(format!(
                            "alert '{}' (line {}): {e}",
                            alert.name, alert.line
                        ))
                    })?;
                let columns = plan
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect();
                self.alerts.retain(|a| a.statement.name != alert.name);
                tracing::info!(alert = %alert.name, "alert rule created");
                self.alerts.push(AlertDefinition {
                    statement: alert,
                    columns,
                });
                Ok(empty_output())
            }
            Statement::DataFusion { statement, .. } => {
                if is_view_ddl(&statement) {
                    let created = created_view_name(&statement);
                    let plan = self.serving.state().statement_to_plan(*statement).await?;
                    let df = self.serving.execute_logical_plan(plan).await?;
                    let schema = Arc::new(df.schema().as_arrow().clone());
                    let batches = df.collect().await?;
                    if let Some(name) = created {
                        self.wrap_refreshed(&name).await?;
                    }
                    return Ok(QueryOutput::new(schema, batches));
                }
                let snap = self.snapshot()?;
                run_query(&self.serving, *statement, snap).await
            }
        }
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

    /// A consistent image of the engine's state (views, de-duplication,
    /// watermarks, late rows, source positions) at the current epoch,
    /// taken between micro-batches (see [`crate::checkpoint`]).
    pub fn checkpoint(&mut self) -> Result<crate::checkpoint::EngineCheckpoint> {
        use crate::checkpoint::{
            dedup_batch, CheckpointMeta, StreamMeta, ViewMeta, FORMAT_VERSION,
        };
        let mut views = Vec::with_capacity(self.views.len());
        let mut view_meta = Vec::with_capacity(self.views.len());
        for v in self.views.iter_mut() {
            let mut state = v.export()?;
            let ttl = match v.ttl_checkpoint() {
                Some((touched, meta)) => {
                    state = crate::checkpoint::with_ttl_column(state, touched)?;
                    Some(meta)
                }
                None => None,
            };
            view_meta.push(ViewMeta {
                name: v.name.clone(),
                sql: v.sql.clone(),
                rows_applied: v.rows_applied,
                groups: state.num_rows() as u64,
                ttl,
            });
            views.push((v.name.clone(), state));
        }
        let mut streams = Vec::with_capacity(self.gates.len());
        let mut dedup = Vec::with_capacity(self.gates.len());
        for (kind, g) in &self.gates {
            let (wm, parts) = g.watermark.export();
            let (hi, lo, ts) = g.dedup.export();
            dedup.push((kind.name().to_string(), dedup_batch(hi, lo, ts)?));
            streams.push(StreamMeta {
                stream: kind.name().to_string(),
                watermark: match wm {
                    Watermark::At(t) => Some(t),
                    Watermark::Final => g.watermark.max_ts(),
                    Watermark::None => None,
                },
                watermark_final: wm == Watermark::Final,
                partitions: parts.into_iter().map(|(k, t)| (k.to_string(), t)).collect(),
                accepted_events: g.accepted_events,
                duplicate_events: g.duplicate_events,
                late_events: g.late_events,
            });
        }
        Ok(crate::checkpoint::EngineCheckpoint {
            meta: CheckpointMeta {
                format_version: FORMAT_VERSION,
                epoch: self.epoch,
                views: view_meta,
                streams,
                late_total: self.late.total(),
                positions: self
                    .positions
                    .snapshot()
                    .into_iter()
                    .map(|p| (p.partition.to_string(), p.next_offset))
                    .collect(),
            },
            views,
            dedup,
            late: self.late.batches(),
        })
    }

    /// Restores a checkpoint into this engine, which must have its views
    /// defined (the same SQL as when the checkpoint was taken) and nothing
    /// applied yet. A view of the checkpoint that no longer exists, or
    /// whose state does not fit its current definition, is an error naming
    /// it; a view new since the checkpoint starts empty (logged).
    pub fn restore(&mut self, cp: crate::checkpoint::EngineCheckpoint, now_ms: i64) -> Result<()> {
        use crate::checkpoint::check_view_schema;
        if !self.positions.snapshot().is_empty() || self.views.iter().any(|v| v.groups() > 0) {
            return Err(EngineError::Checkpoint(
                "restore into an engine that already applied input".into(),
            ));
        }
        let mut states: HashMap<String, RecordBatch> = cp.views.into_iter().collect();
        for m in &cp.meta.views {
            let Some(v) = self.views.iter_mut().find(|v| v.name == m.name) else {
                return Err(EngineError::Checkpoint(format!(
                    "view {} is in the checkpoint but no longer defined; restore it, or remove \
                     the checkpoints to start from empty state",
                    m.name
                )));
            };
            let state = states
                .remove(&m.name)
                .ok_or_else(|| EngineError::Checkpoint(format!("view {}: no state", m.name)))?;
            check_view_schema(&m.name, &state, &v.partial_schema())?;
            if normalize_sql(&v.sql) != normalize_sql(&m.sql) {
                tracing::warn!(view = %m.name, "view SQL differs from the checkpoint's (same state schema): restoring its state");
            }
            v.import(&state, m.rows_applied)?;
            v.restore_ttl(&state, m.ttl.as_ref())?;
        }
        for v in &self.views {
            if !cp.meta.views.iter().any(|m| m.name == v.name) {
                tracing::warn!(view = %v.name, "view is new since the checkpoint: it starts empty");
            }
        }
        let dedup: HashMap<String, RecordBatch> = cp.dedup.into_iter().collect();
        for s in &cp.meta.streams {
            let Some((_, gate)) = self.gates.iter_mut().find(|(k, _)| k.name() == s.stream) else {
                return Err(EngineError::Checkpoint(format!(
                    "unknown stream {}",
                    s.stream
                )));
            };
            let parts: Vec<(Arc<str>, i64)> = s
                .partitions
                .iter()
                .map(|(k, t)| (Arc::from(k.as_str()), *t))
                .collect();
            gate.watermark.import(s.watermark(), &parts, now_ms);
            if let Some(b) = dedup.get(&s.stream) {
                let (hi, lo, ts) = crate::checkpoint::dedup_columns(b)?;
                gate.dedup.import(hi, lo, ts);
            }
            gate.accepted_events = s.accepted_events;
            gate.duplicate_events = s.duplicate_events;
            gate.late_events = s.late_events;
        }
        self.late.import(cp.late, cp.meta.late_total);
        for (partition, next_offset) in &cp.meta.positions {
            self.positions.record(&storepulse_ingest::Position {
                partition: Arc::from(partition.as_str()),
                next_offset: *next_offset,
            });
        }
        self.epoch = self.epoch.max(cp.meta.epoch);
        self.snapshot_epoch = None;
        Ok(())
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
        }
    }

    /// Takes (and publishes) a consistent snapshot of all views.
    pub fn snapshot(&mut self) -> Result<Arc<Snapshot>> {
        let as_of = self.as_of();
        if self.snapshot_epoch == Some(self.epoch) && self.snapshot_as_of == as_of {
            return Ok(self.cell.load());
        }
        let mut views = HashMap::with_capacity(self.views.len());
        self.last_evaluation.clear();
        for v in &mut self.views {
            views.insert(
                v.name.clone(),
                evaluate_timed(v, &mut self.last_evaluation)?,
            );
        }
        let snap = Arc::new(Snapshot {
            epoch: self.epoch,
            views,
            late_events: Arc::new(self.late.batches()),
            as_of,
        });
        self.cell.store(snap.clone());
        self.snapshot_epoch = Some(self.epoch);
        self.snapshot_as_of = as_of;
        Ok(snap)
    }

    /// If `[engine] refresh` lists view `name`, serves it from a refreshed
    /// result (see [`RefreshedView`]).
    async fn wrap_refreshed(&mut self, name: &str) -> Result<()> {
        self.refreshed.retain(|r| r.name() != name);
        let Some(interval) = self.cfg.refresh.get(name) else {
            return Ok(());
        };
        let Some(provider) = self.serving.table_provider(name).await.ok() else {
            return Ok(());
        };
        let Some(view) = provider.downcast_ref::<ViewTable>() else {
            return Ok(());
        };
        let r = Arc::new(RefreshedView::new(
            name.to_string(),
            view.logical_plan().clone(),
            **interval,
            self.cfg.refresh_max_staleness,
        ));
        self.serving.deregister_table(name)?;
        self.serving.register_table(name, r.clone())?;
        tracing::info!(view = %name, interval = ?**interval, "query-time view served from a refreshed result");
        self.refreshed.push(r);
        Ok(())
    }

    /// Names in `[engine] refresh` that no `CREATE VIEW` defined (a
    /// configuration error the binary reports after loading the scripts).
    pub fn unknown_refresh_views(&self) -> Vec<String> {
        self.cfg
            .refresh
            .keys()
            .filter(|n| !self.refreshed.iter().any(|r| r.name() == n.as_str()))
            .cloned()
            .collect()
    }

    /// The alert rules created by `CREATE ALERT`, in order.
    pub fn alerts(&self) -> &[AlertDefinition] {
        &self.alerts
    }

    /// Views evaluated by the last snapshot that had to evaluate any, with
    /// the seconds each took (diagnostics; also the histogram
    /// `storepulse_engine_view_evaluate_seconds{view}`).
    pub fn last_evaluation(&self) -> &[(String, f64)] {
        &self.last_evaluation
    }

    /// The event time the views are read "as of": the configured
    /// `as_of`, else the largest stream watermark (a final stream counts
    /// with its largest event time).
    pub fn as_of(&self) -> Option<i64> {
        if let Some(t) = self.cfg.as_of {
            return Some(match t.duration_since(std::time::UNIX_EPOCH) {
                Ok(d) => d.as_millis() as i64,
                Err(e) => -(e.duration().as_millis() as i64),
            });
        }
        self.gates.values().filter_map(|g| g.reached()).max()
    }

    /// A snapshot for one query that reads only `needed` views: those are
    /// evaluated if they changed; the others keep their last evaluation
    /// (the query does not read them). Not published as the latest
    /// snapshot unless every view is current.
    pub fn snapshot_for(&mut self, needed: &HashSet<String>) -> Result<Arc<Snapshot>> {
        self.report_state();
        let as_of = self.as_of();
        if self.snapshot_epoch == Some(self.epoch) && self.snapshot_as_of == as_of {
            return Ok(self.cell.load());
        }
        if self
            .views
            .iter()
            .all(|v| needed.contains(&v.name) || !v.is_dirty())
        {
            return self.snapshot();
        }
        let mut views = HashMap::with_capacity(self.views.len());
        self.last_evaluation.clear();
        for v in &mut self.views {
            if needed.contains(&v.name) {
                views.insert(
                    v.name.clone(),
                    evaluate_timed(v, &mut self.last_evaluation)?,
                );
            } else if let Some(b) = v.cached() {
                views.insert(v.name.clone(), b);
            }
        }
        Ok(Arc::new(Snapshot {
            epoch: self.epoch,
            views,
            late_events: Arc::new(self.late.batches()),
            as_of,
        }))
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
                sql: Some(v.sql.clone()),
            })
            .collect()
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

/// Evaluates `v` (cached if unchanged); a real evaluation is timed into
/// `log` and `storepulse_engine_view_evaluate_seconds{view}`.
fn evaluate_timed(
    v: &mut ContinuousView,
    log: &mut Vec<(String, f64)>,
) -> Result<Arc<Vec<RecordBatch>>> {
    let t = Instant::now();
    let dirty = v.is_dirty();
    let out = v.evaluate()?;
    if dirty {
        let secs = t.elapsed().as_secs_f64();
        metrics::histogram!(crate::metric_names::ENGINE_VIEW_EVALUATE_SECONDS, "view" => v.name.clone())
            .record(secs);
        log.push((v.name.clone(), secs));
    }
    Ok(out)
}

fn empty_output() -> QueryOutput {
    QueryOutput::empty()
}

/// The name a `CREATE [OR REPLACE] VIEW` statement defines.
fn created_view_name(s: &DFStatement) -> Option<String> {
    match s {
        DFStatement::Statement(s) => match s.as_ref() {
            SqlStatement::CreateView(v) if !v.materialized => Some(v.name.to_string()),
            _ => None,
        },
        _ => None,
    }
}

pub(crate) fn is_view_ddl(s: &DFStatement) -> bool {
    match s {
        DFStatement::Statement(s) => match s.as_ref() {
            SqlStatement::CreateView(v) => !v.materialized,
            SqlStatement::Drop { object_type, .. } => {
                *object_type == datafusion::sql::sqlparser::ast::ObjectType::View
            }
            _ => false,
        },
        _ => false,
    }
}

fn analyze(state: &SessionState, plan: LogicalPlan) -> Result<LogicalPlan> {
    Ok(state
        .analyzer()
        .execute_and_check(plan, state.config_options(), |_, _| {})?)
}

/// Runs a read-only statement against `ctx`, with `snap` pinned.
async fn run_query(
    ctx: &SessionContext,
    stmt: DFStatement,
    snap: Arc<Snapshot>,
) -> Result<QueryOutput> {
    let plan = ctx.state().statement_to_plan(stmt).await?;
    query::execute(ctx, plan, snap, &QueryLimits::default()).await
}

/// SQL with whitespace runs collapsed (to compare definitions).
fn normalize_sql(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}
