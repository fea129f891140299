//! The in-memory inventory of active domains: a pure, synchronous state machine.
//!
//! Inputs are lifecycle transitions ([`Inventory::apply_event`]), the outcomes of XML fetches
//! ([`Inventory::apply_fetch`]) and full listings ([`Inventory::begin_resync`] →
//! [`Inventory::finish_resync`]). Outputs are [`FetchRequest`]s (the caller performs the libvirt
//! call and reports back) and cheap, immutable [`Snapshot`]s for the exporter.
//!
//! Ordering is handled with a monotonically increasing sequence number: every event stamps the
//! entry it touches; a fetch result is applied only if no later event touched that entry, and a
//! resync listing (taken at some instant) never overrides an event that arrived after the resync
//! began. So a STOPPED that overtakes a slow fetch, or a START racing a resync, can never leave a
//! phantom or lose a domain. Applying the same event twice is harmless.
//!
//! No libvirt, tokio or OpenTelemetry types live here.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::domain::{DomainFacts, HypervisorType, Identity};

#[cfg(test)]
mod tests;

/// Identifies one libvirt connection (assigned by the agent).
pub type ConnId = u64;

/// A domain as libvirt names it in an event or a listing.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DomainRef {
    pub uuid: String,
    /// The running domain's id (`None` for an inactive domain or when unknown).
    pub id: Option<u32>,
    pub name: String,
}

/// The lifecycle transitions of `VIR_DOMAIN_EVENT_ID_LIFECYCLE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lifecycle {
    Defined,
    Undefined,
    Started,
    Suspended,
    Resumed,
    Stopped,
    Shutdown,
    PmSuspended,
    Crashed,
    /// An event type this build does not know (newer libvirt).
    Other,
}

impl Lifecycle {
    pub const ALL: [Lifecycle; 10] = [
        Self::Defined,
        Self::Undefined,
        Self::Started,
        Self::Suspended,
        Self::Resumed,
        Self::Stopped,
        Self::Shutdown,
        Self::PmSuspended,
        Self::Crashed,
        Self::Other,
    ];

    /// Map libvirt's `virDomainEventType` value.
    pub fn from_raw(event: i32) -> Self {
        match event {
            0 => Self::Defined,
            1 => Self::Undefined,
            2 => Self::Started,
            3 => Self::Suspended,
            4 => Self::Resumed,
            5 => Self::Stopped,
            6 => Self::Shutdown,
            7 => Self::PmSuspended,
            8 => Self::Crashed,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Defined => "defined",
            Self::Undefined => "undefined",
            Self::Started => "started",
            Self::Suspended => "suspended",
            Self::Resumed => "resumed",
            Self::Stopped => "stopped",
            Self::Shutdown => "shutdown",
            Self::PmSuspended => "pmsuspended",
            Self::Crashed => "crashed",
            Self::Other => "other",
        }
    }
}

/// What a fetch of a domain's live XML produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchOutcome {
    /// The XML was read and parsed.
    Facts(DomainFacts),
    /// The domain is still there but its XML could not be read or parsed: exported as
    /// `unknown` and re-read at the next resync.
    Failed,
    /// The domain no longer exists or is no longer active (`VIR_ERR_NO_DOMAIN`).
    Gone,
}

/// A request to read a domain's live XML and report back with [`Inventory::apply_fetch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    pub conn: ConnId,
    pub domain: DomainRef,
    pub seq: u64,
}

/// One exported domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainRecord {
    pub conn: ConnId,
    pub uuid: String,
    pub id: Option<u32>,
    /// The raw libvirt domain name.
    pub domain_name: String,
    pub identity: Identity,
    pub hypervisor_type: HypervisorType,
    /// `false` when the XML could not be read: the record is re-read at the next resync.
    pub complete: bool,
    pub facts: DomainFacts,
}

impl DomainRecord {
    fn build(conn: ConnId, dom: &DomainRef, outcome: &FetchOutcome) -> Option<Self> {
        let facts = match outcome {
            FetchOutcome::Facts(f) => f.clone(),
            FetchOutcome::Failed => {
                DomainFacts::unknown(Some(dom.name.clone()), Some(dom.uuid.clone()))
            }
            FetchOutcome::Gone => return None,
        };
        // libvirt's event names the domain; the XML may disagree only after a rename, and the
        // event's name is what `virsh list` shows, so prefer it.
        let domain_name = if dom.name.is_empty() {
            facts.name.clone().unwrap_or_default()
        } else {
            dom.name.clone()
        };
        let identity = Identity::from_domain_name(&domain_name, facts.kubevirt);
        Some(Self {
            conn,
            uuid: dom.uuid.clone(),
            id: dom.id,
            domain_name,
            identity,
            hypervisor_type: facts.hypervisor_type,
            complete: !matches!(outcome, FetchOutcome::Failed),
            facts,
        })
    }
}

/// An immutable view of every exported domain, shared by `Arc`.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Bumped on every visible change.
    pub version: u64,
    /// Sorted by (connection, uuid).
    pub domains: Vec<Arc<DomainRecord>>,
    /// Number of domains per hypervisor type, counted once when the snapshot is built.
    counts: BTreeMap<HypervisorType, usize>,
}

impl Snapshot {
    /// Number of exported domains per hypervisor type (every type present, zero included).
    pub fn count_by_type(&self) -> &BTreeMap<HypervisorType, usize> {
        &self.counts
    }
}

/// Proof that a resync began, to be handed back to [`Inventory::finish_resync`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResyncToken {
    pub conn: ConnId,
    seq: u64,
}

/// What [`Inventory::finish_resync`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResyncReport {
    pub added: usize,
    pub removed: usize,
    pub replaced: usize,
    /// Listed domains that still need their XML read (not fetched by the caller).
    pub fetches: Vec<FetchRequest>,
}

#[derive(Debug)]
struct Entry {
    dom: DomainRef,
    record: Option<Arc<DomainRecord>>,
    /// Sequence of the fetch we are waiting for, if any.
    pending: Option<u64>,
    /// Sequence of the last event or fetch request that touched this entry.
    touched: u64,
}

#[derive(Debug, Default)]
struct ConnState {
    /// Ordered by UUID, so that a snapshot comes out sorted without sorting.
    domains: BTreeMap<String, Entry>,
    /// Resyncs in progress: their start sequence.
    resyncs: Vec<u64>,
    /// Domains removed by an event while a resync is in progress: uuid → sequence.
    tombstones: HashMap<String, u64>,
}

/// An event that leaves a known domain as it is: only note that it was touched. An unknown
/// active domain (its START was missed) gets an entry and a fetch.
fn keep_or_fetch(
    state: &mut ConnState,
    conn: ConnId,
    dom: DomainRef,
    seq: u64,
) -> Option<FetchRequest> {
    if let Some(entry) = state.domains.get_mut(&dom.uuid) {
        entry.touched = seq;
        return None;
    }
    state.tombstones.remove(&dom.uuid);
    Some(request_fetch(state, conn, dom, seq))
}

/// Mark `dom` as awaiting a fetch stamped `seq` (creating its entry if needed; a record it
/// already has stays exported until the fetch replaces it) and return the request.
fn request_fetch(state: &mut ConnState, conn: ConnId, dom: DomainRef, seq: u64) -> FetchRequest {
    let entry = state
        .domains
        .entry(dom.uuid.clone())
        .or_insert_with(|| Entry {
            dom: dom.clone(),
            record: None,
            pending: None,
            touched: seq,
        });
    entry.dom = dom.clone();
    entry.pending = Some(seq);
    entry.touched = seq;
    FetchRequest {
        conn,
        domain: dom,
        seq,
    }
}

/// The inventory. Its owner (src/state/mod.rs) is the one writer and publishes its snapshots.
#[derive(Debug, Default)]
pub struct Inventory {
    /// Ordered by connection id (see `domains`).
    conns: BTreeMap<ConnId, ConnState>,
    /// Connections removed while their task still closes: what they report meanwhile (a late
    /// event, a resync) is ignored, so nothing brings their domains back.
    retired: BTreeSet<ConnId>,
    seq: u64,
    version: u64,
}

impl Inventory {
    pub fn new() -> Self {
        Self::default()
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn changed(&mut self) {
        self.version += 1;
    }

    /// Start tracking a connection (idempotent).
    pub fn add_connection(&mut self, conn: ConnId) {
        self.conns.entry(conn).or_default();
    }

    /// Forget a connection and all its domains at once (its socket went away).
    /// Returns how many exported domains were removed.
    pub fn remove_connection(&mut self, conn: ConnId) -> usize {
        let removed = self
            .conns
            .remove(&conn)
            .map(|c| c.domains.values().filter(|e| e.record.is_some()).count())
            .unwrap_or(0);
        if removed > 0 {
            self.changed();
        }
        removed
    }

    /// Forget a connection and its domains now, while its task is still closing (its socket
    /// vanished; the close may take up to `fetch_timeout` on a hung daemon). Until
    /// [`forget_retired`](Self::forget_retired), events and resyncs of it are ignored. Returns
    /// how many exported domains were removed.
    pub fn retire_connection(&mut self, conn: ConnId) -> usize {
        self.retired.insert(conn);
        self.remove_connection(conn)
    }

    /// The retired connection's task ended: nothing of it can arrive any more.
    pub fn forget_retired(&mut self, conn: ConnId) {
        self.retired.remove(&conn);
    }

    /// Apply one lifecycle event: STARTED/RESUMED read the XML, STOPPED/UNDEFINED (of an inactive
    /// domain) remove, the others keep what is known. Returns a fetch to perform, if any.
    pub fn apply_event(
        &mut self,
        conn: ConnId,
        dom: DomainRef,
        event: Lifecycle,
    ) -> Option<FetchRequest> {
        if self.retired.contains(&conn) {
            return None;
        }
        let seq = self.next_seq();
        let state = self.conns.entry(conn).or_default();
        match event {
            Lifecycle::Started | Lifecycle::Resumed => {
                state.tombstones.remove(&dom.uuid);
                Some(request_fetch(state, conn, dom, seq))
            }
            // Keep as is; but an active domain we do not know (a missed START) is read now.
            // Undefining a running domain only makes it transient: it keeps running (the event
            // still carries its id), so it is treated the same way.
            Lifecycle::Suspended
            | Lifecycle::PmSuspended
            | Lifecycle::Shutdown
            | Lifecycle::Crashed => keep_or_fetch(state, conn, dom, seq),
            Lifecycle::Undefined if dom.id.is_some() => keep_or_fetch(state, conn, dom, seq),
            Lifecycle::Stopped | Lifecycle::Undefined => {
                if !state.resyncs.is_empty() {
                    state.tombstones.insert(dom.uuid.clone(), seq);
                }
                let was_exported = state
                    .domains
                    .remove(&dom.uuid)
                    .map(|e| e.record.is_some())
                    .unwrap_or(false);
                if was_exported {
                    self.changed();
                }
                None
            }
            Lifecycle::Defined | Lifecycle::Other => None,
        }
    }

    /// Apply the outcome of a fetch. Stale outcomes (a later event touched the domain) are
    /// dropped. Returns true when the exported state changed.
    pub fn apply_fetch(&mut self, req: &FetchRequest, outcome: FetchOutcome) -> bool {
        let Some(state) = self.conns.get_mut(&req.conn) else {
            return false;
        };
        let Some(entry) = state.domains.get_mut(&req.domain.uuid) else {
            return false;
        };
        if entry.pending != Some(req.seq) {
            return false;
        }
        entry.pending = None;
        match DomainRecord::build(req.conn, &entry.dom, &outcome) {
            Some(record) => {
                let changed = entry.record.as_deref() != Some(&record);
                entry.record = Some(Arc::new(record));
                if changed {
                    self.changed();
                }
                changed
            }
            None => {
                let was_exported = entry.record.is_some();
                state.domains.remove(&req.domain.uuid);
                if was_exported {
                    self.changed();
                }
                was_exported
            }
        }
    }

    /// Begin a resync of `conn`. Take the listing after this call.
    pub fn begin_resync(&mut self, conn: ConnId) -> ResyncToken {
        let seq = self.next_seq();
        if !self.retired.contains(&conn) {
            self.conns.entry(conn).or_default().resyncs.push(seq);
        }
        ResyncToken { conn, seq }
    }

    /// Abandon a resync whose listing failed: nothing is applied.
    pub fn abort_resync(&mut self, token: ResyncToken) {
        if let Some(state) = self.conns.get_mut(&token.conn) {
            state.resyncs.retain(|s| *s != token.seq);
            if state.resyncs.is_empty() {
                state.tombstones.clear();
            }
        }
    }

    /// The version of the exported state: changes exactly when a snapshot would differ.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Which listed domains need their XML read: unknown ones, a new incarnation (same UUID,
    /// other id), and ones whose last read failed. Everything else costs nothing.
    pub fn needs_fetch(&self, conn: ConnId, listing: &[DomainRef]) -> Vec<DomainRef> {
        if self.retired.contains(&conn) {
            return Vec::new();
        }
        let state = self.conns.get(&conn);
        listing
            .iter()
            .filter(|d| {
                let Some(entry) = state.and_then(|s| s.domains.get(&d.uuid)) else {
                    return true;
                };
                if entry.pending.is_some() {
                    return false; // a fetch is already on its way
                }
                match &entry.record {
                    Some(r) => r.id != d.id || !r.complete,
                    None => true,
                }
            })
            .cloned()
            .collect()
    }

    /// Finish a resync: `listing` is every active domain at the time of listing, each with the
    /// outcome of its fetch when one was made. Applied at once: domains not listed are removed,
    /// listed ones are added or replaced, except where an event newer than the resync says
    /// otherwise. Listed domains that were neither known nor fetched come back as fetches.
    pub fn finish_resync(
        &mut self,
        token: ResyncToken,
        listing: Vec<(DomainRef, Option<FetchOutcome>)>,
    ) -> ResyncReport {
        let conn = token.conn;
        let mut report = ResyncReport::default();
        // Listed, neither known nor fetched: each gets a fetch request once the state is released.
        let mut unfetched = Vec::new();
        let Some(state) = self.conns.get_mut(&conn) else {
            return report;
        };
        state.resyncs.retain(|s| *s != token.seq);

        let listed: HashSet<&str> = listing.iter().map(|(d, _)| d.uuid.as_str()).collect();
        state.domains.retain(|uuid, e| {
            let keep = listed.contains(uuid.as_str()) || e.touched > token.seq;
            if !keep && e.record.is_some() {
                report.removed += 1;
            }
            keep
        });

        for (dom, outcome) in listing {
            if state
                .tombstones
                .get(&dom.uuid)
                .is_some_and(|s| *s > token.seq)
            {
                continue; // stopped after the listing was taken
            }
            match state.domains.get_mut(&dom.uuid) {
                Some(e) if e.touched > token.seq => {} // a newer event wins
                Some(e) => {
                    let same = e
                        .record
                        .as_ref()
                        .is_some_and(|r| r.id == dom.id && r.complete);
                    if same {
                        continue;
                    }
                    match outcome {
                        Some(o) => {
                            let had = e.record.is_some();
                            e.dom = dom.clone();
                            e.pending = None;
                            match DomainRecord::build(conn, &dom, &o) {
                                Some(r) => {
                                    e.record = Some(Arc::new(r));
                                    if had {
                                        report.replaced += 1;
                                    } else {
                                        report.added += 1;
                                    }
                                }
                                None => {
                                    state.domains.remove(&dom.uuid);
                                    if had {
                                        report.removed += 1;
                                    }
                                }
                            }
                        }
                        None if e.pending.is_some() => {}
                        None => unfetched.push(dom),
                    }
                }
                None => match outcome {
                    Some(o) => {
                        if let Some(r) = DomainRecord::build(conn, &dom, &o) {
                            report.added += 1;
                            state.domains.insert(
                                dom.uuid.clone(),
                                Entry {
                                    dom: dom.clone(),
                                    record: Some(Arc::new(r)),
                                    pending: None,
                                    touched: token.seq,
                                },
                            );
                        }
                    }
                    None => unfetched.push(dom),
                },
            }
        }
        if state.resyncs.is_empty() {
            state.tombstones.clear();
        }
        for dom in unfetched {
            self.seq += 1;
            let seq = self.seq;
            if let Some(state) = self.conns.get_mut(&conn) {
                report.fetches.push(request_fetch(state, conn, dom, seq));
            }
        }
        if report.added + report.removed + report.replaced > 0 {
            self.changed();
        }
        report
    }

    /// The current exported state, built anew (its owner keeps it until the next change).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        // Both maps are ordered: this is already sorted by (connection, uuid).
        let domains: Vec<Arc<DomainRecord>> = self
            .conns
            .values()
            .flat_map(|c| c.domains.values())
            .filter_map(|e| e.record.clone())
            .collect();
        let mut counts: BTreeMap<HypervisorType, usize> =
            HypervisorType::ALL.iter().map(|t| (*t, 0)).collect();
        for d in &domains {
            *counts.entry(d.hypervisor_type).or_default() += 1;
        }
        Arc::new(Snapshot {
            version: self.version,
            domains,
            counts,
        })
    }

    /// Number of resyncs begun and neither finished nor aborted (all connections). Zero whenever
    /// no resync task is running: a token that outlives its task leaks tombstones.
    pub fn resyncs_in_progress(&self) -> usize {
        self.conns.values().map(|c| c.resyncs.len()).sum()
    }

    /// Number of tombstones held (all connections); only kept while a resync is in progress.
    pub fn tombstones(&self) -> usize {
        self.conns.values().map(|c| c.tombstones.len()).sum()
    }

    /// Number of fetches outstanding (all connections).
    pub fn pending_fetches(&self) -> usize {
        self.conns
            .values()
            .flat_map(|c| c.domains.values())
            .filter(|e| e.pending.is_some())
            .count()
    }
}
