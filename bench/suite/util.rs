//! Process accounting and small statistics shared by the benchmark modes.
//!
//! CPU time of another process is read two ways: the precise one, the thread-group CPU clock
//! (`clock_getcpuclockid` + `clock_gettime`: nanoseconds, includes threads that already exited),
//! and `/proc/<pid>/stat` utime+stime (clock ticks, 10 ms here) as a cross-check.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// CPU consumed by a process so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpu {
    /// Thread-group CPU clock, nanoseconds.
    pub ns: u64,
    /// `/proc/<pid>/stat` utime + stime, in clock ticks.
    pub ticks: u64,
}

impl Cpu {
    pub fn read(pid: u32) -> Result<Cpu> {
        Ok(Cpu {
            ns: cpu_clock_ns(pid)?,
            ticks: stat_ticks(pid)?,
        })
    }

    /// `self - earlier`, in seconds: (precise, from /proc/stat ticks).
    pub fn since(&self, earlier: &Cpu) -> CpuDelta {
        CpuDelta {
            secs: self.ns.saturating_sub(earlier.ns) as f64 / 1e9,
            stat_secs: self.ticks.saturating_sub(earlier.ticks) as f64 / clk_tck() as f64,
        }
    }
}

/// CPU seconds spent between two samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CpuDelta {
    /// From the CPU clock (ns resolution).
    pub secs: f64,
    /// From `/proc/<pid>/stat` (tick resolution).
    pub stat_secs: f64,
}

impl std::ops::Add for CpuDelta {
    type Output = CpuDelta;
    fn add(self, o: CpuDelta) -> CpuDelta {
        CpuDelta {
            secs: self.secs + o.secs,
            stat_secs: self.stat_secs + o.stat_secs,
        }
    }
}

fn clk_tck() -> i64 {
    // SAFETY: sysconf has no preconditions and only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t
    } else {
        100
    }
}

/// The thread-group CPU clock of `pid`, in nanoseconds.
pub fn cpu_clock_ns(pid: u32) -> Result<u64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid out-pointer for the duration of the call.
    let rc = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) };
    if rc != 0 {
        bail!("clock_getcpuclockid({pid}) failed: errno {rc}");
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; `clock` came from clock_getcpuclockid.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        bail!(
            "clock_gettime(cpu clock of {pid}) failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// utime + stime of `pid` from `/proc/<pid>/stat`, in clock ticks.
pub fn stat_ticks(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = s.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime is field 14, stime 15 (1-based); `rest` starts at field 3.
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(utime + stime)
}

/// CPU seconds of every child reaped so far (`getrusage(RUSAGE_CHILDREN)`).
pub fn children_cpu_secs() -> f64 {
    // SAFETY: an all-zero rusage is a valid value for this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid out-pointer.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Memory of a process from `/proc/<pid>/status`, KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mem {
    /// VmRSS.
    pub rss: u64,
    /// VmHWM (peak RSS).
    pub hwm: u64,
    /// RssAnon: heap, stacks (private to the process).
    pub anon: u64,
    /// RssFile: mapped files, mostly the binary and shared libraries (shared with others).
    pub file: u64,
}

/// Memory of `pid`.
pub fn mem(pid: u32) -> Result<Mem> {
    status_mem(&format!("/proc/{pid}/status"))
}

/// Memory of this process.
pub fn self_mem() -> Result<Mem> {
    status_mem("/proc/self/status")
}

fn status_mem(path: &str) -> Result<Mem> {
    let s = std::fs::read_to_string(path).with_context(|| format!("read {path}"))?;
    let field = |name: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Mem {
        rss: field("VmRSS:"),
        hwm: field("VmHWM:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
    })
}

/// Whether `pid` is alive and its command name is `comm`.
pub fn pid_is(pid: u32, comm: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
}

/// Send `sig` to one process of ours.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions; the pid is a child we spawned.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// SIGTERM a child, wait up to `grace`, then SIGKILL it. Always reaps it.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(child.id(), libc::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Percentile (nearest rank) of a sample, in the sample's unit. `p` in 0..=100. 0 for an empty
/// sample (JSON has no NaN; the sample sizes are reported next to these).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Median; 0 for an empty sample.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A free TCP port on 127.0.0.1 (bound and released: a tiny race, fine here).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(l.local_addr()?.port())
}

/// One-line description of this machine, for the report.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub model: String,
    pub mem_gib: f64,
    pub kernel: String,
    pub os: String,
    pub date_utc: String,
    pub libvirt: String,
    pub qemu: String,
    pub git: String,
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

impl Machine {
    pub fn describe(repo: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let os = std::fs::read_to_string("/etc/os-release")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("PRETTY_NAME="))
            .map(|l| {
                l.trim_start_matches("PRETTY_NAME=")
                    .trim_matches('"')
                    .to_string()
            })
            .unwrap_or_default();
        let repo_s = repo.to_string_lossy().to_string();
        let head = sh("git", &["-C", &repo_s, "rev-parse", "--short", "HEAD"]);
        let dirty = sh(
            "git",
            &[
                "-C",
                &repo_s,
                "status",
                "--porcelain",
                "--",
                "src",
                "Cargo.toml",
            ],
        );
        let git = if dirty.is_empty() {
            head
        } else {
            format!(
                "{head} + uncommitted changes in {}",
                dirty
                    .lines()
                    .filter_map(|l| l.split_whitespace().last())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            model,
            mem_gib: mem_kib / 1024.0 / 1024.0,
            kernel: sh("uname", &["-r"]),
            os,
            date_utc: sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            libvirt: sh("libvirtd", &["--version"]),
            qemu: sh("qemu-system-x86_64", &["--version"])
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
            git,
        }
    }
}

/// A small xorshift generator (jitter between transitions; no quality needed).
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Rng(seed | 1)
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if hi <= lo {
            lo
        } else {
            lo + self.0 % (hi - lo)
        }
    }
}

/// One thread's scheduler counters (`/proc/<pid>/task/<tid>/schedstat`).
#[derive(Clone, Debug)]
pub struct ThreadStat {
    pub comm: String,
    pub ns: u64,
    pub slices: u64,
}

/// Every thread of `pid` now.
pub fn threads(pid: u32) -> std::collections::BTreeMap<u32, ThreadStat> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in rd.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let sched = std::fs::read_to_string(p.join("schedstat")).unwrap_or_default();
        let f: Vec<u64> = sched
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if f.len() >= 3 {
            out.insert(
                tid,
                ThreadStat {
                    comm: comm.trim().to_string(),
                    ns: f[0],
                    slices: f[2],
                },
            );
        }
    }
    out
}

/// CPU and timeslices (≈ wakeups) per thread name between two samples.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ThreadShare {
    pub name: String,
    pub threads: usize,
    pub cpu_ms: f64,
    pub slices: u64,
}

/// Group by thread name the threads alive at both samples; `total_secs` (the process CPU
/// delta) lets the rest show up as threads that started or ended in between.
pub fn thread_shares(
    a: &std::collections::BTreeMap<u32, ThreadStat>,
    b: &std::collections::BTreeMap<u32, ThreadStat>,
    total_secs: f64,
) -> Vec<ThreadShare> {
    let mut by: std::collections::BTreeMap<String, ThreadShare> = Default::default();
    let mut sum = 0.0;
    for (tid, t1) in b {
        let Some(t0) = a.get(tid) else { continue };
        let e = by.entry(t1.comm.clone()).or_insert_with(|| ThreadShare {
            name: t1.comm.clone(),
            ..ThreadShare::default()
        });
        let ms = t1.ns.saturating_sub(t0.ns) as f64 / 1e6;
        e.threads += 1;
        e.cpu_ms += ms;
        e.slices += t1.slices.saturating_sub(t0.slices);
        sum += ms;
    }
    let mut v: Vec<ThreadShare> = by.into_values().collect();
    v.sort_by(|x, y| y.cpu_ms.total_cmp(&x.cpu_ms));
    let rest = total_secs * 1e3 - sum;
    if rest.abs() > 0.05 {
        v.push(ThreadShare {
            name: "(threads started or ended meanwhile)".to_string(),
            threads: 0,
            cpu_ms: rest,
            slices: 0,
        });
    }
    v
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// SIGINT/SIGTERM set a flag that [`sleep`] turns into an error, so the benchmark unwinds through
/// its cleanup (domains, the private daemon) instead of dying with QEMU processes left behind.
pub fn install_stop_handler() {
    let handler = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Whether a stop signal arrived.
pub fn interrupted() -> Result<()> {
    if STOP.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("interrupted by a signal");
    }
    Ok(())
}

/// Sleep, in slices, failing as soon as a stop signal arrives.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(100)));
    }
}
