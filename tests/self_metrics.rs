//! Every metric the agent declares is really emitted, with the values the demo node implies,
//! decoded by the real OTLP receiver; and every metric named in the README's metric reference
//! is one of them (docs cannot promise a metric that does not exist).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::receiver::{Receiver, Series};
use common::Agent;

/// OTLP names of everything the agent exports.
const DECLARED: [&str; 15] = [
    "kubevirt_vmi_hypervisor_info",
    "virt_hypervisor_agent_connection_up",
    "virt_hypervisor_agent_domains",
    "virt_hypervisor_agent_lifecycle_events",
    "virt_hypervisor_agent_lifecycle_events_dropped",
    "virt_hypervisor_agent_xml_errors",
    "virt_hypervisor_agent_reconnects",
    "virt_hypervisor_agent_last_sync_duration",
    "virt_hypervisor_agent_node_kvm_available",
    "virt_hypervisor_agent_node_mshv_available",
    "virt_hypervisor_agent_info_collisions",
    "virt_hypervisor_agent_info_sets_over_limit",
    "virt_hypervisor_agent_connection_domains_over_limit",
    "virt_hypervisor_agent_discovery_rejected",
    "virt_hypervisor_agent_landlock",
];

fn by(series: &[Series], attr: &str) -> BTreeMap<String, f64> {
    series
        .iter()
        .map(|s| (s.attr(attr).unwrap_or("").to_string(), s.value.as_f64()))
        .collect()
}

#[test]
fn every_declared_metric_is_emitted_with_consistent_values() {
    let rx = Receiver::start().unwrap();
    let uri = format!("test://{}/config/demo-node.xml", env!("CARGO_MANIFEST_DIR"));
    let endpoint = rx.grpc_endpoint();
    let since = Instant::now();
    let mut agent = Agent::spawn(
        &["run"],
        &[
            ("VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS", uri.as_str()),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT", endpoint.as_str()),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__INTERVAL", "1s"),
            ("VIRT_HYPERVISOR_AGENT_NODE_NAME", "metrics-node"),
        ],
    )
    .unwrap();
    let obs = rx
        .wait_for_request(since, Duration::from_secs(20), |r| {
            DECLARED.iter().all(|m| r.has_metric(m))
        })
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail(40)));
    let req = obs.request;

    // The observable gauge: one point per demo domain, all on this node.
    let info = req.series("kubevirt_vmi_hypervisor_info");
    assert_eq!(info.len(), 6);
    assert!(info
        .iter()
        .all(|s| s.attr("node") == Some("metrics-node") && s.value.as_f64() == 1.0));

    // Domains by type agree with the gauge.
    let domains = by(
        &req.series("virt_hypervisor_agent_domains"),
        "hypervisor_type",
    );
    assert_eq!(domains.get("kvm"), Some(&2.0));
    assert_eq!(domains.get("qemu-tcg"), Some(&2.0));
    assert_eq!(domains.get("mshv"), Some(&1.0));
    assert_eq!(domains.get("unknown"), Some(&1.0));

    // The one connection is up, has not reconnected, and has synced.
    let up = req.series("virt_hypervisor_agent_connection_up");
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].attr("connection"), Some(uri.as_str()));
    assert_eq!(up[0].value.as_f64(), 1.0);
    assert_eq!(
        by(
            &req.series("virt_hypervisor_agent_reconnects"),
            "connection"
        )
        .get(&uri),
        Some(&0.0)
    );
    let sync = req.series("virt_hypervisor_agent_last_sync_duration");
    assert_eq!(sync.len(), 1);
    assert!(sync[0].value.as_f64() >= 0.0 && sync[0].value.as_f64() < 10.0);

    // Counters carry every label value, zero included, so rates work from the start.
    let events = by(
        &req.series("virt_hypervisor_agent_lifecycle_events"),
        "event",
    );
    for e in [
        "defined",
        "undefined",
        "started",
        "suspended",
        "resumed",
        "stopped",
        "shutdown",
        "pmsuspended",
        "crashed",
    ] {
        assert!(
            events.contains_key(e),
            "lifecycle event label {e} missing: {events:?}"
        );
    }
    let errors = by(&req.series("virt_hypervisor_agent_xml_errors"), "kind");
    assert_eq!(
        errors.keys().cloned().collect::<Vec<_>>(),
        vec!["fetch", "parse", "timeout"]
    );
    assert!(
        errors.values().all(|v| *v == 0.0),
        "no XML error on the demo node: {errors:?}"
    );

    // No event was dropped: the demo node's backlog never fills.
    let dropped = req.series("virt_hypervisor_agent_lifecycle_events_dropped");
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].value.as_f64(), 0.0);

    // The node's KVM capability: what the same check says in this process (the agent runs as
    // the same user on the same machine), labelled with the node.
    let kvm = req.series("virt_hypervisor_agent_node_kvm_available");
    assert_eq!(kvm.len(), 1);
    assert_eq!(kvm[0].attr("node"), Some("metrics-node"));
    let here = virt_hypervisor_agent::node::probe_kvm_node(
        std::path::Path::new(virt_hypervisor_agent::node::kvm::KVM_DEVICE),
        std::path::Path::new(virt_hypervisor_agent::node::kvm::KVM_SYSFS_DEV),
    );
    assert_eq!(
        kvm[0].value.as_f64(),
        if here.available() { 1.0 } else { 0.0 },
        "check here: {here:?}"
    );
    // The node's MSHV capability, likewise.
    let mshv = req.series("virt_hypervisor_agent_node_mshv_available");
    assert_eq!(mshv.len(), 1);
    assert_eq!(mshv[0].attr("node"), Some("metrics-node"));
    let here = virt_hypervisor_agent::node::probe_mshv(std::path::Path::new(
        virt_hypervisor_agent::node::mshv::MSHV_DEVICE,
    ));
    assert_eq!(
        mshv[0].value.as_f64(),
        if here.available() { 1.0 } else { 0.0 },
        "check here: {here:?}"
    );
    // The demo node's domains each have their own series, all within the limit.
    for name in [
        "virt_hypervisor_agent_info_collisions",
        "virt_hypervisor_agent_info_sets_over_limit",
    ] {
        let series = req.series(name);
        assert_eq!(series.len(), 1, "{name}");
        assert_eq!(series[0].value.as_f64(), 0.0, "{name}");
    }

    // One connection, within any bound; discovery is off, so nothing was rejected (every
    // reason is exported, at 0); the agent confined itself fully.
    let over = req.series("virt_hypervisor_agent_connection_domains_over_limit");
    assert_eq!(over.len(), 1);
    assert_eq!(over[0].value.as_f64(), 0.0);
    let rejected = by(
        &req.series("virt_hypervisor_agent_discovery_rejected"),
        "reason",
    );
    assert_eq!(
        rejected,
        BTreeMap::from([
            ("not_socket".to_string(), 0.0),
            ("owner".to_string(), 0.0),
            ("symlink".to_string(), 0.0),
        ])
    );
    let landlock = req.series("virt_hypervisor_agent_landlock");
    assert_eq!(landlock.len(), 1);
    assert_eq!(landlock[0].attr("status"), Some("full"));
    assert_eq!(landlock[0].value.as_f64(), 1.0);

    // Nothing undeclared is exported.
    for name in req.metric_names() {
        assert!(
            DECLARED.contains(&name.as_str()),
            "undeclared metric {name} exported"
        );
    }
    agent.terminate(Duration::from_secs(5)).unwrap();
}

#[test]
fn readme_metric_reference_names_only_exported_metrics() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Metric reference")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let mut named = 0;
    for word in section.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !word.starts_with("virt_hypervisor_agent_") {
            continue;
        }
        // Prometheus adds `_total` to counters and `_seconds` for the unit `s`.
        let otlp = word.trim_end_matches("_total").trim_end_matches("_seconds");
        assert!(
            DECLARED.contains(&otlp),
            "README names {word}, which the agent does not export"
        );
        named += 1;
    }
    assert!(
        named >= 6,
        "the README's metric reference should list every self-metric"
    );
}
