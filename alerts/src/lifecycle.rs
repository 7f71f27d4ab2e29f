//! The alert lifecycle per (rule, key), Prometheus style.
//!
//! Each evaluation passes the keys whose condition holds and the clock
//! `now`: the engine's event time (`engine_clock.as_of`), so a replay of the
//! same events gives the same transitions and the same ids.
//!
//! * A key that starts holding is **pending** (no notification).
//! * Held for `for` (event time) → **firing**: notify once.
//! * While firing and holding: re-notify every `renotify` (if non-zero),
//!   with the same id. `last_seen` follows `now`.
//! * Stops holding: stays firing for `keep_firing_for` (a return within it
//!   is the same episode: flapping is damped); after that → **resolved**:
//!   notify once and forget the key. A pending key that stops holding is
//!   forgotten silently.
//!
//! The alert id is a hash of (rule, key, episode start): stable across
//! re-notifications, resolution and restarts (the state is serializable and
//! restored with the outbox), new for the next episode of the same key.
//!
//! The lifecycle never goes back in event time: it remembers the clock of
//! its last evaluation, and an evaluation at an earlier `now` changes
//! nothing. After a crash the engine restores its last checkpoint and
//! replays the events since, while the lifecycle (committed with every
//! notification) is already past them: the replay must not fire, resolve or
//! re-fire alerts the sinks were already told about. Evaluation resumes
//! once the engine's clock is back where the lifecycle left off.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rule::AlertRule;

/// Where an alert is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// Condition holds, not yet for `for`.
    Pending,
    /// Notified.
    Firing,
    /// The condition stopped holding (only in notifications).
    Resolved,
}

/// A condition row as compact JSON text: a storm holds hundreds of
/// thousands of them, and a parsed `serde_json::Value` object costs ten
/// times the bytes of its text.
pub type Row = Box<serde_json::value::RawValue>;

/// The JSON `null` row.
pub fn null_row() -> Row {
    serde_json::value::RawValue::from_string("null".into()).expect("valid JSON")
}

/// A row parsed into a value (for payloads).
pub fn row_value(row: &serde_json::value::RawValue) -> serde_json::Value {
    serde_json::from_str(row.get()).unwrap_or(serde_json::Value::Null)
}

/// One key's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyState {
    /// Pending or firing.
    pub state: AlertState,
    /// Event time the condition started holding (the episode start).
    pub since: i64,
    /// Event time the condition was last seen holding.
    pub last_seen: i64,
    /// Event time of the last notification (firing).
    pub notified_at: Option<i64>,
    /// The condition's latest row (JSON object).
    pub row: Row,
}

impl PartialEq for KeyState {
    fn eq(&self, o: &Self) -> bool {
        (
            self.state,
            self.since,
            self.last_seen,
            self.notified_at,
            self.row.get(),
        ) == (o.state, o.since, o.last_seen, o.notified_at, o.row.get())
    }
}

/// A notification to deliver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Stable id of the episode: hex of xxh3-128(rule, key, since).
    pub alert_id: String,
    /// Rule name.
    pub rule: String,
    /// The key, as the key columns' values joined by `|`.
    pub alert_key: String,
    /// `firing` or `resolved`.
    pub state: AlertState,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    /// Event time the episode started (ms).
    pub first_seen: i64,
    /// Event time the condition was last seen holding (ms).
    pub last_seen: i64,
    /// Event time of this notification (ms, the clock of the evaluation).
    pub notified_at: i64,
    /// Which notification of the episode this is (1 = first firing).
    pub sequence: u32,
    /// The condition row's columns.
    pub row: serde_json::Value,
}

/// The id of an episode.
pub fn alert_id(rule: &str, key: &str, since: i64) -> String {
    let mut buf = Vec::with_capacity(rule.len() + key.len() + 10);
    buf.extend_from_slice(rule.as_bytes());
    buf.push(0);
    buf.extend_from_slice(key.as_bytes());
    buf.push(0);
    buf.extend_from_slice(&since.to_le_bytes());
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&buf))
}

/// When a group (see `AlertRule::group_by`) may notify next.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupClock {
    /// Event time a change of this group first waited (new group).
    pub waiting_since: Option<i64>,
    /// Event time of the group's last notification.
    pub notified_at: Option<i64>,
}

/// What one evaluation produced.
#[derive(Debug, Default)]
pub struct Evaluation {
    /// The notifications admitted (at most the budget), in key order.
    pub notifications: Vec<Notification>,
    /// Alert changes held back by the budget: they stay as they were and
    /// come again at the next evaluation (same episode, same id).
    pub held_back: usize,
    /// Alert changes waiting for their group's `group_wait` or
    /// `group_interval` (by design, not for lack of room).
    pub waiting: usize,
}

/// The lifecycle of every key of one rule.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Lifecycle {
    /// Key → state (pending or firing keys only).
    pub keys: BTreeMap<String, KeyState>,
    /// Notifications sent per episode id (for `sequence`).
    #[serde(default)]
    pub sent: BTreeMap<String, u32>,
    /// Event time of the last evaluation that changed the state; an
    /// evaluation at an earlier time is a replay and changes nothing.
    #[serde(default)]
    pub evaluated_at: Option<i64>,
    /// Notification clocks of the groups (rules with `group_by` only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, GroupClock>,
}

fn ms(d: std::time::Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// The group of a row: the `group_by` columns' values joined by `|`.
pub fn group_of(rule: &AlertRule, row: &serde_json::Value) -> String {
    let mut out = String::new();
    for (i, c) in rule.group_by.iter().enumerate() {
        if i > 0 {
            out.push('|');
        }
        match row.get(c) {
            Some(serde_json::Value::String(s)) => out.push_str(s),
            Some(serde_json::Value::Null) | None => {}
            Some(v) => out.push_str(&v.to_string()),
        }
    }
    out
}

impl Lifecycle {
    /// Keys pending or firing.
    pub fn active(&self) -> impl Iterator<Item = (&String, &KeyState)> {
        self.keys.iter()
    }

    /// The event time of the last evaluation if `now` is before it: an
    /// evaluation at `now` would be a replay of what the lifecycle has
    /// already seen (after a restore) and is skipped.
    pub fn ahead_of(&self, now: i64) -> Option<i64> {
        self.evaluated_at.filter(|t| now < *t)
    }

    /// One evaluation without a budget (see [`Self::evaluate_within`]).
    pub fn evaluate(
        &mut self,
        rule: &AlertRule,
        now: i64,
        holding: BTreeMap<String, Row>,
    ) -> Vec<Notification> {
        self.evaluate_within(rule, now, holding, usize::MAX)
            .notifications
    }

    /// One evaluation at event time `now` with the rows whose condition
    /// holds (key → row), turning at most `budget` alert changes into
    /// notifications (in key order: resolutions, then firings and
    /// re-notifications). A change beyond the budget, or of a group whose
    /// `group_wait` / `group_interval` has not passed, is not applied: the
    /// key stays as it was and the change comes again at the next
    /// evaluation, with the same episode start and id. None, and no change,
    /// if `now` is before the last evaluation ([`Self::ahead_of`]).
    pub fn evaluate_within(
        &mut self,
        rule: &AlertRule,
        now: i64,
        holding: BTreeMap<String, Row>,
        budget: usize,
    ) -> Evaluation {
        let mut out = Evaluation::default();
        if self.ahead_of(now).is_some() {
            return out;
        }
        self.evaluated_at = Some(now);
        let severity = rule.severity.as_str();
        let grouped = !rule.group_by.is_empty();
        let (group_wait, group_interval) = (ms(rule.group_wait), ms(rule.group_interval));
        let mut notified_groups: Vec<String> = Vec::new();
        // Whether a change of `row`'s group may notify now (and room is left).
        let mut admit = |groups: &mut BTreeMap<String, GroupClock>,
                         out: &mut Evaluation,
                         row: &serde_json::value::RawValue|
         -> bool {
            let group = grouped.then(|| group_of(rule, &row_value(row)));
            if let Some(g) = &group {
                let clock = groups.entry(g.clone()).or_default();
                let due = match clock.notified_at {
                    Some(t) => now - t >= group_interval,
                    None => now - *clock.waiting_since.get_or_insert(now) >= group_wait,
                };
                if !due {
                    out.waiting += 1;
                    return false;
                }
            }
            if out.notifications.len() >= budget {
                out.held_back += 1;
                return false;
            }
            notified_groups.extend(group);
            true
        };
        let notify = |out: &mut Evaluation,
                      sent: &mut BTreeMap<String, u32>,
                      key: &str,
                      s: &KeyState,
                      state| {
            let id = alert_id(&rule.name, key, s.since);
            let seq = sent.entry(id.clone()).or_insert(0);
            *seq += 1;
            out.notifications.push(Notification {
                alert_id: id,
                rule: rule.name.clone(),
                alert_key: key.to_string(),
                state,
                severity: severity.to_string(),
                first_seen: s.since,
                last_seen: s.last_seen,
                notified_at: now,
                sequence: *seq,
                row: row_value(&s.row),
            });
        };
        // Keys that stopped holding.
        let gone: Vec<String> = self
            .keys
            .keys()
            .filter(|k| !holding.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            let s = &self.keys[&key];
            match s.state {
                AlertState::Firing if now - s.last_seen >= ms(rule.keep_firing_for) => {
                    if !admit(&mut self.groups, &mut out, &s.row) {
                        continue;
                    }
                    let s = self.keys.remove(&key).expect("present");
                    notify(&mut out, &mut self.sent, &key, &s, AlertState::Resolved);
                    self.sent.remove(&alert_id(&rule.name, &key, s.since));
                }
                AlertState::Firing => {}
                _ => {
                    self.keys.remove(&key);
                }
            }
        }
        for (key, row) in holding {
            let s = self.keys.entry(key.clone()).or_insert_with(|| KeyState {
                state: AlertState::Pending,
                since: now,
                last_seen: now,
                notified_at: None,
                row: null_row(),
            });
            s.last_seen = s.last_seen.max(now);
            s.row = row;
            // Fires (pending for `for`) or re-notifies (firing, `renotify` due).
            let notifies = match s.state {
                AlertState::Pending => now - s.since >= ms(rule.for_),
                AlertState::Firing => {
                    !rule.renotify.is_zero()
                        && s.notified_at.is_some_and(|t| now - t >= ms(rule.renotify))
                }
                AlertState::Resolved => false,
            };
            if !notifies || !admit(&mut self.groups, &mut out, &s.row) {
                continue;
            }
            s.state = AlertState::Firing;
            s.notified_at = Some(now);
            notify(&mut out, &mut self.sent, &key, s, AlertState::Firing);
        }
        if grouped {
            for g in notified_groups {
                if let Some(c) = self.groups.get_mut(&g) {
                    c.notified_at = Some(now);
                    c.waiting_since = None;
                }
            }
            // A group quiet for a whole interval starts afresh (waits
            // `group_wait` again), as in Alertmanager.
            self.groups.retain(|_, c| {
                c.waiting_since.is_some()
                    || c.notified_at
                        .is_some_and(|t| now - t < group_interval.max(1))
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::Severity;
    use std::time::Duration;

    const M: i64 = 60_000;

    fn rule(for_m: u64, keep_m: u64, renotify_m: u64) -> AlertRule {
        AlertRule {
            name: "low_stock".into(),
            sql: String::new(),
            key: vec!["k".into()],
            every: Duration::from_secs(10),
            for_: Duration::from_secs(for_m * 60),
            keep_firing_for: Duration::from_secs(keep_m * 60),
            renotify: Duration::from_secs(renotify_m * 60),
            severity: Severity::Warning,
            sinks: vec![],
            group_by: vec![],
            group_wait: Duration::ZERO,
            group_interval: Duration::ZERO,
            max_notifications: usize::MAX,
        }
    }

    fn raw(v: serde_json::Value) -> Row {
        serde_json::value::to_raw_value(&v).unwrap()
    }

    fn rows(keys: &[&str]) -> BTreeMap<String, Row> {
        keys.iter()
            .map(|k| (k.to_string(), raw(serde_json::json!({ "k": k }))))
            .collect()
    }

    fn states(n: &[Notification]) -> Vec<(String, AlertState, u32)> {
        n.iter()
            .map(|n| (n.alert_key.clone(), n.state, n.sequence))
            .collect()
    }

    #[test]
    fn pending_then_firing_after_for_then_resolved() {
        let r = rule(2, 0, 0);
        let mut l = Lifecycle::default();
        assert!(l.evaluate(&r, 0, rows(&["a"])).is_empty(), "pending");
        assert_eq!(l.keys["a"].state, AlertState::Pending);
        assert!(l.evaluate(&r, M, rows(&["a"])).is_empty(), "still pending");
        let n = l.evaluate(&r, 2 * M, rows(&["a"]));
        assert_eq!(states(&n), vec![("a".into(), AlertState::Firing, 1)]);
        assert_eq!(n[0].first_seen, 0);
        // Held on: no second notification (one per episode, not per evaluation).
        assert!(l.evaluate(&r, 3 * M, rows(&["a"])).is_empty());
        let resolved = l.evaluate(&r, 4 * M, rows(&[]));
        assert_eq!(
            states(&resolved),
            vec![("a".into(), AlertState::Resolved, 2)]
        );
        assert_eq!(resolved[0].alert_id, n[0].alert_id);
        assert_eq!(resolved[0].last_seen, 3 * M);
        assert!(l.keys.is_empty() && l.sent.is_empty());
    }

    #[test]
    fn a_pending_key_that_stops_holding_is_forgotten_silently() {
        let r = rule(5, 0, 0);
        let mut l = Lifecycle::default();
        l.evaluate(&r, 0, rows(&["a"]));
        assert!(l.evaluate(&r, M, rows(&[])).is_empty());
        assert!(l.keys.is_empty());
        // Coming back starts a new pending period.
        l.evaluate(&r, 2 * M, rows(&["a"]));
        assert!(l.evaluate(&r, 6 * M, rows(&["a"])).is_empty());
        assert_eq!(l.evaluate(&r, 7 * M, rows(&["a"])).len(), 1);
    }

    #[test]
    fn renotify_while_firing_keeps_the_id() {
        let r = rule(0, 0, 60);
        let mut l = Lifecycle::default();
        let first = l.evaluate(&r, 0, rows(&["a"]));
        assert_eq!(first.len(), 1, "for = 0 fires at once");
        assert!(l.evaluate(&r, 59 * M, rows(&["a"])).is_empty());
        let again = l.evaluate(&r, 60 * M, rows(&["a"]));
        assert_eq!(states(&again), vec![("a".into(), AlertState::Firing, 2)]);
        assert_eq!(again[0].alert_id, first[0].alert_id);
        assert!(l.evaluate(&r, 61 * M, rows(&["a"])).is_empty());
    }

    #[test]
    fn flapping_is_damped_by_keep_firing_for() {
        let r = rule(0, 5, 0);
        let mut l = Lifecycle::default();
        let mut sent = l.evaluate(&r, 0, rows(&["a"]));
        // Off and on every minute for ten minutes: never resolved, one notification.
        for t in 1..=10 {
            let keys: &[&str] = if t % 2 == 0 { &["a"] } else { &[] };
            sent.extend(l.evaluate(&r, t * M, rows(keys)));
        }
        assert_eq!(sent.len(), 1, "{sent:?}");
        // Gone for good: resolved once keep_firing_for has passed since last seen.
        assert!(l.evaluate(&r, 14 * M, rows(&[])).is_empty());
        let r2 = l.evaluate(&r, 15 * M, rows(&[]));
        assert_eq!(states(&r2), vec![("a".into(), AlertState::Resolved, 2)]);
    }

    #[test]
    fn ids_are_deterministic_and_new_per_episode() {
        let r = rule(0, 0, 0);
        let run = || {
            let mut l = Lifecycle::default();
            let mut out = l.evaluate(&r, 0, rows(&["a", "b"]));
            out.extend(l.evaluate(&r, M, rows(&["b"])));
            out.extend(l.evaluate(&r, 2 * M, rows(&["a", "b"])));
            out
        };
        let (x, y) = (run(), run());
        assert_eq!(x, y, "same inputs, same notifications and ids");
        let a: Vec<&Notification> = x.iter().filter(|n| n.alert_key == "a").collect();
        assert_eq!(a.len(), 3); // firing, resolved, firing (new episode)
        assert_eq!(a[0].alert_id, a[1].alert_id);
        assert_ne!(a[0].alert_id, a[2].alert_id);
    }

    #[test]
    fn a_replay_behind_the_last_evaluation_changes_nothing() {
        let r = rule(0, 0, 0);
        let mut l = Lifecycle::default();
        let fired = l.evaluate(&r, 10 * M, rows(&["a"]));
        assert_eq!(fired.len(), 1);
        assert!(l.evaluate(&r, 20 * M, rows(&["a"])).is_empty());
        // Restart: the engine restored an older checkpoint and replays from
        // 5m, where "a" did not hold yet and "b" held for a moment.
        let mut restored: Lifecycle =
            serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        let before = restored.clone();
        assert_eq!(restored.ahead_of(5 * M), Some(20 * M));
        for t in [5, 12, 19] {
            assert!(
                restored.evaluate(&r, t * M, rows(&["b"])).is_empty(),
                "replayed history fires nothing"
            );
        }
        assert_eq!(restored.keys, before.keys, "and resolves nothing");
        // Caught up: evaluation resumes from where it left off.
        assert_eq!(restored.ahead_of(20 * M), None);
        let n = restored.evaluate(&r, 21 * M, rows(&["b"]));
        assert_eq!(
            states(&n),
            vec![
                ("a".into(), AlertState::Resolved, 2),
                ("b".into(), AlertState::Firing, 1)
            ]
        );
        assert_eq!(n[0].alert_id, fired[0].alert_id);
    }

    #[test]
    fn state_survives_serialization() {
        let r = rule(0, 10, 0);
        let mut l = Lifecycle::default();
        let first = l.evaluate(&r, 0, rows(&["a"]));
        let json = serde_json::to_string(&l).unwrap();
        // "Restart": restore, the condition is gone for longer than keep_firing_for.
        let mut restored: Lifecycle = serde_json::from_str(&json).unwrap();
        let n = restored.evaluate(&r, 11 * M, rows(&[]));
        assert_eq!(n.len(), 1);
        assert_eq!(
            n[0].alert_id, first[0].alert_id,
            "same episode id after restore"
        );
        assert_eq!(n[0].state, AlertState::Resolved);
    }

    #[test]
    fn a_storm_goes_out_in_slices_and_nothing_is_lost_or_doubled() {
        let r = rule(0, 0, 0);
        let mut l = Lifecycle::default();
        let keys: Vec<String> = (0..25).map(|i| format!("k{i:02}")).collect();
        let all = || {
            keys.iter()
                .map(|k| (k.clone(), raw(serde_json::json!({ "k": k }))))
                .collect::<BTreeMap<_, _>>()
        };
        let mut fired = Vec::new();
        let mut t = 0;
        loop {
            let e = l.evaluate_within(&r, t * M, all(), 10);
            assert!(e.notifications.len() <= 10);
            fired.extend(e.notifications);
            t += 1;
            if e.held_back == 0 {
                break;
            }
        }
        assert_eq!(t, 3, "25 changes in slices of 10");
        let mut ids: Vec<_> = fired.iter().map(|n| n.alert_key.clone()).collect();
        ids.dedup();
        assert_eq!(ids, keys, "every key fired once, in key order");
        // Held-back keys kept their episode start (the first evaluation).
        assert!(fired.iter().all(|n| n.first_seen == 0));
        // Resolution of all 25 is sliced the same way.
        let mut resolved = 0;
        for t in 3..6 {
            resolved += l
                .evaluate_within(&r, t * M, BTreeMap::new(), 10)
                .notifications
                .len();
        }
        assert_eq!(resolved, 25);
        assert!(l.keys.is_empty());
    }

    #[test]
    fn groups_wait_then_notify_together_then_respect_the_interval() {
        let mut r = rule(0, 0, 0);
        r.group_by = vec!["store".into()];
        r.group_wait = Duration::from_secs(60);
        r.group_interval = Duration::from_secs(300);
        let row = |store: &str, k: &str| {
            (
                format!("{store}|{k}"),
                raw(serde_json::json!({"store": store, "k": k})),
            )
        };
        let mut l = Lifecycle::default();
        let first: BTreeMap<_, _> = [row("S1", "a")].into_iter().collect();
        let e = l.evaluate_within(&r, 0, first, usize::MAX);
        assert!(
            e.notifications.is_empty() && e.waiting == 1,
            "new group waits group_wait"
        );
        let both: BTreeMap<_, _> = [row("S1", "a"), row("S1", "b")].into_iter().collect();
        let e = l.evaluate_within(&r, M, both.clone(), usize::MAX);
        assert_eq!(e.notifications.len(), 2, "after group_wait: both together");
        assert_eq!(e.notifications[0].first_seen, 0, "a's episode began at 0");
        let three: BTreeMap<_, _> = [row("S1", "a"), row("S1", "b"), row("S1", "c")]
            .into_iter()
            .collect();
        let e = l.evaluate_within(&r, 2 * M, three.clone(), usize::MAX);
        assert!(
            e.notifications.is_empty() && e.waiting == 1,
            "within group_interval"
        );
        let e = l.evaluate_within(&r, 6 * M, three, usize::MAX);
        assert_eq!(e.notifications.len(), 1, "c after the interval");
        assert_eq!(e.notifications[0].first_seen, 2 * M);
    }
}
