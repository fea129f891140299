//! virt-hypervisor-agent: reports which hypervisor (KVM, Microsoft Hypervisor, QEMU TCG) runs every VM on a host.
//!
//! Data flows one way: the libvirt [`source`] turns lifecycle events into [`source::SourceEvent`]s,
//! the [`agent`] applies them to the pure [`inventory`] through its one owner in [`state`], and
//! [`export`] reads the owner's snapshots in an OpenTelemetry observable-gauge callback.

pub mod agent;
pub mod config;
pub mod confine;
pub mod discovery;
pub mod domain;
pub mod export;
pub mod ffi;
pub mod health;
pub mod inventory;
pub mod logging;
pub mod node;
pub mod source;
pub mod state;
pub mod tasks;
