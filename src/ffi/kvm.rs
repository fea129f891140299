//! The one ioctl of the agent: `KVM_GET_API_VERSION` on `/dev/kvm`, for the node KVM check
//! (`crate::node`, whose pure decision is in `node/kvm.rs`).

/// `KVM_GET_API_VERSION` (`_IO(KVMIO, 0x00)`, `KVMIO` = 0xAE) on an open `/dev/kvm`: the KVM API
/// version (12 on every Linux since 2.6.22). The node KVM check (`crate::node`) calls it only on
/// the KVM character device (10:232), opened read-only; it creates nothing.
pub fn get_api_version(kvm: &std::fs::File) -> std::io::Result<i32> {
    use std::os::fd::AsRawFd;
    // The request's type differs between C libraries (unsigned long in glibc, int in musl).
    const KVM_GET_API_VERSION: u32 = 0xAE00;
    // SAFETY: the descriptor is open for the whole call (`kvm` is borrowed); the request's
    // argument is a plain integer that must be 0 (KVM answers EINVAL otherwise, so it is passed
    // explicitly, full width), and the kernel neither reads nor writes user memory for it.
    let rc = unsafe {
        libc::ioctl(
            kvm.as_raw_fd(),
            KVM_GET_API_VERSION as _,
            0 as libc::c_ulong,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
