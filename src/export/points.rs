//! The info gauge's attribute sets, built once per change instead of at every collection.
//!
//! A collection at 10,000 domains used to build 10,000 attribute vectors with freshly allocated
//! strings, which the SDK then hashed and copied again. [`InfoPoints`] keeps the attribute sets
//! between collections, with every string value shared (`Arc<str>`), so that the SDK's own copy
//! of a set is a few reference-count increments. When the inventory snapshot or the connection
//! table changes, only the domains whose record changed are rebuilt: the snapshot keeps an
//! unchanged domain's `Arc<DomainRecord>`, so pointer equality says "unchanged".
//!
//! Each rebuild also checks what the SDK would do with the sets, since it does so silently:
//! - **Collisions.** Two live domains can map to one attribute set: two daemons on one host
//!   holding domains of the same name, or KubeVirt's old and new launcher pod briefly holding
//!   the same VMI. The gauge reports *one series per attribute set*, observed once, for as long
//!   as any domain maps to it (so it ends, and is marked stale, only when the last of them goes
//!   away). Collisions are counted ([`PointStats::collisions`], the
//!   `virt_hypervisor_agent_info_collisions` gauge) and logged; the optional attributes
//!   (`uuid`, `pod_uid`, `domain`) tell such domains apart when that matters.
//! - **The cardinality limit.** The SDK keeps the first `metric.cardinality_limit` distinct sets
//!   of a collection, in observation order, and merges the rest into one
//!   `otel.metric.overflow=true` point. The sets beyond it are counted
//!   ([`PointStats::over_limit`], `virt_hypervisor_agent_info_sets_over_limit`), and a warning is
//!   logged when it starts and a line when it clears.
//! - **The per-connection bound.** A connection with a domain limit of its own (a discovered
//!   launcher socket: `libvirt.discover.max_domains_per_socket`) has only its first domains,
//!   by uuid, exported; the rest are counted per connection
//!   ([`InfoPoints::over_connection_limit`], `virt_hypervisor_agent_connection_domains_over_limit`)
//!   and warned about once when they appear. They take no part in the cardinality limit, so a
//!   launcher daemon that reports thousands of domains cannot push another pod's VM into the
//!   overflow point.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use opentelemetry::{KeyValue, StringValue, Value};

use crate::config::OptionalAttributes;
use crate::inventory::{ConnId, DomainRecord, Snapshot};
use crate::state::{ConnMeta, ConnTable};

/// The info gauge's data points (value 1 each), kept between collections.
#[derive(Debug)]
pub struct InfoPoints {
    node: Arc<str>,
    opt: OptionalAttributes,
    snap: Option<Arc<Snapshot>>,
    conns: Option<Arc<ConnTable>>,
    /// In snapshot order (connection, uuid).
    points: Vec<(Arc<DomainRecord>, Box<[KeyValue]>)>,
    /// Per point: what it is to the export (only [`Role::First`] points are observed).
    roles: Vec<Role>,
    /// Domains beyond their connection's own limit, per connection that has any.
    over_conn_limit: std::collections::BTreeMap<ConnId, usize>,
    /// `metric.cardinality_limit`.
    limit: usize,
    stats: PointStats,
    /// Log changes of the stats (off for `inventory`, which prints its own summary).
    log: bool,
}

/// What the last rebuild found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PointStats {
    pub domains: usize,
    /// Distinct attribute sets: the series observed.
    pub sets: usize,
    /// Domains whose attribute set an earlier domain already has (`domains - sets`).
    pub collisions: usize,
    /// Distinct sets beyond the cardinality limit, merged by the SDK into the overflow point.
    pub over_limit: usize,
    /// Domains beyond their connection's own limit: not exported at all.
    pub over_connection_limit: usize,
}

/// What one point is to the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The first point with its attribute set: observed.
    First,
    /// An earlier point has the same attribute set.
    Shared,
    /// Beyond its connection's domain limit: not observed.
    OverConnectionLimit,
}

/// What becomes of one domain's point, in snapshot order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Its own series.
    Exported,
    /// Same attribute set as an earlier domain: one series for both.
    Shared,
    /// Its set is beyond the cardinality limit: merged into the overflow point.
    OverLimit,
    /// Beyond its connection's own domain limit: not exported.
    OverConnectionLimit,
}

/// An attribute set as a hash key (every value here is a string).
struct SetKey<'a>(&'a [KeyValue]);

impl Hash for SetKey<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        for kv in self.0 {
            kv.key.as_str().hash(h);
            kv.value.as_str().hash(h);
        }
    }
}

impl PartialEq for SetKey<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for SetKey<'_> {}

impl InfoPoints {
    pub fn new(node: &str, opt: OptionalAttributes) -> Self {
        Self {
            node: Arc::from(node),
            opt,
            snap: None,
            conns: None,
            points: Vec::new(),
            roles: Vec::new(),
            over_conn_limit: std::collections::BTreeMap::new(),
            limit: usize::MAX,
            stats: PointStats::default(),
            log: true,
        }
    }

    /// Do not log collisions or overflow (the caller reports [`stats`](Self::stats) itself).
    pub fn without_logging(mut self) -> Self {
        self.log = false;
        self
    }

    /// The SDK's cardinality limit for the gauge (`metric.cardinality_limit`).
    pub fn with_cardinality_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// What the last [`refresh`](Self::refresh) found.
    pub fn stats(&self) -> PointStats {
        self.stats
    }

    /// What becomes of each domain of the last refreshed snapshot, in snapshot order.
    pub fn fates(&self) -> Vec<Fate> {
        let mut sets = 0;
        self.roles
            .iter()
            .map(|role| match role {
                Role::Shared => Fate::Shared,
                Role::OverConnectionLimit => Fate::OverConnectionLimit,
                Role::First => {
                    sets += 1;
                    if sets > self.limit {
                        Fate::OverLimit
                    } else {
                        Fate::Exported
                    }
                }
            })
            .collect()
    }

    /// Domains beyond the connection's own limit (0 when within it, or without one), as of the
    /// last refresh.
    pub fn over_connection_limit(&self, conn: ConnId) -> usize {
        self.over_conn_limit.get(&conn).copied().unwrap_or(0)
    }

    /// Bring the attribute sets up to date with `snap` and `conns`, and return them, each
    /// distinct set once. Unchanged inputs (the same `Arc`s as last time) cost nothing.
    pub fn refresh(
        &mut self,
        snap: Arc<Snapshot>,
        conns: Arc<ConnTable>,
    ) -> impl Iterator<Item = &[KeyValue]> {
        let same_snap = self.snap.as_ref().is_some_and(|s| Arc::ptr_eq(s, &snap));
        let same_conns = self.conns.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conns));
        if !(same_snap && same_conns) {
            self.rebuild(&snap, &conns);
            self.snap = Some(snap);
            self.conns = Some(conns);
        }
        self.points
            .iter()
            .zip(&self.roles)
            .filter(|(_, role)| **role == Role::First)
            .map(|((_, attrs), _)| &attrs[..])
    }

    fn rebuild(&mut self, snap: &Snapshot, conns: &Arc<ConnTable>) {
        let old_conns = self.conns.take();
        let same_conns = old_conns.as_ref().is_some_and(|c| Arc::ptr_eq(c, conns));
        let mut old = std::mem::take(&mut self.points).into_iter().peekable();
        let mut points = Vec::with_capacity(snap.domains.len());
        for rec in &snap.domains {
            let key = (rec.conn, rec.uuid.as_str());
            // Both lists are sorted by (connection, uuid): skip the old entries before this one.
            while old
                .peek()
                .is_some_and(|(r, _)| (r.conn, r.uuid.as_str()) < key)
            {
                old.next();
            }
            // Unchanged: the same record, and the same connection values (the same table, or
            // equal values in a changed one).
            let unchanged = old.peek().is_some_and(|(r, _)| {
                Arc::ptr_eq(r, rec)
                    && (same_conns
                        || old_conns.as_ref().is_some_and(|c| {
                            same_conn_attributes(&self.opt, c.get(&rec.conn), conns.get(&rec.conn))
                        }))
            });
            let attrs = match old.next_if(|_| unchanged) {
                Some((_, attrs)) => attrs,
                None => {
                    let meta = conns.get(&rec.conn);
                    domain_attributes(
                        rec,
                        &self.node,
                        &self.opt,
                        meta.and_then(|m| m.hypervisor_version.as_ref()),
                        meta.and_then(|m| m.pod_uid.as_ref()),
                    )
                    .into_boxed_slice()
                }
            };
            points.push((Arc::clone(rec), attrs));
        }
        // Points are sorted by connection: count each connection's domains as they pass.
        let mut seen = HashSet::with_capacity(points.len());
        let mut over = std::collections::BTreeMap::new();
        let mut run: Option<(ConnId, usize)> = None;
        self.roles = points
            .iter()
            .map(|(rec, attrs)| {
                let n = match run {
                    Some((conn, n)) if conn == rec.conn => n + 1,
                    _ => 1,
                };
                run = Some((rec.conn, n));
                let limit = conns.get(&rec.conn).and_then(|m| m.domain_limit);
                if limit.is_some_and(|limit| n > limit) {
                    *over.entry(rec.conn).or_insert(0) += 1;
                    Role::OverConnectionLimit
                } else if seen.insert(SetKey(attrs)) {
                    Role::First
                } else {
                    Role::Shared
                }
            })
            .collect();
        let sets = seen.len();
        drop(seen);
        let over_connection_limit: usize = over.values().sum();
        self.points = points;
        let was = std::mem::replace(&mut self.over_conn_limit, over);
        self.report_connection_limits(&was, conns);
        self.report(PointStats {
            domains: self.points.len(),
            sets,
            collisions: self.points.len() - over_connection_limit - sets,
            over_limit: sets.saturating_sub(self.limit),
            over_connection_limit,
        });
    }

    /// A warning for each connection that went over its own domain limit, a line for each that
    /// came back within it.
    fn report_connection_limits(
        &self,
        was: &std::collections::BTreeMap<ConnId, usize>,
        conns: &ConnTable,
    ) {
        if !self.log {
            return;
        }
        let label = |conn: &ConnId| conns.get(conn).map(|m| Arc::clone(&m.label));
        for (conn, n) in &self.over_conn_limit {
            if !was.contains_key(conn) {
                let meta = conns.get(conn);
                tracing::warn!(
                    connection = label(conn).as_deref().unwrap_or(""),
                    limit = meta.and_then(|m| m.domain_limit).unwrap_or(0),
                    over_limit = n,
                    "a launcher socket reports more domains than libvirt.discover.max_domains_per_socket: \
                     the extra domains are not exported (a launcher runs one VMI; this daemon may be forged)"
                );
            }
        }
        for conn in was.keys() {
            if !self.over_conn_limit.contains_key(conn) && conns.contains_key(conn) {
                tracing::info!(
                    connection = label(conn).as_deref().unwrap_or(""),
                    "a launcher socket is back within libvirt.discover.max_domains_per_socket"
                );
            }
        }
    }

    /// Log what changed in the stats: a warning when collisions or overflow start or grow, a
    /// line when they clear.
    fn report(&mut self, now: PointStats) {
        let was = std::mem::replace(&mut self.stats, now);
        if !self.log {
            return;
        }
        if now.over_limit > was.over_limit {
            tracing::warn!(
                sets = now.sets,
                limit = self.limit,
                over_limit = now.over_limit,
                "more attribute sets than metric.cardinality_limit: the sets beyond it are \
                 exported as one otel.metric.overflow=true point, not as their own series; \
                 raise metric.cardinality_limit"
            );
        } else if now.over_limit == 0 && was.over_limit > 0 {
            tracing::info!(
                sets = now.sets,
                limit = self.limit,
                "attribute sets are back within metric.cardinality_limit"
            );
        }
        if now.collisions > was.collisions {
            let example = self
                .points
                .iter()
                .zip(&self.roles)
                .find(|(_, role)| **role == Role::Shared)
                .map(|((rec, _), _)| Arc::clone(rec));
            tracing::warn!(
                collisions = now.collisions,
                domains = now.domains,
                series = now.sets,
                example = %example
                    .as_ref()
                    .map(|r| r.domain_name.as_str())
                    .unwrap_or(""),
                "domains share an attribute set with another domain and are exported as one \
                 series (ended when the last of them goes away); enable metric.attributes.uuid \
                 or pod_uid to tell them apart"
            );
        } else if now.collisions == 0 && was.collisions > 0 {
            tracing::info!("no two domains share an attribute set any more");
        }
    }
}

/// Whether the connection-level values that a domain's attributes use (given `opt`) are equal.
fn same_conn_attributes(
    opt: &OptionalAttributes,
    a: Option<&ConnMeta>,
    b: Option<&ConnMeta>,
) -> bool {
    let used = |m: Option<&ConnMeta>| {
        (
            m.is_some(),
            m.and_then(|m| m.hypervisor_version.clone())
                .filter(|_| opt.hypervisor_version),
            m.and_then(|m| m.pod_uid.clone()).filter(|_| opt.pod_uid),
        )
    };
    used(a) == used(b)
}

fn shared(s: &Arc<str>) -> Value {
    Value::String(StringValue::from(Arc::clone(s)))
}

/// The data-point attributes of one domain (README, "Metric reference"), sorted by key as the
/// SDK stores them.
fn domain_attributes(
    d: &DomainRecord,
    node: &Arc<str>,
    opt: &OptionalAttributes,
    hv_version: Option<&Arc<str>>,
    pod_uid: Option<&Arc<str>>,
) -> Vec<KeyValue> {
    let owned = |s: &str| Value::String(StringValue::from(Arc::<str>::from(s)));
    let mut kv = Vec::with_capacity(6);
    if let Some(ns) = &d.identity.namespace {
        kv.push(KeyValue::new("namespace", owned(ns)));
    }
    kv.push(KeyValue::new("name", owned(&d.identity.name)));
    kv.push(KeyValue::new("node", shared(node)));
    kv.push(KeyValue::new("hypervisor_type", d.hypervisor_type.as_str()));
    if opt.domain {
        kv.push(KeyValue::new("domain", owned(&d.domain_name)));
    }
    if opt.uuid {
        kv.push(KeyValue::new("uuid", owned(&d.uuid)));
    }
    if opt.machine {
        if let Some(m) = &d.facts.machine {
            kv.push(KeyValue::new("machine", owned(m)));
        }
    }
    if opt.emulator {
        if let Some(e) = &d.facts.emulator {
            kv.push(KeyValue::new("emulator", owned(e)));
        }
    }
    if opt.arch {
        if let Some(a) = &d.facts.arch {
            kv.push(KeyValue::new("arch", owned(a)));
        }
    }
    if opt.hypervisor_version {
        if let Some(v) = hv_version {
            kv.push(KeyValue::new("hypervisor_version", shared(v)));
        }
    }
    if opt.pod_uid {
        if let Some(p) = pod_uid {
            kv.push(KeyValue::new("pod_uid", shared(p)));
        }
    }
    // The raw root `type`, as libvirt wrote it. Its length is bounded by the parser (a value
    // longer than `MAX_VALUE_LEN` fails the parse, and the domain is exported without it).
    if opt.domain_type {
        if let Some(t) = &d.facts.domain_type {
            kv.push(KeyValue::new("domain_type", owned(t)));
        }
    }
    kv.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    kv
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::domain::{DomainFacts, HypervisorType};
    use crate::inventory::{ConnId, DomainRef, FetchOutcome, Inventory, Lifecycle};
    use crate::state::Owner;

    fn start(inv: &mut Inventory, conn: ConnId, uuid: &str, id: u32, name: &str, kvm: bool) {
        inv.add_connection(conn);
        let dom = DomainRef {
            uuid: uuid.into(),
            id: Some(id),
            name: name.into(),
        };
        let req = inv.apply_event(conn, dom, Lifecycle::Started).unwrap();
        let facts = DomainFacts {
            domain_type: Some(if kvm { "kvm" } else { "qemu" }.into()),
            hypervisor_type: if kvm {
                HypervisorType::Kvm
            } else {
                HypervisorType::QemuTcg
            },
            name: Some(name.into()),
            uuid: Some(uuid.into()),
            kubevirt: true,
            machine: None,
            arch: None,
            emulator: None,
            live: true,
        };
        assert!(inv.apply_fetch(&req, FetchOutcome::Facts(facts)));
    }

    fn as_map(attrs: &[KeyValue]) -> Vec<(String, String)> {
        attrs
            .iter()
            .map(|kv| (kv.key.to_string(), kv.value.to_string()))
            .collect()
    }

    /// (name, pointer to the attribute slice) of every point.
    fn collect(p: &mut InfoPoints, inv: &mut Inventory, tel: &Owner) -> Vec<(String, usize)> {
        p.refresh(inv.snapshot(), tel.store().connections())
            .map(|a| {
                let name = a.iter().find(|kv| kv.key.as_str() == "name").unwrap();
                (name.value.to_string(), a.as_ptr() as usize)
            })
            .collect()
    }

    #[test]
    fn attributes_follow_the_metric_reference_sorted_by_key() {
        let mut inv = Inventory::new();
        let tel = Owner::new();
        tel.add(1, "qemu:///system", None, None);
        start(&mut inv, 1, "u-1", 1, "default_vm-a", true);
        let mut p = InfoPoints::new("node-1", OptionalAttributes::default());
        let points: Vec<_> = p
            .refresh(inv.snapshot(), tel.store().connections())
            .map(as_map)
            .collect();
        assert_eq!(
            points,
            vec![vec![
                ("hypervisor_type".into(), "kvm".into()),
                ("name".into(), "vm-a".into()),
                ("namespace".into(), "default".into()),
                ("node".into(), "node-1".into()),
            ]]
        );
    }

    #[test]
    fn unchanged_domains_keep_their_attribute_sets_and_changes_are_rebuilt() {
        let mut inv = Inventory::new();
        let tel = Owner::new();
        tel.add(1, "a", None, None);
        tel.add(2, "b", Some("pod-b".into()), None);
        start(&mut inv, 1, "u-1", 1, "ns_a1", true);
        start(&mut inv, 1, "u-2", 2, "ns_a2", true);
        start(&mut inv, 2, "u-3", 3, "ns_b1", false);
        let opt = OptionalAttributes {
            pod_uid: true,
            ..OptionalAttributes::default()
        };
        let mut p = InfoPoints::new("n", opt);
        let first = collect(&mut p, &mut inv, &tel);
        assert_eq!(first.len(), 3);
        // Nothing changed: the very same attribute sets.
        assert_eq!(collect(&mut p, &mut inv, &tel), first);

        // One domain stops, another starts: the others keep their sets.
        inv.apply_event(
            1,
            DomainRef {
                uuid: "u-1".into(),
                id: Some(1),
                name: "ns_a1".into(),
            },
            Lifecycle::Stopped,
        );
        start(&mut inv, 1, "u-0", 9, "ns_a0", false);
        let second = collect(&mut p, &mut inv, &tel);
        let names: Vec<_> = second.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a0", "a2", "b1"]);
        assert_eq!(second[1], first[1]);
        assert_eq!(second[2], first[2]);

        // A connection-level value changes: only that connection's domains are rebuilt.
        tel.set_up(2, true, Some("9.0.0".into()));
        assert_eq!(collect(&mut p, &mut inv, &tel), second);
        tel.forget(2);
        tel.add(2, "b", Some("pod-b2".into()), None);
        let third = collect(&mut p, &mut inv, &tel);
        assert_eq!(third[..2], second[..2]);
        assert_ne!(third[2].1, second[2].1);
        let pod = p
            .refresh(inv.snapshot(), tel.store().connections())
            .last()
            .map(as_map)
            .unwrap();
        assert!(
            pod.contains(&("pod_uid".into(), "pod-b2".into())),
            "{pod:?}"
        );
    }

    /// A running domain with the given raw root `type` (`None`: the XML could not be read).
    fn start_typed(inv: &mut Inventory, uuid: &str, id: u32, name: &str, raw: Option<&str>) {
        inv.add_connection(1);
        let dom = DomainRef {
            uuid: uuid.into(),
            id: Some(id),
            name: name.into(),
        };
        let req = inv.apply_event(1, dom, Lifecycle::Started).unwrap();
        let outcome = match raw {
            Some(t) => FetchOutcome::Facts(DomainFacts {
                domain_type: Some(t.into()),
                hypervisor_type: HypervisorType::from_domain_type(Some(t)),
                name: Some(name.into()),
                uuid: Some(uuid.into()),
                kubevirt: false,
                machine: None,
                arch: None,
                emulator: None,
                live: true,
            }),
            None => FetchOutcome::Failed,
        };
        assert!(inv.apply_fetch(&req, outcome));
    }

    fn attr_of(points: &[Vec<(String, String)>], name: &str, key: &str) -> Option<String> {
        let p = points
            .iter()
            .find(|p| p.contains(&("name".into(), name.into())))
            .unwrap();
        p.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    #[test]
    fn domain_type_is_the_raw_root_type_and_only_when_switched_on() {
        let mut inv = Inventory::new();
        let tel = Owner::new();
        tel.add(1, "qemu:///system", None, None);
        start_typed(&mut inv, "u-1", 1, "fast", Some("kvm"));
        start_typed(&mut inv, "u-2", 2, "slow", Some("qemu"));
        start_typed(&mut inv, "u-3", 3, "new-backend", Some("bhyve"));
        start_typed(&mut inv, "u-4", 4, "unreadable", None);
        start_typed(&mut inv, "u-5", 5, "hyperv-direct", Some("hyperv"));

        let mut off = InfoPoints::new("n", OptionalAttributes::default());
        let points: Vec<_> = off
            .refresh(inv.snapshot(), tel.store().connections())
            .map(as_map)
            .collect();
        assert_eq!(points.len(), 5);
        assert!(points.iter().flatten().all(|(k, _)| k != "domain_type"));

        let opt = OptionalAttributes {
            domain_type: true,
            ..OptionalAttributes::default()
        };
        let mut on = InfoPoints::new("n", opt);
        let points: Vec<_> = on
            .refresh(inv.snapshot(), tel.store().connections())
            .map(as_map)
            .collect();
        let get = |name, key| attr_of(&points, name, key);
        assert_eq!(get("fast", "domain_type").as_deref(), Some("kvm"));
        assert_eq!(get("slow", "domain_type").as_deref(), Some("qemu"));
        assert_eq!(get("slow", "hypervisor_type").as_deref(), Some("qemu-tcg"));
        // KubeVirt's hyperv-direct: the Microsoft Hypervisor, hardware accelerated.
        assert_eq!(
            get("hyperv-direct", "domain_type").as_deref(),
            Some("hyperv")
        );
        assert_eq!(
            get("hyperv-direct", "hypervisor_type").as_deref(),
            Some("mshv")
        );
        // A type the agent does not classify stays `unknown`, and the raw value says which.
        assert_eq!(get("new-backend", "domain_type").as_deref(), Some("bhyve"));
        assert_eq!(
            get("new-backend", "hypervisor_type").as_deref(),
            Some("unknown")
        );
        // Nothing was read: no raw type to report (omitted, not empty).
        assert_eq!(get("unreadable", "domain_type"), None);
        assert_eq!(
            get("unreadable", "hypervisor_type").as_deref(),
            Some("unknown")
        );
        // Still sorted by key, as the SDK stores attribute sets.
        for p in &points {
            assert!(p.windows(2).all(|w| w[0].0 < w[1].0), "{p:?}");
        }
    }

    fn stop(inv: &mut Inventory, conn: ConnId, uuid: &str, id: u32, name: &str) {
        let dom = DomainRef {
            uuid: uuid.into(),
            id: Some(id),
            name: name.into(),
        };
        inv.apply_event(conn, dom, Lifecycle::Stopped);
    }

    #[test]
    fn colliding_domains_are_one_series_until_the_last_of_them_stops() {
        // Two daemons on one host, each with a domain of the same name.
        let mut inv = Inventory::new();
        let tel = Owner::new();
        tel.add(1, "qemu:///system", None, None);
        tel.add(2, "qemu:///session", None, None);
        start(&mut inv, 1, "u-1", 1, "ns_web", true);
        start(&mut inv, 2, "u-2", 1, "ns_web", true);
        start(&mut inv, 2, "u-3", 2, "ns_db", true);
        let mut p = InfoPoints::new("n", OptionalAttributes::default());
        let names = |p: &mut InfoPoints, inv: &mut Inventory| -> Vec<String> {
            collect(p, inv, &tel).into_iter().map(|(n, _)| n).collect()
        };
        assert_eq!(names(&mut p, &mut inv), ["web", "db"]);
        let stats = p.stats();
        assert_eq!((stats.domains, stats.sets, stats.collisions), (3, 2, 1));
        assert_eq!(p.fates(), [Fate::Exported, Fate::Shared, Fate::Exported]);

        // Either one stopping leaves the series in place ...
        stop(&mut inv, 1, "u-1", 1, "ns_web");
        assert_eq!(names(&mut p, &mut inv), ["web", "db"]);
        assert_eq!(p.stats().collisions, 0);
        // ... and only the last one ends it.
        stop(&mut inv, 2, "u-2", 1, "ns_web");
        assert_eq!(names(&mut p, &mut inv), ["db"]);

        // With uuid on, they are two series.
        start(&mut inv, 1, "u-1", 3, "ns_web", true);
        start(&mut inv, 2, "u-2", 4, "ns_web", true);
        let opt = OptionalAttributes {
            uuid: true,
            ..OptionalAttributes::default()
        };
        let mut p = InfoPoints::new("n", opt);
        assert_eq!(names(&mut p, &mut inv).len(), 3);
        assert_eq!(p.stats().collisions, 0);
    }

    #[test]
    fn sets_beyond_the_cardinality_limit_are_counted_in_observation_order() {
        let mut inv = Inventory::new();
        let tel = Owner::new();
        tel.add(1, "a", None, None);
        for i in 0..5 {
            start(
                &mut inv,
                1,
                &format!("u-{i}"),
                i,
                &format!("ns_vm{i}"),
                true,
            );
        }
        // A collision does not use a slot of the limit.
        start(&mut inv, 1, "u-9", 9, "ns_vm0", true);
        let mut p = InfoPoints::new("n", OptionalAttributes::default()).with_cardinality_limit(3);
        let observed = collect(&mut p, &mut inv, &tel);
        assert_eq!(observed.len(), 5);
        let stats = p.stats();
        assert_eq!((stats.sets, stats.collisions, stats.over_limit), (5, 1, 2));
        use Fate::*;
        assert_eq!(
            p.fates(),
            [Exported, Exported, Exported, OverLimit, OverLimit, Shared]
        );
        stop(&mut inv, 1, "u-4", 4, "ns_vm4");
        stop(&mut inv, 1, "u-3", 3, "ns_vm3");
        collect(&mut p, &mut inv, &tel);
        assert_eq!(p.stats().over_limit, 0);
    }

    #[test]
    fn a_flooding_socket_cannot_push_another_pods_vm_over_the_cardinality_limit() {
        let mut inv = Inventory::new();
        let tel = Owner::new();
        // Connection 1 comes first in snapshot order: without its own bound, its five domains
        // would take every one of the three sets the cardinality limit allows.
        tel.add(1, "flood", Some("pod-flood".into()), Some(2));
        tel.add(2, "healthy", Some("pod-ok".into()), Some(2));
        for i in 0..5 {
            start(
                &mut inv,
                1,
                &format!("f-{i}"),
                10 + i,
                &format!("prod_fake-{i}"),
                true,
            );
        }
        start(&mut inv, 2, "h-0", 1, "team-a_real", false);
        let mut p = InfoPoints::new("node-1", OptionalAttributes::default())
            .with_cardinality_limit(3)
            .without_logging();
        let names: Vec<String> = collect(&mut p, &mut inv, &tel)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["fake-0", "fake-1", "real"]);
        assert_eq!(
            p.fates(),
            [
                Fate::Exported,
                Fate::Exported,
                Fate::OverConnectionLimit,
                Fate::OverConnectionLimit,
                Fate::OverConnectionLimit,
                Fate::Exported,
            ]
        );
        assert_eq!(p.over_connection_limit(1), 3);
        assert_eq!(p.over_connection_limit(2), 0);
        let stats = p.stats();
        assert_eq!(stats.over_connection_limit, 3);
        assert_eq!(
            stats.over_limit, 0,
            "the healthy VM is not in the overflow point"
        );
        assert_eq!(stats.collisions, 0);
        assert_eq!(stats.sets, 3);
    }

    #[test]
    fn connections_without_a_domain_limit_are_bounded_only_by_the_cardinality_limit() {
        let mut inv = Inventory::new();
        let tel = Owner::new();
        tel.add(1, "qemu:///system", None, None);
        for i in 0..6 {
            start(
                &mut inv,
                1,
                &format!("u-{i}"),
                1 + i,
                &format!("vm-{i}"),
                true,
            );
        }
        let mut p = InfoPoints::new("node-1", OptionalAttributes::default()).without_logging();
        assert_eq!(collect(&mut p, &mut inv, &tel).len(), 6);
        assert_eq!(p.over_connection_limit(1), 0);
        assert_eq!(p.stats().over_connection_limit, 0);
    }
}
