//! `GET /api/v1/views`: every view, stream, dimension and table a query
//! can name, with columns, kind, state size and defining SQL.

use axum::{
    extract::State,
    response::{IntoResponse, Response},
    Json,
};
use datafusion::datasource::TableType;
use serde_json::json;

use super::AppState;

/// Lists the engine's views, then the other tables of the serving catalog.
pub(super) async fn views(State(app): State<AppState>) -> Response {
    let mut list: Vec<serde_json::Value> = app
        .engine
        .lock()
        .await
        .views()
        .into_iter()
        .map(|v| {
            json!({
                "name": v.name, "kind": v.kind, "streams": v.streams,
                "columns": v.columns.iter().map(|(n, t)| json!({"name": n, "type": t})).collect::<Vec<_>>(),
                "groups": v.groups, "state_bytes": v.state_bytes,
                "output_bytes": v.output_bytes, "sql": v.sql,
            })
        })
        .collect();
    let ctx = app.engine.lock().await.serving_context().clone();
    let known: Vec<String> = list
        .iter()
        .map(|v| v["name"].as_str().unwrap_or("").to_string())
        .collect();
    if let Some(schema) = ctx.catalog("datafusion").and_then(|c| c.schema("public")) {
        let mut names = schema.table_names();
        names.sort();
        for name in names {
            if known.contains(&name) {
                continue;
            }
            if let Ok(Some(t)) = schema.table(&name).await {
                let kind = match t.table_type() {
                    TableType::View => "view",
                    TableType::Temporary => "stream",
                    TableType::Base => "table",
                };
                let columns: Vec<_> = t
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| json!({"name": f.name(), "type": f.data_type().to_string()}))
                    .collect();
                list.push(json!({"name": name, "kind": kind, "columns": columns, "sql": t.get_table_definition()}));
            }
        }
    }
    Json(json!({ "views": list })).into_response()
}
