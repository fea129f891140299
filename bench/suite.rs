//! The benchmark suite (see BENCHMARKS.md). Run everything with `bash bench/run.sh`.
//!
//! Modes (`cargo bench --bench suite -- MODE [OPTIONS]`):
//! - `live`: real libvirtd + QEMU: idle cost, change visibility, initial sync and per-transition
//!   CPU of the agent vs the peer `prometheus-libvirt-exporter` and the `virsh` floor.
//! - `scale-all`: simulated 0…10,000 domains: collection time, payload, RSS (a process per size,
//!   through the hidden modes `scale`, `rss` and `sink`).
//! - `report`: tables (markdown) and the SVG plot from the results of the above.
//!
//! Without a mode (as under `cargo test --all-targets`) it runs a short smoke check of the
//! simulated path and asserts nothing about time.
//!
//! The modules live in `bench/suite/`; the libvirt session daemon and the OTLP receiver are the
//! integration tests' own (`tests/common/`, through `bench/common.rs`).

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

mod common;

/// The suite's modules, in `bench/suite/`.
mod suite {
    pub mod live;
    pub mod report;
    pub mod scale;
    pub mod sink;
    #[allow(unsafe_code)]
    pub mod util;
}

use suite::{live, report, scale, sink, util};

struct Args(Vec<String>);

impl Args {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }

    fn str_or(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or(default).to_string()
    }

    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T> {
        match self.get(name) {
            Some(v) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("{name}: not a number: {v:?}")),
            None => Ok(default),
        }
    }

    fn list(&self, name: &str, default: &[usize]) -> Result<Vec<usize>> {
        match self.get(name) {
            Some(v) => v
                .split(',')
                .map(|x| x.trim().parse().context(format!("{name}: {x:?}")))
                .collect(),
            None => Ok(default.to_vec()),
        }
    }

    /// A comma-separated list of strings (empty when the option is absent).
    fn strings(&self, name: &str) -> Vec<String> {
        self.get(name)
            .map(|v| v.split(',').map(str::to_string).collect())
            .unwrap_or_default()
    }
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("suite: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    // `cargo bench` appends `--bench`; `cargo test` passes nothing.
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let bench = raw.iter().any(|a| a == "--bench");
    let args = Args(raw.into_iter().filter(|a| a != "--bench").collect());
    let mode = args.0.first().cloned().unwrap_or_default();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    match mode.as_str() {
        "live" => {
            let o = live::LiveOpts {
                uri: args.str_or("--uri", "private"),
                agent_bin: PathBuf::from(
                    args.get("--agent-bin")
                        .context("--agent-bin PATH (the release build) is required")?,
                ),
                peer_bin: args.str_or("--peer-bin", "prometheus-libvirt-exporter"),
                out: PathBuf::from(args.str_or("--out", "bench/out")),
                sizes: args.list("--sizes", &[10, 50, 100])?,
                idle_secs: args.num("--idle-secs", 60.0)?,
                transitions: args.num("--transitions", 100)?,
                peer_transitions: args.num("--peer-transitions", 50)?,
                scrape_secs: args.num("--scrape-secs", 15.0)?,
                sync_runs: args.num("--sync-runs", 5)?,
                phases: args.strings("--phases"),
                perf: args.get("--perf").map(PathBuf::from),
                agent_sets: args.strings("--agent-set"),
            };
            live::run(&o)?;
        }
        "scale" => {
            let r = scale::run_scale(
                args.num("--domains", 10_000)?,
                args.num("--conns", 1_000)?,
                args.num("--collections", 100)?,
                args.get("--attrs") == Some("all"),
            )?;
            scale::emit(&r)?;
        }
        "rss" => {
            let r = scale::run_rss(args.num("--domains", 10_000)?, args.num("--conns", 1_000)?)?;
            scale::emit(&r)?;
        }
        "sink" => sink::run_child()?,
        "scale-all" => {
            let sizes = args.list("--sizes", &[0, 100, 1_000, 10_000])?;
            scale::run_all(
                &PathBuf::from(args.str_or("--out", "bench/out")),
                &sizes,
                &sizes,
                args.num("--per-conn", 10)?,
                args.num("--collections", 200)?,
            )?;
        }
        "report" => {
            let since = match args.get("--since") {
                Some(s) => Some(UNIX_EPOCH + Duration::from_secs(s.parse().context("--since")?)),
                None => None,
            };
            report::run(&report::ReportOpts {
                out: PathBuf::from(args.str_or("--out", "bench/out")),
                criterion: PathBuf::from(args.str_or("--criterion", "target/criterion")),
                since,
                svg: PathBuf::from(args.str_or("--svg", "docs/idle-cpu-vs-n.svg")),
                repo,
                command: args.str_or("--command", "bash bench/run.sh"),
            })?;
        }
        "" => {
            // Smoke check (cargo test / plain cargo bench): the simulated path at 1,000 domains.
            let r = scale::run_scale(1_000, 100, 5, false)?;
            if r.info_points != 1_000 {
                bail!(
                    "smoke: expected 1000 points, the export had {}",
                    r.info_points
                );
            }
            println!(
                "suite smoke: 1000 simulated domains exported ({} bytes); run `bash bench/run.sh` for the benchmarks{}",
                r.payload_bytes,
                if bench { "" } else { " (no timing checked)" }
            );
        }
        other => bail!("unknown mode {other:?}: live, scale-all, report (or scale, rss, sink)"),
    }
    Ok(())
}
