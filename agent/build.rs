//! Builds the eBPF programs (`ebpf-programs/ebpf`) with the pinned nightly and
//! bpf-linker, for `include_bytes_aligned!` in `src/ebpf.rs`.
//!
//! Without bpf-linker on PATH (a machine where `scripts/setup` has not run,
//! or a plain `cargo check`/`cargo clippy`), an empty object is written and a
//! warning printed; the agent then refuses to start and says why. Set
//! `FATHOM_REQUIRE_EBPF=1` to make a missing bpf-linker a build error (CI).
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../ebpf-programs");
    let toolchain_file = ebpf_dir.join("toolchain");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    println!("cargo:rerun-if-env-changed=FATHOM_REQUIRE_EBPF");
    let toolchain = fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {}", toolchain_file.display()))?;
    let toolchain = toolchain.trim();

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("fathom");
    let required = env::var("FATHOM_REQUIRE_EBPF").is_ok_and(|v| v == "1" || v == "true");
    if which::which("bpf-linker").is_err() {
        if required {
            return Err(anyhow!(
                "FATHOM_REQUIRE_EBPF is set but bpf-linker is not on PATH: run scripts/setup"
            ));
        }
        println!(
            "cargo:warning=bpf-linker not found: building fathom-agent WITHOUT its eBPF programs \
             (it will refuse to run); run scripts/setup"
        );
        // Build again once scripts/setup has installed bpf-linker there.
        if let Some(home) = env::var_os("CARGO_HOME")
            .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").into()))
        {
            println!(
                "cargo:rerun-if-changed={}",
                PathBuf::from(home).join("bin").display()
            );
        }
        fs::write(&object, [])?;
        fs::write(out_dir.join("fathom-http"), [])?;
        fs::write(out_dir.join("fathom-net"), [])?;
        return Ok(());
    }

    let common = ebpf_dir.join("common");
    println!("cargo:rerun-if-changed={}", common.display());
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    let root_dir = ebpf_dir.join("ebpf");
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "fathom-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain),
    )
}
