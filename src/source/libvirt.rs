//! Blocking libvirt operations on a watched connection: open, list active domains, fetch one
//! domain's live XML. Each runs on a blocking thread, never on the event-loop thread.

use std::collections::HashMap;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::{watch, Notify};
use virt::error::ErrorNumber;

use super::{CloseReason, Feeds, SourceEvent};
use crate::domain::{parse_domain_xml, DomainFacts, Wants, XmlError};
use crate::ffi::libvirt::{DomainHandle, RawLifecycle, Watched};
use crate::inventory::{DomainRef, Lifecycle};

/// A libvirt call failed.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("opening {uri} read-only failed: {message}")]
    Open { uri: String, message: String },
    #[error("listing active domains failed: {0}")]
    List(String),
    #[error("reading the domain's XML failed: {0}")]
    Fetch(String),
    #[error("reading the hypervisor version failed: {0}")]
    Version(String),
    #[error("connection is closed")]
    Closed,
}

/// Open `uri` read-only, register callbacks that feed the returned [`Feeds`] (at most `backlog`
/// events queued), enable keepalive.
pub fn open(
    uri: &str,
    keepalive: Option<(Duration, u32)>,
    backlog: usize,
) -> Result<(Watched, Feeds), LibvirtError> {
    let (events_tx, events) = mpsc::channel(backlog.max(1));
    let overflow = Arc::new(Notify::new());
    let dropped = Arc::new(AtomicU64::new(0));
    let (closed_tx, closed) = watch::channel(None);
    let overflowed = Arc::clone(&overflow);
    let drops = Arc::clone(&dropped);
    let on_event = Box::new(move |raw: RawLifecycle| {
        let event = SourceEvent {
            domain: DomainRef {
                uuid: raw.uuid,
                id: raw.id,
                name: raw.name,
            },
            event: Lifecycle::from_raw(raw.event),
            detail: raw.detail,
            handle: raw.handle,
        };
        match events_tx.try_send(event) {
            Ok(()) => {}
            // Dropped (its domain reference is released here, a local unref): the resync that
            // the notification triggers makes up for it.
            Err(TrySendError::Full(_)) => {
                drops.fetch_add(1, Ordering::Relaxed);
                overflowed.notify_one();
            }
            // The agent dropped this connection: nothing to do.
            Err(TrySendError::Closed(_)) => {}
        }
    });
    let on_close = Box::new(move |reason: i32| {
        let _ = closed_tx.send(Some(CloseReason::from_raw(reason)));
    });
    let watched = Watched::open(uri, on_event, on_close).map_err(|e| LibvirtError::Open {
        uri: uri.to_string(),
        message: e.message().to_string(),
    })?;
    if let (Some((interval, count)), Some(conn)) = (keepalive, watched.connect()) {
        let secs = interval.as_secs().clamp(1, i32::MAX as u64) as i32;
        if let Err(e) = conn.set_keep_alive(secs, count) {
            // The test driver and local (non-remote) drivers do not support keepalive.
            tracing::debug!(uri, error = %e.message(), "keepalive not enabled");
        }
    }
    Ok((
        watched,
        Feeds {
            events,
            overflow,
            dropped,
            closed,
        },
    ))
}

/// Every active domain, with a handle to each for reading its XML without a lookup.
#[derive(Debug, Default)]
pub struct Listing {
    pub domains: Vec<DomainRef>,
    /// By UUID.
    pub handles: HashMap<String, DomainHandle>,
}

/// List every active domain.
pub fn list_active(watched: &Watched) -> Result<Listing, LibvirtError> {
    let conn = watched.connect().ok_or(LibvirtError::Closed)?;
    let domains = conn
        .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        .map_err(|e| LibvirtError::List(e.message().to_string()))?;
    let mut out = Listing {
        domains: Vec::with_capacity(domains.len()),
        handles: HashMap::with_capacity(domains.len()),
    };
    for d in domains {
        let handle = DomainHandle::new(d);
        let d = handle.domain();
        match (d.uuid_string(), d.name()) {
            (Ok(uuid), Ok(name)) => {
                out.domains.push(DomainRef {
                    uuid: uuid.clone(),
                    id: d.id(),
                    name,
                });
                out.handles.insert(uuid, handle);
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e.message(), "skipping a listed domain that vanished");
            }
        }
    }
    Ok(out)
}

/// What a fetch found (a libvirt error is a [`LibvirtError::Fetch`]).
#[derive(Debug)]
pub enum Fetched {
    Facts(DomainFacts),
    /// The domain is gone or inactive: normal after an event, not an error.
    Gone,
    /// The XML was read but could not be parsed.
    Unparsable(XmlError),
}

/// Read a domain's live XML (flags 0: no secrets) through `handle` when there is one, else
/// after looking the domain up by UUID, and parse it. A domain that is gone or no longer running
/// (its XML has no `id`: libvirt returned the inactive definition) is [`Fetched::Gone`].
pub fn fetch_domain(
    watched: &Watched,
    dom: &DomainRef,
    handle: Option<DomainHandle>,
    wants: Wants,
) -> Result<Fetched, LibvirtError> {
    let handle = match handle {
        Some(h) => h,
        None => {
            let conn = watched.connect().ok_or(LibvirtError::Closed)?;
            match conn.lookup_domain_by_uuid_string(&dom.uuid) {
                Ok(d) => DomainHandle::new(d),
                Err(e) if is_gone(&e) => return Ok(Fetched::Gone),
                Err(e) => return Err(LibvirtError::Fetch(e.message().to_string())),
            }
        }
    };
    let xml = handle.domain().xml_desc(0);
    drop(handle);
    match xml {
        Ok(xml) => Ok(match parse_domain_xml(xml.as_bytes(), wants) {
            Ok(facts) if facts.live => Fetched::Facts(facts),
            Ok(_) => Fetched::Gone,
            Err(e) => Fetched::Unparsable(e),
        }),
        Err(e) if is_gone(&e) => Ok(Fetched::Gone),
        Err(e) => Err(LibvirtError::Fetch(e.message().to_string())),
    }
}

fn is_gone(e: &virt::error::Error) -> bool {
    let code = e.code();
    code.is(ErrorNumber::NoDomain) || code.is(ErrorNumber::OperationInvalid)
}

/// The hypervisor version of a connection as `major.minor.release`, when the driver reports it.
pub fn hypervisor_version(watched: &Watched) -> Result<Option<String>, LibvirtError> {
    let conn = watched.connect().ok_or(LibvirtError::Closed)?;
    let v = conn
        .hyp_version()
        .map_err(|e| LibvirtError::Version(e.message().to_string()))?;
    Ok((v != 0).then(|| format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)))
}
