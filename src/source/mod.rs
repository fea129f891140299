//! The libvirt side of the agent: one event-loop thread for all connections, read-only
//! connections with lifecycle and close callbacks, and the blocking calls (listing, XML fetch)
//! the agent runs off that thread.
//!
//! Data flows one way: callbacks turn C events into [`SourceEvent`]s on a per-connection
//! channel; the agent applies them to the inventory and schedules fetches through
//! [`libvirt::fetch_domain`] on blocking threads, so a slow daemon never stalls the loop.

pub mod event_loop;
#[allow(unsafe_code)]
pub mod ffi;
pub mod libvirt;

use crate::inventory::{DomainRef, Lifecycle};

/// What a connection reports to the agent.
#[derive(Debug)]
pub enum SourceEvent {
    /// A domain lifecycle transition.
    Lifecycle {
        domain: DomainRef,
        event: Lifecycle,
        detail: i32,
        /// The event's domain object, for a fetch without a lookup.
        handle: Option<ffi::DomainHandle>,
    },
    /// The connection closed (`VIR_CONNECT_CLOSE_REASON_*`).
    Closed { reason: CloseReason },
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
