//! Real processes for end-to-end tests and benches: a running `storepulse`
//! server (its address read from its own log line, stopped on drop), a
//! `tansu` Kafka-compatible broker on loopback, and a free loopback port.

use std::{
    io::{BufRead, BufReader},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};
use wait_timeout::ChildExt;

/// The `[[dimensions]]` and dataset `[[sources]]` tables of a config that
/// runs the chain [`gen_dataset`] wrote to `data`.
pub fn dataset_toml(data: &Path) -> String {
    let d = data.display();
    format!(
        r#"
[[dimensions]]
name = "stores"
path = "{d}/stores.csv"
[[dimensions]]
name = "products"
path = "{d}/products.csv"
[[dimensions]]
name = "replenishment_policy"
path = "{d}/replenishment_policy.csv"
[[dimensions]]
name = "prices"
path = "{d}/prices.csv"
[[sources]]
type = "dataset"
dir = "{d}"
"#
    )
}

/// Runs `bin gen` (stores, SKUs, members, days, seed) into `out`; panics
/// with its stderr if it fails. Returns its stdout (the per-stream counts).
pub fn gen_dataset(bin: &str, out: &Path, chain: [usize; 4], seed: u64) -> String {
    let [stores, skus, members, days] = chain.map(|n| n.to_string());
    let seed = seed.to_string();
    gen_with(
        bin,
        out,
        &[
            "--stores",
            &stores,
            "--skus",
            &skus,
            "--members",
            &members,
            "--days",
            &days,
            "--seed",
            &seed,
        ],
    )
}

/// Runs `bin gen <args> --out <out>`; panics with its stderr if it fails.
/// Returns its stdout (the per-stream counts).
pub fn gen_with(bin: &str, out: &Path, args: &[&str]) -> String {
    let st = Command::new(bin)
        .arg("gen")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run gen");
    assert!(
        st.status.success(),
        "gen failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    String::from_utf8_lossy(&st.stdout).into_owned()
}

/// A free TCP port on 127.0.0.1 (bound, then released for the caller).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A running `storepulse run`, killed on drop.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// `127.0.0.1:PORT` of the Postgres wire listener, if `[pg]` is on.
    pub pg: Option<String>,
    stderr: mpsc::Receiver<String>,
    /// Lines read while waiting for the address line, not yet drained.
    early: std::sync::Mutex<Vec<String>>,
}

impl Server {
    /// Starts `bin run --config config` and waits for the line announcing
    /// its HTTP address.
    pub fn start(bin: &str, config: &Path) -> Server {
        let mut child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info,librdkafka=warn")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start storepulse");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut early = Vec::new();
        let (base, pg) = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| {
                    panic!("server did not report its address:\n{}", early.join("\n"))
                });
            early.push(line.clone());
            if let Some(i) = line.find("url=http") {
                let url = line[i + 4..].split_whitespace().next().expect("url");
                let pg = line
                    .find(" pg=")
                    .map(|j| line[j + 4..].split_whitespace().next().expect("pg"))
                    .filter(|a| *a != "off")
                    .map(str::to_string);
                break (url.trim_end_matches('/').to_string(), pg);
            }
        };
        Server {
            child,
            base,
            pg,
            stderr: rx,
            early: std::sync::Mutex::new(early),
        }
    }

    /// The process id (for /proc readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Log lines printed so far, from the start (drains them).
    pub fn log_lines(&self) -> Vec<String> {
        let mut lines = std::mem::take(&mut *self.early.lock().expect("log lines"));
        lines.extend(self.stderr.try_iter());
        lines
    }

    /// GET a JSON endpoint.
    pub fn get(&self, path: &str) -> serde_json::Value {
        let body = ureq::get(&format!("{}{path}", self.base))
            .call()
            .expect("GET")
            .into_body()
            .read_to_string()
            .expect("body");
        serde_json::from_str(&body).expect("JSON")
    }

    /// POST `/api/v1/query`: (status, body).
    pub fn query(&self, sql: &str, accept: &str) -> (u16, Vec<u8>) {
        let resp = ureq::post(&format!("{}/api/v1/query", self.base))
            .header("Accept", accept)
            .config()
            .http_status_as_error(false)
            .build()
            .send_json(serde_json::json!({ "sql": sql }))
            .expect("POST");
        let status = resp.status().as_u16();
        (status, resp.into_body().read_to_vec().expect("body"))
    }

    /// The rows of a query as JSON objects (panics unless 200).
    pub fn rows(&self, sql: &str) -> Vec<serde_json::Value> {
        let (status, body) = self.query(sql, "application/json");
        assert_eq!(status, 200, "{sql}: {}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        v["rows"].as_array().expect("rows").clone()
    }

    /// Polls `/api/v1/health` until the pipeline is `finished`; panics if it
    /// fails or `timeout` passes.
    pub fn wait_finished(&self, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let h = self.get("/api/v1/health");
            match h["pipeline"].as_str().expect("pipeline state") {
                "finished" => return h,
                "running" => assert!(Instant::now() < deadline, "pipeline did not finish: {h}"),
                other => panic!("pipeline {other}: {h}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server with SIGINT and waits for it.
    pub fn stop(self) -> ExitStatus {
        self.stop_with("-INT").0
    }

    /// Waits (at most `timeout`) for a log line containing `text` and
    /// returns it; panics with the log so far otherwise. Lines read are
    /// kept for [`Server::log_lines`].
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut early = self.early.lock().expect("log lines");
        if let Some(l) = early.iter().find(|l| l.contains(text)) {
            return l.clone();
        }
        loop {
            match self
                .stderr
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => {
                    early.push(l.clone());
                    if l.contains(text) {
                        return l;
                    }
                }
                Err(_) => panic!("no log line with {text:?}:\n{}", early.join("\n")),
            }
        }
    }

    /// Sends `signal` (`-INT`, `-TERM`), waits for the exit and returns it
    /// with the log lines printed meanwhile (until the process closed its
    /// stderr). Panics (and kills the process) if it has not exited within
    /// 120 s: a stop signal must never be lost.
    pub fn stop_with(mut self, signal: &str) -> (ExitStatus, Vec<String>) {
        let _ = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status();
        let Some(status) = self
            .child
            .wait_timeout(Duration::from_secs(120))
            .expect("wait")
        else {
            panic!(
                "storepulse did not exit within 120 s of {signal}:\n{}",
                self.log_lines().join("\n")
            );
        };
        let mut lines = self.log_lines();
        while let Ok(l) = self.stderr.recv_timeout(Duration::from_secs(5)) {
            lines.push(l);
        }
        (status, lines)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `tansu` binary on PATH or in `~/.cargo/bin`, if installed.
pub fn tansu_bin() -> Option<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_default();
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from(home).join(".cargo/bin")])
        .map(|d| d.join("tansu"))
        .find(|p| p.is_file())
}

/// A `tansu` broker (memory storage) listening on a free loopback port,
/// killed on drop.
#[derive(Debug)]
pub struct Tansu {
    child: Child,
    /// `127.0.0.1:PORT`, the bootstrap address.
    pub addr: String,
}

impl Tansu {
    /// Starts `bin` and waits until it accepts connections.
    pub fn start(bin: &Path) -> Tansu {
        let addr = format!("127.0.0.1:{}", free_port());
        let url = format!("tcp://{addr}");
        let child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Tansu { child, addr }
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto's S3 server (`moto_server`, from PyPI `moto[server]`, installed by
/// `.ci/run`) on a loopback port, killed on drop.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl Moto {
    /// Starts moto on `port` and waits until it answers.
    pub fn start(port: u16) -> Moto {
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto (pip install 'moto[server]', see .ci/run)");
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto did not listen on {endpoint}: is `python3 -m moto.server` installed (.ci/run)?"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto { child, endpoint }
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, bucket: &str) {
        let status = ureq::put(&format!("{}/{bucket}", self.endpoint))
            .send_empty()
            .expect("create bucket")
            .status();
        assert!(status.is_success(), "create bucket {bucket}: {status}");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a Python script with `args`, returning its stdout; panics with its
/// stderr when it fails (DuckDB interoperability tests).
pub fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python failed (missing package? .ci/run installs scripts/requirements-test.txt):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
