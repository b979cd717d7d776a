//! Syscall-tracepoint capture of HTTP/1.x bytes (see `fathom_common::http`).
