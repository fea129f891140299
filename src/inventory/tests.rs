use super::*;

const C: ConnId = 1;

fn dref(uuid: &str, id: u32, name: &str) -> DomainRef {
    DomainRef {
        uuid: uuid.into(),
        id: Some(id),
        name: name.into(),
    }
}

fn facts(t: &str, name: &str, kubevirt: bool) -> FetchOutcome {
    FetchOutcome::Facts(DomainFacts {
        domain_type: Some(t.into()),
        hypervisor_type: HypervisorType::from_domain_type(Some(t)),
        name: Some(name.into()),
        uuid: None,
        kubevirt,
        machine: None,
        arch: None,
        emulator: None,
        live: true,
    })
}

fn names(inv: &mut Inventory) -> Vec<(String, HypervisorType)> {
    inv.snapshot()
        .domains
        .iter()
        .map(|d| (d.domain_name.clone(), d.hypervisor_type))
        .collect()
}

/// Start a domain and complete its fetch.
fn start(inv: &mut Inventory, d: DomainRef, t: &str) {
    let name = d.name.clone();
    let req = inv
        .apply_event(C, d, Lifecycle::Started)
        .expect("started asks for a fetch");
    assert!(inv.apply_fetch(&req, facts(t, &name, false)));
}

#[test]
fn started_event_requests_fetch_and_exports_after_it() {
    let mut inv = Inventory::new();
    let req = inv
        .apply_event(C, dref("u1", 1, "vm1"), Lifecycle::Started)
        .unwrap();
    assert_eq!(req.domain.uuid, "u1");
    assert!(
        names(&mut inv).is_empty(),
        "not exported before its XML is read"
    );
    assert!(inv.apply_fetch(&req, facts("kvm", "vm1", false)));
    assert_eq!(names(&mut inv), vec![("vm1".into(), HypervisorType::Kvm)]);
}

#[test]
fn resumed_event_rereads_and_replaces() {
    let mut inv = Inventory::new();
    start(&mut inv, dref("u1", 1, "vm1"), "qemu");
    let req = inv
        .apply_event(C, dref("u1", 1, "vm1"), Lifecycle::Resumed)
        .unwrap();
    // Still exported while the re-read is in flight.
    assert_eq!(names(&mut inv).len(), 1);
    assert!(inv.apply_fetch(&req, facts("kvm", "vm1", false)));
    assert_eq!(names(&mut inv), vec![("vm1".into(), HypervisorType::Kvm)]);
}

#[test]
fn resumed_for_unknown_domain_inserts_it() {
    let mut inv = Inventory::new();
    let req = inv
        .apply_event(C, dref("u1", 1, "vm1"), Lifecycle::Resumed)
        .unwrap();
    inv.apply_fetch(&req, facts("qemu", "vm1", false));
    assert_eq!(
        names(&mut inv),
        vec![("vm1".into(), HypervisorType::QemuTcg)]
    );
}

#[test]
fn suspended_shutdown_pmsuspended_crashed_keep_domain() {
    for ev in [
        Lifecycle::Suspended,
        Lifecycle::Shutdown,
        Lifecycle::PmSuspended,
        Lifecycle::Crashed,
    ] {
        let mut inv = Inventory::new();
        start(&mut inv, dref("u1", 1, "vm1"), "kvm");
        let v = inv.snapshot().version;
        assert!(
            inv.apply_event(C, dref("u1", 1, "vm1"), ev).is_none(),
            "{ev:?}"
        );
        assert_eq!(names(&mut inv).len(), 1, "{ev:?} keeps the domain");
        assert_eq!(inv.snapshot().version, v, "{ev:?} changes nothing visible");
    }
}

#[test]
fn suspended_for_unknown_domain_fetches_it() {
    let mut inv = Inventory::new();
    let req = inv
        .apply_event(C, dref("u1", 1, "vm1"), Lifecycle::Suspended)
        .unwrap();
    inv.apply_fetch(&req, facts("kvm", "vm1", false));
    assert_eq!(names(&mut inv).len(), 1);
}

#[test]
fn stopped_event_removes_domain() {
    let mut inv = Inventory::new();
    start(&mut inv, dref("u1", 1, "vm1"), "kvm");
    assert!(inv
        .apply_event(C, dref("u1", 1, "vm1"), Lifecycle::Stopped)
        .is_none());
    assert!(names(&mut inv).is_empty());
}

fn inactive(uuid: &str, name: &str) -> DomainRef {
    DomainRef {
        uuid: uuid.into(),
        id: None,
        name: name.into(),
    }
}

#[test]
fn undefined_of_a_running_domain_keeps_it_exported() {
    let mut inv = Inventory::new();
    start(&mut inv, dref("u1", 1, "vm1"), "kvm");
    let v = inv.snapshot().version;
    assert!(inv
        .apply_event(C, dref("u1", 1, "vm1"), Lifecycle::Undefined)
        .is_none());
    assert_eq!(
        names(&mut inv).len(),
        1,
        "a running domain that became transient still runs"
    );
    assert_eq!(inv.snapshot().version, v);
}

#[test]
fn undefined_removes_if_present_and_is_harmless_otherwise() {
    let mut inv = Inventory::new();
    start(&mut inv, dref("u1", 1, "vm1"), "kvm");
    inv.apply_event(C, inactive("u1", "vm1"), Lifecycle::Undefined);
    assert!(names(&mut inv).is_empty());
    let v = inv.snapshot().version;
    inv.apply_event(C, inactive("u9", "other"), Lifecycle::Undefined);
    assert_eq!(inv.snapshot().version, v);
}

#[test]
fn defined_event_exports_nothing() {
    let mut inv = Inventory::new();
    assert!(inv
        .apply_event(C, dref("u1", 0, "vm1"), Lifecycle::Defined)
        .is_none());
    assert!(names(&mut inv).is_empty());
    assert!(inv
        .apply_event(C, dref("u1", 0, "vm1"), Lifecycle::Other)
        .is_none());
    assert!(names(&mut inv).is_empty());
}

#[test]
fn applying_events_twice_is_idempotent() {
    let mut inv = Inventory::new();
    start(&mut inv, dref("u1", 1, "vm1"), "kvm");
    let v = inv.snapshot().version;
    let req = inv
        .apply_event(C, dref("u1", 1, "vm1"), Lifecycle::Started)
        .unwrap();
    assert!(
        !inv.apply_fetch(&req, facts("kvm", "vm1", false)),
        "same facts: no change"
    );
    assert_eq!(inv.snapshot().version, v);
    assert_eq!(names(&mut inv).len(), 1);
    inv.apply_event(C, dref("u1", 1, "vm1"), Lifecycle::Stopped);
    inv.apply_event(C, dref("u1", 1, "vm1"), Lifecycle::Stopped);
    assert!(names(&mut inv).is_empty());
}

#[test]
fn stop_overtaking_a_slow_fetch_leaves_no_phantom() {
    let mut inv = Inventory::new();
    let req = inv
        .apply_event(C, dref("u1", 1, "vm1"), Lifecycle::Started)
        .unwrap();
    inv.apply_event(C, dref("u1", 1, "vm1"), Lifecycle::Stopped);
    assert!(
        !inv.apply_fetch(&req, facts("kvm", "vm1", false)),
        "stale fetch is dropped"
    );
    assert!(names(&mut inv).is_empty());
}

#[test]
fn older_fetch_result_does_not_override_newer_one() {
    let mut inv = Inventory::new();
    let r1 = inv
        .apply_event(C, dref("u1", 1, "vm1"), Lifecycle::Started)
        .unwrap();
    let r2 = inv
        .apply_event(C, dref("u1", 1, "vm1"), Lifecycle::Resumed)
        .unwrap();
    assert!(inv.apply_fetch(&r2, facts("kvm", "vm1", false)));
    assert!(!inv.apply_fetch(&r1, facts("qemu", "vm1", false)));
    assert_eq!(names(&mut inv), vec![("vm1".into(), HypervisorType::Kvm)]);
}

#[test]
fn fetch_gone_removes_and_failed_exports_unknown() {
    let mut inv = Inventory::new();
    let req = inv
        .apply_event(C, dref("u1", 1, "vm1"), Lifecycle::Started)
        .unwrap();
    inv.apply_fetch(&req, FetchOutcome::Gone);
    assert!(names(&mut inv).is_empty());
    let req = inv
        .apply_event(C, dref("u2", 2, "vm2"), Lifecycle::Started)
        .unwrap();
    inv.apply_fetch(&req, FetchOutcome::Failed);
    let snap = inv.snapshot();
    assert_eq!(snap.domains[0].hypervisor_type, HypervisorType::Unknown);
    assert_eq!(snap.domains[0].identity.name, "vm2");
    assert!(!snap.domains[0].complete);
}

#[test]
fn kubevirt_identity_is_split_from_domain_name() {
    let mut inv = Inventory::new();
    let req = inv
        .apply_event(C, dref("u1", 1, "prod_web-1"), Lifecycle::Started)
        .unwrap();
    inv.apply_fetch(&req, facts("kvm", "prod_web-1", true));
    let req = inv
        .apply_event(C, dref("u2", 2, "plain_vm"), Lifecycle::Started)
        .unwrap();
    inv.apply_fetch(&req, facts("kvm", "plain_vm", false));
    let snap = inv.snapshot();
    let kv = snap.domains.iter().find(|d| d.uuid == "u1").unwrap();
    assert_eq!(kv.identity.namespace.as_deref(), Some("prod"));
    assert_eq!(kv.identity.name, "web-1");
    let plain = snap.domains.iter().find(|d| d.uuid == "u2").unwrap();
    assert_eq!(plain.identity.namespace, None);
    assert_eq!(plain.identity.name, "plain_vm");
}

#[test]
fn resync_adds_unknown_removes_unlisted_and_keeps_known() {
    let mut inv = Inventory::new();
    start(&mut inv, dref("keep", 1, "keep"), "kvm");
    start(&mut inv, dref("gone", 2, "gone"), "kvm");
    let token = inv.begin_resync(C);
    let listing = vec![dref("keep", 1, "keep"), dref("new", 3, "new")];
    let need = inv.needs_fetch(C, &listing);
    assert_eq!(
        need,
        vec![dref("new", 3, "new")],
        "only unknown domains are fetched"
    );
    let report = inv.finish_resync(
        token,
        vec![
            (dref("keep", 1, "keep"), None),
            (dref("new", 3, "new"), Some(facts("qemu", "new", false))),
        ],
    );
    assert_eq!((report.added, report.removed, report.replaced), (1, 1, 0));
    assert!(report.fetches.is_empty());
    let mut got = names(&mut inv);
    got.sort();
    assert_eq!(
        got,
        vec![
            ("keep".into(), HypervisorType::Kvm),
            ("new".into(), HypervisorType::QemuTcg)
        ]
    );
}

#[test]
fn resync_with_nothing_changed_changes_nothing() {
    let mut inv = Inventory::new();
    start(&mut inv, dref("a", 1, "a"), "kvm");
    let before = inv.snapshot();
    let token = inv.begin_resync(C);
    let listing = vec![dref("a", 1, "a")];
    assert!(inv.needs_fetch(C, &listing).is_empty());
    let report = inv.finish_resync(token, vec![(dref("a", 1, "a"), None)]);
    assert_eq!(report, ResyncReport::default());
    assert_eq!(
        inv.version(),
        before.version,
        "same version: the owner keeps publishing the same snapshot"
    );
    assert_eq!(inv.snapshot().domains, before.domains);
}

#[test]
fn restarted_domain_same_uuid_new_id_is_reread() {
    let mut inv = Inventory::new();
    start(&mut inv, dref("a", 1, "a"), "qemu");
    let token = inv.begin_resync(C);
    let listing = vec![dref("a", 7, "a")];
    assert_eq!(inv.needs_fetch(C, &listing), listing);
    let report = inv.finish_resync(
        token,
        vec![(dref("a", 7, "a"), Some(facts("kvm", "a", false)))],
    );
    assert_eq!(report.replaced, 1);
    let snap = inv.snapshot();
    assert_eq!(snap.domains[0].id, Some(7));
    assert_eq!(snap.domains[0].hypervisor_type, HypervisorType::Kvm);
}

#[test]
fn failed_record_is_refetched_at_resync() {
    let mut inv = Inventory::new();
    let req = inv
        .apply_event(C, dref("a", 1, "a"), Lifecycle::Started)
        .unwrap();
    inv.apply_fetch(&req, FetchOutcome::Failed);
    let listing = vec![dref("a", 1, "a")];
    assert_eq!(inv.needs_fetch(C, &listing), listing);
}

#[test]
fn stop_during_resync_is_not_undone_by_the_listing() {
    let mut inv = Inventory::new();
    start(&mut inv, dref("a", 1, "a"), "kvm");
    let token = inv.begin_resync(C);
    // The listing was taken while "a" still ran; then it stopped before the resync finished.
    inv.apply_event(C, dref("a", 1, "a"), Lifecycle::Stopped);
    let report = inv.finish_resync(
        token,
        vec![(dref("a", 1, "a"), Some(facts("kvm", "a", false)))],
    );
    assert!(names(&mut inv).is_empty(), "{report:?}");
}

#[test]
fn start_during_resync_is_not_removed_by_the_listing() {
    let mut inv = Inventory::new();
    let token = inv.begin_resync(C);
    // Listing taken before "b" started: it is not listed.
    let req = inv
        .apply_event(C, dref("b", 2, "b"), Lifecycle::Started)
        .unwrap();
    inv.apply_fetch(&req, facts("qemu", "b", false));
    inv.finish_resync(token, vec![]);
    assert_eq!(names(&mut inv), vec![("b".into(), HypervisorType::QemuTcg)]);
}

#[test]
fn start_during_resync_with_fetch_still_in_flight_survives() {
    let mut inv = Inventory::new();
    let token = inv.begin_resync(C);
    let req = inv
        .apply_event(C, dref("b", 2, "b"), Lifecycle::Started)
        .unwrap();
    inv.finish_resync(token, vec![]);
    assert!(inv.apply_fetch(&req, facts("qemu", "b", false)));
    assert_eq!(names(&mut inv).len(), 1);
}

#[test]
fn resync_listing_without_outcome_comes_back_as_fetch() {
    let mut inv = Inventory::new();
    let token = inv.begin_resync(C);
    let report = inv.finish_resync(token, vec![(dref("x", 1, "x"), None)]);
    assert_eq!(report.fetches.len(), 1);
    assert!(inv.apply_fetch(&report.fetches[0], facts("kvm", "x", false)));
    assert_eq!(names(&mut inv).len(), 1);
}

#[test]
fn resync_only_touches_its_own_connection() {
    let mut inv = Inventory::new();
    start(&mut inv, dref("a", 1, "a"), "kvm");
    let req = inv
        .apply_event(2, dref("b", 1, "b"), Lifecycle::Started)
        .unwrap();
    inv.apply_fetch(&req, facts("qemu", "b", false));
    let token = inv.begin_resync(2);
    inv.finish_resync(token, vec![]);
    assert_eq!(names(&mut inv), vec![("a".into(), HypervisorType::Kvm)]);
}

#[test]
fn remove_connection_drops_its_domains_at_once() {
    let mut inv = Inventory::new();
    start(&mut inv, dref("a", 1, "a"), "kvm");
    start(&mut inv, dref("b", 2, "b"), "kvm");
    let req = inv
        .apply_event(2, dref("c", 1, "c"), Lifecycle::Started)
        .unwrap();
    inv.apply_fetch(&req, facts("qemu", "c", false));
    assert_eq!(inv.remove_connection(C), 2);
    assert_eq!(names(&mut inv), vec![("c".into(), HypervisorType::QemuTcg)]);
    // A fetch that completes for a removed connection is dropped.
    let late = FetchRequest {
        conn: C,
        domain: dref("a", 1, "a"),
        seq: 1,
    };
    assert!(!inv.apply_fetch(&late, facts("kvm", "a", false)));
}

#[test]
fn the_version_moves_only_with_a_visible_change() {
    let mut inv = Inventory::new();
    start(&mut inv, dref("a", 1, "a"), "kvm");
    let s1 = inv.snapshot();
    assert_eq!(inv.snapshot().version, s1.version);
    inv.apply_event(C, dref("a", 1, "a"), Lifecycle::Suspended);
    assert_eq!(inv.version(), s1.version);
    inv.apply_event(C, dref("a", 1, "a"), Lifecycle::Stopped);
    assert!(inv.snapshot().version > s1.version);
    assert!(inv.snapshot().domains.is_empty());
}

#[test]
fn count_by_type_includes_zero_types() {
    let mut inv = Inventory::new();
    start(&mut inv, dref("a", 1, "a"), "kvm");
    start(&mut inv, dref("b", 2, "b"), "kvm");
    let snap = inv.snapshot();
    let counts = snap.count_by_type();
    assert_eq!(counts[&HypervisorType::Kvm], 2);
    assert_eq!(counts[&HypervisorType::QemuTcg], 0);
    assert_eq!(counts[&HypervisorType::Mshv], 0);
    assert_eq!(counts[&HypervisorType::Unknown], 0);
    assert_eq!(counts.len(), HypervisorType::ALL.len());
}

#[test]
fn a_hyperv_domain_is_held_as_mshv_and_counted_apart_from_kvm() {
    let mut inv = Inventory::new();
    start(&mut inv, dref("a", 1, "a"), "hyperv");
    start(&mut inv, dref("b", 2, "b"), "kvm");
    assert_eq!(
        names(&mut inv),
        vec![
            ("a".into(), HypervisorType::Mshv),
            ("b".into(), HypervisorType::Kvm)
        ]
    );
    let snap = inv.snapshot();
    let counts = snap.count_by_type();
    assert_eq!(counts[&HypervisorType::Mshv], 1);
    assert_eq!(counts[&HypervisorType::Kvm], 1);
    assert_eq!(counts[&HypervisorType::Unknown], 0);
    // Restarted on a node without /dev/mshv, KubeVirt's converter falls back to type='qemu'.
    inv.apply_event(C, dref("a", 1, "a"), Lifecycle::Stopped);
    start(&mut inv, dref("a", 3, "a"), "qemu");
    assert_eq!(names(&mut inv)[0], ("a".into(), HypervisorType::QemuTcg));
}

#[test]
fn lifecycle_from_raw_maps_every_libvirt_value() {
    let expected = [
        Lifecycle::Defined,
        Lifecycle::Undefined,
        Lifecycle::Started,
        Lifecycle::Suspended,
        Lifecycle::Resumed,
        Lifecycle::Stopped,
        Lifecycle::Shutdown,
        Lifecycle::PmSuspended,
        Lifecycle::Crashed,
    ];
    for (raw, want) in expected.iter().enumerate() {
        assert_eq!(Lifecycle::from_raw(raw as i32), *want);
    }
    assert_eq!(Lifecycle::from_raw(99), Lifecycle::Other);
    assert_eq!(Lifecycle::from_raw(-1), Lifecycle::Other);
}

/// A seeded random interleaving of events, fetch completions and resyncs against a model:
/// at quiescence (no fetch in flight, after a resync against the truth) the inventory equals
/// the model's running set.
#[test]
fn random_interleavings_converge_to_the_truth() {
    let mut rng: u64 = 0x9e3779b97f4a7c15;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for _round in 0..200 {
        let mut inv = Inventory::new();
        let mut truth: HashMap<String, u32> = HashMap::new(); // uuid -> id of running domains
        let mut in_flight: Vec<FetchRequest> = Vec::new();
        let mut next_id = 1u32;
        let mut resync: Option<(ResyncToken, Vec<DomainRef>)> = None;
        for _ in 0..60 {
            let uuid = format!("u{}", next(6));
            match next(7) {
                0 | 1 => {
                    if !truth.contains_key(&uuid) {
                        next_id += 1;
                        truth.insert(uuid.clone(), next_id);
                        if let Some(r) =
                            inv.apply_event(C, dref(&uuid, next_id, &uuid), Lifecycle::Started)
                        {
                            in_flight.push(r);
                        }
                    }
                }
                2 => {
                    if let Some(id) = truth.remove(&uuid) {
                        inv.apply_event(C, dref(&uuid, id, &uuid), Lifecycle::Stopped);
                    }
                }
                3 => {
                    if !in_flight.is_empty() {
                        let i = next(in_flight.len() as u64) as usize;
                        let r = in_flight.swap_remove(i);
                        let outcome = if truth.get(&r.domain.uuid) == r.domain.id.as_ref() {
                            facts("kvm", &r.domain.name, false)
                        } else {
                            FetchOutcome::Gone
                        };
                        inv.apply_fetch(&r, outcome);
                    }
                }
                4 => {
                    if resync.is_none() {
                        let token = inv.begin_resync(C);
                        let listing: Vec<DomainRef> =
                            truth.iter().map(|(u, id)| dref(u, *id, u)).collect();
                        resync = Some((token, listing));
                    }
                }
                5 => {
                    if let Some((token, listing)) = resync.take() {
                        let need = inv.needs_fetch(C, &listing);
                        let items = listing
                            .into_iter()
                            .map(|d| {
                                if need.contains(&d) {
                                    let o = if truth.get(&d.uuid) == d.id.as_ref() {
                                        facts("kvm", &d.name, false)
                                    } else {
                                        FetchOutcome::Gone
                                    };
                                    (d, Some(o))
                                } else {
                                    (d, None)
                                }
                            })
                            .collect();
                        let report = inv.finish_resync(token, items);
                        in_flight.extend(report.fetches);
                    }
                }
                _ => {
                    if let Some(id) = truth.get(&uuid) {
                        if let Some(r) =
                            inv.apply_event(C, dref(&uuid, *id, &uuid), Lifecycle::Resumed)
                        {
                            in_flight.push(r);
                        }
                    }
                }
            }
        }
        // Quiesce: finish any resync, drain fetches, then one resync against the truth.
        if let Some((token, listing)) = resync.take() {
            let report = inv.finish_resync(token, listing.into_iter().map(|d| (d, None)).collect());
            in_flight.extend(report.fetches);
        }
        let drain = |inv: &mut Inventory,
                     in_flight: &mut Vec<FetchRequest>,
                     truth: &HashMap<String, u32>| {
            for r in in_flight.drain(..) {
                let o = if truth.get(&r.domain.uuid) == r.domain.id.as_ref() {
                    facts("kvm", &r.domain.name, false)
                } else {
                    FetchOutcome::Gone
                };
                inv.apply_fetch(&r, o);
            }
        };
        drain(&mut inv, &mut in_flight, &truth);
        let mut want: Vec<String> = truth.keys().cloned().collect();
        want.sort();
        let mut got: Vec<String> = inv
            .snapshot()
            .domains
            .iter()
            .map(|d| d.uuid.clone())
            .collect();
        got.sort();
        assert_eq!(got, want, "events alone converge");
        let token = inv.begin_resync(C);
        let listing: Vec<DomainRef> = truth.iter().map(|(u, id)| dref(u, *id, u)).collect();
        let report = inv.finish_resync(token, listing.into_iter().map(|d| (d, None)).collect());
        in_flight.extend(report.fetches);
        drain(&mut inv, &mut in_flight, &truth);
        let mut got: Vec<String> = inv
            .snapshot()
            .domains
            .iter()
            .map(|d| d.uuid.clone())
            .collect();
        got.sort();
        assert_eq!(got, want, "and a resync changes nothing more");
        assert_eq!(inv.pending_fetches(), 0);
    }
}

#[test]
fn a_retired_connection_loses_its_domains_at_once_and_nothing_brings_them_back() {
    let mut inv = Inventory::new();
    inv.add_connection(C);
    inv.add_connection(2);
    start(&mut inv, dref("a", 1, "a"), "kvm");
    let pending = inv
        .apply_event(C, dref("b", 2, "b"), Lifecycle::Started)
        .unwrap();
    let token = inv.begin_resync(C);
    let req = inv
        .apply_event(2, dref("other", 3, "other"), Lifecycle::Started)
        .unwrap();
    assert!(inv.apply_fetch(&req, facts("kvm", "other", false)));

    assert_eq!(inv.retire_connection(C), 1);
    assert_eq!(names(&mut inv), vec![("other".into(), HypervisorType::Kvm)]);
    // What the closing connection still reports is ignored: a late event, a late fetch, the
    // resync it had begun and a new one.
    assert!(inv
        .apply_event(C, dref("c", 4, "c"), Lifecycle::Started)
        .is_none());
    assert!(!inv.apply_fetch(&pending, facts("kvm", "b", false)));
    assert!(inv.needs_fetch(C, &[dref("a", 1, "a")]).is_empty());
    inv.finish_resync(
        token,
        vec![(dref("a", 1, "a"), Some(facts("kvm", "a", false)))],
    );
    let late = inv.begin_resync(C);
    inv.finish_resync(
        late,
        vec![(dref("a", 1, "a"), Some(facts("kvm", "a", false)))],
    );
    assert_eq!(names(&mut inv), vec![("other".into(), HypervisorType::Kvm)]);
    assert_eq!((inv.resyncs_in_progress(), inv.tombstones()), (0, 0));

    // Once its task ended the id is forgotten; ids are never reused.
    inv.forget_retired(C);
    assert!(inv.retired.is_empty());
}
