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

/// The offset of a field in a tracepoint `format` file.
pub fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit([' ', '*']).next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        line.split(';')
            .find_map(|part| part.trim().strip_prefix("offset:")?.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tracepoint_field_offsets() {
        let format = "name: sched_process_fork\nID: 366\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\
            \tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\
            \tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(field_offset(format, "child_pid"), Some(20));
        assert_eq!(field_offset(format, "parent_comm"), Some(8));
        assert_eq!(field_offset(format, "common_type"), Some(0));
        assert_eq!(field_offset(format, "pid"), None);
    }
}
