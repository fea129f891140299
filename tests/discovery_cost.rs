//! Discovery's cost must not depend on what unrelated pods do: the agent binary in discovery mode
//! over a fake kubelet root of busy pods that are not launchers.
//!
//! - `unrelated_pods_cost_no_watches_and_no_rescans`: [`PODS`] pods with a projected service-account
//!   token (kubelet's atomic writer layout: `..data` → `..<timestamp>/`), one of them with a
//!   [`BIG_DIRS`]-directory emptyDir (a build cache), one launcher pod whose `libvirt-runtime` dir
//!   has no socket yet. The agent's inotify watch count (read from `/proc/<pid>/fdinfo`) is bounded
//!   by the levels where a socket can appear (about 4 per pod), whatever the volumes hold, and does
//!   not change while every pod rewrites files and every token is atomically updated. The agent's
//!   CPU idle and while the pods are busy is printed (a figure, not an assertion).
//!
//! No libvirt daemon is needed (no socket ever appears).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{wait_until, Agent};

const PODS: usize = 20;
const BIG_DIRS: usize = 900;
const WINDOW: Duration = Duration::from_secs(5);

/// inotify watches held by process `pid`.
fn inotify_watches(pid: u32) -> usize {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    fds.filter_map(Result::ok)
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .map(|info| {
            info.lines()
                .filter(|l| l.starts_with("inotify wd:"))
                .count()
        })
        .sum()
}

/// Nanoseconds on CPU of every live thread of `pid` (`/proc/<pid>/task/*/schedstat`).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// CPU of `pid` over `window`, in microseconds per second.
fn cpu_us_per_s(pid: u32, window: Duration) -> f64 {
    let before = cpu_ns(pid);
    std::thread::sleep(window);
    let ns = cpu_ns(pid).saturating_sub(before);
    ns as f64 / 1e3 / window.as_secs_f64()
}

/// One atomic-writer update of a projected volume at `dir`: new timestamped dir, `..data_tmp`
/// symlink to it renamed over `..data`, old dir removed (what kubelet does for a token refresh).
fn atomic_update(dir: &Path, round: u64) {
    let new = format!("..ts_{round}");
    let new_dir = dir.join(&new);
    fs::create_dir_all(&new_dir).unwrap();
    fs::write(new_dir.join("token"), round.to_string()).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&new, &tmp).unwrap();
    fs::rename(&tmp, dir.join("..data")).unwrap();
    if round > 0 {
        let _ = fs::remove_dir_all(dir.join(format!("..ts_{}", round - 1)));
    }
    if !dir.join("token").exists() {
        std::os::unix::fs::symlink("..data/token", dir.join("token")).unwrap();
    }
}

struct Node {
    root: PathBuf,
    tokens: Vec<PathBuf>,
    caches: Vec<PathBuf>,
}

fn build_node(root: &Path) -> Node {
    let mut tokens = Vec::new();
    let mut caches = Vec::new();
    for i in 0..PODS {
        let pod = root.join(format!("pods/pod-{i:02}"));
        let token = pod.join("volumes/kubernetes.io~projected/kube-api-access");
        fs::create_dir_all(&token).unwrap();
        atomic_update(&token, 0);
        tokens.push(token);
        fs::create_dir_all(pod.join("containers/app")).unwrap();
        fs::write(pod.join("etc-hosts"), "127.0.0.1 localhost\n").unwrap();
        let cache = pod.join("volumes/kubernetes.io~empty-dir/cache");
        let dirs = if i == 0 { BIG_DIRS } else { 5 };
        for d in 0..dirs {
            fs::create_dir_all(cache.join(format!("d{}/{d}", d % 30))).unwrap();
        }
        caches.push(cache);
    }
    // A launcher pod whose daemon has not created its socket yet.
    fs::create_dir_all(root.join("pods/launcher/volumes/kubernetes.io~empty-dir/libvirt-runtime"))
        .unwrap();
    Node {
        root: root.to_path_buf(),
        tokens,
        caches,
    }
}

#[test]
fn unrelated_pods_cost_no_watches_and_no_rescans() {
    let dir = tempfile::tempdir().unwrap();
    let node = build_node(dir.path());
    let config = dir.path().join("agent.yaml");
    fs::write(
        &config,
        format!(
            "libvirt:\n  uris: []\n  discover:\n    enabled: true\n    kubelet_root: {}\n    rescan_interval: 10m\n\
             export:\n  exporter: none\n",
            node.root.display()
        ),
    )
    .unwrap();
    let config = config.to_string_lossy().into_owned();
    let agent = Agent::spawn(&["run", "--config", &config], &[("RUST_LOG", "info")]).unwrap();
    let pid = agent.pid();
    wait_until(Duration::from_secs(10), || {
        agent.log().contains("KubeVirt socket discovery started") && inotify_watches(pid) > 0
    })
    .expect("discovery starts and watches the pods dir");
    std::thread::sleep(Duration::from_secs(1));
    let idle_watches = inotify_watches(pid);
    let idle = cpu_us_per_s(pid, WINDOW);

    let busy = AtomicBool::new(true);
    let (rounds, busy_cpu, busy_watches) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut round = 1u64;
            while busy.load(Ordering::Relaxed) {
                for t in &node.tokens {
                    atomic_update(t, round);
                }
                for c in &node.caches {
                    let f = c.join(format!("d{}/f{round}", round % 30));
                    let _ = fs::write(&f, b"x");
                    let _ =
                        fs::remove_file(c.join(format!("d{}/f{}", (round - 1) % 30, round - 1)));
                }
                round += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            round
        });
        let started = Instant::now();
        let cpu = cpu_us_per_s(pid, WINDOW);
        let watches = inotify_watches(pid);
        busy.store(false, Ordering::Relaxed);
        let rounds = writer.join().unwrap();
        println!("busy window: {rounds} rounds in {:?}", started.elapsed());
        (rounds, cpu, watches)
    });
    // Levels where a socket can appear: pods/, and per pod the pod dir, volumes/ and
    // kubernetes.io~empty-dir/ (plus libvirt-runtime/ for the launcher).
    let bound = 1 + 3 * (PODS + 1) + 1;
    println!(
        "{PODS} unrelated pods (one with a {BIG_DIRS}-directory emptyDir) + 1 launcher dir: \
         inotify watches {idle_watches} idle, {busy_watches} busy (bound {bound}); agent CPU {idle:.0} µs/s idle, \
         {busy_cpu:.0} µs/s while every pod rewrote files and every token was atomically updated ({rounds} rounds)"
    );
    assert!(
        idle_watches <= bound && busy_watches <= bound,
        "watches {idle_watches} idle / {busy_watches} busy exceed the bound {bound}: discovery watches what unrelated pods hold"
    );
    assert_eq!(
        idle_watches, busy_watches,
        "unrelated pods' writes changed what discovery watches"
    );
    drop(agent);
}
