//! The alert manager: evaluates the rules, advances their lifecycles,
//! commits notifications to the outbox and runs one delivery loop per sink.
//!
//! * Evaluation: every rule on its `every` timer, and also when the engine
//!   reports applied batches (so an urgent condition fires within about
//!   `min_interval` of the event), never more often than `min_interval` per
//!   rule, nor (timer included) than nine times the rule's last evaluation
//!   time apart: alerting over millions of keys must not starve ingestion
//!   (a rule that takes 4 s is evaluated every 36 s, whatever its `every`).
//!   Evaluation reads a snapshot like any query; it never holds the engine
//!   while sinks deliver.
//! * Persistence: notifications are committed to the outbox together with
//!   the lifecycle that produced them; lifecycle changes without a
//!   notification are committed at most once per rule `every` and at
//!   [`AlertManager::drain`].
//! * Delivery: each sink reads the outbox from its cursor, delivers up to
//!   `batch_max` notifications, retries failures with exponential backoff
//!   and jitter (up to `retry_max_delay` apart, forever: nothing is dropped)
//!   and advances its cursor only after success.
//!
//! Size: ~780 lines, one type (`AlertManager`) whose evaluation scheduling,
//! storm budgets and delivery loops share its private state; rows to
//! notifications (`notify.rs`), the lifecycle (`lifecycle.rs`) and the
//! outbox (`outbox.rs`) are already apart.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::Serialize;
use storepulse_engine::{AlertDefinition, EngineHandle};
use tokio::sync::{watch, Mutex};

use crate::{
    config::{rule_clock, AlertsConfig, BoundedEvaluation},
    lifecycle::{alert_id, row_value, AlertState, Evaluation, KeyState, Lifecycle, Notification},
    notify::{group_notifications, keyed_rows},
    outbox::{Outbox, OutboxError},
    rule::{AlertRule, RuleError},
    sink::{build, Sink, SinkError},
};

/// Data-triggered evaluations of a rule are at least this many times its
/// last evaluation's duration apart (see `AlertManager::run`).
const EVAL_GAP_FACTOR: u32 = 9;

/// Time from the start of an evaluation to the next one of the same rule:
/// `floor` (`every` for the timer, `min_interval` for new data), or
/// `EVAL_GAP_FACTOR` times what the evaluation took if longer.
fn paced_gap(floor: Duration, took: Duration) -> Duration {
    floor.max(took * EVAL_GAP_FACTOR)
}

/// Alerting failures.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// A rule is invalid.
    #[error(transparent)]
    Rule(#[from] RuleError),
    /// A sink cannot be built, or a delivery failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The outbox failed or is full.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// A rule names a sink that is not configured.
    #[error("alert '{rule}': sink '{sink}' is not configured (sinks: {known})")]
    UnknownSink {
        /// Rule.
        rule: String,
        /// The sink named.
        sink: String,
        /// Configured sinks.
        known: String,
    },
    /// Two sinks share a name.
    #[error("alerts.sinks: two sinks are named '{0}'")]
    DuplicateSink(String),
    /// Evaluating a rule's query failed.
    #[error("alert '{rule}': {message}")]
    Query {
        /// Rule.
        rule: String,
        /// The engine's error.
        message: String,
    },
}

/// An alert that is pending or firing (for `GET /api/v1/alerts`).
#[derive(Debug, Clone, Serialize)]
pub struct ActiveAlert {
    /// Episode id.
    pub alert_id: String,
    /// Rule.
    pub rule: String,
    /// Key.
    pub alert_key: String,
    /// `pending` or `firing`.
    pub state: AlertState,
    /// Severity.
    pub severity: String,
    /// Event time the condition started holding (ms).
    pub first_seen: i64,
    /// Event time last seen holding (ms).
    pub last_seen: i64,
    /// The latest row.
    pub row: serde_json::Value,
}

/// Delivery state of one sink (for `/api/v1/health`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkHealth {
    /// Sink name.
    pub name: String,
    /// Notifications delivered since start.
    pub delivered: u64,
    /// Failed attempts in a row (0: healthy).
    pub consecutive_failures: u64,
    /// Wall clock (Unix ms) of the first failure of the current streak.
    pub failing_since_ms: Option<i64>,
    /// The last failure's message (kept after recovery).
    pub last_error: Option<String>,
    /// Wall clock (Unix ms) of the last successful delivery.
    pub last_delivery_ms: Option<i64>,
}

/// Evaluation state of one rule (for `/api/v1/health`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RuleHealth {
    /// Rule name.
    pub name: String,
    /// Successful evaluations since start.
    pub evaluations: u64,
    /// Failed evaluations in a row (0: healthy).
    pub consecutive_failures: u64,
    /// Wall clock (Unix ms) of the first failure of the current streak.
    pub failing_since_ms: Option<i64>,
    /// The last failure's message (kept after recovery).
    pub last_error: Option<String>,
    /// What the last evaluation took (query and lifecycle), in ms.
    pub last_duration_ms: u64,
    /// Time spent evaluating since start, in seconds.
    pub evaluation_seconds: f64,
}

impl RuleHealth {
    /// Failed evaluations in a row from which the rule is a fault of the
    /// server (`/api/v1/health` status `degraded`).
    pub const FAULT_AFTER: u64 = 3;
}

/// Evaluates rules and delivers their notifications.
pub struct AlertManager {
    engine: EngineHandle,
    outbox: Outbox,
    rules: Vec<AlertRule>,
    state: Mutex<BTreeMap<String, Lifecycle>>,
    sinks: Vec<Arc<dyn Sink>>,
    cfg: AlertsConfig,
    committed: watch::Sender<u64>,
    acked: watch::Sender<u64>,
    /// Rules whose evaluation waits for the engine to replay up to their
    /// last evaluation (after a restore), to log the start and the end once.
    deferred: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Delivery state per sink, in configuration order.
    sink_health: std::sync::Mutex<Vec<SinkHealth>>,
    /// Evaluation state per rule, in rule order.
    rule_health: std::sync::Mutex<Vec<RuleHealth>>,
    /// When each rule's lifecycle was last committed.
    persisted: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
    /// One per rule, held from a rule's query to its commit: two
    /// evaluations of a rule (the loop's and [`AlertManager::drain`]'s) must
    /// not interleave, or the one that read the older snapshot could commit
    /// last and leave the lifecycle behind the views.
    evaluating: Vec<Mutex<()>>,
    /// Per rule, the `every` cell of event time last evaluated by
    /// [`AlertManager::before_batch`] (bounded runs).
    cells: std::sync::Mutex<Vec<Option<i64>>>,
}

impl std::fmt::Debug for AlertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertManager")
            .field("rules", &self.rules.len())
            .field("sinks", &self.sinks.len())
            .finish()
    }
}

impl AlertManager {
    /// Validates the rules against the sinks, builds the sinks and opens
    /// the outbox (`dir/alerts.redb`), restoring the rules' lifecycles.
    pub fn new(
        engine: EngineHandle,
        defs: &[AlertDefinition],
        cfg: AlertsConfig,
        dir: &Path,
    ) -> Result<Self, AlertError> {
        let mut names: Vec<String> = Vec::new();
        for s in &cfg.sinks {
            if names.iter().any(|n| n == s.name()) {
                return Err(AlertError::DuplicateSink(s.name().to_string()));
            }
            names.push(s.name().to_string());
        }
        let mut rules = Vec::with_capacity(defs.len());
        for d in defs {
            let r = AlertRule::new(&d.name, &d.query_sql, &d.options, &d.columns)?;
            for s in &r.sinks {
                if !names.contains(s) {
                    return Err(AlertError::UnknownSink {
                        rule: r.name.clone(),
                        sink: s.clone(),
                        known: names.join(", "),
                    });
                }
            }
            rules.push(r);
        }
        let sinks = cfg
            .sinks
            .iter()
            .map(|c| build(c).map(Arc::from))
            .collect::<Result<Vec<_>, _>>()?;
        let outbox = Outbox::open(
            &dir.join("alerts.redb"),
            cfg.outbox_capacity,
            cfg.history_capacity,
            &names,
        )?;
        let state = outbox.lifecycles()?;
        let (committed, _) = watch::channel(0);
        let (acked, _) = watch::channel(0);
        let evaluating = rules.iter().map(|_| Mutex::new(())).collect();
        let cells = std::sync::Mutex::new(vec![None; rules.len()]);
        Ok(Self {
            engine,
            outbox,
            state: Mutex::new(state),
            sinks,
            cfg,
            committed,
            acked,
            deferred: Default::default(),
            persisted: Default::default(),
            evaluating,
            cells,
            rule_health: std::sync::Mutex::new(
                rules
                    .iter()
                    .map(|r| RuleHealth {
                        name: r.name.clone(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            rules,
            sink_health: std::sync::Mutex::new(
                names
                    .iter()
                    .map(|n| SinkHealth {
                        name: n.clone(),
                        ..Default::default()
                    })
                    .collect(),
            ),
        })
    }

    /// Evaluation state of every rule.
    pub fn rule_health(&self) -> Vec<RuleHealth> {
        self.rule_health.lock().expect("not poisoned").clone()
    }

    /// Delivery state of every sink.
    pub fn sink_health(&self) -> Vec<SinkHealth> {
        self.sink_health.lock().expect("not poisoned").clone()
    }

    fn update_sink(&self, name: &str, f: impl FnOnce(&mut SinkHealth)) {
        let mut all = self.sink_health.lock().expect("not poisoned");
        if let Some(h) = all.iter_mut().find(|h| h.name == name) {
            f(h);
        }
    }

    /// The rules.
    pub fn rules(&self) -> &[AlertRule] {
        &self.rules
    }

    /// The outbox (for `alert_history` and health).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Pending and firing alerts, by rule and key.
    pub async fn active(&self) -> Vec<ActiveAlert> {
        self.active_page(usize::MAX).await.0
    }

    /// At most `limit` active alerts (firing ones first, then by rule and
    /// key) and the true totals: `(alerts, pending, firing)`. A storm keeps
    /// hundreds of thousands of keys active; a listing must not copy them
    /// all.
    pub async fn active_page(&self, limit: usize) -> (Vec<ActiveAlert>, usize, usize) {
        let state = self.state.lock().await;
        let (mut pending, mut firing) = (0, 0);
        for l in state.values() {
            for (_, s) in l.active() {
                match s.state {
                    AlertState::Firing => firing += 1,
                    _ => pending += 1,
                }
            }
        }
        let mut out = Vec::new();
        for want in [AlertState::Firing, AlertState::Pending] {
            for r in &self.rules {
                let Some(l) = state.get(&r.name) else {
                    continue;
                };
                for (key, s) in l.active().filter(|(_, s)| s.state == want) {
                    if out.len() >= limit {
                        return (out, pending, firing);
                    }
                    out.push(active(r, key, s));
                }
            }
        }
        (out, pending, firing)
    }

    /// Evaluates rule `i` once: query, lifecycle, commit. Returns the
    /// notifications committed (none if the clock is unknown yet: no event
    /// has arrived). The outcome is counted in [`AlertManager::rule_health`].
    pub async fn evaluate(&self, i: usize) -> Result<Vec<Notification>, AlertError> {
        self.evaluate_as(i, None).await
    }

    /// A bounded run's step along event time, called before each batch is
    /// applied with the engine's `as_of` and the batch's largest event
    /// time: every rule whose `every` cell of event time the batch may
    /// leave is evaluated now, on the state at the end of that cell and on
    /// that cell's clock ([`rule_clock`]). Live operation evaluates within
    /// the cell on the same clock value, so both give an episode the same
    /// start and id (for conditions that hold for whole cells). Does nothing
    /// with `bounded_evaluation = "end"`.
    pub async fn before_batch(&self, as_of: Option<i64>, batch_max_ts: i64) {
        if self.cfg.bounded_evaluation != BoundedEvaluation::EventTime {
            return;
        }
        let Some(as_of) = as_of else { return };
        for i in 0..self.rules.len() {
            let every = self.rules[i].every;
            let cell = rule_clock(as_of, every);
            if rule_clock(batch_max_ts, every) <= cell {
                continue;
            }
            let due = {
                let mut cells = self.cells.lock().expect("not poisoned");
                cells[i].replace(cell) != Some(cell)
            };
            if !due {
                continue;
            }
            metrics::counter!(crate::metric_names::ALERTS_EVENT_TIME_EVALUATIONS_TOTAL,
                "rule" => self.rules[i].name.clone())
            .increment(1);
            self.evaluate_reporting(i, Some(cell)).await;
        }
    }

    /// Evaluates rule `i` (on `clock`, or its own), counting and logging a
    /// failure (the rule's health records it too): for the loops, which go
    /// on with the next rule.
    async fn evaluate_reporting(&self, i: usize, clock: Option<i64>) {
        if let Err(e) = self.evaluate_as(i, clock).await {
            metrics::counter!(crate::metric_names::ALERTS_EVALUATION_ERRORS_TOTAL,
                "rule" => self.rules[i].name.clone())
            .increment(1);
            tracing::warn!(rule = %self.rules[i].name, error = %e, "alert evaluation failed");
        }
    }

    async fn evaluate_as(
        &self,
        i: usize,
        clock: Option<i64>,
    ) -> Result<Vec<Notification>, AlertError> {
        let started = Instant::now();
        let result = self.evaluate_once(i, clock).await;
        let took = started.elapsed();
        metrics::histogram!(crate::metric_names::ALERTS_EVALUATION_DURATION_SECONDS,
            "rule" => self.rules[i].name.clone())
        .record(took.as_secs_f64());
        let mut all = self.rule_health.lock().expect("not poisoned");
        let h = &mut all[i];
        h.last_duration_ms = took.as_millis() as u64;
        h.evaluation_seconds += took.as_secs_f64();
        match &result {
            Ok(_) => {
                h.evaluations += 1;
                h.consecutive_failures = 0;
                h.failing_since_ms = None;
            }
            Err(e) => {
                if h.consecutive_failures == 0 {
                    h.failing_since_ms = Some(EngineHandle::now_ms());
                }
                h.consecutive_failures += 1;
                h.last_error = Some(e.to_string());
            }
        }
        result
    }

    /// Turns one evaluation's admitted changes into outbox entries: one
    /// per alert, or one per group with `group_by`; plus a summary when
    /// changes were held back.
    fn shape(
        &self,
        rule: &AlertRule,
        now: i64,
        e: Evaluation,
        budget: usize,
        room: u64,
    ) -> Vec<Notification> {
        let admitted = e.notifications.len();
        let mut notes = if rule.group_by.is_empty() {
            e.notifications
        } else {
            group_notifications(rule, now, e.notifications)
        };
        metrics::gauge!(crate::metric_names::ALERTS_HELD_BACK_NOTIFICATIONS, "rule" => rule.name.clone())
            .set(e.held_back as f64);
        if e.held_back > 0 {
            metrics::counter!(crate::metric_names::ALERTS_HELD_BACK_TOTAL, "rule" => rule.name.clone())
                .increment(e.held_back as u64);
            let reason = if budget == rule.max_notifications {
                "max_notifications_per_evaluation"
            } else {
                "outbox_capacity"
            };
            tracing::warn!(rule = %rule.name, admitted, held_back = e.held_back,
                limit = rule.max_notifications, outbox_room = room, reason,
                "alert storm: changes beyond the limit wait for the next evaluations \
                 (same episodes and ids)");
            if room > 0 {
                notes.push(Notification {
                    alert_id: alert_id(&rule.name, "\0held_back", now),
                    rule: rule.name.clone(),
                    alert_key: "(held back)".into(),
                    state: AlertState::Firing,
                    severity: rule.severity.as_str().into(),
                    first_seen: now,
                    last_seen: now,
                    notified_at: now,
                    sequence: 1,
                    row: serde_json::json!({
                        "summary": true,
                        "admitted": admitted,
                        "held_back": e.held_back,
                        "reason": reason,
                        "limit": rule.max_notifications,
                        "outbox_room": room,
                    }),
                });
            }
        }
        notes
    }

    async fn evaluate_once(
        &self,
        i: usize,
        clock: Option<i64>,
    ) -> Result<Vec<Notification>, AlertError> {
        let rule = &self.rules[i];
        let _serial = self.evaluating[i].lock().await;
        let qerr = |e: storepulse_engine::EngineError| AlertError::Query {
            rule: rule.name.clone(),
            message: e.to_string(),
        };
        let (out, as_of) = self.engine.query_at(&rule.sql).await.map_err(qerr)?;
        metrics::counter!(crate::metric_names::ALERTS_EVALUATIONS_TOTAL, "rule" => rule.name.clone())
            .increment(1);
        let Some(as_of) = as_of else {
            return Ok(Vec::new());
        };
        let now = clock.unwrap_or_else(|| rule_clock(as_of, rule.every));
        let holding = keyed_rows(rule, &out.batches).map_err(|message| AlertError::Query {
            rule: rule.name.clone(),
            message,
        })?;
        let mut state = self.state.lock().await;
        if let Some(at) = state.get(&rule.name).and_then(|l| l.ahead_of(now)) {
            metrics::counter!(crate::metric_names::ALERTS_EVALUATIONS_DEFERRED_TOTAL, "rule" => rule.name.clone())
                .increment(1);
            if self
                .deferred
                .lock()
                .expect("not poisoned")
                .insert(rule.name.clone())
            {
                tracing::info!(rule = %rule.name, engine_clock_ms = now, rule_clock_ms = at,
                    "alert evaluation deferred: the engine is replaying events this rule has \
                     already evaluated (restored from a checkpoint); it resumes when the \
                     engine's clock catches up");
            }
            return Ok(Vec::new());
        }
        if self
            .deferred
            .lock()
            .expect("not poisoned")
            .remove(&rule.name)
        {
            tracing::info!(rule = %rule.name, engine_clock_ms = now, "alert evaluation resumed: the engine caught up");
        }
        // Evaluated in place (no copy of a lifecycle of thousands of keys).
        // Notifications are committed together with the lifecycle that
        // produced them; changes without a notification (`last_seen`, the
        // latest rows, pending keys) are persisted at most once per `every`:
        // committing the whole lifecycle at every evaluation was most of
        // the cost of alerting with thousands of active keys. A crash loses
        // at most `every` of such changes; the replay restores them.
        let lifecycle = state.entry(rule.name.clone()).or_default();
        // Never more than the rule's limit, nor than the outbox has room
        // for (one entry kept for the summary): a storm goes out in slices
        // over the next evaluations instead of failing them all.
        let room = self
            .cfg
            .outbox_capacity
            .saturating_sub(self.outbox.pending()?)
            .saturating_sub(1);
        let budget = rule.max_notifications.min(room as usize);
        let evaluation = lifecycle.evaluate_within(rule, now, holding, budget);
        let notes = self.shape(rule, now, evaluation, budget, room);
        let mut persisted = self.persisted.lock().expect("not poisoned");
        let due = persisted
            .get(&rule.name)
            .is_none_or(|t| t.elapsed() >= rule.every);
        if !notes.is_empty() || due {
            if let Err(e) = self
                .outbox
                .commit(&rule.name, lifecycle, &notes, &rule.sinks)
            {
                // Not committed: go back to the last committed lifecycle, so
                // that the next evaluation produces these notifications again.
                let committed = self
                    .outbox
                    .lifecycles()
                    .ok()
                    .and_then(|mut all| all.remove(&rule.name))
                    .unwrap_or_default();
                *lifecycle = committed;
                return Err(e.into());
            }
            persisted.insert(rule.name.clone(), Instant::now());
        }
        drop(persisted);
        for n in &notes {
            metrics::counter!(crate::metric_names::ALERTS_NOTIFICATIONS_TOTAL,
                "rule" => rule.name.clone(), "state" => format!("{:?}", n.state).to_lowercase())
            .increment(1);
        }
        let (mut pending, mut firing) = (0, 0);
        for s in lifecycle.keys.values() {
            match s.state {
                AlertState::Pending => pending += 1,
                _ => firing += 1,
            }
        }
        metrics::gauge!(crate::metric_names::ALERTS_ACTIVE, "rule" => rule.name.clone(), "state" => "pending")
            .set(pending as f64);
        metrics::gauge!(crate::metric_names::ALERTS_ACTIVE, "rule" => rule.name.clone(), "state" => "firing")
            .set(firing as f64);
        drop(state);
        if !notes.is_empty() {
            self.committed.send_modify(|v| *v += 1);
        }
        Ok(notes)
    }

    /// Evaluates every rule once more and waits (at most `timeout`) until
    /// the sinks delivered everything in the outbox; [`AlertManager::run`]
    /// must be running. True if the outbox is empty.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.evaluate_all().await;
        self.wait_delivered(timeout).await
    }

    /// Waits (at most `timeout`) until the sinks delivered everything in
    /// the outbox; [`AlertManager::run`] must be running. True if the
    /// outbox is empty.
    pub async fn wait_delivered(&self, timeout: Duration) -> bool {
        let mut acked = self.acked.subscribe();
        let wait = async {
            while self.outbox.pending().is_ok_and(|p| p > 0) {
                if acked.changed().await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        self.outbox.pending().is_ok_and(|p| p == 0)
    }

    /// Evaluates every rule once (after any evaluation in progress) and
    /// commits every lifecycle as it is then: at the end of a bounded run,
    /// the alerts of the final views. Failures are logged and counted.
    pub async fn evaluate_all(&self) {
        for i in 0..self.rules.len() {
            self.evaluate_reporting(i, None).await;
        }
        // The lifecycles as they are now (evaluations commit changes without
        // a notification only once per `every`).
        {
            let state = self.state.lock().await;
            for r in &self.rules {
                if let Some(l) = state.get(&r.name) {
                    match self.outbox.commit(&r.name, l, &[], &r.sinks) {
                        Ok(_) => {
                            self.persisted
                                .lock()
                                .expect("not poisoned")
                                .insert(r.name.clone(), Instant::now());
                        }
                        Err(e) => {
                            tracing::warn!(rule = %r.name, error = %e, "alert lifecycle not saved")
                        }
                    }
                }
            }
        }
    }

    /// Runs evaluation and delivery until `shutdown` becomes true.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let mut tasks = tokio::task::JoinSet::new();
        for sink in &self.sinks {
            tasks.spawn(self.clone().deliver_loop(sink.clone(), shutdown.clone()));
        }
        self.evaluate_loop(shutdown).await;
        while tasks.join_next().await.is_some() {}
    }

    async fn evaluate_loop(&self, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.engine.changes();
        let n = self.rules.len();
        let start = Instant::now();
        let mut next_due: Vec<Instant> = vec![start; n];
        let mut last: Vec<Option<Instant>> = vec![None; n];
        // New data since the rule's last evaluation.
        let mut dirty = vec![false; n];
        // What the rule's last evaluation took: evaluations of a rule keep
        // at least `EVAL_GAP_FACTOR` times that apart, data-triggered ones
        // (`min_interval` is the floor) and timed ones (`every` is the
        // floor), so a rule over millions of keys spends at most a tenth of
        // a core and does not starve ingestion.
        let mut cost = vec![Duration::ZERO; n];
        // Whether the rule's timer is stretched past `every` (logged when
        // that starts and stops).
        let mut stretched = vec![false; n];
        let gate = |last: Option<Instant>, cost: Duration| {
            last.map_or(start, |t| t + paced_gap(self.cfg.min_interval, cost))
        };
        loop {
            let now = Instant::now();
            for i in 0..n {
                if now >= next_due[i] || (dirty[i] && now >= gate(last[i], cost[i])) {
                    last[i] = Some(now);
                    dirty[i] = false;
                    self.evaluate_reporting(i, None).await;
                    cost[i] = now.elapsed();
                    let rule = &self.rules[i];
                    let gap = paced_gap(rule.every, cost[i]);
                    next_due[i] = now + gap;
                    if (gap > rule.every) != stretched[i] {
                        stretched[i] = gap > rule.every;
                        if stretched[i] {
                            tracing::warn!(rule = %rule.name, took_ms = cost[i].as_millis() as u64,
                                every = ?rule.every, evaluated_every = ?gap,
                                "alert rule evaluation is slow: evaluated less often than its \
                                 `every` (at most a tenth of a core per rule)");
                        } else {
                            tracing::info!(rule = %rule.name, every = ?rule.every,
                                "alert rule evaluated on its `every` again");
                        }
                    }
                }
            }
            // The next timer, or the earliest rate gate of a rule with new data.
            let wake = (0..n)
                .map(|i| {
                    if dirty[i] {
                        next_due[i].min(gate(last[i], cost[i]))
                    } else {
                        next_due[i]
                    }
                })
                .min()
                .unwrap_or(now + Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {}
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    dirty.iter_mut().for_each(|d| *d = true);
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn deliver_loop(
        self: Arc<Self>,
        sink: Arc<dyn Sink>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut committed = self.committed.subscribe();
        let name = sink.name().to_string();
        // The cursor this loop last acknowledged.
        let mut passed = 0;
        loop {
            let (batch, upto) = match self.outbox.next_for(&name, self.cfg.batch_max) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(sink = %name, error = %e, "reading the alert outbox failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            };
            if batch.is_empty() {
                // Past entries routed to other sinks only: that also lets
                // the outbox drop them, which `drain` waits for.
                if upto > passed && self.outbox.ack(&name, upto).is_ok() {
                    passed = upto;
                    self.acked.send_modify(|v| *v += 1);
                }
                tokio::select! {
                    _ = committed.changed() => continue,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    _ = shutdown.changed() => return,
                }
            }
            let notes: Vec<Notification> = batch.into_iter().map(|(_, e)| e.notification).collect();
            let mut backoff = ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(self.cfg.retry_max_delay)
                .with_jitter()
                .without_max_times()
                .build();
            loop {
                match sink.deliver(&notes).await {
                    Ok(()) => break,
                    Err(e) => {
                        metrics::counter!(crate::metric_names::ALERTS_DELIVERY_ERRORS_TOTAL, "sink" => name.clone())
                            .increment(1);
                        self.update_sink(&name, |h| {
                            h.consecutive_failures += 1;
                            h.failing_since_ms.get_or_insert_with(EngineHandle::now_ms);
                            h.last_error = Some(e.to_string());
                        });
                        metrics::gauge!(crate::metric_names::ALERTS_SINK_FAILING, "sink" => name.clone())
                            .set(1.0);
                        let delay = backoff.next().unwrap_or(self.cfg.retry_max_delay);
                        tracing::warn!(sink = %name, error = %e, retry_in = ?delay, notifications = notes.len(), "alert delivery failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.changed() => return,
                        }
                    }
                }
            }
            metrics::counter!(crate::metric_names::ALERTS_DELIVERED_TOTAL, "sink" => name.clone())
                .increment(notes.len() as u64);
            metrics::gauge!(crate::metric_names::ALERTS_SINK_FAILING, "sink" => name.clone())
                .set(0.0);
            self.update_sink(&name, |h| {
                if h.consecutive_failures > 0 {
                    tracing::info!(sink = %name, failures = h.consecutive_failures, "alert sink recovered");
                }
                h.delivered += notes.len() as u64;
                h.consecutive_failures = 0;
                h.failing_since_ms = None;
                h.last_delivery_ms = Some(EngineHandle::now_ms());
            });
            match self.outbox.ack(&name, upto) {
                Ok(()) => passed = upto,
                Err(e) => {
                    tracing::error!(sink = %name, error = %e, "acknowledging delivered alerts failed (they may be delivered again)");
                }
            }
            self.acked.send_modify(|v| *v += 1);
        }
    }
}

fn active(r: &AlertRule, key: &str, s: &KeyState) -> ActiveAlert {
    ActiveAlert {
        alert_id: crate::lifecycle::alert_id(&r.name, key, s.since),
        rule: r.name.clone(),
        alert_key: key.to_string(),
        state: s.state,
        severity: r.severity.as_str().to_string(),
        first_seen: s.since,
        last_seen: s.last_seen,
        row: row_value(&s.row),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_rules_are_timed_less_often_than_every() {
        let every = Duration::from_secs(10);
        // A cheap rule keeps its `every`.
        assert_eq!(paced_gap(every, Duration::from_millis(40)), every);
        assert_eq!(paced_gap(every, Duration::from_millis(1111)), every);
        // One that takes 4 s spends at most a tenth of a core: every 36 s.
        assert_eq!(
            paced_gap(every, Duration::from_secs(4)),
            Duration::from_secs(36)
        );
    }
}
