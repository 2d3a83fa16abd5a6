//! The checkpoint/restore engine used as a library, through the crate's example.

use std::process::Command;

use persist_tests::bin_dir;

#[test]
fn the_library_example_checkpoints_and_restores_a_counter() {
    persist_tests::require_root!();
    let example = bin_dir().join("examples/checkpoint_and_restore");
    assert!(
        example.exists(),
        "{} is not built (cargo test builds examples)",
        example.display()
    );
    let output = Command::new(&example).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the example failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("checkpointed pid") && stdout.contains("counted on to"),
        "the example reports its checkpoint and the restored count: {stdout}"
    );
}
