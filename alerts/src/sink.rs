//! Alert sinks: where notifications go, configured by name
//! (`[[alerts.sinks]]`).
//!
//! * `webhook` — HTTP POST of a JSON array of notifications, with
//!   `X-Storepulse-Signature: sha256=<hex HMAC-SHA256(secret, body)>` so the
//!   receiver can verify the sender, a request timeout and a per-sink rate
//!   limit (requests per second).
//! * `kafka` — one JSON message per notification, keyed by the row's
//!   `store_id` (else the alert key), through an idempotent producer.
//! * `jsonl` — one JSON line per notification appended to a file (synced).
//! * `log` — a structured `tracing` event per notification.
//!
//! A failed delivery returns an error; the delivery loop retries the same
//! batch with exponential backoff and jitter until it succeeds (nothing is
//! dropped), so a sink sees a notification at least once and a receiver
//! de-duplicates by `alert_id`.

use std::{io::Write, num::NonZeroU32, path::PathBuf, sync::Mutex, time::Duration};

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use rdkafka::{
    producer::{FutureProducer, FutureRecord},
    ClientConfig,
};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::lifecycle::Notification;

/// A delivery failure (retried).
#[derive(Debug, thiserror::Error)]
#[error("sink '{sink}': {message}")]
pub struct SinkError {
    /// Sink name.
    pub sink: String,
    /// What failed.
    pub message: String,
}

/// Where notifications are delivered.
#[async_trait]
pub trait Sink: Send + Sync + std::fmt::Debug {
    /// The sink's configured name.
    fn name(&self) -> &str;
    /// Delivers a batch (all or error: the batch is retried whole).
    async fn deliver(&self, batch: &[Notification]) -> Result<(), SinkError>;
}

/// One sink's configuration (`[[alerts.sinks]]`, `type` selects the kind;
/// `name` is what rules refer to in `sinks = '...'`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// HTTP POST of JSON batches.
    Webhook {
        /// Sink name.
        name: String,
        /// Receiver URL.
        url: String,
        /// HMAC-SHA256 key for `X-Storepulse-Signature`; `env:NAME` reads
        /// it from the environment. Unset: no signature header.
        #[serde(default)]
        secret: Option<String>,
        /// Request timeout.
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
        /// At most this many requests per second.
        #[serde(default = "default_rate")]
        max_requests_per_second: u32,
    },
    /// A Kafka topic.
    Kafka {
        /// Sink name.
        name: String,
        /// Bootstrap servers.
        brokers: String,
        /// Topic.
        topic: String,
        /// Extra librdkafka producer properties.
        #[serde(default)]
        properties: std::collections::BTreeMap<String, String>,
    },
    /// A JSON-lines file.
    Jsonl {
        /// Sink name.
        name: String,
        /// File path (appended).
        path: PathBuf,
    },
    /// `tracing` events.
    Log {
        /// Sink name.
        name: String,
    },
}

impl SinkConfig {
    /// The sink's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Webhook { name, .. }
            | Self::Kafka { name, .. }
            | Self::Jsonl { name, .. }
            | Self::Log { name } => name,
        }
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_rate() -> u32 {
    10
}

/// Builds the sink a configuration describes.
pub fn build(cfg: &SinkConfig) -> Result<Box<dyn Sink>, SinkError> {
    let err = |message: String| SinkError {
        sink: cfg.name().to_string(),
        message,
    };
    Ok(match cfg {
        SinkConfig::Webhook {
            name,
            url,
            secret,
            timeout,
            max_requests_per_second,
        } => {
            let secret = match secret.as_deref() {
                Some(s) if s.starts_with("env:") => Some(std::env::var(&s[4..]).map_err(|_| {
                    err(format!(
                        "secret: environment variable {} is not set",
                        &s[4..]
                    ))
                })?),
                other => other.map(str::to_string),
            };
            Box::new(
                Webhook::new(name, url, secret, *timeout, *max_requests_per_second).map_err(err)?,
            )
        }
        SinkConfig::Kafka {
            name,
            brokers,
            topic,
            properties,
        } => Box::new(Kafka::new(name, brokers, topic, properties).map_err(err)?),
        SinkConfig::Jsonl { name, path } => Box::new(Jsonl::open(name, path).map_err(err)?),
        SinkConfig::Log { name } => Box::new(Log(name.clone())),
    })
}

/// The signature header value for `body`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a signature header (for receivers and tests), in constant time.
pub fn verify(secret: &str, body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

type Limiter = governor::DefaultDirectRateLimiter;

/// HTTP webhook.
pub struct Webhook {
    name: String,
    url: String,
    secret: Option<String>,
    client: reqwest::Client,
    limiter: Limiter,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish()
    }
}

impl Webhook {
    /// A webhook sink.
    pub fn new(
        name: &str,
        url: &str,
        secret: Option<String>,
        timeout: Duration,
        per_second: u32,
    ) -> Result<Self, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("url '{url}': {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("url '{url}': expected http:// or https://"));
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("storepulse/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        let rate = NonZeroU32::new(per_second).ok_or("max_requests_per_second must be > 0")?;
        Ok(Self {
            name: name.to_string(),
            url: url.to_string(),
            secret,
            client,
            limiter: governor::RateLimiter::direct(governor::Quota::per_second(rate)),
        })
    }
}

#[async_trait]
impl Sink for Webhook {
    fn name(&self) -> &str {
        &self.name
    }
    async fn deliver(&self, batch: &[Notification]) -> Result<(), SinkError> {
        let err = |message: String| SinkError {
            sink: self.name.clone(),
            message,
        };
        self.limiter.until_ready().await;
        let body = serde_json::to_vec(batch).map_err(|e| err(e.to_string()))?;
        let mut req = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(secret) = &self.secret {
            req = req.header("X-Storepulse-Signature", signature(secret, &body));
        }
        let resp = req
            .body(body)
            .send()
            .await
            .map_err(|e| err(format!("POST {}: {e}", self.url)))?;
        if !resp.status().is_success() {
            return Err(err(format!("POST {}: HTTP {}", self.url, resp.status())));
        }
        Ok(())
    }
}

/// Kafka topic sink.
pub struct Kafka {
    name: String,
    topic: String,
    producer: FutureProducer,
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka")
            .field("name", &self.name)
            .field("topic", &self.topic)
            .finish()
    }
}

impl Kafka {
    /// A Kafka sink producing to `topic`.
    pub fn new(
        name: &str,
        brokers: &str,
        topic: &str,
        properties: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000");
        for (k, v) in properties {
            cfg.set(k, v);
        }
        let producer: FutureProducer = cfg
            .create()
            .map_err(|e| format!("producer for {brokers}: {e}"))?;
        Ok(Self {
            name: name.to_string(),
            topic: topic.to_string(),
            producer,
        })
    }
}

#[async_trait]
impl Sink for Kafka {
    fn name(&self) -> &str {
        &self.name
    }
    async fn deliver(&self, batch: &[Notification]) -> Result<(), SinkError> {
        let mut pending = Vec::with_capacity(batch.len());
        for n in batch {
            let key = n
                .row
                .get("store_id")
                .and_then(|v| v.as_str())
                .unwrap_or(&n.alert_key)
                .to_string();
            let payload = serde_json::to_vec(n).map_err(|e| SinkError {
                sink: self.name.clone(),
                message: e.to_string(),
            })?;
            let record = FutureRecord::to(&self.topic).key(&key).payload(&payload);
            pending.push(
                self.producer
                    .send_result(record)
                    .map_err(|(e, _)| SinkError {
                        sink: self.name.clone(),
                        message: format!("produce to {}: {e}", self.topic),
                    })?,
            );
        }
        for p in pending {
            match p.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    return Err(SinkError {
                        sink: self.name.clone(),
                        message: format!("produce to {}: {e}", self.topic),
                    })
                }
                Err(_) => {
                    return Err(SinkError {
                        sink: self.name.clone(),
                        message: "producer dropped the message".into(),
                    })
                }
            }
        }
        Ok(())
    }
}

/// JSON-lines file sink.
#[derive(Debug)]
pub struct Jsonl {
    name: String,
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl Jsonl {
    /// Opens `path` for appending.
    pub fn open(name: &str, path: &std::path::Path) -> Result<Self, String> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("path {}: {e}", path.display()))?;
        Ok(Self {
            name: name.to_string(),
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }
}

#[async_trait]
impl Sink for Jsonl {
    fn name(&self) -> &str {
        &self.name
    }
    async fn deliver(&self, batch: &[Notification]) -> Result<(), SinkError> {
        let mut buf = Vec::new();
        for n in batch {
            serde_json::to_writer(&mut buf, n).map_err(|e| SinkError {
                sink: self.name.clone(),
                message: e.to_string(),
            })?;
            buf.push(b'\n');
        }
        let mut f = self.file.lock().expect("jsonl sink lock");
        f.write_all(&buf)
            .and_then(|_| f.sync_data())
            .map_err(|e| SinkError {
                sink: self.name.clone(),
                message: format!("{}: {e}", self.path.display()),
            })
    }
}

/// `tracing` sink.
#[derive(Debug)]
pub struct Log(String);

#[async_trait]
impl Sink for Log {
    fn name(&self) -> &str {
        &self.0
    }
    async fn deliver(&self, batch: &[Notification]) -> Result<(), SinkError> {
        // One short line per notification (critical at WARN, the rest at
        // INFO); the condition row only at DEBUG (`alert_history` has it).
        for n in batch {
            if n.severity == "critical" {
                tracing::warn!(alert_id = %n.alert_id, rule = %n.rule, key = %n.alert_key,
                    state = ?n.state, severity = %n.severity, "alert");
            } else {
                tracing::info!(alert_id = %n.alert_id, rule = %n.rule, key = %n.alert_key,
                    state = ?n.state, severity = %n.severity, "alert");
            }
            tracing::debug!(alert_id = %n.alert_id, row = %n.row, "alert row");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_reject_tampering() {
        let s = signature("k", b"[1]");
        assert!(s.starts_with("sha256=") && s.len() == 7 + 64);
        assert!(verify("k", b"[1]", &s));
        assert!(!verify("k", b"[2]", &s));
        assert!(!verify("other", b"[1]", &s));
        assert!(!verify("k", b"[1]", "md5=00"));
    }

    #[test]
    fn sink_configs_are_checked() {
        let cfg: SinkConfig = toml_like(r#"{"name":"hook","type":"webhook","url":"ftp://x"}"#);
        assert!(build(&cfg)
            .unwrap_err()
            .to_string()
            .contains("expected http"));
        let bad = serde_json::from_str::<SinkConfig>(r#"{"name":"x","type":"log","urll":"y"}"#);
        assert!(bad.is_err());
        let cfg: SinkConfig = toml_like(
            r#"{"name":"hook","type":"webhook","url":"http://127.0.0.1:1/","secret":"env:STOREPULSE_NO_SUCH_VAR"}"#,
        );
        assert!(build(&cfg)
            .unwrap_err()
            .to_string()
            .contains("STOREPULSE_NO_SUCH_VAR"));
    }

    fn toml_like(json: &str) -> SinkConfig {
        serde_json::from_str(json).unwrap()
    }
}
