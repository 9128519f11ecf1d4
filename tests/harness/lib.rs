//! Harness for the end-to-end tests: builds the Python-made tiny model folder once, starts the
//! real binaries (`target/<profile>/sd-*`) as child processes on `127.0.0.1:0`, learns their
//! ports from the `listening on ADDR` line each prints, and kills them when dropped.
//!
//! The binaries must be built first (`make test` runs `cargo build --workspace --bins`).

#![allow(clippy::unwrap_used)]

use sd_proto::v1::image_generation_service_client::ImageGenerationServiceClient;
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock, mpsc},
    time::{Duration, Instant},
};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The project's Python (the venv `make setup` creates).
pub fn python() -> PathBuf {
    let p = workspace_root().join(".venv/bin/python");
    assert!(p.exists(), "{} missing: run `make setup`", p.display());
    p
}

/// Path of a workspace binary next to this test binary (`target/<profile>/NAME`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} missing: build the binaries first (`cargo build --workspace --bins`, done by `make test`)",
        path.display()
    );
    path
}

/// A tiny Stable Diffusion folder (random weights, real diffusers layout, real CLIP
/// vocabulary) built by `tests/python/make_tiny_model.py`, cached under `target/`.
pub fn tiny_model(flavor: &str) -> PathBuf {
    static LOCK: OnceLock<Mutex<()>> = OnceLock::new();
    let _guard = LOCK
        .get_or_init(|| Mutex::new(()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let root = workspace_root();
    let dir = root.join(format!("target/e2e-fixtures/tiny-{flavor}"));
    if dir.join("model_index.json").exists() {
        return dir;
    }
    let tmp = root.join(format!(
        "target/e2e-fixtures/tiny-{flavor}.tmp-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let status = Command::new(python())
        .arg(root.join("tests/python/make_tiny_model.py"))
        .arg(&tmp)
        .args(["--flavor", flavor, "--vocab-cache"])
        .arg(root.join(".cache/clip-vocab"))
        .status()
        .unwrap();
    assert!(status.success(), "make_tiny_model.py failed");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).unwrap();
    dir
}

/// A running binary, killed on drop. Its stderr is kept for failure messages.
pub struct Service {
    pub name: String,
    pub addr: String,
    child: Child,
    stderr: Arc<Mutex<String>>,
    metrics: Arc<Mutex<Option<String>>>,
}

impl Service {
    /// Starts `binary` with `args` and waits for its `listening on` line.
    pub fn start(binary: &str, args: &[&str]) -> Service {
        Self::start_with_env(binary, args, &[])
    }

    /// [`Service::start`] with extra environment variables (`OTEL_*`, `SD_METRICS_LISTEN`).
    pub fn start_with_env(binary: &str, args: &[&str], env: &[(&str, &str)]) -> Service {
        let mut child = Command::new(bin(binary))
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let err_pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let (tx, rx) = mpsc::channel();
        let out_pipe = child.stdout.take().unwrap();
        let metrics = Arc::new(Mutex::new(None));
        let metrics_sink = metrics.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out_pipe).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("metrics on ") {
                    *metrics_sink.lock().unwrap() = Some(addr.to_string());
                }
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "{binary} did not report its address:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        Service {
            name: binary.into(),
            addr,
            child,
            stderr,
            metrics,
        }
    }

    /// The address of the Prometheus endpoint (the `metrics on ADDR` line), if it serves one.
    pub fn metrics_addr(&self) -> Option<String> {
        self.metrics.lock().unwrap().clone()
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until gRPC health reports SERVING, or panics with the process's stderr.
    pub async fn wait_serving(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited with {status}:\n{}", self.name, self.stderr());
            }
            if let Ok(channel) = Channel::from_shared(self.url()).unwrap().connect().await {
                let reply = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if reply.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} not SERVING after {timeout:?}:\n{}",
                self.name,
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Starts a stage binary on a free port serving `model` (plus `extra` flags) and waits until it
/// is SERVING.
pub async fn start_stage(binary: &str, model: &Path, extra: &[&str]) -> Service {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--model",
        model.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut s = Service::start(binary, &args);
    s.wait_serving(Duration::from_secs(120)).await;
    s
}

/// Starts an orchestrator on a free port over the given stage addresses (each may be a
/// comma-separated list), without waiting for it to serve: it may rightly refuse to.
pub fn start_orchestrator(te: &str, dn: &str, vae: &str, extra: &[&str]) -> Service {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--text-encoder",
        te,
        "--denoiser",
        dn,
        "--vae",
        vae,
    ];
    args.extend_from_slice(extra);
    Service::start("sd-orchestrator", &args)
}

/// Copies a folder tree (a model folder a test then breaks or retouches).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The value of the first sample in a `/metrics` body whose line starts with `prefix` (the
/// name, then `{` for a labelled sample or a space for a bare one) and contains `label`.
pub fn metric_sample(body: &str, prefix: &str, label: &str) -> f64 {
    let line = body
        .lines()
        .find(|l| l.starts_with(prefix) && l.contains(label))
        .unwrap_or_else(|| panic!("no {prefix}..{label} sample in /metrics:\n{body}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Fetches `http://ADDR/metrics` (Prometheus text) with a bare HTTP/1.1 GET; the whole
/// response, headers included, after checking it is a 200.
pub async fn scrape_metrics(addr: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} stderr ---\n{}", self.name, self.stderr());
        }
    }
}

/// The four services of one model, each its own process.
pub struct Cluster {
    pub text_encoder: Service,
    pub denoiser: Service,
    pub vae: Service,
    pub orchestrator: Service,
}

impl Cluster {
    /// Starts the three stages on `model` and an orchestrator over them; waits until all serve.
    pub async fn start(model: &Path) -> Cluster {
        Self::start_with_env(model, &[]).await
    }

    /// [`Cluster::start`] with extra environment variables for all four processes.
    pub async fn start_with_env(model: &Path, env: &[(&str, &str)]) -> Cluster {
        let model = model.to_str().unwrap();
        let stage = |binary: &str| {
            Service::start_with_env(
                binary,
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--model",
                    model,
                    "--device",
                    "cpu",
                ],
                env,
            )
        };
        let (mut te, mut dn, mut vae) = (
            stage("sd-text-encoder"),
            stage("sd-denoiser"),
            stage("sd-vae"),
        );
        let mut orch = Service::start_with_env(
            "sd-orchestrator",
            &[
                "--listen",
                "127.0.0.1:0",
                "--text-encoder",
                &te.url(),
                "--denoiser",
                &dn.url(),
                "--vae",
                &vae.url(),
                "--default-steps",
                "10",
            ],
            env,
        );
        for s in [&mut te, &mut dn, &mut vae, &mut orch] {
            s.wait_serving(Duration::from_secs(120)).await;
        }
        Cluster {
            text_encoder: te,
            denoiser: dn,
            vae,
            orchestrator: orch,
        }
    }

    /// A public API client of the orchestrator.
    pub async fn client(&self) -> ImageGenerationServiceClient<Channel> {
        client(&self.orchestrator.url()).await
    }
}

/// A public API client for `url`.
pub async fn client(url: &str) -> ImageGenerationServiceClient<Channel> {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    ImageGenerationServiceClient::new(channel)
        .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
}

/// Decodes a PNG and returns (width, height).
pub fn png_size(bytes: &[u8]) -> (u32, u32) {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png).unwrap();
    (img.width(), img.height())
}
