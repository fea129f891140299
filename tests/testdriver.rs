#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! In-process integration against libvirt's test driver: the agent watches `test:///default`
//! through its own read-only connection while a second, read-write connection in the same
//! process defines, starts, suspends, resumes, destroys and undefines domains. The test
//! driver's state is per process and its events reach every connection, so the inventory must
//! follow every transition.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::in_process::InProcess;
use virt::connect::Connect;
use virt_hypervisor_agent::config::{AgentConfig, ExporterKind};
use virt_hypervisor_agent::domain::HypervisorType;
use virt_hypervisor_agent::inventory::DomainRecord;
use virt_hypervisor_agent::state::Store;

const URI: &str = "test:///default";

fn domain_xml(name: &str, uuid: &str, kind: &str, kubevirt_uid: Option<&str>) -> String {
    let meta = kubevirt_uid
        .map(|u| format!("<metadata><kubevirt xmlns=\"http://kubevirt.io\"><uid>{u}</uid></kubevirt></metadata>"))
        .unwrap_or_default();
    format!(
        "<domain type='{kind}'><name>{name}</name><uuid>{uuid}</uuid>{meta}<memory unit='MiB'>32</memory>\
         <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"
    )
}

fn find(inv: &Store, domain_name: &str) -> Option<Arc<DomainRecord>> {
    let snap = inv.snapshot();
    snap.domains
        .iter()
        .find(|d| d.domain_name == domain_name)
        .cloned()
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// Run an agent in-process, watching `URI`, exporting nowhere.
fn start_agent(resync: Duration) -> InProcess {
    let mut cfg = AgentConfig::default();
    cfg.libvirt.uris = vec![URI.to_string()];
    cfg.libvirt.resync_interval = resync;
    cfg.export.exporter = ExporterKind::None;
    cfg.node_name = "testdriver-node".into();
    InProcess::start(cfg)
}

fn unique(prefix: &str) -> (String, String) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("{prefix}-{}-{n}", std::process::id());
    let uuid = format!(
        "7e57d41e-0000-4000-8000-{:06x}{:06x}",
        std::process::id() & 0xffffff,
        n
    );
    (name, uuid)
}

fn controller() -> Connect {
    Connect::open(Some(URI)).expect("read-write test driver connection")
}

#[test]
fn inventory_follows_every_transition_of_the_test_driver() {
    let agent = start_agent(Duration::from_secs(300));
    let inv = &agent.store;
    // The test driver's built-in running domain is found by the initial sync.
    wait_until(
        "initial sync lists the built-in 'test' domain",
        Duration::from_secs(10),
        || find(inv, "test").is_some(),
    );

    let conn = controller();
    let (name, uuid) = unique("tcg");
    let dom = conn
        .define_domain_xml(&domain_xml(&name, &uuid, "qemu", None))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        find(inv, &name).is_none(),
        "a defined (inactive) domain is not exported"
    );

    dom.create().unwrap();
    let t = wait_until("started domain appears", Duration::from_secs(5), || {
        find(inv, &name).is_some()
    });
    let rec = find(inv, &name).unwrap();
    assert_eq!(rec.hypervisor_type, HypervisorType::QemuTcg);
    assert_eq!(rec.identity.namespace, None);
    assert_eq!(rec.identity.name, name);
    assert_eq!(rec.uuid, uuid);
    println!("start -> inventory: {t:?}");

    dom.suspend().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        find(inv, &name).is_some(),
        "suspended domain stays exported"
    );

    dom.resume().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(find(inv, &name).is_some(), "resumed domain is exported");

    dom.destroy().unwrap();
    wait_until(
        "destroyed domain disappears",
        Duration::from_secs(5),
        || find(inv, &name).is_none(),
    );

    dom.create().unwrap();
    wait_until("restarted domain reappears", Duration::from_secs(5), || {
        find(inv, &name).is_some()
    });
    dom.destroy().unwrap();
    dom.undefine().unwrap();
    wait_until("undefined domain is gone", Duration::from_secs(5), || {
        find(inv, &name).is_none()
    });
}

#[test]
fn kubevirt_and_kvm_domains_are_classified_and_split() {
    let agent = start_agent(Duration::from_secs(300));
    let inv = &agent.store;
    let conn = controller();
    let (suffix, uuid) = unique("vmi");
    let name = format!("team-a_{suffix}");
    let dom = conn
        .define_domain_xml(&domain_xml(&name, &uuid, "kvm", Some("")))
        .unwrap();
    dom.create().unwrap();
    wait_until("kubevirt domain appears", Duration::from_secs(5), || {
        find(inv, &name).is_some()
    });
    let rec = find(inv, &name).unwrap();
    assert_eq!(rec.hypervisor_type, HypervisorType::Kvm);
    assert_eq!(rec.identity.namespace.as_deref(), Some("team-a"));
    assert_eq!(rec.identity.name, suffix);
    // Current launchers leave the VMI UID out (`<uid></uid>`, handed back as `<uid/>`).
    assert!(rec.facts.kubevirt);
    dom.destroy().unwrap();
    dom.undefine().unwrap();
    wait_until("kubevirt domain removed", Duration::from_secs(5), || {
        find(inv, &name).is_none()
    });
}

#[test]
fn a_hyperv_direct_vmi_is_mshv_and_a_restart_under_emulation_is_qemu_tcg() {
    let agent = start_agent(Duration::from_secs(300));
    let inv = &agent.store;
    let conn = controller();
    let (suffix, uuid) = unique("mshv");
    let name = format!("win-apps_{suffix}");
    let dom = conn
        .define_domain_xml(&domain_xml(&name, &uuid, "hyperv", Some("")))
        .unwrap();
    dom.create().unwrap();
    wait_until("hyperv domain appears", Duration::from_secs(5), || {
        find(inv, &name).is_some()
    });
    let rec = find(inv, &name).unwrap();
    assert_eq!(rec.hypervisor_type, HypervisorType::Mshv);
    assert_eq!(rec.facts.domain_type.as_deref(), Some("hyperv"));
    assert_eq!(rec.identity.namespace.as_deref(), Some("win-apps"));
    assert_eq!(rec.identity.name, suffix);
    dom.destroy().unwrap();
    dom.undefine().unwrap();
    wait_until("hyperv domain removed", Duration::from_secs(5), || {
        find(inv, &name).is_none()
    });
    // Without /dev/mshv, KubeVirt's converter writes type='qemu' for the same VMI.
    let dom = conn
        .define_domain_xml(&domain_xml(&name, &uuid, "qemu", Some("")))
        .unwrap();
    dom.create().unwrap();
    wait_until("emulated domain appears", Duration::from_secs(5), || {
        find(inv, &name).is_some_and(|r| r.hypervisor_type == HypervisorType::QemuTcg)
    });
    dom.destroy().unwrap();
    dom.undefine().unwrap();
}

#[test]
fn domains_running_before_the_agent_starts_are_found_by_the_initial_sync() {
    let conn = controller();
    let (name, uuid) = unique("early");
    let dom = conn
        .define_domain_xml(&domain_xml(&name, &uuid, "kvm", None))
        .unwrap();
    dom.create().unwrap();
    let agent = start_agent(Duration::from_secs(300));
    wait_until("pre-existing domain found", Duration::from_secs(10), || {
        find(&agent.store, &name).is_some()
    });
    assert_eq!(
        find(&agent.store, &name).unwrap().hypervisor_type,
        HypervisorType::Kvm
    );
    dom.destroy().unwrap();
    dom.undefine().unwrap();
}

#[test]
fn rapid_start_stop_bursts_leave_no_phantom() {
    let agent = start_agent(Duration::from_secs(300));
    let inv = &agent.store;
    let conn = controller();
    let mut doms = Vec::new();
    for _ in 0..10 {
        let (name, uuid) = unique("burst");
        let dom = conn
            .define_domain_xml(&domain_xml(&name, &uuid, "qemu", None))
            .unwrap();
        doms.push((name, dom));
    }
    for _ in 0..5 {
        for (_, d) in &doms {
            d.create().unwrap();
        }
        for (_, d) in &doms {
            d.destroy().unwrap();
        }
    }
    // Leave every other one running.
    for (_, d) in doms.iter().step_by(2) {
        d.create().unwrap();
    }
    wait_until(
        "inventory matches the running half",
        Duration::from_secs(10),
        || {
            doms.iter()
                .enumerate()
                .all(|(i, (n, _))| find(inv, n).is_some() == (i % 2 == 0))
        },
    );
    for (_, d) in &doms {
        let _ = d.destroy();
        let _ = d.undefine();
    }
    wait_until("all burst domains gone", Duration::from_secs(10), || {
        doms.iter().all(|(n, _)| find(inv, n).is_none())
    });
}

/// A full event backlog drops events, counts them and resyncs the connection, and the inventory
/// still ends as the driver's truth. The periodic resync is off, so only the overflow's resync
/// can heal a dropped transition. With a backlog of 1, a burst of transitions from a second
/// connection fills it. Each burst ends by destroying every domain back-to-back, so a dropped
/// `Stopped` leaves a phantom that only the resync removes; bursts repeat until one of those
/// final phases dropped an event (at most 20).
#[test]
fn a_full_event_backlog_is_counted_and_healed_by_a_resync() {
    let mut cfg = AgentConfig::default();
    cfg.libvirt.uris = vec![URI.to_string()];
    cfg.libvirt.resync_interval = Duration::ZERO;
    cfg.libvirt.event_backlog = 1;
    cfg.export.exporter = ExporterKind::None;
    cfg.node_name = "overflow-node".into();
    let agent = InProcess::start(cfg);
    let inv = &agent.store;
    wait_until("initial sync", Duration::from_secs(10), || {
        find(inv, "test").is_some()
    });

    let conn = controller();
    let doms: Vec<(String, virt::domain::Domain)> = (0..24)
        .map(|_| {
            let (name, uuid) = unique("burst");
            let dom = conn
                .define_domain_xml(&domain_xml(&name, &uuid, "kvm", None))
                .unwrap();
            (name, dom)
        })
        .collect();
    let dropped = || -> u64 {
        agent
            .store
            .connections()
            .values()
            .map(|m| m.dropped_events)
            .sum()
    };
    // Drops are counted when the agent takes them: wait until the count holds still, so that
    // what is counted after a phase began was dropped in that phase.
    let settled = || {
        let mut last = dropped();
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(50));
            let now = dropped();
            if now == last {
                return now;
            }
            last = now;
        }
        last
    };
    let mut bursts = 0;
    let (mut in_bursts, mut in_final) = (0, 0);
    while in_final == 0 && bursts < 20 {
        bursts += 1;
        let start = dropped();
        for (_, d) in &doms {
            d.create().unwrap();
        }
        for _ in 0..3 {
            for (_, d) in &doms {
                d.suspend().unwrap();
                d.resume().unwrap();
            }
        }
        // Let the agent drain the flood, so that what it drops next is the final phase's.
        let before_final = settled();
        for (_, d) in &doms {
            d.destroy().unwrap();
        }
        let after = settled();
        in_bursts += after - start;
        in_final = after - before_final;
    }
    println!("{bursts} burst(s): {in_bursts} event(s) dropped, {in_final} in the final phase");
    assert!(
        in_final > 0,
        "20 bursts never dropped a Stopped event with a backlog of 1: the overflow path was not exercised"
    );

    let t = wait_until(
        "the inventory holds none of the destroyed domains after the overflow's resync",
        Duration::from_secs(10),
        || doms.iter().all(|(name, _)| find(inv, name).is_none()),
    );
    println!("inventory equal to the driver's state {t:?} after the last burst");
    for (_, d) in &doms {
        d.undefine().unwrap();
    }
}
