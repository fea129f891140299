//! Facts about the node itself, measured by the agent: whether it can run KVM guests
//! (`virt_hypervisor_agent_node_kvm_available`).
//!
//! [`probe_kvm`] opens `/dev/kvm` read-only (non-blocking, close-on-exec), checks that it is the
//! KVM character device and asks it for its API version; [`kvm`] decides what the outcome means.
//! [`watch_kvm`] runs the probe at start and then at every resync interval, each time on a
//! blocking thread bounded by a timeout, so neither the event path nor the export ever waits
//! for it; a change is logged (with the reason and what to fix) and pushed at once.

pub mod kvm;

use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::export::Telemetry;
use kvm::KvmStatus;

/// Bound on one probe (an open and an ioctl: microseconds, unless the device hangs).
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Probe the KVM device at `path` (normally [`kvm::KVM_DEVICE`]). Blocking (but only briefly).
pub fn probe_kvm(path: &Path) -> KvmStatus {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        // Whatever the path turns out to be (a FIFO, say), opening it must not wait.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => return kvm::open_failed(e.raw_os_error()),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => {
            return KvmStatus::Failed {
                errno: e.raw_os_error(),
            }
        }
    };
    if let Err(status) = kvm::check_device(meta.file_type().is_char_device(), meta.rdev()) {
        return status;
    }
    kvm::api_version(crate::source::ffi::kvm_api_version(&file).map_err(|e| e.raw_os_error()))
}

/// Check KVM now and then every `every` (`0`: only now) until `stop` turns true, publish the
/// result through `telemetry`, and call `on_change` (the agent pushes an export) when it changes.
pub async fn watch_kvm(
    telemetry: Arc<Telemetry>,
    on_change: impl Fn() + Send,
    every: Duration,
    stop: watch::Receiver<bool>,
) {
    let probe = || probe_kvm(Path::new(kvm::KVM_DEVICE));
    watch_with(probe, KVM_PROBE_TIMEOUT, &telemetry, on_change, every, stop).await
}

/// [`watch_kvm`] with the probe and its timeout given (tests).
async fn watch_with<P>(
    probe: P,
    timeout: Duration,
    telemetry: &Telemetry,
    on_change: impl Fn(),
    every: Duration,
    mut stop: watch::Receiver<bool>,
) where
    P: Fn() -> KvmStatus + Clone + Send + 'static,
{
    let mut last: Option<KvmStatus> = None;
    // At most one probe in flight: one that outlived its timeout is waited for again at the next
    // round instead of starting another blocking thread next to it.
    let mut pending: Option<tokio::task::JoinHandle<KvmStatus>> = None;
    loop {
        let handle = pending.get_or_insert_with(|| tokio::task::spawn_blocking(probe.clone()));
        let outcome = tokio::select! {
            r = tokio::time::timeout(timeout, &mut *handle) => r,
            _ = stop.changed() => return,
        };
        let status = match outcome {
            Ok(joined) => {
                pending = None;
                joined
                    .inspect_err(|e| tracing::warn!(error = %e, "KVM check failed"))
                    .ok()
            }
            Err(_) => {
                tracing::warn!(
                    device = kvm::KVM_DEVICE,
                    ?timeout,
                    "KVM check did not finish; keeping the previous result"
                );
                None
            }
        };
        if let Some(status) = status.filter(|s| last != Some(*s)) {
            report(status, last);
            telemetry.set_kvm_available(status.available());
            last = Some(status);
            on_change();
        }
        if every.is_zero() {
            // Nothing more to do; stay until stopped, like the other tasks.
            let _ = stop.changed().await;
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

fn report(status: KvmStatus, before: Option<KvmStatus>) {
    let device = kvm::KVM_DEVICE;
    let reason = status.reason();
    if status.available() {
        tracing::info!(device, reason = %reason, "this node can run KVM guests");
    } else if before.is_some_and(KvmStatus::available) {
        tracing::warn!(device, reason = %reason, hint = status.hint(), "this node lost KVM: new VMs will be emulated (QEMU TCG) or fail to start");
    } else {
        tracing::warn!(device, reason = %reason, hint = status.hint(), "this node cannot run KVM guests: VMs here run under software emulation (QEMU TCG)");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

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
        stop: watch::Sender<bool>,
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
            let (stop, stop_rx) = watch::channel(false);
            let (tel, probe) = (Arc::clone(tel), s.probe());
            let task = tokio::spawn(async move {
                watch_with(probe, timeout, &tel, on_change, every, stop_rx).await
            });
            Self { stop, task }
        }

        /// Tell the task to stop; it must end within 10 s.
        async fn stop(self) {
            self.stop.send(true).unwrap();
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
