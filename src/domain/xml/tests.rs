//! Tests of the domain XML parser: fixtures, hostile and truncated documents, and generated
//! documents (proptest) checked against the facts they were generated from.

use super::*;
use crate::domain::Identity;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

macro_rules! fixture {
    ($file:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/xml/",
            $file
        )) as &[u8]
    };
}

// Current virt-launcher shape (KubeVirt v0.59 and later: `<uid/>` empty, no `<graceperiod>`).
const KUBEVIRT_Q35_KVM: &[u8] = fixture!("kubevirt-q35-kvm-x86_64.xml");
const KUBEVIRT_Q35_TCG: &[u8] = fixture!("kubevirt-q35-tcg-x86_64.xml");
const KUBEVIRT_VIRT_TCG_AARCH64: &[u8] = fixture!("kubevirt-virt-tcg-aarch64.xml");
const KUBEVIRT_HYPERV_DIRECT: &[u8] = fixture!("kubevirt-hyperv-direct.xml");
// The one legacy shape kept (KubeVirt before v0.59: the VMI UID in `<uid>`, a `<graceperiod>`).
const KUBEVIRT_LEGACY: &[u8] = fixture!("kubevirt-legacy-v0.58-kvm.xml");
const PLAIN_KVM: &[u8] = fixture!("plain-kvm.xml");
const PLAIN_TCG: &[u8] = fixture!("plain-tcg.xml");
const PREFIXED_NS: &[u8] = fixture!("prefixed-namespace.xml");
const XEN: &[u8] = fixture!("xen.xml");
const NO_TYPE: &[u8] = fixture!("no-type.xml");
const TRUNCATED: &[u8] = fixture!("truncated.xml");
const GARBAGE: &[u8] = fixture!("garbage.xml");
const WRONG_NS: &[u8] = fixture!("wrong-namespace.xml");
const ENTITIES: &[u8] = fixture!("entities-in-name.xml");
const DEEPLY_NESTED: &[u8] = fixture!("deeply-nested.xml");
const NON_UTF8: &[u8] = fixture!("non-utf8.xml");
const METADATA_AFTER_DEVICES: &[u8] = fixture!("metadata-after-devices.xml");

const FIXTURES: [&[u8]; 17] = [
    KUBEVIRT_Q35_KVM,
    KUBEVIRT_Q35_TCG,
    KUBEVIRT_VIRT_TCG_AARCH64,
    KUBEVIRT_HYPERV_DIRECT,
    KUBEVIRT_LEGACY,
    PLAIN_KVM,
    PLAIN_TCG,
    PREFIXED_NS,
    XEN,
    NO_TYPE,
    TRUNCATED,
    GARBAGE,
    WRONG_NS,
    ENTITIES,
    DEEPLY_NESTED,
    NON_UTF8,
    METADATA_AFTER_DEVICES,
];

const DEFAULT: Wants = Wants {
    os: false,
    emulator: false,
};
const OS: Wants = Wants {
    os: true,
    emulator: false,
};
const EMULATOR: Wants = Wants {
    os: false,
    emulator: true,
};
const ALL: Wants = Wants {
    os: true,
    emulator: true,
};
const WANTS: [Wants; 4] = [DEFAULT, OS, EMULATOR, ALL];

fn parse(xml: &[u8], wants: Wants) -> DomainFacts {
    match parse_domain_xml(xml, wants) {
        Ok(facts) => facts,
        Err(err) => panic!("unexpected error: {err}"),
    }
}

fn parse_err(xml: &[u8], wants: Wants) -> XmlError {
    match parse_domain_xml(xml, wants) {
        Ok(facts) => panic!("expected an error, got {facts:?}"),
        Err(err) => err,
    }
}

fn some(s: &str) -> Option<String> {
    Some(s.to_owned())
}

fn replace(haystack: &[u8], from: &str, to: &str) -> Vec<u8> {
    let s = std::str::from_utf8(haystack).expect("fixture is UTF-8");
    assert!(s.contains(from), "fixture does not contain {from:?}");
    s.replacen(from, to, 1).into_bytes()
}

// ---- fixtures -------------------------------------------------------------------------

/// What a KubeVirt fixture must yield: the exported identity, the type, and what `Wants::ALL` reads.
struct Vmi {
    domain_type: &'static str,
    hypervisor_type: HypervisorType,
    domain_name: &'static str,
    namespace: &'static str,
    name: &'static str,
    uuid: &'static str,
    arch: &'static str,
    machine: &'static str,
    emulator: &'static str,
}

/// Parse `xml` with every `Wants`: the identity and type never depend on what else was asked
/// for, and `os`/`emulator` are read exactly when wanted.
fn check_vmi(xml: &[u8], want: &Vmi) {
    for wants in WANTS {
        let facts = parse(xml, wants);
        assert_eq!(facts.domain_type, some(want.domain_type), "{wants:?}");
        assert_eq!(facts.hypervisor_type, want.hypervisor_type, "{wants:?}");
        assert_eq!(facts.name, some(want.domain_name), "{wants:?}");
        assert_eq!(facts.uuid, some(want.uuid), "{wants:?}");
        assert!(facts.kubevirt, "{wants:?}");
        assert!(facts.live, "live XML carries the domain id");
        let identity = Identity::from_domain_name(want.domain_name, facts.kubevirt);
        assert_eq!(identity.namespace.as_deref(), Some(want.namespace));
        assert_eq!(identity.name, want.name);
        let (arch, machine) = if wants.os {
            (some(want.arch), some(want.machine))
        } else {
            (None, None)
        };
        assert_eq!((facts.arch, facts.machine), (arch, machine), "{wants:?}");
        let emulator = wants.emulator.then(|| want.emulator.to_owned());
        assert_eq!(facts.emulator, emulator, "{wants:?}");
    }
}

#[test]
fn current_q35_kvm_x86_64_is_a_kvm_vmi() {
    check_vmi(
        KUBEVIRT_Q35_KVM,
        &Vmi {
            domain_type: "kvm",
            hypervisor_type: HypervisorType::Kvm,
            domain_name: "team-a_fedora-web",
            namespace: "team-a",
            name: "fedora-web",
            uuid: "3d5b2a91-6c47-5e08-9f13-a2b4c6d8e0f1",
            arch: "x86_64",
            machine: "pc-q35-rhel9.6.0",
            emulator: "/usr/libexec/qemu-kvm",
        },
    );
}

#[test]
fn current_q35_tcg_x86_64_is_a_qemu_tcg_vmi() {
    check_vmi(
        KUBEVIRT_Q35_TCG,
        &Vmi {
            domain_type: "qemu",
            hypervisor_type: HypervisorType::QemuTcg,
            domain_name: "ci_build-runner",
            namespace: "ci",
            name: "build-runner",
            uuid: "7a1c3e5f-8b2d-5f40-a6c8-e0b2d4f6a8c1",
            arch: "x86_64",
            machine: "pc-q35-rhel9.6.0",
            emulator: "/usr/libexec/qemu-kvm",
        },
    );
}

#[test]
fn current_virt_aarch64_cross_arch_emulation_is_a_qemu_tcg_vmi() {
    check_vmi(
        KUBEVIRT_VIRT_TCG_AARCH64,
        &Vmi {
            domain_type: "qemu",
            hypervisor_type: HypervisorType::QemuTcg,
            domain_name: "arm-builds_ubuntu-arm64",
            namespace: "arm-builds",
            name: "ubuntu-arm64",
            uuid: "c4e6a8b0-2d4f-5a6c-8e0b-1d3f5a7c9e2b",
            arch: "aarch64",
            machine: "virt-rhel9.6.0",
            emulator: "/usr/bin/qemu-system-aarch64",
        },
    );
}

#[test]
fn current_hyperv_direct_is_an_mshv_vmi() {
    check_vmi(
        KUBEVIRT_HYPERV_DIRECT,
        &Vmi {
            domain_type: "hyperv",
            hypervisor_type: HypervisorType::Mshv,
            domain_name: "win-apps_sql-01",
            namespace: "win-apps",
            name: "sql-01",
            uuid: "e8f0a2c4-6b8d-5e1f-a3c5-7d9f1b3d5f7a",
            arch: "x86_64",
            machine: "pc-q35-rhel9.6.0",
            emulator: "/usr/libexec/qemu-kvm",
        },
    );
}

#[test]
fn legacy_shape_with_a_filled_uid_and_graceperiod_is_still_a_kvm_vmi() {
    check_vmi(
        KUBEVIRT_LEGACY,
        &Vmi {
            domain_type: "kvm",
            hypervisor_type: HypervisorType::Kvm,
            domain_name: "default_testvm",
            namespace: "default",
            name: "testvm",
            uuid: "9d0a8a3e-4b7e-5f0c-b6a4-2f1d3c5e7a91",
            arch: "x86_64",
            machine: "pc-q35-rhel9.4.0",
            emulator: "/usr/libexec/qemu-kvm",
        },
    );
}

#[test]
fn current_and_legacy_metadata_read_alike() {
    // The same domain in both shapes: only `<metadata>` differs, and nothing in it is kept.
    let current = replace(
        KUBEVIRT_LEGACY,
        "<uid>6f1b2c3d-4e5f-4a6b-9c7d-8e9f0a1b2c3d</uid>\n      <graceperiod>\n        <deletionGracePeriodSeconds>30</deletionGracePeriodSeconds>\n      </graceperiod>",
        "<uid/>",
    );
    for wants in WANTS {
        assert_eq!(parse(&current, wants), parse(KUBEVIRT_LEGACY, wants));
    }
}

#[test]
fn root_types_classify_into_four_values() {
    for (root, hypervisor_type) in [
        ("kvm", HypervisorType::Kvm),
        ("qemu", HypervisorType::QemuTcg),
        ("hyperv", HypervisorType::Mshv),
        ("xen", HypervisorType::Unknown),
        ("Hyperv", HypervisorType::Unknown),
        ("", HypervisorType::Unknown),
    ] {
        let doc = format!("<domain type='{root}'><name>n</name><uuid>u</uuid></domain>");
        let facts = parse(doc.as_bytes(), DEFAULT);
        assert_eq!(facts.hypervisor_type, hypervisor_type, "{root:?}");
        assert_eq!(
            facts.domain_type,
            some(root).filter(|t| !t.is_empty()).or(some(""))
        );
    }
    let values: Vec<_> = HypervisorType::ALL.iter().map(|t| t.as_str()).collect();
    assert_eq!(values, ["kvm", "qemu-tcg", "mshv", "unknown"]);
}

#[test]
fn plain_libvirt_domain_has_no_kubevirt_metadata() {
    // Its <metadata> holds libosinfo data, which is not KubeVirt's.
    let facts = parse(PLAIN_KVM, ALL);
    assert_eq!(facts.hypervisor_type, HypervisorType::Kvm);
    assert_eq!(facts.name, some("fedora40-web"));
    assert_eq!(facts.uuid, some("1b4e28ba-2fa1-11d2-883f-0016d3cca427"));
    assert!(!facts.kubevirt);
    assert_eq!(facts.machine, some("pc-q35-9.0"));
    assert_eq!(facts.emulator, some("/usr/bin/qemu-system-x86_64"));
}

#[test]
fn minimal_tcg_domain_is_read_completely() {
    let facts = parse(PLAIN_TCG, ALL);
    assert_eq!(
        facts,
        DomainFacts {
            domain_type: some("qemu"),
            hypervisor_type: HypervisorType::QemuTcg,
            name: some("tiny-tcg"),
            uuid: some("c7a5fdbd-cdaf-9455-926a-d65c16db1809"),
            kubevirt: false,
            machine: some("pc"),
            arch: some("x86_64"),
            emulator: some("/usr/bin/qemu-system-x86_64"),
            live: true,
        }
    );
}

#[test]
fn prefixed_kubevirt_namespace_is_recognised() {
    let facts = parse(PREFIXED_NS, DEFAULT);
    assert_eq!(facts.name, some("prod-db_postgres-0"));
    assert!(facts.kubevirt);
}

#[test]
fn xen_root_type_classifies_as_unknown_but_keeps_the_raw_type() {
    let facts = parse(XEN, ALL);
    assert_eq!(facts.domain_type, some("xen"));
    assert_eq!(facts.hypervisor_type, HypervisorType::Unknown);
    assert_eq!(facts.name, some("legacy-hvm"));
    assert_eq!(facts.machine, some("xenfv"));
    assert_eq!(facts.emulator, some("/usr/lib/xen/bin/qemu-system-i386"));
}

#[test]
fn missing_root_type_classifies_as_unknown() {
    let facts = parse(NO_TYPE, DEFAULT);
    assert_eq!(facts.domain_type, None);
    assert_eq!(facts.hypervisor_type, HypervisorType::Unknown);
    assert_eq!(facts.name, some("no-type-vm"));
}

#[test]
fn truncation_after_what_is_read_goes_unnoticed() {
    // truncated.xml ends inside the <cpu> start tag, after <os>.
    for wants in [DEFAULT, OS] {
        let facts = parse(TRUNCATED, wants);
        assert_eq!(facts.hypervisor_type, HypervisorType::Kvm);
        assert_eq!(facts.name, some("default_testvm"));
        assert!(facts.kubevirt);
    }
    assert_eq!(parse(TRUNCATED, OS).arch, some("x86_64"));
}

#[test]
fn truncation_before_what_is_wanted_is_an_error() {
    for wants in [EMULATOR, ALL] {
        let err = parse_err(TRUNCATED, wants);
        assert!(matches!(err, XmlError::Malformed { .. }), "{err:?}");
    }
    // Cut inside the header: an error whatever is wanted.
    let cut = &KUBEVIRT_Q35_KVM[..200];
    for wants in WANTS {
        assert!(parse_domain_xml(cut, wants).is_err());
    }
}

#[test]
fn input_that_is_not_xml_is_an_error() {
    let err = parse_err(GARBAGE, DEFAULT);
    assert_eq!(err.kind(), "malformed");
    assert!(matches!(
        err,
        XmlError::Malformed {
            kind: MalformedKind::ContentOutsideRoot,
            ..
        }
    ));
}

#[test]
fn kubevirt_element_in_another_namespace_is_not_kubevirt() {
    let facts = parse(WRONG_NS, ALL);
    assert_eq!(facts.name, some("default_lookalike"));
    assert!(!facts.kubevirt);
    assert_eq!(facts.hypervisor_type, HypervisorType::Kvm);
}

#[test]
fn entities_and_char_refs_in_values_are_resolved() {
    let facts = parse(ENTITIES, ALL);
    assert_eq!(facts.name, some("r&d_build-01<blue>é\"'"));
    // Surrounding whitespace of text values is trimmed.
    assert_eq!(facts.uuid, some("4c3b2a19-0f8e-4d7c-b6a5-948372615a0b"));
    assert_eq!(facts.machine, some("pc-q35-9.0"));
    assert_eq!(
        facts.emulator,
        some("/opt/qemu & friends/bin/qemu-system-x86_64")
    );
}

#[test]
fn unknown_entities_are_an_error_and_dtds_are_never_expanded() {
    let doc = br#"<!DOCTYPE domain [<!ENTITY lol "lollollol">]>
<domain type='kvm'><name>&lol;</name></domain>"#;
    let err = parse_err(doc, DEFAULT);
    assert_eq!(
        err,
        XmlError::Malformed {
            position: err_position(&err),
            kind: MalformedKind::InvalidReference
        }
    );
    let bad_char_ref = b"<domain type='kvm'><name>a&#0;b</name></domain>";
    assert!(matches!(
        parse_err(bad_char_ref, DEFAULT),
        XmlError::Malformed {
            kind: MalformedKind::InvalidReference,
            ..
        }
    ));
    let bad_attr_ref = b"<domain type='&nope;'><name>a</name></domain>";
    assert!(matches!(
        parse_err(bad_attr_ref, DEFAULT),
        XmlError::Malformed {
            kind: MalformedKind::InvalidReference,
            ..
        }
    ));
}

fn err_position(err: &XmlError) -> u64 {
    match err {
        XmlError::Malformed { position, .. }
        | XmlError::NotUtf8 { position }
        | XmlError::TooDeep { position, .. }
        | XmlError::ValueTooLong { position, .. } => *position,
        _ => 0,
    }
}

#[test]
fn deep_nesting_in_the_header_is_rejected() {
    let err = parse_err(DEEPLY_NESTED, DEFAULT);
    assert_eq!(err.kind(), "too_deep");
    assert!(matches!(
        err,
        XmlError::TooDeep {
            limit: MAX_DEPTH,
            ..
        }
    ));
}

fn nested(depth: usize) -> String {
    let open: String = (0..depth).map(|i| format!("<e{i}>")).collect();
    let close: String = (0..depth).rev().map(|i| format!("</e{i}>")).collect();
    format!("{open}x{close}")
}

#[test]
fn depth_limit_is_exact() {
    // The root is depth 1, <metadata> 2, so the nested chain gets MAX_DEPTH - 2 levels.
    let ok = format!(
        "<domain type='kvm'><name>n</name><metadata>{}</metadata></domain>",
        nested(MAX_DEPTH - 2)
    );
    assert_eq!(parse(ok.as_bytes(), DEFAULT).name, some("n"));
    let too_deep = format!(
        "<domain type='kvm'><name>n</name><metadata>{}</metadata></domain>",
        nested(MAX_DEPTH - 1)
    );
    assert!(matches!(
        parse_err(too_deep.as_bytes(), DEFAULT),
        XmlError::TooDeep { .. }
    ));
}

#[test]
fn deep_nesting_after_the_header_is_only_an_error_when_read() {
    let doc = replace(
        KUBEVIRT_Q35_KVM,
        "<devices>",
        &format!("<devices>{}", nested(10_000)),
    );
    assert_eq!(parse(&doc, DEFAULT).name, some("team-a_fedora-web"));
    assert_eq!(parse(&doc, OS).arch, some("x86_64"));
    assert!(matches!(
        parse_err(&doc, EMULATOR),
        XmlError::TooDeep { .. }
    ));
}

#[test]
fn huge_kept_attribute_is_an_error_not_a_truncation() {
    let huge = "k".repeat(1 << 20);
    let doc = format!("<domain type='{huge}'><name>n</name></domain>");
    let err = parse_err(doc.as_bytes(), DEFAULT);
    assert_eq!(
        err,
        XmlError::ValueTooLong {
            what: "root type attribute",
            position: err_position(&err),
            limit: MAX_VALUE_LEN
        }
    );
    assert!(!err.to_string().contains("kkkk"));

    let machine = format!(
        "<domain type='kvm'><name>n</name><os><type machine='{huge}'>hvm</type></os></domain>"
    );
    assert_eq!(parse(machine.as_bytes(), DEFAULT).name, some("n"));
    assert!(matches!(
        parse_err(machine.as_bytes(), OS),
        XmlError::ValueTooLong {
            what: "os machine attribute",
            ..
        }
    ));
}

#[test]
fn huge_attributes_that_are_not_kept_are_fine() {
    let huge = "x".repeat(1 << 20);
    let doc = format!("<domain type='kvm' id='{huge}'><name>n</name><uuid>u</uuid></domain>");
    assert_eq!(
        parse(doc.as_bytes(), ALL).hypervisor_type,
        HypervisorType::Kvm
    );
    let in_devices = replace(
        KUBEVIRT_Q35_KVM,
        "<disk type='file'",
        &format!("<disk type='file' huge='{huge}'"),
    );
    assert_eq!(
        parse(&in_devices, ALL).emulator,
        some("/usr/libexec/qemu-kvm")
    );
}

#[test]
fn text_value_size_limit_is_exact() {
    let fits = "n".repeat(MAX_VALUE_LEN);
    let doc = format!("<domain type='kvm'><name>{fits}</name></domain>");
    assert_eq!(
        parse(doc.as_bytes(), DEFAULT).name.map(|n| n.len()),
        Some(MAX_VALUE_LEN)
    );
    // One byte more, delivered in pieces (text + reference + text).
    let doc = format!(
        "<domain type='kvm'><name>{}&amp;{fits}</name></domain>",
        "n"
    );
    let err = parse_err(doc.as_bytes(), DEFAULT);
    assert!(
        matches!(
            err,
            XmlError::ValueTooLong {
                what: "<name> text",
                ..
            }
        ),
        "{err:?}"
    );
    // A huge text that is not kept is fine.
    let doc = format!("<domain type='kvm'><title>{fits}{fits}</title><name>n</name></domain>");
    assert_eq!(parse(doc.as_bytes(), DEFAULT).name, some("n"));
}

#[test]
fn non_utf8_in_what_is_read_is_an_error() {
    let err = parse_err(NON_UTF8, DEFAULT);
    assert_eq!(err.kind(), "not_utf8");
    assert!(matches!(err, XmlError::NotUtf8 { .. }));
}

#[test]
fn non_utf8_after_what_is_read_goes_unnoticed() {
    let mut doc = KUBEVIRT_Q35_KVM.to_vec();
    let at = doc
        .windows(7)
        .position(|w| w == b"</disk>")
        .expect("fixture has a disk");
    doc.splice(at..at, [0xe9, 0xff, 0xfe]);
    assert_eq!(parse(&doc, DEFAULT).name, some("team-a_fedora-web"));
    assert_eq!(parse(&doc, ALL).emulator, some("/usr/libexec/qemu-kvm"));
    doc.extend_from_slice(b"\xff\xff");
    assert_eq!(parse(&doc, DEFAULT).name, some("team-a_fedora-web"));
}

#[test]
fn metadata_after_the_header_is_ignored_whatever_is_wanted() {
    // libvirt never writes this order; we do not look for <metadata> past the header, so the
    // domain is a plain one (and the answer does not depend on Wants).
    for wants in WANTS {
        let facts = parse(METADATA_AFTER_DEVICES, wants);
        assert_eq!(facts.name, some("default_reordered"));
        assert!(!facts.kubevirt);
    }
    let all = parse(METADATA_AFTER_DEVICES, ALL);
    assert_eq!(all.arch, some("aarch64"));
    assert_eq!(all.emulator, some("/usr/bin/qemu-system-aarch64"));
}

#[test]
fn malformed_devices_are_never_read_with_default_wants() {
    let doc = replace(KUBEVIRT_Q35_KVM, "<emulator>", "<disk></oops><emulator>");
    for wants in [DEFAULT, OS] {
        assert!(parse(&doc, wants).kubevirt);
    }
    for wants in [EMULATOR, ALL] {
        assert!(matches!(
            parse_err(&doc, wants),
            XmlError::Malformed {
                kind: MalformedKind::MismatchedEndTag,
                ..
            }
        ));
    }
}

#[test]
fn parser_returns_at_the_first_element_after_the_header() {
    // Everything after the <memory> start tag is garbage.
    let doc = b"<domain type='kvm'><name>a</name><uuid>u</uuid><memory unit='KiB'><<<&&&</oops>";
    assert_eq!(parse(doc, DEFAULT).name, some("a"));
    assert!(parse_domain_xml(doc, OS).is_err());
}

#[test]
fn parser_returns_after_metadata_once_name_and_uuid_are_known() {
    let doc = b"<domain type='qemu'><name>a</name><uuid>u</uuid><metadata/><<<garbage";
    assert_eq!(parse(doc, DEFAULT).hypervisor_type, HypervisorType::QemuTcg);
    // Without a uuid yet, the parser keeps reading (and finds the garbage).
    let doc = b"<domain type='qemu'><name>a</name><metadata/><<<garbage";
    assert!(parse_domain_xml(doc, DEFAULT).is_err());
}

#[test]
fn emulator_wanted_stops_after_the_emulator() {
    let doc = replace(KUBEVIRT_Q35_KVM, "</emulator>", "</emulator></oops>");
    assert_eq!(
        parse(&doc, EMULATOR).emulator,
        some("/usr/libexec/qemu-kvm")
    );
}

#[test]
fn missing_wanted_parts_read_to_the_root_end() {
    let doc = b"<domain type='kvm'><name>a</name><devices><disk/></devices></domain><junk";
    let facts = parse(doc, ALL);
    assert_eq!((facts.arch, facts.emulator), (None, None));
}

#[test]
fn kubevirt_metadata_without_uid_is_still_a_vmi() {
    let doc = br#"<domain type='kvm'><name>ns_vm</name><metadata><kubevirt xmlns="http://kubevirt.io"/></metadata><memory/></domain>"#;
    assert!(parse(doc, DEFAULT).kubevirt);
    let doc = br#"<domain type='kvm'><metadata><kubevirt xmlns="http://kubevirt.io"><graceperiod/><uid> </uid></kubevirt></metadata></domain>"#;
    assert!(parse(doc, DEFAULT).kubevirt);
}

#[test]
fn the_content_of_the_kubevirt_metadata_is_not_read() {
    // A filled uid (older launchers), an empty one (current), or one too long to be kept: the
    // element only marks the domain as a VMI.
    let long = "u".repeat(MAX_VALUE_LEN + 1);
    for uid in [
        "<uid>u1</uid>",
        "<uid/>",
        "<uid></uid>",
        &format!("<uid>{long}</uid>"),
    ] {
        let doc = format!(
            r#"<domain type='kvm'><name>ns_vm</name><uuid>u</uuid><metadata><k:kubevirt xmlns:k="http://kubevirt.io">{uid}</k:kubevirt></metadata><memory/></domain>"#
        );
        let facts = parse(doc.as_bytes(), DEFAULT);
        assert!(facts.kubevirt, "{uid}");
        assert_eq!(facts.name, some("ns_vm"));
    }
}

#[test]
fn first_of_repeated_elements_wins() {
    let doc = b"<domain type='kvm'><name>first</name><name>second</name><uuid>u</uuid></domain>";
    assert_eq!(parse(doc, DEFAULT).name, some("first"));
}

#[test]
fn first_os_type_wins() {
    let doc = b"<domain type='kvm'><os><type arch='x86_64'>hvm</type><type arch='i686' machine='pc'/></os></domain>";
    let facts = parse(doc, OS);
    assert_eq!((facts.arch, facts.machine), (some("x86_64"), None));
}

#[test]
fn cdata_comments_and_nested_elements_in_text_values() {
    let doc = b"<domain type='kvm'><name><![CDATA[a&b]]><!-- c --><x>ignored</x>-c</name></domain>";
    assert_eq!(parse(doc, DEFAULT).name, some("a&b-c"));
}

#[test]
fn empty_values_are_none() {
    let doc = b"<domain type=''><name/><uuid>  </uuid></domain>";
    let facts = parse(doc, DEFAULT);
    assert_eq!(facts.domain_type, some(""));
    assert_eq!(facts.hypervisor_type, HypervisorType::Unknown);
    assert_eq!((facts.name, facts.uuid), (None, None));
}

#[test]
fn empty_root_element_is_a_domain_with_a_type_only() {
    let facts = parse(b"<?xml version='1.0'?>\n<domain type='qemu'/>", ALL);
    assert_eq!(facts.hypervisor_type, HypervisorType::QemuTcg);
    assert_eq!(facts.name, None);
}

#[test]
fn utf8_bom_declaration_comments_and_doctype_before_the_root_are_accepted() {
    let mut doc =
        b"\xEF\xBB\xBF<?xml version='1.0' encoding='UTF-8'?>\n<!-- c -->\n<!DOCTYPE domain>\n"
            .to_vec();
    doc.extend_from_slice(PLAIN_TCG);
    assert_eq!(parse(&doc, DEFAULT).name, some("tiny-tcg"));
}

#[test]
fn documents_without_a_root_element() {
    for doc in [
        &b""[..],
        b"   \n\t",
        b"<!-- only a comment -->",
        b"<?xml version='1.0'?>",
    ] {
        assert_eq!(parse_err(doc, DEFAULT), XmlError::NoRoot);
    }
    assert_eq!(XmlError::NoRoot.kind(), "no_root");
}

#[test]
fn other_root_elements_are_rejected_by_name() {
    assert_eq!(
        parse_err(b"<network><name>default</name></network>", DEFAULT),
        XmlError::WrongRoot {
            found: "network".into()
        }
    );
    assert_eq!(
        parse_err(br#"<domain xmlns="urn:other" type="kvm"/>"#, DEFAULT),
        XmlError::WrongRoot {
            found: "domain".into()
        }
    );
    let long = "r".repeat(10_000);
    let err = parse_err(format!("<{long}/>").as_bytes(), DEFAULT);
    let XmlError::WrongRoot { found } = &err else {
        panic!("{err:?}")
    };
    assert!(found.len() <= MAX_NAME_IN_ERROR + '…'.len_utf8());
    assert_eq!(err.kind(), "wrong_root");
}

#[test]
fn duplicate_root_type_is_malformed() {
    assert!(matches!(
        parse_err(b"<domain type='kvm' type='qemu'/>", DEFAULT),
        XmlError::Malformed {
            kind: MalformedKind::DuplicateTypeAttribute,
            ..
        }
    ));
}

#[test]
fn error_messages_never_contain_document_content() {
    let secret = "S3CR3T";
    let docs = [
        format!("<domain type='kvm'><name>&{secret};</name></domain>"),
        format!("<domain type='kvm'><name>{secret}</name></{secret}x>"),
        format!("<domain type='kvm' xmlns:xml='urn:{secret}'><name>a</name></domain>"),
        format!("<domain type='kvm'><name>{secret}</name><uuid>{secret}"),
        format!("<domain type='kvm {secret}'><name>x</name></domain>"),
        format!("<domain type='{secret}' type='{secret}'/>"),
        format!("<domain type='kvm' a='{secret}"),
        format!("{secret}<domain type='kvm'/>"),
        format!("<domain type='{}'/>", secret.repeat(2000)),
        format!(
            "<domain type='kvm'><name>{}</name></domain>",
            secret.repeat(2000)
        ),
        format!("<domain type='kvm'><name>{secret}&#xD800;</name></domain>"),
        format!("<domain type='kvm'><{secret}:name>x</{secret}:name></domain>"),
        format!("<?xml version='{secret}'?><domain/>"),
        format!("<domain type='kvm'><name>{secret}<!-- -- --></name></domain>"),
    ];
    for doc in &docs {
        let mut bytes = doc.clone().into_bytes();
        bytes.extend_from_slice(b"\xff");
        for input in [doc.as_bytes(), &bytes[..]] {
            if let Err(err) = parse_domain_xml(input, ALL) {
                let shown = format!("{err} / {err:?}");
                // Element names may appear; this one is only used as a prefix (a name) in
                // one input, and our namespace errors drop it anyway.
                assert!(!shown.contains(secret), "{doc:?} -> {shown}");
            }
        }
    }
}

#[test]
fn error_kinds_are_stable_labels() {
    let errs = [
        malformed(1, MalformedKind::Io),
        XmlError::NoRoot,
        XmlError::WrongRoot { found: "x".into() },
        XmlError::NotUtf8 { position: 1 },
        XmlError::TooDeep {
            position: 1,
            limit: 1,
        },
        too_long("x", 1),
    ];
    let kinds: Vec<_> = errs.iter().map(XmlError::kind).collect();
    assert_eq!(
        kinds,
        [
            "malformed",
            "no_root",
            "wrong_root",
            "not_utf8",
            "too_deep",
            "too_long"
        ]
    );
}

#[test]
fn every_fixture_parses_without_panicking_for_every_want() {
    for (i, doc) in FIXTURES.iter().enumerate() {
        for wants in WANTS {
            let _ = parse_domain_xml(doc, wants);
            for cut in (0..doc.len()).step_by(97) {
                let _ = parse_domain_xml(doc.get(..cut).unwrap_or_default(), wants);
            }
        }
        assert!(!doc.is_empty(), "fixture {i} is empty");
    }
}

// ---- property tests -------------------------------------------------------------------

fn config(cases: u32) -> ProptestConfig {
    // No regression files written into the source tree.
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases)
    }
}

fn wants_strategy() -> impl Strategy<Value = Wants> {
    (any::<bool>(), any::<bool>()).prop_map(|(os, emulator)| Wants { os, emulator })
}

const TOKENS: &[&str] = &[
    "<",
    ">",
    "</",
    "/>",
    "=",
    "'",
    "\"",
    " ",
    "\n",
    "&",
    ";",
    "#",
    "x",
    "domain",
    "name",
    "uuid",
    "metadata",
    "kubevirt",
    "uid",
    "os",
    "type",
    "devices",
    "emulator",
    "memory",
    "<domain type='kvm'>",
    "<domain type=\"qemu\">",
    "</domain>",
    "<name>",
    "</name>",
    "<uuid>",
    "</uuid>",
    "<metadata>",
    "</metadata>",
    "<kubevirt xmlns=\"http://kubevirt.io\">",
    "<kv:kubevirt xmlns:kv='http://kubevirt.io'>",
    "</kv:kubevirt>",
    "</kubevirt>",
    "<uid>",
    "</uid>",
    "<os>",
    "</os>",
    "<type arch='x86_64' machine='pc'>",
    "</type>",
    "<devices>",
    "</devices>",
    "<emulator>",
    "</emulator>",
    "&amp;",
    "&lt;",
    "&#x41;",
    "&#0;",
    "&#xFFFFFF;",
    "&bogus;",
    "<!--",
    "-->",
    "<![CDATA[",
    "]]>",
    "<?xml version='1.0'?>",
    "<!DOCTYPE d [",
    "]>",
    "<?pi x?>",
    "xmlns:",
    "xmlns='urn:x'",
    "xmlns:xml='urn:y'",
    "p:",
    "\u{e9}",
    "\u{1F680}",
    "\u{FEFF}",
    "\r\n",
    "\t",
];

fn token_soup() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        4 => proptest::sample::select(TOKENS).prop_map(|t| t.as_bytes().to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 1..4),
    ];
    proptest::collection::vec(token, 0..48).prop_map(|parts| parts.concat())
}

#[derive(Clone, Debug)]
enum Mutation {
    Truncate(proptest::sample::Index),
    SetByte(proptest::sample::Index, u8),
    Insert(proptest::sample::Index, &'static str),
    Delete(proptest::sample::Index, usize),
    Duplicate(proptest::sample::Index, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    use proptest::sample::Index;
    prop_oneof![
        1 => any::<Index>().prop_map(Mutation::Truncate),
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        3 => (any::<Index>(), proptest::sample::select(TOKENS))
            .prop_map(|(i, t)| Mutation::Insert(i, t)),
        2 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<Index>(), 1usize..256).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
    ]
}

fn apply(doc: &mut Vec<u8>, m: &Mutation) {
    let len = doc.len();
    if len == 0 {
        if let Mutation::Insert(_, t) = m {
            doc.extend_from_slice(t.as_bytes());
        }
        return;
    }
    match m {
        Mutation::Truncate(i) => doc.truncate(i.index(len)),
        Mutation::SetByte(i, b) => {
            if let Some(slot) = doc.get_mut(i.index(len)) {
                *slot = *b;
            }
        }
        Mutation::Insert(i, t) => {
            let at = i.index(len + 1);
            doc.splice(at..at, t.bytes());
        }
        Mutation::Delete(i, n) => {
            let at = i.index(len);
            doc.drain(at..len.min(at + n));
        }
        Mutation::Duplicate(i, n) => {
            let at = i.index(len);
            let piece: Vec<u8> = doc.get(at..len.min(at + n)).unwrap_or_default().to_vec();
            doc.splice(at..at, piece);
        }
    }
}

proptest! {
    #![proptest_config(config(30_000))]
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256),
                                   wants in wants_strategy()) {
        let _ = parse_domain_xml(&bytes, wants);
        let mut with_root = b"<domain type='kvm'><name>".to_vec();
        with_root.extend_from_slice(&bytes);
        let _ = parse_domain_xml(&with_root, wants);
    }
}

proptest! {
    #![proptest_config(config(15_000))]
    #[test]
    fn xml_token_soup_never_panics(doc in token_soup(), wants in wants_strategy()) {
        let _ = parse_domain_xml(&doc, wants);
    }
}

proptest! {
    #![proptest_config(config(30_000))]
    #[test]
    fn mutated_fixtures_never_panic(
        which in 0..FIXTURES.len(),
        mutations in proptest::collection::vec(mutation(), 1..6),
        wants in wants_strategy(),
    ) {
        let mut doc = FIXTURES.get(which).copied().unwrap_or_default().to_vec();
        for m in &mutations {
            apply(&mut doc, m);
        }
        let _ = parse_domain_xml(&doc, wants);
    }
}

// ---- structured generator: domain-like documents whose facts are known ------------------

#[derive(Clone, Debug)]
enum Kv {
    Absent,
    DefaultNs,
    Prefixed(String),
    WrongNs,
    NoNs,
}

#[derive(Clone, Debug)]
struct Spec {
    dtype: Option<String>,
    id_attr: bool,
    double_quotes: bool,
    name: Option<String>,
    uuid: Option<String>,
    title: Option<String>,
    header_order: Vec<u8>,
    kv: Kv,
    uid: Option<String>,
    other_metadata: bool,
    os: Option<(String, String)>,
    emulator: Option<String>,
    escape_mode: u8,
    pad: bool,
    wants: Wants,
}

/// Characters for generated values: markup characters, non-ASCII, and spaces (which are
/// trimmed at the ends of text values). Picking from a list is much cheaper than a regex.
const VALUE_CHARS: &[char] = &[
    'a',
    'b',
    'k',
    'v',
    'm',
    'q',
    'Z',
    '0',
    '7',
    '9',
    '_',
    '-',
    '.',
    ':',
    '/',
    ' ',
    ' ',
    '&',
    '<',
    '>',
    '\'',
    '"',
    ';',
    '#',
    '\u{e9}',
    '\u{4e2d}',
    '\u{1F680}',
];

fn value(max_len: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(VALUE_CHARS), 0..=max_len)
        .prop_map(String::from_iter)
}

fn text_value() -> impl Strategy<Value = String> {
    value(24)
}

fn attr_value_strategy() -> impl Strategy<Value = String> {
    value(16)
}

fn spec() -> impl Strategy<Value = Spec> {
    let dtype = prop_oneof![
        Just(None),
        Just(Some("kvm".to_owned())),
        Just(Some("qemu".to_owned())),
        Just(Some("xen".to_owned())),
        Just(Some("hyperv".to_owned())),
        Just(Some("KVM".to_owned())),
        attr_value_strategy().prop_map(Some),
    ];
    let kv = prop_oneof![
        Just(Kv::Absent),
        Just(Kv::DefaultNs),
        "[a-z][a-z0-9]{0,5}"
            .prop_filter("xml* prefixes are reserved", |p| !p.starts_with("xml"))
            .prop_map(Kv::Prefixed),
        Just(Kv::WrongNs),
        Just(Kv::NoNs),
    ];
    let header = (
        dtype,
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(text_value()),
        proptest::option::of(text_value()),
        proptest::option::of(text_value()),
        Just(vec![0u8, 1, 2, 3]).prop_shuffle(),
    );
    let rest = (
        kv,
        proptest::option::of(text_value()),
        any::<bool>(),
        proptest::option::of((attr_value_strategy(), attr_value_strategy())),
        proptest::option::of(text_value()),
        0u8..4,
        any::<bool>(),
        wants_strategy(),
    );
    (header, rest).prop_map(
        |(
            (dtype, id_attr, double_quotes, name, uuid, title, header_order),
            (kv, uid, other_metadata, os, emulator, escape_mode, pad, wants),
        )| Spec {
            dtype,
            id_attr,
            double_quotes,
            name,
            uuid,
            title,
            header_order,
            kv,
            uid,
            other_metadata,
            os,
            emulator,
            escape_mode,
            pad,
            wants,
        },
    )
}

fn escape_text(s: &str, mode: u8) -> String {
    let mut out = String::new();
    match mode {
        // Minimal escaping.
        0 => {
            for c in s.chars() {
                match c {
                    '&' => out.push_str("&amp;"),
                    '<' => out.push_str("&lt;"),
                    '>' => out.push_str("&gt;"),
                    c => out.push(c),
                }
            }
        }
        // Every non-alphanumeric character as a numeric reference, decimal or hex.
        1 => {
            for (i, c) in s.chars().enumerate() {
                if c.is_ascii_alphanumeric() {
                    out.push(c);
                } else if i % 2 == 0 {
                    out.push_str(&format!("&#{};", c as u32));
                } else {
                    out.push_str(&format!("&#x{:X};", c as u32));
                }
            }
        }
        // CDATA, split around any `]]>`.
        2 => {
            out.push_str("<![CDATA[");
            out.push_str(&s.replace("]]>", "]]]]><![CDATA[>"));
            out.push_str("]]>");
        }
        // Named entities for everything escapable, with comments sprinkled in.
        _ => {
            for c in s.chars() {
                match c {
                    '&' => out.push_str("&amp;"),
                    '<' => out.push_str("&lt;"),
                    '>' => out.push_str("&gt;"),
                    '\'' => out.push_str("&apos;<!---->"),
                    '"' => out.push_str("&quot;"),
                    c => out.push(c),
                }
            }
        }
    }
    out
}

fn escape_attr(s: &str, quote: char) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '\'' if quote == '\'' => out.push_str("&apos;"),
            '"' if quote == '"' => out.push_str("&#34;"),
            c => out.push(c),
        }
    }
    out
}

fn render(spec: &Spec) -> String {
    let q = if spec.double_quotes { '"' } else { '\'' };
    let pad = if spec.pad { "\n    " } else { "" };
    let text = |s: &str| format!("{pad}{}{pad}", escape_text(s, spec.escape_mode));
    let mut doc = String::from("<domain");
    if let Some(t) = &spec.dtype {
        doc.push_str(&format!(" type={q}{}{q}", escape_attr(t, q)));
    }
    if spec.id_attr {
        doc.push_str(&format!(" id={q}42{q}"));
    }
    doc.push_str(">\n");
    for part in &spec.header_order {
        match part {
            0 => {
                if let Some(n) = &spec.name {
                    doc.push_str(&format!("  <name>{}</name>\n", text(n)));
                }
            }
            1 => {
                if let Some(u) = &spec.uuid {
                    doc.push_str(&format!("  <uuid>{}</uuid>\n", text(u)));
                }
            }
            2 => {
                if let Some(t) = &spec.title {
                    doc.push_str(&format!("  <title>{}</title>\n", text(t)));
                }
            }
            _ => {
                doc.push_str("  <metadata>\n");
                if spec.other_metadata {
                    doc.push_str(
                        "    <app:x xmlns:app='urn:app'><uid>not-this</uid><kubevirt/></app:x>\n",
                    );
                }
                let uid = spec.uid.as_deref().map(text).unwrap_or_default();
                let uid_el = |p: &str| {
                    if spec.uid.is_some() {
                        format!("<{p}uid>{uid}</{p}uid>")
                    } else {
                        String::new()
                    }
                };
                let grace = |p: &str| {
                    format!("<{p}graceperiod><{p}deletionGracePeriodSeconds>30</{p}deletionGracePeriodSeconds></{p}graceperiod>")
                };
                match &spec.kv {
                    Kv::Absent => {}
                    Kv::DefaultNs => doc.push_str(&format!(
                        "    <kubevirt xmlns={q}http://kubevirt.io{q}>{}{}</kubevirt>\n",
                        uid_el(""),
                        grace("")
                    )),
                    Kv::Prefixed(p) => {
                        let pp = format!("{p}:");
                        doc.push_str(&format!(
                            "    <{p}:kubevirt xmlns:{p}={q}http://kubevirt.io{q}>{}{}</{p}:kubevirt>\n",
                            grace(&pp),
                            uid_el(&pp)
                        ));
                    }
                    Kv::WrongNs => doc.push_str(&format!(
                        "    <kubevirt xmlns={q}http://kubevirt.io/{q}>{}</kubevirt>\n",
                        uid_el("")
                    )),
                    Kv::NoNs => doc.push_str(&format!("    <kubevirt>{}</kubevirt>\n", uid_el(""))),
                }
                doc.push_str("  </metadata>\n");
            }
        }
    }
    doc.push_str("  <memory unit='KiB'>1048576</memory>\n  <vcpu placement='static'>1</vcpu>\n");
    if let Some((arch, machine)) = &spec.os {
        doc.push_str(&format!(
            "  <os>\n    <type arch={q}{}{q} machine={q}{}{q}>hvm</type>\n    <boot dev='hd'/>\n  </os>\n",
            escape_attr(arch, q),
            escape_attr(machine, q)
        ));
    }
    doc.push_str("  <features><acpi/></features>\n  <devices>\n");
    doc.push_str("    <disk type='file' device='disk'><target dev='vda' bus='virtio'/></disk>\n");
    if let Some(e) = &spec.emulator {
        doc.push_str(&format!("    <emulator>{}</emulator>\n", text(e)));
    }
    doc.push_str("    <serial type='pty'/>\n  </devices>\n</domain>\n");
    doc
}

fn expected_text(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

fn expected(spec: &Spec) -> DomainFacts {
    let kubevirt = match &spec.kv {
        Kv::DefaultNs | Kv::Prefixed(_) => true,
        Kv::Absent | Kv::WrongNs | Kv::NoNs => false,
    };
    let os = if spec.wants.os { spec.os.clone() } else { None };
    DomainFacts {
        domain_type: spec.dtype.clone(),
        hypervisor_type: HypervisorType::from_domain_type(spec.dtype.as_deref()),
        name: expected_text(&spec.name),
        uuid: expected_text(&spec.uuid),
        kubevirt,
        machine: os
            .as_ref()
            .map(|(_, m)| m.clone())
            .filter(|m| !m.is_empty()),
        arch: os.map(|(a, _)| a).filter(|a| !a.is_empty()),
        emulator: if spec.wants.emulator {
            expected_text(&spec.emulator)
        } else {
            None
        },
        live: spec.id_attr,
    }
}

proptest! {
    #![proptest_config(config(30_000))]
    #[test]
    fn structured_domains_round_trip(spec in spec()) {
        let doc = render(&spec);
        let facts = parse_domain_xml(doc.as_bytes(), spec.wants);
        prop_assert_eq!(facts, Ok(expected(&spec)), "document:\n{}", doc);
    }
}
