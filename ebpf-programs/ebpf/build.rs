//! Rebuild the BPF object when bpf-linker changes (it is the object's linker).
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
