//! Command line: `run` (default), `inventory`, `check-config`.
//!
//! Exit codes: 0 success, 2 configuration error (nothing was opened), 1 runtime failure.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use virt_hypervisor_agent::agent;
use virt_hypervisor_agent::config::{self, AgentConfig, LoadOptions, LogFormat};

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

fn init_logging(cfg: &AgentConfig) {
    // RUST_LOG, when set, replaces log.level. The SDK logs every failed export attempt; the
    // agent reports failures itself, rate limited (export::reporting), so opentelemetry's own
    // logs are off unless the filter names them.
    let level = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => v,
        _ => cfg.log.level.clone(),
    };
    let filter = if level.contains("opentelemetry") {
        EnvFilter::try_new(&level)
    } else {
        EnvFilter::try_new(format!("{level},opentelemetry=off"))
    }
    .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match cfg.log.format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        LogFormat::Text => builder.with_ansi(ansi).init(),
    }
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
    let cfg = match config::load(&opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("configuration error: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            println!("{}", config::load::to_yaml(&cfg));
            eprintln!("configuration is valid");
            ExitCode::SUCCESS
        }
        Command::Inventory { json } => {
            init_logging(&cfg);
            inventory(&cfg, json)
        }
        Command::Run => {
            init_logging(&cfg);
            run(cfg)
        }
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
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
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
            eprintln!("error: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    for (uri, err) in &failures {
        eprintln!("warning: {uri}: {err}");
    }
    if json {
        let rows: Vec<serde_json::Value> = snap
            .domains
            .iter()
            .map(|d| {
                serde_json::json!({
                    "namespace": d.identity.namespace,
                    "name": d.identity.name,
                    "node": node,
                    "hypervisor_type": d.hypervisor_type.as_str(),
                    "domain": d.domain_name,
                    "uuid": d.uuid,
                    "id": d.id,
                    "vmi_uid": d.facts.kubevirt.as_ref().and_then(|k| k.uid.clone()),
                    "uri": labels.get(&d.conn),
                })
            })
            .collect();
        match serde_json::to_string_pretty(&rows) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        println!(
            "{:<20} {:<32} {:<16} {:<10} DOMAIN",
            "NAMESPACE", "NAME", "NODE", "HYPERVISOR"
        );
        for d in &snap.domains {
            println!(
                "{:<20} {:<32} {:<16} {:<10} {}",
                d.identity.namespace.as_deref().unwrap_or("-"),
                d.identity.name,
                node,
                d.hypervisor_type.as_str(),
                d.domain_name
            );
        }
        println!("{} active domain(s)", snap.domains.len());
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
