//! `report` mode: read `live.json`, `scale.json` and criterion's estimates, print the tables and
//! write `results.md` (the generated part of BENCHMARKS.md) and the idle-CPU plot (SVG).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};

use crate::live::LiveResult;
use crate::scale::ScaleAll;
use crate::util::{median, Machine};

pub struct ReportOpts {
    pub out: PathBuf,
    pub criterion: PathBuf,
    /// Criterion results older than this are ignored (a stale run).
    pub since: Option<SystemTime>,
    pub svg: PathBuf,
    pub repo: PathBuf,
    pub command: String,
}

/// One criterion benchmark: full id → median ns.
fn criterion_results(dir: &Path, since: Option<SystemTime>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") {
                    let bench = p.join("benchmark.json");
                    let est = p.join("estimates.json");
                    let fresh = since.is_none_or(|s| {
                        std::fs::metadata(&est)
                            .and_then(|m| m.modified())
                            .is_ok_and(|m| m >= s)
                    });
                    if !fresh {
                        continue;
                    }
                    let id = std::fs::read_to_string(&bench)
                        .ok()
                        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                        .and_then(|v| v.get("full_id").and_then(|x| x.as_str()).map(String::from));
                    let med = std::fs::read_to_string(&est)
                        .ok()
                        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                        .and_then(|v| v.pointer("/median/point_estimate").and_then(|x| x.as_f64()));
                    if let (Some(id), Some(med)) = (id, med) {
                        out.insert(id, med);
                    }
                } else if p.file_name().is_some_and(|n| n != "report") {
                    stack.push(p);
                }
            }
        }
    }
    out
}

fn ms(s: f64) -> String {
    format!("{:.1} ms", s * 1e3)
}

fn secs(s: f64) -> String {
    if s.abs() < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn mem_str(m: &crate::util::Mem) -> String {
    format!(
        "{} ({:.1} + {:.1})",
        mib(m.rss),
        m.anon as f64 / 1024.0,
        m.file as f64 / 1024.0
    )
}

fn ok(b: bool) -> &'static str {
    if b {
        "**met**"
    } else {
        "**MISSED**"
    }
}

fn ns_str(ns: f64) -> String {
    if ns >= 1000.0 {
        format!("{:.2} µs", ns / 1000.0)
    } else {
        format!("{ns:.0} ns")
    }
}

/// Build the markdown; also returns the SVG.
pub fn build(o: &ReportOpts) -> Result<(String, String)> {
    let live: Option<LiveResult> = std::fs::read_to_string(o.out.join("live.json"))
        .ok()
        .map(|s| serde_json::from_str(&s))
        .transpose()
        .context("parse live.json")?;
    let scale: Option<ScaleAll> = std::fs::read_to_string(o.out.join("scale.json"))
        .ok()
        .map(|s| serde_json::from_str(&s))
        .transpose()
        .context("parse scale.json")?;
    let crit = criterion_results(&o.criterion, o.since);
    let mut m = Machine::describe(&o.repo);
    // The commit and time of the build, recorded by bench/run.sh (the tree may move meanwhile).
    if let Some(b) = std::fs::read_to_string(o.out.join("build.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
    {
        if let Some(g) = b.get("git").and_then(|v| v.as_str()) {
            m.git = g.to_string();
        }
        if let Some(d) = b.get("date_utc").and_then(|v| v.as_str()) {
            m.date_utc = format!("{d} (start)");
        }
    }
    let mut md = String::new();
    let w = &mut md;

    writeln!(
        w,
        "Measured {} on {} cores ({}), {:.0} GiB RAM, {}, kernel {}; {}; {}; agent at commit {}.",
        m.date_utc, m.nproc, m.model, m.mem_gib, m.os, m.kernel, m.libvirt, m.qemu, m.git
    )?;
    writeln!(w)?;
    writeln!(w, "Command: `{}`", o.command)?;
    writeln!(w)?;

    // ------------------------------------------------------------ summary
    writeln!(w, "### Summary: the goals")?;
    writeln!(w)?;
    writeln!(
        w,
        "| # | Benchmark | Agent | Reference (same run) | Ratio | Goal | Result |"
    )?;
    writeln!(w, "|---|---|---|---|---|---|---|")?;
    if let Some(l) = &live {
        if let Some(r) = l.idle.iter().max_by_key(|r| r.domains) {
            let a = r.agent.secs + r.libvirtd_with_agent.secs;
            let p = r.peer.secs + r.libvirtd_with_peer.secs;
            let ratio = a / p;
            writeln!(w, "| 1 | Idle cost, N={} paused domains, {:.0} s: CPU of agent + libvirtd vs peer (scraped every {:.0} s) + libvirtd | {} ({} + {}) | {} ({} + {}) | 1/{:.0} | ≤ 1/50 | {} |",
                r.domains, r.window_secs, l.peer_scrape_interval_secs,
                ms(a), ms(r.agent.secs), ms(r.libvirtd_with_agent.secs),
                ms(p), ms(r.peer.secs), ms(r.libvirtd_with_peer.secs),
                1.0 / ratio, ok(ratio <= 1.0 / 50.0))?;
            let net_a =
                r.agent.secs + (r.libvirtd_with_agent.secs - r.libvirtd_alone.secs).max(0.0);
            let net_p = r.peer.secs + (r.libvirtd_with_peer.secs - r.libvirtd_alone.secs).max(0.0);
            writeln!(w, "| 1b | Same, minus what libvirtd burns with no client ({} in the same window length) | {} | {} | 1/{:.0} | (context) | |",
                ms(r.libvirtd_alone.secs), ms(net_a), ms(net_p), net_p / net_a.max(1e-9))?;
            let f = r.floor.secs + r.libvirtd_with_floor.secs;
            if f > 0.0 {
                writeln!(w, "| 1c | Same, against the floor of any event-driven client: `virsh event --all --loop` + libvirtd | {} ({} + {}) | {} ({} + {}) | {:.2}× | ≤ 1.5× | {} |",
                    ms(a), ms(r.agent.secs), ms(r.libvirtd_with_agent.secs),
                    ms(f), ms(r.floor.secs), ms(r.libvirtd_with_floor.secs),
                    a / f, ok(a / f <= 1.5))?;
            }
        }
        let v = &l.agent_visibility;
        let goal = (l.debounce_ms + 100.0) / 1e3;
        let pv = &l.peer_visibility;
        writeln!(w, "| 2 | Change visibility, `virsh` returned → visible (agent: OTLP receiver; peer: {:.0} s scraper) | p50 {} / p99 {} (n={}) | p50 {} / p99 {} (n={}) | p50 1/{:.0} | agent p99 ≤ debounce + 100 ms = {} | {} |",
            l.peer_scrape_interval_secs, secs(v.p50), secs(v.p99), v.latencies.len(),
            secs(pv.p50), secs(pv.p99), pv.latencies.len(), pv.p50 / v.p50, secs(goal), ok(v.p99 <= goal && v.missed == 0))?;
        let s = &l.sync;
        let a = median(&s.agent.iter().map(|r| r.wall_secs).collect::<Vec<_>>());
        let f = median(&s.floor.iter().map(|r| r.wall_secs).collect::<Vec<_>>());
        let nd = median(
            &s.agent_no_debounce
                .iter()
                .map(|r| r.wall_secs)
                .collect::<Vec<_>>(),
        );
        writeln!(w, "| 3 | Initial sync, N={}: agent start → first complete export vs floor (`virsh` list + dumpxml of every domain, one connection); median of {} | {} | {} | {:.2}× | ≤ 1.0× | {} |",
            s.domains, s.agent.len(), secs(a), secs(f), a / f, ok(a <= f))?;
        writeln!(
            w,
            "| 3b | Same, agent with `export.debounce=1ms` (diagnostic) | {} | {} | {:.2}× | | |",
            secs(nd),
            secs(f),
            nd / f
        )?;
        let c = &l.agent_transition_cost;
        writeln!(w, "| 4 | Agent CPU per lifecycle transition (event + fetch + parse + update + push), {} transitions | {:.3} ms ({:.3} ms net of idle) | | | ≤ 1 ms | {} |",
            c.transitions, c.per_transition_ms, c.per_transition_net_ms, ok(c.per_transition_ms <= 1.0))?;
    }
    let kv_default = crit.get("kubevirt-kvm/parse_domain_xml/default").copied();
    let kv_full = crit.get("kubevirt-kvm/baseline/full_pass_ns").copied();
    if let (Some(p), Some(f)) = (kv_default, kv_full) {
        writeln!(w, "| 5 | Parser, KubeVirt domain XML (~8 KiB): `parse_domain_xml` vs full quick-xml pass (NsReader) | {} | {} | 1/{:.0} | ≤ 2 µs | {} |",
            ns_str(p), ns_str(f), f / p, ok(p <= 2000.0))?;
    }
    if let Some(sc) = &scale {
        if let Some(t) = sc
            .timing
            .iter()
            .filter(|t| t.attributes == "default")
            .max_by_key(|t| t.domains)
        {
            writeln!(w, "| 6 | Collection of all gauges, {} domains over {} connections (p50 / p99; after a change p50) | {:.2} / {:.2} ms; {:.2} ms | | | ≤ 5 ms | {} |",
                t.domains, t.conns, t.collect_ms_p50, t.collect_ms_p99, t.collect_changed_ms_p50, ok(t.collect_ms_p99 <= 5.0 && t.collect_changed_ms_p50 <= 5.0))?;
        }
        for (n, goal_mb) in [(10_000usize, 50.0), (1_000, 15.0)] {
            if let Some(r) = sc.rss.iter().find(|r| r.domains == n) {
                let mb = r.rss_kib as f64 * 1024.0 / 1e6;
                writeln!(w, "| 6 | RSS, {} simulated domains over {} connections (real export pipeline) | {} ({:.1} MB) | | | ≤ {:.0} MB | {} |",
                    n, r.conns, mib(r.rss_kib), mb, goal_mb, ok(mb <= goal_mb))?;
            }
        }
    }
    if let Some(l) = &live {
        if let Some(r) = l.idle.iter().max_by_key(|r| r.domains) {
            let z = &l.agent_mem_zero;
            let sim = scale.as_ref().and_then(|sc| {
                let a = sc.rss.iter().find(|r| r.domains == 0)?;
                let b = sc.rss.iter().find(|r| r.domains == 1_000)?;
                Some(b.rss_kib as f64 - a.rss_kib as f64)
            });
            let est = sim
                .map(|d| format!("; real agent at 1,000 domains ≈ {:.1} MB (0-domain RSS + the simulated 0→1,000 growth)", (z.rss as f64 + d) * 1024.0 / 1e6))
                .unwrap_or_default();
            writeln!(w, "| 6c | Context: RSS of the real agent process (release binary, real libvirt), anonymous + file-backed | N=0: {}; N={}: {} | peer N={}: {} | | | | {} |",
                mem_str(z), r.domains, mem_str(&r.agent_mem), r.domains, mem_str(&r.peer_mem), est.trim_start_matches("; "))?;
        }
    }
    writeln!(w)?;

    // ------------------------------------------------------------ details
    if let Some(l) = &live {
        writeln!(
            w,
            "### 1. Idle cost (CPU seconds per window, real paused TCG domains)"
        )?;
        writeln!(w)?;
        writeln!(w, "libvirt daemon measured: {}.", l.daemon)?;
        writeln!(w)?;
        writeln!(w, "Windows run one after another at each N: libvirtd with no client, then the agent (from {} s after its first complete export, once the blocking threads of the initial sync have exited), then the peer (scraped every {:.0} s, scrapes inside the window), then the floor (`virsh event --all --loop`). CPU from the process CPU clock, which counts threads that exited inside the window; `/proc/<pid>/stat` utime+stime (10 ms ticks) in brackets.", crate::live::SETTLE.as_secs(), l.peer_scrape_interval_secs)?;
        writeln!(w)?;
        writeln!(w, "| N | window | libvirtd alone | agent | libvirtd (agent) | agent + libvirtd | peer | libvirtd (peer) | peer + libvirtd | ratio | agent exports (bytes) | peer scrapes | agent RSS (anon + file) | peer RSS (anon + file) |")?;
        writeln!(
            w,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        )?;
        for r in &l.idle {
            let a = r.agent.secs + r.libvirtd_with_agent.secs;
            let p = r.peer.secs + r.libvirtd_with_peer.secs;
            writeln!(w, "| {} | {:.0} s | {} [{:.2}] | {} [{:.2}] | {} [{:.2}] | **{}** | {} [{:.2}] | {} [{:.2}] | **{}** | 1/{:.0} | {} ({} B) | {} | {} | {} |",
                r.domains, r.window_secs,
                ms(r.libvirtd_alone.secs), r.libvirtd_alone.stat_secs,
                ms(r.agent.secs), r.agent.stat_secs,
                ms(r.libvirtd_with_agent.secs), r.libvirtd_with_agent.stat_secs,
                ms(a),
                ms(r.peer.secs), r.peer.stat_secs,
                ms(r.libvirtd_with_peer.secs), r.libvirtd_with_peer.stat_secs,
                ms(p), p / a.max(1e-9),
                r.agent_exports, r.agent_export_bytes, r.peer_scrapes,
                mem_str(&r.agent_mem), mem_str(&r.peer_mem))?;
        }
        writeln!(w)?;
        // Results measured before the tail was recorded (window from 3 s) have none.
        let tails: Vec<String> = l
            .idle
            .iter()
            .filter(|r| r.agent_threads_settle.0 > 0)
            .map(|r| {
                format!(
                    "N={}: {} (threads {} → {})",
                    r.domains,
                    ms(r.agent_settle.secs),
                    r.agent_threads_settle.0,
                    r.agent_threads_settle.1
                )
            })
            .collect();
        if !tails.is_empty() {
            writeln!(w, "The agent's start-up tail, from its first complete export to the window (once per start, not idle cost): {}.", tails.join("; "))?;
            writeln!(w)?;
        }
        if l.peer_cpu_per_scrape_ms > 0.0 {
            writeln!(w, "Per scrape of the peer at the largest N: {:.1} ms peer CPU + {:.1} ms libvirtd CPU (above libvirtd alone).", l.peer_cpu_per_scrape_ms, l.libvirtd_cpu_per_scrape_ms)?;
        }
        let fd: Vec<String> = l
            .idle
            .iter()
            .map(|r| {
                format!(
                    "N={}: {} other domains, {} foreign events",
                    r.domains, r.foreign_domains, r.foreign_events
                )
            })
            .collect();
        writeln!(
            w,
            "Other users' domains on the daemon, and their lifecycle events during the windows: {}.",
            fd.join("; ")
        )?;
        writeln!(w, "Agent RSS with none of our domains: {} (anonymous + file-backed; file-backed is the binary and the shared libraries libvirt pulls in, shared with other processes).", mem_str(&l.agent_mem_zero))?;
        writeln!(w)?;
        if let Some(r) = l.idle.iter().max_by_key(|r| r.domains) {
            writeln!(
                w,
                "Where the agent's idle CPU goes at N={} ({:.0} s window; timeslices ≈ wakeups):",
                r.domains, r.window_secs
            )?;
            writeln!(w)?;
            writeln!(w, "| thread | threads | CPU | timeslices |")?;
            writeln!(w, "|---|---|---|---|")?;
            for t in &r.agent_threads {
                writeln!(
                    w,
                    "| `{}` | {} | {:.2} ms | {} |",
                    t.name, t.threads, t.cpu_ms, t.slices
                )?;
            }
            writeln!(w)?;
        }
        writeln!(w, "![Idle CPU vs N](docs/idle-cpu-vs-n.svg)")?;
        writeln!(w)?;

        writeln!(w, "### 2. Change visibility")?;
        writeln!(w)?;
        writeln!(
            w,
            "| | transitions (start / destroy) | min | p50 | p99 | max | missed |"
        )?;
        writeln!(w, "|---|---|---|---|---|---|---|")?;
        for (name, v) in [
            (
                "agent → OTLP receiver (push on change, debounce 250 ms)",
                &l.agent_visibility,
            ),
            ("peer → scraper every 15 s", &l.peer_visibility),
        ] {
            writeln!(
                w,
                "| {} | {} ({} / {}) | {} | {} | {} | {} | {} |",
                name,
                v.latencies.len(),
                v.starts,
                v.stops,
                secs(v.min),
                secs(v.p50),
                secs(v.p99),
                secs(v.max),
                v.missed
            )?;
        }
        writeln!(w)?;
        writeln!(w, "Agent: one domain started (`virsh start`) and destroyed alternately, each time waiting until the receiver shows the change, then 50–300 ms. Peer: {} transitions over a pool of 5 domains at random 0.5–3.5 s intervals (so their phase against the scrape is random); a change counts as visible at the end of the first scrape begun after the command that shows it.", l.peer_visibility.latencies.len())?;
        writeln!(w)?;

        writeln!(w, "### 3. Initial sync (N={})", l.sync.domains)?;
        writeln!(w)?;
        writeln!(w, "Agent: spawn of the release binary → first export at the receiver containing every domain. Breakdown from the agent's own log (seconds after spawn). Floor: one `virsh` process: `list --name`, then `dumpxml` of each domain over the same connection. Runs interleaved.")?;
        writeln!(w)?;
        writeln!(w, "| run | floor wall | floor virsh CPU | floor libvirtd CPU | agent wall | agent CPU | agent libvirtd CPU | connected | resync done (resync ms) | \"initial sync done\" | agent (debounce 1ms) wall |")?;
        writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|")?;
        let s = &l.sync;
        let opt = |x: Option<f64>| x.map(secs).unwrap_or_else(|| "–".into());
        for i in 0..s.agent.len().max(s.floor.len()) {
            let f = s.floor.get(i).cloned().unwrap_or_default();
            let a = s.agent.get(i).cloned().unwrap_or_default();
            let nd = s.agent_no_debounce.get(i).cloned().unwrap_or_default();
            writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} |",
                i + 1,
                secs(f.wall_secs),
                ms(f.process_cpu_secs),
                ms(f.libvirtd_cpu_secs),
                secs(a.wall_secs),
                ms(a.process_cpu_secs),
                ms(a.libvirtd_cpu_secs),
                opt(a.connected_at),
                opt(a.resync_done_at),
                a.resync_elapsed_ms
                    .map(|v| format!("{v:.0}"))
                    .unwrap_or_else(|| "–".into()),
                opt(a.initial_sync_logged_at),
                secs(nd.wall_secs)
            )?;
        }
        writeln!(w)?;

        let c = &l.agent_transition_cost;
        writeln!(w, "### 4. Per-transition agent CPU")?;
        writeln!(w)?;
        writeln!(w, "{} transitions in {:.1} s with N={} other domains exported: agent CPU {} [{:.2} s by /proc ticks] → **{:.3} ms per transition** ({:.3} ms after subtracting the idle rate measured in §1 over the same time); {} exports received; libvirtd CPU {} ({:.2} ms per transition).",
            c.transitions, c.elapsed_secs, l.sync.domains, ms(c.agent_cpu.secs), c.agent_cpu.stat_secs, c.per_transition_ms, c.per_transition_net_ms, c.exports, ms(c.libvirtd_cpu.secs), c.libvirtd_cpu.secs * 1e3 / c.transitions.max(1) as f64)?;
        writeln!(w)?;
        let k = c.transitions.max(1) as f64;
        writeln!(
            w,
            "| thread | threads | CPU per transition | timeslices per transition |"
        )?;
        writeln!(w, "|---|---|---|---|")?;
        for t in &c.threads {
            writeln!(
                w,
                "| `{}` | {} | {:.3} ms | {:.1} |",
                t.name,
                t.threads,
                t.cpu_ms / k,
                t.slices as f64 / k
            )?;
        }
        writeln!(w)?;
        for n in &l.notes {
            writeln!(w, "Note: {n}")?;
        }
        if !l.notes.is_empty() {
            writeln!(w)?;
        }
    }

    writeln!(w, "### 5. Parser (criterion, `cargo bench --bench parser`)")?;
    writeln!(w)?;
    if crit.is_empty() {
        writeln!(w, "(no fresh criterion results found)")?;
    } else {
        writeln!(w, "| benchmark | median |")?;
        writeln!(w, "|---|---|")?;
        for (id, v) in &crit {
            writeln!(w, "| `{id}` | {} |", ns_str(*v))?;
        }
    }
    writeln!(w)?;

    if let Some(sc) = &scale {
        writeln!(
            w,
            "### 6. Scale (simulated: no libvirt; inventory and exporter driven through the API)"
        )?;
        writeln!(w)?;
        writeln!(w, "Collection = from the first instrument callback to the exporter being called (all seven of the agent's instruments: callbacks + SDK aggregation), by the SDK's `PeriodicReader` on a forced flush. Payload = the OTLP `ExportMetricsServiceRequest` built by `opentelemetry-proto`'s transform, protobuf bytes (gzip in brackets).")?;
        writeln!(w)?;
        writeln!(w, "| domains | connections | attributes | collect p50 | p99 | max | after a change p50 / p99 | collect + encode p50 | snapshot rebuild | encode | points (info / all) | payload | inventory fill per domain (× bare inventory) | one stop+start applied |")?;
        writeln!(
            w,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        )?;
        for t in &sc.timing {
            writeln!(w, "| {} | {} | {} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} / {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {} / {} | {:.0} KiB ({:.0} KiB) | {:.2} µs ({}) | {:.2} µs |",
                t.domains, t.conns, t.attributes, t.collect_ms_p50, t.collect_ms_p99, t.collect_ms_max,
                t.collect_changed_ms_p50, t.collect_changed_ms_p99, t.collect_encode_ms_p50, t.snapshot_rebuild_ms,
                t.encode_ms_p50, t.info_points, t.total_points, t.payload_bytes as f64 / 1024.0, t.payload_gzip_bytes as f64 / 1024.0,
                t.populate_ns_per_domain / 1e3,
                if t.populate_bare_ns_per_domain > 0.0 {
                    format!("{:.2}×", t.populate_ns_per_domain / t.populate_bare_ns_per_domain)
                } else {
                    "n/a".to_string()
                },
                t.churn_ns / 1e3)?;
        }
        writeln!(w)?;
        writeln!(
            w,
            "### 7. Memory (RSS of the agent's real export pipeline, one fresh process per size)"
        )?;
        writeln!(w)?;
        writeln!(w, "`export::Exporter::start` with the OTLP/gRPC exporter, the agent's runtime shape (1 async worker), an inventory filled through `apply_event`/`apply_fetch`, connections registered as KubeVirt discovery does, two exports received by a receiver in another process. The libvirt library is linked but holds no connection: a real agent adds libvirt client state (see the real-libvirt RSS in §1).")?;
        writeln!(w)?;
        writeln!(w, "| domains | connections | RSS: pipeline, empty | after filling the inventory | after two exports | of which anon / file | peak (VmHWM) | request received |")?;
        writeln!(w, "|---|---|---|---|---|---|---|---|")?;
        for r in &sc.rss {
            writeln!(
                w,
                "| {} | {} | {} | {} | **{}** | {} / {} | {} | {:.0} KiB, {} points |",
                r.domains,
                r.conns,
                mib(r.rss_pipeline_kib),
                mib(r.rss_filled_kib),
                mib(r.rss_kib),
                mib(r.anon_kib),
                mib(r.file_kib),
                mib(r.hwm_kib),
                r.received_bytes as f64 / 1024.0,
                r.received_points
            )?;
        }
        writeln!(w)?;
    }

    let svg = live.as_ref().map(svg_plot).unwrap_or_default();
    Ok((md, svg))
}

/// Idle CPU per window vs N, log scale, agent and peer (each with and without libvirtd).
fn svg_plot(l: &LiveResult) -> String {
    let (wd, ht) = (640.0_f64, 400.0_f64);
    let (ml, mr, mt, mb) = (70.0, 180.0, 40.0, 50.0);
    let pw = wd - ml - mr;
    let ph = ht - mt - mb;
    let pts = |f: &dyn Fn(&crate::live::IdleRow) -> f64| -> Vec<(f64, f64)> {
        l.idle
            .iter()
            .map(|r| (r.domains as f64, f(r).max(1e-4)))
            .collect()
    };
    type Series<'a> = (&'a str, &'a str, bool, Vec<(f64, f64)>);
    let series: Vec<Series> = vec![
        (
            "peer + libvirtd",
            "#d62728",
            false,
            pts(&|r| r.peer.secs + r.libvirtd_with_peer.secs),
        ),
        ("peer alone", "#d62728", true, pts(&|r| r.peer.secs)),
        (
            "agent + libvirtd",
            "#1f77b4",
            false,
            pts(&|r| r.agent.secs + r.libvirtd_with_agent.secs),
        ),
        ("agent alone", "#1f77b4", true, pts(&|r| r.agent.secs)),
    ];
    let xmax = l.idle.iter().map(|r| r.domains).max().unwrap_or(1).max(1) as f64;
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.3.iter().map(|p| p.1))
        .collect();
    let lo = all
        .iter()
        .cloned()
        .fold(f64::INFINITY, f64::min)
        .log10()
        .floor();
    let hi = all
        .iter()
        .cloned()
        .fold(f64::NEG_INFINITY, f64::max)
        .log10()
        .ceil();
    let hi = if hi <= lo { lo + 1.0 } else { hi };
    let x = |v: f64| ml + v / xmax * pw;
    let y = |v: f64| mt + ph - (v.log10() - lo) / (hi - lo) * ph;
    let window = l.idle.first().map(|r| r.window_secs).unwrap_or(60.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{wd}" height="{ht}" viewBox="0 0 {wd} {ht}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="14" text-anchor="middle">Idle CPU per {window:.0} s vs paused domains (log scale)</text>"#,
        ml + pw / 2.0
    );
    let _ = writeln!(
        s,
        r#"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let mut e = lo;
    while e <= hi {
        let v = 10f64.powf(e);
        let yy = y(v);
        let label = if v >= 1.0 {
            format!("{v:.0} s")
        } else {
            format!("{:.0} ms", v * 1e3)
        };
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
            ml + pw,
            ml - 6.0,
            yy + 4.0
        );
        e += 1.0;
    }
    for r in &l.idle {
        let xx = x(r.domains as f64);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{}" y2="{}" stroke="#ddd"/><text x="{xx:.1}" y="{}" text-anchor="middle">{}</text>"##,
            mt,
            mt + ph,
            mt + ph + 16.0,
            r.domains
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">N (paused TCG domains)</text>"#,
        ml + pw / 2.0,
        ht - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">CPU seconds</text>"#,
        mt + ph / 2.0,
        mt + ph / 2.0
    );
    for (i, (name, color, dashed, p)) in series.iter().enumerate() {
        let path: Vec<String> = p
            .iter()
            .map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b)))
            .collect();
        let dash = if *dashed {
            r#" stroke-dasharray="5,4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
            path.join(" ")
        );
        for (a, b) in p {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                x(*a),
                y(*b)
            );
        }
        let ly = mt + 10.0 + i as f64 * 20.0;
        let lx = ml + pw + 12.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{name}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

/// `report` mode: print and write `<out>/results.md` and the SVG.
pub fn run(o: &ReportOpts) -> Result<()> {
    let (md, svg) = build(o)?;
    std::fs::write(o.out.join("results.md"), &md)?;
    if !svg.is_empty() {
        if let Some(d) = o.svg.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&o.svg, svg)?;
    }
    println!("{md}");
    Ok(())
}
