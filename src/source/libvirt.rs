//! Blocking libvirt operations on a watched connection: open, list active domains, fetch one
//! domain's live XML. Each runs on a blocking thread, never on the event-loop thread.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use virt::error::ErrorNumber;

use super::ffi::{DomainHandle, RawLifecycle, Watched};
use super::{CloseReason, SourceEvent};
use crate::domain::{parse_domain_xml, DomainFacts, Wants, XmlError};
use crate::inventory::{DomainRef, Lifecycle};

/// A libvirt call failed.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("opening {uri} read-only failed: {message}")]
    Open { uri: String, message: String },
    #[error("listing active domains failed: {0}")]
    List(String),
    #[error("connection is closed")]
    Closed,
}

/// Open `uri` read-only, register callbacks that forward to `tx`, enable keepalive.
pub fn open(
    uri: &str,
    keepalive: Option<(Duration, u32)>,
    tx: UnboundedSender<SourceEvent>,
) -> Result<Watched, LibvirtError> {
    let events = tx.clone();
    let on_event = Box::new(move |raw: RawLifecycle| {
        let event = Lifecycle::from_raw(raw.event);
        let domain = DomainRef {
            uuid: raw.uuid,
            id: raw.id,
            name: raw.name,
        };
        // A closed receiver means the agent dropped this connection: nothing to do.
        let _ = events.send(SourceEvent::Lifecycle {
            domain,
            event,
            detail: raw.detail,
            handle: raw.handle,
        });
    });
    let on_close = Box::new(move |reason: i32| {
        let _ = tx.send(SourceEvent::Closed {
            reason: CloseReason::from_raw(reason),
        });
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
    Ok(watched)
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

/// How a fetch ended, with the reason when it failed.
#[derive(Debug)]
pub enum Fetched {
    Facts(DomainFacts),
    /// The domain is gone or inactive: normal after an event, not an error.
    Gone,
    /// libvirt answered with an error.
    LibvirtError(String),
    /// The XML could not be parsed.
    ParseError(XmlError),
}

/// Read a domain's live XML (flags 0: no secrets) through `handle` when there is one, else
/// after looking the domain up by UUID, and parse it. A domain that is gone or no longer running
/// (its XML has no `id`: libvirt returned the inactive definition) is [`Fetched::Gone`].
pub fn fetch_domain(
    watched: &Watched,
    dom: &DomainRef,
    handle: Option<DomainHandle>,
    wants: Wants,
) -> Fetched {
    let handle = match handle {
        Some(h) => h,
        None => {
            let Some(conn) = watched.connect() else {
                return Fetched::LibvirtError("connection closed".into());
            };
            match conn.lookup_domain_by_uuid_string(&dom.uuid) {
                Ok(d) => DomainHandle::new(d),
                Err(e) if is_gone(&e) => return Fetched::Gone,
                Err(e) => return Fetched::LibvirtError(e.message().to_string()),
            }
        }
    };
    let xml = handle.domain().xml_desc(0);
    drop(handle);
    match xml {
        Ok(xml) => match parse_domain_xml(xml.as_bytes(), wants) {
            Ok(facts) if facts.live => Fetched::Facts(facts),
            Ok(_) => Fetched::Gone,
            Err(e) => Fetched::ParseError(e),
        },
        Err(e) if is_gone(&e) => Fetched::Gone,
        Err(e) => Fetched::LibvirtError(e.message().to_string()),
    }
}

fn is_gone(e: &virt::error::Error) -> bool {
    let code = e.code();
    code.is(ErrorNumber::NoDomain) || code.is(ErrorNumber::OperationInvalid)
}

/// The hypervisor version of a connection as `major.minor.release`, when the driver reports it.
pub fn hypervisor_version(watched: &Watched) -> Option<String> {
    let v = watched.connect()?.hyp_version().ok()?;
    if v == 0 {
        return None;
    }
    Some(format!(
        "{}.{}.{}",
        v / 1_000_000,
        (v / 1000) % 1000,
        v % 1000
    ))
}
