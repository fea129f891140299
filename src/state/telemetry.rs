//! The agent's own counters that belong to no connection: lifecycle events by type, XML errors
//! by kind, discovery rejections by reason, and the node's KVM and MSHV capabilities. Plain
//! atomics: written from the connection tasks, discovery and the node checks, read by the
//! self-metric callbacks, never locked.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::discovery::paths::Rejection;
use crate::inventory::Lifecycle;

/// Kinds of XML errors counted by `virt_hypervisor_agent_xml_errors`.
pub const XML_ERROR_KINDS: [&str; 3] = ["fetch", "timeout", "parse"];

/// The agent-wide counters.
#[derive(Debug, Default)]
pub struct Telemetry {
    events: [AtomicU64; Lifecycle::ALL.len()],
    xml_errors: [AtomicU64; XML_ERROR_KINDS.len()],
    rejected: [AtomicU64; Rejection::ALL.len()],
    /// Node KVM capability.
    kvm: Answer,
    /// Node MSHV capability (`/dev/mshv`).
    mshv: Answer,
}

/// A yes or no that is not known until first set, read without a lock.
#[derive(Debug, Default)]
struct Answer(AtomicU8);

impl Answer {
    fn set(&self, yes: bool) {
        self.0.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
    }

    fn get(&self) -> Option<bool> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v == 2),
        }
    }
}

impl Telemetry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn count_event(&self, ev: Lifecycle) {
        if let Some(i) = Lifecycle::ALL.iter().position(|e| *e == ev) {
            self.events[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn events(&self, ev: Lifecycle) -> u64 {
        Lifecycle::ALL
            .iter()
            .position(|e| *e == ev)
            .map(|i| self.events[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Count an XML error of `kind` (one of [`XML_ERROR_KINDS`]).
    pub fn count_xml_error(&self, kind: &str) {
        if let Some(i) = XML_ERROR_KINDS.iter().position(|k| *k == kind) {
            self.xml_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count a discovered path that failed the socket checks.
    pub fn count_rejection(&self, why: Rejection) {
        if let Some(i) = Rejection::ALL.iter().position(|r| *r == why) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn rejections(&self) -> Vec<(&'static str, u64)> {
        Rejection::ALL
            .iter()
            .zip(self.rejected.iter())
            .map(|(r, n)| (r.as_str(), n.load(Ordering::Relaxed)))
            .collect()
    }

    pub fn xml_errors(&self) -> Vec<(&'static str, u64)> {
        XML_ERROR_KINDS
            .iter()
            .zip(self.xml_errors.iter())
            .map(|(k, n)| (*k, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Record the result of the node KVM check.
    pub fn set_kvm_available(&self, available: bool) {
        self.kvm.set(available)
    }

    /// Whether this node can run KVM guests; `None` until the first check finished.
    pub fn kvm_available(&self) -> Option<bool> {
        self.kvm.get()
    }

    /// Record the result of the node MSHV check.
    pub fn set_mshv_available(&self, available: bool) {
        self.mshv.set(available)
    }

    /// Whether this node can run guests on the Microsoft Hypervisor; `None` until the first
    /// check finished.
    pub fn mshv_available(&self) -> Option<bool> {
        self.mshv.get()
    }
}
