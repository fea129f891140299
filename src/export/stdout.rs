//! The stdout exporter (`export.exporter: stdout`): each export's request as text, one line per
//! data point, for the demo and for debugging what the OTLP exporter would send — staleness
//! markers included (`stale` instead of a value).
//!
//! ```text
//! # export 2026-12-01T21:30:00.123Z: 5 points, service.name="virt-hypervisor-agent", ...
//! kubevirt_vmi_hypervisor_info{hypervisor_type="kvm",name="vm-a",namespace="default",node="n1"} 1
//! kubevirt_vmi_hypervisor_info{hypervisor_type="qemu-tcg",name="vm-b",node="n1"} stale
//! ```
//!
//! Values are quoted and escaped (a domain name cannot start a line of its own). A write error
//! (a closed pipe: `agent run | head`) fails that export like a down collector would: reported,
//! never a panic, and the agent keeps running.

use std::io::Write as _;
use std::time::SystemTime;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;

use super::wire::{any_value_text, points};

/// The text of one request.
pub fn render(req: &ExportMetricsServiceRequest) -> String {
    let pts = points(req);
    let now = humantime::format_rfc3339_millis(SystemTime::now());
    let mut resource: Vec<String> = req
        .resource_metrics
        .first()
        .and_then(|r| r.resource.as_ref())
        .map(|r| {
            r.attributes
                .iter()
                .map(|kv| format!("{}={:?}", kv.key, any_value_text(kv)))
                .collect()
        })
        .unwrap_or_default();
    resource.sort();
    let mut out = format!("# export {now}: {} points", pts.len());
    for r in resource {
        out.push_str(", ");
        out.push_str(&r);
    }
    out.push('\n');
    for p in pts {
        out.push_str(&p.metric);
        if !p.unit.is_empty() {
            out.push_str(&format!(" [{:?}]", p.unit));
        }
        out.push('{');
        for (i, (k, v)) in p.attrs.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&format!("{k}={v:?}"));
        }
        out.push_str("} ");
        match (&p.value, p.stale) {
            (_, true) => out.push_str("stale"),
            (Some(v), false) => out.push_str(v),
            (None, false) => out.push_str("(no value)"),
        }
        out.push('\n');
    }
    out
}

/// Write `text` to stdout off the async worker (a full pipe blocks the writer).
pub async fn write(text: String) -> std::io::Result<()> {
    let task = tokio::task::spawn_blocking(move || {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()
    });
    match task.await {
        Ok(r) => r,
        Err(e) => Err(std::io::Error::other(e)),
    }
}
