//! Simulated scale (no libvirt): the inventory and the export path driven through the public API
//! with N synthetic KubeVirt domains over C connections, as KubeVirt discovery would create them
//! (one connection per virt-launcher socket).
//!
//! - `scale`: collection time of the observable gauges (the agent's seven instruments, registered
//!   by the agent's own `export::register_instruments` on a provider from
//!   `export::provider_builder`), read by the SDK's `PeriodicReader` into an exporter that
//!   encodes the OTLP protobuf request (the same `opentelemetry-proto` transform the OTLP
//!   exporter uses) and records its size.
//! - `rss`: the agent's real pipeline (`export::Exporter::start` with the OTLP/gRPC exporter)
//!   exporting to a receiver in another process; the figure is this process's RSS.
//! - `scale-all`: runs each of the above in a fresh process per size and writes `scale.json`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use prost::Message;
use serde::{Deserialize, Serialize};
use virt_hypervisor_agent::config::{AgentConfig, ExporterKind, OptionalAttributes, Protocol};
use virt_hypervisor_agent::domain::{DomainFacts, HypervisorType};
use virt_hypervisor_agent::export::{self, Exporter};
use virt_hypervisor_agent::inventory::{ConnId, DomainRef, FetchOutcome, Lifecycle};
use virt_hypervisor_agent::state::Owner;

use crate::util::{self, median, percentile};

const NODE: &str = "bench-node-0";

/// Synthetic KubeVirt domain number `i`.
fn synthetic(i: usize) -> (DomainRef, DomainFacts) {
    let uuid = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        i,
        i % 65536,
        i % 4096,
        (i * 7) % 4096,
        i * 2654435761 % (1 << 48)
    );
    let name = format!("tenant-{:03}_vm-{:05}-{:x}", i % 50, i, (i * 40503) % 65536);
    let tcg = i % 10 == 9;
    let facts = DomainFacts {
        domain_type: Some(if tcg { "qemu" } else { "kvm" }.to_string()),
        hypervisor_type: if tcg {
            HypervisorType::QemuTcg
        } else {
            HypervisorType::Kvm
        },
        name: Some(name.clone()),
        uuid: Some(uuid.clone()),
        kubevirt: true,
        machine: Some("pc-q35-rhel9.4.0".to_string()),
        arch: Some("x86_64".to_string()),
        emulator: Some("/usr/libexec/qemu-kvm".to_string()),
        live: true,
    };
    (
        DomainRef {
            uuid,
            id: Some(i as u32 + 1),
            name,
        },
        facts,
    )
}

fn conn_of(i: usize, conns: usize) -> ConnId {
    (i % conns.max(1)) as ConnId + 1
}

/// Register `conns` discovered connections, as KubeVirt discovery would.
fn fill_telemetry(tel: &Owner, conns: usize) {
    for c in 0..conns.max(1) {
        let id = c as ConnId + 1;
        let pod = format!("{:08x}-1111-4222-8333-{:012x}", c, c);
        let path = PathBuf::from(format!(
            "/var/lib/kubelet/pods/{pod}/volumes/kubernetes.io~empty-dir/libvirt-runtime/virtqemud-sock"
        ));
        let (label, _) = virt_hypervisor_agent::discovery::paths::socket_uris(&path);
        let uid = virt_hypervisor_agent::discovery::paths::pod_uid(&path);
        tel.add(id, &label, uid, None);
        tel.set_up(id, true, Some("9.0.0".to_string()));
        tel.set_last_sync(id, Duration::from_millis(3));
        tel.telemetry().count_event(Lifecycle::Started);
    }
}

/// Start and fetch domains `range` through the state's owner, as the connection tasks do (their
/// connections registered by [`fill_telemetry`]). Returns ns per domain.
fn populate(inv: &Owner, range: std::ops::Range<usize>, conns: usize) -> f64 {
    let n = range.len().max(1);
    let t = Instant::now();
    for i in range {
        let (dom, facts) = synthetic(i);
        let conn = conn_of(i, conns);
        if let Some(req) = inv.on_event(conn, dom, Lifecycle::Started) {
            inv.on_fetch(&req, FetchOutcome::Facts(facts));
        }
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

/// [`populate`] on a bare inventory, the floor of what the owner adds. Returns ns per domain.
fn populate_bare(range: std::ops::Range<usize>, conns: usize) -> f64 {
    let mut inv = virt_hypervisor_agent::inventory::Inventory::new();
    let n = range.len().max(1);
    let t = Instant::now();
    for i in range {
        let (dom, facts) = synthetic(i);
        if let Some(req) = inv.apply_event(conn_of(i, conns), dom, Lifecycle::Started) {
            inv.apply_fetch(&req, FetchOutcome::Facts(facts));
        }
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

/// One simulated transition pair: domain `i` stops, a new incarnation of it starts and is read.
fn churn(inv: &Owner, i: usize, conns: usize, incarnation: u32) {
    let (mut dom, facts) = synthetic(i);
    let conn = conn_of(i, conns);
    inv.on_event(conn, dom.clone(), Lifecycle::Stopped);
    dom.id = Some(1_000_000 + incarnation);
    if let Some(req) = inv.on_event(conn, dom, Lifecycle::Started) {
        inv.on_fetch(&req, FetchOutcome::Facts(facts));
    }
}

/// What the benchmark exporter saw in one export.
#[derive(Clone, Debug, Default)]
struct Seen {
    entered: Option<Instant>,
    encode_ns: u64,
    bytes: usize,
    gzip_bytes: usize,
    info_points: usize,
    points: usize,
}

#[derive(Clone, Debug, Default)]
struct Probe {
    first_callback: Option<Instant>,
    gzip: bool,
    seen: Seen,
}

type SharedProbe = Arc<Mutex<Probe>>;

fn lock(p: &SharedProbe) -> std::sync::MutexGuard<'_, Probe> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

fn mark_callback(p: &SharedProbe) {
    let now = Instant::now();
    let mut g = lock(p);
    if g.first_callback.is_none() {
        g.first_callback = Some(now);
    }
}

/// A push exporter that builds the request exactly as the agent's OTLP sink does (the SDK
/// transform plus staleness tracking, `export::wire::Staleness`) and records when it was called
/// and the size.
#[derive(Debug)]
struct EncodingExporter(
    SharedProbe,
    std::sync::Mutex<virt_hypervisor_agent::export::wire::Staleness>,
);

impl PushMetricExporter for EncodingExporter {
    fn export(
        &self,
        metrics: &ResourceMetrics,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let entered = Instant::now();
        let t = Instant::now();
        let req = {
            let mut st = self.1.lock().unwrap_or_else(|p| p.into_inner());
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            let req = st.request(metrics, now, true);
            st.delivered();
            req
        };
        let bytes = req.encoded_len();
        let encode_ns = t.elapsed().as_nanos() as u64;
        let gzip = lock(&self.0).gzip;
        let gzip_bytes = if gzip {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            let _ = enc.write_all(&req.encode_to_vec());
            enc.finish().map(|v| v.len()).unwrap_or(0)
        } else {
            0
        };
        let (info_points, _) = crate::sink::summarise(&req);
        let points = req
            .resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .map(|m| match &m.data {
                Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Gauge(g)) => {
                    g.data_points.len()
                }
                Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Sum(s)) => {
                    s.data_points.len()
                }
                _ => 0,
            })
            .sum();
        lock(&self.0).seen = Seen {
            entered: Some(entered),
            encode_ns,
            bytes,
            gzip_bytes,
            info_points,
            points,
        };
        std::future::ready(Ok(()))
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn temporality(&self) -> Temporality {
        Temporality::Cumulative
    }
}

/// A probe instrument, registered before the agent's: the SDK runs callbacks in registration
/// order, so its callback marks the start of a collection. It observes nothing (no data point).
fn register_probe(provider: &SdkMeterProvider, probe: SharedProbe) {
    let _probe = provider
        .meter("bench-probe")
        .i64_observable_gauge("bench_collection_probe")
        .with_callback(move |_obs| mark_callback(&probe))
        .build();
}

/// Timing results for one size.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ScaleResult {
    pub domains: usize,
    pub conns: usize,
    pub attributes: String,
    pub collections: usize,
    /// The state's owner: on_event(STARTED) + on_fetch(Facts) per domain, ns (initial fill).
    pub populate_ns_per_domain: f64,
    /// The same fill applied to a bare inventory (no owner: no lock, no change signal), ns: the
    /// floor the owner's one door is measured against.
    pub populate_bare_ns_per_domain: f64,
    /// One stop + start + fetch applied to a full inventory, ns.
    pub churn_ns: f64,
    /// Inventory::snapshot() after a change (rebuild + sort), ms.
    pub snapshot_rebuild_ms: f64,
    /// Collection (all callbacks + SDK aggregation, until the exporter is called), ms:
    /// nothing changed since the previous collection.
    pub collect_ms_p50: f64,
    pub collect_ms_p99: f64,
    pub collect_ms_max: f64,
    /// Same, with one domain changed before every collection (snapshot rebuilt).
    pub collect_changed_ms_p50: f64,
    pub collect_changed_ms_p99: f64,
    /// Collection + OTLP encoding (one export's CPU before the network), ms.
    pub collect_encode_ms_p50: f64,
    /// OTLP transform + protobuf size computation, ms.
    pub encode_ms_p50: f64,
    /// Export request size, bytes (protobuf, uncompressed) and gzip-compressed.
    pub payload_bytes: usize,
    pub payload_gzip_bytes: usize,
    pub info_points: usize,
    pub total_points: usize,
    /// RSS of this timing process at the end, KiB (context only; see `rss`).
    pub rss_kib: u64,
}

/// `scale` mode: one size, in this process.
pub fn run_scale(
    domains: usize,
    conns: usize,
    collections: usize,
    all_attrs: bool,
) -> Result<ScaleResult> {
    let owner = Owner::new();
    fill_telemetry(&owner, conns);
    let populate_ns = populate(&owner, 0..domains, conns);
    let populate_bare_ns = populate_bare(0..domains, conns);
    let probe: SharedProbe = Arc::new(Mutex::new(Probe::default()));
    let mut cfg = AgentConfig::default();
    if all_attrs {
        cfg.metric.attributes = OptionalAttributes {
            domain: true,
            uuid: true,
            machine: true,
            emulator: true,
            arch: true,
            hypervisor_version: true,
            pod_uid: true,
            domain_type: true,
        };
    }
    let reader = PeriodicReader::builder(EncodingExporter(
        Arc::clone(&probe),
        std::sync::Mutex::new(virt_hypervisor_agent::export::wire::Staleness::new(1 << 16)),
    ))
    .with_interval(Duration::from_secs(3600))
    .build();
    // The agent's own provider setup and instruments, with this benchmark's reader.
    let provider = export::provider_builder(&cfg, NODE)
        .with_reader(reader)
        .build();
    register_probe(&provider, Arc::clone(&probe));
    export::register_instruments(&provider, &cfg, NODE, owner.store());

    let collect_once = |gzip: bool| -> Result<(f64, Seen)> {
        {
            let mut p = lock(&probe);
            p.first_callback = None;
            p.gzip = gzip;
            p.seen = Seen::default();
        }
        provider.force_flush().context("force_flush")?;
        let p = lock(&probe).clone();
        let (Some(first), Some(entered)) = (p.first_callback, p.seen.entered) else {
            bail!("the exporter or the callbacks did not run");
        };
        let collect = entered.saturating_duration_since(first).as_secs_f64() * 1e3;
        Ok((collect, p.seen))
    };

    // Warm-up (first collection allocates the aggregation maps), and sizes.
    let (_, first) = collect_once(true)?;
    let mut collect = Vec::new();
    let mut encode = Vec::new();
    let mut collect_encode = Vec::new();
    for _ in 0..collections {
        let (c, s) = collect_once(false)?;
        collect.push(c);
        encode.push(s.encode_ns as f64 / 1e6);
        collect_encode.push(c + s.encode_ns as f64 / 1e6);
    }
    let mut changed = Vec::new();
    let mut churn_ns = Vec::new();
    let mut rebuild = Vec::new();
    for k in 0..collections {
        if domains > 0 {
            let t = Instant::now();
            churn(&owner, (k * 7919) % domains, conns, k as u32);
            churn_ns.push(t.elapsed().as_nanos() as f64);
        }
        let (c, _) = collect_once(false)?;
        changed.push(c);
        if domains > 0 {
            churn(&owner, (k * 104729) % domains, conns, 500_000 + k as u32);
            let t = Instant::now();
            let _ = owner.store().snapshot();
            rebuild.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let _ = provider.shutdown();
    Ok(ScaleResult {
        domains,
        conns,
        attributes: if all_attrs { "all" } else { "default" }.to_string(),
        collections,
        populate_ns_per_domain: populate_ns,
        populate_bare_ns_per_domain: populate_bare_ns,
        churn_ns: median(&churn_ns),
        snapshot_rebuild_ms: median(&rebuild),
        collect_ms_p50: median(&collect),
        collect_ms_p99: percentile(&collect, 99.0),
        collect_ms_max: percentile(&collect, 100.0),
        collect_changed_ms_p50: median(&changed),
        collect_changed_ms_p99: percentile(&changed, 99.0),
        collect_encode_ms_p50: median(&collect_encode),
        encode_ms_p50: median(&encode),
        payload_bytes: first.bytes,
        payload_gzip_bytes: first.gzip_bytes,
        info_points: first.info_points,
        total_points: first.points,
        rss_kib: util::self_mem()?.rss,
    })
}

/// RSS of the real pipeline at one size.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RssResult {
    pub domains: usize,
    pub conns: usize,
    /// Runtime + OTLP exporter + meter provider, before any domain, KiB.
    pub rss_pipeline_kib: u64,
    /// After filling the inventory and telemetry, KiB.
    pub rss_filled_kib: u64,
    /// After two exports received by the out-of-process receiver, KiB: the figure.
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// RssAnon / RssFile at the end, KiB.
    pub anon_kib: u64,
    pub file_kib: u64,
    /// Request size as received, bytes.
    pub received_bytes: usize,
    pub received_points: usize,
}

/// `rss` mode: the agent's own export pipeline (`Exporter::start`, OTLP/gRPC) in this process,
/// sending to a receiver in a child process.
pub fn run_rss(domains: usize, conns: usize) -> Result<RssResult> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(&exe)
        .arg("sink")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn the sink process")?;
    let stdout = child.stdout.take().context("sink stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = (|| -> Result<RssResult> {
        let first = rx
            .recv_timeout(Duration::from_secs(10))
            .context("sink did not start")?;
        let endpoint = first
            .strip_prefix("listening ")
            .context("unexpected sink output")?
            .to_string();
        // Same runtime shape as the agent's main.rs (one worker).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(64)
            .enable_all()
            .build()?;
        let mut cfg = AgentConfig {
            node_name: NODE.to_string(),
            ..AgentConfig::default()
        };
        cfg.export.exporter = ExporterKind::Otlp;
        cfg.export.protocol = Some(Protocol::Grpc);
        cfg.export.endpoint = Some(endpoint);
        cfg.export.interval = Some(Duration::from_secs(3600));
        let owner = Owner::new();
        let exporter = {
            let _g = rt.enter();
            Exporter::start(&cfg, NODE, owner.store())?
        };
        let export_task = {
            let _g = rt.enter();
            exporter.spawn_export_task(Duration::from_millis(20))
        };
        let wait_export = |want: usize| -> Result<(usize, usize)> {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    if f.first() == Some(&"req") {
                        let b: usize = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
                        let p: usize = f.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);
                        if p == want {
                            return Ok((b, p));
                        }
                    }
                }
            }
            bail!("no export with {want} points reached the receiver")
        };
        // Baseline: the pipeline with nothing in it (one export of the self-metrics).
        fill_telemetry(&owner, if domains == 0 { 1 } else { conns });
        owner.touch();
        wait_export(0)?;
        let pipeline = util::self_mem()?.rss;
        populate(&owner, 0..domains, conns);
        let filled = util::self_mem()?.rss;
        let mut got = (0, 0);
        for _ in 0..2 {
            owner.touch();
            got = wait_export(domains)?;
        }
        std::thread::sleep(Duration::from_millis(200));
        let m = util::self_mem()?;
        if let Some(t) = export_task {
            t.abort();
        }
        rt.block_on(exporter.shutdown(Duration::from_secs(2)));
        rt.shutdown_timeout(Duration::from_millis(200));
        Ok(RssResult {
            domains,
            conns,
            rss_pipeline_kib: pipeline,
            rss_filled_kib: filled,
            rss_kib: m.rss,
            hwm_kib: m.hwm,
            anon_kib: m.anon,
            file_kib: m.file,
            received_bytes: got.0,
            received_points: got.1,
        })
    })();
    drop(child.stdin.take());
    util::stop_child(&mut child, Duration::from_secs(3));
    result
}

/// Everything `scale-all` measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScaleAll {
    pub timing: Vec<ScaleResult>,
    pub rss: Vec<RssResult>,
}

fn conns_for(domains: usize, per_conn: usize) -> usize {
    (domains / per_conn.max(1)).max(1)
}

fn run_self<T: for<'de> Deserialize<'de>>(args: &[String]) -> Result<T> {
    let exe = std::env::current_exe()?;
    let out = Command::new(&exe)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {} {}", exe.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{} {}` failed: {}",
            exe.display(),
            args.join(" "),
            out.status
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON result line")?;
    Ok(serde_json::from_str(line)?)
}

/// `scale-all`: every size in its own process; writes `<out>/scale.json`.
pub fn run_all(
    out: &Path,
    timing_sizes: &[usize],
    rss_sizes: &[usize],
    per_conn: usize,
    collections: usize,
) -> Result<ScaleAll> {
    let mut all = ScaleAll::default();
    for &n in timing_sizes {
        for attrs in ["default", "all"] {
            if attrs == "all" && n != *timing_sizes.iter().max().unwrap_or(&n) {
                continue;
            }
            let c = conns_for(n, per_conn);
            eprintln!("scale: timing {n} domains over {c} connections, {attrs} attributes");
            let r: ScaleResult = run_self(&[
                "scale".into(),
                "--domains".into(),
                n.to_string(),
                "--conns".into(),
                c.to_string(),
                "--collections".into(),
                collections.to_string(),
                "--attrs".into(),
                attrs.into(),
            ])?;
            eprintln!(
                "scale:   collect p50 {:.3} ms (after a change {:.3} ms), payload {} B",
                r.collect_ms_p50, r.collect_changed_ms_p50, r.payload_bytes
            );
            all.timing.push(r);
        }
    }
    for &n in rss_sizes {
        let c = conns_for(n, per_conn);
        eprintln!("scale: RSS {n} domains over {c} connections");
        let r: RssResult = run_self(&[
            "rss".into(),
            "--domains".into(),
            n.to_string(),
            "--conns".into(),
            c.to_string(),
        ])?;
        eprintln!("scale:   RSS {:.1} MiB", r.rss_kib as f64 / 1024.0);
        all.rss.push(r);
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("scale.json"), serde_json::to_string_pretty(&all)?)?;
    Ok(all)
}

/// Print one result as the JSON line `run_self` reads.
pub fn emit<T: Serialize>(r: &T) -> Result<()> {
    println!("{}", serde_json::to_string(r)?);
    Ok(())
}
