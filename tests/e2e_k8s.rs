#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! The shipped DaemonSet (`deploy/kubernetes/daemonset.yaml`) on a real single-node Kubernetes
//! (`scripts/k8s-cluster.sh`: kubelet, control plane and containerd 2.x built from the Go module
//! proxy, etcd/runc/CNI from Debian), with launcher pods shaped like KubeVirt's virt-launcher, judged
//! in PromQL through the production collector (`otel/collector.yaml`: OTLP over TLS with a client
//! certificate) and Prometheus behind TLS and basic auth (tests/common/pipeline.rs).
//!
//! The manifest is applied as shipped, only the image reference replaced (a local image: Debian 12
//! with libvirt, QEMU and the agent binary of this build); the collector's address and the agent's
//! TLS material go into the Secret the manifest reads. `VHA_K8S_MANIFEST=path` runs another manifest
//! (an older one, to show what it gets wrong: its plaintext endpoint value is pointed at the same
//! collector).
//!
//! One test, in phases that each report PASS or FAIL (all are asserted at the end, so a run against
//! an old manifest shows every defect, not only the first):
//!  * launcher pods (non-root: uid 107, session libvirtd, `XDG_RUNTIME_DIR=/var/run`, emptyDir
//!    `libvirt-runtime`; and root: system libvirtd with `libvirt-sock` and `-sock-ro`) each run one
//!    TCG domain `<namespace>_<vmi>` with KubeVirt's metadata; one carries a Secret volume;
//!  * (a) the node advertises no `devices.kubevirt.io/kvm`: the agent runs there anyway; later the
//!    node advertises it and a new agent pod schedules too;
//!  * PromQL: every launcher's VM with `namespace`, `name`, `node`, `hypervisor_type` and `pod_uid`
//!    = the launcher pod's UID; `virt_hypervisor_agent_node_kvm_available` as the node's kernel
//!    says; a deleted launcher's series gone;
//!  * (b) `kubevirt.io/schedulable=false` while VMs run: the same agent pod stays and a VM started
//!    meanwhile appears;
//!  * (c) the agent SIGSTOPped (host PID from containerd): the kubelet restarts it; time printed;
//!  * (d) admitted with `system-node-critical` priority;
//!  * (e) a write from the agent container's mount namespace into another pod's Secret volume is
//!    refused;
//!  * (f) the endpoint comes from the Secret, and the series arrive over mTLS;
//!  * the Helm chart (`deploy/helm/virt-hypervisor-agent`, Helm from `$VHA_HELM_BIN` or
//!    scripts/build-helm.sh): the manifest's objects removed, `helm install` (series in PromQL,
//!    with a first optional label turned on), `helm upgrade` with a changed config value (the pod
//!    rolls, the new label is in PromQL), `helm uninstall` (no release, no DaemonSet, no pod, and
//!    the heartbeat sends nothing more).
//!
//! Needs root and the cluster binaries; skipped with a reason without them, unless
//! `VHA_E2E_REQUIRED=1` (CI), which makes a missing piece a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::libvirt::e2e_required;
use common::pipeline::{describe, Collector, Flavor, Pki, Prometheus, WebSecurity};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const AGENT_NS: &str = "virt-hypervisor-agent";
const VM_NS: &str = "vms";
/// The host as pods see it: the CNI bridge's gateway (scripts/k8s-cluster.sh).
const HOST_FROM_PODS: &str = "10.244.0.1";
const IMAGE: &str = "localhost/vha-node:test";
const SHIPPED_IMAGE: &str = "registry.example.com/virt-hypervisor-agent:0.1.0";
/// Generous bounds, printed with what was measured.
const SCHEDULE_BOUND: Duration = Duration::from_secs(90);
const SERIES_BOUND: Duration = Duration::from_secs(60);
const RESTART_BOUND: Duration = Duration::from_secs(120);

fn cache_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("VHA_CACHE_DIR")
            .unwrap_or_else(|_| "/var/cache/virt-hypervisor-agent-ci".into()),
    )
}

/// The cluster binaries: `$VHA_K8S_BIN`, else a cached build; `Err` says why there are none.
fn cluster_binaries() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("VHA_K8S_BIN").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if e2e_required() {
        // CI: build (or reuse) them.
        let out = Command::new("bash")
            .arg(format!("{ROOT}/scripts/build-k8s.sh"))
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("scripts/build-k8s.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!("scripts/build-k8s.sh failed ({})", out.status));
        }
        return Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    let k8s = cache_dir().join("k8s");
    std::fs::read_dir(&k8s)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("kubelet").is_file() && p.join("containerd").is_file())
        .ok_or_else(|| {
            format!(
                "no cluster binaries (set VHA_K8S_BIN or run scripts/build-k8s.sh; none cached under {})",
                k8s.display()
            )
        })
}

fn prerequisites() -> Result<PathBuf, String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| format!("id -u: {e}"))?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("needs root (runs a kubelet)".into());
    }
    for tool in ["etcd", "runc", "nsenter", "openssl", "curl", "debootstrap"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!("{tool} not installed (scripts/setup.sh)"));
        }
    }
    cluster_binaries()
}

/// What `tool args…` printed on stdout; an error with its stderr when it failed.
fn stdout_of(tool: &str, args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cluster, stopped (by `scripts/k8s-cluster.sh stop`, which stops every process by its PID
/// and removes mounts, the bridge and IPAM state) when dropped, also on failure.
struct Cluster {
    bin: PathBuf,
    kubeconfig: PathBuf,
    node: String,
}

impl Cluster {
    fn start(bin: &Path) -> Result<Cluster> {
        let t = Instant::now();
        let out = Command::new("bash")
            .arg(format!("{ROOT}/scripts/k8s-cluster.sh"))
            .arg("start")
            .env("VHA_K8S_BIN", bin)
            .env("VHA_AGENT_BIN", env!("CARGO_BIN_EXE_virt-hypervisor-agent"))
            .stderr(Stdio::inherit())
            .output()
            .context("run scripts/k8s-cluster.sh start")?;
        // From here on, dropping it stops whatever the script started, also on a failed start.
        let mut cluster = Cluster {
            bin: bin.to_path_buf(),
            kubeconfig: PathBuf::new(),
            node: String::new(),
        };
        if !out.status.success() {
            bail!("scripts/k8s-cluster.sh start failed ({})", out.status);
        }
        let state = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let node = String::from_utf8_lossy(
            &Command::new("hostname")
                .output()
                .context("hostname")?
                .stdout,
        )
        .trim()
        .to_lowercase();
        println!("cluster started in {:.1?} (node {node})", t.elapsed());
        cluster.kubeconfig = state.join("conf/admin.kubeconfig");
        cluster.node = node;
        Ok(cluster)
    }

    fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_in(args, None)
    }

    fn kubectl_in(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawn kubectl")?;
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .context("kubectl stdin")?
                .write_all(input.as_bytes())?;
        }
        stdout_of("kubectl", args, child.wait_with_output()?)
    }

    fn apply(&self, yaml: &str) -> Result<String> {
        self.kubectl_in(&["apply", "-f", "-"], Some(yaml))
    }

    /// Label the node `kubevirt.io/schedulable=true|false`, as KubeVirt's virt-handler does on a
    /// node it manages (and sets to false during a KubeVirt upgrade).
    fn label_schedulable(&self, schedulable: bool) -> Result<String> {
        self.kubectl(&[
            "label",
            "node",
            &self.node,
            &format!("kubevirt.io/schedulable={schedulable}"),
            "--overwrite",
        ])
    }

    /// Advertise `devices.kubevirt.io/kvm` in the node's capacity and allocatable, as KubeVirt's
    /// device plugin would.
    fn advertise_kvm(&self) -> Result<String> {
        let patch = r#"[{"op":"add","path":"/status/capacity/devices.kubevirt.io~1kvm","value":"1k"},{"op":"add","path":"/status/allocatable/devices.kubevirt.io~1kvm","value":"1k"}]"#;
        self.kubectl(&[
            "patch",
            "node",
            &self.node,
            "--subresource=status",
            "--type=json",
            "-p",
            patch,
        ])
    }

    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&a)?)?)
    }

    /// The agent's pods (not being deleted).
    fn agent_pods(&self) -> Result<Vec<Value>> {
        let v = self.json(&[
            "-n",
            AGENT_NS,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=virt-hypervisor-agent",
        ])?;
        Ok(v["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .collect())
    }

    /// The agent pod once its container is ready.
    fn wait_agent_ready(&self, timeout: Duration) -> Result<(Value, Duration)> {
        let t = Instant::now();
        loop {
            if let Some(p) = self
                .agent_pods()?
                .into_iter()
                .find(|p| p["status"]["containerStatuses"][0]["ready"].as_bool() == Some(true))
            {
                return Ok((p, t.elapsed()));
            }
            if t.elapsed() > timeout {
                let events = self
                    .kubectl(&["-n", AGENT_NS, "get", "events", "--sort-by=.lastTimestamp"])
                    .unwrap_or_default();
                let pods = self
                    .kubectl(&["-n", AGENT_NS, "get", "pods", "-o", "wide"])
                    .unwrap_or_default();
                bail!("no ready agent pod within {timeout:?}:\n{pods}\n{events}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Wait until no agent pod is left (after `what` removed them).
    fn wait_no_agent_pods(&self, timeout: Duration, what: &str) -> Result<()> {
        let t = Instant::now();
        while !self.agent_pods()?.is_empty() {
            if t.elapsed() > timeout {
                bail!("agent pods still run {timeout:?} after {what}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }

    fn wait_pod_ready(&self, ns: &str, name: &str, timeout: Duration) -> Result<Value> {
        let t = Instant::now();
        loop {
            if let Ok(p) = self.json(&["-n", ns, "get", "pod", name]) {
                if p["status"]["containerStatuses"][0]["ready"].as_bool() == Some(true) {
                    return Ok(p);
                }
            }
            if t.elapsed() > timeout {
                let logs = self
                    .kubectl(&["-n", ns, "logs", name, "--tail=30"])
                    .unwrap_or_default();
                let desc = self
                    .kubectl(&["-n", ns, "describe", "pod", name])
                    .unwrap_or_default();
                bail!("pod {ns}/{name} not ready within {timeout:?}:\n{desc}\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The host PID of a pod's first container (containerd's task list reports host PIDs).
    fn container_host_pid(&self, pod: &Value) -> Result<u32> {
        let id = pod["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .and_then(|s| s.strip_prefix("containerd://"))
            .context("no containerd container ID")?
            .to_string();
        let out = Command::new(self.bin.join("ctr"))
            .args([
                "--address",
                "/run/containerd/containerd.sock",
                "-n",
                "k8s.io",
                "tasks",
                "ls",
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let pid: u32 = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id.as_str()))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("container {id} not in ctr tasks ls:\n{text}"))?;
        // The same process seen from the host: its innermost PID namespace PID (NSpid's last
        // field) is 1, the container's init.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let nspid = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default();
        if nspid.first().map(String::as_str) != Some(pid.to_string().as_str())
            || nspid.last().map(String::as_str) != Some("1")
        {
            bail!("pid {pid} is not the container's init as seen from the host: NSpid {nspid:?}");
        }
        Ok(pid)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let t = Instant::now();
        let status = Command::new("bash")
            .arg(format!("{ROOT}/scripts/k8s-cluster.sh"))
            .arg("stop")
            .env("VHA_K8S_BIN", &self.bin)
            .status();
        println!("cluster stopped in {:.1?} ({status:?})", t.elapsed());
    }
}

/// A launcher pod as KubeVirt makes it: its libvirt daemon's runtime dir is the emptyDir
/// `libvirt-runtime` at /var/run/libvirt; it starts one TCG domain `<ns>_<vmi>` with KubeVirt's
/// metadata (an empty `<uid>`, as current virt-launchers write it). `root`: KubeVirt's root
/// launcher (system daemon, socket owner 0); else the non-root one (uid/gid 107, session daemon,
/// `XDG_RUNTIME_DIR=/var/run`). `secret`: also mount the Secret `tenant-secret`.
fn launcher_pod(vmi: &str, root: bool, secret: bool) -> String {
    let (user, uri) = if root {
        ("runAsUser: 0", "qemu:///system")
    } else {
        (
            "runAsUser: 107, runAsGroup: 107, fsGroup: 107",
            "qemu:///session",
        )
    };
    let script = format!(
        r#"set -e
export HOME=/tmp/home XDG_CONFIG_HOME=/tmp/cfg XDG_CACHE_HOME=/tmp/cache
mkdir -p $HOME $XDG_CONFIG_HOME/libvirt $XDG_CACHE_HOME
printf 'stdio_handler = "file"\n' > $XDG_CONFIG_HOME/libvirt/qemu.conf
# The root daemon: a container may not set trusted.* xattrs (libvirt's owner memory).
if [ "$(id -u)" = 0 ]; then echo 'remember_owner = 0' >> /etc/libvirt/qemu.conf; fi
libvirtd --timeout 0 &
# The socket exists before the daemon accepts on it: wait for an answer.
for i in $(seq 1 300); do virsh -c {uri} version >/dev/null 2>&1 && break; sleep 0.2; done
cat > /tmp/domain.xml <<EOF
<domain type='qemu'>
  <name>{VM_NS}_{vmi}</name>
  <metadata><kubevirt xmlns="http://kubevirt.io"><uid></uid></kubevirt></metadata>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><serial type='pty'/></devices>
</domain>
EOF
virsh -c {uri} create /tmp/domain.xml
touch /tmp/started
wait"#
    );
    let script_yaml: String = script
        .lines()
        .map(|l| format!("        {l}\n"))
        .collect::<String>();
    let (secret_mount, secret_vol) = if secret {
        (
            "\n        - {name: tenant-secret, mountPath: /var/run/secrets/tenant, readOnly: true}",
            "\n    - {name: tenant-secret, secret: {secretName: tenant-secret}}",
        )
    } else {
        ("", "")
    };
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: virt-launcher-{vmi}
  namespace: {VM_NS}
  labels: {{kubevirt.io: virt-launcher, vmi: {vmi}}}
spec:
  terminationGracePeriodSeconds: 2
  automountServiceAccountToken: false
  securityContext: {{{user}}}
  containers:
    - name: compute
      image: {IMAGE}
      imagePullPolicy: Never
      command: ["/bin/bash", "-c"]
      args:
      - |
{script_yaml}      env:
        - {{name: XDG_RUNTIME_DIR, value: /var/run}}
      readinessProbe:
        exec: {{command: ["test", "-f", "/tmp/started"]}}
        periodSeconds: 1
      volumeMounts:
        - {{name: libvirt-runtime, mountPath: /var/run/libvirt}}{secret_mount}
  volumes:
    - {{name: libvirt-runtime, emptyDir: {{}}}}{secret_vol}
"#
    )
}

/// Helm: `$VHA_HELM_BIN`, else scripts/build-helm.sh (cached; prints the path).
fn helm_bin() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("VHA_HELM_BIN").filter(|b| !b.is_empty()) {
        return Ok(PathBuf::from(bin));
    }
    let out = Command::new("bash")
        .arg(format!("{ROOT}/scripts/build-helm.sh"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("scripts/build-helm.sh: {e}"))?;
    if !out.status.success() {
        return Err("scripts/build-helm.sh failed".into());
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// What the kernel of this node says about KVM (the agent's DaemonSet decision, src/node/).
fn node_has_kvm() -> bool {
    std::fs::read_to_string("/sys/devices/virtual/misc/kvm/dev").is_ok_and(|s| s.trim() == "10:232")
}

/// Phases' outcomes.
#[derive(Default)]
struct Report {
    lines: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    fn check(&mut self, phase: &str, r: Result<String>) {
        match r {
            Ok(what) => {
                println!("PASS {phase}: {what}");
                self.lines.push(format!("PASS {phase}: {what}"));
            }
            Err(e) => {
                println!("FAIL {phase}: {e:#}");
                self.lines.push(format!("FAIL {phase}: {e:#}"));
                self.failures.push(phase.to_string());
            }
        }
    }
}

#[test]
fn the_shipped_daemonset_on_a_real_kubelet() {
    let test = "the_shipped_daemonset_on_a_real_kubelet";
    let bin = match prerequisites() {
        Ok(bin) => bin,
        Err(why) if e2e_required() => panic!("{test}: VHA_E2E_REQUIRED=1 but {why}"),
        Err(why) => {
            eprintln!("SKIPPED {test}: {why} (set VHA_E2E_REQUIRED=1 to make this a failure)");
            return;
        }
    };
    let t_all = Instant::now();
    let manifest_path = std::env::var("VHA_K8S_MANIFEST")
        .unwrap_or_else(|_| format!("{ROOT}/deploy/kubernetes/daemonset.yaml"));
    let manifest = std::fs::read_to_string(&manifest_path).unwrap();
    println!("manifest: {manifest_path}");

    // The user's side: Prometheus behind TLS and basic auth, the production collector (OTLP over
    // TLS, client certificates required) listening where pods reach the host.
    let pki = Pki::with_server_ips(&[HOST_FROM_PODS]).unwrap();
    let web = WebSecurity::new(&pki, "vha-collector").unwrap();
    let prom = Prometheus::start_secured(Flavor::RemoteWrite, web.clone()).unwrap();
    let mut col = Collector::start_production(
        &pki,
        &prom.remote_write_url(),
        &web.ca,
        &web.authorization(),
    )
    .unwrap();
    col.listen_on("0.0.0.0").unwrap();
    let endpoint = format!("https://{HOST_FROM_PODS}:{}", col.grpc_port());

    let cluster = Cluster::start(&bin).unwrap();
    let node = cluster.node.clone();
    let mut report = Report::default();

    // KubeVirt's virt-handler labels a node it manages (the old manifest selects on it).
    cluster.label_schedulable(true).unwrap();

    // Launchers first, so that their Secret volume is a mount below the agent's hostPath when
    // the agent starts.
    cluster.kubectl(&["create", "namespace", VM_NS]).unwrap();
    cluster
        .kubectl(&[
            "-n",
            VM_NS,
            "create",
            "secret",
            "generic",
            "tenant-secret",
            "--from-literal=password=hunter2",
        ])
        .unwrap();
    let t = Instant::now();
    cluster
        .apply(&launcher_pod("vm-session", false, true))
        .unwrap();
    cluster
        .apply(&launcher_pod("vm-root", true, false))
        .unwrap();
    let mut launchers = Vec::new();
    for vmi in ["vm-session", "vm-root"] {
        let pod = cluster
            .wait_pod_ready(
                VM_NS,
                &format!("virt-launcher-{vmi}"),
                Duration::from_secs(120),
            )
            .unwrap();
        launchers.push((vmi, pod["metadata"]["uid"].as_str().unwrap().to_string()));
    }
    println!(
        "launcher pods running their domains after {:.1?}",
        t.elapsed()
    );

    // The agent: the Secret with the collector's address and TLS material, then the manifest
    // with only its image replaced (an old manifest's plaintext endpoint value is pointed at the
    // same collector).
    cluster.kubectl(&["create", "namespace", AGENT_NS]).unwrap();
    let pem = |f: &str| pki.path(f).display().to_string();
    cluster
        .kubectl(&[
            "-n",
            AGENT_NS,
            "create",
            "secret",
            "generic",
            "virt-hypervisor-agent-otlp",
            &format!("--from-literal=endpoint={endpoint}"),
            &format!("--from-file=ca.crt={}", pem("ca.pem")),
            &format!("--from-file=tls.crt={}", pem("client.pem")),
            &format!("--from-file=tls.key={}", pem("client.key")),
        ])
        .unwrap();
    let applied = manifest.replace(SHIPPED_IMAGE, IMAGE).replace(
        "http://otel-collector.observability.svc:4317",
        &endpoint.replace("https://", "http://"),
    );
    let t_apply = Instant::now();
    cluster.apply(&applied).unwrap();

    // (a) No devices.kubevirt.io/kvm on this node: the agent must run anyway.
    let mut agent = None;
    report.check(
        "a: agent runs on a node without devices.kubevirt.io/kvm",
        cluster.wait_agent_ready(SCHEDULE_BOUND).map(|(p, took)| {
            agent = Some(p);
            format!("ready {took:.1?} after apply")
        }),
    );
    if agent.is_none() {
        // Let the other phases run: advertise the device, as KubeVirt's device plugin would.
        cluster.advertise_kvm().unwrap();
        agent = cluster
            .wait_agent_ready(SCHEDULE_BOUND)
            .ok()
            .map(|(p, _)| p);
    }
    let Some(agent_pod) = agent else {
        panic!("no agent pod ran at all:\n{}", report.lines.join("\n"));
    };
    println!("agent pod ready {:.1?} after apply", t_apply.elapsed());

    // (f) The endpoint is not in the pod spec, and the series arrive over mTLS (PromQL below).
    let c0 = &agent_pod["spec"]["containers"][0];
    let env_ep = c0["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT")
        .cloned()
        .unwrap_or(Value::Null);
    report.check(
        "f: collector endpoint from a Secret",
        if env_ep["valueFrom"]["secretKeyRef"]["key"].is_string() {
            Ok(format!("{}", env_ep["valueFrom"]))
        } else {
            Err(anyhow::anyhow!(
                "endpoint as a plain value in the pod spec: {env_ep}"
            ))
        },
    );

    // Every launcher's VM in PromQL, with the launcher pod's UID.
    for (vmi, uid) in &launchers {
        let q = format!("kubevirt_vmi_hypervisor_info{{namespace=\"{VM_NS}\",name=\"{vmi}\"}}");
        let since = Instant::now();
        let r = prom
            .wait_for(&q, since, SERIES_BOUND, |s| {
                s.len() == 1
                    && s[0].label("node") == Some(node.as_str())
                    && s[0].label("hypervisor_type") == Some("qemu-tcg")
                    && s[0].label("pod_uid") == Some(uid.as_str())
                    && s[0].value == 1.0
            })
            .map(|took| {
                format!("{q} with node, qemu-tcg and pod_uid={uid} ({took:.1?}, over mTLS)")
            });
        report.check(&format!("PromQL: {vmi}"), r);
    }
    let expected_kvm = if node_has_kvm() { 1.0 } else { 0.0 };
    let q = format!("virt_hypervisor_agent_node_kvm_available{{node=\"{node}\"}}");
    report.check(
        "PromQL: node KVM capability",
        prom.wait_for(&q, Instant::now(), SERIES_BOUND, |s| {
            s.len() == 1 && s[0].value == expected_kvm
        })
        .map(|_| {
            format!(
                "{q} = {expected_kvm} (the node's kernel: {})",
                if node_has_kvm() {
                    "KVM device registered"
                } else {
                    "no KVM device"
                }
            )
        }),
    );

    // (d) Priority, as admitted.
    let admitted = cluster
        .json(&[
            "-n",
            AGENT_NS,
            "get",
            "pod",
            agent_pod["metadata"]["name"].as_str().unwrap(),
        ])
        .unwrap();
    report.check(
        "d: system-node-critical priority",
        match (
            admitted["spec"]["priorityClassName"].as_str(),
            admitted["spec"]["priority"].as_i64(),
        ) {
            (Some("system-node-critical"), Some(p)) => Ok(format!("priority {p}")),
            (c, p) => Err(anyhow::anyhow!("priorityClassName {c:?}, priority {p:?}")),
        },
    );

    // (e) From the agent container's mount namespace, write into the session launcher's Secret
    // volume (a tmpfs mounted before the agent started).
    let target = format!(
        "/var/lib/kubelet/pods/{}/volumes/kubernetes.io~secret/tenant-secret",
        launchers[0].1
    );
    let e = (|| -> Result<String> {
        let pid = cluster.container_host_pid(&admitted)?;
        let seen = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "--", "ls", &target])
            .output()?;
        if !String::from_utf8_lossy(&seen.stdout).contains("password") {
            bail!(
                "the Secret volume is not visible in the agent's mount namespace: {}",
                String::from_utf8_lossy(&seen.stderr)
            );
        }
        let w = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "--", "sh", "-c"])
            .arg(format!("echo planted > {target}/planted"))
            .output()?;
        let err = String::from_utf8_lossy(&w.stderr).trim().to_string();
        if w.status.success() {
            let _ = std::fs::remove_file(format!("{target}/planted"));
            bail!("wrote {target}/planted from the agent's mount namespace (host pid {pid})");
        }
        if !err.contains("Read-only file system") {
            bail!("the write failed, but not because the mount is read-only: {err}");
        }
        Ok(format!("host pid {pid} (NSpid ends in 1): {err}"))
    })();
    report.check("e: another pod's Secret volume is read-only", e);

    // (b) virt-handler sets kubevirt.io/schedulable=false (KubeVirt upgrade) while VMs run.
    let agent_uid = admitted["metadata"]["uid"].as_str().unwrap().to_string();
    cluster.label_schedulable(false).unwrap();
    let t_flip = Instant::now();
    cluster
        .apply(&launcher_pod("vm-during-upgrade", false, false))
        .unwrap();
    let b = (|| -> Result<String> {
        let pod = cluster.wait_pod_ready(
            VM_NS,
            "virt-launcher-vm-during-upgrade",
            Duration::from_secs(120),
        )?;
        let uid = pod["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        // Give the DaemonSet controller time to act on the label, then look.
        std::thread::sleep(Duration::from_secs(15).saturating_sub(t_flip.elapsed()));
        let pods = cluster.agent_pods()?;
        let stayed = pods
            .iter()
            .any(|p| p["metadata"]["uid"] == agent_uid.as_str());
        let q = format!("kubevirt_vmi_hypervisor_info{{namespace=\"{VM_NS}\",name=\"vm-during-upgrade\",pod_uid=\"{uid}\"}}");
        let seen = prom.wait_for(&q, Instant::now(), SERIES_BOUND, |s| s.len() == 1);
        match (stayed, seen) {
            (true, Ok(took)) => Ok(format!("same agent pod {:.0?} after the flip; a VM started meanwhile appeared in {took:.1?}", t_flip.elapsed())),
            (false, seen) => bail!("the agent pod {agent_uid} was deleted after the label flipped (agent pods now: {}); the VM started meanwhile: {}", pods.len(), seen.map(|_| "seen".to_string()).unwrap_or_else(|e| e.to_string())),
            (true, Err(e)) => bail!("the agent pod stayed, but the VM started meanwhile never appeared: {e}"),
        }
    })();
    report.check("b: agent stays while kubevirt.io/schedulable=false", b);
    cluster.label_schedulable(true).unwrap();

    // A deleted launcher pod's series ends.
    let t = Instant::now();
    cluster
        .kubectl(&[
            "-n",
            VM_NS,
            "delete",
            "pod",
            "virt-launcher-vm-root",
            "--wait=false",
        ])
        .unwrap();
    let q = format!("kubevirt_vmi_hypervisor_info{{namespace=\"{VM_NS}\",name=\"vm-root\"}}");
    report.check(
        "PromQL: deleted launcher's series ends",
        prom.wait_for(&q, t, SERIES_BOUND, |s| s.is_empty())
            .map(|took| format!("{q} empty {took:.1?} after kubectl delete")),
    );

    // (c) The agent hung: SIGSTOP its process (the container's init, host PID via containerd).
    let c = (|| -> Result<String> {
        let (pod, _) = cluster.wait_agent_ready(SCHEDULE_BOUND)?;
        let name = pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let restarts0 = pod["status"]["containerStatuses"][0]["restartCount"]
            .as_i64()
            .unwrap_or(0);
        let pid = cluster.container_host_pid(&pod)?;
        let t = Instant::now();
        let st = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()?;
        if !st.success() {
            bail!("kill -STOP {pid} failed");
        }
        let restarted = loop {
            let p = cluster.json(&["-n", AGENT_NS, "get", "pod", &name])?;
            let n = p["status"]["containerStatuses"][0]["restartCount"]
                .as_i64()
                .unwrap_or(0);
            if n > restarts0 {
                break t.elapsed();
            }
            if t.elapsed() > RESTART_BOUND {
                // Do not leave a stopped process behind.
                let _ = Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .status();
                bail!("not restarted within {RESTART_BOUND:?} after SIGSTOP (restartCount {n})");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let ready = cluster.wait_pod_ready(AGENT_NS, &name, RESTART_BOUND)?;
        let ready_after = t.elapsed();
        let q =
            format!("kubevirt_vmi_hypervisor_info{{namespace=\"{VM_NS}\",name=\"vm-session\"}}");
        prom.wait_for(&q, Instant::now(), SERIES_BOUND, |s| s.len() == 1)?;
        let n = ready["status"]["containerStatuses"][0]["restartCount"]
            .as_i64()
            .unwrap_or(0);
        Ok(format!("restarted {restarted:.1?} after SIGSTOP (liveness: 3 x 5 s probes), ready again after {ready_after:.1?}, restartCount {restarts0} -> {n}; series still there"))
    })();
    report.check("c: hung agent restarted by the kubelet", c);

    // (a, continued) The node now advertises devices.kubevirt.io/kvm: the agent schedules there too.
    cluster.advertise_kvm().unwrap_or_default();
    let a2 = (|| -> Result<String> {
        let old: Vec<String> = cluster
            .agent_pods()?
            .iter()
            .filter_map(|p| p["metadata"]["uid"].as_str().map(str::to_string))
            .collect();
        let t = Instant::now();
        for p in cluster.agent_pods()? {
            cluster.kubectl(&[
                "-n",
                AGENT_NS,
                "delete",
                "pod",
                p["metadata"]["name"].as_str().unwrap_or_default(),
                "--wait=false",
            ])?;
        }
        loop {
            let fresh = cluster.agent_pods()?.into_iter().find(|p| {
                !old.iter().any(|u| p["metadata"]["uid"] == u.as_str())
                    && p["status"]["containerStatuses"][0]["ready"].as_bool() == Some(true)
            });
            if let Some(p) = fresh {
                let cap = cluster.json(&["get", "node", &node])?["status"]["allocatable"]
                    ["devices.kubevirt.io/kvm"]
                    .clone();
                return Ok(format!("new agent pod {} ready {:.1?} after deleting the old one (node allocatable devices.kubevirt.io/kvm = {cap})", p["metadata"]["name"], t.elapsed()));
            }
            if t.elapsed() > SCHEDULE_BOUND {
                bail!("no new ready agent pod within {SCHEDULE_BOUND:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    })();
    report.check(
        "a: agent also runs on a node with devices.kubevirt.io/kvm",
        a2,
    );

    // The Helm chart (deploy/helm/virt-hypervisor-agent), the way operators install it: the plain
    // manifest's objects removed, then the chart installed, upgraded with a changed value and
    // uninstalled, judged in PromQL after each. Each step turns on one more optional label, so its
    // series are told apart from the previous agent's (which linger for the lookback: an agent that
    // stops sends no staleness markers, its VMs still run).
    let helm = helm_bin();
    let release = |args: &[&str]| -> Result<String> {
        let helm = helm.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        let out = Command::new(helm)
            .arg("--kubeconfig")
            .arg(&cluster.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run helm")?;
        stdout_of("helm", args, out)
    };
    let chart = format!("{ROOT}/deploy/helm/virt-hypervisor-agent");
    let (repo, tag) = IMAGE.rsplit_once(':').unwrap();
    let vm = |label: &str| {
        format!("kubevirt_vmi_hypervisor_info{{namespace=\"{VM_NS}\",name=\"vm-session\",{label}!=\"\"}}")
    };
    let install = (|| -> Result<String> {
        cluster.kubectl(&[
            "-n",
            AGENT_NS,
            "delete",
            "daemonset,configmap,serviceaccount",
            "virt-hypervisor-agent",
            "--wait=true",
        ])?;
        cluster.wait_no_agent_pods(SCHEDULE_BOUND, "deleting the manifest's objects")?;
        let t = Instant::now();
        release(&[
            "install",
            "vha",
            &chart,
            "-n",
            AGENT_NS,
            "--set",
            "namespace.create=false",
            "--set",
            &format!("image.repository={repo}"),
            "--set",
            &format!("image.tag={tag}"),
            "--set",
            "config.metric.attributes.uuid=true",
            "--wait",
            "--timeout",
            "120s",
        ])?;
        let installed = t.elapsed();
        let (pod, _) = cluster.wait_agent_ready(SCHEDULE_BOUND)?;
        let took = prom.wait_for(&vm("uuid"), t, SERIES_BOUND, |s| {
            s.len() == 1
                && s[0].label("node") == Some(node.as_str())
                && s[0].label("pod_uid").is_some()
        })?;
        Ok(format!(
            "helm install --wait {installed:.1?}; agent pod {} ready; {} in PromQL {took:.1?} after install",
            pod["metadata"]["name"], vm("uuid")
        ))
    })();
    report.check("helm: install, series in PromQL", install);
    let upgrade = (|| -> Result<String> {
        let before: Vec<Value> = cluster.agent_pods()?;
        let t = Instant::now();
        release(&[
            "upgrade",
            "vha",
            &chart,
            "-n",
            AGENT_NS,
            "--reuse-values",
            "--set",
            "config.metric.attributes.domain=true",
            "--wait",
            "--timeout",
            "120s",
        ])?;
        let took = prom.wait_for(&vm("domain"), t, SERIES_BOUND, |s| {
            s.len() == 1 && s[0].label("domain") == Some(&format!("{VM_NS}_vm-session")[..])
        })?;
        let after = cluster.agent_pods()?;
        let rolled = after.iter().all(|p| {
            !before
                .iter()
                .any(|b| b["metadata"]["uid"] == p["metadata"]["uid"])
        });
        if !rolled {
            bail!("the changed config did not roll the agent pod");
        }
        Ok(format!(
            "helm upgrade with a changed config value rolled the pod; {} in PromQL {took:.1?} after the upgrade",
            vm("domain")
        ))
    })();
    report.check("helm: upgrade, the changed value in PromQL", upgrade);
    let uninstall = (|| -> Result<String> {
        release(&[
            "uninstall",
            "vha",
            "-n",
            AGENT_NS,
            "--wait",
            "--timeout",
            "120s",
        ])?;
        cluster.wait_no_agent_pods(SCHEDULE_BOUND, "helm uninstall")?;
        // The agent's last export (its shutdown flush) may still be on its way through the
        // collector's batch: let it land, then the heartbeat's last sample must stay the last.
        std::thread::sleep(Duration::from_secs(5));
        let q = format!("timestamp(virt_hypervisor_agent_node_kvm_available{{node=\"{node}\"}})");
        let last = |what: &str| -> Result<f64> {
            let r = prom.query(&q)?;
            r.iter()
                .map(|s| s.value)
                .reduce(f64::max)
                .with_context(|| format!("no heartbeat sample {what}"))
        };
        let settled = last("after the uninstall")?;
        // Longer than an export interval (30 s): a running agent would have sent a new sample.
        std::thread::sleep(Duration::from_secs(40));
        let later = last("40 s later")?;
        if later > settled {
            bail!(
                "a new heartbeat sample {:.1} s after the uninstall settled",
                later - settled
            );
        }
        let left = release(&["list", "-n", AGENT_NS, "-q"])?;
        if !left.trim().is_empty() {
            bail!("helm list still shows {left}");
        }
        let ds = cluster.kubectl(&["-n", AGENT_NS, "get", "daemonset", "-o", "name"])?;
        if !ds.trim().is_empty() {
            bail!("a DaemonSet is left: {ds}");
        }
        Ok("helm uninstall --wait: no release, no DaemonSet, no agent pod; the heartbeat sent nothing for 40 s after".to_string())
    })();
    report.check("helm: uninstall, the agent stops reporting", uninstall);

    col.check_running().unwrap();
    println!("\n{}", report.lines.join("\n"));
    println!("test time {:.1?}", t_all.elapsed());
    if !report.failures.is_empty() {
        let logs = cluster
            .kubectl(&[
                "-n",
                AGENT_NS,
                "logs",
                "ds/virt-hypervisor-agent",
                "--tail=40",
            ])
            .unwrap_or_default();
        let all = prom
            .query("kubevirt_vmi_hypervisor_info")
            .map(|s| describe(&s))
            .unwrap_or_default();
        panic!(
            "failed phases: {:?}\nagent log:\n{logs}\nPromQL kubevirt_vmi_hypervisor_info:\n{all}\ncollector:\n{}",
            report.failures,
            col.log_tail(20)
        );
    }
}
