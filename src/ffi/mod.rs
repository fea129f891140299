//! Every foreign call of the agent (those it makes itself: `virt`, `landlock` and the other
//! crates wrap theirs), and so every `unsafe` block of it. The crate denies `unsafe_code`
//! everywhere else; each block here says why it is sound in a `// SAFETY:` comment.
//!
//! - [`libvirt`]: the libvirt calls the `virt` crate does not wrap (event and close callback
//!   registration, their C trampolines) and the releases it would panic on;
//! - [`kvm`]: the `KVM_GET_API_VERSION` ioctl of the node KVM check.
//!
//! The rest of the agent uses the safe types and functions these modules export.
#![allow(unsafe_code)]

pub mod kvm;
pub mod libvirt;
