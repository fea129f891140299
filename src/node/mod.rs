//! Facts about the node itself: its name ([`name`]), and whether it can run hardware-accelerated
//! guests, on KVM (`virt_hypervisor_agent_node_kvm_available`) or on the Microsoft Hypervisor
//! (`virt_hypervisor_agent_node_mshv_available`, KubeVirt's `hyperv-direct`).
//!
//! [`probe_kvm`] opens `/dev/kvm` read-only (non-blocking, close-on-exec), checks that it is the
//! KVM character device and asks it for its API version; [`kvm`] decides what the outcome means.
//! Where `/dev/kvm` is not in the agent's view at all (a DaemonSet pod that requests no device),
//! [`probe_kvm_node`] reads the kernel's KVM misc device entry in sysfs instead.
//! [`probe_mshv`] opens `/dev/mshv` the same way and checks that it is a character device (the
//! device has no harmless query: see [`mshv`]). [`watch_kvm`] and [`watch_mshv`] run their probe
//! at start and then at every resync interval, each time on a blocking thread bounded by a
//! timeout, so neither the event path nor the export ever waits for it; a change is logged (with
//! the reason and what to fix) and pushed at once. Both take the device path, so tests can point
//! them at a stand-in.

pub mod kvm;
pub mod mshv;

use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::state::{Owner, Telemetry};
use crate::tasks::StopSignal;
use kvm::KvmStatus;
use mshv::MshvStatus;

/// The node's name for the `node` attribute: `node_name` from the config, else `NODE_NAME`,
/// else the host name.
pub fn name(cfg: &crate::config::AgentConfig) -> String {
    if !cfg.node_name.trim().is_empty() {
        return cfg.node_name.trim().to_string();
    }
    match std::env::var("NODE_NAME") {
        Ok(n) if !n.trim().is_empty() => n.trim().to_string(),
        _ => host_name(),
    }
}

/// The host name, as the kernel reports it.
pub fn host_name() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// Bound on one probe (an open and an ioctl: microseconds, unless the device hangs).
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a node capability check reports, and where its result goes.
pub trait Capability: Copy + PartialEq + std::fmt::Debug + Send + 'static {
    /// The hypervisor, for the log (`KVM`, `MSHV`).
    const NAME: &'static str;
    /// Whether guests can run on it here.
    fn available(self) -> bool;
    /// A short reason for the log.
    fn reason(self) -> String;
    /// What an operator should look at when it is not available.
    fn hint(self) -> &'static str;
    /// Record the result in the self-metrics.
    fn publish(self, telemetry: &Telemetry);
    /// Log at warning level when it is not available (KVM); else at info (MSHV, which most
    /// nodes do not have, and need not).
    const WARN_WHEN_MISSING: bool;
}

impl Capability for KvmStatus {
    const NAME: &'static str = "KVM";
    const WARN_WHEN_MISSING: bool = true;
    fn available(self) -> bool {
        KvmStatus::available(self)
    }
    fn reason(self) -> String {
        KvmStatus::reason(self)
    }
    fn hint(self) -> &'static str {
        KvmStatus::hint(self)
    }
    fn publish(self, telemetry: &Telemetry) {
        telemetry.set_kvm_available(self.available());
    }
}

impl Capability for MshvStatus {
    const NAME: &'static str = "MSHV";
    const WARN_WHEN_MISSING: bool = false;
    fn available(self) -> bool {
        MshvStatus::available(self)
    }
    fn reason(self) -> String {
        MshvStatus::reason(self)
    }
    fn hint(self) -> &'static str {
        MshvStatus::hint(self)
    }
    fn publish(self, telemetry: &Telemetry) {
        telemetry.set_mshv_available(self.available());
    }
}

/// Open `path` read-only without waiting (whatever it turns out to be: a FIFO, say) and return
/// it with whether it is a character device, or the OS error of the failing step.
fn open_device(path: &Path) -> Result<(std::fs::File, std::fs::Metadata), Option<i32>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.raw_os_error())?;
    let meta = file.metadata().map_err(|e| e.raw_os_error())?;
    Ok((file, meta))
}

/// Probe the KVM device at `path` (normally [`kvm::KVM_DEVICE`]); when it is not there, ask the
/// kernel's misc device entry at `sysfs` (normally [`kvm::KVM_SYSFS_DEV`]) whether the node has
/// it (see [`kvm::missing_device`]). Blocking (but only briefly).
pub fn probe_kvm_node(path: &Path, sysfs: &Path) -> KvmStatus {
    match probe_kvm(path) {
        KvmStatus::Missing => {
            // A sysfs attribute: a few bytes, never more than a page.
            let read = std::fs::read(sysfs).ok();
            let text = read.as_deref().and_then(|b| std::str::from_utf8(b).ok());
            kvm::missing_device(text)
        }
        other => other,
    }
}

/// Probe the KVM device at `path` (normally [`kvm::KVM_DEVICE`]). Blocking (but only briefly).
pub fn probe_kvm(path: &Path) -> KvmStatus {
    let (file, meta) = match open_device(path) {
        Ok(opened) => opened,
        Err(errno) => return kvm::open_failed(errno),
    };
    if let Err(status) = kvm::check_device(meta.file_type().is_char_device(), meta.rdev()) {
        return status;
    }
    kvm::api_version(crate::ffi::kvm::get_api_version(&file).map_err(|e| e.raw_os_error()))
}

/// Probe the MSHV device at `path` (normally [`mshv::MSHV_DEVICE`]): present, openable
/// read-only, and a character device. Blocking (but only briefly); no ioctl is issued.
pub fn probe_mshv(path: &Path) -> MshvStatus {
    match open_device(path) {
        Ok((_file, meta)) => mshv::check_device(meta.file_type().is_char_device()),
        Err(errno) => mshv::open_failed(errno),
    }
}

/// Check KVM at `device` (normally [`kvm::KVM_DEVICE`], with the kernel's entry `sysfs` when it
/// is absent: [`probe_kvm_node`]) now and then every `every` (`0`: only now) until `stop` says
/// stop, and publish each change through `owner` (which pushes an export).
pub async fn watch_kvm(
    device: PathBuf,
    sysfs: PathBuf,
    owner: Owner,
    every: Duration,
    stop: StopSignal,
) {
    let probe = move || probe_kvm_node(&device, &sysfs);
    watch_publishing(probe, owner, every, stop).await
}

/// [`watch_kvm`] for the MSHV device at `device` (normally [`mshv::MSHV_DEVICE`]).
pub async fn watch_mshv(device: PathBuf, owner: Owner, every: Duration, stop: StopSignal) {
    let probe = move || probe_mshv(&device);
    watch_publishing(probe, owner, every, stop).await
}

/// [`watch_with`] publishing through `owner`: each change is recorded and pushed.
async fn watch_publishing<S, P>(probe: P, owner: Owner, every: Duration, stop: StopSignal)
where
    S: Capability,
    P: Fn() -> S + Clone + Send + 'static,
{
    let on_change = || owner.touch();
    watch_with(
        probe,
        KVM_PROBE_TIMEOUT,
        owner.telemetry(),
        on_change,
        every,
        stop,
    )
    .await
}

/// [`watch_kvm`] or [`watch_mshv`] with the probe and its timeout given (tests).
async fn watch_with<S, P>(
    probe: P,
    timeout: Duration,
    telemetry: &Telemetry,
    on_change: impl Fn(),
    every: Duration,
    mut stop: StopSignal,
) where
    S: Capability,
    P: Fn() -> S + Clone + Send + 'static,
{
    let mut last: Option<S> = None;
    // At most one probe in flight: one that outlived its timeout is waited for again at the next
    // round instead of starting another blocking thread next to it.
    let mut pending: Option<tokio::task::JoinHandle<S>> = None;
    loop {
        let handle = pending.get_or_insert_with(|| tokio::task::spawn_blocking(probe.clone()));
        let outcome = tokio::select! {
            r = tokio::time::timeout(timeout, &mut *handle) => r,
            _ = stop.stopped() => return,
        };
        let status = match outcome {
            Ok(joined) => {
                pending = None;
                joined
                    .inspect_err(
                        |e| tracing::warn!(error = %e, check = S::NAME, "node check failed"),
                    )
                    .ok()
            }
            Err(_) => {
                tracing::warn!(
                    check = S::NAME,
                    ?timeout,
                    "node check did not finish; keeping the previous result"
                );
                None
            }
        };
        if let Some(status) = status.filter(|s| last != Some(*s)) {
            report(status, last);
            status.publish(telemetry);
            last = Some(status);
            on_change();
        }
        if every.is_zero() {
            // Nothing more to do; stay until stopped, like the other tasks.
            stop.stopped().await;
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.stopped() => return,
        }
    }
}

fn report<S: Capability>(status: S, before: Option<S>) {
    let check = S::NAME;
    let reason = status.reason();
    if status.available() {
        tracing::info!(check, reason = %reason, "this node can run {check} guests");
    } else if before.is_some_and(S::available) {
        tracing::warn!(check, reason = %reason, hint = status.hint(), "this node lost {check}: new VMs will be emulated (QEMU TCG) or fail to start");
    } else if S::WARN_WHEN_MISSING {
        tracing::warn!(check, reason = %reason, hint = status.hint(), "this node cannot run {check} guests: VMs here run under software emulation (QEMU TCG)");
    } else {
        tracing::info!(check, reason = %reason, hint = status.hint(), "this node cannot run {check} guests");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    /// A probe that answers `script` in turn, then repeats its last answer; counts its calls.
    #[derive(Clone)]
    struct Scripted {
        script: Arc<Mutex<VecDeque<KvmStatus>>>,
        calls: Arc<AtomicUsize>,
        delay: Duration,
    }

    impl Scripted {
        fn new(script: &[KvmStatus], delay: Duration) -> Self {
            Self {
                script: Arc::new(Mutex::new(script.iter().copied().collect())),
                calls: Arc::new(AtomicUsize::new(0)),
                delay,
            }
        }

        fn probe(&self) -> impl Fn() -> KvmStatus + Clone + Send + 'static {
            let me = self.clone();
            move || {
                me.calls.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(me.delay);
                let mut s = me.script.lock().unwrap();
                if s.len() > 1 {
                    s.pop_front().unwrap()
                } else {
                    s[0]
                }
            }
        }
    }

    /// Poll `cond` for up to 10 s (the bound is generous; no timing is asserted).
    async fn eventually(mut cond: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("condition not met within 10 s");
    }

    /// `watch_with` on its own task, with probe timeout `timeout` and interval `every`.
    struct Watching {
        stop: crate::tasks::Stop,
        task: tokio::task::JoinHandle<()>,
    }

    impl Watching {
        fn start(
            s: &Scripted,
            tel: &Arc<Telemetry>,
            on_change: impl Fn() + Send + 'static,
            timeout: Duration,
            every: Duration,
        ) -> Self {
            let (stop, stop_rx) = crate::tasks::Stop::new();
            let (tel, probe) = (Arc::clone(tel), s.probe());
            let task = tokio::spawn(async move {
                watch_with(probe, timeout, &tel, on_change, every, stop_rx).await
            });
            Self { stop, task }
        }

        /// Tell the task to stop; it must end within 10 s.
        async fn stop(self) {
            self.stop.stop(std::time::Instant::now());
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("the task ends when stopped")
                .unwrap();
        }
    }

    #[tokio::test]
    async fn changes_are_published_once_each_and_the_task_stops_when_told() {
        let s = Scripted::new(
            &[
                KvmStatus::Available,
                KvmStatus::Available,
                KvmStatus::Missing,
                KvmStatus::Missing,
                KvmStatus::Available,
            ],
            Duration::ZERO,
        );
        let tel = Arc::new(Telemetry::new());
        let changes = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&changes);
        let w = Watching::start(
            &s,
            &tel,
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
            },
            Duration::from_secs(5),
            Duration::from_millis(1),
        );
        assert_eq!(
            tel.kvm_available(),
            None,
            "nothing is reported before a check"
        );
        // available -> missing -> available: three changes, whatever the number of rounds.
        eventually(|| s.calls.load(Ordering::SeqCst) >= 8).await;
        assert_eq!(tel.kvm_available(), Some(true));
        assert_eq!(changes.load(Ordering::SeqCst), 3);
        w.stop().await;
    }

    #[tokio::test]
    async fn a_probe_that_hangs_keeps_the_last_result_and_no_second_probe_starts() {
        let s = Scripted::new(&[KvmStatus::Missing], Duration::from_secs(2));
        let tel = Arc::new(Telemetry::new());
        tel.set_kvm_available(true);
        let w = Watching::start(
            &s,
            &tel,
            || {},
            Duration::from_millis(1),
            Duration::from_millis(1),
        );
        // The first probe outlives many timeouts and rounds; no other starts meanwhile, and the
        // previous value stays.
        eventually(|| s.calls.load(Ordering::SeqCst) == 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(s.calls.load(Ordering::SeqCst), 1);
        assert_eq!(tel.kvm_available(), Some(true));
        // Once it answers, its answer counts.
        eventually(|| tel.kvm_available() == Some(false)).await;
        w.stop().await;
    }

    #[tokio::test]
    async fn with_no_interval_it_checks_once() {
        let s = Scripted::new(&[KvmStatus::Denied], Duration::ZERO);
        let tel = Arc::new(Telemetry::new());
        let w = Watching::start(&s, &tel, || {}, Duration::from_secs(5), Duration::ZERO);
        eventually(|| tel.kvm_available() == Some(false)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(s.calls.load(Ordering::SeqCst), 1);
        w.stop().await;
    }

    #[tokio::test]
    async fn the_mshv_watch_publishes_what_its_device_path_shows() {
        // No such device on these machines: stand-ins for the path. /dev/null is a character
        // device that opens read-only, as /dev/mshv does on a Microsoft Hypervisor root partition.
        let dir = tempfile::tempdir().unwrap();
        let regular = dir.path().join("regular");
        std::fs::write(&regular, b"").unwrap();
        for (path, available) in [
            (PathBuf::from("/dev/null"), true),
            (dir.path().join("absent"), false),
            (regular, false),
        ] {
            let owner = Owner::new();
            let mut store = owner.store();
            let (stop, stop_rx) = crate::tasks::Stop::new();
            let task = tokio::spawn(watch_mshv(
                path.clone(),
                owner.clone(),
                Duration::ZERO,
                stop_rx,
            ));
            let tel = owner.telemetry();
            eventually(|| tel.mshv_available().is_some()).await;
            assert_eq!(tel.mshv_available(), Some(available), "{path:?}");
            tokio::time::timeout(Duration::from_secs(10), store.changed())
                .await
                .expect("the result is pushed");
            // The KVM capability is its own.
            assert_eq!(tel.kvm_available(), None);
            stop.stop(std::time::Instant::now());
            task.await.unwrap();
        }
    }

    #[test]
    fn the_mshv_probe_wants_an_openable_character_device() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(probe_mshv(&dir.path().join("mshv")), MshvStatus::Missing);
        let f = dir.path().join("mshv");
        std::fs::write(&f, b"").unwrap();
        assert_eq!(probe_mshv(&f), MshvStatus::NotMshv);
        assert_eq!(probe_mshv(dir.path()), MshvStatus::NotMshv);
        // A FIFO opens at once (non-blocking) and is not the device.
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo");
        assert_eq!(probe_mshv(&fifo), MshvStatus::NotMshv);
        assert_eq!(probe_mshv(Path::new("/dev/null")), MshvStatus::Available);
        // The KVM check, which asks the device, still refuses the same stand-in.
        assert_eq!(
            probe_kvm(Path::new("/dev/null")),
            KvmStatus::NotKvm { api_version: None }
        );
    }

    #[test]
    fn a_missing_path_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(probe_kvm(&dir.path().join("kvm")), KvmStatus::Missing);
    }

    #[test]
    fn a_regular_file_or_another_device_is_not_kvm() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("kvm");
        std::fs::write(&f, b"").unwrap();
        let not_kvm = KvmStatus::NotKvm { api_version: None };
        assert_eq!(probe_kvm(&f), not_kvm);
        assert_eq!(probe_kvm(Path::new("/dev/null")), not_kvm);
    }
}
