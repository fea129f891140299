//! Benchmark, KubeVirt mode at scale (bench/kubevirt-scale.md): 50 simulated virt-launcher
//! pods (or as many as memory allows; the number used is printed), each a real non-root libvirt
//! session daemon with one 32 MiB TCG domain started paused, all watched by ONE agent in discovery
//! mode, so every connection's events come through the agent's single `libvirt-events` loop thread.
//!
//! Measured, printed (not asserted as timings):
//! - startup: agent spawn -> first OTLP request showing all N VMIs;
//! - the agent's VmRSS / VmHWM, thread count (and names), fd count with N connections, compared
//!   with the same agent watching an empty kubelet root;
//! - exactly one thread named `libvirt-events` (asserted);
//! - idle CPU with N connections (keepalive, timers) over 10 s;
//! - ≥ 100 sequential transitions (`virsh destroy` / `virsh start --paused` over different pods),
//!   each waited for at the receiver: p50/p90/p99/max latency from the virsh command's return to the
//!   first request showing the new set (negative: pushed before virsh returned), and the agent's CPU
//!   (utime + stime) per transition.
//!
//! The agent exports with a 30 s interval and a 250 ms debounce: only push on change explains a change
//! seen within a second. Run by hand (it is ignored in CI): `bash bench/run.sh --kubevirt`, or
//! `cargo test --release --bench scale_kubevirt -- --ignored --nocapture`.
//! `VHA_SCALE_PODS` (default 50) and `VHA_SCALE_CYCLES` (default 50: 2 transitions each) override.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::receiver::{describe, Receiver, Recorded};
use common::session::{require_session_daemons, settled_fds, start_all, Pod, Vmi, Workspace};
use common::{signed_ms, Agent, METRIC, UP};

const NODE: &str = "scale-node";
const EMPTY_NODE: &str = "scale-empty";
const DEFAULT_PODS: usize = 50;
const DEFAULT_CYCLES: usize = 50;
/// Memory one pod needs (libvirtd ~25-30 MB, paused 32 MiB TCG QEMU ~37-40 MB, virtlogd, virsh
/// calls), with margin.
const POD_BUDGET_MB: u64 = 120;
/// Memory left to the rest of the machine (other builds and tests).
const RESERVE_MB: u64 = 2048;
/// Pods started at once (2 cores).
const START_WORKERS: usize = 4;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);
const TRANSITION_TIMEOUT: Duration = Duration::from_secs(30);
const IDLE_WINDOW: Duration = Duration::from_secs(10);

/// Print a report line as it is measured (a failure half-way keeps what was seen) and keep it.
macro_rules! note {
    ($report:expr, $($arg:tt)*) => {{
        let line = format!($($arg)*);
        eprintln!("{line}");
        $report.push_str(&line);
        $report.push('\n');
    }};
}

// ---------------------------------------------------------------------------------------------
// /proc readings

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A `kB` field of `/proc/meminfo` in MB.
fn meminfo_mb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// A field of `/proc/PID/status` (first word of its value).
fn status_field(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// utime + stime of `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    stat_ticks(&format!("/proc/{pid}/stat"))
}

/// utime + stime from a `stat` file (a process's or a thread's).
fn stat_ticks(path: &str) -> u64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| -> u64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    // After `pid (comm)`: state(0) … utime(11) stime(12).
    get(11) + get(12)
}

fn clock_ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Thread names of `pid` with their counts.
fn thread_names(pid: u32) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        *out.entry(comm.trim().to_string()).or_insert(0) += 1;
    }
    out
}

/// Each thread of `pid`: tid -> (name, CPU ns). From `schedstat` (the scheduler's exact run time):
/// a thread's `stat` utime/stime are tick samples, too coarse for threads that run a few ms.
fn thread_cpu_ns(pid: u32) -> BTreeMap<String, (String, u64)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = entry.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0);
        out.insert(
            entry.file_name().to_string_lossy().into_owned(),
            (name.trim().to_string(), ns),
        );
    }
    out
}

/// CPU used between two [`thread_cpu_ns`] samples by thread name (threads gone meanwhile are not
/// counted), as `name N ms (k threads), …`, largest first.
fn cpu_by_thread(
    before: &BTreeMap<String, (String, u64)>,
    after: &BTreeMap<String, (String, u64)>,
) -> String {
    let mut by_name: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
    for (tid, (name, ns)) in after {
        let old = before.get(tid).map(|(_, t)| *t).unwrap_or(0);
        let e = by_name.entry(name).or_insert((0, 0));
        e.0 += ns.saturating_sub(old);
        if *ns > old {
            e.1 += 1;
        }
    }
    let mut rows: Vec<(&str, (u64, usize))> = by_name.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1 .0));
    rows.iter()
        .map(|(n, (ns, k))| format!("{n} {:.1} ms ({k} ran)", *ns as f64 / 1e6))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Counts the openings of a directory (inotify `IN_OPEN` on it): each discovery scan of the agent
/// lists the kubelet `pods/` dir once per glob.
struct OpenCounter {
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _watcher: notify::RecommendedWatcher,
}

impl OpenCounter {
    fn watch(dir: &Path) -> OpenCounter {
        use notify::event::{AccessKind, EventKind};
        use notify::Watcher as _;
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = std::sync::Arc::clone(&count);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                if matches!(ev.kind, EventKind::Access(AccessKind::Open(_))) {
                    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
        .unwrap();
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .unwrap();
        OpenCounter {
            count,
            _watcher: watcher,
        }
    }

    fn get(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A snapshot of the agent process.
#[derive(Debug)]
struct ProcSnap {
    rss_kb: u64,
    hwm_kb: u64,
    threads: u64,
    fds: usize,
    names: BTreeMap<String, usize>,
}

impl ProcSnap {
    fn take(pid: u32) -> ProcSnap {
        ProcSnap {
            rss_kb: status_field(pid, "VmRSS").unwrap_or(0),
            hwm_kb: status_field(pid, "VmHWM").unwrap_or(0),
            threads: status_field(pid, "Threads").unwrap_or(0),
            fds: settled_fds(pid),
            names: thread_names(pid),
        }
    }

    fn line(&self) -> String {
        format!(
            "VmRSS {:.1} MiB, VmHWM {:.1} MiB, threads {}, fds {}",
            self.rss_kb as f64 / 1024.0,
            self.hwm_kb as f64 / 1024.0,
            self.threads,
            self.fds
        )
    }

    fn names_line(&self) -> String {
        self.names
            .iter()
            .map(|(n, c)| format!("{n}×{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Resident memory (kB) of all processes of one pod (libvirtd, QEMU, virtlogd).
fn pod_rss_kb(pod: &Pod) -> u64 {
    pod.daemon
        .processes()
        .into_iter()
        .filter_map(|pid| status_field(pid, "VmRSS"))
        .sum()
}

// ---------------------------------------------------------------------------------------------
// What the agent exported

/// `(namespace, name)` of the request's series of the metric, and whether one is duplicated.
fn exported(r: &Recorded) -> (BTreeSet<(String, String)>, bool) {
    let series = r.series(METRIC);
    let set: BTreeSet<(String, String)> = series
        .iter()
        .map(|s| {
            (
                s.attr("namespace").unwrap_or("").to_string(),
                s.attr("name").unwrap_or("").to_string(),
            )
        })
        .collect();
    let dup = set.len() != series.len();
    (set, dup)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

// ---------------------------------------------------------------------------------------------
// Setup

fn write_config(ws: &Workspace, node: &str, kubelet_root: &Path, rx: &Receiver) -> String {
    let config = ws.path().join(format!("agent-{node}.yaml"));
    let yaml = format!(
        "libvirt:\n  uris: []\n{discover}\
         export:\n  exporter: otlp\n  protocol: grpc\n  endpoint: {endpoint}\n  interval: 30s\n  \
         debounce: 250ms\n",
        discover = common::session::discover_yaml(kubelet_root),
        endpoint = rx.grpc_endpoint(),
    );
    std::fs::write(&config, yaml).unwrap();
    config.to_string_lossy().into_owned()
}

fn spawn_agent(ws: &Workspace, node: &str, kubelet_root: &Path, rx: &Receiver) -> Agent {
    let config = write_config(ws, node, kubelet_root, rx);
    let log = std::env::var("VHA_AGENT_RUST_LOG").unwrap_or_else(|_| "info".to_string());
    Agent::spawn(
        &["run", "--config", &config],
        &[("NODE_NAME", node), ("RUST_LOG", &log)],
    )
    .expect("spawn the agent")
}

fn start_paused(pod: &Pod, vmi: &Vmi) -> anyhow::Result<()> {
    pod.daemon
        .virsh(&["start", "--paused", &vmi.domain_name()])
        .map(|_| ())
}

/// One pod started, or why not.
/// Start `n` pods, `START_WORKERS` at a time, each with one paused VMI `kv-sNN/vmi-sNN`, published
/// under `kubelet_root`. In index order.
fn start_pods(ws: &Workspace, kubelet_root: &Path, n: usize) -> Vec<(Pod, Vmi)> {
    start_all(n, START_WORKERS, |i| {
        let tag = format!("s{i:02}");
        let pod = Pod::start(ws, kubelet_root, &tag)?;
        let vmi = Vmi::new(&format!("kv-{tag}"), &format!("vmi-{tag}"));
        pod.daemon.define(&vmi)?;
        start_paused(&pod, &vmi)?;
        pod.publish()?;
        Ok((pod, vmi))
    })
}

/// A stride coprime with `n`, so that consecutive transitions hit different pods and all are hit.
fn stride_for(n: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    [7, 11, 13, 17, 19, 23, 1]
        .into_iter()
        .find(|s| n <= 1 || (*s < n && gcd(*s, n) == 1))
        .unwrap_or(1)
}

/// Wait for the first request of `NODE` since `since` whose series set is exactly `want`.
fn wait_exact(
    rx: &Receiver,
    agent: &mut Agent,
    what: &str,
    since: Instant,
    timeout: Duration,
    want: &BTreeSet<(String, String)>,
) -> Recorded {
    let deadline = Instant::now() + timeout;
    loop {
        let slice = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(500));
        match rx.wait_for_request(since, slice, |r| {
            r.has_metrics_from(NODE) && exported(r).0 == *want
        }) {
            Ok(obs) => return obs.request,
            Err(e) => {
                if let Err(dead) = agent.check_running() {
                    panic!("{what}: {dead:#}");
                }
                if Instant::now() >= deadline {
                    let current = rx
                        .requests()
                        .into_iter()
                        .rev()
                        .find(|r| r.has_metrics_from(NODE))
                        .map(|r| format!("#{}: {} series", r.seq, r.series(METRIC).len()))
                        .unwrap_or_else(|| "(nothing yet)".into());
                    panic!("{what}: not seen within {timeout:?}: {e:#}\ncurrent: {current}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "benchmark: 50 session daemons; run with --ignored"]
fn kubevirt_scale_50_pods_one_event_loop() {
    if !require_session_daemons("kubevirt_scale_50_pods_one_event_loop") {
        return;
    }
    let mut report = String::new();
    let wanted = env_usize("VHA_SCALE_PODS", DEFAULT_PODS);
    let cycles = env_usize("VHA_SCALE_CYCLES", DEFAULT_CYCLES);
    let avail_mb = meminfo_mb("MemAvailable");
    let fit = (avail_mb.saturating_sub(RESERVE_MB) / POD_BUDGET_MB) as usize;
    let n = wanted.min(fit);
    assert!(n >= 2, "only {avail_mb} MB available: {n} pods fit");
    note!(report,
        "memory: MemTotal {} MB, MemAvailable {avail_mb} MB before start; budget {POD_BUDGET_MB} MB/pod \
         + {RESERVE_MB} MB reserve -> {fit} pods fit; wanted {wanted}, using {n}",
        meminfo_mb("MemTotal")
    );

    let ws = Workspace::new().expect("workspace");
    let root = ws.kubelet_root(NODE).expect("kubelet root");
    let empty_root = ws.kubelet_root(EMPTY_NODE).expect("empty kubelet root");
    let rx = Receiver::start().expect("start the OTLP receiver");
    let ticks = clock_ticks_per_sec();

    // Baseline: the same agent with discovery on an empty kubelet root (0 connections).
    let baseline = {
        let mut agent = spawn_agent(&ws, EMPTY_NODE, &empty_root, &rx);
        rx.wait_for_request(agent.started(), Duration::from_secs(30), |r| {
            r.has_metrics_from(EMPTY_NODE)
        })
        .unwrap_or_else(|e| panic!("baseline agent: no export: {e:#}\n{}", agent.log_tail(30)));
        std::thread::sleep(Duration::from_secs(1));
        let snap = ProcSnap::take(agent.pid());
        let status = agent.terminate(Duration::from_secs(5)).unwrap();
        assert!(status.success(), "baseline agent exit status {status}");
        snap
    };
    note!(report, "agent, 0 connections: {}", baseline.line());
    note!(report, "  threads: {}", baseline.names_line());

    // N pods, each with one paused VMI, before the agent starts.
    let t = Instant::now();
    let pods = start_pods(&ws, &root, n);
    let setup = t.elapsed();
    note!(report,
        "setup: {n} pods (daemon + define + start --paused + publish), {START_WORKERS} at a time: {:.1} s \
         (not the agent); one pod's processes (libvirtd, qemu, virtlogd) RSS {:.1} MiB; MemAvailable \
         now {} MB",
        setup.as_secs_f64(),
        pod_rss_kb(&pods[0].0) as f64 / 1024.0,
        meminfo_mb("MemAvailable")
    );
    let mut current: BTreeSet<(String, String)> = pods.iter().map(|(_, v)| v.key()).collect();
    assert_eq!(current.len(), n);

    let mut agent = spawn_agent(&ws, NODE, &root, &rx);
    let pid = agent.pid();
    let spawned = agent.started();
    let r = wait_exact(
        &rx,
        &mut agent,
        "startup: all VMIs exported",
        spawned,
        STARTUP_TIMEOUT,
        &current,
    );
    let startup = r.at - spawned;
    assert!(!exported(&r).1, "duplicate series at startup");
    note!(
        report,
        "startup: agent spawn -> first request with all {n} VMIs: {:.0} ms (request #{})",
        startup.as_secs_f64() * 1000.0,
        r.seq
    );
    // Every connection is up (self-metric), in the latest request.
    let wait_up = Instant::now();
    let up_ok = rx.wait_for_request(spawned, Duration::from_secs(30), |r| {
        r.has_metrics_from(NODE)
            && r.series(UP)
                .iter()
                .filter(|s| s.value.as_f64() == 1.0)
                .count()
                == n
    });
    assert!(
        up_ok.is_ok(),
        "not all {n} connections up: {}\n{}",
        wait_up.elapsed().as_secs_f64(),
        rx.requests()
            .into_iter()
            .rev()
            .find(|r| r.has_metrics_from(NODE))
            .map(|r| describe(&r.series(UP)))
            .unwrap_or_default()
    );

    // Settled state with N connections.
    std::thread::sleep(Duration::from_secs(2));
    let loaded = ProcSnap::take(pid);
    note!(report, "agent, {n} connections: {}", loaded.line());
    note!(report, "  threads: {}", loaded.names_line());
    note!(
        report,
        "  delta vs 0 connections: RSS {:+.1} MiB ({:+.0} KiB/connection), threads {:+}, fds {:+}",
        (loaded.rss_kb as f64 - baseline.rss_kb as f64) / 1024.0,
        (loaded.rss_kb as f64 - baseline.rss_kb as f64) / n as f64,
        loaded.threads as i64 - baseline.threads as i64,
        loaded.fds as i64 - baseline.fds as i64
    );
    let loops = loaded.names.get("libvirt-events").copied().unwrap_or(0);
    assert_eq!(
        loops, 1,
        "expected exactly one libvirt-events thread: {:?}",
        loaded.names
    );
    note!(
        report,
        "libvirt-events threads with {n} connections: {loops}"
    );

    // Idle cost with N connections.
    let opens = OpenCounter::watch(&root.join("pods"));
    std::thread::sleep(Duration::from_millis(200));
    let o0 = opens.get();
    let c0 = cpu_ticks(pid);
    let t0 = thread_cpu_ns(pid);
    let idle_from = Instant::now();
    std::thread::sleep(IDLE_WINDOW);
    let idle_cpu = (cpu_ticks(pid) - c0) as f64 / ticks;
    let idle_rate = idle_cpu / idle_from.elapsed().as_secs_f64();
    let idle_threads = cpu_by_thread(&t0, &thread_cpu_ns(pid));
    let idle_opens = opens.get() - o0;
    let idle_threads_count = status_field(pid, "Threads").unwrap_or(0);
    let idle_requests = rx.requests_since(idle_from).len();
    note!(report,
        "idle {:.0} s with {n} connections: agent CPU {:.2} s ({:.1} ms/s), {idle_requests} export request(s)",
        IDLE_WINDOW.as_secs_f64(),
        idle_cpu,
        idle_cpu * 1000.0 / IDLE_WINDOW.as_secs_f64()
    );
    note!(report, "  idle CPU by thread (schedstat): {idle_threads}");
    note!(
        report,
        "  idle: kubelet pods/ dir opened {idle_opens} times ({:.1}/s; a discovery scan opens it once \
         per glob); threads at the end {idle_threads_count}",
        idle_opens as f64 / IDLE_WINDOW.as_secs_f64()
    );

    // Transitions: destroy then start --paused, over pods picked with a stride.
    let stride = stride_for(n);
    let mut latencies: Vec<f64> = Vec::new();
    let mut virsh_ms: Vec<f64> = Vec::new();
    let mut per_pod: BTreeMap<usize, usize> = BTreeMap::new();
    let requests_before = rx.request_count();
    let cpu_before = cpu_ticks(pid);
    let threads_before = thread_cpu_ns(pid);
    let opens_before = opens.get();
    let loop_started = Instant::now();
    for c in 0..cycles {
        let i = (c * stride) % n;
        let (pod, vmi) = &pods[i];
        *per_pod.entry(i).or_insert(0) += 2;
        for stop in [true, false] {
            let what = format!(
                "transition {}: {} {}",
                latencies.len() + 1,
                if stop { "destroy" } else { "start --paused" },
                vmi.domain_name()
            );
            let began = Instant::now();
            let result = if stop {
                pod.daemon.destroy_domain(vmi)
            } else {
                start_paused(pod, vmi)
            };
            let returned = Instant::now();
            if let Err(e) = result {
                panic!("{what}: {e:#}");
            }
            if stop {
                current.remove(&vmi.key());
            } else {
                current.insert(vmi.key());
            }
            let r = wait_exact(&rx, &mut agent, &what, began, TRANSITION_TIMEOUT, &current);
            assert!(!exported(&r).1, "{what}: duplicate series in #{}", r.seq);
            latencies.push(signed_ms(r.at, returned));
            virsh_ms.push((returned - began).as_secs_f64() * 1000.0);
        }
    }
    let loop_time = loop_started.elapsed();
    let cpu_transitions = (cpu_ticks(pid) - cpu_before) as f64 / ticks;
    let transition_threads = cpu_by_thread(&threads_before, &thread_cpu_ns(pid));
    let transition_opens = opens.get() - opens_before;
    let requests = rx.request_count() - requests_before;
    let count = latencies.len();

    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    let mut vs = virsh_ms.clone();
    vs.sort_by(f64::total_cmp);
    let negative = latencies.iter().filter(|v| **v <= 0.0).count();
    note!(report,
        "transitions: {count} ({cycles} × destroy + start --paused) over {} pods (stride {stride}), \
         sequential, each waited for at the receiver; {:.1} s in all, {requests} export requests",
        per_pod.len(),
        loop_time.as_secs_f64()
    );
    note!(report,
        "  latency virsh return -> receiver: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms, \
         min {:.1} ms, mean {:.1} ms; {negative} ≤ 0 (pushed before virsh returned)",
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.90),
        percentile(&sorted, 0.99),
        sorted[count - 1],
        sorted[0],
        latencies.iter().sum::<f64>() / count as f64
    );
    note!(
        report,
        "  virsh command itself: p50 {:.0} ms, p99 {:.0} ms",
        percentile(&vs, 0.50),
        percentile(&vs, 0.99)
    );
    note!(
        report,
        "  agent CPU during transitions: {cpu_transitions:.2} s over {:.1} s = {:.1} ms/transition \
         gross; minus the idle rate ({:.1} ms/s) over that time: {:.1} ms/transition net",
        loop_time.as_secs_f64(),
        cpu_transitions * 1000.0 / count as f64,
        idle_rate * 1000.0,
        (cpu_transitions - idle_rate * loop_time.as_secs_f64()) * 1000.0 / count as f64
    );
    note!(
        report,
        "  CPU by thread during transitions (schedstat): {transition_threads}"
    );
    note!(
        report,
        "  kubelet pods/ dir opened {transition_opens} times during transitions ({:.1}/s)",
        transition_opens as f64 / loop_time.as_secs_f64()
    );
    let after = ProcSnap::take(pid);
    note!(report, "agent after transitions: {}", after.line());
    let loops_after = after.names.get("libvirt-events").copied().unwrap_or(0);
    assert_eq!(loops_after, 1, "libvirt-events threads: {:?}", after.names);
    let total_cpu = cpu_ticks(pid) as f64 / ticks;
    note!(
        report,
        "agent CPU since spawn: {total_cpu:.2} s over {:.0} s",
        spawned.elapsed().as_secs_f64()
    );

    let status = agent.terminate(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "agent exit status {status}");
    eprintln!("\n==== KubeVirt scale benchmark ({n} pods) ====\n{report}====");
    if let Ok(path) = std::env::var("VHA_SCALE_REPORT") {
        let _ = std::fs::write(path, &report);
    }
}
