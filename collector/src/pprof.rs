//! pprof in the collector: decode and validate what clients send, merge many
//! profiles into one, and derive flame-graph stacks and top functions.
//! Pure functions on bytes and structs: unit-tested and fuzzed without a
//! network.
use std::{collections::HashSet, io::Read as _};

// foldhash: several times faster than SipHash on these small keys, seeded per
// map (not the fixed-seed FxHash), so crafted inputs cannot pick collisions.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

fn map<K, V>(capacity: usize) -> HashMap<K, V> {
    HashMap::with_capacity_and_hasher(capacity, foldhash::fast::RandomState::default())
}

/// Which ids exist: a bitmap when they are dense (the usual 1..=n), else a set.
enum Ids {
    Dense(Vec<bool>),
    Sparse(std::collections::HashSet<u64, foldhash::fast::RandomState>),
}

impl Ids {
    /// `None` when an id is zero or duplicated.
    fn new(ids: impl ExactSizeIterator<Item = u64> + Clone) -> Option<Self> {
        let n = ids.len();
        let max = ids.clone().max().unwrap_or(0);
        if max <= (n as u64).saturating_mul(4).max(64) {
            let mut seen = vec![false; max as usize + 1];
            for id in ids {
                if id == 0 || std::mem::replace(&mut seen[id as usize], true) {
                    return None;
                }
            }
            Some(Self::Dense(seen))
        } else {
            let mut seen = std::collections::HashSet::with_capacity_and_hasher(
                n,
                foldhash::fast::RandomState::default(),
            );
            for id in ids {
                if id == 0 || !seen.insert(id) {
                    return None;
                }
            }
            Some(Self::Sparse(seen))
        }
    }

    fn contains(&self, id: u64) -> bool {
        match self {
            Self::Dense(v) => usize::try_from(id)
                .ok()
                .and_then(|i| v.get(i))
                .copied()
                .unwrap_or(false),
            Self::Sparse(s) => s.contains(&id),
        }
    }
}

use flate2::read::GzDecoder;
use prost::Message as _;

use crate::proto::pprof::{Function, Label, Line, Location, Mapping, Profile, Sample, ValueType};

/// Largest decompressed profile accepted.
pub const MAX_DECODED_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PprofError {
    #[error("gzip: {0}")]
    Gzip(String),
    #[error("profile larger than {MAX_DECODED_BYTES} bytes when decompressed")]
    TooLarge,
    #[error("not a pprof protobuf: {0}")]
    Decode(String),
    #[error("invalid pprof: {0}")]
    Invalid(String),
    #[error("sample types differ: {0} vs {1}")]
    SampleTypes(String, String),
}

/// Decodes a pprof profile, gzipped or not, and validates it.
pub fn decode(bytes: &[u8]) -> Result<Profile, PprofError> {
    let profile = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(bytes)
            .take(MAX_DECODED_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| PprofError::Gzip(e.to_string()))?;
        if out.len() as u64 > MAX_DECODED_BYTES {
            return Err(PprofError::TooLarge);
        }
        Profile::decode(out.as_slice())
    } else {
        if bytes.len() as u64 > MAX_DECODED_BYTES {
            return Err(PprofError::TooLarge);
        }
        Profile::decode(bytes)
    }
    .map_err(|e| PprofError::Decode(e.to_string()))?;
    validate(&profile)?;
    Ok(profile)
}

pub fn encode(profile: &Profile) -> Vec<u8> {
    profile.encode_to_vec()
}

pub fn encode_gzip(profile: &Profile) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(&profile.encode_to_vec());
    enc.finish().unwrap_or_default()
}

/// The rules `go tool pprof` enforces, plus string indices in range (so that
/// every later lookup is safe).
pub fn validate(p: &Profile) -> Result<(), PprofError> {
    let bad = |m: String| Err(PprofError::Invalid(m));
    let strings = p.string_table.len() as i64;
    if strings == 0 || !p.string_table[0].is_empty() {
        return bad("string_table[0] must be the empty string".into());
    }
    let s_ok = |i: i64| (0..strings).contains(&i);
    if p.sample_type.is_empty() {
        return bad("no sample_type".into());
    }
    for vt in p.sample_type.iter().chain(p.period_type.iter()) {
        if !s_ok(vt.r#type) || !s_ok(vt.unit) {
            return bad("value type string index out of range".into());
        }
    }
    if p.comment.iter().any(|&c| !s_ok(c))
        || !s_ok(p.drop_frames)
        || !s_ok(p.keep_frames)
        || !s_ok(p.default_sample_type)
    {
        return bad("string index out of range".into());
    }
    let Some(mappings) = Ids::new(p.mapping.iter().map(|m| m.id)) else {
        return bad("a mapping id is zero or duplicated".into());
    };
    if let Some(m) = p
        .mapping
        .iter()
        .find(|m| !s_ok(m.filename) || !s_ok(m.build_id))
    {
        return bad(format!("mapping {}: string index out of range", m.id));
    }
    let Some(functions) = Ids::new(p.function.iter().map(|f| f.id)) else {
        return bad("a function id is zero or duplicated".into());
    };
    if let Some(f) = p
        .function
        .iter()
        .find(|f| !s_ok(f.name) || !s_ok(f.system_name) || !s_ok(f.filename))
    {
        return bad(format!("function {}: string index out of range", f.id));
    }
    let Some(locations) = Ids::new(p.location.iter().map(|l| l.id)) else {
        return bad("a location id is zero or duplicated".into());
    };
    for l in &p.location {
        if l.mapping_id != 0 && !mappings.contains(l.mapping_id) {
            return bad(format!(
                "location {}: mapping {} does not exist",
                l.id, l.mapping_id
            ));
        }
        for line in &l.line {
            if !functions.contains(line.function_id) {
                return bad(format!(
                    "location {}: function {} does not exist",
                    l.id, line.function_id
                ));
            }
        }
    }
    for (i, s) in p.sample.iter().enumerate() {
        if s.value.len() != p.sample_type.len() {
            return bad(format!(
                "sample {i} has {} values for {} sample types",
                s.value.len(),
                p.sample_type.len()
            ));
        }
        if let Some(id) = s.location_id.iter().find(|&&id| !locations.contains(id)) {
            return bad(format!("sample {i}: location {id} does not exist"));
        }
        for l in &s.label {
            if !s_ok(l.key) || !s_ok(l.str) || !s_ok(l.num_unit) {
                return bad(format!("sample {i}: label string index out of range"));
            }
        }
    }
    Ok(())
}

fn string(p: &Profile, i: i64) -> &str {
    usize::try_from(i)
        .ok()
        .and_then(|i| p.string_table.get(i))
        .map_or("", String::as_str)
}

/// `type/unit,type/unit…`: what must agree for two profiles to merge.
pub fn sample_types_signature(p: &Profile) -> String {
    p.sample_type
        .iter()
        .map(|vt| format!("{}/{}", string(p, vt.r#type), string(p, vt.unit)))
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Hash, PartialEq, Eq)]
struct MappingKey {
    start: u64,
    limit: u64,
    offset: u64,
    filename: i64,
    build_id: i64,
}

#[derive(Hash, PartialEq, Eq)]
struct LocationKey {
    mapping: u64,
    address: u64,
    lines: Vec<Line>,
    folded: bool,
}

#[derive(Hash, PartialEq, Eq)]
struct FunctionKey {
    name: i64,
    system_name: i64,
    filename: i64,
    start_line: i64,
}

/// Merges profiles with the same sample types into one: equal mappings,
/// functions and locations (by content) are shared, samples with the same
/// stack and labels are summed.
#[derive(Default)]
pub struct Merger {
    out: Profile,
    signature: Option<String>,
    strings: HashMap<String, i64>,
    mappings: HashMap<MappingKey, u64>,
    functions: HashMap<FunctionKey, u64>,
    locations: HashMap<LocationKey, u64>,
    samples: HashMap<(Vec<u64>, Vec<Label>), usize>,
    comments: HashMap<i64, ()>,
    /// Latest `time_nanos + duration_nanos` of the inputs.
    end_nanos: Option<i64>,
    inputs: u64,
}

/// Comments kept in a merged profile.
const MAX_COMMENTS: usize = 64;

impl Merger {
    pub fn new() -> Self {
        let mut m = Self::default();
        m.intern("");
        m
    }

    fn intern(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.out.string_table.len() as i64;
        self.out.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    pub fn inputs(&self) -> u64 {
        self.inputs
    }

    /// Adds a validated profile. Fails (and adds nothing) when its sample
    /// types differ from the profiles already merged.
    pub fn add(&mut self, p: &Profile) -> Result<(), PprofError> {
        let sig = sample_types_signature(p);
        match &self.signature {
            Some(existing) if *existing != sig => {
                return Err(PprofError::SampleTypes(existing.clone(), sig));
            }
            Some(_) => {}
            None => {
                self.signature = Some(sig);
                let vts: Vec<ValueType> = p
                    .sample_type
                    .iter()
                    .map(|vt| ValueType {
                        r#type: self.intern(string(p, vt.r#type)),
                        unit: self.intern(string(p, vt.unit)),
                    })
                    .collect();
                self.out.sample_type = vts;
                self.out.period_type = p.period_type.map(|vt| ValueType {
                    r#type: self.intern(string(p, vt.r#type)),
                    unit: self.intern(string(p, vt.unit)),
                });
                self.out.period = p.period;
                self.out.default_sample_type = self.intern(string(p, p.default_sample_type));
                self.out.drop_frames = self.intern(string(p, p.drop_frames));
                self.out.keep_frames = self.intern(string(p, p.keep_frames));
                self.out.time_nanos = p.time_nanos;
            }
        }
        self.inputs += 1;
        if p.time_nanos != 0 && (self.out.time_nanos == 0 || p.time_nanos < self.out.time_nanos) {
            self.out.time_nanos = p.time_nanos;
        }
        let end = p.time_nanos.saturating_add(p.duration_nanos);
        self.end_nanos = Some(self.end_nanos.map_or(end, |e| e.max(end)));
        for &c in &p.comment {
            if self.comments.len() < MAX_COMMENTS {
                let c = self.intern(string(p, c));
                if self.comments.insert(c, ()).is_none() {
                    self.out.comment.push(c);
                }
            }
        }

        let mut mapping_ids = map(p.mapping.len());
        for m in &p.mapping {
            let key = MappingKey {
                start: m.memory_start,
                limit: m.memory_limit,
                offset: m.file_offset,
                filename: self.intern(string(p, m.filename)),
                build_id: self.intern(string(p, m.build_id)),
            };
            let next = self.out.mapping.len() as u64 + 1;
            let id = *self.mappings.entry(key).or_insert_with(|| {
                self.out.mapping.push(Mapping {
                    id: next,
                    memory_start: m.memory_start,
                    memory_limit: m.memory_limit,
                    file_offset: m.file_offset,
                    filename: 0,
                    build_id: 0,
                    has_functions: m.has_functions,
                    has_filenames: m.has_filenames,
                    has_line_numbers: m.has_line_numbers,
                    has_inline_frames: m.has_inline_frames,
                });
                next
            });
            let out = &mut self.out.mapping[id as usize - 1];
            if id == next {
                out.filename = self.strings[string(p, m.filename)];
                out.build_id = self.strings[string(p, m.build_id)];
            }
            out.has_functions |= m.has_functions;
            out.has_filenames |= m.has_filenames;
            out.has_line_numbers |= m.has_line_numbers;
            out.has_inline_frames |= m.has_inline_frames;
            mapping_ids.insert(m.id, id);
        }

        let mut function_ids = map(p.function.len());
        for f in &p.function {
            let key = FunctionKey {
                name: self.intern(string(p, f.name)),
                system_name: self.intern(string(p, f.system_name)),
                filename: self.intern(string(p, f.filename)),
                start_line: f.start_line,
            };
            let next = self.out.function.len() as u64 + 1;
            let new = Function {
                id: next,
                name: key.name,
                system_name: key.system_name,
                filename: key.filename,
                start_line: key.start_line,
            };
            let id = *self.functions.entry(key).or_insert_with(|| {
                self.out.function.push(new);
                next
            });
            function_ids.insert(f.id, id);
        }

        let mut location_ids = map(p.location.len());
        for l in &p.location {
            let lines: Vec<Line> = l
                .line
                .iter()
                .map(|line| Line {
                    function_id: function_ids.get(&line.function_id).copied().unwrap_or(0),
                    line: line.line,
                    column: line.column,
                })
                .collect();
            let mapping = if l.mapping_id == 0 {
                0
            } else {
                mapping_ids.get(&l.mapping_id).copied().unwrap_or(0)
            };
            let key = LocationKey {
                mapping,
                address: l.address,
                lines,
                folded: l.is_folded,
            };
            let next = self.out.location.len() as u64 + 1;
            let id = match self.locations.get(&key) {
                Some(&id) => id,
                None => {
                    self.out.location.push(Location {
                        id: next,
                        mapping_id: key.mapping,
                        address: key.address,
                        line: key.lines.clone(),
                        is_folded: key.folded,
                    });
                    self.locations.insert(key, next);
                    next
                }
            };
            location_ids.insert(l.id, id);
        }

        for s in &p.sample {
            let locs: Vec<u64> = s
                .location_id
                .iter()
                .map(|id| location_ids.get(id).copied().unwrap_or(0))
                .collect();
            let labels: Vec<Label> = s
                .label
                .iter()
                .map(|l| Label {
                    key: self.intern(string(p, l.key)),
                    str: self.intern(string(p, l.str)),
                    num: l.num,
                    num_unit: self.intern(string(p, l.num_unit)),
                })
                .collect();
            match self.samples.get(&(locs.clone(), labels.clone())) {
                Some(&i) => {
                    for (acc, v) in self.out.sample[i].value.iter_mut().zip(&s.value) {
                        *acc = acc.saturating_add(*v);
                    }
                }
                None => {
                    self.samples
                        .insert((locs.clone(), labels.clone()), self.out.sample.len());
                    self.out.sample.push(Sample {
                        location_id: locs,
                        value: s.value.clone(),
                        label: labels,
                    });
                }
            }
        }
        Ok(())
    }

    /// The merged profile; `None` when nothing was added.
    pub fn finish(mut self) -> Option<Profile> {
        self.signature.as_ref()?;
        // Times come from clients: any int64, so the span may not fit.
        if let Some(end) = self.end_nanos
            && end > self.out.time_nanos
        {
            self.out.duration_nanos = end.saturating_sub(self.out.time_nanos);
        }
        Some(self.out)
    }
}

/// Merges profiles that share sample types; `None` for an empty list.
pub fn merge<'a>(
    profiles: impl IntoIterator<Item = &'a Profile>,
) -> Result<Option<Profile>, PprofError> {
    let mut m = Merger::new();
    for p in profiles {
        m.add(p)?;
    }
    Ok(m.finish())
}

/// The index of the sample type named `ty` (e.g. `cpu`), else the profile's
/// default sample type, else the last one (pprof's rule).
pub fn sample_index(p: &Profile, ty: Option<&str>) -> usize {
    let find = |name: &str| {
        p.sample_type
            .iter()
            .position(|vt| string(p, vt.r#type) == name)
    };
    ty.and_then(find)
        .or_else(|| {
            let d = string(p, p.default_sample_type);
            if d.is_empty() { None } else { find(d) }
        })
        .unwrap_or(p.sample_type.len().saturating_sub(1))
}

/// Most frames of one stack in folded stacks and top functions (Pyroscope
/// truncates at 1000 by default). Beyond it the frames nearest the root are
/// replaced by [`TRUNCATED_FRAME`]. Without a bound, a sample that repeats a
/// location with many inline lines would expand quadratically in the size
/// of the profile.
pub const MAX_STACK_FRAMES: usize = 1024;
/// The root frame of a truncated stack.
pub const TRUNCATED_FRAME: &str = "[truncated]";

/// The frames of a sample from the root to the leaf, inline frames expanded
/// (pprof stores leaf first, and innermost-first lines within a location),
/// at most [`MAX_STACK_FRAMES`]: the leaf side is kept.
fn frames_root_first<'p>(
    p: &'p Profile,
    index: &HashMap<u64, &'p Location>,
    fns: &HashMap<u64, &'p Function>,
    s: &Sample,
) -> Vec<&'p str> {
    // One frame more than the bound tells that the stack was cut.
    let cap = MAX_STACK_FRAMES + 1;
    let mut leaf_first = Vec::with_capacity(s.location_id.len().min(cap));
    for id in &s.location_id {
        if leaf_first.len() >= cap {
            break;
        }
        let Some(loc) = index.get(id) else { continue };
        if loc.line.is_empty() {
            leaf_first.push("[unknown]");
            continue;
        }
        for line in loc.line.iter().take(cap - leaf_first.len()) {
            let name = fns
                .get(&line.function_id)
                .map_or("[unknown]", |f| string(p, f.name));
            leaf_first.push(if name.is_empty() { "[unknown]" } else { name });
        }
    }
    if leaf_first.len() > MAX_STACK_FRAMES {
        leaf_first.truncate(MAX_STACK_FRAMES);
        leaf_first[MAX_STACK_FRAMES - 1] = TRUNCATED_FRAME;
    }
    leaf_first.reverse();
    leaf_first
}

fn indexes(p: &Profile) -> (HashMap<u64, &Location>, HashMap<u64, &Function>) {
    (
        p.location.iter().map(|l| (l.id, l)).collect(),
        p.function.iter().map(|f| (f.id, f)).collect(),
    )
}

/// Folded stacks (`root;…;leaf value`, the input of flame graph tools), equal
/// stacks summed, zero values left out, sorted.
pub fn folded(p: &Profile, sample_index: usize) -> Vec<(String, i64)> {
    let (locs, fns) = indexes(p);
    let mut acc: HashMap<String, i64> = map(0);
    for s in &p.sample {
        let v = s.value.get(sample_index).copied().unwrap_or(0);
        if v == 0 {
            continue;
        }
        let stack = frames_root_first(p, &locs, &fns, s)
            .iter()
            .map(|f| f.replace(';', ":"))
            .collect::<Vec<_>>()
            .join(";");
        let e = acc.entry(stack).or_default();
        *e = e.saturating_add(v);
    }
    let mut out: Vec<_> = acc.into_iter().collect();
    out.sort();
    out
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TopEntry {
    pub name: String,
    /// Value where the function is the leaf.
    pub flat: i64,
    /// Value of samples the function is on (counted once per sample).
    pub cum: i64,
}

/// Functions by flat value descending, then by name, then by cumulative
/// value descending: the order of `go tool pprof -top` (its
/// `FlatNameOrder`), so that ties list the same way in both.
pub fn top(p: &Profile, sample_index: usize) -> (Vec<TopEntry>, i64) {
    let (locs, fns) = indexes(p);
    let mut flat: HashMap<&str, i64> = map(0);
    let mut cum: HashMap<&str, i64> = map(0);
    let mut total = 0i64;
    for s in &p.sample {
        let v = s.value.get(sample_index).copied().unwrap_or(0);
        if v == 0 {
            continue;
        }
        total = total.saturating_add(v);
        let frames = frames_root_first(p, &locs, &fns, s);
        if let Some(leaf) = frames.last() {
            let e = flat.entry(leaf).or_default();
            *e = e.saturating_add(v);
        }
        let mut seen: std::collections::HashSet<&str, foldhash::fast::RandomState> =
            std::collections::HashSet::with_capacity_and_hasher(
                frames.len(),
                foldhash::fast::RandomState::default(),
            );
        for f in frames {
            if seen.insert(f) {
                let e = cum.entry(f).or_default();
                *e = e.saturating_add(v);
            }
        }
    }
    let mut out: Vec<TopEntry> = cum
        .into_iter()
        .map(|(name, cum)| TopEntry {
            name: name.to_string(),
            flat: flat.get(name).copied().unwrap_or(0),
            cum,
        })
        .collect();
    out.sort_by(|a, b| {
        b.flat
            .cmp(&a.flat)
            .then_with(|| a.name.cmp(&b.name))
            .then(b.cum.cmp(&a.cum))
    });
    (out, total)
}

/// The profile with only its sample type `index` (samples of value 0 left
/// out), so that profiles whose sample types differ but share this one merge.
pub fn project(p: &Profile, index: usize) -> Profile {
    let mut out = Profile {
        sample: p
            .sample
            .iter()
            .filter_map(|s| {
                let v = s.value.get(index).copied().unwrap_or(0);
                (v != 0).then(|| Sample {
                    location_id: s.location_id.clone(),
                    value: vec![v],
                    label: s.label.clone(),
                })
            })
            .collect(),
        ..p.clone()
    };
    out.sample_type = p.sample_type.get(index).copied().into_iter().collect();
    out.default_sample_type = out.sample_type.first().map_or(0, |vt| vt.r#type);
    out
}

/// Keeps the samples that have the string label `key` with one of
/// `values` (compared case-insensitively, as hexadecimal span ids are).
pub fn retain_labelled(p: &mut Profile, key: &str, values: &[String]) {
    let wanted: HashSet<String> = values.iter().map(|v| v.to_ascii_lowercase()).collect();
    retain_any_labelled(p, &[(key, &wanted)]);
}

/// Keeps the samples that have, for any `(key, values)` of `wanted`, the
/// string label `key` with a value in `values` (lowercase; sample values are
/// compared case-insensitively). E.g. `span_id` in a trace's span ids, or
/// `trace_id` that trace's id.
pub fn retain_any_labelled(p: &mut Profile, wanted: &[(&str, &HashSet<String>)]) {
    let keys: Vec<(i64, &HashSet<String>)> = wanted
        .iter()
        .filter_map(|(k, v)| {
            p.string_table
                .iter()
                .position(|s| s == k)
                .map(|i| (i as i64, *v))
        })
        .collect();
    if keys.is_empty() {
        p.sample.clear();
        return;
    }
    let table = &p.string_table;
    p.sample.retain(|s| {
        s.label.iter().any(|l| {
            keys.iter().any(|(key, values)| {
                l.key == *key
                    && usize::try_from(l.str)
                        .ok()
                        .and_then(|i| table.get(i))
                        .is_some_and(|v| values.contains(&v.to_ascii_lowercase()))
            })
        })
    });
}

/// Removes the label `key` from every sample.
pub fn drop_label(p: &mut Profile, key: &str) {
    let Some(key) = p.string_table.iter().position(|s| s == key) else {
        return;
    };
    for s in &mut p.sample {
        s.label.retain(|l| l.key != key as i64);
    }
}

/// The string value of a sample's label `key` (its index in the string
/// table given as `key`), if it has one.
pub fn label_str<'a>(p: &'a Profile, s: &Sample, key: i64) -> Option<&'a str> {
    s.label
        .iter()
        .find(|l| l.key == key && l.str != 0)
        .and_then(|l| usize::try_from(l.str).ok())
        .and_then(|i| p.string_table.get(i))
        .map(String::as_str)
}

/// Adds string labels to every sample (e.g. the series labels that tell
/// merged series apart, for `go tool pprof -tagfocus`); a key a sample
/// already has is left as it is.
pub fn add_labels(p: &mut Profile, labels: &[(String, String)]) {
    if labels.is_empty() {
        return;
    }
    let mut index: HashMap<String, i64> = map(p.string_table.len());
    for (i, s) in p.string_table.iter().enumerate() {
        index.entry(s.clone()).or_insert(i as i64);
    }
    let mut intern = |p: &mut Profile, s: &str| -> i64 {
        if let Some(&i) = index.get(s) {
            return i;
        }
        let i = p.string_table.len() as i64;
        p.string_table.push(s.to_string());
        index.insert(s.to_string(), i);
        i
    };
    let ids: Vec<(i64, i64)> = labels
        .iter()
        .map(|(k, v)| (intern(p, k), intern(p, v)))
        .collect();
    for s in &mut p.sample {
        for &(key, str) in &ids {
            if !s.label.iter().any(|l| l.key == key) {
                s.label.push(Label {
                    key,
                    str,
                    num: 0,
                    num_unit: 0,
                });
            }
        }
    }
}

/// Builds a profile of one sample type from folded stacks (`root;…;leaf`
/// and a value), as Pyroscope's legacy `/ingest` does for the collapsed
/// format: one function and location per distinct frame name, no mappings.
pub fn from_folded(
    stacks: &[(String, i64)],
    sample_type: (&str, &str),
    period: Option<((&str, &str), i64)>,
    time_nanos: i64,
    duration_nanos: i64,
) -> Profile {
    let mut p = Profile {
        string_table: vec![String::new()],
        time_nanos,
        duration_nanos,
        ..Profile::default()
    };
    let mut strings: HashMap<String, i64> = map(64);
    let mut intern = |p: &mut Profile, s: &str| -> i64 {
        if let Some(&i) = strings.get(s) {
            return i;
        }
        let i = p.string_table.len() as i64;
        p.string_table.push(s.to_string());
        strings.insert(s.to_string(), i);
        i
    };
    p.sample_type = vec![ValueType {
        r#type: intern(&mut p, sample_type.0),
        unit: intern(&mut p, sample_type.1),
    }];
    if let Some(((ty, unit), period)) = period {
        p.period_type = Some(ValueType {
            r#type: intern(&mut p, ty),
            unit: intern(&mut p, unit),
        });
        p.period = period;
    }
    let mut locations: HashMap<String, u64> = map(256);
    let mut samples: HashMap<Vec<u64>, usize> = map(stacks.len());
    for (stack, value) in stacks {
        let mut ids: Vec<u64> = Vec::new();
        for frame in stack.split(';').filter(|f| !f.is_empty()) {
            let id = match locations.get(frame) {
                Some(&id) => id,
                None => {
                    let id = p.location.len() as u64 + 1;
                    let name = intern(&mut p, frame);
                    p.function.push(Function {
                        id,
                        name,
                        system_name: name,
                        filename: 0,
                        start_line: 0,
                    });
                    p.location.push(Location {
                        id,
                        mapping_id: 0,
                        address: 0,
                        line: vec![Line {
                            function_id: id,
                            line: 0,
                            column: 0,
                        }],
                        is_folded: false,
                    });
                    locations.insert(frame.to_string(), id);
                    id
                }
            };
            ids.push(id);
        }
        if ids.is_empty() || *value == 0 {
            continue;
        }
        ids.reverse(); // pprof: leaf first
        match samples.get(&ids) {
            Some(&i) => {
                let v = &mut p.sample[i].value[0];
                *v = v.saturating_add(*value);
            }
            None => {
                samples.insert(ids.clone(), p.sample.len());
                p.sample.push(Sample {
                    location_id: ids,
                    value: vec![*value],
                    label: Vec::new(),
                });
            }
        }
    }
    p
}

/// Pyroscope's flame graph of one sample type (`querier.v1.FlameGraph`):
/// one level per depth, each node `[x offset delta, total, self, name
/// index]`, children ordered by name and placed after their parent's self
/// value, nodes below the `max_nodes` largest totals folded into `other`
/// (as `model.NewFlameGraph` does; `max_nodes <= 0`: no bound).
pub fn flamegraph(p: &Profile, sample_index: usize, max_nodes: i64) -> FlameGraphData {
    struct Node<'a> {
        name: &'a str,
        total: i64,
        self_: i64,
        children: std::collections::BTreeMap<&'a str, usize>,
    }
    let (locs, fns) = indexes(p);
    let mut nodes: Vec<Node<'_>> = vec![Node {
        name: "total",
        total: 0,
        self_: 0,
        children: std::collections::BTreeMap::new(),
    }];
    for s in &p.sample {
        let v = s.value.get(sample_index).copied().unwrap_or(0);
        if v == 0 {
            continue;
        }
        let mut cur = 0usize;
        nodes[0].total = nodes[0].total.saturating_add(v);
        for f in frames_root_first(p, &locs, &fns, s) {
            let next = match nodes[cur].children.get(f) {
                Some(&n) => n,
                None => {
                    nodes.push(Node {
                        name: f,
                        total: 0,
                        self_: 0,
                        children: std::collections::BTreeMap::new(),
                    });
                    let n = nodes.len() - 1;
                    nodes[cur].children.insert(f, n);
                    n
                }
            };
            nodes[next].total = nodes[next].total.saturating_add(v);
            cur = next;
        }
        nodes[cur].self_ = nodes[cur].self_.saturating_add(v);
    }
    // The smallest total that still gets its own node.
    let min_value = {
        let bound = usize::try_from(max_nodes).unwrap_or(0);
        if bound == 0 || nodes.len() - 1 <= bound {
            0
        } else {
            let mut totals: Vec<i64> = nodes[1..].iter().map(|n| n.total).collect();
            totals.sort_unstable_by(|a, b| b.cmp(a));
            totals[bound - 1]
        }
    };
    // Depth first, the last child first (Pyroscope's order: names are
    // numbered in this order); each level is reversed at the end.
    enum Item {
        Node(usize),
        Other(i64),
    }
    let mut names: Vec<String> = Vec::new();
    let mut name_index: HashMap<&str, i64> = map(nodes.len());
    let mut levels: Vec<Vec<[i64; 4]>> = Vec::new();
    let mut max_self = 0i64;
    let mut stack: Vec<(Item, usize, i64)> = vec![(Item::Node(0), 0, 0)];
    while let Some((item, level, x)) = stack.pop() {
        let (name, total, self_) = match &item {
            Item::Node(i) => (nodes[*i].name, nodes[*i].total, nodes[*i].self_),
            Item::Other(v) => ("other", *v, *v),
        };
        max_self = max_self.max(self_);
        let idx = *name_index.entry(name).or_insert_with(|| {
            names.push(name.to_string());
            names.len() as i64 - 1
        });
        if levels.len() == level {
            levels.push(Vec::new());
        }
        levels[level].push([x, total, self_, idx]);
        let Item::Node(i) = item else { continue };
        let mut child_x = x.saturating_add(self_);
        let mut other = 0i64;
        for &c in nodes[i].children.values() {
            if nodes[c].total >= min_value && nodes[c].name != "other" {
                stack.push((Item::Node(c), level + 1, child_x));
                child_x = child_x.saturating_add(nodes[c].total);
            } else {
                other = other.saturating_add(nodes[c].total);
            }
        }
        if other != 0 {
            stack.push((Item::Other(other), level + 1, child_x));
        }
    }
    let levels = levels
        .into_iter()
        .map(|mut l| {
            l.reverse();
            let mut prev_end = 0i64;
            l.into_iter()
                .flat_map(|[x, total, self_, name]| {
                    let delta = x - prev_end;
                    prev_end = x + total;
                    [delta, total, self_, name]
                })
                .collect()
        })
        .collect();
    FlameGraphData {
        names,
        levels,
        total: nodes[0].total,
        max_self,
    }
}

/// See [`flamegraph`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlameGraphData {
    pub names: Vec<String>,
    pub levels: Vec<Vec<i64>>,
    pub total: i64,
    pub max_self: i64,
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    /// A tiny CPU profile: stacks given root-first as function names, each
    /// location one function; `pid` as a sample label.
    pub(crate) fn cpu_profile(stacks: &[(&[&str], i64)], pid: i64) -> Profile {
        let mut p = Profile {
            string_table: vec![
                "".into(),
                "samples".into(),
                "count".into(),
                "cpu".into(),
                "nanoseconds".into(),
                "pid".into(),
            ],
            ..Profile::default()
        };
        p.sample_type = vec![
            ValueType { r#type: 1, unit: 2 },
            ValueType { r#type: 3, unit: 4 },
        ];
        p.period_type = Some(ValueType { r#type: 3, unit: 4 });
        p.period = 10_000_000;
        p.time_nanos = 1_000;
        p.duration_nanos = 10;
        p.mapping.push(Mapping {
            id: 1,
            memory_start: 0x1000,
            memory_limit: 0x9000,
            filename: 0,
            ..Mapping::default()
        });
        let intern = |p: &mut Profile, s: &str| -> i64 {
            if let Some(i) = p.string_table.iter().position(|x| x == s) {
                return i as i64;
            }
            p.string_table.push(s.into());
            p.string_table.len() as i64 - 1
        };
        for (stack, count) in stacks {
            let mut ids = Vec::new();
            for name in stack.iter().rev() {
                let n = intern(&mut p, name);
                let fid = match p.function.iter().find(|f| f.name == n) {
                    Some(f) => f.id,
                    None => {
                        let id = p.function.len() as u64 + 1;
                        p.function.push(Function {
                            id,
                            name: n,
                            ..Function::default()
                        });
                        id
                    }
                };
                let lid = match p.location.iter().find(|l| l.line[0].function_id == fid) {
                    Some(l) => l.id,
                    None => {
                        let id = p.location.len() as u64 + 1;
                        p.location.push(Location {
                            id,
                            mapping_id: 1,
                            address: 0x1000 + id,
                            line: vec![Line {
                                function_id: fid,
                                line: 1,
                                column: 0,
                            }],
                            is_folded: false,
                        });
                        id
                    }
                };
                ids.push(lid);
            }
            p.sample.push(Sample {
                location_id: ids,
                value: vec![*count, count * 10_000_000],
                label: vec![Label {
                    key: 5,
                    num: pid,
                    ..Label::default()
                }],
            });
        }
        p
    }

    #[test]
    fn decode_accepts_gzip_and_plain_and_rejects_garbage() {
        let p = cpu_profile(&[(&["main", "work"], 3)], 1);
        assert_eq!(decode(&encode(&p)).unwrap(), p);
        assert_eq!(decode(&encode_gzip(&p)).unwrap(), p);
        assert!(matches!(
            decode(b"\x1f\x8bnot gzip"),
            Err(PprofError::Gzip(_))
        ));
        assert!(matches!(
            decode(b"\xff\xff\xff"),
            Err(PprofError::Decode(_))
        ));
        let mut bad = p.clone();
        bad.sample[0].value.pop();
        assert_eq!(
            decode(&encode(&bad)),
            Err(PprofError::Invalid(
                "sample 0 has 1 values for 2 sample types".into()
            ))
        );
        let mut bad = p.clone();
        bad.location[0].line[0].function_id = 99;
        assert!(
            matches!(decode(&encode(&bad)), Err(PprofError::Invalid(m)) if m.contains("function 99"))
        );
        let mut bad = p;
        bad.function[0].name = 1000;
        assert!(matches!(decode(&encode(&bad)), Err(PprofError::Invalid(_))));
    }

    #[test]
    fn decodes_go_runtime_profiles() {
        // Written by the Go runtime (runtime/pprof) in collector/fuzz/make-seeds.
        let gz = include_bytes!("../fuzz/corpus/pprof_decode/go-cpu.pb.gz");
        let plain = include_bytes!("../fuzz/corpus/pprof_decode/go-cpu.pb");
        let cpu = decode(gz).unwrap();
        assert_eq!(decode(plain).unwrap(), cpu);
        assert_eq!(
            sample_types_signature(&cpu),
            "samples/count,cpu/nanoseconds"
        );
        let (top, total) = top(&cpu, sample_index(&cpu, Some("cpu")));
        assert!(total > 0);
        assert!(top.iter().any(|t| t.name == "main.hash"), "{top:?}");
        let heap = decode(include_bytes!("../fuzz/corpus/pprof_decode/go-heap.pb.gz")).unwrap();
        assert_eq!(
            sample_types_signature(&heap),
            "alloc_objects/count,alloc_space/bytes,inuse_objects/count,inuse_space/bytes"
        );
    }

    #[test]
    fn merge_sums_equal_stacks_and_keeps_labels_apart() {
        let a = cpu_profile(&[(&["main", "work"], 3), (&["main", "idle"], 1)], 1);
        let b = cpu_profile(&[(&["main", "work"], 2)], 1);
        let c = cpu_profile(&[(&["main", "work"], 5)], 2);
        let m = merge([&a, &b, &c]).unwrap().unwrap();
        validate(&m).unwrap();
        let cpu = sample_index(&m, Some("cpu"));
        assert_eq!(cpu, 1);
        let f = folded(&m, 0);
        assert_eq!(
            f,
            vec![("main;idle".to_string(), 1), ("main;work".to_string(), 10)]
        );
        assert_eq!(m.sample.len(), 3, "pid 1 and pid 2 stay separate samples");
        assert_eq!(m.function.len(), 3);
        assert_eq!(m.location.len(), 3);
        let (top, total) = top(&m, 0);
        assert_eq!(total, 11);
        assert_eq!(
            top[0],
            TopEntry {
                name: "work".into(),
                flat: 10,
                cum: 10
            }
        );
        assert_eq!(top.iter().find(|t| t.name == "main").unwrap().cum, 11);
        assert_eq!(folded(&m, cpu)[1].1, 100_000_000);
    }

    #[test]
    fn top_breaks_ties_by_name_as_go_pprof_does() {
        // Equal flat values: the name decides, not the cumulative value
        // (`warm` is on more samples, `hot` still comes first), as in
        // `go tool pprof -top`.
        let p = cpu_profile(
            &[
                (&["main", "hot"], 5),
                (&["main", "warm"], 5),
                (&["main", "warm", "now"], 1),
                (&["main"], 0),
            ],
            1,
        );
        let (top, total) = top(&p, 0);
        assert_eq!(total, 11);
        let order: Vec<(&str, i64, i64)> = top
            .iter()
            .map(|t| (t.name.as_str(), t.flat, t.cum))
            .collect();
        assert_eq!(
            order,
            vec![
                ("hot", 5, 5),
                ("warm", 5, 6),
                ("now", 1, 1),
                ("main", 0, 11)
            ]
        );
    }

    #[test]
    fn merge_of_extreme_times_does_not_overflow() {
        // time_nanos and duration_nanos come from clients: int64 anywhere.
        let mut a = cpu_profile(&[(&["main"], 1)], 1);
        a.time_nanos = -10;
        a.duration_nanos = 0;
        let mut b = a.clone();
        b.time_nanos = 5;
        b.duration_nanos = i64::MAX;
        let m = merge([&a, &b]).unwrap().unwrap();
        assert_eq!((m.time_nanos, m.duration_nanos), (-10, i64::MAX));
        let mut c = a.clone();
        c.time_nanos = i64::MIN;
        let m = merge([&c, &c]).unwrap().unwrap();
        assert_eq!((m.time_nanos, m.duration_nanos), (i64::MIN, 0));
    }

    #[test]
    fn deep_stacks_are_cut_at_the_root() {
        // One location with 3000 inline frames, referenced 3000 times by one
        // sample: 9 million frames, a few tens of kilobytes of pprof.
        let mut p = cpu_profile(&[(&["main", "leaf"], 2)], 1);
        let leaf = p.sample[0].location_id[0];
        let loc = p.location.iter_mut().find(|l| l.id == leaf).unwrap();
        let line = loc.line[0].clone();
        loc.line = vec![line; 3000];
        p.sample[0].location_id = vec![leaf; 3000];
        let p = decode(&encode(&p)).unwrap();
        let f = folded(&p, 0);
        assert_eq!(f.len(), 1);
        let frames: Vec<&str> = f[0].0.split(';').collect();
        assert_eq!(frames.len(), MAX_STACK_FRAMES);
        assert_eq!(frames[0], TRUNCATED_FRAME);
        assert!(frames[1..].iter().all(|&f| f == "leaf"));
        let (top, total) = top(&p, 0);
        assert_eq!(total, 2);
        assert_eq!(
            top,
            vec![
                TopEntry {
                    name: "leaf".into(),
                    flat: 2,
                    cum: 2
                },
                TopEntry {
                    name: TRUNCATED_FRAME.into(),
                    flat: 0,
                    cum: 2
                }
            ]
        );
        // Exactly at the bound: nothing cut.
        let exact = cpu_profile(&[(&["main"], 1)], 1);
        let mut exact = exact;
        exact.location[0].line = vec![exact.location[0].line[0].clone(); MAX_STACK_FRAMES];
        assert!(!folded(&exact, 0)[0].0.contains(TRUNCATED_FRAME));
    }

    #[test]
    fn merge_refuses_other_sample_types() {
        let a = cpu_profile(&[(&["main"], 1)], 1);
        let mut b = a.clone();
        b.string_table[3] = "alloc_space".into();
        let mut m = Merger::new();
        m.add(&a).unwrap();
        assert!(matches!(m.add(&b), Err(PprofError::SampleTypes(_, _))));
        assert_eq!(m.inputs(), 1);
    }

    #[test]
    fn inline_frames_expand_root_first() {
        let mut p = cpu_profile(&[(&["main", "leaf"], 1)], 1);
        // Make the leaf location carry an inlined chain: inner (innermost) in leaf.
        p.string_table.push("inner".into());
        let n = p.string_table.len() as i64 - 1;
        p.function.push(Function {
            id: 9,
            name: n,
            ..Function::default()
        });
        let leaf_loc = p.sample[0].location_id[0];
        let loc = p.location.iter_mut().find(|l| l.id == leaf_loc).unwrap();
        loc.line.insert(
            0,
            Line {
                function_id: 9,
                line: 7,
                column: 0,
            },
        );
        validate(&p).unwrap();
        assert_eq!(folded(&p, 0), vec![("main;leaf;inner".to_string(), 1)]);
    }

    #[test]
    fn flamegraph_is_pyroscopes() {
        // The example of Pyroscope's model.Test_ExportToFlamebearer: stacks
        // a;b;e 1, a;c 2, a;c;d 1 (root first).
        let p = cpu_profile(
            &[
                (&["a", "b", "e"], 1),
                (&["a", "c"], 2),
                (&["a", "c", "d"], 1),
            ],
            1,
        );
        let fg = flamegraph(&p, 0, -1);
        assert_eq!(fg.names, ["total", "a", "c", "d", "b", "e"]);
        assert_eq!(
            fg.levels,
            [
                vec![0, 4, 0, 0],
                vec![0, 4, 0, 1],
                vec![0, 1, 0, 4, 0, 3, 2, 2],
                vec![0, 1, 1, 5, 2, 1, 1, 3],
            ]
        );
        assert_eq!((fg.total, fg.max_self), (4, 2));
        // Two nodes at most (a and c): b with its subtree, and d, become
        // "other" nodes.
        let fg = flamegraph(&p, 0, 2);
        assert_eq!(fg.names, ["total", "a", "other", "c"]);
        assert_eq!(
            fg.levels,
            [
                vec![0, 4, 0, 0],
                vec![0, 4, 0, 1],
                vec![0, 3, 2, 3, 0, 1, 1, 2],
                vec![2, 1, 1, 2],
            ]
        );
        // Ties at the bound are kept, as in Pyroscope.
        assert_eq!(flamegraph(&p, 0, 3), flamegraph(&p, 0, 0));
        assert_eq!(
            flamegraph(&Profile::default(), 0, 0).levels,
            [vec![0, 0, 0, 0]]
        );
    }

    #[test]
    fn projection_labels_and_folded_input() {
        let p = cpu_profile(&[(&["main", "work"], 3), (&["main", "idle"], 0)], 1);
        let one = project(&p, 1);
        assert_eq!(sample_types_signature(&one), "cpu/nanoseconds");
        assert_eq!(one.sample.len(), 1);
        validate(&one).unwrap();
        assert_eq!(folded(&one, 0), folded(&p, 1));

        let mut l = one.clone();
        add_labels(&mut l, &[("pod".into(), "api-1".into())]);
        validate(&l).unwrap();
        let s = &l.sample[0];
        assert!(
            s.label
                .iter()
                .any(|x| string(&l, x.key) == "pod" && string(&l, x.str) == "api-1")
        );

        let f = from_folded(
            &[
                ("main;work".into(), 3),
                ("main;idle".into(), 2),
                ("main;work".into(), 1),
            ],
            ("cpu", "nanoseconds"),
            Some((("cpu", "nanoseconds"), 10_000_000)),
            5,
            10,
        );
        validate(&f).unwrap();
        assert_eq!(
            folded(&f, 0),
            [("main;idle".to_string(), 2), ("main;work".to_string(), 4)]
        );
        assert_eq!(sample_types_signature(&f), "cpu/nanoseconds");
        assert_eq!(
            (f.time_nanos, f.duration_nanos, f.period),
            (5, 10, 10_000_000)
        );
    }
}
