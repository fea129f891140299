//! Reliability, end to end: the agent binary against private libvirt *session* daemons that the tests
//! crash, restart and hang (never the shared system daemon), exporting over gRPC to the in-process
//! OTLP receiver, which is also taken down. Every assertion is on what the receiver decoded; the
//! truth is what `virsh` says (`virsh list` plus each domain's live XML).
//!
//! Scenarios (README "Failure behaviour"), each printing what it measured:
//! - `restart_under_churn`: a daemon killed (SIGKILL / SIGTERM, alternately) and restarted 6 times
//!   while domains start and stop around it; after each reconnect the series equal the truth within
//!   2 s; `connection_up` goes 0 then 1; `reconnects` counts every restart.
//! - `hung_daemon`: a daemon SIGSTOPped beyond the keepalive window is marked down, while transitions
//!   on another daemon still arrive within 2 s; SIGCONT → reconnect and exact series.
//! - `collector_outage`: the receiver is down for 60 s while transitions continue; the agent stays up,
//!   its RSS grows < 5 MiB, the series are right within one export interval (+2 s) after it
//!   returns, and it logged at most one warning a minute meanwhile.
//! - `churn_oracle`: a seeded random driver (`VHA_CHURN_SEED`) runs > 300 operations over two session
//!   daemons (plus KVM domains on the system daemon when KVM works) with daemon restarts; at every
//!   one of > 20 quiescent checkpoints the exported series equal the truth exactly.
//! - `reload_under_churn`: the agent runs from a config file that SIGHUP reloads during churn over
//!   three daemons, alternately removing and re-adding a daemon's URI and changing the export timing
//!   (once an invalid file, refused); at every checkpoint the series equal the truth of the daemons
//!   in the applied configuration, a removed daemon's series got staleness markers, same process.
//! - `undefine_running_domain_stays_exported`: a running domain that is undefined (now transient,
//!   still running) stays exported.
//! - `no_leaks`: 200 start/stop cycles leave the agent's fds and threads at baseline (+2) and its RSS
//!   within 8 MiB.
//!
//! Session daemons come from [`common::session`] (root, `libvirtd`, QEMU, the `vha-launcher` user);
//! without them the tests skip with a printed reason, or fail when `VHA_E2E_REQUIRED=1`. Measured
//! numbers are appended to `$VHA_E2E_REPORT` when set.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::libvirt::{kvm_available, libvirtd_available, unique_base, unique_uid, Virt};
use common::receiver::{Observation, Receiver, Series};
use common::reliability::{
    conn_value, define, describe_keys, keys, proc_stats, qemu_pid, signal, truth_of, truth_of_some,
    Key, ProcStats, Rng,
};
use common::session::{require_session_daemons, SessionDaemon, Workspace};
use common::{wait_until, Agent, METRIC, RECONNECTS, UP};

const EVENTS: &str = "virt_hypervisor_agent_lifecycle_events";
const NODE: &str = "reliability-node";
/// The promise after a reconnect, and for a transition on a healthy connection.
const SETTLE_BOUND: Duration = Duration::from_secs(2);
/// Default seed of the churn oracle (`VHA_CHURN_SEED` overrides it).
const DEFAULT_SEED: u64 = 0x5eed_0004;

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

/// Keepalive 1 s × 2 and reconnect backoff 200 ms → 2 s for every scenario; `sets` adds more.
fn spawn_agent(rx: &Receiver, uris: &[String], sets: &[&str]) -> Agent {
    let endpoint = rx.grpc_endpoint();
    let mut args: Vec<&str> = vec![
        "run",
        "--node-name",
        NODE,
        "--protocol",
        "grpc",
        "--endpoint",
        &endpoint,
        "--log-level",
        "info",
    ];
    for uri in uris {
        args.extend(["--uri", uri]);
    }
    let base = [
        "libvirt.keepalive_interval=1s",
        "libvirt.keepalive_count=2",
        "libvirt.reconnect.initial_backoff=200ms",
        "libvirt.reconnect.max_backoff=2s",
        "export.debounce=250ms",
    ];
    for s in base.iter().chain(sets) {
        args.extend(["--set", s]);
    }
    // An empty RUST_LOG keeps the agent's own filter (SDK internals at warn), as in production.
    Agent::spawn(&args, &[("RUST_LOG", "")]).expect("spawn the agent")
}

/// Measured numbers of one scenario: printed at the end (also when it fails half-way) and appended
/// to `$VHA_E2E_REPORT`.
struct Report {
    test: &'static str,
    started: Instant,
    lines: Vec<String>,
}

impl Report {
    fn new(test: &'static str) -> Report {
        Report {
            test,
            started: Instant::now(),
            lines: Vec::new(),
        }
    }

    fn line(&mut self, line: String) {
        eprintln!("[{}] {line}", self.test);
        self.lines.push(line);
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        let mut out = format!(
            "reliability {} ({}; {:.1} s):\n",
            self.test,
            if std::thread::panicking() {
                "FAILED"
            } else {
                "passed"
            },
            self.started.elapsed().as_secs_f64()
        );
        for l in &self.lines {
            let _ = writeln!(out, "  {l}");
        }
        eprintln!("\n{out}");
        if let Ok(path) = std::env::var("VHA_E2E_REPORT") {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = f.write_all(out.as_bytes());
            }
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// min / median / max of a list of durations.
fn spread(ds: &[Duration]) -> String {
    if ds.is_empty() {
        return "-".to_string();
    }
    let mut v = ds.to_vec();
    v.sort();
    format!(
        "min {} / median {} / max {} (n={})",
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1]),
        v.len()
    )
}

/// The seed: `VHA_CHURN_SEED` (decimal or 0x-hex) or the default.
fn seed() -> u64 {
    match std::env::var("VHA_CHURN_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("VHA_CHURN_SEED={s:?}: {e}"))
        }
        Err(_) => DEFAULT_SEED,
    }
}

/// Prints the seed and the last operations when the test panics.
struct SeedGuard<'a> {
    test: &'static str,
    seed: u64,
    ops: &'a Mutex<Vec<String>>,
}

impl Drop for SeedGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
            let tail = &ops[ops.len().saturating_sub(40)..];
            eprintln!(
                "[{}] FAILED with seed {:#x}: rerun with VHA_CHURN_SEED={:#x}\nlast operations:\n  {}",
                self.test,
                self.seed,
                self.seed,
                tail.join("\n  ")
            );
        }
    }
}

/// Wait for the first request after `since` whose series (kept by `mine`) equal `truth`; on timeout,
/// panic with both sides and the agent's log.
fn wait_truth(
    rx: &Receiver,
    agent: &mut Agent,
    since: Instant,
    timeout: Duration,
    truth: &[Key],
    mine: impl Fn(&Series) -> bool,
    what: &str,
) -> Observation {
    let result = rx.wait_for_series(since, timeout, METRIC, |s| {
        let own: Vec<Series> = s.iter().filter(|x| mine(x)).cloned().collect();
        keys(&own) == truth
    });
    match result {
        Ok(obs) => {
            for s in obs.series.iter().filter(|x| mine(x)) {
                assert_eq!(s.attr("node"), Some(NODE), "{what}: node of {s}");
                assert_eq!(s.value.as_f64(), 1.0, "{what}: value of {s}");
            }
            obs
        }
        Err(e) => {
            let latest: Vec<Series> = rx
                .latest_series(METRIC)
                .unwrap_or_default()
                .into_iter()
                .filter(|x| mine(x))
                .collect();
            let alive = match agent.check_running() {
                Ok(()) => "the agent is still running".to_string(),
                Err(e) => format!("{e:#}"),
            };
            panic!(
                "{what}: the exported series did not equal the truth within {timeout:?}\n\
                 truth (virsh):\n{}\nlatest export:\n{}\n{e:#}\n{alive}",
                describe_keys(truth),
                describe_keys(&keys(&latest))
            );
        }
    }
}

/// Lines of the agent's log that contain every needle.
fn log_count(agent: &Agent, needles: &[&str]) -> usize {
    agent
        .log()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

/// Wait until the agent's log has at least `count` lines with every needle; the instant it did.
fn wait_log(
    agent: &Agent,
    needles: &[&str],
    count: usize,
    timeout: Duration,
    what: &str,
) -> Instant {
    wait_until(timeout, || log_count(agent, needles) >= count).unwrap_or_else(|e| {
        panic!(
            "{what}: {e} (wanted {count} log line(s) with {needles:?})\nagent log:\n{}",
            agent.log_tail(60)
        )
    });
    Instant::now()
}

/// Wait until the agent's log has at least `count` lines with `needle` (as [`wait_log`]); the last
/// of them.
fn wait_last_log_line(
    agent: &Agent,
    needle: &str,
    count: usize,
    timeout: Duration,
    what: &str,
) -> String {
    wait_log(agent, &[needle], count, timeout, what);
    agent
        .log()
        .lines()
        .rfind(|l| l.contains(needle))
        .unwrap()
        .to_string()
}

/// A domain of a pool: plain (`<base>-<tag>`) or KubeVirt-named (`<base>-<tag>_vm`, with or without
/// KubeVirt metadata).
#[derive(Clone, Debug)]
struct PoolDom {
    name: String,
    /// Named `<ns>_<vmi>` (metadata decides whether it is exported as a VMI).
    kubevirt_name: bool,
    /// KubeVirt `<uid>` (metadata).
    uid: String,
    /// Domain UUID (used by the churn oracle's redefinitions).
    uuid: String,
    virt: Virt,
}

impl PoolDom {
    fn new(base: &str, tag: &str, kubevirt_name: bool, virt: Virt) -> PoolDom {
        PoolDom {
            name: if kubevirt_name {
                format!("{base}-{tag}_vm")
            } else {
                format!("{base}-{tag}")
            },
            kubevirt_name,
            uid: unique_uid(),
            uuid: unique_uid(),
            virt,
        }
    }

    fn define_on(&self, d: &SessionDaemon, metadata: bool) {
        define(
            d,
            &self.name,
            self.virt,
            (self.kubevirt_name && metadata).then_some(self.uid.as_str()),
            Some(&self.uuid),
        )
        .unwrap_or_else(|e| panic!("define {}: {e:#}", self.name));
    }
}

fn virsh_ok(d: &SessionDaemon, args: &[&str]) {
    d.virsh(args)
        .unwrap_or_else(|e| panic!("{e:#}\ndaemon log tail:\n{}", d.log_tail(20)));
}

// ---------------------------------------------------------------------------------------------
// 1. libvirtd restart under churn
// ---------------------------------------------------------------------------------------------

#[test]
fn restart_under_churn() {
    const TEST: &str = "restart_under_churn";
    if !require_session_daemons(TEST) {
        return;
    }
    const CYCLES: u32 = 6;
    let mut report = Report::new(TEST);
    let seed_value = seed();
    let seed = seed_value ^ 0x1;
    let ops = Mutex::new(Vec::new());
    let _guard = SeedGuard {
        test: TEST,
        seed: seed_value,
        ops: &ops,
    };
    let mut rng = Rng::new(seed);
    let log_op = |s: String| ops.lock().unwrap().push(s);

    let ws = Workspace::new().expect("workspace for the session daemons");
    let mut d = SessionDaemon::start(ws.path().join("restart")).expect("start the session daemon");
    let uri = d.uri();
    let base = unique_base();
    let pool: Vec<PoolDom> = (0..6)
        .map(|i| PoolDom::new(&base, &format!("r{i}"), i % 2 == 1, Virt::Qemu))
        .collect();
    for p in &pool {
        p.define_on(&d, true);
    }
    for p in &pool[..3] {
        virsh_ok(&d, &["start", "--paused", &p.name]);
    }
    let rx = Receiver::start().expect("start the OTLP receiver");
    // A 1 s export interval, so that connection_up = 0 is exported while the daemon is down.
    let mut agent = spawn_agent(&rx, std::slice::from_ref(&uri), &["export.interval=1s"]);
    let spawned = agent.started();
    let truth = truth_of(|a| d.virsh(a)).unwrap();
    let obs = wait_truth(
        &rx,
        &mut agent,
        spawned,
        Duration::from_secs(20),
        &truth,
        |_| true,
        "initial sync",
    );
    report.line(format!(
        "initial sync: {} domains exported {} after the agent started",
        truth.len(),
        ms(obs.latency)
    ));

    let active = |d: &SessionDaemon| d.active_domains().unwrap();
    // Start an inactive pool domain or stop an active one, chosen by the seeded RNG.
    let toggle = |d: &SessionDaemon, rng: &mut Rng, log_op: &dyn Fn(String)| {
        let p = &pool[rng.below(pool.len())];
        let is_active = d.active_domains().unwrap().contains(&p.name);
        let args: Vec<&str> = if is_active {
            match rng.below(3) {
                0 => vec!["suspend", &p.name],
                1 => vec!["resume", &p.name],
                _ => vec!["destroy", &p.name],
            }
        } else if rng.chance(50) {
            vec!["start", "--paused", &p.name]
        } else {
            vec!["start", &p.name]
        };
        // suspend of a paused domain and resume of a running one fail: harmless, not counted.
        let r = d.virsh(&args);
        log_op(format!("{} -> {}", args.join(" "), r.is_ok()));
    };

    let mut detect = Vec::new();
    let mut back_to_reconnect = Vec::new();
    let mut settle = Vec::new();
    let mut daemon_back_to_truth = Vec::new();
    for cycle in 1..=CYCLES {
        // Churn while the daemon is up.
        for _ in 0..3 {
            toggle(&d, &mut rng, &log_op);
        }
        // One more transition, then the daemon dies right away: its event may never be delivered.
        toggle(&d, &mut rng, &log_op);
        let how = if cycle % 2 == 1 { "SIGKILL" } else { "SIGTERM" };
        let killed_at = Instant::now();
        if cycle % 2 == 1 {
            d.kill().unwrap();
        } else {
            d.stop().unwrap();
        }
        log_op(format!("cycle {cycle}: daemon stopped with {how}"));
        // Down: the close callback marks the connection down and an export says so.
        let down = rx
            .wait_for_request(killed_at, Duration::from_secs(5), |r| {
                conn_value(r, UP, &uri) == Some(0.0)
            })
            .unwrap_or_else(|e| {
                panic!(
                    "cycle {cycle}: connection_up never 0 after {how}: {e:#}\n{}",
                    agent.log_tail(40)
                )
            });
        detect.push(down.latency);
        // While the daemon is down, a VM dies (its QEMU is killed): only the resync can notice.
        if cycle % 2 == 0 {
            if let Some((name, pid)) = pool
                .iter()
                .find_map(|p| qemu_pid(&d, &p.name).map(|pid| (p.name.clone(), pid)))
            {
                signal(pid, "KILL").unwrap();
                log_op(format!(
                    "cycle {cycle}: killed the QEMU of {name} while the daemon was down"
                ));
            }
        }
        d.restart().expect("restart the session daemon");
        // Answering: RPCs served, not just the socket accepting (driver start-up comes after).
        wait_until(Duration::from_secs(20), || {
            d.virsh(&["list", "--name"]).is_ok()
        })
        .expect("the restarted daemon answers virsh");
        let back = Instant::now();
        // Right after the daemon is back (the agent is likely still in its backoff): a domain
        // starts, another stops.
        let now_active = active(&d);
        if let Some(p) = pool.iter().find(|p| !now_active.contains(&p.name)) {
            virsh_ok(&d, &["start", "--paused", &p.name]);
            log_op(format!(
                "cycle {cycle}: start --paused {} right after the restart",
                p.name
            ));
        }
        if cycle % 3 == 0 {
            if let Some(name) = now_active.first() {
                virsh_ok(&d, &["destroy", name]);
                log_op(format!(
                    "cycle {cycle}: destroy {name} right after the restart"
                ));
            }
        }
        let ops_done = Instant::now();
        let reconnected = wait_log(
            &agent,
            &["libvirt connection re-established", &uri],
            cycle as usize,
            Duration::from_secs(10),
            &format!("cycle {cycle}: reconnect"),
        );
        back_to_reconnect.push(reconnected.saturating_duration_since(back));
        let truth = truth_of(|a| d.virsh(a)).unwrap();
        let since = reconnected.max(ops_done);
        let obs = wait_truth(
            &rx,
            &mut agent,
            since,
            Duration::from_secs(10),
            &truth,
            |_| true,
            &format!("cycle {cycle} ({how})"),
        );
        assert!(
            obs.latency <= SETTLE_BOUND,
            "cycle {cycle}: the series equalled the truth only {:?} after the reconnect (bound {SETTLE_BOUND:?})",
            obs.latency
        );
        assert_eq!(
            conn_value(&obs.request, UP, &uri),
            Some(1.0),
            "cycle {cycle}: connection_up once the series are right again"
        );
        assert_eq!(
            conn_value(&obs.request, RECONNECTS, &uri),
            Some(f64::from(cycle)),
            "cycle {cycle}: reconnects counter"
        );
        settle.push(obs.latency);
        let from_back = obs.request.at.saturating_duration_since(back);
        // The agent may sit in its backoff when the daemon returns: at most max_backoff (2 s)
        // doubled by jitter, then the resync.
        assert!(
            from_back <= Duration::from_secs(6),
            "cycle {cycle}: series right only {from_back:?} after the daemon answered again"
        );
        daemon_back_to_truth.push(from_back);
        log_op(format!(
            "cycle {cycle}: {} domains, right {} after the reconnect",
            truth.len(),
            ms(obs.latency)
        ));
    }
    agent.check_running().unwrap();
    let warnings = log_count(&agent, &["libvirt connection lost"]);
    let all_warnings = log_count(&agent, &[" WARN ", &uri]);
    report.line(format!(
        "{CYCLES} restarts (SIGKILL and SIGTERM alternately), {} operations",
        ops.lock().unwrap().len()
    ));
    report.line(format!(
        "kill -> connection_up 0 exported: {}",
        spread(&detect)
    ));
    report.line(format!(
        "daemon answering -> agent reconnected: {}",
        spread(&back_to_reconnect)
    ));
    report.line(format!(
        "reconnect (or last operation) -> series equal virsh: {}",
        spread(&settle)
    ));
    report.line(format!(
        "daemon answering -> series equal virsh: {}",
        spread(&daemon_back_to_truth)
    ));
    report.line(format!(
        "'connection lost' warnings logged: {warnings} (one per outage expected)"
    ));
    report.line(format!(
        "warnings about the connection: {all_warnings} in {CYCLES} outages (one per outage, not one per retry)"
    ));
    assert_eq!(
        warnings, CYCLES as usize,
        "one 'connection lost' warning per outage"
    );
    assert!(
        all_warnings <= 2 * CYCLES as usize,
        "at most 'lost' and 'unavailable' once per outage; got {all_warnings} warnings:\n{}",
        agent
            .log()
            .lines()
            .filter(|l| l.contains(" WARN "))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Hung daemon
// ---------------------------------------------------------------------------------------------

#[test]
fn hung_daemon() {
    const TEST: &str = "hung_daemon";
    if !require_session_daemons(TEST) {
        return;
    }
    let mut report = Report::new(TEST);
    let ws = Workspace::new().expect("workspace for the session daemons");
    let mut a = SessionDaemon::start(ws.path().join("hung-a")).expect("start daemon A");
    let b = SessionDaemon::start(ws.path().join("hung-b")).expect("start daemon B");
    let (ua, ub) = (a.uri(), b.uri());
    let base = unique_base();
    let a1 = PoolDom::new(&base, "a1", false, Virt::Qemu);
    let a2 = PoolDom::new(&base, "a2", true, Virt::Qemu);
    let a3 = PoolDom::new(&base, "a3", false, Virt::Qemu);
    let b1 = PoolDom::new(&base, "b1", false, Virt::Qemu);
    let b2 = PoolDom::new(&base, "b2", true, Virt::Qemu);
    let b3 = PoolDom::new(&base, "b3", false, Virt::Qemu);
    for p in [&a1, &a2, &a3] {
        p.define_on(&a, true);
    }
    for p in [&b1, &b2, &b3] {
        p.define_on(&b, true);
    }
    virsh_ok(&a, &["start", "--paused", &a1.name]);
    virsh_ok(&b, &["start", "--paused", &b1.name]);
    let rx = Receiver::start().expect("start the OTLP receiver");
    // A 20 s export interval: a change arriving within 2 s was pushed, not collected periodically.
    let mut agent = spawn_agent(
        &rx,
        &[ua.clone(), ub.clone()],
        &["export.interval=20s", "libvirt.fetch_timeout=2s"],
    );
    let spawned = agent.started();
    let truth_all = |a: &SessionDaemon, b: &SessionDaemon| {
        let mut t = truth_of(|x| a.virsh(x)).unwrap();
        t.extend(truth_of(|x| b.virsh(x)).unwrap());
        t.sort();
        t
    };
    let truth = truth_all(&a, &b);
    wait_truth(
        &rx,
        &mut agent,
        spawned,
        Duration::from_secs(20),
        &truth,
        |_| true,
        "initial sync",
    );
    let exported = |s: &[Series], name: &str| s.iter().any(|x| x.attr("name") == Some(name));
    let key_b2 = Key {
        namespace: Some(b2.name.split_once('_').unwrap().0.to_string()),
        name: "vm".to_string(),
        hypervisor_type: "qemu-tcg".to_string(),
    };
    let has_key = |s: &[Series], k: &Key| keys(s).contains(k);

    let before_hang = proc_stats(agent.pid()).unwrap();
    // Hang A just after a domain started on it: the agent's XML fetch may be in flight.
    virsh_ok(&a, &["start", "--paused", &a3.name]);
    a.freeze().unwrap();
    let stopped_at = Instant::now();

    // Before keepalive noticed anything: a transition on B.
    virsh_ok(&b, &["start", "--paused", &b2.name]);
    let t = Instant::now();
    let obs = rx
        .wait_for_series(t, Duration::from_secs(10), METRIC, |s| {
            has_key(s, &key_b2) && exported(s, &a1.name)
        })
        .unwrap_or_else(|e| panic!("start on B while A hangs: {e:#}\n{}", agent.log_tail(40)));
    report.line(format!(
        "A stopped; start on B {} ms later reached the receiver in {}",
        t.duration_since(stopped_at).as_millis(),
        ms(obs.latency)
    ));
    assert!(
        obs.latency <= SETTLE_BOUND,
        "a start on B took {:?} while A hangs",
        obs.latency
    );

    // Keepalive (1 s × 2) declares A dead.
    let lost = wait_log(
        &agent,
        &["libvirt connection lost", &ua],
        1,
        Duration::from_secs(15),
        "keepalive detection of the hung daemon",
    );
    let detection = lost.duration_since(stopped_at);
    report.line(format!(
        "SIGSTOP -> connection declared lost (keepalive 1s x 2): {}",
        ms(detection)
    ));

    // After detection: a transition on B shows A down, A's domain still exported, b1 gone.
    virsh_ok(&b, &["destroy", &b1.name]);
    let t = Instant::now();
    let obs = rx
        .wait_for_request(t, Duration::from_secs(10), |r| {
            let s = r.series(METRIC);
            r.has_metrics() && !exported(&s, &b1.name) && has_key(&s, &key_b2)
        })
        .unwrap_or_else(|e| {
            panic!(
                "destroy on B after A was lost: {e:#}\n{}",
                agent.log_tail(40)
            )
        });
    report.line(format!(
        "destroy on B after A was declared lost: {}",
        ms(obs.latency)
    ));
    assert!(
        obs.latency <= SETTLE_BOUND,
        "destroy on B took {:?}",
        obs.latency
    );
    assert_eq!(
        conn_value(&obs.request, UP, &ua),
        Some(0.0),
        "connection_up of the hung daemon"
    );
    assert_eq!(
        conn_value(&obs.request, UP, &ub),
        Some(1.0),
        "connection_up of the healthy daemon"
    );
    assert!(
        exported(&obs.request.series(METRIC), &a1.name),
        "the hung daemon's domains stay exported while it is down"
    );

    // The agent now retries opening A (each attempt hangs until fetch_timeout): B must not care.
    wait_until(Duration::from_secs(6), || {
        stopped_at.elapsed() >= Duration::from_secs(9)
    })
    .ok();
    virsh_ok(&b, &["start", "--paused", &b3.name]);
    let t = Instant::now();
    let obs = rx
        .wait_for_series(t, Duration::from_secs(10), METRIC, |s| {
            exported(s, &b3.name)
        })
        .unwrap_or_else(|e| {
            panic!(
                "start on B while A is retried: {e:#}\n{}",
                agent.log_tail(40)
            )
        });
    report.line(format!(
        "start on B {:.1} s into the hang (reconnects to A pending): {}",
        t.duration_since(stopped_at).as_secs_f64(),
        ms(obs.latency)
    ));
    assert!(
        obs.latency <= SETTLE_BOUND,
        "start on B took {:?}",
        obs.latency
    );
    agent.check_running().unwrap();

    let during_hang = proc_stats(agent.pid()).unwrap();
    // SIGCONT: A comes back; the agent reconnects and resyncs.
    a.thaw().unwrap();
    let cont_at = Instant::now();
    let hung_for = cont_at.duration_since(stopped_at);
    let back = wait_log(
        &agent,
        &["libvirt connection re-established", &ua],
        1,
        Duration::from_secs(20),
        "reconnect after SIGCONT",
    );
    report.line(format!(
        "hung for {:.1} s; SIGCONT -> reconnected: {}",
        hung_for.as_secs_f64(),
        ms(back.duration_since(cont_at))
    ));
    // A transition on A proves its events flow again; then the series must be exact.
    virsh_ok(&a, &["start", "--paused", &a2.name]);
    let t = Instant::now();
    let truth = truth_all(&a, &b);
    let obs = wait_truth(
        &rx,
        &mut agent,
        t,
        Duration::from_secs(10),
        &truth,
        |_| true,
        "after SIGCONT",
    );
    report.line(format!(
        "start on A after recovery -> exact series ({} domains): {}",
        truth.len(),
        ms(obs.latency)
    ));
    assert!(
        obs.latency <= SETTLE_BOUND,
        "start on A after recovery took {:?}",
        obs.latency
    );
    assert_eq!(conn_value(&obs.request, UP, &ua), Some(1.0), "A up again");
    assert_eq!(
        conn_value(&obs.request, RECONNECTS, &ua),
        Some(1.0),
        "A reconnected once"
    );
    assert_eq!(
        conn_value(&obs.request, RECONNECTS, &ub),
        Some(0.0),
        "B never lost"
    );
    // Connection attempts abandoned during the hang finish after SIGCONT: their sockets close.
    let fds_back = wait_until(Duration::from_secs(15), || {
        proc_stats(agent.pid()).unwrap().fds <= before_hang.fds
    });
    let after = proc_stats(agent.pid()).unwrap();
    report.line(format!("agent before the hang: {before_hang}"));
    report.line(format!("agent during the hang: {during_hang}"));
    report.line(format!(
        "agent after recovery:  {after}{}",
        match &fds_back {
            Ok(d) => format!(" (fds back to the baseline {} after the reconnect)", ms(*d)),
            Err(_) => " (fds NOT back to the baseline)".to_string(),
        }
    ));
    // README: a reconnect attempt stuck on the hung daemon holds one thread, and no further
    // attempt starts until it returns (so at most one more socket).
    assert!(
        during_hang.fds <= before_hang.fds + 1,
        "open fds {} during the hang vs {} before: reconnect attempts pile up",
        during_hang.fds,
        before_hang.fds
    );
    assert!(
        after.fds <= before_hang.fds + 2,
        "open fds {} after the hang vs {} before",
        after.fds,
        before_hang.fds
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Collector outage
// ---------------------------------------------------------------------------------------------

#[test]
fn collector_outage() {
    const TEST: &str = "collector_outage";
    if !require_session_daemons(TEST) {
        return;
    }
    const OUTAGE: Duration = Duration::from_secs(62);
    const INTERVAL: Duration = Duration::from_secs(5);
    let mut report = Report::new(TEST);
    let ws = Workspace::new().expect("workspace for the session daemons");
    let d = SessionDaemon::start(ws.path().join("outage")).expect("start the session daemon");
    let base = unique_base();
    let pool: Vec<PoolDom> = (0..4)
        .map(|i| PoolDom::new(&base, &format!("o{i}"), i % 2 == 1, Virt::Qemu))
        .collect();
    for p in &pool {
        p.define_on(&d, true);
    }
    virsh_ok(&d, &["start", "--paused", &pool[0].name]);
    virsh_ok(&d, &["start", "--paused", &pool[1].name]);
    let mut rx = Receiver::start().expect("start the OTLP receiver");
    let mut agent = spawn_agent(&rx, &[d.uri()], &["export.interval=5s"]);
    let spawned = agent.started();
    let truth = truth_of(|a| d.virsh(a)).unwrap();
    wait_truth(
        &rx,
        &mut agent,
        spawned,
        Duration::from_secs(20),
        &truth,
        |_| true,
        "before the outage",
    );
    // One periodic export more, so the export path has run in steady state before the baseline.
    let t = Instant::now();
    rx.wait_for_request(t, INTERVAL * 2, |r| r.has_metrics())
        .unwrap();
    let before = proc_stats(agent.pid()).unwrap();
    let log_lines_before = agent.log().lines().count();

    rx.stop();
    let outage_start = Instant::now();
    let mut transitions = 0;
    let mut peak = before;
    let mut rng = Rng::new(seed() ^ 0x3);
    while outage_start.elapsed() < OUTAGE {
        let p = &pool[rng.below(pool.len())];
        let args: Vec<&str> = if d.active_domains().unwrap().contains(&p.name) {
            vec!["destroy", &p.name]
        } else {
            vec!["start", "--paused", &p.name]
        };
        virsh_ok(&d, &args);
        transitions += 1;
        agent
            .check_running()
            .unwrap_or_else(|e| panic!("the agent died during the collector outage: {e:#}"));
        let s = proc_stats(agent.pid()).unwrap();
        if s.rss_kib > peak.rss_kib {
            peak = s;
        }
        // Pace: one transition every ~2 s, waiting on the clock rather than sleeping blindly.
        let next = Instant::now() + Duration::from_secs(2);
        let _ = wait_until(Duration::from_secs(3), || Instant::now() >= next);
    }
    let after = proc_stats(agent.pid()).unwrap();
    let outage = outage_start.elapsed();
    let truth = truth_of(|a| d.virsh(a)).unwrap();
    // Warnings and errors the agent logged during the outage (its own and the OpenTelemetry SDK's).
    let noisy: Vec<String> = agent
        .log()
        .lines()
        .skip(log_lines_before)
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(String::from)
        .collect();

    rx.restart()
        .expect("restart the OTLP receiver on the same ports");
    let restarted = Instant::now();
    let obs = wait_truth(
        &rx,
        &mut agent,
        restarted,
        INTERVAL + Duration::from_secs(10),
        &truth,
        |_| true,
        "after the collector returned",
    );
    agent.check_running().unwrap();
    // README: one line when exports work again.
    let recovered = wait_until(Duration::from_secs(10), || {
        log_count(&agent, &["export to the collector works again"]) >= 1
    })
    .is_ok();

    let growth_kib = after.rss_kib as i64 - before.rss_kib as i64;
    report.line(format!(
        "outage {:.1} s, {transitions} transitions meanwhile; agent stayed up",
        outage.as_secs_f64()
    ));
    report.line(format!("agent before the outage: {before}"));
    report.line(format!(
        "agent at the end of it:  {after} (peak RSS {:.1} MiB)",
        peak.rss_kib as f64 / 1024.0
    ));
    report.line(format!(
        "RSS growth: {:+.2} MiB (bound +5 MiB)",
        growth_kib as f64 / 1024.0
    ));
    report.line(format!(
        "warning/error lines logged during the outage: {} (README: at most one a minute)",
        noisy.len()
    ));
    report.line(format!(
        "collector back -> series equal virsh ({} domains): {} (bound: interval {} + 2 s)",
        truth.len(),
        ms(obs.latency),
        ms(INTERVAL)
    ));
    assert!(
        growth_kib < 5 * 1024,
        "agent RSS grew by {growth_kib} KiB during a {outage:?} collector outage"
    );
    assert!(
        recovered,
        "no 'export to the collector works again' line after the collector returned:\n{}",
        agent.log_tail(20)
    );
    assert!(
        obs.latency <= INTERVAL + Duration::from_secs(2),
        "series right only {:?} after the collector returned",
        obs.latency
    );
    // README "Failure behaviour": collector down → warnings at most once a minute.
    assert!(
        noisy.len() <= 3,
        "a {:.0} s collector outage logged {} warning/error lines (README promises at most one a \
         minute); first ones:\n{}",
        outage.as_secs_f64(),
        noisy.len(),
        noisy[..noisy.len().min(6)].join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Churn oracle
// ---------------------------------------------------------------------------------------------

/// Where a pool domain lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Host {
    Session(usize),
    /// The shared system daemon (only for KVM domains; never restarted).
    System,
}

/// What the driver believes about one domain (checked against virsh at every checkpoint).
#[derive(Clone, Debug)]
struct Model {
    dom: PoolDom,
    host: Host,
    defined: bool,
    /// The persistent definition carries KubeVirt metadata.
    metadata: bool,
    /// Active, and whether paused.
    active: Option<bool>,
}

impl Model {
    /// One valid operation for the current state, chosen by `rng`; updates the model.
    fn next_op(&mut self, rng: &mut Rng) -> Vec<String> {
        let n = self.dom.name.clone();
        let op = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        match (self.defined, self.active) {
            (false, None) => {
                self.defined = true;
                // KubeVirt-named domains mostly carry the metadata; sometimes not (plain identity).
                self.metadata = self.dom.kubevirt_name && rng.chance(80);
                vec!["define".into(), self.metadata.to_string()]
            }
            (true, None) => match rng.below(10) {
                0..=3 => {
                    self.active = Some(false);
                    op(&["start", &n])
                }
                4..=6 => {
                    self.active = Some(true);
                    op(&["start", "--paused", &n])
                }
                7 if self.dom.kubevirt_name => {
                    // Redefine with the metadata toggled: the next incarnation is exported differently.
                    self.metadata = !self.metadata;
                    vec!["define".into(), self.metadata.to_string()]
                }
                _ => {
                    self.defined = false;
                    op(&["undefine", &n])
                }
            },
            (defined, Some(paused)) => match rng.below(10) {
                0..=4 if paused => {
                    self.active = Some(false);
                    op(&["resume", &n])
                }
                0..=4 => {
                    self.active = Some(true);
                    op(&["suspend", &n])
                }
                5 if defined => {
                    // Undefine while running: the domain becomes transient and stays active.
                    self.defined = false;
                    op(&["undefine", &n])
                }
                _ => {
                    self.active = None;
                    op(&["destroy", &n])
                }
            },
        }
    }
}

/// Run one operation (`define <metadata>` is ours; everything else is a virsh command).
fn run_op(virsh: &dyn Fn(&[&str]) -> anyhow::Result<String>, m: &Model, op: &[String]) {
    let r = if op[0] == "define" {
        // A fixed UUID: redefining an existing domain must keep it.
        let xml = common::libvirt::domain_xml(
            &m.dom.name,
            m.dom.virt,
            (op[1] == "true").then_some(m.dom.uid.as_str()),
        )
        .replacen(
            "</name>",
            &format!("</name>\n  <uuid>{}</uuid>", m.dom.uuid),
            1,
        );
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(xml.as_bytes()).unwrap();
        virsh(&["define", &file.path().to_string_lossy()])
    } else {
        let args: Vec<&str> = op.iter().map(String::as_str).collect();
        virsh(&args)
    };
    if let Err(e) = r {
        panic!(
            "operation {op:?} on {} ({:?}) failed: {e:#}",
            m.dom.name, m.host
        );
    }
}

/// Destroys and undefines the system-daemon domains of the oracle, whatever happens.
struct SystemPool(Vec<String>);

impl Drop for SystemPool {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = common::libvirt::virsh(&["destroy", name]);
            let _ = common::libvirt::virsh(&["undefine", name]);
        }
    }
}

/// A virsh bound to one daemon.
type Virsh<'a> = Box<dyn Fn(&[&str]) -> anyhow::Result<String> + Send + 'a>;

/// One round of a churn driver: per domain (an index into the models), its operations in the
/// order drawn.
type Plans = BTreeMap<usize, Vec<Vec<String>>>;

/// Draw one round's operations from the seeded RNG, in a fixed order: for each of `hosts` in turn,
/// `count` operations (drawn first), each on one of that host's domains picked at random; the
/// models follow every operation drawn.
fn draw_plans(
    models: &mut [Model],
    hosts: &[Host],
    rng: &mut Rng,
    count: impl Fn(Host, &mut Rng) -> usize,
) -> Plans {
    let mut plans = Plans::new();
    for host in hosts {
        let idx: Vec<usize> = (0..models.len())
            .filter(|i| models[*i].host == *host)
            .collect();
        for _ in 0..count(*host, rng) {
            let i = idx[rng.below(idx.len())];
            let op = models[i].next_op(rng);
            plans.entry(i).or_default().push(op);
        }
    }
    plans
}

/// Run round `round`'s `plans` in `scope`: one thread per domain, running that domain's operations
/// in order on its daemon (`daemons[d]` for `Host::Session(d)`), so domains run in parallel and a
/// connection sees concurrent transitions. Each operation is logged to `ops` before it runs; a
/// thread done with its domain pushes the instant to `done`, when given.
fn spawn_plans<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    round: usize,
    plans: &'env Plans,
    models: &'env [Model],
    daemons: &'env [SessionDaemon],
    ops: &'env Mutex<Vec<String>>,
    done: Option<&'env Mutex<Vec<Instant>>>,
) {
    for (i, plan) in plans {
        let m = &models[*i];
        scope.spawn(move || {
            let virsh: Virsh<'_> = match m.host {
                Host::Session(d) => Box::new(move |a: &[&str]| daemons[d].virsh(a)),
                Host::System => Box::new(common::libvirt::virsh),
            };
            for op in plan {
                ops.lock().unwrap().push(format!(
                    "round {round}: {:?} {} ({})",
                    m.host,
                    op.join(" "),
                    m.dom.name
                ));
                run_op(&*virsh, m, op);
            }
            if let Some(done) = done {
                done.lock().unwrap().push(Instant::now());
            }
        });
    }
}

/// A check of the driver at a quiescent checkpoint: the models agree with `virsh list` on which
/// domains are active, on the session `daemons` and, with `system: Some(base)`, on the system
/// daemon (only the domains named `base…`: it may run other users' domains).
fn assert_models_match_virsh(
    round: usize,
    models: &[Model],
    daemons: &[SessionDaemon],
    system: Option<&str>,
) {
    let mut modelled: Vec<&str> = models
        .iter()
        .filter(|m| m.active.is_some())
        .map(|m| m.dom.name.as_str())
        .collect();
    modelled.sort();
    let mut listed: Vec<String> = daemons
        .iter()
        .flat_map(|d| d.active_domains().unwrap())
        .collect();
    if let Some(base) = system {
        listed.extend(
            common::libvirt::virsh(&["list", "--name"])
                .unwrap()
                .lines()
                .map(str::trim)
                .filter(|n| n.starts_with(base))
                .map(String::from),
        );
    }
    listed.sort();
    assert_eq!(
        modelled, listed,
        "round {round}: the driver's model vs virsh list"
    );
}

#[test]
fn churn_oracle() {
    const TEST: &str = "churn_oracle";
    if !require_session_daemons(TEST) {
        return;
    }
    const ROUNDS: usize = 24;
    const MIN_OPS: usize = 300;
    /// Rounds after which a daemon is restarted: (round, daemon, SIGKILL?).
    const RESTARTS: [(usize, usize, bool); 3] = [(6, 0, true), (12, 1, false), (18, 0, true)];
    let mut report = Report::new(TEST);
    let seed = seed();
    let ops = Mutex::new(Vec::<String>::new());
    let _guard = SeedGuard {
        test: TEST,
        seed,
        ops: &ops,
    };
    eprintln!("[{TEST}] seed {seed:#x} (set VHA_CHURN_SEED to change it)");

    let ws = Workspace::new().expect("workspace for the session daemons");
    let mut daemons = vec![
        SessionDaemon::start(ws.path().join("oracle-a")).expect("start daemon A"),
        SessionDaemon::start(ws.path().join("oracle-b")).expect("start daemon B"),
    ];
    let base = unique_base();
    let mut models: Vec<Model> = Vec::new();
    for (i, _) in daemons.iter().enumerate() {
        for j in 0..5 {
            let dom = PoolDom::new(&base, &format!("d{i}{j}"), j >= 3, Virt::Qemu);
            models.push(Model {
                dom,
                host: Host::Session(i),
                defined: false,
                metadata: false,
                active: None,
            });
        }
    }
    // KVM runs only on the system daemon (session daemons cannot open /dev/kvm).
    let kvm = libvirtd_available().and_then(|()| kvm_available());
    let mut system_pool = SystemPool(Vec::new());
    match &kvm {
        Ok(()) => {
            for j in 0..3 {
                let dom = PoolDom::new(&base, &format!("k{j}"), j == 2, Virt::Kvm);
                system_pool.0.push(dom.name.clone());
                models.push(Model {
                    dom,
                    host: Host::System,
                    defined: false,
                    metadata: false,
                    active: None,
                });
            }
        }
        Err(reason) => report.line(format!(
            "KVM part skipped ({reason}): TCG on session daemons only"
        )),
    }
    let mut uris: Vec<String> = daemons.iter().map(SessionDaemon::uri).collect();
    if kvm.is_ok() {
        uris.push(common::libvirt::URI.to_string());
    }
    let rx = Receiver::start().expect("start the OTLP receiver");
    // Periodic export every 2 s, so a checkpoint always has an export newer than its last operation.
    let mut agent = spawn_agent(&rx, &uris, &["export.interval=2s"]);
    // Only this test's domains: the system daemon may run other users' domains.
    let mine = |s: &Series| {
        s.attr("name").is_some_and(|n| n.starts_with(&base))
            || s.attr("namespace").is_some_and(|n| n.starts_with(&base))
    };
    let truth = |daemons: &[SessionDaemon]| -> Vec<Key> {
        let mut t = Vec::new();
        for d in daemons {
            t.extend(truth_of(|a| d.virsh(a)).unwrap());
        }
        if kvm.is_ok() {
            let own = truth_of_some(common::libvirt::virsh, |n| n.starts_with(&base)).unwrap();
            t.extend(own);
        }
        t.sort();
        t
    };

    let mut rng = Rng::new(seed);
    let mut total_ops = 0;
    let mut checkpoints = Vec::new();
    let mut max_exported = 0;
    let mut restarts_done = 0;
    let mut round = 0;
    while round < ROUNDS || total_ops < MIN_OPS {
        round += 1;
        // Each connection gets its own operation list (drawn in a fixed order from the seeded RNG),
        // run in parallel with the others.
        let hosts: Vec<Host> = {
            let mut h: Vec<Host> = (0..daemons.len()).map(Host::Session).collect();
            if kvm.is_ok() {
                h.push(Host::System);
            }
            h
        };
        let plans = draw_plans(&mut models, &hosts, &mut rng, |host, rng| match host {
            Host::Session(_) => 5 + rng.below(4),
            Host::System => 1 + rng.below(2),
        });
        std::thread::scope(|scope| {
            spawn_plans(scope, round, &plans, &models, &daemons, &ops, None);
        });
        total_ops += plans.values().map(Vec::len).sum::<usize>();

        // Daemon restarts: while down, maybe a QEMU dies; right after, more operations follow at once.
        if let Some(&(_, which, sigkill)) = RESTARTS.iter().find(|(r, _, _)| *r == round) {
            let d = &mut daemons[which];
            if sigkill {
                d.kill().unwrap();
            } else {
                d.stop().unwrap();
            }
            let victim = models
                .iter()
                .filter(|m| m.host == Host::Session(which) && m.active.is_some())
                .find_map(|m| qemu_pid(d, &m.dom.name).map(|pid| (m.dom.name.clone(), pid)));
            if let Some((_, pid)) = &victim {
                signal(*pid, "KILL").unwrap();
            }
            d.restart().expect("restart a session daemon");
            restarts_done += 1;
            ops.lock().unwrap().push(format!(
                "round {round}: daemon {which} restarted ({}), QEMU killed while down: {victim:?}",
                if sigkill { "SIGKILL" } else { "SIGTERM" }
            ));
            // The victim is inactive (a transient one is gone) once the restarted daemon has
            // reconnected to its QEMU processes and found it dead.
            if let Some((name, _)) = victim {
                wait_until(Duration::from_secs(10), || {
                    !d.active_domains().unwrap().contains(&name)
                })
                .unwrap_or_else(|e| panic!("{name} still listed after its QEMU was killed: {e}"));
                for m in models.iter_mut().filter(|m| m.dom.name == name) {
                    m.active = None;
                }
            }
        }

        // Quiescent checkpoint: the receiver's series equal the truth exactly.
        let since = Instant::now();
        let t = truth(&daemons);
        assert_models_match_virsh(
            round,
            &models,
            &daemons,
            kvm.is_ok().then_some(base.as_str()),
        );
        let obs = wait_truth(
            &rx,
            &mut agent,
            since,
            Duration::from_secs(5),
            &t,
            mine,
            &format!("checkpoint {round}"),
        );
        max_exported = max_exported.max(t.len());
        checkpoints.push(obs.latency);
    }
    agent.check_running().unwrap();
    let last = rx.latest_with_metrics().unwrap();
    let mut reconnects = BTreeMap::new();
    for d in &daemons {
        reconnects.insert(
            d.dir()
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            conn_value(&last, RECONNECTS, &d.uri()),
        );
    }
    report.line(format!(
        "seed {seed:#x}: {total_ops} operations in {round} rounds over {} connections, \
         {restarts_done} daemon restarts, {} checkpoints all exact (up to {max_exported} domains)",
        uris.len(),
        checkpoints.len()
    ));
    report.line(format!(
        "checkpoint -> exact series: {}",
        spread(&checkpoints)
    ));
    report.line(format!("reconnects exported: {reconnects:?}"));
    assert!(total_ops >= MIN_OPS, "only {total_ops} operations");
    assert!(
        checkpoints.len() >= 20,
        "only {} checkpoints",
        checkpoints.len()
    );
    assert_eq!(
        reconnects.values().map(|v| v.unwrap_or(0.0)).sum::<f64>(),
        restarts_done as f64,
        "reconnects counted per restart"
    );
}

// ---------------------------------------------------------------------------------------------
// 4b. Undefining a running domain
// ---------------------------------------------------------------------------------------------

/// `virsh undefine` of a running domain makes it transient; it keeps running and must stay exported
/// (the metric is 1 for every *active* domain). libvirt sends UNDEFINED for it.
#[test]
fn undefine_running_domain_stays_exported() {
    const TEST: &str = "undefine_running_domain_stays_exported";
    if !require_session_daemons(TEST) {
        return;
    }
    let mut report = Report::new(TEST);
    let ws = Workspace::new().expect("workspace for the session daemons");
    let d = SessionDaemon::start(ws.path().join("undef")).expect("start the session daemon");
    let base = unique_base();
    let vm = PoolDom::new(&base, "u1", true, Virt::Qemu);
    let other = PoolDom::new(&base, "u2", false, Virt::Qemu);
    vm.define_on(&d, true);
    other.define_on(&d, true);
    virsh_ok(&d, &["start", "--paused", &vm.name]);
    let rx = Receiver::start().expect("start the OTLP receiver");
    let mut agent = spawn_agent(&rx, &[d.uri()], &["export.interval=30s"]);
    let spawned = agent.started();
    let truth = truth_of(|a| d.virsh(a)).unwrap();
    wait_truth(
        &rx,
        &mut agent,
        spawned,
        Duration::from_secs(20),
        &truth,
        |_| true,
        "initial sync",
    );

    virsh_ok(&d, &["undefine", &vm.name]);
    assert!(
        d.active_domains().unwrap().contains(&vm.name),
        "libvirt keeps the undefined domain running (transient)"
    );
    // Another transition forces a push; the series must still hold the transient domain.
    virsh_ok(&d, &["start", "--paused", &other.name]);
    let t = Instant::now();
    let truth = truth_of(|a| d.virsh(a)).unwrap();
    report.line(format!(
        "after `virsh undefine` of a running domain, virsh lists:\n{}",
        describe_keys(&truth)
    ));
    let obs = wait_truth(
        &rx,
        &mut agent,
        t,
        Duration::from_secs(5),
        &truth,
        |_| true,
        "after undefining a running domain",
    );
    report.line(format!("exported exactly that after {}", ms(obs.latency)));
}

// ---------------------------------------------------------------------------------------------
// 5. No leaks
// ---------------------------------------------------------------------------------------------

/// Resource use once thread and fd counts held still for 11 s (idle threads of tokio's blocking pool
/// expire after 10 s), and how long that took.
fn settled(pid: u32, what: &str) -> (ProcStats, Duration) {
    let start = Instant::now();
    let mut last = proc_stats(pid).unwrap();
    let mut since = Instant::now();
    wait_until(Duration::from_secs(60), || {
        let s = proc_stats(pid).unwrap();
        if (s.threads, s.fds) != (last.threads, last.fds) {
            last = s;
            since = Instant::now();
        }
        since.elapsed() >= Duration::from_secs(11)
    })
    .unwrap_or_else(|e| panic!("{what}: thread and fd counts never settled: {e}"));
    (proc_stats(pid).unwrap(), start.elapsed())
}

#[test]
fn no_leaks() {
    const TEST: &str = "no_leaks";
    if !require_session_daemons(TEST) {
        return;
    }
    const CYCLES: usize = 200;
    const WORKERS: usize = 8;
    let mut report = Report::new(TEST);
    let ws = Workspace::new().expect("workspace for the session daemons");
    let d = SessionDaemon::start(ws.path().join("leaks")).expect("start the session daemon");
    let rx = Receiver::start().expect("start the OTLP receiver");
    let mut agent = spawn_agent(&rx, &[d.uri()], &["export.interval=30s"]);
    let spawned = agent.started();
    let base = unique_base();
    let pool: Vec<PoolDom> = (0..WORKERS)
        .map(|i| PoolDom::new(&base, &format!("l{i}"), i % 2 == 1, Virt::Qemu))
        .collect();
    for p in &pool {
        p.define_on(&d, true);
    }
    let cycle = |p: &PoolDom| {
        virsh_ok(&d, &["start", "--paused", &p.name]);
        virsh_ok(&d, &["destroy", &p.name]);
    };
    // Warm-up: every code path (fetch, push, export) has run once before the baseline.
    for p in &pool {
        cycle(p);
    }
    wait_truth(
        &rx,
        &mut agent,
        spawned,
        Duration::from_secs(20),
        &[],
        |_| true,
        "after warm-up",
    );
    let (baseline, _) = settled(agent.pid(), "baseline");

    let started = Instant::now();
    std::thread::scope(|scope| {
        for p in &pool {
            let cycle = &cycle;
            scope.spawn(move || {
                for _ in 0..CYCLES / WORKERS {
                    cycle(p);
                }
            });
        }
    });
    let cycling = started.elapsed();
    let obs = wait_truth(
        &rx,
        &mut agent,
        Instant::now(),
        Duration::from_secs(35),
        &[],
        |_| true,
        "after the cycles",
    );
    let started_events = obs
        .request
        .series(EVENTS)
        .iter()
        .find(|s| s.attr("event") == Some("started"))
        .map(|s| s.value.as_f64())
        .unwrap_or(0.0);
    let peak_right_after = proc_stats(agent.pid()).unwrap();
    // Back to the baseline exactly once idle blocking threads expired (10 s); else judged with a
    // tolerance of 2 below.
    let back = Instant::now();
    let exact = wait_until(Duration::from_secs(25), || {
        let s = proc_stats(agent.pid()).unwrap();
        s.threads <= baseline.threads && s.fds <= baseline.fds
    });
    let settle_time = back.elapsed();
    let after = proc_stats(agent.pid()).unwrap();
    agent.check_running().unwrap();
    let rss_growth = after.rss_kib as i64 - baseline.rss_kib as i64;
    report.line(format!(
        "{CYCLES} start --paused/destroy cycles ({WORKERS} domains in parallel) in {:.1} s; \
         the agent counted {started_events} STARTED events",
        cycling.as_secs_f64()
    ));
    report.line(format!("baseline:            {baseline}"));
    report.line(format!("right after cycling: {peak_right_after}"));
    report.line(format!(
        "{} {:.1} s later: {after}; RSS {:+.2} MiB",
        if exact.is_ok() {
            "back to the baseline"
        } else {
            "NOT back to the baseline"
        },
        settle_time.as_secs_f64(),
        rss_growth as f64 / 1024.0
    ));
    assert!(
        started_events >= (CYCLES + WORKERS) as f64,
        "the agent saw only {started_events} STARTED events for {} starts",
        CYCLES + WORKERS
    );
    assert!(
        after.fds <= baseline.fds + 2,
        "open fds: {} after vs {} baseline",
        after.fds,
        baseline.fds
    );
    assert!(
        after.threads <= baseline.threads + 2,
        "threads: {} after vs {} baseline",
        after.threads,
        baseline.threads
    );
    assert!(
        rss_growth < 8 * 1024,
        "RSS grew by {rss_growth} KiB over {CYCLES} cycles"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Reloads under churn
// ---------------------------------------------------------------------------------------------

/// What one configuration file of `reload_under_churn` says: the daemons whose URI it lists and
/// the export timing.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ChurnConfig {
    daemons: std::collections::BTreeSet<usize>,
    interval: &'static str,
    debounce: &'static str,
}

impl ChurnConfig {
    /// The YAML of this configuration (`invalid`: with a key that fails validation).
    fn yaml(&self, uris: &[String], endpoint: &str, invalid: bool) -> String {
        let mut y = format!("node_name: {NODE}\nlog:\n  level: info\nlibvirt:\n  uris:\n");
        for d in &self.daemons {
            let _ = writeln!(y, "    - '{}'", uris[*d]);
        }
        y.push_str(
            "  keepalive_interval: 1s\n  keepalive_count: 2\n  reconnect:\n    \
             initial_backoff: 200ms\n    max_backoff: 2s\n",
        );
        if invalid {
            y.push_str("  fetch_timeout: 1ns\n");
        }
        let _ = write!(
            y,
            "export:\n  protocol: grpc\n  endpoint: {endpoint}\n  interval: {}\n  debounce: {}\n",
            self.interval, self.debounce
        );
        y
    }

    /// Replace the file at `path` as an editor or a ConfigMap update does: a new file renamed
    /// over it.
    fn write(&self, path: &std::path::Path, uris: &[String], endpoint: &str, invalid: bool) {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, self.yaml(uris, endpoint, invalid)).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
}

/// SIGHUP reloads while domains churn on three session daemons: a seeded driver runs rounds of
/// operations in parallel, and during each round the configuration file is replaced and the
/// agent sent SIGHUP, alternately removing one daemon's URI and adding it back (some rounds also
/// change `export.interval` or `export.debounce`; one file is invalid and must be refused). At
/// every quiescent checkpoint the exported series equal exactly the truth of the daemons listed
/// in the configuration in force, each of them is up and no removed one exported, a removed
/// daemon's series got their staleness markers, the agent is the same process, and its log has
/// exactly one reload line per SIGHUP.
#[test]
fn reload_under_churn() {
    const TEST: &str = "reload_under_churn";
    if !require_session_daemons(TEST) {
        return;
    }
    const ROUNDS: usize = 14;
    const MIN_OPS: usize = 150;
    const DAEMONS: usize = 3;
    /// The round whose SIGHUP carries an invalid file.
    const INVALID_ROUND: usize = 6;
    const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(10);
    let mut report = Report::new(TEST);
    let seed_value = seed();
    let seed = seed_value ^ 0x6;
    let ops = Mutex::new(Vec::<String>::new());
    let _guard = SeedGuard {
        test: TEST,
        seed: seed_value,
        ops: &ops,
    };
    eprintln!("[{TEST}] seed {seed_value:#x} (set VHA_CHURN_SEED to change it)");

    let ws = Workspace::new().expect("workspace for the session daemons");
    let daemons: Vec<SessionDaemon> = (0..DAEMONS)
        .map(|i| {
            SessionDaemon::start(ws.path().join(format!("reload-{i}")))
                .unwrap_or_else(|e| panic!("start daemon {i}: {e:#}"))
        })
        .collect();
    let uris: Vec<String> = daemons.iter().map(SessionDaemon::uri).collect();
    let base = unique_base();
    let mut models: Vec<Model> = Vec::new();
    for i in 0..DAEMONS {
        for j in 0..4 {
            models.push(Model {
                dom: PoolDom::new(&base, &format!("h{i}{j}"), j >= 2, Virt::Qemu),
                host: Host::Session(i),
                defined: false,
                metadata: false,
                active: None,
            });
        }
    }
    let hosts: Vec<Host> = (0..DAEMONS).map(Host::Session).collect();

    // The configuration file in the agent's own directory (readable under Landlock, as
    // /etc/virt-hypervisor-agent is), replaced atomically.
    let config_dir = tempfile::tempdir().unwrap();
    let own_dir = config_dir.path().join("virt-hypervisor-agent");
    std::fs::create_dir(&own_dir).unwrap();
    let config_path = own_dir.join("agent.yaml");
    let rx = Receiver::start().expect("start the OTLP receiver");
    let endpoint = rx.grpc_endpoint();
    let mut applied = ChurnConfig {
        daemons: (0..DAEMONS).collect(),
        interval: "1s",
        debounce: "250ms",
    };
    applied.write(&config_path, &uris, &endpoint, false);
    let config_arg = config_path.to_string_lossy().into_owned();
    let mut agent = Agent::spawn(&["--config", &config_arg, "run"], &[("RUST_LOG", "")])
        .expect("spawn the agent");
    let pid = agent.pid();

    // Per daemon, its truth from virsh.
    let truths = |daemons: &[SessionDaemon]| -> Vec<Vec<Key>> {
        daemons
            .iter()
            .map(|d| truth_of(|a| d.virsh(a)).unwrap())
            .collect()
    };
    // Every listed daemon's connection up; no series for the others.
    let connections_right = |r: &common::receiver::Recorded, cfg: &ChurnConfig| {
        (0..DAEMONS).all(|d| {
            let up = conn_value(r, UP, &uris[d]);
            if cfg.daemons.contains(&d) {
                up == Some(1.0)
            } else {
                up.is_none()
            }
        })
    };
    // The checkpoint: the series equal the truth of the listed daemons (wait_truth), then the
    // connection self-metrics agree with the configuration.
    let checkpoint = |agent: &mut Agent,
                      cfg: &ChurnConfig,
                      per_daemon: &[Vec<Key>],
                      since: Instant,
                      what: &str|
     -> Observation {
        let mut t: Vec<Key> = cfg
            .daemons
            .iter()
            .flat_map(|d| per_daemon[*d].iter().cloned())
            .collect();
        t.sort();
        let obs = wait_truth(&rx, agent, since, CHECKPOINT_TIMEOUT, &t, |_| true, what);
        rx.wait_for_request(obs.request.at, CHECKPOINT_TIMEOUT, |r| {
            r.has_metrics() && keys(&r.series(METRIC)) == t && connections_right(r, cfg)
        })
        .unwrap_or_else(|e| {
            let latest = rx.latest_with_metrics().unwrap();
            let ups: Vec<(usize, Option<f64>)> = (0..DAEMONS)
                .map(|d| (d, conn_value(&latest, UP, &uris[d])))
                .collect();
            panic!(
                "{what}: connection_up does not match the configuration (listed: {:?}); \
                 latest per daemon: {ups:?}\n{e:#}\n{}",
                cfg.daemons,
                agent.log_tail(40)
            )
        });
        agent
            .check_running()
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_eq!(agent.pid(), pid, "{what}: the same agent process");
        obs
    };

    let initial = truths(&daemons);
    let spawned = agent.started();
    let mut last = checkpoint(&mut agent, &applied, &initial, spawned, "initial sync");
    let mut last_truths = initial;
    let confined = agent.log().contains("confined with Landlock");

    let mut rng = Rng::new(seed);
    let mut total_ops = 0;
    let mut round = 0;
    let mut rotation = 0;
    let (mut reloaded, mut refused, mut removals, mut readds, mut export_changes) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut came_back = 0;
    // Reloads logged while the round's operations still ran.
    let mut during_ops = 0;
    let mut stale_checked = 0;
    let mut checkpoints = Vec::new();
    let mut hup_to_log = Vec::new();
    let mut max_exported = 0;
    while round < ROUNDS || total_ops < MIN_OPS {
        round += 1;
        // This round's file: add back the removed daemon, or remove the next one; on some rounds
        // new export timing too; one invalid file that lists another set of daemons.
        let invalid = round == INVALID_ROUND;
        let mut next = applied.clone();
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        if invalid {
            next.daemons = (0..DAEMONS).filter(|d| *d != rotation % DAEMONS).collect();
            next.interval = "2s";
        } else {
            match (0..DAEMONS).find(|d| !applied.daemons.contains(d)) {
                Some(d) => {
                    next.daemons.insert(d);
                    added.push(d);
                }
                None => {
                    let d = rotation % DAEMONS;
                    rotation += 1;
                    next.daemons.remove(&d);
                    removed.push(d);
                }
            }
            if round % 3 == 0 {
                next.interval = if next.interval == "1s" { "2s" } else { "1s" };
            }
            if round % 4 == 0 {
                next.debounce = if next.debounce == "250ms" {
                    "100ms"
                } else {
                    "250ms"
                };
            }
        }
        let export_changed =
            !invalid && (next.interval != applied.interval || next.debounce != applied.debounce);

        // Operations per domain (in the order drawn), domains in parallel, as in churn_oracle;
        // the reload lands somewhere in the middle of them.
        let plans = draw_plans(&mut models, &hosts, &mut rng, |_, rng| 4 + rng.below(4));
        let delay = Duration::from_millis(rng.below(600) as u64);
        // The reload's log line, looked for from the SIGHUP on (the operations still run).
        let (needle, count) = if invalid {
            ("configuration not reloaded", refused + 1)
        } else {
            ("configuration reloaded", reloaded + 1)
        };
        let hup_to_line = Mutex::new(None);
        let ops_done = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            spawn_plans(
                scope,
                round,
                &plans,
                &models,
                &daemons,
                &ops,
                Some(&ops_done),
            );
            let (next, uris, endpoint) = (&next, &uris, &endpoint);
            let (config_path, ops, hup_to_line, agent) = (&config_path, &ops, &hup_to_line, &agent);
            scope.spawn(move || {
                std::thread::sleep(delay);
                next.write(config_path, uris, endpoint, invalid);
                ops.lock().unwrap().push(format!(
                    "round {round}: SIGHUP after {} with {}daemons {:?}, interval {}, debounce {}",
                    ms(delay),
                    if invalid { "an INVALID file, " } else { "" },
                    next.daemons,
                    next.interval,
                    next.debounce
                ));
                signal(pid, "HUP").unwrap();
                let logged =
                    wait_until(CHECKPOINT_TIMEOUT, || log_count(agent, &[needle]) >= count);
                *hup_to_line.lock().unwrap() = logged.ok().map(|d| (d, Instant::now()));
            });
        });
        total_ops += plans.values().map(Vec::len).sum::<usize>();

        // The reload's outcome in the log: one more line of the right kind, saying what changed.
        if invalid {
            refused += 1;
            let line = wait_last_log_line(
                &agent,
                needle,
                refused,
                CHECKPOINT_TIMEOUT,
                &format!("round {round}: the invalid file"),
            );
            assert!(
                line.contains("libvirt.fetch_timeout")
                    && line.contains("the running configuration is kept"),
                "round {round}: {line}"
            );
        } else {
            reloaded += 1;
            let line = wait_last_log_line(
                &agent,
                needle,
                reloaded,
                CHECKPOINT_TIMEOUT,
                &format!("round {round}: the reload"),
            );
            let names = |ds: &[usize]| -> Vec<&str> { ds.iter().map(|d| &*uris[*d]).collect() };
            for want in [
                format!("added={:?}", names(&added)),
                format!("removed={:?}", names(&removed)),
                format!("export_settings={export_changed}"),
            ] {
                assert!(line.contains(&want), "round {round}: no {want} in\n{line}");
            }
            applied = next;
            removals += removed.len();
            readds += added.len();
            export_changes += usize::from(export_changed);
        }
        if let Some((latency, logged_at)) = hup_to_line.into_inner().unwrap() {
            hup_to_log.push(latency);
            let last_op = ops_done.into_inner().unwrap().into_iter().max();
            if last_op.is_some_and(|t| logged_at < t) {
                during_ops += 1;
            }
        }
        assert_eq!(
            (
                log_count(&agent, &["configuration reloaded"]),
                log_count(&agent, &["configuration not reloaded"])
            ),
            (reloaded, refused),
            "round {round}: reload lines in the log (applied, refused)"
        );

        // Quiescent checkpoint: the driver's model agrees with virsh, and the export with the
        // truth of the daemons the running configuration lists.
        let since = Instant::now();
        let per_daemon = truths(&daemons);
        assert_models_match_virsh(round, &models, &daemons, None);
        let obs = checkpoint(
            &mut agent,
            &applied,
            &per_daemon,
            since,
            &format!("checkpoint {round} (daemons {:?})", applied.daemons),
        );
        // A removed daemon's series, exported at the last checkpoint, all ended since: each got
        // a staleness marker (at its removal, or at its own end before that).
        for d in &removed {
            let owed = &last_truths[*d];
            let stale = |rx: &Receiver| -> Vec<Key> {
                let mut s: Vec<Key> = rx
                    .requests()
                    .iter()
                    .filter(|r| r.seq > last.request.seq)
                    .flat_map(|r| keys(&r.stale_series(METRIC)))
                    .collect();
                s.sort();
                s.dedup();
                s
            };
            wait_until(CHECKPOINT_TIMEOUT, || {
                let s = stale(&rx);
                owed.iter().all(|k| s.contains(k))
            })
            .unwrap_or_else(|e| {
                panic!(
                    "round {round}: daemon {d} removed: {e}; owed staleness markers:\n{}\n\
                     markers received since the last checkpoint:\n{}",
                    describe_keys(owed),
                    describe_keys(&stale(&rx))
                )
            });
            stale_checked += owed.len();
        }
        for d in &added {
            came_back += per_daemon[*d].len();
        }
        max_exported = max_exported.max(obs.series.len());
        checkpoints.push(obs.latency);
        last = obs;
        last_truths = per_daemon;
    }
    agent.check_running().unwrap();
    assert_eq!(agent.pid(), pid, "the same agent process at the end");
    report.line(format!(
        "seed {seed_value:#x}: {total_ops} operations in {round} rounds over {DAEMONS} daemons \
         (Landlock {}); {reloaded} reloads applied ({removals} URI removals, {readds} re-adds, \
         {export_changes} export timing changes), {refused} invalid file refused; {} checkpoints \
         all exact (up to {max_exported} domains)",
        if confined { "on" } else { "NOT on" },
        checkpoints.len()
    ));
    report.line(format!(
        "{stale_checked} series of removed daemons got staleness markers; {came_back} domains \
         came back on re-adds"
    ));
    report.line(format!(
        "checkpoint -> exact series: {}",
        spread(&checkpoints)
    ));
    report.line(format!(
        "SIGHUP -> reload logged: {} ({during_ops} of them while the round's operations still ran)",
        spread(&hup_to_log)
    ));
    assert!(total_ops >= MIN_OPS, "only {total_ops} operations");
    assert!(round >= 12, "only {round} rounds");
    assert_eq!(refused, 1, "one invalid file");
    assert_eq!(
        (
            log_count(&agent, &["configuration reloaded"]),
            log_count(&agent, &["configuration not reloaded"])
        ),
        (reloaded, refused),
        "reload lines in the log at the end (applied, refused)"
    );
}
