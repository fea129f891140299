//! Command line: `run` (default), `inventory`, `check-config`.
//!
//! Exit codes: 0 success, 2 configuration error (nothing was opened), 1 runtime failure.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use virt_hypervisor_agent::agent;
use virt_hypervisor_agent::config::{self, AgentConfig, LoadOptions};
use virt_hypervisor_agent::export::points::{Fate, InfoPoints};
use virt_hypervisor_agent::export::Telemetry;
use virt_hypervisor_agent::logging::{self, escape_control as esc};

#[derive(Debug, Parser)]
#[command(
    name = "virt-hypervisor-agent",
    version,
    about = "Reports which hypervisor (KVM, QEMU TCG) runs every libvirt/KubeVirt VM on this host, as OpenTelemetry metrics"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Args)]
struct Common {
    /// YAML configuration file [default: /etc/virt-hypervisor-agent/config.yaml if it exists]
    #[arg(
        long,
        short = 'c',
        global = true,
        value_name = "FILE",
        env = "VIRT_HYPERVISOR_AGENT_CONFIG"
    )]
    config: Option<PathBuf>,
    /// libvirt URI to watch (repeatable; replaces libvirt.uris)
    #[arg(long = "uri", global = true, value_name = "URI")]
    uris: Vec<String>,
    /// Node name for the `node` attribute (overrides node_name and NODE_NAME)
    #[arg(long, global = true)]
    node_name: Option<String>,
    /// OTLP endpoint (export.endpoint)
    #[arg(long, global = true, value_name = "URL")]
    endpoint: Option<String>,
    /// OTLP protocol: grpc or http/protobuf (export.protocol)
    #[arg(long, global = true)]
    protocol: Option<String>,
    /// Exporter: otlp, stdout or none (export.exporter)
    #[arg(long, global = true)]
    exporter: Option<String>,
    /// Log filter, e.g. info or debug (log.level; RUST_LOG wins)
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log format: text or json (log.format)
    #[arg(long, global = true)]
    log_format: Option<String>,
    /// Set any configuration key, e.g. --set export.debounce=100ms (repeatable)
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (the default)
    Run,
    /// Connect, list, classify, print what would be exported now, and exit
    Inventory {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration and print the effective config
    CheckConfig,
}

fn overrides(c: &Common) -> Result<Vec<(String, String)>, String> {
    let mut o = Vec::new();
    if !c.uris.is_empty() {
        o.push(("libvirt.uris".to_string(), c.uris.join(",")));
    }
    let simple = [
        ("node_name", &c.node_name),
        ("export.endpoint", &c.endpoint),
        ("export.protocol", &c.protocol),
        ("export.exporter", &c.exporter),
        ("log.level", &c.log_level),
        ("log.format", &c.log_format),
    ];
    for (k, v) in simple {
        if let Some(v) = v {
            o.push((k.to_string(), v.clone()));
        }
    }
    for s in &c.set {
        let (k, v) = s.split_once('=').ok_or_else(|| {
            format!("--set {s:?}: expected KEY=VALUE, e.g. --set export.debounce=100ms")
        })?;
        o.push((k.trim().to_string(), v.to_string()));
    }
    Ok(o)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = match overrides(&cli.common) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = LoadOptions {
        path: cli.common.config.clone(),
        env: None,
        overrides,
    };
    let (cfg, warnings) = match config::load_with_warnings(&opts) {
        Ok(l) => (l.config, l.warnings),
        Err(e) => {
            eprintln!("configuration error: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            let yaml = config::to_yaml(&cfg) + "\n";
            if let Err(e) =
                std::io::Write::write_all(&mut std::io::stdout().lock(), yaml.as_bytes())
            {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    eprintln!("error: writing the configuration: {e}");
                    return ExitCode::FAILURE;
                }
            }
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            eprintln!("configuration is valid");
            ExitCode::SUCCESS
        }
        Command::Inventory { json } => {
            logging::init(&cfg);
            warn_config(&warnings);
            inventory(&cfg, json)
        }
        Command::Run => {
            logging::init(&cfg);
            warn_config(&warnings);
            warn_export_interval_env(&cfg);
            let config_file = cli.common.config.clone().or_else(|| {
                let default = std::path::Path::new(config::DEFAULT_CONFIG_PATH);
                default.exists().then(|| default.to_path_buf())
            });
            confine_self(&cfg, config_file.as_deref());
            run(cfg)
        }
    }
}

/// Confine the process with Landlock (src/confine.rs) before any thread or connection exists,
/// and say what that achieved.
fn confine_self(cfg: &AgentConfig, config_file: Option<&std::path::Path>) {
    use virt_hypervisor_agent::confine::{self, Plan, Status};
    let (endpoint, tls) = match cfg.export.exporter {
        config::ExporterKind::Otlp => {
            let s = virt_hypervisor_agent::export::otlp::Settings::resolve(&cfg.export);
            let tls: Vec<_> = [s.ca, s.cert, s.key].into_iter().flatten().collect();
            (Some(s.endpoint), tls)
        }
        config::ExporterKind::Stdout | config::ExporterKind::None => (None, Vec::new()),
    };
    let plan = Plan::for_config(cfg, config_file, endpoint.as_deref(), &tls);
    match confine::apply(&plan) {
        Status::Full => tracing::info!(
            tcp_ports = ?plan.tcp_connect.unwrap_or_default(),
            "confined with Landlock: read-only access to the files the agent needs, directory \
             listing under the discovery roots, no file writes, TCP only to the export port"
        ),
        Status::Partial => tracing::warn!(
            "confined with Landlock, partly: this kernel's Landlock is older than the rules asked \
             for (network rules need ABI 4, device queries ABI 5)"
        ),
        Status::None => tracing::warn!(
            "Landlock is not available on this kernel: the agent runs unconfined \
             (virt_hypervisor_agent_landlock{{status=\"none\"}})"
        ),
        Status::Off => tracing::warn!(
            reason = plan.off.as_deref().unwrap_or(""),
            "Landlock confinement is off"
        ),
    }
}

/// The configuration loaded, but set keys that are obsolete and ignored.
fn warn_config(warnings: &[String]) {
    for w in warnings {
        tracing::warn!("configuration: {w}");
    }
}

/// `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds) is read by the exporter when `export.interval`
/// is unset; say so when it is not a number (ignored) or out of range (clamped).
fn warn_export_interval_env(cfg: &AgentConfig) {
    if let (_, Some(problem)) = config::export_interval(cfg.export.interval) {
        tracing::warn!("{problem}");
    }
}

/// Pods a Kubernetes node runs at most by default (kubelet `--max-pods`); a KubeVirt node can
/// have one launcher connection per pod.
const NODE_MAX_PODS: usize = 110;

/// One async worker: the async side (event handling, resync bookkeeping, the export task, the
/// exporters' connections) is light, and every blocking libvirt call runs on the blocking pool.
/// A single worker also keeps each export's allocations in one malloc arena: with two, exports
/// alternated between arenas and the resident set at 10,000 domains was 38 or 49 MiB depending
/// on which worker ran them.
///
/// Blocking threads are bounded per connection (each holds one of its `fetch_concurrency`
/// permits, even past its timeout), so a hung daemon only ever holds its own. The pool's cap is a
/// backstop sized so it never binds before those per-connection bounds on a full node: were it
/// lower (it was 64), a few dozen hung launcher daemons would starve the healthy ones.
fn runtime(cfg: &AgentConfig) -> std::io::Result<tokio::runtime::Runtime> {
    let connections = NODE_MAX_PODS + cfg.libvirt.uris.len();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(connections * cfg.libvirt.fetch_concurrency.max(1) + 16)
        .thread_name("vha-worker")
        .enable_all()
        .build()
}

fn run(cfg: AgentConfig) -> ExitCode {
    let rt = match runtime(&cfg) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(agent::run(cfg, shutdown_signal()));
    // The agent finished within its shutdown deadline; blocking threads still stuck on a hung
    // daemon must not hold the exit hostage.
    rt.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", esc(&error_chain(&e)));
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP all stop the agent cleanly (final flush, exit 0). SIGHUP is not
/// a reload: the configuration is read once at start, and a reload that kept unchanged
/// connections would need the connection registry to diff against; until then, a stop that
/// a supervisor restarts (systemd, the DaemonSet) applies a new configuration with no half
/// state. Without a handler, SIGHUP killed the agent with no flush and no log line.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    let hup = signal(SignalKind::hangup());
    match (term, int, hup) {
        (Ok(mut term), Ok(mut int), Ok(mut hup)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
                _ = hup.recv() => tracing::info!(
                    "SIGHUP received: stopping as for SIGTERM (the configuration is read at start; \
                     restart the agent to apply a change)"
                ),
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; falling back to Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn inventory(cfg: &AgentConfig, json: bool) -> ExitCode {
    let rt = match runtime(cfg) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let node = agent::resolve_node_name(cfg);
    let result = rt.block_on(agent::inventory_once(cfg));
    rt.shutdown_background();
    let agent::InventoryOnce {
        snapshot: snap,
        labels,
        failures,
    } = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}", esc(&error_chain(&e)));
            return ExitCode::FAILURE;
        }
    };
    for (uri, err) in &failures {
        eprintln!("warning: {}: {}", esc(uri), esc(err));
    }
    // What the gauge would make of these domains: shared attribute sets and the cardinality
    // limit (hypervisor_version is not known here, so with that attribute on, domains that differ
    // only in it are shown as sharing a series).
    let conns = Telemetry::new();
    for (i, uri) in cfg.libvirt.uris.iter().enumerate() {
        conns.add_connection(i as u64 + 1, uri, None, None);
    }
    let mut points = InfoPoints::new(&node, cfg.metric.attributes.clone())
        .with_cardinality_limit(cfg.metric.cardinality_limit)
        .without_logging();
    points
        .refresh(Arc::clone(&snap), conns.connection_meta())
        .for_each(drop);
    let fates = points.fates();
    let stats = points.stats();
    let mut out = String::new();
    if json {
        let rows: Vec<serde_json::Value> = snap
            .domains
            .iter()
            .zip(&fates)
            .map(|(d, fate)| {
                serde_json::json!({
                    "namespace": d.identity.namespace,
                    "name": d.identity.name,
                    "node": node,
                    "hypervisor_type": d.hypervisor_type.as_str(),
                    "domain": d.domain_name,
                    "uuid": d.uuid,
                    "id": d.id,
                    "uri": labels.get(&d.conn),
                    "series": match fate {
                        Fate::Exported => "own",
                        Fate::Shared => "shared",
                        Fate::OverLimit => "over_limit",
                        Fate::OverConnectionLimit => "over_connection_limit",
                    },
                })
            })
            .collect();
        match serde_json::to_string_pretty(&rows) {
            Ok(s) => out = s + "\n",
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        out += &format!(
            "{:<20} {:<32} {:<16} {:<10} DOMAIN\n",
            "NAMESPACE", "NAME", "NODE", "HYPERVISOR"
        );
        for (d, fate) in snap.domains.iter().zip(&fates) {
            // Names come from whoever defined the domain: one row is always one line.
            out += &format!(
                "{:<20} {:<32} {:<16} {:<10} {}{}\n",
                esc(d.identity.namespace.as_deref().unwrap_or("-")),
                esc(&d.identity.name),
                esc(&node),
                d.hypervisor_type.as_str(),
                esc(&d.domain_name),
                match fate {
                    Fate::Exported => "",
                    Fate::Shared => "  (same series as a domain above)",
                    Fate::OverLimit => "  (over metric.cardinality_limit: not exported)",
                    Fate::OverConnectionLimit => {
                        "  (over libvirt.discover.max_domains_per_socket: not exported)"
                    }
                }
            );
        }
        out += &format!(
            "{} active domain(s), {} series{}\n",
            stats.domains,
            stats.sets,
            if stats.over_limit > 0 {
                format!(" ({} beyond metric.cardinality_limit)", stats.over_limit)
            } else {
                String::new()
            }
        );
    }
    if stats.collisions > 0 {
        eprintln!(
            "warning: {} domain(s) share an attribute set with another domain and are exported as one series; \
             enable metric.attributes.uuid or pod_uid to tell them apart",
            stats.collisions
        );
    }
    if stats.over_limit > 0 {
        eprintln!(
            "warning: {} of {} attribute sets are beyond metric.cardinality_limit ({}): \
             they would be exported only as one otel.metric.overflow=true point",
            stats.over_limit, stats.sets, cfg.metric.cardinality_limit
        );
    }
    if let Err(e) = std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes()) {
        // A reader that stopped early (`inventory | head`) is not an error.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: writing the inventory: {e}");
            return ExitCode::FAILURE;
        }
    }
    if failures.len() == cfg.libvirt.uris.len() && !failures.is_empty() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
