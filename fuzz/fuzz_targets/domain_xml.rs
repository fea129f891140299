//! The domain XML parser on arbitrary bytes: it must return facts or a typed error, never
//! panic, whatever libvirt (or a daemon pretending to be libvirt) sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virt_hypervisor_agent::domain::{parse_domain_xml, Wants};

fuzz_target!(|data: &[u8]| {
    // The first byte picks what the parser is asked for, so every code path is reached.
    let (wants, xml) = match data.split_first() {
        Some((w, rest)) => (
            Wants {
                os: w & 1 != 0,
                emulator: w & 2 != 0,
            },
            rest,
        ),
        None => (Wants::default(), data),
    };
    let _ = parse_domain_xml(xml, wants);
});
