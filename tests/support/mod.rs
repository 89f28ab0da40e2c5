//! Shared set-up of the end-to-end tests: the real `batchd` binary on an
//! ephemeral loopback port with a temporary data directory, a bearer token
//! minter, and loopback receivers.

#![allow(dead_code, reason = "each test binary uses a different part")]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const SECRET: &str = "end-to-end-test-secret-0123456789abcdef";

/// A `batchd serve` process, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub config: PathBuf,
}

impl Server {
    /// Starts `batchd serve` with `config` (TOML) in a new data directory.
    pub fn start(config: &str) -> Server {
        let data_dir = tempfile::tempdir().unwrap().keep();
        Self::start_in(&data_dir, config)
    }

    /// Starts `batchd serve` on an existing data directory. Rate limits
    /// are off unless `config` has a `[rate_limits]` section, so tests of
    /// other features can send requests as fast as they like.
    pub fn start_in(data_dir: &Path, config: &str) -> Server {
        Self::start_with_env(data_dir, config, &[])
    }

    /// Starts `batchd serve` with extra environment variables.
    pub fn start_with_env(data_dir: &Path, config: &str, env: &[(&str, &str)]) -> Server {
        let config_path = data_dir.join(format!("batchd-{}.toml", free_port()));
        let mut config = config.to_owned();
        if !config.contains("[rate_limits]") {
            config.push_str("\n[rate_limits]\ndisabled = true\n");
        }
        std::fs::write(&config_path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_batchd"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg("--config")
            .arg(&config_path)
            .arg("--data-dir")
            .arg(data_dir)
            .env("BATCHD_JWT_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();

        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("batchd listening on http://") {
                    let _ = sender.send(addr.trim().to_owned());
                }
            }
        });
        let addr = receiver
            .recv_timeout(Duration::from_secs(60))
            .expect("batchd printed its address within 60 s")
            .parse()
            .unwrap();
        Server {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
            config: config_path,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill(mut self) -> PathBuf {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.data_dir.clone()
    }

    /// Peak resident memory of the server so far, in KiB (Linux).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mints an HS256 token as `batchd token` would.
pub fn token(user: &str, admin: bool) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_batchd"))
        .args(["token", "--user", user, "--ttl", "3600"])
        .args(admin.then_some("--admin"))
        .env("BATCHD_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "batchd token failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Sends a request and returns the status and the JSON body (or Null).
pub async fn call(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, body)
}

/// Polls a batch until it is terminal; fails after `limit`.
pub async fn wait_terminal(server: &Server, token: &str, id: &str, limit: Duration) -> Value {
    let client = client();
    let started = Instant::now();
    loop {
        let (status, batch) = call(
            client
                .get(server.url(&format!("/api/batches/{id}")))
                .bearer_auth(token),
        )
        .await;
        if status == 429 {
            // Polling this fast can exceed a rate limit under test.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        assert_eq!(status, 200, "{batch}");
        if matches!(
            batch["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            return batch;
        }
        assert!(
            started.elapsed() < limit,
            "batch {id} not finished after {limit:?}: {batch}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads every item of a batch through the API.
pub async fn all_items(server: &Server, token: &str, id: &str) -> Vec<Value> {
    let client = client();
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = server.url(&format!("/api/batches/{id}/items?limit=500"));
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let (status, page) = call(client.get(url).bearer_auth(token)).await;
        assert_eq!(status, 200, "{page}");
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return items,
        }
    }
}

/// An existing HTTP server program on loopback that answers every POST
/// to `path` with 200, standing in for a webhook receiver: nginx when it
/// is installed, otherwise Python's standard `http.server` running a
/// one-line CGI script (Python ships with every machine this project
/// targets).
pub struct HttpReceiver {
    child: Child,
    pub port: u16,
    pub path: &'static str,
    pub program: &'static str,
}

impl HttpReceiver {
    pub fn start() -> HttpReceiver {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|path| Path::new(path).exists());
        let prefix = tempfile::tempdir().unwrap().keep();
        let port = free_port();

        let (child, path, program) = match nginx {
            Some(binary) => (start_nginx(binary, &prefix, port), "/hook", "nginx"),
            None => (
                start_python_cgi(&prefix, port),
                "/cgi-bin/hook",
                "python3 http.server",
            ),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{program} did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        HttpReceiver {
            child,
            port,
            path,
            program,
        }
    }
}

fn start_nginx(binary: &str, prefix: &Path, port: u16) -> Child {
    let config = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {prefix}/nginx.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {prefix}/body;\n  client_max_body_size 1m;\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{ return 200 \"ok\"; }}\n  }}\n}}\n",
        prefix = prefix.display()
    );
    let config_path = prefix.join("nginx.conf");
    std::fs::write(&config_path, config).unwrap();
    let mut command = Command::new(binary);
    command.arg("-p").arg(prefix).arg("-c").arg(&config_path);
    // As root, nginx would switch to a user that cannot read the temporary
    // prefix. One process without a master, so killing it leaves nothing
    // behind.
    if is_root() {
        command.arg("-g").arg("user root;");
    }
    command
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn start_python_cgi(root: &Path, port: u16) -> Child {
    use std::os::unix::fs::PermissionsExt;
    let cgi = root.join("cgi-bin");
    std::fs::create_dir_all(&cgi).unwrap();
    let script = cgi.join("hook");
    std::fs::write(
        &script,
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\nok'\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    Command::new("python3")
        .args(["-m", "http.server", "--cgi", "--bind", "127.0.0.1"])
        .arg(port.to_string())
        .current_dir(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 is needed for the webhook receiver when nginx is not installed")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|status| {
            status
                .lines()
                .any(|line| line.starts_with("Uid:") && line.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Returns a port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A scriptable webhook receiver on loopback, standing in for a user's
/// endpoint: `/flaky` answers 503 twice per item and then 200, `/bad`
/// answers 400, `/ok` answers 200. It counts requests per path.
pub struct Receiver {
    pub addr: SocketAddr,
    pub hits: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
    handle: actix_web::dev::ServerHandle,
}

impl Receiver {
    pub async fn start() -> Receiver {
        use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
        type Hits = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>;

        async fn answer(request: HttpRequest, hits: web::Data<Hits>) -> HttpResponse {
            let header = |name: &str| {
                request
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let key = header("idempotency-key");
            let path = request.path().to_owned();
            let seen = {
                let mut hits = hits.lock().unwrap();
                *hits.entry(path.clone()).or_default() += 1;
                // The last trace headers seen, for tests of propagation.
                hits.insert(format!("traceparent={}", header("traceparent")), 0);
                hits.insert(format!("correlation={}", header("x-correlation-id")), 0);
                let per_item = hits.entry(format!("{path}#{key}")).or_default();
                *per_item += 1;
                *per_item
            };
            match path.as_str() {
                "/flaky" if seen <= 2 => HttpResponse::ServiceUnavailable().body("try again"),
                "/bad" => HttpResponse::BadRequest().body("invalid record: field x is required"),
                _ => HttpResponse::Ok().body("ok"),
            }
        }

        let hits: Hits = Default::default();
        let data = web::Data::new(hits.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(answer))
        })
        .workers(1)
        .disable_signals()
        .bind(("127.0.0.1", 0))
        .unwrap();
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Receiver { addr, hits, handle }
    }

    pub fn count(&self, path: &str) -> u32 {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}
