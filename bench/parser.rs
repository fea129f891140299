//! `parse_domain_xml` (which stops after what it needs) versus a full quick-xml pass over the
//! same bytes (every event read up to `Eof`), on a ~8 KiB KubeVirt domain and a minimal one.
//! The KubeVirt domain is the legacy-shape fixture (filled `<uid>`, `<graceperiod>`) that the
//! figures in BENCHMARKS.md were measured on; the current shape differs only inside `<metadata>`.
//!
//! Run: `cargo bench --bench parser -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quick_xml::events::Event;
use quick_xml::{NsReader, Reader};
use virt_hypervisor_agent::domain::{parse_domain_xml, Wants};

const KUBEVIRT_KVM: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/xml/kubevirt-legacy-v0.58-kvm.xml"
));
const PLAIN_TCG: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/xml/plain-tcg.xml"
));

/// Baseline: tokenize the whole document with a plain reader. Returns the event count.
fn full_pass(xml: &[u8]) -> usize {
    let mut reader = Reader::from_reader(xml);
    let mut events = 0usize;
    loop {
        match reader.read_event() {
            Ok(Event::Eof) | Err(_) => return events,
            Ok(_) => events += 1,
        }
    }
}

/// Baseline with namespace resolution, as the parser does it.
fn full_pass_ns(xml: &[u8]) -> usize {
    let mut reader = NsReader::from_reader(xml);
    let mut events = 0usize;
    loop {
        match reader.read_resolved_event() {
            Ok((_, Event::Eof)) | Err(_) => return events,
            Ok(_) => events += 1,
        }
    }
}

fn bench_document(c: &mut Criterion, group_name: &str, xml: &'static [u8]) {
    assert!(
        parse_domain_xml(xml, Wants::default()).is_ok(),
        "{group_name}: fixture must parse"
    );
    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Bytes(xml.len() as u64));
    group.bench_function("parse_domain_xml/default", |b| {
        b.iter(|| parse_domain_xml(black_box(xml), Wants::default()))
    });
    group.bench_function("parse_domain_xml/os", |b| {
        b.iter(|| {
            parse_domain_xml(
                black_box(xml),
                Wants {
                    os: true,
                    emulator: false,
                },
            )
        })
    });
    group.bench_function("parse_domain_xml/os+emulator", |b| {
        b.iter(|| {
            parse_domain_xml(
                black_box(xml),
                Wants {
                    os: true,
                    emulator: true,
                },
            )
        })
    });
    group.bench_function("baseline/full_pass", |b| {
        b.iter(|| full_pass(black_box(xml)))
    });
    group.bench_function("baseline/full_pass_ns", |b| {
        b.iter(|| full_pass_ns(black_box(xml)))
    });
    group.finish();
}

fn parser(c: &mut Criterion) {
    bench_document(c, "kubevirt-kvm", KUBEVIRT_KVM);
    bench_document(c, "plain-tcg", PLAIN_TCG);
}

criterion_group!(benches, parser);
criterion_main!(benches);
