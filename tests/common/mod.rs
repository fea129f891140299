//! Helpers shared by the integration tests: an in-process OTLP receiver ([`receiver`]), a real libvirtd
//! driven through `virsh` ([`libvirt`]), the agent binary as a child process ([`Agent`]) or in-process
//! ([`in_process`]), and [`wait_until`].
//!
//! Each test binary compiles this module and uses a part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod in_process;
pub mod libvirt;
pub mod pipeline;
pub mod receiver;
pub mod reliability;
pub mod session;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The metric the agent exports, one series per running VMI (README "Metric reference").
pub const METRIC: &str = "kubevirt_vmi_hypervisor_info";
/// The agent's per-connection self-metrics: the connection is up (1) or down (0), and how often it
/// was re-established.
pub const UP: &str = "virt_hypervisor_agent_connection_up";
pub const RECONNECTS: &str = "virt_hypervisor_agent_reconnects";

/// Poll `cond` every 5 ms until it holds or `timeout` passes; returns how long it took.
pub fn wait_until<F>(timeout: Duration, mut cond: F) -> Result<Duration>
where
    F: FnMut() -> bool,
{
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `t - origin` in milliseconds, negative when `t` came first (a change seen before the action
/// that caused it returned).
pub fn signed_ms(t: Instant, origin: Instant) -> f64 {
    if t >= origin {
        (t - origin).as_secs_f64() * 1000.0
    } else {
        -((origin - t).as_secs_f64() * 1000.0)
    }
}

/// Environment variables of the parent that would change the agent's behaviour behind a test's back.
fn inherited_noise(key: &str) -> bool {
    key.starts_with("OTEL_") || key.starts_with("VIRT_HYPERVISOR_AGENT_") || key == "NODE_NAME"
}

/// The agent binary running as a child process. Dropping it sends SIGTERM, waits up to 5 s, then
/// kills it; when the test is panicking, the agent's log is printed.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    log: File,
    started: Instant,
}

impl Agent {
    /// `virt-hypervisor-agent ARGS…` with exactly `envs` on top of a cleaned environment (no
    /// inherited `OTEL_*`, `VIRT_HYPERVISOR_AGENT_*` or `NODE_NAME`); stdout and stderr go to one
    /// temporary file.
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Result<Agent> {
        Self::spawn_wrapped(&[], args, envs)
    }

    /// Like [`Agent::spawn`], started through `wrapper` (a program and its arguments that ends by
    /// exec-ing the agent binary, given after them, e.g. `setpriv --reuid=65534 --`), so that the
    /// child's pid is the agent's.
    pub fn spawn_wrapped(wrapper: &[&str], args: &[&str], envs: &[(&str, &str)]) -> Result<Agent> {
        let log = tempfile::tempfile().context("create agent log file")?;
        let bin = env!("CARGO_BIN_EXE_virt-hypervisor-agent");
        let mut cmd = match wrapper.split_first() {
            None => Command::new(bin),
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin);
                c
            }
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?);
        for (key, _) in std::env::vars_os() {
            if inherited_noise(&key.to_string_lossy()) {
                cmd.env_remove(key);
            }
        }
        cmd.envs(envs.iter().copied());
        let child = cmd.spawn().context("spawn virt-hypervisor-agent")?;
        Ok(Agent {
            child,
            log,
            started: Instant::now(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When the process was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Everything the agent wrote so far.
    pub fn log(&self) -> String {
        let mut file = match self.log.try_clone() {
            Ok(f) => f,
            Err(e) => return format!("(agent log unreadable: {e})"),
        };
        let mut out = String::new();
        if file.seek(SeekFrom::Start(0)).is_err() {
            return "(agent log unreadable)".to_string();
        }
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_ok() {
            out = String::from_utf8_lossy(&bytes).into_owned();
        }
        out
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `Ok` while the agent runs; an error with its exit status and log tail once it has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!(
                "the agent exited ({status}); its log:\n{}",
                self.log_tail(60)
            ),
        }
    }

    /// Send SIGTERM and wait up to `timeout` for the exit; kill it after that (and report it).
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() >= timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the agent ignored SIGTERM for {timeout:?} and was killed");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let result = self.terminate(Duration::from_secs(5));
        if std::thread::panicking() {
            eprintln!(
                "---- agent log (pid {}) ----\n{}\n---- end of agent log ----",
                self.child.id(),
                self.log_tail(200)
            );
        }
        if let Err(e) = result {
            eprintln!("agent shutdown: {e}");
        }
    }
}
