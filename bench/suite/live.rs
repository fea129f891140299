//! Benchmarks against the real system libvirtd and QEMU: idle cost, change visibility, initial
//! sync and per-transition CPU of the agent (release binary, exporting over OTLP/gRPC to an
//! in-process receiver), side by side with the peer `prometheus-libvirt-exporter` (scraped by a
//! curl loop) and two floors: for the initial sync, `virsh` dumping every domain's XML over one
//! connection; for the idle cost, `virsh event --all --loop` (one connection with lifecycle
//! callbacks, the least any event-driven client can do).
//!
//! Every domain created here is named `vha-b-<pid>_dNNN` (a KubeVirt-style `<namespace>_<name>`
//! with KubeVirt metadata), started `--paused`, and destroyed + undefined at the end (also after
//! an error). Leftovers of a crashed earlier run (their pid is gone) are removed at the start.
//! Only processes started here are stopped, by pid.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::common::session;
use crate::sink::Sink;
use crate::util::{self, median, percentile, Cpu, CpuDelta};

pub const PREFIX: &str = "vha-b-";

/// Options of the `live` mode.
#[derive(Clone, Debug)]
pub struct LiveOpts {
    /// `private` (a libvirt session daemon of our own, `tests/common/session.rs`) or a libvirt URI of a
    /// running daemon such as `qemu:///system`.
    pub uri: String,
    pub agent_bin: PathBuf,
    pub peer_bin: String,
    pub out: PathBuf,
    /// Domain counts for the idle measurement (ascending); the largest is used for the rest.
    pub sizes: Vec<usize>,
    pub idle_secs: f64,
    pub transitions: usize,
    pub peer_transitions: usize,
    pub scrape_secs: f64,
    pub sync_runs: usize,
    /// Phases to run (empty: all): `idle`, `sync`, `visibility` (agent visibility and
    /// per-transition CPU), `peer` (peer visibility).
    pub phases: Vec<String>,
    /// Record `perf record -g` of the agent during its transitions into this directory.
    pub perf: Option<PathBuf>,
    /// Extra `--set KEY=VALUE` for every agent run (experiments; the recorded runs use none).
    pub agent_sets: Vec<String>,
}

impl LiveOpts {
    fn wants(&self, phase: &str) -> bool {
        self.phases.is_empty() || self.phases.iter().any(|p| p == phase)
    }
}

// ---------------------------------------------------------------- results

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdleRow {
    pub domains: usize,
    /// Domains of other users on the same daemon during the measurement.
    pub foreign_domains: usize,
    pub window_secs: f64,
    pub libvirtd_alone: CpuDelta,
    pub agent: CpuDelta,
    pub libvirtd_with_agent: CpuDelta,
    pub agent_exports: usize,
    pub agent_export_bytes: usize,
    pub agent_mem: util::Mem,
    pub agent_sync_secs: f64,
    /// The agent's CPU by thread name over the window.
    pub agent_threads: Vec<util::ThreadShare>,
    pub peer: CpuDelta,
    pub libvirtd_with_peer: CpuDelta,
    pub peer_scrapes: usize,
    pub peer_mem: util::Mem,
    /// Lifecycle events of domains that are not ours during the four windows.
    pub foreign_events: usize,
    /// The floor of any event-driven client: `virsh event --all --loop`, one connection with
    /// lifecycle callbacks and nothing else.
    #[serde(default)]
    pub floor: CpuDelta,
    #[serde(default)]
    pub libvirtd_with_floor: CpuDelta,
    /// The agent's start-up tail, between its first complete export and the idle window
    /// ([`SETTLE`]): mostly the exits of the blocking threads the initial sync used.
    #[serde(default)]
    pub agent_settle: CpuDelta,
    /// The agent's thread count at the first complete export and at the start of the window.
    #[serde(default)]
    pub agent_threads_settle: (usize, usize),
}

/// How long after its first complete export the agent's idle window starts. Tokio keeps an idle
/// blocking thread for 10 s after its last call, so the threads of the initial sync exit then;
/// that is start-up cost (reported as [`IdleRow::agent_settle`]), not the cost of idling. A
/// window opened earlier catches those exits and charges a one-off to every second of idle.
pub const SETTLE: Duration = Duration::from_secs(13);

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SyncRun {
    pub wall_secs: f64,
    pub process_cpu_secs: f64,
    pub libvirtd_cpu_secs: f64,
    /// Agent only: from its log (seconds after spawn): connected, resync done, "initial sync
    /// done", and the resync's own elapsed_ms.
    pub connected_at: Option<f64>,
    pub resync_done_at: Option<f64>,
    pub resync_elapsed_ms: Option<f64>,
    pub initial_sync_logged_at: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SyncResult {
    pub domains: usize,
    pub floor: Vec<SyncRun>,
    pub agent: Vec<SyncRun>,
    /// The agent with `export.debounce=1ms` (diagnostic: how much of the time is the debounce).
    pub agent_no_debounce: Vec<SyncRun>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Visibility {
    /// Seconds from the virsh command returning to the change visible, per transition.
    pub latencies: Vec<f64>,
    pub starts: usize,
    pub stops: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub min: f64,
    pub missed: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TransitionCost {
    pub transitions: usize,
    pub elapsed_secs: f64,
    pub agent_cpu: CpuDelta,
    /// Agent CPU per transition, ms (raw: everything the agent did during the run).
    pub per_transition_ms: f64,
    /// Same minus the idle rate measured at the same N over the same elapsed time.
    pub per_transition_net_ms: f64,
    pub libvirtd_cpu: CpuDelta,
    pub exports: usize,
    /// The agent's CPU by thread name over the run (totals, not per transition).
    pub threads: Vec<util::ThreadShare>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LiveResult {
    pub idle: Vec<IdleRow>,
    pub agent_mem_zero: util::Mem,
    pub sync: SyncResult,
    pub agent_visibility: Visibility,
    pub agent_transition_cost: TransitionCost,
    pub peer_visibility: Visibility,
    pub peer_scrape_interval_secs: f64,
    pub peer_cpu_per_scrape_ms: f64,
    pub libvirtd_cpu_per_scrape_ms: f64,
    pub debounce_ms: f64,
    /// Which libvirt daemon was measured.
    pub daemon: String,
    pub notes: Vec<String>,
}

// ---------------------------------------------------------------- virsh and domains

fn virsh(uri: &str, script: &str) -> Result<String> {
    let out = Command::new("timeout")
        .args(["300", "virsh", "-q", "-c", uri, script])
        .output()
        .context("run virsh")?;
    if !out.status.success() {
        let mut s = script.to_string();
        s.truncate(200);
        bail!(
            "virsh {s:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn domain_xml(name: &str, uid: &str) -> String {
    format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <metadata>\n    <kubevirt xmlns=\"http://kubevirt.io\">\n      \
         <uid>{uid}</uid>\n    </kubevirt>\n  </metadata>\n  <memory unit='MiB'>32</memory>\n  <vcpu>1</vcpu>\n  \
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\n  <on_poweroff>destroy</on_poweroff>\n  \
         <on_reboot>destroy</on_reboot>\n  <on_crash>destroy</on_crash>\n  <devices>\n    <serial type='pty'/>\n    \
         <console type='pty'/>\n    <memballoon model='none'/>\n  </devices>\n</domain>\n"
    )
}

/// The domains of this run.
struct Domains {
    uri: String,
    ns: String,
    defined: Vec<String>,
    running: BTreeSet<String>,
}

impl Domains {
    fn new(uri: &str) -> Domains {
        Domains {
            uri: uri.to_string(),
            ns: format!("{PREFIX}{}", std::process::id()),
            defined: Vec::new(),
            running: BTreeSet::new(),
        }
    }

    fn name(&self, tag: &str) -> String {
        format!("{}_{tag}", self.ns)
    }

    /// Every domain name of this run starts with this.
    fn prefix(&self) -> String {
        format!("{}_", self.ns)
    }

    /// The identity the agent exports for a domain name (`namespace/name`).
    fn key(&self, name: &str) -> String {
        match name.split_once('_') {
            Some((ns, n)) => format!("{ns}/{n}"),
            None => name.to_string(),
        }
    }

    fn define(&mut self, tags: &[String], dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut script = Vec::new();
        for (i, tag) in tags.iter().enumerate() {
            let name = self.name(tag);
            let path = dir.join(format!("{name}.xml"));
            let uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), i);
            std::fs::write(&path, domain_xml(&name, &uid))?;
            script.push(format!("define {}", path.display()));
            self.defined.push(name);
        }
        for chunk in script.chunks(50) {
            virsh(&self.uri, &chunk.join(" ; "))?;
        }
        Ok(())
    }

    fn start_paused(&mut self, names: &[String]) -> Result<()> {
        for chunk in names.chunks(20) {
            let script: Vec<String> = chunk
                .iter()
                .map(|n| format!("start --paused {n}"))
                .collect();
            virsh(&self.uri, &script.join(" ; "))?;
            self.running.extend(chunk.iter().cloned());
        }
        Ok(())
    }

    fn keys_running(&self) -> BTreeSet<String> {
        self.running.iter().map(|n| self.key(n)).collect()
    }

    /// Destroy and undefine everything of this run. Never fails.
    fn cleanup(&mut self) {
        let all = list_names(&self.uri);
        let active = list_active_names(&self.uri);
        let prefix = self.prefix();
        let mine: Vec<&String> = all.iter().filter(|n| n.starts_with(&prefix)).collect();
        for chunk in mine.chunks(20) {
            let mut script = Vec::new();
            for n in chunk {
                if active.contains(*n) {
                    script.push(format!("destroy {n}"));
                }
                script.push(format!("undefine {n}"));
            }
            if let Err(e) = virsh(&self.uri, &script.join(" ; ")) {
                eprintln!("live: cleanup: {e:#}");
            }
        }
        self.running.clear();
        self.defined.clear();
    }
}

fn list_names(uri: &str) -> Vec<String> {
    virsh(uri, "list --all --name")
        .map(|s| {
            s.lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

fn list_active_names(uri: &str) -> BTreeSet<String> {
    virsh(uri, "list --name")
        .map(|s| {
            s.lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// Remove `vha-b-<pid>_*` domains whose run (pid) is gone.
fn remove_leftovers(uri: &str) {
    let active = list_active_names(uri);
    for name in list_names(uri) {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: Option<u32> = rest.split('_').next().and_then(|p| p.parse().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if alive {
            continue;
        }
        eprintln!("live: removing leftover domain {name}");
        let mut script = String::new();
        if active.contains(&name) {
            script.push_str(&format!("destroy {name} ; "));
        }
        script.push_str(&format!("undefine {name}"));
        let _ = virsh(uri, &script);
    }
}

fn libvirtd_pid() -> Result<u32> {
    if let Ok(s) = std::fs::read_to_string("/run/libvirtd.pid") {
        if let Ok(pid) = s.trim().parse::<u32>() {
            if util::pid_is(pid, "libvirtd") {
                return Ok(pid);
            }
        }
    }
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
            if util::pid_is(pid, "libvirtd") {
                found.push(pid);
            }
        }
    }
    match found.as_slice() {
        [one] => Ok(*one),
        [] => bail!("no libvirtd process (start it: bash scripts/libvirtd.sh start)"),
        many => {
            bail!("several libvirtd processes {many:?}: cannot tell which serves the system URI")
        }
    }
}

// ---------------------------------------------------------------- event monitor

/// `virsh event --all --loop`: notices lifecycle events of domains that are not ours (another
/// user of the same daemon), which would disturb an idle window.
struct EventMonitor {
    child: Child,
    events: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl EventMonitor {
    fn start(uri: &str) -> Result<EventMonitor> {
        let mut child = Command::new("virsh")
            .args(["-q", "-c", uri, "event", "--all", "--loop"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .context("spawn virsh event")?;
        let stdout = child.stdout.take().context("virsh event stdout")?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = Arc::clone(&events);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split_once("for domain '").map(|(_, r)| r) {
                    let name = rest.split('\'').next().unwrap_or("").to_string();
                    ev.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((Instant::now(), name));
                }
            }
        });
        Ok(EventMonitor { child, events })
    }

    fn foreign_between(&self, from: Instant, to: Instant, prefix: &str) -> usize {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(t, n)| *t >= from && *t <= to && !n.starts_with(prefix))
            .count()
    }
}

impl Drop for EventMonitor {
    fn drop(&mut self) {
        util::stop_child(&mut self.child, Duration::from_secs(2));
    }
}

// ---------------------------------------------------------------- the agent

struct AgentProc {
    child: Child,
    spawned: Instant,
    spawned_wall: SystemTime,
    log: PathBuf,
}

impl AgentProc {
    fn spawn(o: &LiveOpts, endpoint: &str, sets: &[&str], tag: &str) -> Result<AgentProc> {
        let cfg = o.out.join("agent.yaml");
        std::fs::write(
            &cfg,
            format!(
                "# written by the benchmark (bench/suite/live.rs)\nnode_name: bench-node\nlibvirt:\n  uris:\n    - \"{}\"\n",
                o.uri
            ),
        )?;
        let log = o.out.join(format!("agent-{tag}.log"));
        let logf = std::fs::File::create(&log)?;
        let mut cmd = Command::new(&o.agent_bin);
        cmd.arg("--config")
            .arg(&cfg)
            .args([
                "--endpoint",
                endpoint,
                "--protocol",
                "grpc",
                "--exporter",
                "otlp",
            ])
            .args(["--log-format", "json", "--log-level", "info"]);
        for s in o
            .agent_sets
            .iter()
            .map(String::as_str)
            .chain(sets.iter().copied())
        {
            cmd.args(["--set", s]);
        }
        cmd.arg("run")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().to_string();
            if k.starts_with("OTEL_")
                || k.starts_with("VIRT_HYPERVISOR_AGENT_")
                || k == "NODE_NAME"
                || k == "RUST_LOG"
            {
                cmd.env_remove(k);
            }
        }
        let spawned_wall = SystemTime::now();
        let spawned = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", o.agent_bin.display()))?;
        Ok(AgentProc {
            child,
            spawned,
            spawned_wall,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        util::stop_child(&mut self.child, Duration::from_secs(5));
    }

    /// Seconds after spawn of log messages of interest, and the first resync's elapsed_ms.
    fn log_breakdown(&self, run: &mut SyncRun) {
        let Ok(text) = std::fs::read_to_string(&self.log) else {
            return;
        };
        let t0 = self
            .spawned_wall
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let Some(ts) = v
                .get("timestamp")
                .and_then(|t| t.as_str())
                .and_then(parse_rfc3339)
            else {
                continue;
            };
            let at = Some(ts - t0);
            let fields = v.get("fields");
            match fields
                .and_then(|f| f.get("message"))
                .and_then(|m| m.as_str())
            {
                Some("libvirt connection established") if run.connected_at.is_none() => {
                    run.connected_at = at
                }
                Some("resync done") if run.resync_done_at.is_none() => {
                    run.resync_done_at = at;
                    run.resync_elapsed_ms = fields
                        .and_then(|f| f.get("elapsed_ms"))
                        .and_then(|e| e.as_f64());
                }
                Some("initial sync done") if run.initial_sync_logged_at.is_none() => {
                    run.initial_sync_logged_at = at
                }
                _ => {}
            }
        }
    }
}

/// `2026-11-27T02:08:00.123456Z` → seconds since the epoch.
fn parse_rfc3339(s: &str) -> Option<f64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let time = time.trim_end_matches('Z');
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let ss = t.next()?.parse::<f64>().ok()?;
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days as f64 * 86400.0 + hh * 3600.0 + mm * 60.0 + ss)
}

// ---------------------------------------------------------------- the peer

struct PeerProc {
    child: Child,
    url: String,
}

impl PeerProc {
    fn spawn(o: &LiveOpts) -> Result<PeerProc> {
        let port = util::free_port()?;
        let log = std::fs::File::create(o.out.join("peer.log"))?;
        let child = Command::new(&o.peer_bin)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--libvirt.uri={}", o.uri))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "spawn {} (apt-get install prometheus-libvirt-exporter)",
                    o.peer_bin
                )
            })?;
        let mut p = PeerProc {
            child,
            url: format!("http://127.0.0.1:{port}/metrics"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if scrape(&p.url).is_ok_and(|s| s.ok) {
                return Ok(p);
            }
            if Instant::now() > deadline {
                util::stop_child(&mut p.child, Duration::from_secs(2));
                bail!("the peer did not answer on {}", p.url);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        util::stop_child(&mut self.child, Duration::from_secs(5));
    }
}

#[derive(Clone, Debug)]
struct Scrape {
    start: Instant,
    done: Instant,
    ok: bool,
    names: Arc<BTreeSet<String>>,
}

fn scrape(url: &str) -> Result<Scrape> {
    let start = Instant::now();
    let out = Command::new("curl")
        .args(["-s", "-f", "--max-time", "20", url])
        .output()
        .context("run curl")?;
    let done = Instant::now();
    let body = String::from_utf8_lossy(&out.stdout);
    let names = body
        .lines()
        .filter(|l| l.starts_with("libvirt_domain_state_code{"))
        .filter_map(|l| l.split_once("domain=\"").map(|(_, r)| r))
        .filter_map(|r| r.split('"').next())
        .map(str::to_string)
        .collect();
    Ok(Scrape {
        start,
        done,
        ok: out.status.success(),
        names: Arc::new(names),
    })
}

/// A curl loop: the first scrape at `first`, then every `every`.
struct Scraper {
    stop: Arc<AtomicBool>,
    log: Arc<(Mutex<Vec<Scrape>>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Scraper {
    fn start(url: String, first: Instant, every: Duration) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let log: Arc<(Mutex<Vec<Scrape>>, Condvar)> = Arc::default();
        let (s, l) = (Arc::clone(&stop), Arc::clone(&log));
        let thread = std::thread::spawn(move || {
            let mut next = first;
            while !s.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now < next {
                    std::thread::sleep((next - now).min(Duration::from_millis(50)));
                    continue;
                }
                next += every;
                match scrape(&url) {
                    Ok(sc) => {
                        l.0.lock().unwrap_or_else(|p| p.into_inner()).push(sc);
                        l.1.notify_all();
                    }
                    Err(e) => eprintln!("live: scrape failed: {e:#}"),
                }
            }
        });
        Scraper {
            stop,
            log,
            thread: Some(thread),
        }
    }

    fn scrapes(&self) -> Vec<Scrape> {
        self.log.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn finish(mut self) -> Vec<Scrape> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.scrapes()
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------- phases

struct Ctx<'a> {
    o: &'a LiveOpts,
    sink: Sink,
    doms: Domains,
    libvirtd: u32,
    events: EventMonitor,
    notes: Vec<String>,
}

impl Ctx<'_> {
    fn check_libvirtd(&self) -> Result<()> {
        if !util::pid_is(self.libvirtd, "libvirtd") {
            bail!(
                "libvirtd (pid {}) went away during the benchmark (somebody stopped it?)",
                self.libvirtd
            );
        }
        Ok(())
    }

    fn foreign_domains(&self) -> usize {
        list_active_names(&self.o.uri)
            .iter()
            .filter(|n| !n.starts_with(&self.doms.prefix()))
            .count()
    }

    /// Spawn the agent and wait for the first export carrying every running domain of ours.
    fn agent_until_synced(
        &self,
        sets: &[&str],
        tag: &str,
    ) -> Result<(AgentProc, crate::sink::Received)> {
        let want = self.doms.keys_running();
        let agent = AgentProc::spawn(self.o, &self.sink.endpoint(), sets, tag)?;
        let got = self
            .sink
            .wait_for(agent.spawned, Duration::from_secs(120), |r| {
                want.iter().all(|k| r.names.contains(k))
            });
        match got {
            Some(r) => Ok((agent, r)),
            None => {
                let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
                agent.stop();
                bail!(
                    "the agent did not export all {} domains within 120 s; its log:\n{log}",
                    want.len()
                )
            }
        }
    }

    fn sleep(&self, secs: f64) -> Result<()> {
        util::sleep(Duration::from_secs_f64(secs))
    }

    fn idle_row(&mut self, n: usize) -> Result<IdleRow> {
        let o = self.o;
        let lv = self.libvirtd;
        let mut row = IdleRow {
            domains: n,
            window_secs: o.idle_secs,
            foreign_domains: self.foreign_domains(),
            ..IdleRow::default()
        };
        let window = Duration::from_secs_f64(o.idle_secs);
        let mut foreign = 0;

        // libvirtd alone.
        self.sleep(2.0)?;
        let t0 = Instant::now();
        let l0 = Cpu::read(lv)?;
        util::sleep(window)?;
        let l1 = Cpu::read(lv)?;
        foreign += self
            .events
            .foreign_between(t0, Instant::now(), &self.doms.prefix());
        row.libvirtd_alone = l1.since(&l0);

        // The agent.
        let (agent, first) = self.agent_until_synced(&[], &format!("idle-{n}"))?;
        row.agent_sync_secs = first.at.duration_since(agent.spawned).as_secs_f64();
        let (s0, n0) = (Cpu::read(agent.pid())?, util::threads(agent.pid()).len());
        util::sleep(SETTLE.saturating_sub(first.at.elapsed()))?;
        let t0 = Instant::now();
        let th0 = util::threads(agent.pid());
        let (a0, l0) = (Cpu::read(agent.pid())?, Cpu::read(lv)?);
        row.agent_settle = a0.since(&s0);
        row.agent_threads_settle = (n0, th0.len());
        util::sleep(window)?;
        let (a1, l1) = (Cpu::read(agent.pid())?, Cpu::read(lv)?);
        let th1 = util::threads(agent.pid());
        let t1 = Instant::now();
        foreign += self.events.foreign_between(t0, t1, &self.doms.prefix());
        row.agent = a1.since(&a0);
        row.agent_threads = util::thread_shares(&th0, &th1, row.agent.secs);
        row.libvirtd_with_agent = l1.since(&l0);
        let during: Vec<_> = self
            .sink
            .since(t0)
            .into_iter()
            .filter(|r| r.at <= t1)
            .collect();
        row.agent_exports = during.len();
        row.agent_export_bytes = during.iter().map(|r| r.bytes).sum();
        row.agent_mem = util::mem(agent.pid())?;
        agent.stop();
        self.sink.clear();

        // The peer, scraped every scrape_secs, the scrapes centred in the window.
        let peer = PeerProc::spawn(o)?;
        self.sleep(2.0)?;
        let t0 = Instant::now();
        let (p0, l0) = (Cpu::read(peer.pid())?, Cpu::read(lv)?);
        let scraper = Scraper::start(
            peer.url.clone(),
            t0 + Duration::from_secs_f64(o.scrape_secs / 2.0),
            Duration::from_secs_f64(o.scrape_secs),
        );
        util::sleep(window)?;
        let (p1, l1) = (Cpu::read(peer.pid())?, Cpu::read(lv)?);
        let t1 = Instant::now();
        let scrapes = scraper.finish();
        foreign += self.events.foreign_between(t0, t1, &self.doms.prefix());
        row.peer = p1.since(&p0);
        row.libvirtd_with_peer = l1.since(&l0);
        row.peer_scrapes = scrapes.iter().filter(|s| s.ok && s.done <= t1).count();
        row.peer_mem = util::mem(peer.pid())?;
        peer.stop();

        // The floor: `virsh event --all --loop`, idle over the same window.
        let mut floor = Command::new("virsh")
            .args(["-q", "-c", &o.uri, "event", "--all", "--loop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn the floor (virsh event --all --loop)")?;
        self.sleep(2.0)?;
        let t0 = Instant::now();
        let (f0, l0) = (Cpu::read(floor.id())?, Cpu::read(lv)?);
        util::sleep(window)?;
        let (f1, l1) = (Cpu::read(floor.id())?, Cpu::read(lv)?);
        foreign += self
            .events
            .foreign_between(t0, Instant::now(), &self.doms.prefix());
        row.floor = f1.since(&f0);
        row.libvirtd_with_floor = l1.since(&l0);
        let _ = floor.kill();
        let _ = floor.wait();

        row.foreign_events = foreign;
        self.check_libvirtd()?;
        Ok(row)
    }

    fn initial_sync(&mut self, runs: usize) -> Result<SyncResult> {
        let o = self.o;
        let lv = self.libvirtd;
        let names: Vec<String> = self.doms.running.iter().cloned().collect();
        let mut floor_script = vec!["list --name".to_string()];
        floor_script.extend(names.iter().map(|n| format!("dumpxml {n}")));
        let floor_script = floor_script.join(" ; ");
        let mut res = SyncResult {
            domains: names.len(),
            ..SyncResult::default()
        };
        for run in 0..runs {
            // Floor: one virsh process, one connection, every domain's XML.
            self.sleep(1.0)?;
            let l0 = Cpu::read(lv)?;
            let c0 = util::children_cpu_secs();
            let t = Instant::now();
            let st = Command::new("virsh")
                .args(["-q", "-c", &o.uri, &floor_script])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            let wall = t.elapsed().as_secs_f64();
            if !st.success() {
                bail!("floor virsh loop failed: {st}");
            }
            res.floor.push(SyncRun {
                wall_secs: wall,
                process_cpu_secs: util::children_cpu_secs() - c0,
                libvirtd_cpu_secs: Cpu::read(lv)?.since(&l0).secs,
                ..SyncRun::default()
            });

            for (variant, sets) in [
                ("default", &[][..]),
                ("debounce-1ms", &["export.debounce=1ms"][..]),
            ] {
                self.sleep(1.0)?;
                let l0 = Cpu::read(lv)?;
                let (agent, first) =
                    self.agent_until_synced(sets, &format!("sync-{variant}-{run}"))?;
                let cpu = Cpu::read(agent.pid())?;
                let mut r = SyncRun {
                    wall_secs: first.at.duration_since(agent.spawned).as_secs_f64(),
                    process_cpu_secs: cpu.ns as f64 / 1e9,
                    libvirtd_cpu_secs: Cpu::read(lv)?.since(&l0).secs,
                    ..SyncRun::default()
                };
                agent.log_breakdown(&mut r);
                agent.stop();
                self.sink.clear();
                if variant == "default" {
                    res.agent.push(r);
                } else {
                    res.agent_no_debounce.push(r);
                }
            }
            eprintln!(
                "live: initial sync run {}: floor {:.3} s, agent {:.3} s, agent (debounce 1ms) {:.3} s",
                run + 1,
                res.floor.last().map(|r| r.wall_secs).unwrap_or(f64::NAN),
                res.agent.last().map(|r| r.wall_secs).unwrap_or(f64::NAN),
                res.agent_no_debounce.last().map(|r| r.wall_secs).unwrap_or(f64::NAN)
            );
        }
        self.check_libvirtd()?;
        Ok(res)
    }

    /// Agent visibility and per-transition CPU over `k` transitions of one domain.
    fn agent_visibility(
        &mut self,
        k: usize,
        vis: &str,
        idle_rate: f64,
    ) -> Result<(Visibility, TransitionCost)> {
        let (agent, _) = self.agent_until_synced(&[], "visibility")?;
        self.sleep(2.0)?;
        let key = self.doms.key(vis);
        let mut lat = Vec::new();
        let (mut starts, mut stops, mut missed) = (0, 0, 0);
        let mut rng = util::Rng::new();
        let mut perf = match &self.o.perf {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let data = dir.join("transitions.perf.data");
                let child = Command::new("perf")
                    .args(["record", "-F", "4999", "-g", "-o"])
                    .arg(&data)
                    .args(["-p", &agent.pid().to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("spawn perf record")?;
                eprintln!("live:   recording perf into {}", data.display());
                self.sleep(1.0)?;
                Some(child)
            }
            None => None,
        };
        let th0 = util::threads(agent.pid());
        let a0 = Cpu::read(agent.pid())?;
        let l0 = Cpu::read(self.libvirtd)?;
        let t_begin = Instant::now();
        for i in 0..k {
            util::interrupted()?;
            let start = i % 2 == 0;
            let t_issue = Instant::now();
            if start {
                virsh(&self.o.uri, &format!("start {vis}"))?;
                starts += 1;
            } else {
                virsh(&self.o.uri, &format!("destroy {vis}"))?;
                stops += 1;
            }
            let t_ret = Instant::now();
            match self.sink.wait_for(t_issue, Duration::from_secs(30), |r| {
                r.names.contains(&key) == start
            }) {
                Some(r) => lat.push(signed_secs(r.at, t_ret)),
                None => missed += 1,
            }
            util::sleep(Duration::from_millis(rng.range(50, 300)))?;
        }
        let elapsed = t_begin.elapsed().as_secs_f64();
        let a1 = Cpu::read(agent.pid())?;
        let l1 = Cpu::read(self.libvirtd)?;
        let th1 = util::threads(agent.pid());
        let exports = self.sink.since(t_begin).len();
        if let Some(p) = perf.as_mut() {
            util::signal(p.id(), libc::SIGINT);
            let _ = p.wait();
        }
        if k % 2 == 1 {
            let _ = virsh(&self.o.uri, &format!("destroy {vis}"));
        }
        agent.stop();
        self.sink.clear();
        let cpu = a1.since(&a0);
        let per = cpu.secs * 1e3 / k.max(1) as f64;
        let net = (cpu.secs - idle_rate * elapsed) * 1e3 / k.max(1) as f64;
        self.check_libvirtd()?;
        Ok((
            stats(lat, starts, stops, missed),
            TransitionCost {
                transitions: k,
                elapsed_secs: elapsed,
                agent_cpu: cpu,
                per_transition_ms: per,
                per_transition_net_ms: net,
                libvirtd_cpu: l1.since(&l0),
                exports,
                threads: util::thread_shares(&th0, &th1, cpu.secs),
            },
        ))
    }

    /// Peer visibility: transitions of a pool of domains at random intervals; each becomes
    /// visible at the first scrape (started after the command was issued) that reflects it.
    fn peer_visibility(&mut self, k: usize, pool: &[String]) -> Result<Visibility> {
        let o = self.o;
        let peer = PeerProc::spawn(o)?;
        let every = Duration::from_secs_f64(o.scrape_secs);
        let scraper = Scraper::start(peer.url.clone(), Instant::now() + every, every);
        let mut rng = util::Rng::new();
        // Per pool domain: running?, and the pending transition (issued, returned, start?).
        let mut running = vec![false; pool.len()];
        let mut pending: Vec<Option<(Instant, Instant, bool)>> = vec![None; pool.len()];
        let mut lat = Vec::new();
        let (mut starts, mut stops, mut done_issuing) = (0, 0, 0);
        let resolve = |pending: &mut Vec<Option<(Instant, Instant, bool)>>,
                       lat: &mut Vec<f64>,
                       scrapes: &[Scrape]| {
            for (i, p) in pending.iter_mut().enumerate() {
                let Some((issued, ret, start)) = *p else {
                    continue;
                };
                if let Some(s) = scrapes
                    .iter()
                    .find(|s| s.ok && s.start >= issued && s.names.contains(&pool[i]) == start)
                {
                    lat.push(signed_secs(s.done, ret));
                    *p = None;
                }
            }
        };
        let deadline_total = Instant::now() + Duration::from_secs_f64(k as f64 * 6.0 + 120.0);
        while done_issuing < k {
            resolve(&mut pending, &mut lat, &scraper.scrapes());
            if Instant::now() > deadline_total {
                break;
            }
            let free: Vec<usize> = (0..pool.len()).filter(|i| pending[*i].is_none()).collect();
            if free.is_empty() {
                util::sleep(Duration::from_millis(200))?;
                continue;
            }
            let i = free[rng.range(0, free.len() as u64) as usize];
            let start = !running[i];
            let issued = Instant::now();
            if start {
                virsh(&o.uri, &format!("start {}", pool[i]))?;
                starts += 1;
            } else {
                virsh(&o.uri, &format!("destroy {}", pool[i]))?;
                stops += 1;
            }
            let ret = Instant::now();
            running[i] = start;
            pending[i] = Some((issued, ret, start));
            done_issuing += 1;
            util::sleep(Duration::from_millis(rng.range(500, 3500)))?;
        }
        // Wait for the last ones (two scrape intervals at most).
        let until = Instant::now() + every * 2 + Duration::from_secs(5);
        while pending.iter().any(Option::is_some) && Instant::now() < until {
            resolve(&mut pending, &mut lat, &scraper.scrapes());
            util::sleep(Duration::from_millis(200))?;
        }
        resolve(&mut pending, &mut lat, &scraper.scrapes());
        let missed = pending.iter().filter(|p| p.is_some()).count();
        let _ = scraper.finish();
        peer.stop();
        for (i, r) in running.iter().enumerate() {
            if *r {
                let _ = virsh(&o.uri, &format!("destroy {}", pool[i]));
            }
        }
        self.check_libvirtd()?;
        Ok(stats(lat, starts, stops, missed))
    }
}

fn signed_secs(a: Instant, b: Instant) -> f64 {
    if a >= b {
        a.duration_since(b).as_secs_f64()
    } else {
        -b.duration_since(a).as_secs_f64()
    }
}

fn stats(lat: Vec<f64>, starts: usize, stops: usize, missed: usize) -> Visibility {
    Visibility {
        p50: median(&lat),
        p99: percentile(&lat, 99.0),
        max: percentile(&lat, 100.0),
        min: percentile(&lat, 0.0),
        latencies: lat,
        starts,
        stops,
        missed,
    }
}

/// `live` mode. Writes `<out>/live.json`.
pub fn run(opts: &LiveOpts) -> Result<LiveResult> {
    std::fs::create_dir_all(&opts.out)?;
    if !opts.agent_bin.exists() {
        bail!(
            "agent binary {} not found (cargo build --release)",
            opts.agent_bin.display()
        );
    }
    util::install_stop_handler();
    let mut o = opts.clone();
    let mut daemon = None;
    let (libvirtd, described) = if o.uri == "private" {
        eprintln!(
            "live: starting a private libvirt daemon (session mode, user {})",
            session::USER
        );
        session::session_daemons_available().map_err(anyhow::Error::msg)?;
        // Short: unix socket paths hold at most 107 bytes.
        let dir = std::path::PathBuf::from(format!("/tmp/vhb-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).ok();
        }
        let d = session::SessionDaemon::start(dir)?;
        o.uri = d.uri();
        let pid = d.pid().context("the private libvirtd has no PID")?;
        let desc = format!(
            "a private libvirtd (session mode, run as user `{}`, runtime dir {}) that nobody else uses",
            session::USER,
            d.dir().display()
        );
        daemon = Some(d);
        (pid, desc)
    } else {
        virsh(&o.uri, "version")
            .context("libvirt does not answer (bash scripts/libvirtd.sh start)")?;
        remove_leftovers(&o.uri);
        (
            libvirtd_pid()?,
            format!(
                "the shared daemon at {} (other users' activity is counted and flagged)",
                o.uri
            ),
        )
    };
    let result = (|| {
        let events = EventMonitor::start(&o.uri)?;
        let mut ctx = Ctx {
            o: &o,
            sink: Sink::start()?,
            doms: Domains::new(&o.uri),
            libvirtd,
            events,
            notes: Vec::new(),
        };
        let result = run_phases(&mut ctx);
        eprintln!("live: cleaning up the domains of this run");
        ctx.doms.cleanup();
        result
    })();
    if let Some(d) = daemon {
        eprintln!("live: stopping the private libvirtd");
        // Dropping it stops the daemon, kills what it left (QEMU, virtlogd) by PID and removes
        // its dir.
        drop(d);
    }
    let mut result = result?;
    result.daemon = described;
    std::fs::write(
        o.out.join("live.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    Ok(result)
}

fn run_phases(ctx: &mut Ctx) -> Result<LiveResult> {
    let o = ctx.o;
    let mut sizes = o.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let max_n = sizes.last().copied().unwrap_or(0);
    let pool_n = 5;
    let mut tags: Vec<String> = (0..max_n).map(|i| format!("d{i:03}")).collect();
    tags.extend((0..pool_n).map(|i| format!("vis{i}")));
    eprintln!(
        "live: defining {} domains ({}*)",
        tags.len(),
        ctx.doms.name("")
    );
    ctx.doms.define(&tags, &o.out.join("xml"))?;
    let mut res = LiveResult {
        peer_scrape_interval_secs: o.scrape_secs,
        debounce_ms: 250.0,
        ..LiveResult::default()
    };

    // RSS of the agent with none of our domains.
    if o.wants("idle") {
        let (agent, _) = ctx.agent_until_synced(&[], "zero")?;
        util::sleep(Duration::from_secs(2))?;
        res.agent_mem_zero = util::mem(agent.pid())?;
        agent.stop();
        ctx.sink.clear();
    }

    let mut started = 0;
    for &n in &sizes {
        let names: Vec<String> = (started..n)
            .map(|i| ctx.doms.name(&format!("d{i:03}")))
            .collect();
        eprintln!("live: starting {} paused domains (total {n})", names.len());
        let t = Instant::now();
        ctx.doms.start_paused(&names)?;
        eprintln!("live:   started in {:.1} s", t.elapsed().as_secs_f64());
        started = n;
        if !o.wants("idle") {
            continue;
        }
        eprintln!(
            "live: idle windows at N={n}: libvirtd alone, agent, peer ({} s each)",
            o.idle_secs
        );
        let mut row = ctx.idle_row(n)?;
        if row.foreign_events > 0 {
            eprintln!(
                "live:   {} lifecycle events of other users' domains during the windows: measuring again",
                row.foreign_events
            );
            let again = ctx.idle_row(n)?;
            if again.foreign_events < row.foreign_events {
                row = again;
            }
            if row.foreign_events > 0 {
                ctx.notes.push(format!(
                    "N={n}: {} lifecycle events of other users' domains happened during the idle windows (the daemon is shared)",
                    row.foreign_events
                ));
            }
        }
        eprintln!(
            "live:   agent {:.4} s + libvirtd {:.4} s  vs  peer {:.4} s + libvirtd {:.4} s  vs  floor {:.4} s + libvirtd {:.4} s  (libvirtd alone {:.4} s; agent start-up tail {:.4} s, threads {} -> {})",
            row.agent.secs,
            row.libvirtd_with_agent.secs,
            row.peer.secs,
            row.libvirtd_with_peer.secs,
            row.floor.secs,
            row.libvirtd_with_floor.secs,
            row.libvirtd_alone.secs,
            row.agent_settle.secs,
            row.agent_threads_settle.0,
            row.agent_threads_settle.1,
        );
        res.idle.push(row);
    }
    if let Some(last) = res.idle.last() {
        if last.peer_scrapes > 0 {
            res.peer_cpu_per_scrape_ms = last.peer.secs * 1e3 / last.peer_scrapes as f64;
            res.libvirtd_cpu_per_scrape_ms =
                (last.libvirtd_with_peer.secs - last.libvirtd_alone.secs) * 1e3
                    / last.peer_scrapes as f64;
        }
    }

    if o.wants("sync") {
        eprintln!("live: initial sync at N={max_n}, {} runs", o.sync_runs);
        res.sync = ctx.initial_sync(o.sync_runs)?;
    }

    let idle_rate = res
        .idle
        .last()
        .map(|r| r.agent.secs / r.window_secs)
        .unwrap_or(0.0);
    if o.wants("visibility") {
        let vis0 = ctx.doms.name("vis0");
        eprintln!(
            "live: agent change visibility, {} transitions of {vis0}",
            o.transitions
        );
        let (vis, cost) = ctx.agent_visibility(o.transitions, &vis0, idle_rate)?;
        eprintln!(
            "live:   p50 {:.3} s p99 {:.3} s; agent CPU {:.3} ms per transition",
            vis.p50, vis.p99, cost.per_transition_ms
        );
        res.agent_visibility = vis;
        res.agent_transition_cost = cost;
    }

    if !o.wants("peer") {
        res.notes = std::mem::take(&mut ctx.notes);
        return Ok(res);
    }
    let pool: Vec<String> = (0..pool_n)
        .map(|i| ctx.doms.name(&format!("vis{i}")))
        .collect();
    eprintln!(
        "live: peer change visibility, {} transitions over {} domains, scrape every {} s",
        o.peer_transitions, pool_n, o.scrape_secs
    );
    res.peer_visibility = ctx.peer_visibility(o.peer_transitions, &pool)?;
    eprintln!(
        "live:   p50 {:.3} s p99 {:.3} s",
        res.peer_visibility.p50, res.peer_visibility.p99
    );
    res.notes = std::mem::take(&mut ctx.notes);
    Ok(res)
}
