//! Whether this host can run guests on the Microsoft Hypervisor (MSHV): the decision, from what
//! opening `/dev/mshv` observed.
//!
//! Pure code (no I/O): [`super::probe_mshv`] opens the device; the functions here turn the
//! outcome into an [`MshvStatus`]. `/dev/mshv` exists only where Linux runs as the root
//! partition of the Microsoft Hypervisor with the `mshv_root` driver loaded; it is the device
//! through which a VMM (QEMU's MSHV accelerator, KubeVirt's `hyperv-direct` hypervisor) creates
//! partitions, as `/dev/kvm` is for KVM.
//!
//! The check is presence and an open, read-only, of a character device, and stops there. Unlike
//! KVM's `KVM_GET_API_VERSION`, the device offers no harmless query: in Linux's
//! `include/uapi/linux/mshv.h` the only ioctl on `/dev/mshv` itself is `MSHV_CREATE_PARTITION`,
//! which creates a partition, and the `MSHV_CHECK_EXTENSION` query of the out-of-tree driver was
//! not kept upstream. Nor can the device number tell it apart: it is a misc device with a
//! dynamic minor.

/// The device a VMM opens to run a guest on the Microsoft Hypervisor.
pub const MSHV_DEVICE: &str = "/dev/mshv";

use libc::{EACCES, ENODEV, ENOENT, ENXIO, EPERM, EROFS};

/// What the check found, with the reason when MSHV is not usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MshvStatus {
    /// `/dev/mshv` is a character device the agent could open: guests can run on the Microsoft
    /// Hypervisor here.
    Available,
    /// No MSHV device: the node does not run as the Microsoft Hypervisor's root partition, or the
    /// `mshv_root` driver is not loaded. The usual case on a KVM node.
    Missing,
    /// `/dev/mshv` exists but the agent may not open it (file mode, systemd `DeviceAllow=`, the
    /// container's device list). A VMM may still have access.
    Denied,
    /// The path is not a character device.
    NotMshv,
    /// Anything else (the OS error number, when there is one).
    Failed { errno: Option<i32> },
}

impl MshvStatus {
    /// The value of `virt_hypervisor_agent_node_mshv_available`.
    pub fn available(self) -> bool {
        self == Self::Available
    }

    /// A short reason for the log.
    pub fn reason(self) -> String {
        match self {
            Self::Available => "MSHV device opened".into(),
            Self::Missing => "no MSHV device".into(),
            Self::Denied => "permission denied".into(),
            Self::NotMshv => "not a character device".into(),
            Self::Failed { errno: Some(e) } => {
                format!("{}", std::io::Error::from_raw_os_error(e))
            }
            Self::Failed { errno: None } => "probe failed".into(),
        }
    }

    /// What an operator should look at.
    pub fn hint(self) -> &'static str {
        match self {
            Self::Available => "",
            Self::Missing => {
                "only a Linux root partition of the Microsoft Hypervisor with the mshv_root driver \
                 has /dev/mshv; on other nodes this is expected"
            }
            Self::Denied => {
                "give the agent read access to /dev/mshv (systemd: DeviceAllow=/dev/mshv r; \
                 Kubernetes: the device in the agent's container)"
            }
            Self::NotMshv | Self::Failed { .. } => "check what /dev/mshv is on this node",
        }
    }
}

/// Opening the device failed with `errno`.
pub fn open_failed(errno: Option<i32>) -> MshvStatus {
    match errno {
        // No node; or a node whose driver is not loaded.
        Some(ENOENT | ENODEV | ENXIO) => MshvStatus::Missing,
        // File mode, or a device cgroup (EPERM), or a read-only mount refusing a device.
        Some(EACCES | EPERM | EROFS) => MshvStatus::Denied,
        other => MshvStatus::Failed { errno: other },
    }
}

/// The path opened; what it is says whether it can be the MSHV device.
pub fn check_device(is_char_device: bool) -> MshvStatus {
    if is_char_device {
        MshvStatus::Available
    } else {
        MshvStatus::NotMshv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_openable_character_device_is_available() {
        assert_eq!(check_device(true), MshvStatus::Available);
        assert!(MshvStatus::Available.available());
        assert!(MshvStatus::Available.hint().is_empty());
    }

    #[test]
    fn anything_else_is_not_available_and_says_why() {
        assert_eq!(check_device(false), MshvStatus::NotMshv);
        assert_eq!(open_failed(Some(ENOENT)), MshvStatus::Missing);
        assert_eq!(open_failed(Some(ENODEV)), MshvStatus::Missing);
        assert_eq!(open_failed(Some(ENXIO)), MshvStatus::Missing);
        assert_eq!(open_failed(Some(EACCES)), MshvStatus::Denied);
        assert_eq!(open_failed(Some(EPERM)), MshvStatus::Denied);
        assert_eq!(open_failed(Some(EROFS)), MshvStatus::Denied);
        assert_eq!(
            open_failed(Some(libc::EMFILE)),
            MshvStatus::Failed {
                errno: Some(libc::EMFILE)
            }
        );
        for s in [
            MshvStatus::Missing,
            MshvStatus::Denied,
            MshvStatus::NotMshv,
            MshvStatus::Failed { errno: None },
        ] {
            assert!(!s.available(), "{s:?}");
            assert!(!s.hint().is_empty(), "{s:?}");
        }
        assert_eq!(MshvStatus::Missing.reason(), "no MSHV device");
    }
}
