//! Compiles the C BPF programs with clang into `OUT_DIR`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &["persist"];

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("PERSIST_CLANG").unwrap_or_else(|_| "clang".to_owned());
    println!("cargo:rerun-if-env-changed=PERSIST_CLANG");
    println!("cargo:rerun-if-changed=bpf");

    for program in PROGRAMS {
        let source = format!("bpf/{program}.bpf.c");
        let object = out_dir.join(format!("{program}.bpf.o"));
        let status = Command::new(&clang)
            .args([
                "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
            ])
            .arg("-I/usr/include/x86_64-linux-gnu")
            .arg("-Ibpf")
            .arg("-c")
            .arg(&source)
            .arg("-o")
            .arg(&object)
            .status();
        match status {
            Ok(status) if status.success() => {}
            Ok(status) => panic!(
                "clang failed ({status}) compiling {source}; is libbpf-dev installed? \
                 (apt-get install -y clang libbpf-dev)"
            ),
            Err(err) => panic!(
                "cannot run `{clang}` to build the BPF programs ({err}). \
                 Install it with: apt-get install -y clang libbpf-dev \
                 (or run `cargo xtask deps`)"
            ),
        }
    }
}
