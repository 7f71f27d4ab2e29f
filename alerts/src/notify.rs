//! From a rule's query result to outbox entries: the condition rows keyed
//! by the rule's key columns (kept as compact JSON text), and one
//! notification per group for rules with `group_by`.

use std::collections::BTreeMap;

use crate::{
    lifecycle::{alert_id, group_of, AlertState, Notification, Row},
    rule::AlertRule,
};

/// The query's rows as JSON objects keyed by the rule's key columns
/// (values joined by `|`). A key seen twice keeps its last row.
pub(crate) fn keyed_rows(
    rule: &AlertRule,
    batches: &[datafusion::arrow::array::RecordBatch],
) -> Result<BTreeMap<String, Row>, String> {
    let mut out = BTreeMap::new();
    let mut buf = Vec::new();
    for b in batches {
        if b.num_rows() == 0 {
            continue;
        }
        buf.clear();
        {
            let mut w = arrow_json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow_json::writer::LineDelimited>(&mut buf);
            w.write(b).map_err(|e| e.to_string())?;
            w.finish().map_err(|e| e.to_string())?;
        }
        // Each row is kept as its JSON text; it is parsed only to read the key.
        for line in buf.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
            let text = std::str::from_utf8(line).map_err(|e| e.to_string())?;
            let row: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(text).map_err(|e| e.to_string())?;
            let key = rule
                .key
                .iter()
                .map(|k| match row.get(k) {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Null) | None => String::new(),
                    Some(v) => v.to_string(),
                })
                .collect::<Vec<_>>()
                .join("|");
            let raw = serde_json::value::RawValue::from_string(text.to_string())
                .map_err(|e| e.to_string())?;
            out.insert(key, raw);
        }
    }
    Ok(out)
}

/// One notification per group: the group's columns, counts and its alerts.
/// The id is stable for the (rule, group, evaluation time), so a replay of
/// the same events gives the same ids.
pub(crate) fn group_notifications(
    rule: &AlertRule,
    now: i64,
    notes: Vec<Notification>,
) -> Vec<Notification> {
    let mut groups: BTreeMap<String, Vec<Notification>> = BTreeMap::new();
    for n in notes {
        groups.entry(group_of(rule, &n.row)).or_default().push(n);
    }
    groups
        .into_iter()
        .map(|(g, members)| {
            let firing = members
                .iter()
                .filter(|n| n.state == AlertState::Firing)
                .count();
            let columns: serde_json::Map<String, serde_json::Value> = rule
                .group_by
                .iter()
                .map(|c| {
                    let v = members[0].row.get(c).cloned().unwrap_or_default();
                    (c.clone(), v)
                })
                .collect();
            Notification {
                alert_id: alert_id(&rule.name, &format!("\0group\0{g}"), now),
                rule: rule.name.clone(),
                alert_key: g,
                state: if firing > 0 {
                    AlertState::Firing
                } else {
                    AlertState::Resolved
                },
                severity: rule.severity.as_str().into(),
                first_seen: members.iter().map(|n| n.first_seen).min().unwrap_or(now),
                last_seen: members.iter().map(|n| n.last_seen).max().unwrap_or(now),
                notified_at: now,
                sequence: 1,
                row: serde_json::json!({
                    "group": columns,
                    "firing": firing,
                    "resolved": members.len() - firing,
                    "alerts": members.iter().map(|n| serde_json::json!({
                        "alert_id": n.alert_id, "alert_key": n.alert_key,
                        "state": n.state, "first_seen": n.first_seen,
                        "last_seen": n.last_seen, "sequence": n.sequence, "row": n.row,
                    })).collect::<Vec<_>>(),
                }),
            }
        })
        .collect()
}
