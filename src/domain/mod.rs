//! What the agent knows about one domain, and how it is derived from libvirt's domain XML.
//!
//! Pure code: no libvirt, tokio or OpenTelemetry types. [`xml::parse_domain_xml`] reads the
//! XML with a streaming quick-xml reader and stops as soon as it has what [`Wants`] asks for
//! (libvirt writes name, uuid, metadata first, so the common case never tokenizes `<devices>`).

pub mod xml;
pub use xml::{parse_domain_xml, XmlError};

/// The KubeVirt metadata namespace URI.
pub const KUBEVIRT_NS: &str = "http://kubevirt.io";

/// Which hypervisor actually runs a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HypervisorType {
    Kvm,
    QemuTcg,
    /// The Microsoft Hypervisor (`/dev/mshv`), hardware accelerated: KubeVirt's `hyperv-direct`
    /// hypervisor writes `<domain type='hyperv'>`.
    Mshv,
    Unknown,
}

impl HypervisorType {
    pub const ALL: [HypervisorType; 4] = [Self::Kvm, Self::QemuTcg, Self::Mshv, Self::Unknown];

    /// The `hypervisor_type` attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::QemuTcg => "qemu-tcg",
            Self::Mshv => "mshv",
            Self::Unknown => "unknown",
        }
    }

    /// Classify the root `<domain type='…'>` attribute (README, "Metric reference").
    pub fn from_domain_type(domain_type: Option<&str>) -> Self {
        match domain_type {
            Some("kvm") => Self::Kvm,
            Some("qemu") => Self::QemuTcg,
            Some("hyperv") => Self::Mshv,
            _ => Self::Unknown,
        }
    }
}

impl std::fmt::Display for HypervisorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the parser should look for beyond the always-needed header (type, name, uuid, metadata).
/// Asking for less lets it stop earlier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wants {
    /// `<os><type arch='…' machine='…'>`.
    pub os: bool,
    /// `<devices><emulator>` (forces reading into `<devices>`).
    pub emulator: bool,
}

/// Facts read from one domain XML document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainFacts {
    /// The raw root `type` attribute (`kvm`, `qemu`, `xen`, …).
    pub domain_type: Option<String>,
    pub hypervisor_type: HypervisorType,
    pub name: Option<String>,
    pub uuid: Option<String>,
    /// The domain carries KubeVirt metadata (`<metadata><kubevirt xmlns="http://kubevirt.io">`),
    /// i.e. it is a VMI. Nothing inside that element is kept: since KubeVirt v0.59 the launcher
    /// leaves its `<uid>` empty (README, "Metric reference").
    pub kubevirt: bool,
    pub machine: Option<String>,
    pub arch: Option<String>,
    pub emulator: Option<String>,
    /// The root carries an `id` attribute: the document is a running domain's live XML. An
    /// inactive domain's definition has none (read through a handle of a domain that stopped
    /// meanwhile, libvirt returns that instead of an error).
    pub live: bool,
}

impl DomainFacts {
    /// Facts for a domain whose XML could not be read or parsed: only its identity is known.
    pub fn unknown(name: Option<String>, uuid: Option<String>) -> Self {
        Self {
            domain_type: None,
            hypervisor_type: HypervisorType::Unknown,
            name,
            uuid,
            kubevirt: false,
            machine: None,
            arch: None,
            emulator: None,
            live: false,
        }
    }
}

/// The exported identity of a domain (README, "Metric reference": KubeVirt VMI or plain domain).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// KubeVirt namespace; `None` for a plain libvirt domain.
    pub namespace: Option<String>,
    /// VMI name, or the libvirt domain name for a plain domain.
    pub name: String,
}

impl Identity {
    /// A domain with KubeVirt metadata is a VMI named `<namespace>_<vmi-name>`: split at the first
    /// `_`. Without metadata (or without a usable `_`), it is a plain domain.
    pub fn from_domain_name(domain_name: &str, is_kubevirt: bool) -> Self {
        if is_kubevirt {
            if let Some((ns, name)) = domain_name.split_once('_') {
                if !ns.is_empty() && !name.is_empty() {
                    return Self {
                        namespace: Some(ns.to_string()),
                        name: name.to_string(),
                    };
                }
            }
        }
        Self {
            namespace: None,
            name: domain_name.to_string(),
        }
    }
}
