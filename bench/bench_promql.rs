#![allow(clippy::unwrap_used)] // benchmark harness: a failed unwrap is a failed run
//! Benchmarks where the user looks (BENCHMARKS.md, "Where the user looks"). Both are `#[ignore]`d: they take minutes and
//! print tables instead of asserting on time. Run them one at a time, in release mode:
//!
//! ```sh
//! bash bench/run.sh --promql            # installs the peer if missing, then runs both
//! cargo test --release --bench bench_promql -- --ignored --nocapture --test-threads=1
//! ```
//!
//! **`promql_visibility`**: time from `virsh start` / `virsh destroy` returning to the change being
//! visible in a PromQL instant query at "now" (each pipeline polled every 50 ms), for three
//! pipelines watching the same domains on one private libvirt session daemon, in the same run:
//! (a) agent --OTLP gRPC--> the minimal collector (shipped development profile
//! `otel/collector-dev.yaml`) --remote write--> Prometheus 2.42; (b) agent --OTLP HTTP-->
//! Prometheus 3's OTLP receiver; (c) the peer, Debian's `prometheus-libvirt-exporter`, scraped
//! every 15 s by the same Prometheus 2.42. Both agents run their default settings (debounce 250 ms,
//! export interval 30 s); only endpoint, protocol and node name are set. Transitions go to a pool
//! of TCG domains at random 0.4–1.6 s intervals, so their
//! phase against the scrape and the batch timer is random; a domain is touched again only once
//! every pipeline has shown its last change, plus a random rest of up to one scrape interval (so
//! that its next change is not in phase with the scrape that showed the last one). A transition that a pipeline has not shown after 60 s
//! counts as missed (and retires its domain).
//!
//! **`fleet_cost`**: what the fleet pays at the default interval. 20 agent processes (each a libvirt
//! test-driver node `test:///…/node-N.xml` with 100 running KubeVirt-style domains and its own node
//! name) export OTLP/gRPC through a byte-counting TCP relay to one collector, which remote-writes to
//! Prometheus 2.42; three probe agents with the same node file export to an in-process OTLP
//! receiver (gRPC, gRPC+gzip, HTTP/protobuf), each through its own relay. The window is exactly five
//! periodic exports of the gRPC probe (≈ 150 s), aligned on its requests: requests and bytes per
//! node per hour are scaled from it; the collector's CPU comes from `/proc/<pid>/stat` over the
//! window, minus its idle rate measured beforehand with no agent connected.
//!
//! Environment (optional): `VHA_BENCH_TRANSITIONS` (starts and stops each, default 40),
//! `VHA_BENCH_POOL` (domains, 24), `VHA_BENCH_SEED`, `VHA_BENCH_FLEET_AGENTS` (20),
//! `VHA_BENCH_FLEET_VMS` (100), `VHA_BENCH_FLEET_EXPORTS` (window length in periodic exports, 5),
//! `VHA_BENCH_IDLE_SECS` (collector idle baseline, 30), `VHA_BENCH_OUT` (a directory: JSON results
//! `promql-visibility.json` / `fleet-cost.json` are written there).
//!
//! Needs root (the private daemon runs as the user `vha-launcher`), libvirtd and QEMU
//! (`scripts/setup.sh`), the peer (`apt-get install prometheus-libvirt-exporter`), and builds or
//! uses the cached collector and Prometheus 3. Everything started here is stopped by its PID; the
//! domains (`vha-t-…`) are destroyed and undefined, and the private daemon goes with its dir.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message;
use serde_json::json;

use common::libvirt::{domain_xml, unique_base, unique_name, Virt};
use common::pipeline::{Collector, Flavor, Prometheus};
use common::receiver::{Receiver, Recorded};
use common::reliability::Rng;
use common::session::{free_port, session_daemons_available, SessionDaemon, Workspace};
use common::{Agent, METRIC};

const PEER_BIN: &str = "/usr/bin/prometheus-libvirt-exporter";
const PEER_JOB: &str = "libvirt-exporter";
/// The peer's scrape interval (what Prometheus users typically configure for it).
const PEER_SCRAPE: &str = "15s";
/// How often each pipeline is queried.
const POLL: Duration = Duration::from_millis(50);
/// A transition not shown by a pipeline after this long is counted as missed.
const MISS_AFTER: Duration = Duration::from_secs(60);
/// A domain rests a random 0..REST_MAX after every pipeline showed its last change. Without it the
/// next change of that domain would follow the peer's scrape that showed the last one, i.e. start
/// early in a scrape interval, and the peer's latency would be biased towards a full interval.
const REST_MAX: Duration = Duration::from_secs(15);
/// The goal for the agent's pipelines (BENCHMARKS.md), p99 of starts and of stops.
const GOAL_P99: Duration = Duration::from_secs(2);

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Percentile (nearest rank), `p` in 0..=100; `None` for an empty sample.
fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0)
}

fn git_commit() -> String {
    Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn write_json(file: &str, value: &serde_json::Value) {
    let Some(dir) = std::env::var_os("VHA_BENCH_OUT") else {
        return;
    };
    let path = PathBuf::from(dir).join(file);
    match std::fs::write(&path, serde_json::to_string_pretty(value).unwrap() + "\n") {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}

fn require_peer() {
    assert!(
        Path::new(PEER_BIN).is_file(),
        "{PEER_BIN} is missing: apt-get install prometheus-libvirt-exporter \
         (bash bench/run.sh --promql installs it)"
    );
}

/// A process of ours: SIGTERM by PID on drop (SIGKILL after 5 s).
struct Owned {
    child: Child,
}

impl Drop for Owned {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(5) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The peer exporter on `port`, reading `uri`; returns once `/metrics` answers.
fn spawn_peer(uri: &str, port: u16, log: &Path) -> Result<Owned> {
    let file = std::fs::File::create(log)?;
    let child = Command::new(PEER_BIN)
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg(format!("--libvirt.uri={uri}"))
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("spawn {PEER_BIN}"))?;
    let peer = Owned { child };
    let url = format!("http://127.0.0.1:{port}/metrics");
    let start = Instant::now();
    while ureq::get(&url).call().is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("the peer did not answer on {url}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(peer)
}

// ------------------------------------------------------------------------------------------------
// PromQL visibility

/// The pool of TCG domains on the private daemon; destroyed and undefined on drop.
struct Pool<'a> {
    daemon: &'a SessionDaemon,
    names: Vec<String>,
}

impl<'a> Pool<'a> {
    fn define(daemon: &'a SessionDaemon, n: usize) -> Result<Pool<'a>> {
        let mut pool = Pool {
            daemon,
            names: Vec::new(),
        };
        for i in 0..n {
            let name = unique_name(&format!("p{i}"));
            let xml = domain_xml(&name, Virt::Qemu, None);
            let mut file = tempfile::NamedTempFile::new()?;
            file.write_all(xml.as_bytes())?;
            daemon.virsh(&["define", &file.path().to_string_lossy()])?;
            pool.names.push(name);
        }
        Ok(pool)
    }
}

impl Drop for Pool<'_> {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = self.daemon.virsh(&["destroy", name]);
            if let Err(e) = self.daemon.virsh(&["undefine", name]) {
                eprintln!("cleanup of {name}: {e:#}");
            }
        }
    }
}

/// One PromQL view of the pool: which domain names an instant query shows.
struct View<'a> {
    label: &'static str,
    prom: &'a Prometheus,
    query: String,
    /// The label that carries the domain name.
    key: &'static str,
}

const VIEWS: usize = 3;

#[derive(Clone, Debug)]
struct Transition {
    domain: usize,
    start: bool,
    /// When the virsh command returned.
    at: Instant,
    /// Per view: how long until an instant query showed the change.
    seen: [Option<Duration>; VIEWS],
    missed: bool,
    /// Its domain may be touched again (after a random rest, see [`REST_MAX`]).
    released: bool,
}

impl Transition {
    fn done(&self) -> bool {
        self.missed || self.seen.iter().all(Option::is_some)
    }

    /// When the last pipeline showed it.
    fn shown_everywhere_at(&self) -> Instant {
        self.at
            + self
                .seen
                .iter()
                .flatten()
                .max()
                .copied()
                .unwrap_or_default()
    }
}

/// Poll `view` every [`POLL`] until `stop`; mark in `log` the transitions its results show.
fn watch(k: usize, view: &View, log: &Mutex<Vec<Transition>>, names: &[String], stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let asked = Instant::now();
        match view.prom.query(&view.query) {
            Ok(samples) => {
                let now = Instant::now();
                let shown: BTreeSet<&str> =
                    samples.iter().filter_map(|s| s.label(view.key)).collect();
                let mut log = log.lock().unwrap();
                for t in log.iter_mut().filter(|t| !t.done() && t.seen[k].is_none()) {
                    // A result that arrived after virsh returned. It may have been asked a little
                    // earlier: libvirt emits the event before the command returns.
                    if now > t.at && shown.contains(names[t.domain].as_str()) == t.start {
                        t.seen[k] = Some(now - t.at);
                    }
                }
            }
            Err(e) => eprintln!("{}: query failed (retrying): {e:#}", view.label),
        }
        let spent = asked.elapsed();
        if spent < POLL {
            std::thread::sleep(POLL - spent);
        }
    }
}

#[derive(Debug, Default)]
struct Stats {
    n: usize,
    missed: usize,
    p50: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
    values: Vec<f64>,
}

fn stats(log: &[Transition], k: usize, start: bool) -> Stats {
    let of_kind: Vec<&Transition> = log.iter().filter(|t| t.start == start).collect();
    let values: Vec<f64> = of_kind
        .iter()
        .filter_map(|t| t.seen[k])
        .map(|d| d.as_secs_f64())
        .collect();
    Stats {
        n: values.len(),
        missed: of_kind.len() - values.len(),
        p50: percentile(&values, 50.0),
        p99: percentile(&values, 99.0),
        max: percentile(&values, 100.0),
        values,
    }
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |s| format!("{s:.2} s"))
}

#[test]
#[ignore = "benchmark (minutes): cargo test --release --bench bench_promql -- --ignored --nocapture --test-threads=1"]
fn promql_visibility() {
    session_daemons_available().expect("a private libvirt session daemon is needed");
    require_peer();
    let per_kind = env_num("VHA_BENCH_TRANSITIONS", 40) as usize;
    let pool_size = env_num("VHA_BENCH_POOL", 24).max(2) as usize;
    let seed = env_num(
        "VHA_BENCH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1),
    );
    let load_before = loadavg();
    println!(
        "PromQL visibility: {per_kind} starts + {per_kind} stops over {pool_size} domains, seed \
         {seed}, {} cores, load {load_before}",
        cores()
    );

    let ws = Workspace::new().expect("workspace");
    let daemon = SessionDaemon::start(ws.path().join("bench")).expect("private libvirtd");
    let uri = daemon.uri();
    let pool = Pool::define(&daemon, pool_size).expect("define the pool");

    let peer_port = free_port().unwrap();
    let _peer = spawn_peer(&uri, peer_port, &ws.path().join("peer.log")).expect("start the peer");
    let scrape = format!(
        "  - job_name: {PEER_JOB}\n    scrape_interval: {PEER_SCRAPE}\n    scrape_timeout: 10s\n    \
         static_configs:\n      - targets: ['127.0.0.1:{peer_port}']\n"
    );
    let prom2 = Prometheus::start_with_scrapes(Flavor::RemoteWrite, &scrape).expect("Prometheus 2");
    let prom3 = Prometheus::start(Flavor::Otlp).expect("Prometheus 3");
    let collector = Collector::start(&prom2.remote_write_url()).expect("collector");

    let node_a = format!("bench-rw-{}", unique_base());
    let node_b = format!("bench-otlp-{}", unique_base());
    let agent = |protocol: &str, endpoint: &str, node: &str| {
        Agent::spawn(
            &["run"],
            &[
                ("VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS", uri.as_str()),
                ("VIRT_HYPERVISOR_AGENT_EXPORT__PROTOCOL", protocol),
                ("VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT", endpoint),
                ("VIRT_HYPERVISOR_AGENT_NODE_NAME", node),
                ("RUST_LOG", "warn"),
            ],
        )
        .expect("spawn the agent")
    };
    let mut agent_a = agent("grpc", &collector.grpc_endpoint(), &node_a);
    let mut agent_b = agent("http/protobuf", &prom3.otlp_endpoint(), &node_b);

    let views = [
        View {
            label: "(a) agent -> collector -> remote write -> Prometheus 2.42",
            prom: &prom2,
            query: format!("{METRIC}{{node=\"{node_a}\"}}"),
            key: "name",
        },
        View {
            label: "(b) agent -> Prometheus 3 OTLP receiver",
            prom: &prom3,
            query: format!("{METRIC}{{node=\"{node_b}\"}}"),
            key: "name",
        },
        View {
            label: "(c) peer prometheus-libvirt-exporter, 15 s scrape, Prometheus 2.42",
            prom: &prom2,
            query: format!("libvirt_domain_state_code{{job=\"{PEER_JOB}\"}}"),
            key: "domain",
        },
    ];

    // Warm-up (not counted): one start that every pipeline must show, so that the agents are
    // connected and the peer's target is up before the clock runs.
    daemon
        .virsh(&["start", &pool.names[0]])
        .expect("warm-up start");
    let warm = Instant::now();
    for v in &views {
        v.prom
            .wait_for(&v.query, warm, Duration::from_secs(90), |r| {
                r.iter()
                    .any(|s| s.label(v.key) == Some(pool.names[0].as_str()))
            })
            .unwrap_or_else(|e| {
                panic!(
                    "{}: warm-up start never visible: {e:#}\nagent a:\n{}\nagent b:\n{}",
                    v.label,
                    agent_a.log_tail(20),
                    agent_b.log_tail(20)
                )
            });
    }
    println!("warm-up visible everywhere after {:?}", warm.elapsed());

    let log: Mutex<Vec<Transition>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let mut running = vec![false; pool_size];
    running[0] = true;
    let mut retired = vec![false; pool_size];
    let mut rest_until = vec![Instant::now(); pool_size];
    let mut rng = Rng::new(seed);
    let begun = Instant::now();
    std::thread::scope(|s| {
        for (k, v) in views.iter().enumerate() {
            let (log, stop, names) = (&log, &stop, &pool.names);
            s.spawn(move || watch(k, v, log, names, stop));
        }
        let (mut starts, mut stops) = (0usize, 0usize);
        let mut gap = Duration::ZERO;
        while starts < per_kind || stops < per_kind {
            std::thread::sleep(gap);
            let busy: BTreeSet<usize> = {
                let mut log = log.lock().unwrap();
                for t in log.iter_mut().filter(|t| !t.done()) {
                    if t.at.elapsed() > MISS_AFTER {
                        t.missed = true;
                        retired[t.domain] = true;
                        eprintln!(
                            "transition of {} missed by a pipeline",
                            pool.names[t.domain]
                        );
                    }
                }
                for t in log.iter_mut().filter(|t| t.done() && !t.released) {
                    t.released = true;
                    rest_until[t.domain] = t.shown_everywhere_at()
                        + Duration::from_millis(rng.below(REST_MAX.as_millis() as usize) as u64);
                }
                log.iter().filter(|t| !t.done()).map(|t| t.domain).collect()
            };
            // Any rested domain whose change is still needed: a start of a stopped one, a stop of a
            // running one (not alternating, so that about half the pool runs and both kinds have
            // candidates). None: look again shortly, without a new gap.
            let free: Vec<usize> = (0..pool_size)
                .filter(|i| {
                    !busy.contains(i)
                        && !retired[*i]
                        && rest_until[*i] <= Instant::now()
                        && if running[*i] {
                            stops < per_kind
                        } else {
                            starts < per_kind
                        }
                })
                .collect();
            if free.is_empty() {
                gap = Duration::from_millis(50);
                continue;
            }
            gap = Duration::from_millis(400 + rng.below(1200) as u64);
            let d = free[rng.below(free.len())];
            let want_start = !running[d];
            let verb = if want_start { "start" } else { "destroy" };
            daemon
                .virsh(&[verb, &pool.names[d]])
                .unwrap_or_else(|e| panic!("virsh {verb}: {e:#}"));
            let at = Instant::now();
            running[d] = want_start;
            log.lock().unwrap().push(Transition {
                domain: d,
                start: want_start,
                at,
                seen: [None; VIEWS],
                missed: false,
                released: false,
            });
            if want_start {
                starts += 1;
            } else {
                stops += 1;
            }
            assert!(
                begun.elapsed() < Duration::from_secs(600),
                "the benchmark ran for 10 minutes: giving up"
            );
        }
        // Let every pipeline show the last transitions (or miss them).
        while log.lock().unwrap().iter().any(|t| !t.done()) {
            std::thread::sleep(Duration::from_millis(100));
            let mut log = log.lock().unwrap();
            for t in log.iter_mut().filter(|t| !t.done()) {
                if t.at.elapsed() > MISS_AFTER {
                    t.missed = true;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = begun.elapsed();
    agent_a.check_running().expect("agent a alive");
    agent_b.check_running().expect("agent b alive");
    let load_after = loadavg();
    let log = log.into_inner().unwrap();

    // The table.
    let mut out = format!(
        "\nPromQL visibility: virsh start/destroy returning -> instant query shows the change \
         (polled every {} ms)\ncommit {}, {} cores, load {load_before} before / {load_after} after, \
         {} transitions in {:.0} s\n\n",
        POLL.as_millis(),
        git_commit(),
        cores(),
        log.len(),
        elapsed.as_secs_f64()
    );
    out.push_str(&format!(
        "{:<74} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "pipeline", "start p50", "start p99", "start max", "stop p50", "stop p99", "stop max"
    ));
    let mut rows = Vec::new();
    for (k, v) in views.iter().enumerate() {
        let (st, sp) = (stats(&log, k, true), stats(&log, k, false));
        out.push_str(&format!(
            "{:<74} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            format!("{} (n={}/{})", v.label, st.n, sp.n),
            secs(st.p50),
            secs(st.p99),
            secs(st.max),
            secs(sp.p50),
            secs(sp.p99),
            secs(sp.max)
        ));
        if st.missed + sp.missed > 0 {
            out.push_str(&format!(
                "    missed (not shown within {MISS_AFTER:?}): {} starts, {} stops\n",
                st.missed, sp.missed
            ));
        }
        rows.push((v.label, st, sp));
    }
    let peer = (&rows[2].1, &rows[2].2);
    for (label, st, sp) in &rows[..2] {
        let ratio = |p: Option<f64>, a: Option<f64>| match (p, a) {
            (Some(p), Some(a)) if a > 0.0 => format!("{:.1}x", p / a),
            _ => "-".into(),
        };
        let met = |s: &Stats| s.missed == 0 && s.p99.is_some_and(|v| v <= GOAL_P99.as_secs_f64());
        out.push_str(&format!(
            "{}: peer/agent p50 start {} stop {}; goal p99 <= {:?}: starts {}, stops {}\n",
            &label[..3],
            ratio(peer.0.p50, st.p50),
            ratio(peer.1.p50, sp.p50),
            GOAL_P99,
            if met(st) { "met" } else { "missed" },
            if met(sp) { "met" } else { "missed" },
        ));
    }
    println!("{out}");

    let json_rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|(label, st, sp)| {
            json!({
                "pipeline": label,
                "start": {"n": st.n, "missed": st.missed, "p50_s": st.p50, "p99_s": st.p99,
                          "max_s": st.max, "values_s": st.values},
                "stop": {"n": sp.n, "missed": sp.missed, "p50_s": sp.p50, "p99_s": sp.p99,
                         "max_s": sp.max, "values_s": sp.values},
            })
        })
        .collect();
    write_json(
        "promql-visibility.json",
        &json!({
            "commit": git_commit(),
            "cores": cores(),
            "load_before": load_before,
            "load_after": load_after,
            "seed": seed,
            "pool": pool_size,
            "poll_ms": POLL.as_millis() as u64,
            "peer_scrape": PEER_SCRAPE,
            "elapsed_s": elapsed.as_secs_f64(),
            "pipelines": json_rows,
        }),
    );
    drop(agent_a);
    drop(agent_b);
    drop(collector);
    drop(prom3);
    drop(prom2);
    drop(pool);
}

// ------------------------------------------------------------------------------------------------
// Fleet cost

/// A TCP relay to `upstream` that counts the bytes each way: the wire cost of a sender (protobuf,
/// HTTP/2 or HTTP/1.1 framing and headers, pings), without touching what it relays.
struct CountingRelay {
    port: u16,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl CountingRelay {
    fn start(upstream: u16) -> Result<CountingRelay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (u, d, st, ss) = (up.clone(), down.clone(), stop.clone(), streams.clone());
        let accept = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(_) => continue,
                };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let pipe = |from: &TcpStream, to: &TcpStream, count: &Arc<AtomicU64>| {
                    let (mut from, mut to, count) =
                        (from.try_clone()?, to.try_clone()?, count.clone());
                    Ok::<_, std::io::Error>(std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            count.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    }))
                };
                if pipe(&client, &server, &u).is_ok() && pipe(&server, &client, &d).is_ok() {
                    let mut ss = ss.lock().unwrap();
                    ss.push(client);
                    ss.push(server);
                }
            }
        });
        Ok(CountingRelay {
            port,
            up,
            down,
            stop,
            streams,
            accept: Some(accept),
        })
    }

    /// (client -> upstream, upstream -> client) bytes so far.
    fn bytes(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

impl Drop for CountingRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.streams.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn port_of(endpoint: &str) -> u16 {
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {endpoint}"))
}

/// A libvirt test-driver node with `vms` running KubeVirt-style domains (10 namespaces).
fn node_xml(node: usize, vms: usize) -> String {
    let mut xml = String::from(
        "<?xml version=\"1.0\"?>\n<node>\n  <cpu><mhz>2000</mhz><model>x86_64</model><nodes>1</nodes>\
         <sockets>1</sockets><cores>64</cores><threads>1</threads></cpu>\n  \
         <memory>268435456</memory>\n",
    );
    for j in 0..vms {
        xml.push_str(&format!(
            "  <domain type=\"kvm\"><name>bench-ns-{ns}_vmi-{j:04}</name>\
             <uuid>{node:08x}-0000-4000-8000-{j:012x}</uuid><metadata>\
             <kubevirt xmlns=\"http://kubevirt.io\"><uid>{node:08x}-1111-4000-8000-{j:012x}</uid>\
             </kubevirt></metadata><memory unit=\"MiB\">2048</memory><vcpu>2</vcpu>\
             <os><type arch=\"x86_64\" machine=\"pc-q35-7.2\">hvm</type></os></domain>\n",
            ns = j % 10
        ));
    }
    xml.push_str("</node>\n");
    xml
}

/// utime + stime of `pid`, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let ticks = *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    });
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after `(comm)`: state is field 3; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / ticks
}

fn rss_mib(pid: u32) -> f64 {
    common::reliability::proc_stats(pid)
        .map(|s| s.rss_kib as f64 / 1024.0)
        .unwrap_or(0.0)
}

/// Sum of every sample of `name` (any labels) in a Prometheus text page.
fn text_metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

fn scrape_text(url: &str) -> String {
    ureq::get(url)
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .unwrap_or_default()
}

/// The `k8s.node.name` resource attribute of a request.
fn node_of(r: &Recorded) -> Option<String> {
    let resource = r.request.resource_metrics.first()?.resource.as_ref()?;
    let kv = resource
        .attributes
        .iter()
        .find(|kv| kv.key == "k8s.node.name")?;
    match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

struct Probe {
    label: &'static str,
    node: String,
    relay: CountingRelay,
    _agent: Agent,
}

#[test]
#[ignore = "benchmark (minutes): cargo test --release --bench bench_promql -- --ignored --nocapture --test-threads=1"]
fn fleet_cost() {
    let agents = env_num("VHA_BENCH_FLEET_AGENTS", 20) as usize;
    let vms = env_num("VHA_BENCH_FLEET_VMS", 100) as usize;
    let exports = env_num("VHA_BENCH_FLEET_EXPORTS", 5).max(1) as usize;
    let idle_secs = env_num("VHA_BENCH_IDLE_SECS", 30);
    let load_before = loadavg();
    println!(
        "fleet cost: {agents} agents x {vms} VMs, window of {exports} periodic exports, {} cores, \
         load {load_before}",
        cores()
    );
    let dir = tempfile::tempdir().unwrap();
    let xml = node_xml(0, vms);
    let node_file = |i: usize| {
        let p = dir.path().join(format!("node-{i}.xml"));
        std::fs::write(
            &p,
            if i == 0 {
                xml.clone()
            } else {
                node_xml(i, vms)
            },
        )
        .unwrap();
        format!("test://{}", p.display())
    };
    let prom = Prometheus::start(Flavor::RemoteWrite).expect("Prometheus 2.42");
    let collector = Collector::start(&prom.remote_write_url()).expect("collector");
    let col_pid = collector.pid().unwrap();
    let prom_pid = prom.pid().unwrap();
    let fleet_relay = CountingRelay::start(port_of(&collector.grpc_endpoint())).unwrap();

    // The collector's idle rate, with no agent connected.
    let idle_t = Instant::now();
    let idle_cpu0 = cpu_secs(col_pid);
    std::thread::sleep(Duration::from_secs(idle_secs));
    let idle_rate = (cpu_secs(col_pid) - idle_cpu0) / idle_t.elapsed().as_secs_f64();

    let tag = unique_base();
    let spawn = |uri: &str, node: &str, extra: &[(&str, &str)], endpoint: &str| {
        let mut env = vec![
            ("VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS", uri),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT", endpoint),
            ("VIRT_HYPERVISOR_AGENT_NODE_NAME", node),
            ("RUST_LOG", "warn"),
        ];
        env.extend_from_slice(extra);
        Agent::spawn(&["run"], &env).expect("spawn an agent")
    };
    let fleet_endpoint = format!("http://127.0.0.1:{}", fleet_relay.port);
    let mut fleet: Vec<Agent> = (0..agents)
        .map(|i| {
            spawn(
                &node_file(i + 1),
                &format!("fleet-{tag}-{i:02}"),
                &[],
                &fleet_endpoint,
            )
        })
        .collect();

    let receiver = Receiver::start().expect("in-process OTLP receiver");
    let uri0 = node_file(0);
    let probe = |label: &'static str, upstream: &str, extra: &[(&str, &str)], path: &str| {
        let relay = CountingRelay::start(port_of(upstream)).unwrap();
        let node = format!("probe-{tag}-{}", label.replace(['/', '+'], "-"));
        let endpoint = format!("http://127.0.0.1:{}{path}", relay.port);
        let agent = spawn(&uri0, &node, extra, &endpoint);
        Probe {
            label,
            node,
            relay,
            _agent: agent,
        }
    };
    let probes = [
        probe("grpc", &receiver.grpc_endpoint(), &[], ""),
        probe(
            "grpc+gzip",
            &receiver.grpc_endpoint(),
            &[("VIRT_HYPERVISOR_AGENT_EXPORT__COMPRESSION", "gzip")],
            "",
        ),
        probe(
            "http/protobuf",
            &receiver.http_endpoint(),
            &[("VIRT_HYPERVISOR_AGENT_EXPORT__PROTOCOL", "http/protobuf")],
            "/v1/metrics",
        ),
    ];

    // Every fleet agent's domains in Prometheus.
    let q = format!("count({METRIC}{{node=~\"fleet-{tag}-.*\"}})");
    let want = (agents * vms) as f64;
    prom.wait_for(&q, Instant::now(), Duration::from_secs(120), |r| {
        r.first().is_some_and(|s| s.value == want)
    })
    .unwrap_or_else(|e| panic!("the fleet never reached Prometheus: {e:#}"));

    // The window: from just after one periodic export of the gRPC probe to just after its
    // `exports`-th next one, i.e. exactly `exports` export intervals.
    let probe_requests = |node: &str, from: Instant, to: Instant| -> Vec<Recorded> {
        receiver
            .requests_since(from)
            .into_iter()
            .filter(|r| r.at <= to && node_of(r).as_deref() == Some(node))
            .collect()
    };
    let wait_probe_request = |after: Instant| -> Instant {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(r) = probe_requests(&probes[0].node, after, Instant::now()).first() {
                return r.at;
            }
            assert!(
                Instant::now() < deadline,
                "the gRPC probe stopped exporting"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let settle = Duration::from_secs(2);
    let first = wait_probe_request(Instant::now() + settle);
    std::thread::sleep(settle.saturating_sub(first.elapsed()));
    let t0 = Instant::now();
    let snap = |probes: &[Probe]| {
        (
            cpu_secs(col_pid),
            cpu_secs(prom_pid),
            fleet_relay.bytes(),
            probes.iter().map(|p| p.relay.bytes()).collect::<Vec<_>>(),
            scrape_text(&collector.telemetry_url()),
        )
    };
    let s0 = snap(&probes);
    let mut last = first;
    for _ in 0..exports {
        last = wait_probe_request(last + Duration::from_millis(1));
    }
    std::thread::sleep(settle.saturating_sub(last.elapsed()));
    let t1 = Instant::now();
    let s1 = snap(&probes);
    let window = (t1 - t0).as_secs_f64();
    for a in fleet.iter_mut() {
        a.check_running().expect("fleet agent alive");
    }
    let col_rss = rss_mib(col_pid);
    let load_after = loadavg();

    let per_hour = 3600.0 / window;
    let points = |page: &str| text_metric(page, "otelcol_receiver_accepted_metric_points");
    let sent = |page: &str| text_metric(page, "otelcol_exporter_sent_metric_points");
    let accepted = points(&s1.4) - points(&s0.4);
    let exported = sent(&s1.4) - sent(&s0.4);
    let col_cpu = s1.0 - s0.0;
    let col_net = (col_cpu - idle_rate * window).max(0.0);
    let prom_cpu = s1.1 - s0.1;
    let fleet_up = (s1.2 .0 - s0.2 .0) as f64;
    let fleet_down = (s1.2 .1 - s0.2 .1) as f64;

    let mut out = format!(
        "\nFleet cost at the default export interval (30 s), {vms} VMs per node\ncommit {}, {} cores, \
         load {load_before} before / {load_after} after, window {window:.1} s\n\n",
        git_commit(),
        cores()
    );
    out.push_str(&format!(
        "{:<16} {:>9} {:>12} {:>14} {:>14} {:>14}\n",
        "probe (1 node)",
        "requests",
        "req/node/h",
        "protobuf B/req",
        "wire up MB/h",
        "wire down MB/h"
    ));
    let mut probe_json = Vec::new();
    for (i, p) in probes.iter().enumerate() {
        let reqs = probe_requests(&p.node, t0, t1);
        let payload: Vec<usize> = reqs.iter().map(|r| r.request.encoded_len()).collect();
        let mean_payload = payload.iter().sum::<usize>() as f64 / payload.len().max(1) as f64;
        let up = (s1.3[i].0 - s0.3[i].0) as f64;
        let down = (s1.3[i].1 - s0.3[i].1) as f64;
        out.push_str(&format!(
            "{:<16} {:>9} {:>12.0} {:>14.0} {:>14.3} {:>14.3}\n",
            p.label,
            reqs.len(),
            reqs.len() as f64 * per_hour,
            mean_payload,
            up * per_hour / 1e6,
            down * per_hour / 1e6
        ));
        probe_json.push(json!({
            "transport": p.label,
            "requests": reqs.len(),
            "requests_per_node_hour": reqs.len() as f64 * per_hour,
            "payload_bytes_per_request": mean_payload,
            "wire_up_bytes": up,
            "wire_down_bytes": down,
            "wire_up_bytes_per_node_hour": up * per_hour,
            "wire_down_bytes_per_node_hour": down * per_hour,
        }));
    }
    // Gross (idle included) is the upper bound used for sizing: the idle baseline is a few 10 ms
    // ticks, so the net figure carries that resolution.
    let per_agent_ms_min = col_net / agents as f64 / window * 60.0 * 1e3;
    let gross_ms_min = col_cpu / agents as f64 / window * 60.0 * 1e3;
    out.push_str(&format!(
        "\ncollector, {agents} agents (OTLP/gRPC) -> remote write -> Prometheus 2.42:\n  \
         CPU {col_cpu:.2} s in the window ({:.1} % of a core), idle rate {:.2} ms/s -> net {col_net:.2} s\n  \
         = {gross_ms_min:.1} ms of collector CPU per agent per minute gross ({:.2} cores per 1,000 \
         agents), {per_agent_ms_min:.1} ms net of idle ({:.2} cores per 1,000 agents)\n  \
         points accepted {accepted:.0}, sent by remote write {exported:.0} ({:.0} points per agent per \
         export); {:.1} µs of CPU per point\n  \
         wire from the agents {:.3} MB/node/h up, {:.3} MB/node/h down; collector RSS {col_rss:.1} MiB\n  \
         Prometheus 2.42 (remote-write ingestion): CPU {prom_cpu:.2} s in the window\n",
        col_cpu / window * 100.0,
        idle_rate * 1e3,
        gross_ms_min / 60.0 / 1e3 * 1000.0,
        per_agent_ms_min / 60.0 / 1e3 * 1000.0,
        accepted / (agents * exports).max(1) as f64,
        if accepted > 0.0 { col_net / accepted * 1e6 } else { 0.0 },
        fleet_up / agents as f64 * per_hour / 1e6,
        fleet_down / agents as f64 * per_hour / 1e6,
    ));
    println!("{out}");
    write_json(
        "fleet-cost.json",
        &json!({
            "commit": git_commit(),
            "cores": cores(),
            "load_before": load_before,
            "load_after": load_after,
            "agents": agents,
            "vms_per_node": vms,
            "window_s": window,
            "exports_in_window": exports,
            "probes": probe_json,
            "collector": {
                "cpu_s": col_cpu,
                "idle_cpu_per_s": idle_rate,
                "net_cpu_s": col_net,
                "cpu_ms_per_agent_minute": per_agent_ms_min,
                "gross_cpu_ms_per_agent_minute": gross_ms_min,
                "points_accepted": accepted,
                "points_sent": exported,
                "rss_mib": col_rss,
                "wire_up_bytes": fleet_up,
                "wire_down_bytes": fleet_down,
            },
            "prometheus_cpu_s": prom_cpu,
        }),
    );
    drop(probes);
    drop(fleet);
    drop(fleet_relay);
    drop(collector);
    drop(prom);
}
