#![allow(clippy::unwrap_used)]

use std::time::Duration;

use super::*;
use crate::domain::{DomainFacts, HypervisorType};

const C: ConnId = 1;

fn dref(uuid: &str, id: u32) -> DomainRef {
    DomainRef {
        uuid: uuid.into(),
        id: Some(id),
        name: format!("ns_{uuid}"),
    }
}

fn kvm() -> FetchOutcome {
    FetchOutcome::Facts(DomainFacts {
        domain_type: Some("kvm".into()),
        hypervisor_type: HypervisorType::Kvm,
        name: None,
        uuid: None,
        kubevirt: true,
        machine: None,
        arch: None,
        emulator: None,
        live: true,
    })
}

/// Start a domain through the owner and complete its read.
fn start(owner: &Owner, uuid: &str, id: u32) {
    let req = owner
        .on_event(C, dref(uuid, id), Lifecycle::Started)
        .unwrap();
    owner.on_fetch(&req, kvm());
}

/// Whether the store saw the signal since it last looked (without waiting).
fn signalled(store: &mut Store) -> bool {
    let seen = store.signal.has_changed().unwrap();
    store.signal.mark_unchanged();
    seen
}

#[test]
fn the_snapshot_is_published_once_per_visible_change() {
    let owner = Owner::new();
    owner.add(C, "qemu:///system", None, None);
    let store = owner.store();
    start(&owner, "a", 1);
    let s1 = store.snapshot();
    assert_eq!(s1.domains.len(), 1);
    assert!(Arc::ptr_eq(&s1, &store.snapshot()), "nothing rebuilt");
    assert!(
        Arc::ptr_eq(&s1, &owner.store().snapshot()),
        "every reader gets the published snapshot"
    );
    owner.on_event(C, dref("a", 1), Lifecycle::Suspended);
    assert!(
        Arc::ptr_eq(&s1, &store.snapshot()),
        "nothing visible changed"
    );
    owner.on_event(C, dref("a", 1), Lifecycle::Stopped);
    let s2 = store.snapshot();
    assert!(!Arc::ptr_eq(&s1, &s2));
    assert!(s2.domains.is_empty());
    assert!(s2.version > s1.version);
}

#[test]
fn the_signal_fires_for_visible_changes_only() {
    let owner = Owner::new();
    let mut store = owner.store();
    owner.add(C, "a", None, None);
    assert!(
        !signalled(&mut store),
        "a connection without domains changes nothing exported"
    );
    let req = owner.on_event(C, dref("a", 1), Lifecycle::Started).unwrap();
    assert!(!signalled(&mut store), "a START alone exports nothing yet");
    owner.on_fetch(&req, kvm());
    assert!(signalled(&mut store), "the read domain is exported");
    owner.on_event(C, dref("a", 1), Lifecycle::Suspended);
    owner.set_up(C, true, None);
    owner.count_reconnect(C);
    assert!(!signalled(&mut store));
    owner.touch();
    assert!(signalled(&mut store), "a node capability change pushes");
    owner.retire(C);
    assert!(signalled(&mut store), "retiring drops the domain");
    owner.forget(C);
    assert!(!signalled(&mut store), "nothing was left to forget");
}

#[test]
fn a_retired_connection_cannot_bring_its_domains_back() {
    let owner = Owner::new();
    let store = owner.store();
    owner.add(C, "a", None, None);
    start(&owner, "a", 1);
    owner.retire(C);
    assert!(store.snapshot().domains.is_empty());
    assert!(store.connections().is_empty());
    assert!(owner
        .on_event(C, dref("b", 2), Lifecycle::Started)
        .is_none());
    let resync = owner.begin_resync(C);
    let report = resync.finish(vec![(dref("c", 3), Some(kvm()))]);
    assert_eq!(report, ResyncReport::default());
    assert!(store.snapshot().domains.is_empty());
    owner.forget(C);
    assert_eq!(store.inspect(Inventory::resyncs_in_progress), 0);
}

#[test]
fn a_resync_dropped_unfinished_is_abandoned() {
    let owner = Owner::new();
    let store = owner.store();
    owner.add(C, "a", None, None);
    start(&owner, "a", 1);
    let resync = owner.begin_resync(C);
    owner.on_event(C, dref("a", 1), Lifecycle::Stopped);
    assert_eq!(store.inspect(Inventory::tombstones), 1);
    drop(resync);
    assert_eq!(store.inspect(Inventory::resyncs_in_progress), 0);
    assert_eq!(
        store.inspect(Inventory::tombstones),
        0,
        "no tombstone leaked"
    );
}

#[test]
fn the_connection_table_is_shared_until_it_changes() {
    let owner = Owner::new();
    let store = owner.store();
    owner.add(1, "a", Some("pod-a".into()), Some(5));
    let a = store.connections();
    assert!(Arc::ptr_eq(&a, &store.connections()));
    owner.count_reconnect(1);
    let b = store.connections();
    assert!(!Arc::ptr_eq(&a, &b));
    assert_eq!((a[&1].reconnects, b[&1].reconnects), (0, 1));
    assert_eq!(b[&1].pod_uid.as_deref(), Some("pod-a"));
    assert_eq!(b[&1].domain_limit, Some(5));
    assert_eq!(&*b[&1].label, "a");
    owner.count_dropped_events(1, 0);
    assert!(
        Arc::ptr_eq(&b, &store.connections()),
        "nothing dropped, nothing changed"
    );
}

#[tokio::test]
async fn changed_wakes_every_store_and_urgency_is_taken_once() {
    let owner = Owner::new();
    let mut one = owner.store();
    let mut two = one.clone();
    owner.add(C, "a", None, None);
    start(&owner, "a", 1);
    for store in [&mut one, &mut two] {
        tokio::time::timeout(Duration::from_secs(10), store.changed())
            .await
            .expect("the change reaches every store");
    }
    assert!(!one.take_urgent());
    owner.publish_now();
    tokio::time::timeout(Duration::from_secs(10), one.changed())
        .await
        .expect("an urgent push signals");
    assert!(one.take_urgent());
    assert!(!two.take_urgent(), "taken once");
}
