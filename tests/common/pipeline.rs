//! The user's side of the pipeline as real processes: the minimal OpenTelemetry Collector built from
//! `otel/builder-config.yaml` running a shipped profile unchanged (ports, certificates and the
//! remote-write credentials through its `${env:…}` variables): `otel/collector-dev.yaml` (plaintext,
//! [`Collector::start`]) or the production `otel/collector.yaml` (TLS, client certificates, remote
//! write over TLS with basic auth, [`Collector::start_production`]); Prometheus 2.42 from Debian with
//! its remote-write receiver (optionally behind TLS and basic auth, [`Prometheus::start_secured`]),
//! or Prometheus 3 (built from the Go module proxy) with its own OTLP receiver; and PromQL instant
//! queries at "now" through Prometheus's HTTP API (through `curl` when it is behind TLS).
//!
//! Binaries: `$VHA_OTELCOL_BIN` / `$VHA_PROMETHEUS3_BIN` when set (scripts/test.sh sets them), else the
//! cached builds of `scripts/build-collector.sh` / `scripts/build-prometheus.sh` (built on first use).
//! Every process is stopped by its PID when its handle drops; its log is printed if the test fails.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::session::free_port;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A binary from `var`, else the path a build script prints (the script caches its build).
fn binary(var: &str, script: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let out = Command::new("bash")
        .arg(format!("{ROOT}/scripts/{script}"))
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run scripts/{script}"))?;
    if !out.status.success() {
        bail!("scripts/{script} failed ({})", out.status);
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(path))
}

pub fn collector_binary() -> Result<PathBuf> {
    binary("VHA_OTELCOL_BIN", "build-collector.sh")
}

pub fn prometheus3_binary() -> Result<PathBuf> {
    binary("VHA_PROMETHEUS3_BIN", "build-prometheus.sh")
}

/// A child process with its log in a file; SIGTERM (then SIGKILL) on drop.
#[derive(Debug)]
struct Proc {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Proc {
            name,
            child: Some(child),
            log,
        })
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.seek(SeekFrom::Start(0));
            let _ = f.read_to_string(&mut text);
        }
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn check_running(&mut self) -> Result<()> {
        if let Some(c) = &mut self.child {
            if let Some(st) = c.try_wait()? {
                bail!("{} exited ({st}):\n{}", self.name, self.log_tail(40));
            }
        }
        Ok(())
    }

    /// SIGTERM by PID, wait up to 10 s, then SIGKILL.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- {} log (last 40 lines) ----\n{}",
                self.name,
                self.log_tail(40)
            );
        }
        self.stop();
    }
}

/// Wait until `url` answers 200 (bounded).
fn wait_ready(url: &str, proc: &mut Proc, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        proc.check_running()?;
        if let Ok(resp) = ureq::get(url).call() {
            if resp.status() == 200 {
                return Ok(start.elapsed());
            }
        }
        if start.elapsed() > timeout {
            bail!(
                "{} not ready at {url} within {timeout:?}:\n{}",
                proc.name,
                proc.log_tail(40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A test PKI made with the `openssl` CLI: a CA, a server certificate for 127.0.0.1/localhost and a
/// client certificate, all signed by the CA (files `ca.pem`, `server.pem`/`server.key`,
/// `client.pem`/`client.key` in a temporary directory).
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Result<Pki> {
        Self::with_server_ips(&[])
    }

    /// Like [`Pki::new`], the server certificate also valid for `ips` (a collector that pods
    /// reach at the host's bridge address).
    pub fn with_server_ips(ips: &[&str]) -> Result<Pki> {
        let dir = tempfile::tempdir()?;
        let extra: String = ips.iter().map(|ip| format!(",IP:{ip}")).collect();
        let out = Command::new("bash")
            .arg("-ec")
            .arg(
                r#"
                ec() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "$@"; }
                ec -x509 -keyout ca.key -out ca.pem -days 2 -subj /CN=vha-test-ca
                ec -keyout server.key -out server.csr -subj /CN=localhost
                printf 'subjectAltName=DNS:localhost,IP:127.0.0.1%s\nextendedKeyUsage=serverAuth\n' "$VHA_EXTRA_SANS" > server.ext
                openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile server.ext
                ec -keyout client.key -out client.csr -subj /CN=vha-agent
                printf 'extendedKeyUsage=clientAuth\n' > client.ext
                openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 -extfile client.ext
                "#,
            )
            .env("VHA_EXTRA_SANS", extra)
            .current_dir(dir.path())
            .output()
            .context("run openssl")?;
        if !out.status.success() {
            bail!("openssl failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Pki { dir })
    }

    /// The directory holding the files (a test may keep its own files there too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ca.pem`, `server.pem`, `server.key`, `client.pem` or `client.key`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The agent's TLS settings for exporting with this PKI's CA and client certificate.
    pub fn agent_env(&self) -> Vec<(String, String)> {
        [
            ("VIRT_HYPERVISOR_AGENT_EXPORT__TLS__CA_FILE", "ca.pem"),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__TLS__CERT_FILE", "client.pem"),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__TLS__KEY_FILE", "client.key"),
        ]
        .into_iter()
        .map(|(k, f)| (k.to_string(), self.path(f).display().to_string()))
        .collect()
    }
}

/// The collector running a shipped profile, remote-writing to `remote_write`.
#[derive(Debug)]
pub struct Collector {
    proc: Proc,
    config: PathBuf,
    env: Vec<(String, String)>,
    tls: bool,
    grpc: u16,
    http: u16,
    health: u16,
    telemetry: u16,
    remote_write: String,
    /// Address the OTLP receivers listen on.
    bind: String,
    _dir: tempfile::TempDir,
}

impl Collector {
    /// The development profile, `otel/collector-dev.yaml`: plaintext in and out.
    pub fn start(remote_write: &str) -> Result<Collector> {
        Self::start_with(
            Path::new(&format!("{ROOT}/otel/collector-dev.yaml")),
            remote_write,
            Vec::new(),
            false,
        )
    }

    /// The production profile, `otel/collector.yaml`: the receivers use `pki`'s server certificate
    /// and require client certificates signed by its CA; remote write to the `https://` URL
    /// `remote_write` trusts `prometheus_ca` and sends `Authorization: authorization`.
    pub fn start_production(
        pki: &Pki,
        remote_write: &str,
        prometheus_ca: &Path,
        authorization: &str,
    ) -> Result<Collector> {
        Self::start_config(
            Path::new(&format!("{ROOT}/otel/collector.yaml")),
            pki,
            remote_write,
            prometheus_ca,
            authorization,
        )
    }

    /// Like [`Collector::start_production`] with another config file that takes the same variables
    /// (a test's variant of the production profile).
    pub fn start_config(
        config: &Path,
        pki: &Pki,
        remote_write: &str,
        prometheus_ca: &Path,
        authorization: &str,
    ) -> Result<Collector> {
        let env = [
            ("OTELCOL_TLS_CERT_FILE", pki.path("server.pem")),
            ("OTELCOL_TLS_KEY_FILE", pki.path("server.key")),
            ("OTELCOL_TLS_CLIENT_CA_FILE", pki.path("ca.pem")),
            (
                "PROMETHEUS_REMOTE_WRITE_CA_FILE",
                prometheus_ca.to_path_buf(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.display().to_string()))
        .chain([(
            "PROMETHEUS_REMOTE_WRITE_AUTHORIZATION".to_string(),
            authorization.to_string(),
        )])
        .collect();
        Self::start_with(config, remote_write, env, true)
    }

    fn start_with(
        config: &Path,
        remote_write: &str,
        env: Vec<(String, String)>,
        tls: bool,
    ) -> Result<Collector> {
        let dir = tempfile::tempdir()?;
        let mut c = Collector {
            proc: Proc {
                name: "otelcol-vha",
                child: None,
                log: dir.path().join("collector.log"),
            },
            config: config.to_path_buf(),
            env,
            tls,
            grpc: free_port()?,
            http: free_port()?,
            health: free_port()?,
            telemetry: free_port()?,
            remote_write: remote_write.to_string(),
            bind: "127.0.0.1".into(),
            _dir: dir,
        };
        c.restart()?;
        Ok(c)
    }

    /// (Re)start on the same ports.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.stop();
        let mut cmd = Command::new(collector_binary()?);
        cmd.arg(format!("--config={}", self.config.display()))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(
                "OTELCOL_OTLP_GRPC_ENDPOINT",
                format!("{}:{}", self.bind, self.grpc),
            )
            .env(
                "OTELCOL_OTLP_HTTP_ENDPOINT",
                format!("{}:{}", self.bind, self.http),
            )
            .env(
                "OTELCOL_HEALTH_ENDPOINT",
                format!("127.0.0.1:{}", self.health),
            )
            .env("OTELCOL_TELEMETRY_PORT", self.telemetry.to_string())
            .env("PROMETHEUS_REMOTE_WRITE_URL", &self.remote_write);
        let log = self.proc.log.clone();
        self.proc = Proc::spawn("otelcol-vha", cmd, log)?;
        let url = format!("http://127.0.0.1:{}/", self.health);
        wait_ready(&url, &mut self.proc, Duration::from_secs(30))?;
        Ok(())
    }

    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// Restart with the OTLP receivers listening on `bind` (e.g. `0.0.0.0`, so that pods reach
    /// them through the host's bridge address), same ports.
    pub fn listen_on(&mut self, bind: &str) -> Result<()> {
        self.bind = bind.to_string();
        self.restart()
    }

    /// The gRPC port of the OTLP receiver.
    pub fn grpc_port(&self) -> u16 {
        self.grpc
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    pub fn grpc_endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.grpc)
    }

    pub fn http_endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}/v1/metrics", self.scheme(), self.http)
    }

    /// The collector's own metrics (Prometheus text format, `otelcol_*`).
    pub fn telemetry_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.telemetry)
    }

    pub fn check_running(&mut self) -> Result<()> {
        self.proc.check_running()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }
}

/// Which Prometheus, receiving how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Debian's 2.42 with `--web.enable-remote-write-receiver` (behind the collector).
    RemoteWrite,
    /// Prometheus 3 with `--web.enable-otlp-receiver` (the agent sends to it directly).
    Otlp,
}

/// One sample of an instant query's vector result.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// Prometheus's web endpoints behind TLS (a server certificate of a [`Pki`]) and basic auth.
#[derive(Clone, Debug)]
pub struct WebSecurity {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub user: String,
    pub password: String,
}

impl WebSecurity {
    /// `pki`'s server certificate, one user with a fresh random password.
    pub fn new(pki: &Pki, user: &str) -> Result<WebSecurity> {
        let mut bytes = [0u8; 12];
        File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(WebSecurity {
            ca: pki.path("ca.pem"),
            cert: pki.path("server.pem"),
            key: pki.path("server.key"),
            user: user.into(),
            password,
        })
    }

    /// The value of an `Authorization` header with these credentials.
    pub fn authorization(&self) -> String {
        format!(
            "Basic {}",
            base64(format!("{}:{}", self.user, self.password).as_bytes())
        )
    }

    /// Prometheus's `--web.config.file`: the bcrypt hash of the password (glibc's crypt through
    /// Python 3.11, which Debian 12 has; `htpasswd -nbB` makes the same kind of hash).
    fn web_config(&self) -> Result<String> {
        let out = Command::new("python3")
            .args([
                "-W",
                "ignore",
                "-c",
                "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 6)))",
                &self.password,
            ])
            .output()
            .context("python3 crypt")?;
        let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || !hash.starts_with("$2") {
            bail!(
                "no bcrypt hash from python3 crypt: {hash:?} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  {}: '{hash}'\n",
            self.cert.display(),
            self.key.display(),
            self.user
        ))
    }
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A GET through `curl` (for Prometheus behind TLS and basic auth; ureq here is plain HTTP only):
/// the status code and the body.
fn curl_get(url: &str, query: &[(&str, &str)], web: &WebSecurity) -> Result<(u16, String)> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "--get", "--cacert"])
        .arg(&web.ca)
        .arg("-u")
        .arg(format!("{}:{}", web.user, web.password))
        .args(["-w", "\n%{http_code}"]);
    for (k, v) in query {
        cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
    }
    let out = cmd.arg(url).output().context("run curl")?;
    if !out.status.success() {
        bail!(
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text
        .rsplit_once('\n')
        .ok_or_else(|| anyhow!("curl {url}: no status in {text:?}"))?;
    Ok((code.trim().parse()?, body.to_string()))
}

/// A Prometheus server with its own storage and port; extra scrape configs may be given.
#[derive(Debug)]
pub struct Prometheus {
    proc: Proc,
    flavor: Flavor,
    port: u16,
    web: Option<WebSecurity>,
    dir: tempfile::TempDir,
}

impl Prometheus {
    pub fn start(flavor: Flavor) -> Result<Prometheus> {
        Self::start_with_scrapes(flavor, "")
    }

    /// Like [`Prometheus::start`], every endpoint (queries and remote write) behind `web`'s TLS
    /// certificate and basic auth.
    pub fn start_secured(flavor: Flavor, web: WebSecurity) -> Result<Prometheus> {
        Self::start_full(flavor, "", Some(web))
    }

    /// `scrapes`: YAML items appended under `scrape_configs:` (indented two spaces).
    pub fn start_with_scrapes(flavor: Flavor, scrapes: &str) -> Result<Prometheus> {
        Self::start_full(flavor, scrapes, None)
    }

    fn start_full(flavor: Flavor, scrapes: &str, web: Option<WebSecurity>) -> Result<Prometheus> {
        let dir = tempfile::tempdir()?;
        let cfg = format!(
            "global:\n  scrape_interval: 15s\n  evaluation_interval: 15s\nscrape_configs:\n{}",
            if scrapes.is_empty() {
                "  []\n"
            } else {
                scrapes
            }
        );
        let cfg = cfg.replace("scrape_configs:\n  []\n", "scrape_configs: []\n");
        std::fs::write(dir.path().join("prometheus.yml"), cfg)?;
        if let Some(web) = &web {
            std::fs::write(dir.path().join("web.yml"), web.web_config()?)?;
        }
        let mut p = Prometheus {
            proc: Proc {
                name: "prometheus",
                child: None,
                log: dir.path().join("prometheus.log"),
            },
            flavor,
            port: free_port()?,
            web,
            dir,
        };
        p.restart()?;
        Ok(p)
    }

    /// (Re)start on the same port and storage (the TSDB and its WAL survive).
    pub fn restart(&mut self) -> Result<()> {
        self.proc.stop();
        let (bin, receiver) = match self.flavor {
            Flavor::RemoteWrite => (
                PathBuf::from("/usr/bin/prometheus"),
                "--web.enable-remote-write-receiver",
            ),
            Flavor::Otlp => (prometheus3_binary()?, "--web.enable-otlp-receiver"),
        };
        let d = self.dir.path();
        let mut cmd = Command::new(bin);
        cmd.arg(format!(
            "--config.file={}",
            d.join("prometheus.yml").display()
        ))
        .arg(format!("--storage.tsdb.path={}", d.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
        .arg("--storage.tsdb.retention.time=2h")
        .arg(receiver);
        if self.web.is_some() {
            cmd.arg(format!("--web.config.file={}", d.join("web.yml").display()));
        }
        let log = self.proc.log.clone();
        self.proc = Proc::spawn("prometheus", cmd, log)?;
        let url = format!("{}/-/ready", self.url());
        match self.web.clone() {
            None => {
                wait_ready(&url, &mut self.proc, Duration::from_secs(60))?;
            }
            Some(web) => {
                let start = Instant::now();
                loop {
                    self.proc.check_running()?;
                    if matches!(curl_get(&url, &[], &web), Ok((200, _))) {
                        break;
                    }
                    if start.elapsed() > Duration::from_secs(60) {
                        bail!("prometheus not ready at {url}:\n{}", self.proc.log_tail(40));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        self.proc.stop();
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    pub fn url(&self) -> String {
        let scheme = if self.web.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn remote_write_url(&self) -> String {
        format!("{}/api/v1/write", self.url())
    }

    /// The OTLP/HTTP metrics endpoint of Prometheus 3.
    pub fn otlp_endpoint(&self) -> String {
        format!("{}/api/v1/otlp/v1/metrics", self.url())
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn check_running(&mut self) -> Result<()> {
        self.proc.check_running()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }

    /// An instant query at "now"; the vector result's samples.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let url = format!("{}/api/v1/query", self.url());
        let body: serde_json::Value = match &self.web {
            None => ureq::get(&url)
                .query("query", promql)
                .call()
                .with_context(|| format!("query {promql:?}"))?
                .body_mut()
                .read_json()?,
            Some(web) => {
                let (code, text) = curl_get(&url, &[("query", promql)], web)?;
                serde_json::from_str(&text)
                    .with_context(|| format!("query {promql:?}: HTTP {code}: {text}"))?
            }
        };
        if body["status"] != "success" {
            bail!("query {promql:?}: {body}");
        }
        let result = &body["data"]["result"];
        if body["data"]["resultType"] == "scalar" {
            let v = result[1]
                .as_str()
                .ok_or_else(|| anyhow!("bad scalar {result}"))?;
            return Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: v.parse()?,
            }]);
        }
        let mut out = Vec::new();
        for s in result
            .as_array()
            .ok_or_else(|| anyhow!("not a vector: {body}"))?
        {
            let labels = s["metric"]
                .as_object()
                .ok_or_else(|| anyhow!("bad sample {s}"))?
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let v = s["value"][1]
                .as_str()
                .ok_or_else(|| anyhow!("bad sample {s}"))?;
            out.push(Sample {
                labels,
                value: v.parse()?,
            });
        }
        Ok(out)
    }

    /// Poll `promql` (every 50 ms) until `cond` holds on its result; how long that took after
    /// `since`, or an error with the last result.
    pub fn wait_for<F>(
        &self,
        promql: &str,
        since: Instant,
        timeout: Duration,
        mut cond: F,
    ) -> Result<Duration>
    where
        F: FnMut(&[Sample]) -> bool,
    {
        let mut last = Vec::new();
        loop {
            match self.query(promql) {
                Ok(r) => {
                    if cond(&r) {
                        return Ok(since.elapsed());
                    }
                    last = r;
                }
                Err(e) => eprintln!("query failed (retrying): {e:#}"),
            }
            if since.elapsed() > timeout {
                bail!(
                    "{promql:?}: condition not met within {timeout:?}; last result: {}",
                    describe(&last)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One line per sample, for failure messages.
pub fn describe(samples: &[Sample]) -> String {
    if samples.is_empty() {
        return "(empty)".into();
    }
    samples
        .iter()
        .map(|s| {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            format!("{{{}}} {}", labels.join(", "), s.value)
        })
        .collect::<Vec<_>>()
        .join("\n")
}
