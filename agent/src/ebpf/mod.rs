//! The kernel boundary for eBPF programs: the objects embedded at build time
//! (`object`), and the loading of each program with the verifier's
//! statistics kept and checked against the verification budget (`load`).
mod load;
mod object;

pub use load::{
    BUDGET_PEAK_STATES, BUDGET_PROCESSED_INSNS, FAIL_LOAD_ENV, LoadError, LoadFailure,
    VerifierStats, load_program, parse_stats, verifier_log_dir,
};
pub use object::{MissingObject, http_object, net_object, object};
