//! Compiles the kernel programs in `bpf/` with clang into `$OUT_DIR`, where
//! `src/loader.rs` embeds them with `aya::include_bytes_aligned!`.
//!
//! Failures exit with a message that says what to install or set, because a
//! missing toolchain is the usual cause and the raw clang error hides that.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, exit},
};

const SOURCES: &[&str] = &["capture.bpf.c"];
const INSTALL_HINT: &str = "install clang and libbpf-dev: apt-get install clang libbpf-dev";

fn fail(message: &str) -> ! {
    eprintln!("error: ambit-ebpf build: {message}");
    exit(1);
}

fn env_var(name: &str) -> String {
    env::var(name).unwrap_or_else(|_| fail(&format!("cargo did not set {name}")))
}

fn main() {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env_var("OUT_DIR"));
    let bpf_dir = manifest_dir.join("bpf");
    println!("cargo:rerun-if-changed={}", bpf_dir.display());
    println!("cargo:rerun-if-env-changed=CLANG");

    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    match Command::new(&clang).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => fail(&format!(
            "`{clang} --version` failed ({}): {INSTALL_HINT} (or set CLANG=/path/to/clang)",
            out.status
        )),
        Err(e) => fail(&format!(
            "cannot run `{clang}` ({e}): {INSTALL_HINT} (or set CLANG=/path/to/clang)"
        )),
    }
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        fail(&format!(
            "libbpf headers not found (/usr/include/bpf/bpf_helpers.h): {INSTALL_HINT}"
        ));
    }

    // Compile for the endianness of the machine the loader will run on; plain
    // `-target bpf` would take the build host's instead.
    let bpf_target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb",
        _ => "bpfel",
    };

    // The capture contract's numbers, generated from the one Rust source.
    let contract = out_dir.join("contract.h");
    std::fs::write(&contract, ambit_capture_contract::c_header())
        .unwrap_or_else(|e| fail(&format!("writing {}: {e}", contract.display())));

    let mut include_args = vec![
        format!("-I{}", bpf_dir.display()),
        format!("-I{}", out_dir.display()),
    ];
    // <linux/types.h> includes <asm/types.h>, which Debian-style systems keep
    // in the multiarch directory that clang does not search for `-target bpf`.
    if let Some(dir) = multiarch_include_dir() {
        include_args.push(format!("-I{}", dir.display()));
    } else if !Path::new("/usr/include/asm/types.h").exists() {
        fail(
            "asm/types.h not found in /usr/include/<multiarch>/ or /usr/include/asm: \
             install the kernel UAPI headers: apt-get install linux-libc-dev",
        );
    }

    for source in SOURCES {
        let src = bpf_dir.join(source);
        let stem = source.trim_end_matches(".c");
        let out = out_dir.join(format!("{stem}.o"));
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-Wall", "-Werror", "-target", bpf_target])
            .args(&include_args)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .status()
            .unwrap_or_else(|e| fail(&format!("cannot run {clang}: {e}")));
        if !status.success() {
            fail(&format!(
                "clang failed to compile {} ({status}); see the compiler output above. \
                 If headers are missing: {INSTALL_HINT}",
                src.display()
            ));
        }
    }
}

/// `/usr/include/<arch>-linux-gnu` for the target architecture, if present.
fn multiarch_include_dir() -> Option<PathBuf> {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").ok()?;
    let triple = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        "arm" => "arm-linux-gnueabihf",
        "riscv64" => "riscv64-linux-gnu",
        "powerpc64" => "powerpc64le-linux-gnu",
        "s390x" => "s390x-linux-gnu",
        "x86" => "i386-linux-gnu",
        _ => return None,
    };
    let dir = Path::new("/usr/include").join(triple);
    dir.join("asm/types.h").exists().then_some(dir)
}
