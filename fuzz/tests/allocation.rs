//! The engine reports an input that makes a target allocate what a length
//! field says. Alone in its process: the allocator's record is global.

use persist_agent::sys::alloc::LargestAlloc;
use persist_fuzz::{Config, Target, fuzz};

#[global_allocator]
static ALLOCATOR: LargestAlloc = LargestAlloc::new();

/// Reserves as many bytes as its first four bytes say, as a parser that
/// trusts a length field would.
fn trusts_its_length(data: &[u8]) {
    let Some(len) = data.get(..4) else {
        return;
    };
    let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    let buffer: Vec<u8> = Vec::with_capacity(len);
    std::hint::black_box(buffer);
}

#[test]
fn an_allocation_sized_by_the_input_is_a_finding() {
    static TRUSTING: Target = Target {
        name: "trusting",
        about: "allocates what its input's length field says",
        run: trusts_its_length,
        seeds: || vec![vec![16, 0, 0, 0, b'x']],
    };
    let config = Config {
        seed: 3,
        time: None,
        executions: Some(5000),
        allocator: Some(&ALLOCATOR),
        ..Config::default()
    };
    let report = fuzz(&TRUSTING, &config);
    assert_eq!(report.findings.len(), 1, "{report:?}");
    let finding = &report.findings[0];
    assert_eq!(finding.kind, "allocation", "{finding:?}");
    let len = u32::from_le_bytes(finding.input[..4].try_into().unwrap()) as usize;
    assert!(
        len > config.max_allocation,
        "the input asks for more than the limit: {len}"
    );
}
