//! The eBPF object embedded at build time (see `build.rs`).

/// The BPF object with all of Fathom's programs, or an error saying why the
/// binary has none.
pub fn object() -> Result<&'static [u8], MissingObject> {
    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fathom"));
    if OBJECT.is_empty() {
        Err(MissingObject)
    } else {
        Ok(OBJECT)
    }
}

/// The eBPF object with the HTTP tracing programs (`fathom_common::http`).
pub fn http_object() -> Result<&'static [u8], MissingObject> {
    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fathom-http"));
    if OBJECT.is_empty() {
        Err(MissingObject)
    } else {
        Ok(OBJECT)
    }
}

/// The eBPF object with the network programs (`fathom_common::net`).
pub fn net_object() -> Result<&'static [u8], MissingObject> {
    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fathom-net"));
    if OBJECT.is_empty() {
        Err(MissingObject)
    } else {
        Ok(OBJECT)
    }
}

/// The agent was built where bpf-linker was missing.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "this fathom-agent was built without its eBPF programs (bpf-linker was not on PATH at build \
     time); run scripts/setup, then rebuild"
)]
pub struct MissingObject;
