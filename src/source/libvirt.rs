//! Blocking libvirt operations on a watched connection: open, list active domains, fetch one
//! domain's live XML. Each runs on a blocking thread, never on the event-loop thread.

use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use virt::error::ErrorNumber;

use super::ffi::{self, RawLifecycle, Watched};
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

/// List every active domain.
pub fn list_active(watched: &Watched) -> Result<Vec<DomainRef>, LibvirtError> {
    let conn = watched.connect().ok_or(LibvirtError::Closed)?;
    let domains = conn
        .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        .map_err(|e| LibvirtError::List(e.message().to_string()))?;
    let mut out = Vec::with_capacity(domains.len());
    for d in domains {
        let uuid = d.uuid_string();
        let name = d.name();
        let id = d.id();
        ffi::release_domain(d);
        match (uuid, name) {
            (Ok(uuid), Ok(name)) => out.push(DomainRef { uuid, id, name }),
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

/// Look a domain up by UUID and read its live XML (flags 0: no secrets) and parse it.
pub fn fetch_domain(watched: &Watched, dom: &DomainRef, wants: Wants) -> Fetched {
    let Some(conn) = watched.connect() else {
        return Fetched::LibvirtError("connection closed".into());
    };
    let domain = match conn.lookup_domain_by_uuid_string(&dom.uuid) {
        Ok(d) => d,
        Err(e) if is_gone(&e) => return Fetched::Gone,
        Err(e) => return Fetched::LibvirtError(e.message().to_string()),
    };
    if domain.id().is_none() {
        ffi::release_domain(domain);
        return Fetched::Gone;
    }
    let xml = domain.xml_desc(0);
    ffi::release_domain(domain);
    match xml {
        Ok(xml) => match parse_domain_xml(xml.as_bytes(), wants) {
            Ok(facts) => Fetched::Facts(facts),
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
