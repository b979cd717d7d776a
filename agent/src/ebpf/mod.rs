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

use aya::{
    Ebpf,
    maps::{Map, MapError},
    programs::{Program, ProgramError},
};

/// Every way the kernel boundary fails, for all three objects: the
/// signals' errors wrap it (`#[from]`), so a message reads the same
/// whichever signal hit it.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    MissingObject(#[from] MissingObject),
    #[error("loading the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF program {0}")]
    Rejected(#[from] LoadError),
    #[error("attaching {program} to {target}: {source}")]
    Attach {
        program: &'static str,
        target: String,
        #[source]
        source: ProgramError,
    },
    #[error("tracepoint format {path}: {reason}")]
    TracepointFormat { path: String, reason: String },
}

/// `From` the kernel boundary's leaf errors (a missing object, a rejected
/// program, aya's load error) for a signal's error type that wraps
/// [`KernelError`] in its `Kernel` variant, so `?` works on them directly.
#[macro_export]
macro_rules! wraps_kernel_error {
    ($t:ty) => {
        impl From<$crate::ebpf::MissingObject> for $t {
            fn from(e: $crate::ebpf::MissingObject) -> Self {
                Self::Kernel(e.into())
            }
        }
        impl From<$crate::ebpf::LoadError> for $t {
            fn from(e: $crate::ebpf::LoadError) -> Self {
                Self::Kernel(e.into())
            }
        }
        impl From<aya::EbpfError> for $t {
            fn from(e: aya::EbpfError) -> Self {
                Self::Kernel(e.into())
            }
        }
    };
}

/// A program of the object, as its type.
pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(KernelError::Program {
            name,
            source: ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| KernelError::Program { name, source })
}

/// A map taken out of the object, as its type.
pub fn take_map<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, KernelError> {
    let map = ebpf.take_map(name).ok_or(KernelError::Map {
        name,
        source: MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| KernelError::Map { name, source })
}

/// A map of the object, borrowed.
pub fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Map, KernelError> {
    ebpf.map_mut(name).ok_or(KernelError::Map {
        name,
        source: MapError::InvalidName { name: name.into() },
    })
}

/// The wrapper of a map error.
pub fn map_err(name: &'static str) -> impl Fn(MapError) -> KernelError {
    move |source| KernelError::Map { name, source }
}

/// The wrapper of a program error.
pub fn program_err(name: &'static str) -> impl Fn(ProgramError) -> KernelError {
    move |source| KernelError::Program { name, source }
}

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
