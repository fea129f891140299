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

use crate::export::{PushTrigger, Telemetry};
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

/// Check KVM now and then every `every` (`0`: only now) until `stop` turns true, and publish the
/// result through `telemetry` (pushing an export when it changes).
pub async fn watch_kvm(
    telemetry: Arc<Telemetry>,
    push: PushTrigger,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut last: Option<KvmStatus> = None;
    loop {
        let probe = tokio::task::spawn_blocking(|| probe_kvm(Path::new(kvm::KVM_DEVICE)));
        let status = tokio::select! {
            r = tokio::time::timeout(KVM_PROBE_TIMEOUT, probe) => match r {
                Ok(Ok(s)) => Some(s),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "KVM check failed");
                    None
                }
                Err(_) => {
                    tracing::warn!(
                        device = kvm::KVM_DEVICE,
                        timeout = ?KVM_PROBE_TIMEOUT,
                        "KVM check did not finish; keeping the previous result"
                    );
                    None
                }
            },
            _ = stop.changed() => return,
        };
        if let Some(status) = status.filter(|s| last != Some(*s)) {
            report(status, last);
            telemetry.set_kvm_available(status.available());
            last = Some(status);
            push.push();
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
