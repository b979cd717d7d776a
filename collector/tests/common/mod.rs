//! Helpers shared by the collector's integration tests and benchmark: the
//! peers they run (rotel, Prometheus, Go, Chromium) and skip when missing,
//! child processes killed on drop, free ports, and real-shaped gzipped pprof
//! CPU profiles built with the `pprof` crate's own message types.
//!
//! The peers, child guards, ports and rotel receiver come from
//! `fathom-test-support`, shared with `fathom-tests`. Each test binary uses a
//! part.
#![allow(dead_code, reason = "each test binary uses a part of these helpers")]
#![allow(
    clippy::unwrap_used,
    reason = "test support: a failed unwrap is a failed test"
)]

#[allow(unused_imports, reason = "each test binary uses a part")]
pub use fathom_test_support::*;
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use pprof::protos::{self, Message as _};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A file of the collector's test fixtures (`collector/tests/fixtures`).
pub fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// Runs a Python test client of `tests/fixtures/clients` with `args`, the
/// JSON `input` on its stdin, and returns what it printed (its JSON list of
/// results); its stderr is shown, and a failure fails the test.
#[allow(dead_code, reason = "not every test binary runs a Python client")]
pub fn run_python_client(
    python: &Path,
    client: &str,
    args: &[&str],
    input: &serde_json::Value,
) -> Vec<serde_json::Value> {
    use std::io::Write as _;
    let mut child = std::process::Command::new(python)
        .arg(fixture(&format!("clients/{client}")))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {client}: {e}"));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("writing to {client}: {e}"));
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {client}: {e}"));
    assert!(out.status.success(), "{client} failed");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{client} printed no JSON list: {e}"))
}

/// Cargo's target directory of this build (`target/` or `CARGO_TARGET_DIR`):
/// test binaries run from `<target>/<profile>/deps/`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .nth(3)
        .map_or_else(|| workspace_root().join("target"), Path::to_path_buf)
}

/// A frame of a [`CpuProfile`]: its address in the mapping and the one
/// function there (no inlining).
pub struct Frame {
    pub address: u64,
    pub function: String,
    pub system_name: String,
    pub file: String,
    pub line: i64,
}

/// A CPU profile shaped the way `fathom-agent` writes one: sample types
/// `samples/count` and `cpu/nanoseconds`, period type `cpu/nanoseconds`,
/// period 1e9/Hz, one mapping, one function and location per frame.
pub struct CpuProfile {
    pub frequency_hz: i64,
    pub duration: Duration,
    pub mapping_file: String,
    pub build_id: String,
    pub memory_start: u64,
    pub memory_limit: u64,
    pub frames: Vec<Frame>,
    /// Stacks (leaf first) as indexes into `frames`, and their counts.
    pub samples: Vec<(Vec<usize>, i64)>,
}

impl CpuProfile {
    /// The pprof message (the `pprof` crate's types).
    pub fn build(&self) -> protos::Profile {
        let mut strings = vec![String::new()];
        let mut ids = std::collections::HashMap::from([(String::new(), 0i64)]);
        let mut string = |s: &str| -> i64 {
            *ids.entry(s.to_owned()).or_insert_with(|| {
                strings.push(s.to_owned());
                strings.len() as i64 - 1
            })
        };
        let period = 1_000_000_000 / self.frequency_hz.max(1);
        let (samples, count, cpu, nanoseconds) = (
            string("samples"),
            string("count"),
            string("cpu"),
            string("nanoseconds"),
        );
        let mapping = protos::Mapping {
            id: 1,
            memory_start: self.memory_start,
            memory_limit: self.memory_limit,
            file_offset: 0,
            filename: string(&self.mapping_file),
            build_id: string(&self.build_id),
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: false,
        };
        let mut function = Vec::new();
        let mut location = Vec::new();
        for (i, f) in self.frames.iter().enumerate() {
            let id = i as u64 + 1;
            function.push(protos::Function {
                id,
                name: string(&f.function),
                system_name: string(&f.system_name),
                filename: string(&f.file),
                start_line: 0,
            });
            location.push(protos::Location {
                id,
                mapping_id: 1,
                address: f.address,
                line: vec![protos::Line {
                    function_id: id,
                    line: f.line,
                }],
                is_folded: false,
            });
        }
        let sample = self
            .samples
            .iter()
            .map(|(stack, n)| protos::Sample {
                location_id: stack.iter().map(|&i| i as u64 + 1).collect(),
                value: vec![*n, n * period],
                label: Vec::new(),
            })
            .collect();
        let time_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        protos::Profile {
            sample_type: vec![
                protos::ValueType {
                    ty: samples,
                    unit: count,
                },
                protos::ValueType {
                    ty: cpu,
                    unit: nanoseconds,
                },
            ],
            sample,
            mapping: vec![mapping],
            location,
            function,
            string_table: strings,
            drop_frames: 0,
            keep_frames: 0,
            time_nanos,
            duration_nanos: self.duration.as_nanos() as i64,
            period_type: Some(protos::ValueType {
                ty: cpu,
                unit: nanoseconds,
            }),
            period,
            comment: Vec::new(),
            default_sample_type: cpu,
        }
    }

    /// Serialized (prost) and gzipped (flate2), as agents push it.
    pub fn gzip(&self) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&self.build().encode_to_vec()).unwrap();
        gz.finish().unwrap()
    }
}
