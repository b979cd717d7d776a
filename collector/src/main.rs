//! `fathom-collector` (start-up is wired in `init`).
fn main() {}
