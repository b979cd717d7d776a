//! Building pprof CPU profiles (`perftools.profiles.Profile`) from symbolized
//! samples. Pure logic: no kernel, no files.
//!
//! Shape (see `shared/reference/profiles.md`): sample types `samples/count`
//! and `cpu/nanoseconds`, period type `cpu/nanoseconds`, period 1e9/Hz; one
//! mapping per mapped file (build id, file offset); kernel frames in their own
//! mapping; locations carry normalized (ELF virtual) addresses and their
//! inline chain, innermost first.

use std::{
    collections::HashMap,
    io::Write as _,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fathom_symbolizer::Frame;
use flate2::{Compression, write::GzEncoder};
use pprof::protos::{self, Message as _};

/// A mapped file (or the kernel) as pprof describes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    pub filename: String,
    /// Lower-case hex, or empty.
    pub build_id: String,
    pub memory_start: u64,
    pub memory_limit: u64,
    pub file_offset: u64,
}

/// One frame position in a stack: an address and what it resolved to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    pub mapping: Option<Arc<Mapping>>,
    pub address: u64,
    /// Innermost first; several when the address is in inlined code.
    pub frames: Vec<Frame>,
}

/// A sample label value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LabelValue {
    Str(String),
    Num(i64),
}

/// Metadata of a CPU profile.
#[derive(Clone, Copy, Debug)]
pub struct CpuProfileMeta {
    pub frequency_hz: u64,
    pub start: SystemTime,
    pub duration: Duration,
}

impl CpuProfileMeta {
    /// Nanoseconds of CPU one sample stands for.
    pub fn period_ns(&self) -> i64 {
        (1_000_000_000 / self.frequency_hz.max(1)) as i64
    }
}

/// What a profile measures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProfileKind {
    /// CPU time, sampled: `samples/count` + `cpu/nanoseconds`.
    #[default]
    Cpu,
    /// Time threads spent off a CPU (blocked, sleeping, waiting to run), in
    /// intervals at least the threshold long: `off_cpu/nanoseconds`.
    OffCpu,
}

impl ProfileKind {
    /// Pyroscope's `__name__` of the series.
    pub fn pyroscope_name(self) -> &'static str {
        match self {
            Self::Cpu => "process_cpu",
            Self::OffCpu => "off_cpu",
        }
    }
}

/// Accumulates samples; [`ProfileBuilder::build`] produces the profile.
#[derive(Debug)]
pub struct ProfileBuilder {
    meta: CpuProfileMeta,
    kind: ProfileKind,
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    mappings: HashMap<Arc<Mapping>, u64>,
    mapping_list: Vec<protos::Mapping>,
    functions: HashMap<(i64, i64, i64), u64>,
    function_list: Vec<protos::Function>,
    locations: HashMap<Arc<Location>, u64>,
    location_list: Vec<protos::Location>,
    samples: Vec<protos::Sample>,
    comments: Vec<i64>,
    main_binary: Option<String>,
}

/// File name of the kernel's mapping.
pub const KERNEL_MAPPING: &str = "[kernel.kallsyms]";

impl ProfileBuilder {
    pub fn new(meta: CpuProfileMeta) -> Self {
        Self::of_kind(meta, ProfileKind::Cpu)
    }

    /// A builder of a profile of `kind`. For [`ProfileKind::OffCpu`] a
    /// sample's count is nanoseconds off the CPU (`meta.frequency_hz` is
    /// not used).
    pub fn of_kind(meta: CpuProfileMeta, kind: ProfileKind) -> Self {
        let mut builder = Self {
            meta,
            kind,
            strings: Vec::new(),
            string_ids: HashMap::new(),
            mappings: HashMap::new(),
            mapping_list: Vec::new(),
            functions: HashMap::new(),
            function_list: Vec::new(),
            locations: HashMap::new(),
            location_list: Vec::new(),
            samples: Vec::new(),
            comments: Vec::new(),
            main_binary: None,
        };
        builder.string(""); // index 0 must be ""
        builder
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(s.to_owned());
        self.string_ids.insert(s.to_owned(), id);
        id
    }

    fn mapping(&mut self, mapping: &Arc<Mapping>) -> u64 {
        if let Some(&id) = self.mappings.get(mapping) {
            return id;
        }
        let id = self.mapping_list.len() as u64 + 1;
        let filename = self.string(&mapping.filename);
        let build_id = self.string(&mapping.build_id);
        self.mapping_list.push(protos::Mapping {
            id,
            memory_start: mapping.memory_start,
            memory_limit: mapping.memory_limit,
            file_offset: mapping.file_offset,
            filename,
            build_id,
            ..Default::default()
        });
        self.mappings.insert(Arc::clone(mapping), id);
        id
    }

    fn function(&mut self, frame: &Frame) -> u64 {
        let key = (
            self.string(&frame.function),
            self.string(&frame.system_name),
            self.string(frame.file.as_deref().unwrap_or("")),
        );
        if let Some(&id) = self.functions.get(&key) {
            return id;
        }
        let id = self.function_list.len() as u64 + 1;
        self.function_list.push(protos::Function {
            id,
            name: key.0,
            system_name: key.1,
            filename: key.2,
            start_line: 0,
        });
        self.functions.insert(key, id);
        id
    }

    fn location(&mut self, location: &Arc<Location>) -> u64 {
        if let Some(&id) = self.locations.get(location) {
            return id;
        }
        let id = self.location_list.len() as u64 + 1;
        let mapping_id = match &location.mapping {
            Some(m) => {
                let mapping_id = self.mapping(m);
                let flags = &mut self.mapping_list[mapping_id as usize - 1];
                let known = location.frames.iter().any(|f| !f.function.starts_with('['));
                flags.has_functions |= known;
                flags.has_filenames |= location.frames.iter().any(|f| f.file.is_some());
                flags.has_line_numbers |= location.frames.iter().any(|f| f.line.is_some());
                flags.has_inline_frames |= location.frames.len() > 1;
                mapping_id
            }
            None => 0,
        };
        let line = location
            .frames
            .iter()
            .map(|frame| protos::Line {
                function_id: self.function(frame),
                line: frame.line.map_or(0, i64::from),
            })
            .collect();
        self.location_list.push(protos::Location {
            id,
            mapping_id,
            address: location.address,
            line,
            is_folded: false,
        });
        self.locations.insert(Arc::clone(location), id);
        id
    }

    /// Adds `count` samples of one stack (leaf first) with its labels.
    pub fn add_sample(
        &mut self,
        stack: &[Arc<Location>],
        count: u64,
        labels: &[(&str, LabelValue)],
    ) {
        let location_id = stack.iter().map(|l| self.location(l)).collect();
        let label = labels
            .iter()
            .map(|(key, value)| {
                let key = self.string(key);
                match value {
                    LabelValue::Str(s) => protos::Label {
                        key,
                        str: self.string(s),
                        ..Default::default()
                    },
                    LabelValue::Num(n) => protos::Label {
                        key,
                        num: *n,
                        ..Default::default()
                    },
                }
            })
            .collect();
        let count = count as i64;
        self.samples.push(protos::Sample {
            location_id,
            value: match self.kind {
                ProfileKind::Cpu => vec![count, count.saturating_mul(self.meta.period_ns())],
                ProfileKind::OffCpu => vec![count],
            },
            label,
        });
    }

    /// pprof takes the first mapping for the profiled program ("File:" in
    /// `go tool pprof`); the mapping of this file goes first.
    pub fn set_main_binary(&mut self, filename: &str) {
        self.main_binary = Some(filename.to_owned());
    }

    /// Puts the main binary's mapping first and the kernel's last,
    /// renumbering mapping ids.
    fn order_mappings(&mut self) {
        let strings = &self.strings;
        let rank = |m: &protos::Mapping| {
            let name = strings[m.filename as usize].as_str();
            if Some(name) == self.main_binary.as_deref() {
                0
            } else if name == KERNEL_MAPPING {
                2
            } else {
                1
            }
        };
        let mut order: Vec<usize> = (0..self.mapping_list.len()).collect();
        order.sort_by_key(|&i| rank(&self.mapping_list[i])); // stable
        let mut new_id = vec![0u64; self.mapping_list.len() + 1];
        for (position, &old) in order.iter().enumerate() {
            new_id[old + 1] = position as u64 + 1;
        }
        let mut mappings: Vec<protos::Mapping> = order
            .iter()
            .map(|&i| self.mapping_list[i].clone())
            .collect();
        for m in &mut mappings {
            m.id = new_id[m.id as usize];
        }
        for l in &mut self.location_list {
            l.mapping_id = new_id[l.mapping_id as usize];
        }
        self.mapping_list = mappings;
    }

    /// Adds a free-text comment (shown by `go tool pprof -comments`).
    pub fn add_comment(&mut self, comment: &str) {
        let id = self.string(comment);
        self.comments.push(id);
    }

    pub fn build(mut self) -> protos::Profile {
        self.order_mappings();
        let nanoseconds = self.string("nanoseconds");
        let (sample_type, period_type, period, default_sample_type) = match self.kind {
            ProfileKind::Cpu => {
                let samples = self.string("samples");
                let count = self.string("count");
                let cpu = self.string("cpu");
                (
                    vec![
                        protos::ValueType {
                            ty: samples,
                            unit: count,
                        },
                        protos::ValueType {
                            ty: cpu,
                            unit: nanoseconds,
                        },
                    ],
                    cpu,
                    self.meta.period_ns(),
                    cpu,
                )
            }
            // Each sample's value is the time itself: a period of 1 ns.
            ProfileKind::OffCpu => {
                let off_cpu = self.string("off_cpu");
                (
                    vec![protos::ValueType {
                        ty: off_cpu,
                        unit: nanoseconds,
                    }],
                    off_cpu,
                    1,
                    off_cpu,
                )
            }
        };
        let time_nanos = self
            .meta
            .start
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        protos::Profile {
            sample_type,
            sample: self.samples,
            mapping: self.mapping_list,
            location: self.location_list,
            function: self.function_list,
            string_table: self.strings,
            drop_frames: 0,
            keep_frames: 0,
            time_nanos,
            duration_nanos: self.meta.duration.as_nanos() as i64,
            period_type: Some(protos::ValueType {
                ty: period_type,
                unit: nanoseconds,
            }),
            period,
            comment: self.comments,
            default_sample_type,
        }
    }
}

/// Serializes a profile and gzips it (the form `go tool pprof` and Pyroscope
/// read).
pub fn encode_gzip(profile: &protos::Profile) -> Vec<u8> {
    let raw = profile.encode_to_vec();
    let mut gz = GzEncoder::new(
        Vec::with_capacity(raw.len() / 4 + 64),
        Compression::default(),
    );
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(&raw);
    gz.finish().unwrap_or_default()
}

/// Checks the invariants `go tool pprof` enforces; used by tests.
pub fn validate(p: &protos::Profile) -> Result<(), String> {
    fn unique(
        ids: impl Iterator<Item = u64>,
        what: &str,
    ) -> Result<std::collections::HashSet<u64>, String> {
        let mut seen = std::collections::HashSet::new();
        for id in ids {
            if id == 0 || !seen.insert(id) {
                return Err(format!("{what} id {id} is zero or duplicated"));
            }
        }
        Ok(seen)
    }
    let strings = p.string_table.len() as i64;
    if p.string_table.first().map(String::as_str) != Some("") {
        return Err("string_table[0] is not \"\"".into());
    }
    let string_ok = |i: i64| (0..strings).contains(&i);
    let mappings = unique(p.mapping.iter().map(|m| m.id), "mapping")?;
    let functions = unique(p.function.iter().map(|f| f.id), "function")?;
    let locations = unique(p.location.iter().map(|l| l.id), "location")?;
    for f in &p.function {
        if ![f.name, f.system_name, f.filename]
            .into_iter()
            .all(string_ok)
        {
            return Err(format!("function {} has a string out of range", f.id));
        }
    }
    for m in &p.mapping {
        if !string_ok(m.filename) || !string_ok(m.build_id) {
            return Err(format!("mapping {} has a string out of range", m.id));
        }
    }
    for l in &p.location {
        if l.mapping_id != 0 && !mappings.contains(&l.mapping_id) {
            return Err(format!(
                "location {} refers to missing mapping {}",
                l.id, l.mapping_id
            ));
        }
        if let Some(line) = l
            .line
            .iter()
            .find(|line| !functions.contains(&line.function_id))
        {
            return Err(format!(
                "location {} refers to missing function {}",
                l.id, line.function_id
            ));
        }
    }
    for (i, s) in p.sample.iter().enumerate() {
        if s.value.len() != p.sample_type.len() {
            return Err(format!(
                "sample {i} has {} values for {} types",
                s.value.len(),
                p.sample_type.len()
            ));
        }
        if let Some(id) = s.location_id.iter().find(|id| !locations.contains(id)) {
            return Err(format!("sample {i} refers to missing location {id}"));
        }
        if s.label
            .iter()
            .any(|l| !string_ok(l.key) || !string_ok(l.str))
        {
            return Err(format!("sample {i} has a label string out of range"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str, line: Option<u32>) -> Frame {
        Frame {
            function: name.into(),
            system_name: format!("_Z{name}"),
            file: line.map(|_| "src/x.c".to_owned()),
            line,
        }
    }

    fn meta() -> CpuProfileMeta {
        CpuProfileMeta {
            frequency_hz: 99,
            start: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_secs(10),
        }
    }

    #[test]
    fn builds_a_deduplicated_valid_profile() {
        let exe = Arc::new(Mapping {
            filename: "/bin/x".into(),
            build_id: "abcd".into(),
            memory_start: 0x1000,
            memory_limit: 0x5000,
            file_offset: 0x1000,
        });
        let leaf = Arc::new(Location {
            mapping: Some(exe.clone()),
            address: 0x1234,
            frames: vec![frame("inlined", Some(3)), frame("hot", Some(10))],
        });
        let main = Arc::new(Location {
            mapping: Some(exe.clone()),
            address: 0x1100,
            frames: vec![frame("main", Some(20))],
        });
        let unknown = Arc::new(Location {
            mapping: None,
            address: 0xdead,
            frames: vec![frame("[unknown]", None)],
        });
        let mut b = ProfileBuilder::new(meta());
        let labels = [
            ("pid", LabelValue::Num(42)),
            ("comm", LabelValue::Str("x".into())),
        ];
        b.add_sample(&[leaf.clone(), main.clone()], 3, &labels);
        b.add_sample(&[Arc::new((*leaf).clone()), main.clone()], 2, &labels);
        b.add_sample(&[unknown, main], 1, &labels);
        b.add_comment("hello");
        let p = b.build();
        validate(&p).unwrap();

        assert_eq!(p.period, 10_101_010);
        let types: Vec<_> = p
            .sample_type
            .iter()
            .map(|t| {
                (
                    &*p.string_table[t.ty as usize],
                    &*p.string_table[t.unit as usize],
                )
            })
            .collect();
        assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
        assert_eq!(p.string_table[p.default_sample_type as usize], "cpu");
        assert_eq!(p.mapping.len(), 1);
        assert!(p.mapping[0].has_inline_frames && p.mapping[0].has_line_numbers);
        assert_eq!(p.location.len(), 3, "equal locations are shared");
        assert_eq!(p.location[0].line.len(), 2);
        assert_eq!(p.function.len(), 4);
        assert_eq!(p.sample[0].value, vec![3, 3 * 10_101_010]);
        assert_eq!(p.sample[0].location_id, p.sample[1].location_id);
        assert_eq!(p.location[2].mapping_id, 0);
        assert_eq!(p.time_nanos, 1_700_000_000_000_000_000);
        assert_eq!(p.duration_nanos, 10_000_000_000);

        // Round trip through the encoding.
        let gz = encode_gzip(&p);
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).unwrap();
        assert_eq!(protos::Profile::decode(&raw[..]).unwrap(), p);
    }

    #[test]
    fn main_binary_first_kernel_last() {
        let m = |name: &str| {
            Arc::new(Mapping {
                filename: name.into(),
                build_id: String::new(),
                memory_start: 0,
                memory_limit: 0,
                file_offset: 0,
            })
        };
        let loc = |mapping: &Arc<Mapping>, address| {
            Arc::new(Location {
                mapping: Some(mapping.clone()),
                address,
                frames: vec![frame("f", None)],
            })
        };
        let (kernel, libc, exe) = (m(KERNEL_MAPPING), m("/lib/libc.so.6"), m("/bin/app"));
        let mut b = ProfileBuilder::new(meta());
        b.set_main_binary("/bin/app");
        b.add_sample(&[loc(&kernel, 1), loc(&libc, 2), loc(&exe, 3)], 1, &[]);
        let p = b.build();
        validate(&p).unwrap();
        let names: Vec<_> = p
            .mapping
            .iter()
            .map(|m| (m.id, p.string_table[m.filename as usize].as_str()))
            .collect();
        assert_eq!(
            names,
            [(1, "/bin/app"), (2, "/lib/libc.so.6"), (3, KERNEL_MAPPING)]
        );
        let by_address: Vec<_> = p
            .location
            .iter()
            .map(|l| (l.address, l.mapping_id))
            .collect();
        assert_eq!(by_address, [(1, 3), (2, 2), (3, 1)]);
    }

    #[test]
    fn validate_catches_broken_profiles() {
        let mut b = ProfileBuilder::new(meta());
        let l = Arc::new(Location {
            mapping: None,
            address: 1,
            frames: vec![frame("f", None)],
        });
        b.add_sample(&[l], 1, &[]);
        let good = b.build();
        validate(&good).unwrap();

        let mut p = good.clone();
        p.sample[0].value.pop();
        assert!(validate(&p).unwrap_err().contains("values"));
        let mut p = good.clone();
        p.location[0].line[0].function_id = 99;
        assert!(validate(&p).unwrap_err().contains("missing function"));
        let mut p = good.clone();
        p.function[0].id = 0;
        assert!(validate(&p).is_err());
        let mut p = good;
        p.sample[0].location_id.push(7);
        assert!(validate(&p).unwrap_err().contains("missing location"));
    }
}
