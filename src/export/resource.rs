//! Resource attributes (README, "Metric reference"): `service.name`, `service.version`, `service.instance.id`
//! (stable per host and node), `host.name`, `k8s.node.name`. `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES` are honoured: the SDK's environment detectors run first and the
//! agent only fills in what they did not set.

use opentelemetry::{Key, KeyValue};
use opentelemetry_sdk::Resource;

pub const SERVICE_NAME: &str = "virt-hypervisor-agent";

/// Build the resource for `node`.
pub fn build(node: &str) -> Resource {
    let from_env = Resource::builder().build();
    let env_has = |k: &str| {
        // The SDK defaults service.name to "unknown_service"; only a set variable counts.
        if k == "service.name" {
            return std::env::var_os("OTEL_SERVICE_NAME").is_some()
                || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
                    .is_ok_and(|v| v.contains("service.name="));
        }
        from_env.get(&Key::from(k.to_string())).is_some()
    };
    let host = crate::node::host_name();
    let mut ours = vec![
        KeyValue::new("service.name", SERVICE_NAME),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", instance_id(node)),
        KeyValue::new("host.name", host),
    ];
    if !node.is_empty() {
        ours.push(KeyValue::new("k8s.node.name", node.to_string()));
    }
    let ours: Vec<KeyValue> = ours
        .into_iter()
        .filter(|kv| !env_has(kv.key.as_str()))
        .collect();
    let mut builder = Resource::builder();
    builder = builder.with_attributes(ours);
    builder.build()
}

/// A stable id for this agent instance: derived from `/etc/machine-id` (never exported raw, as
/// systemd recommends) and the node name, formatted as a UUID. Falls back to the host name.
pub fn instance_id(node: &str) -> String {
    let machine = std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| crate::node::host_name());
    let h = fnv1a128(format!("virt-hypervisor-agent\0{machine}\0{node}").as_bytes());
    let b = h.to_be_bytes();
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5], (b[6] & 0x0f) | 0x80, b[7], (b[8] & 0x3f) | 0x80, b[9],
        b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

fn fnv1a128(data: &[u8]) -> u128 {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for byte in data {
        h ^= u128::from(*byte);
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_id_is_stable_and_uuid_shaped() {
        let a = instance_id("n1");
        assert_eq!(a, instance_id("n1"));
        assert_ne!(a, instance_id("n2"));
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
    }

    #[test]
    fn resource_carries_the_metric_reference_attributes() {
        let r = build("node-a");
        let get = |k: &str| r.get(&Key::from(k.to_string())).map(|v| v.to_string());
        assert_eq!(get("host.name"), Some(crate::node::host_name()));
        assert_eq!(get("k8s.node.name").as_deref(), Some("node-a"));
        assert!(get("service.instance.id").is_some());
        assert!(get("service.version").is_some());
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            assert_eq!(get("service.name").as_deref(), Some(SERVICE_NAME));
        }
    }
}
