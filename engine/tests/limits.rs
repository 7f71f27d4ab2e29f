//! A key explosion stops at `[engine] max_state_bytes` with an error that
//! names the view, instead of growing until the process is OOM-killed.

use storepulse_engine::{Engine, EngineConfig, EngineError};
use storepulse_ingest::StreamKind;

#[tokio::test]
async fn a_key_explosion_hits_the_state_limit_with_a_clear_error() {
    let mut e = Engine::new(EngineConfig {
        max_state_bytes: Some(bytesize::ByteSize::kib(256)),
        ..Default::default()
    })
    .unwrap();
    e.execute_sql(
        "CREATE MATERIALIZED VIEW per_device AS
         SELECT device_id, count(*) AS n, max(value) AS hottest FROM iot_readings GROUP BY device_id",
    )
    .await
    .unwrap();
    let mut failed = None;
    for chunk in 0..200u64 {
        let lines: Vec<String> = (0..500)
            .map(|i| {
                let d = chunk * 500 + i;
                format!(
                    r#"{{"event_id":"e{d}","ts":{},"store_id":"S1","device_id":"device-{d}","metric":"fridge_temp_c","value":4.0}}"#,
                    1_767_600_000_000i64 + d as i64
                )
            })
            .collect();
        let msg =
            storepulse_testkit::json_message(StreamKind::IotReadings, &lines, "p0", chunk + 1)
                .unwrap()
                .unwrap();
        if let Err(err) = e.apply(msg, 0).await {
            failed = Some((chunk, err));
            break;
        }
    }
    let (chunk, err) = failed.expect("100,000 distinct keys must pass 256 KiB");
    assert!(chunk > 0, "the first small batch fits");
    assert!(matches!(err, EngineError::StateLimit { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("max_state_bytes") && msg.contains("per_device") && msg.contains("groups"),
        "{msg}"
    );
    assert!(e.state_bytes() < 4 * 256 * 1024, "stopped near the limit");
}
