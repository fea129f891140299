//! The Grafana dashboard deploy/grafana/virt-hypervisor-agent.json against real data: every query of
//! every panel, run as a PromQL instant query against a real Prometheus fed by the agent binary
//! watching real QEMU TCG domains (a KubeVirt-shaped VMI and a plain domain), through the minimal
//! collector running otel/collector-dev.yaml into Prometheus 2.42's remote-write receiver. Each must
//! return at least one series, and the ones that carry `node` only the test's node.
//!
//! Template variables are substituted as Grafana would for one selected node: `$node` by the test's
//! node name (the variable is a regex matcher, `.*` for "All"), `$__rate_interval` by `1m`. A query
//! that still contains a `$` after that uses a variable this test does not know, and fails it.
//!
//! Needs libvirtd (`scripts/libvirtd.sh start`) and the cached collector
//! (`VHA_OTELCOL_BIN=$(bash scripts/build-collector.sh)`); skips with a printed reason without
//! libvirtd unless `VHA_E2E_REQUIRED=1`.

mod common;

use std::time::{Duration, Instant};

use common::libvirt::{require_libvirtd, TestDomain, Virt};
use common::pipeline::{describe, Collector, Flavor, Prometheus};
use common::Agent;

const DASHBOARD: &str = include_str!("../deploy/grafana/virt-hypervisor-agent.json");
/// Long enough for the first exports, and for `rate(…[1m])` to have two samples at a 2 s interval.
const TIMEOUT: Duration = Duration::from_secs(60);

/// One query of one panel.
struct PanelQuery {
    panel: String,
    ref_id: String,
    expr: String,
}

/// Every target's `expr` of every panel, rows' nested panels included.
fn panel_queries(panels: &[serde_json::Value], out: &mut Vec<PanelQuery>) {
    for p in panels {
        let title = p["title"].as_str().unwrap_or("(untitled)").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            out.push(PanelQuery {
                panel: title.clone(),
                ref_id: t["refId"].as_str().unwrap_or("?").to_string(),
                expr: expr.to_string(),
            });
        }
        if let Some(nested) = p["panels"].as_array() {
            panel_queries(nested, out);
        }
    }
}

/// The query Grafana sends with `node` selected.
fn substitute(expr: &str, node: &str) -> String {
    let q = expr
        .replace("$__rate_interval", "1m")
        .replace("${node}", node)
        .replace("$node", node);
    assert!(
        !q.contains('$'),
        "a template variable this test does not substitute: {expr}"
    );
    q
}

#[test]
fn every_dashboard_panel_returns_series_from_real_data() {
    if !require_libvirtd("every_dashboard_panel_returns_series_from_real_data") {
        return;
    }
    let dash: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    panel_queries(
        dash["panels"].as_array().expect("a panels array"),
        &mut queries,
    );
    let with_targets = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .count();
    assert!(
        with_targets >= 7 && queries.len() >= with_targets,
        "expected at least 7 panels with queries, found {with_targets} panels and {} queries",
        queries.len()
    );

    let prom = Prometheus::start(Flavor::RemoteWrite).expect("start Prometheus 2.42");
    let col = Collector::start(&prom.remote_write_url()).expect("start the collector");
    let node = format!(
        "dash-{}-{}",
        std::process::id(),
        common::libvirt::unique_uid()
    );
    let vmi = TestDomain::define_kubevirt("dash", Virt::Qemu).expect("define the VMI");
    let plain = TestDomain::define("dash-plain", Virt::Qemu).expect("define the plain domain");
    vmi.start().expect("start the VMI");
    plain.start().expect("start the plain domain");
    let agent = Agent::spawn(
        &["run"],
        &[
            ("VIRT_HYPERVISOR_AGENT_LIBVIRT__URIS", "qemu:///system"),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__PROTOCOL", "grpc"),
            (
                "VIRT_HYPERVISOR_AGENT_EXPORT__ENDPOINT",
                col.grpc_endpoint().as_str(),
            ),
            ("VIRT_HYPERVISOR_AGENT_EXPORT__INTERVAL", "2s"),
            ("VIRT_HYPERVISOR_AGENT_NODE_NAME", node.as_str()),
            ("RUST_LOG", "info"),
        ],
    )
    .expect("spawn the agent");
    let q_vmi = format!(
        "kubevirt_vmi_hypervisor_info{{node=\"{node}\",name=\"{}\",hypervisor_type=\"qemu-tcg\"}}",
        vmi.exported_name()
    );
    prom.wait_for(&q_vmi, agent.started(), TIMEOUT, |r| r.len() == 1)
        .unwrap_or_else(|e| {
            panic!(
                "the VMI never reached PromQL: {e:#}\n{}",
                agent.log_tail(30)
            )
        });

    // The node variable's own query: label_values(virt_hypervisor_agent_node_kvm_available, node).
    let var = dash["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .find(|v| v["name"] == "node")
        .expect("a node variable");
    assert_eq!(
        var["definition"], "label_values(virt_hypervisor_agent_node_kvm_available, node)",
        "the node variable's query changed: update this test"
    );
    let nodes = prom
        .query("group by (node) (virt_hypervisor_agent_node_kvm_available)")
        .expect("query the node variable's values");
    assert!(
        nodes.iter().any(|s| s.label("node") == Some(node.as_str())),
        "node variable: {}",
        describe(&nodes)
    );

    let mut report = Vec::new();
    for q in &queries {
        let promql = substitute(&q.expr, &node);
        let since = Instant::now();
        prom.wait_for(&promql, since, TIMEOUT, |r| !r.is_empty())
            .unwrap_or_else(|e| {
                panic!(
                    "panel {:?} query {}: no series from real data: {e:#}\n{}",
                    q.panel,
                    q.ref_id,
                    agent.log_tail(20)
                )
            });
        let r = prom.query(&promql).expect("query");
        for s in &r {
            if let Some(n) = s.label("node") {
                assert_eq!(
                    n,
                    node,
                    "panel {:?} {}: {}",
                    q.panel,
                    q.ref_id,
                    describe(&r)
                );
            }
        }
        report.push(format!(
            "  {:<70} {} {:>2} series",
            q.panel,
            q.ref_id,
            r.len()
        ));
    }
    println!("dashboard panels against real data:\n{}", report.join("\n"));

    // What the TCG table shows: both domains, with the node's KVM capability as its value (0 or 1,
    // whatever this machine has).
    let tcg = queries
        .iter()
        .find(|q| q.panel.starts_with("VMs on software emulation") && q.ref_id == "A")
        .expect("the TCG table's KVM query");
    let rows = prom.query(&substitute(&tcg.expr, &node)).expect("query");
    for name in [vmi.exported_name(), plain.exported_name()] {
        let row = rows
            .iter()
            .find(|s| s.label("name") == Some(name))
            .unwrap_or_else(|| panic!("{name} missing from the TCG table: {}", describe(&rows)));
        assert!(row.value == 0.0 || row.value == 1.0, "{}", describe(&rows));
    }
    assert_eq!(
        rows.iter()
            .find(|s| s.label("name") == Some(vmi.exported_name()))
            .and_then(|s| s.label("namespace")),
        vmi.exported_namespace(),
        "{}",
        describe(&rows)
    );
}
