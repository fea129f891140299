//! The info gauge's attribute sets, built once per change instead of at every collection.
//!
//! A collection at 10,000 domains used to build 10,000 attribute vectors with freshly allocated
//! strings, which the SDK then hashed and copied again. [`InfoPoints`] keeps the attribute sets
//! between collections, with every string value shared (`Arc<str>`), so that the SDK's own copy
//! of a set is a few reference-count increments. When the inventory snapshot or the connection
//! table changes, only the domains whose record changed are rebuilt: the snapshot keeps an
//! unchanged domain's `Arc<DomainRecord>`, so pointer equality says "unchanged".

use std::sync::Arc;

use opentelemetry::{KeyValue, StringValue, Value};

use super::telemetry::{ConnMeta, ConnTable};
use crate::config::OptionalAttributes;
use crate::inventory::{DomainRecord, Snapshot};

/// The info gauge's data points (value 1 each), kept between collections.
#[derive(Debug)]
pub struct InfoPoints {
    node: Arc<str>,
    opt: OptionalAttributes,
    snap: Option<Arc<Snapshot>>,
    conns: Option<Arc<ConnTable>>,
    /// In snapshot order (connection, uuid).
    points: Vec<(Arc<DomainRecord>, Box<[KeyValue]>)>,
}

impl InfoPoints {
    pub fn new(node: &str, opt: OptionalAttributes) -> Self {
        Self {
            node: Arc::from(node),
            opt,
            snap: None,
            conns: None,
            points: Vec::new(),
        }
    }

    /// Bring the attribute sets up to date with `snap` and `conns`, and return them. Unchanged
    /// inputs (the same `Arc`s as last time) cost nothing.
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
        self.points.iter().map(|(_, attrs)| &attrs[..])
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
        self.points = points;
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

/// The data-point attributes of one domain (contract §1), sorted by key as the SDK stores them.
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
    if opt.vmi_uid {
        if let Some(uid) = d.facts.kubevirt.as_ref().and_then(|k| k.uid.as_deref()) {
            kv.push(KeyValue::new("vmi_uid", owned(uid)));
        }
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
    use crate::domain::{DomainFacts, HypervisorType, KubevirtMeta};
    use crate::export::Telemetry;
    use crate::inventory::{ConnId, DomainRef, FetchOutcome, Inventory, Lifecycle};

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
            kubevirt: Some(KubevirtMeta { uid: None }),
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
    fn collect(p: &mut InfoPoints, inv: &mut Inventory, tel: &Telemetry) -> Vec<(String, usize)> {
        p.refresh(inv.snapshot(), tel.connection_meta())
            .map(|a| {
                let name = a.iter().find(|kv| kv.key.as_str() == "name").unwrap();
                (name.value.to_string(), a.as_ptr() as usize)
            })
            .collect()
    }

    #[test]
    fn attributes_follow_the_contract_sorted_by_key() {
        let mut inv = Inventory::new();
        let tel = Telemetry::new();
        tel.add_connection(1, "qemu:///system", None);
        start(&mut inv, 1, "u-1", 1, "default_vm-a", true);
        let mut p = InfoPoints::new("node-1", OptionalAttributes::default());
        let points: Vec<_> = p
            .refresh(inv.snapshot(), tel.connection_meta())
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
        let tel = Telemetry::new();
        tel.add_connection(1, "a", None);
        tel.add_connection(2, "b", Some("pod-b".into()));
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
        tel.remove_connection(2);
        tel.add_connection(2, "b", Some("pod-b2".into()));
        let third = collect(&mut p, &mut inv, &tel);
        assert_eq!(third[..2], second[..2]);
        assert_ne!(third[2].1, second[2].1);
        let pod = p
            .refresh(inv.snapshot(), tel.connection_meta())
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
                kubevirt: None,
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
        let tel = Telemetry::new();
        tel.add_connection(1, "qemu:///system", None);
        start_typed(&mut inv, "u-1", 1, "fast", Some("kvm"));
        start_typed(&mut inv, "u-2", 2, "slow", Some("qemu"));
        start_typed(&mut inv, "u-3", 3, "new-backend", Some("hyperv"));
        start_typed(&mut inv, "u-4", 4, "unreadable", None);

        let mut off = InfoPoints::new("n", OptionalAttributes::default());
        let points: Vec<_> = off
            .refresh(inv.snapshot(), tel.connection_meta())
            .map(as_map)
            .collect();
        assert_eq!(points.len(), 4);
        assert!(points.iter().flatten().all(|(k, _)| k != "domain_type"));

        let opt = OptionalAttributes {
            domain_type: true,
            ..OptionalAttributes::default()
        };
        let mut on = InfoPoints::new("n", opt);
        let points: Vec<_> = on
            .refresh(inv.snapshot(), tel.connection_meta())
            .map(as_map)
            .collect();
        let get = |name, key| attr_of(&points, name, key);
        assert_eq!(get("fast", "domain_type").as_deref(), Some("kvm"));
        assert_eq!(get("slow", "domain_type").as_deref(), Some("qemu"));
        assert_eq!(get("slow", "hypervisor_type").as_deref(), Some("qemu-tcg"));
        // A type the agent does not classify stays `unknown`, and the raw value says which.
        assert_eq!(get("new-backend", "domain_type").as_deref(), Some("hyperv"));
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

    #[test]
    fn connection_table_is_shared_until_it_changes() {
        let tel = Telemetry::new();
        tel.add_connection(1, "a", None);
        let a = tel.connection_meta();
        assert!(Arc::ptr_eq(&a, &tel.connection_meta()));
        tel.count_reconnect(1);
        let b = tel.connection_meta();
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!((a[&1].reconnects, b[&1].reconnects), (0, 1));
    }
}
