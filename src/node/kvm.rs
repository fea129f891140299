//! Whether this host can run KVM guests: the decision, from what probing `/dev/kvm` observed.
//!
//! Pure code (no I/O): [`super::probe_kvm`] opens the device and asks it for its API version;
//! the functions here turn each step's outcome into a [`KvmStatus`]. The check is the one QEMU
//! itself makes before it starts a KVM guest (open `/dev/kvm`, `KVM_GET_API_VERSION` == 12),
//! minus write access: the agent opens the device read-only and never creates a VM. The ioctl is
//! only issued to the KVM device itself (character device 10:232), never to whatever else a
//! path may name.
//!
//! Why not libvirt's domain capabilities (`virsh domcapabilities --virttype kvm`)? The agent's
//! connections are read-only, a KubeVirt node has no node-wide libvirt daemon to ask, and a
//! launcher's daemon only sees the devices its own pod was given. `/dev/kvm` on the node is what
//! decides whether a VM *can* get KVM there.

/// The device QEMU opens to run a KVM guest.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// What the kernel publishes for the KVM misc device once `kvm` and `kvm_intel`/`kvm_amd` have
/// loaded (they register it only when the CPU's virtualization extensions are usable); devtmpfs
/// then makes `/dev/kvm` from it. Readable in any container (every sysfs mount shows it), so it
/// answers for the node where `/dev/kvm` itself is not in the agent's view: a DaemonSet pod that
/// asks for no device (see deploy/README.md, "Kubernetes / KubeVirt").
pub const KVM_SYSFS_DEV: &str = "/sys/devices/virtual/misc/kvm/dev";

/// The only KVM API version Linux has ever reported (stable since 2.6.22).
pub const KVM_API_VERSION: i32 = 12;

/// Major and minor device number of `/dev/kvm` (a misc device with the fixed minor
/// `KVM_MINOR` = 232, `include/linux/miscdevice.h`).
pub const KVM_DEVICE_NUMBER: (u64, u64) = (10, 232);

use libc::{EACCES, EINVAL, ENODEV, ENOENT, ENOTTY, ENXIO, EPERM, EROFS};

/// What the check found, with the reason when KVM is not usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmStatus {
    /// `/dev/kvm` answered the KVM API: KVM guests can run here.
    Available,
    /// No KVM device (the node has no hardware virtualization, it is off in the firmware, nested
    /// virtualization is off, or the `kvm_intel`/`kvm_amd` module is not loaded).
    Missing,
    /// `/dev/kvm` exists but the agent may not open it: its user, its systemd device policy
    /// (`DeviceAllow=`) or its container's device list. QEMU may still have access.
    Denied,
    /// The path is not the KVM device (another file or device), or it answered an API version
    /// other than [`KVM_API_VERSION`] (`Some(version)`).
    NotKvm { api_version: Option<i32> },
    /// Anything else (the OS error number, when there is one).
    Failed { errno: Option<i32> },
    /// `/dev/kvm` is not in the agent's view (a container given no device), but the kernel has
    /// registered the KVM device (`/sys/devices/virtual/misc/kvm/dev` reads `10:232`): the node
    /// has `/dev/kvm`, and KVM guests can run there. The API version is not asked.
    Registered,
}

impl KvmStatus {
    /// The value of `virt_hypervisor_agent_node_kvm_available`.
    pub fn available(self) -> bool {
        matches!(self, Self::Available | Self::Registered)
    }

    /// A short reason for the log.
    pub fn reason(self) -> String {
        match self {
            Self::Available => "KVM API version 12".into(),
            Self::Registered => {
                "KVM device registered by the kernel (sysfs misc 10:232); /dev/kvm is not in \
                 this container, its API version was not asked"
                    .into()
            }
            Self::Missing => "no KVM device".into(),
            Self::Denied => "permission denied".into(),
            Self::NotKvm { api_version: None } => "not the KVM device".into(),
            Self::NotKvm {
                api_version: Some(v),
            } => format!("unexpected KVM API version {v}"),
            Self::Failed { errno: Some(e) } => {
                format!("{}", std::io::Error::from_raw_os_error(e))
            }
            Self::Failed { errno: None } => "probe failed".into(),
        }
    }

    /// What an operator should look at.
    pub fn hint(self) -> &'static str {
        match self {
            Self::Available | Self::Registered => "",
            Self::Missing => {
                "enable hardware virtualization (VT-x/AMD-V, or nested virtualization for a cloud \
                 VM) and load kvm_intel or kvm_amd"
            }
            Self::Denied => {
                "give the agent read access to /dev/kvm (systemd: DeviceAllow=/dev/kvm r; \
                 Kubernetes: mount the hostPath /dev/kvm)"
            }
            Self::NotKvm { .. } | Self::Failed { .. } => "check what /dev/kvm is on this node",
        }
    }
}

/// Opening the device failed with `errno`.
pub fn open_failed(errno: Option<i32>) -> KvmStatus {
    match errno {
        // No node; or a node whose driver is not loaded.
        Some(ENOENT | ENODEV | ENXIO) => KvmStatus::Missing,
        // File mode, or a device cgroup (EPERM), or a read-only mount refusing a device.
        Some(EACCES | EPERM | EROFS) => KvmStatus::Denied,
        other => KvmStatus::Failed { errno: other },
    }
}

/// The device opened; `Ok(())` when it is the KVM device and may be asked for its version.
pub fn check_device(is_char_device: bool, rdev: u64) -> Result<(), KvmStatus> {
    if is_char_device && device_number(rdev) == KVM_DEVICE_NUMBER {
        Ok(())
    } else {
        Err(KvmStatus::NotKvm { api_version: None })
    }
}

/// `KVM_GET_API_VERSION` returned `version`, or failed with `errno`.
pub fn api_version(result: Result<i32, Option<i32>>) -> KvmStatus {
    match result {
        Ok(KVM_API_VERSION) => KvmStatus::Available,
        Ok(v) => KvmStatus::NotKvm {
            api_version: Some(v),
        },
        // Not an ioctl this device knows: it is not (or no longer) KVM.
        Err(Some(ENOTTY | EINVAL)) => KvmStatus::NotKvm { api_version: None },
        Err(Some(EACCES | EPERM)) => KvmStatus::Denied,
        Err(errno) => KvmStatus::Failed { errno },
    }
}

/// `/dev/kvm` was not found (`Missing`); `sysfs` is what the kernel's KVM misc device entry
/// ([`KVM_SYSFS_DEV`]) read, if anything. Only a missing device node is reconsidered: a device
/// that is there but refuses the agent stays `Denied`, whatever sysfs says.
pub fn missing_device(sysfs: Option<&str>) -> KvmStatus {
    let number = sysfs.and_then(|s| {
        let (major, minor) = s.trim().split_once(':')?;
        Some((major.parse::<u64>().ok()?, minor.parse::<u64>().ok()?))
    });
    if number == Some(KVM_DEVICE_NUMBER) {
        KvmStatus::Registered
    } else {
        KvmStatus::Missing
    }
}

/// Split a Linux `dev_t` (as `st_rdev` reports it) into (major, minor), as glibc's
/// `gnu_dev_major`/`gnu_dev_minor` do.
pub fn device_number(rdev: u64) -> (u64, u64) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & 0xffff_f000);
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xffff_ff00);
    (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `makedev` as glibc encodes it.
    fn makedev(major: u64, minor: u64) -> u64 {
        ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12)
    }

    #[test]
    fn device_numbers_decode_as_glibc_encodes_them() {
        assert_eq!(device_number(makedev(10, 232)), (10, 232));
        assert_eq!(device_number(0x0ae8), (10, 232)); // st_rdev of /dev/kvm on x86_64
        assert_eq!(device_number(makedev(1, 3)), (1, 3)); // /dev/null
        assert_eq!(device_number(makedev(4095, 255)), (4095, 255));
        assert_eq!(device_number(makedev(4096, 256)), (4096, 256));
        assert_eq!(device_number(makedev(300, 70000)), (300, 70000));
    }

    #[test]
    fn the_kvm_device_answering_version_12_is_available() {
        assert_eq!(check_device(true, makedev(10, 232)), Ok(()));
        assert_eq!(api_version(Ok(12)), KvmStatus::Available);
        assert!(KvmStatus::Available.available());
    }

    #[test]
    fn other_files_and_devices_are_not_kvm_and_are_never_asked() {
        let not_kvm = Err(KvmStatus::NotKvm { api_version: None });
        // /dev/null bind-mounted over /dev/kvm, a regular file, another misc device.
        assert_eq!(check_device(true, makedev(1, 3)), not_kvm);
        assert_eq!(check_device(false, 0), not_kvm);
        assert_eq!(check_device(false, makedev(10, 232)), not_kvm);
        assert_eq!(check_device(true, makedev(10, 233)), not_kvm);
        assert_eq!(check_device(true, makedev(232, 10)), not_kvm);
    }

    #[test]
    fn open_errors_say_missing_or_denied() {
        assert_eq!(open_failed(Some(ENOENT)), KvmStatus::Missing);
        assert_eq!(open_failed(Some(ENODEV)), KvmStatus::Missing);
        assert_eq!(open_failed(Some(ENXIO)), KvmStatus::Missing);
        assert_eq!(open_failed(Some(EACCES)), KvmStatus::Denied);
        assert_eq!(open_failed(Some(EPERM)), KvmStatus::Denied);
        assert_eq!(open_failed(Some(EROFS)), KvmStatus::Denied);
        assert_eq!(
            open_failed(Some(libc::EMFILE)),
            KvmStatus::Failed {
                errno: Some(libc::EMFILE)
            }
        );
        assert_eq!(open_failed(None), KvmStatus::Failed { errno: None });
    }

    #[test]
    fn ioctl_outcomes_other_than_version_12_are_not_available() {
        assert_eq!(
            api_version(Ok(11)),
            KvmStatus::NotKvm {
                api_version: Some(11)
            }
        );
        assert_eq!(
            api_version(Err(Some(ENOTTY))),
            KvmStatus::NotKvm { api_version: None }
        );
        assert_eq!(
            api_version(Err(Some(EINVAL))),
            KvmStatus::NotKvm { api_version: None }
        );
        assert_eq!(api_version(Err(Some(EPERM))), KvmStatus::Denied);
        assert_eq!(
            api_version(Err(Some(libc::EIO))),
            KvmStatus::Failed {
                errno: Some(libc::EIO)
            }
        );
        for s in [
            KvmStatus::Missing,
            KvmStatus::Denied,
            KvmStatus::NotKvm { api_version: None },
            KvmStatus::NotKvm {
                api_version: Some(11),
            },
            KvmStatus::Failed { errno: None },
        ] {
            assert!(!s.available(), "{s:?}");
            assert!(!s.hint().is_empty(), "{s:?}");
        }
    }

    #[test]
    fn a_missing_node_is_available_only_when_the_kernel_registered_kvm() {
        assert_eq!(missing_device(Some("10:232\n")), KvmStatus::Registered);
        assert!(KvmStatus::Registered.available());
        assert!(KvmStatus::Registered.hint().is_empty());
        // No sysfs entry (no KVM module, no hardware support), or something else there.
        for other in [
            None,
            Some(""),
            Some("10:233\n"),
            Some("232:10"),
            Some("junk"),
        ] {
            assert_eq!(missing_device(other), KvmStatus::Missing, "{other:?}");
        }
    }

    #[test]
    fn reasons_name_what_was_seen() {
        assert_eq!(KvmStatus::Denied.reason(), "permission denied");
        assert_eq!(
            KvmStatus::NotKvm {
                api_version: Some(11)
            }
            .reason(),
            "unexpected KVM API version 11"
        );
        assert!(KvmStatus::Failed {
            errno: Some(ENOENT)
        }
        .reason()
        .contains("No such file"));
    }
}
