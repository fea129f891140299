//! Command line: `run` (default), `inventory`, `check-config`.
//!
//! Exit codes: 0 success, 2 configuration error (nothing was opened), 1 runtime failure.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use tokio::sync::mpsc;
use virt_hypervisor_agent::agent;
use virt_hypervisor_agent::config::{self, AgentConfig, LoadOptions};
use virt_hypervisor_agent::confine::Plan;
use virt_hypervisor_agent::logging::{self, error_chain, escape_control as esc};

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
            let confined = confine_self(&cfg, config_file.as_deref());
            run(cfg, opts, confined, config_file)
        }
    }
}

/// What Landlock must allow for `cfg` (its export endpoint and TLS files resolved as the
/// exporter resolves them).
fn confinement_plan(cfg: &AgentConfig, config_file: Option<&std::path::Path>) -> Plan {
    let (endpoint, tls) = match cfg.export.exporter {
        config::ExporterKind::Otlp => {
            let s = virt_hypervisor_agent::export::otlp::Settings::resolve(&cfg.export);
            let tls: Vec<_> = [s.ca, s.cert, s.key].into_iter().flatten().collect();
            (Some(s.endpoint), tls)
        }
        config::ExporterKind::Stdout | config::ExporterKind::None => (None, Vec::new()),
    };
    Plan::for_config(cfg, config_file, endpoint.as_deref(), &tls)
}

/// Confine the process with Landlock (src/confine.rs) before any thread or connection exists,
/// and say what that achieved; the plan in force, if any.
fn confine_self(cfg: &AgentConfig, config_file: Option<&std::path::Path>) -> Option<Plan> {
    use virt_hypervisor_agent::confine::{self, Status};
    let plan = confinement_plan(cfg, config_file);
    let status = confine::apply(&plan);
    match status {
        Status::Full => tracing::info!(
            tcp_ports = ?plan.tcp_connect.clone().unwrap_or_default(),
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
    matches!(status, Status::Full | Status::Partial).then_some(plan)
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

/// Run the agent; `load` re-reads the configuration at SIGHUP, `confined` is the Landlock plan
/// in force (reloads must stay within it).
fn run(
    cfg: AgentConfig,
    load: LoadOptions,
    confined: Option<Plan>,
    config_file: Option<PathBuf>,
) -> ExitCode {
    let rt = match runtime(&cfg) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (tx, configs) = mpsc::channel(1);
    let reloads = agent::reload::Reloads {
        configs,
        allowed: Box::new(move |cfg| match &confined {
            Some(applied) => applied.covers(&confinement_plan(cfg, config_file.as_deref())),
            None => Ok(()),
        }),
    };
    let result = rt.block_on(agent::run(cfg, signals(load, tx), reloads));
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

/// SIGTERM and SIGINT stop the agent cleanly (final flush, exit 0). SIGHUP reloads: the
/// configuration is read again (file, environment and the same command-line flags) and
/// validated on a blocking thread; an invalid one is logged with its key and the running
/// configuration stays, a valid one goes to the agent, which applies it (src/agent/reload.rs).
async fn signals(load: LoadOptions, reloads: mpsc::Sender<AgentConfig>) {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    let hup = signal(SignalKind::hangup());
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (term, int, hup) else {
        tracing::warn!("cannot install signal handlers; falling back to Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return tracing::info!("SIGTERM received"),
            _ = int.recv() => return tracing::info!("SIGINT received"),
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                let opts = load.clone();
                match tokio::task::spawn_blocking(move || config::load_with_warnings(&opts)).await {
                    Ok(Ok(loaded)) => {
                        warn_config(&loaded.warnings);
                        let _ = reloads.send(loaded.config).await;
                    }
                    Ok(Err(e)) => tracing::error!(
                        "configuration not reloaded: {}; the running configuration is kept",
                        error_chain(&e)
                    ),
                    Err(e) => tracing::error!(error = %e, "configuration not reloaded: reading it failed"),
                }
            }
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
    let node = virt_hypervisor_agent::node::name(cfg);
    let result = rt.block_on(agent::once::inventory_once(cfg));
    rt.shutdown_background();
    let found = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}", esc(&error_chain(&e)));
            return ExitCode::FAILURE;
        }
    };
    for (uri, err) in &found.failures {
        eprintln!("warning: {}: {}", esc(uri), esc(err));
    }
    let rendered = match found.render(cfg, &node, json) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    for w in &rendered.warnings {
        eprintln!("warning: {w}");
    }
    if let Err(e) =
        std::io::Write::write_all(&mut std::io::stdout().lock(), rendered.out.as_bytes())
    {
        // A reader that stopped early (`inventory | head`) is not an error.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: writing the inventory: {e}");
            return ExitCode::FAILURE;
        }
    }
    if found.failures.len() == cfg.libvirt.uris.len() && !found.failures.is_empty() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
