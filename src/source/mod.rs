//! The libvirt side of the agent: one event-loop thread for all connections, read-only
//! connections with lifecycle and close callbacks, and the blocking calls (listing, XML fetch)
//! the agent runs off that thread.
//!
//! Data flows one way: callbacks turn C events into [`SourceEvent`]s on a per-connection
//! channel; the agent applies them to the inventory and schedules fetches through
//! [`libvirt::fetch_domain`] on blocking threads, so a slow daemon never stalls the loop.

pub mod event_loop;
pub mod libvirt;

use crate::inventory::{DomainRef, Lifecycle};

/// A domain lifecycle transition reported by a connection.
#[derive(Debug)]
pub struct SourceEvent {
    pub domain: DomainRef,
    pub event: Lifecycle,
    pub detail: i32,
    /// The event's domain object, for a fetch without a lookup.
    pub handle: Option<crate::ffi::libvirt::DomainHandle>,
}

/// The receiving ends of what a connection's callbacks report, all fed from the event-loop thread
/// without ever blocking it.
#[derive(Debug)]
pub struct Feeds {
    /// Lifecycle events, at most `libvirt.event_backlog` queued (each holds a domain reference).
    /// When it is full a new event is dropped, never silently: it is counted in `dropped` and
    /// wakes `overflow`, and the agent resyncs the connection, which heals whatever the dropped
    /// events said.
    pub events: tokio::sync::mpsc::Receiver<SourceEvent>,
    /// Notified when an event was dropped because `events` was full.
    pub overflow: std::sync::Arc<tokio::sync::Notify>,
    /// Events dropped since the agent last took the count.
    pub dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Set once when libvirt closes the connection.
    pub closed: tokio::sync::watch::Receiver<Option<CloseReason>>,
}

/// Why libvirt closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    Error,
    Eof,
    Keepalive,
    Client,
    Other(i32),
}

impl CloseReason {
    pub fn from_raw(reason: i32) -> Self {
        match reason {
            0 => Self::Error,
            1 => Self::Eof,
            2 => Self::Keepalive,
            3 => Self::Client,
            n => Self::Other(n),
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Error => f.write_str("error"),
            Self::Eof => f.write_str("end of file (daemon went away)"),
            Self::Keepalive => f.write_str("keepalive timeout (daemon not answering)"),
            Self::Client => f.write_str("closed by client"),
            Self::Other(n) => write!(f, "reason {n}"),
        }
    }
}
