//! Wire types that are not OTLP: pprof's `profile.proto` and Pyroscope's
//! `push.v1` (`PusherService/Push`). Hand-written prost messages with the tags
//! of the upstream `.proto` files (google/pprof `proto/profile.proto`,
//! grafana/pyroscope `api/push/v1/push.proto`, `api/types/v1/types.proto`), so
//! no `protoc` is needed to build.
//!
//! OTLP messages and services come from `opentelemetry-proto` (re-exported as
//! [`otlp`]).

pub use opentelemetry_proto::tonic as otlp;

/// google/pprof `proto/profile.proto`, package `perftools.profiles`.
pub mod pprof {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "7")]
        pub drop_frames: i64,
        #[prost(int64, tag = "8")]
        pub keep_frames: i64,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
        #[prost(bool, tag = "5")]
        pub is_folded: bool,
    }

    #[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
        #[prost(int64, tag = "3")]
        pub column: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

/// grafana/pyroscope `push.v1` and the `types.v1.LabelPair` it uses.
pub mod push {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushRequest {
        #[prost(message, repeated, tag = "1")]
        pub series: Vec<RawProfileSeries>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushResponse {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RawProfileSeries {
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<LabelPair>,
        #[prost(message, repeated, tag = "2")]
        pub samples: Vec<RawSample>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RawSample {
        /// pprof, gzipped or not.
        #[prost(bytes = "vec", tag = "1")]
        pub raw_profile: Vec<u8>,
        /// A UUID; lets the server drop a retried duplicate.
        /// `ID` in push.proto.
        #[prost(string, tag = "2")]
        pub id: String,
    }

    #[derive(
        Clone,
        PartialEq,
        Eq,
        Hash,
        PartialOrd,
        Ord,
        prost::Message,
        serde::Serialize,
        serde::Deserialize,
    )]
    pub struct LabelPair {
        #[prost(string, tag = "1")]
        #[serde(default)]
        pub name: String,
        #[prost(string, tag = "2")]
        #[serde(default)]
        pub value: String,
    }
}

/// protojson details the connect JSON encoding needs: 64-bit integers are
/// written as strings and read from strings or numbers; enums are read from
/// their names or numbers.
pub mod protojson {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrString {
        Int(i64),
        Float(f64),
        Str(String),
    }

    fn int(v: IntOrString) -> Result<i64, String> {
        match v {
            IntOrString::Int(i) => Ok(i),
            IntOrString::Float(f) if f.fract() == 0.0 => Ok(f as i64),
            IntOrString::Float(f) => Err(format!("{f} is not an integer")),
            IntOrString::Str(s) => s.parse().map_err(|_| format!("{s:?} is not an integer")),
        }
    }

    pub fn de_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        int(IntOrString::deserialize(d)?).map_err(D::Error::custom)
    }

    pub fn de_opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        Option::<IntOrString>::deserialize(d)?
            .map(int)
            .transpose()
            .map_err(D::Error::custom)
    }

    pub fn ser_i64<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn ser_vec_i64<S: Serializer>(v: &[i64], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|x| x.to_string()))
    }

    /// An enum by name (`names[i]` is value `i`) or number.
    pub fn de_enum<'de, D: Deserializer<'de>>(
        d: D,
        names: &[&str],
    ) -> Result<Option<i32>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum E {
            N(i32),
            S(String),
        }
        match Option::<E>::deserialize(d)? {
            None => Ok(None),
            Some(E::N(n)) => Ok(Some(n)),
            Some(E::S(s)) => names
                .iter()
                .position(|n| *n == s)
                .map(|i| Some(i as i32))
                .ok_or_else(|| D::Error::custom(format!("unknown enum value {s:?}"))),
        }
    }
}

/// grafana/pyroscope `querier.v1` (api/querier/v1/querier.proto) and the
/// `types.v1` messages it uses (api/types/v1/types.proto): what Grafana's
/// Pyroscope data source calls. Requests are read from binary protobuf or
/// protojson (camelCase or the proto's own field names), responses written
/// to either.
pub mod querier {
    use serde::{Deserialize, Serialize};

    use super::protojson::{de_enum, de_i64, de_opt_i64, ser_i64, ser_vec_i64};
    pub use super::push::LabelPair;

    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default)]
    pub struct ProfileTypesRequest {
        #[prost(int64, tag = "1")]
        #[serde(deserialize_with = "de_i64")]
        pub start: i64,
        #[prost(int64, tag = "2")]
        #[serde(deserialize_with = "de_i64")]
        pub end: i64,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ProfileTypesResponse {
        #[prost(message, repeated, tag = "1")]
        pub profile_types: Vec<ProfileType>,
    }

    /// `types.v1.ProfileType`; `ID` is `name:sample_type:sample_unit:period_type:period_unit`.
    #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ProfileType {
        #[prost(string, tag = "1")]
        #[serde(rename = "ID")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(string, tag = "4")]
        pub sample_type: String,
        #[prost(string, tag = "5")]
        pub sample_unit: String,
        #[prost(string, tag = "6")]
        pub period_type: String,
        #[prost(string, tag = "7")]
        pub period_unit: String,
    }

    /// `types.v1.LabelValuesRequest`.
    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default)]
    pub struct LabelValuesRequest {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, repeated, tag = "2")]
        pub matchers: Vec<String>,
        #[prost(int64, tag = "3")]
        #[serde(deserialize_with = "de_i64")]
        pub start: i64,
        #[prost(int64, tag = "4")]
        #[serde(deserialize_with = "de_i64")]
        pub end: i64,
    }

    /// `types.v1.LabelValuesResponse` and `types.v1.LabelNamesResponse`.
    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    pub struct NamesResponse {
        #[prost(string, repeated, tag = "1")]
        pub names: Vec<String>,
    }

    /// `types.v1.LabelNamesRequest`.
    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default)]
    pub struct LabelNamesRequest {
        #[prost(string, repeated, tag = "1")]
        pub matchers: Vec<String>,
        #[prost(int64, tag = "2")]
        #[serde(deserialize_with = "de_i64")]
        pub start: i64,
        #[prost(int64, tag = "3")]
        #[serde(deserialize_with = "de_i64")]
        pub end: i64,
    }

    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default)]
    pub struct SeriesRequest {
        #[prost(string, repeated, tag = "1")]
        pub matchers: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        #[serde(alias = "labelNames", alias = "label_names")]
        pub label_names: Vec<String>,
        #[prost(int64, tag = "3")]
        #[serde(deserialize_with = "de_i64")]
        pub start: i64,
        #[prost(int64, tag = "4")]
        #[serde(deserialize_with = "de_i64")]
        pub end: i64,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct SeriesResponse {
        #[prost(message, repeated, tag = "2")]
        pub labels_set: Vec<Labels>,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    pub struct Labels {
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<LabelPair>,
    }

    /// `ProfileFormat` names, by number.
    pub const PROFILE_FORMATS: &[&str] = &[
        "PROFILE_FORMAT_UNSPECIFIED",
        "PROFILE_FORMAT_FLAMEGRAPH",
        "PROFILE_FORMAT_TREE",
        "PROFILE_FORMAT_DOT",
        "PROFILE_FORMAT_PPROF",
    ];
    pub const FORMAT_UNSPECIFIED: i32 = 0;
    pub const FORMAT_FLAMEGRAPH: i32 = 1;

    fn de_format<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
        Ok(de_enum(d, PROFILE_FORMATS)?.unwrap_or(0))
    }

    /// `types.v1.TimeSeriesAggregationType` names, by number.
    pub const AGGREGATIONS: &[&str] = &[
        "TIME_SERIES_AGGREGATION_TYPE_SUM",
        "TIME_SERIES_AGGREGATION_TYPE_AVERAGE",
    ];
    pub const AGGREGATION_AVERAGE: i32 = 1;

    fn de_aggregation<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
        de_enum(d, AGGREGATIONS)
    }

    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default)]
    pub struct SelectMergeStacktracesRequest {
        #[prost(string, tag = "1")]
        #[serde(rename = "profileTypeID", alias = "profile_typeID")]
        pub profile_type_id: String,
        #[prost(string, tag = "2")]
        #[serde(rename = "labelSelector", alias = "label_selector")]
        pub label_selector: String,
        #[prost(int64, tag = "3")]
        #[serde(deserialize_with = "de_i64")]
        pub start: i64,
        #[prost(int64, tag = "4")]
        #[serde(deserialize_with = "de_i64")]
        pub end: i64,
        #[prost(int64, optional, tag = "5")]
        #[serde(
            rename = "maxNodes",
            alias = "max_nodes",
            deserialize_with = "de_opt_i64"
        )]
        pub max_nodes: Option<i64>,
        #[prost(int32, tag = "6")]
        #[serde(deserialize_with = "de_format")]
        pub format: i32,
    }

    /// `SelectMergeSpanProfile`: the samples whose `span_id` label is one of
    /// `span_selector` (Grafana's traces-to-profiles).
    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default)]
    pub struct SelectMergeSpanProfileRequest {
        #[prost(string, tag = "1")]
        #[serde(rename = "profileTypeID", alias = "profile_typeID")]
        pub profile_type_id: String,
        #[prost(string, tag = "2")]
        #[serde(rename = "labelSelector", alias = "label_selector")]
        pub label_selector: String,
        #[prost(string, repeated, tag = "3")]
        #[serde(rename = "spanSelector", alias = "span_selector")]
        pub span_selector: Vec<String>,
        #[prost(int64, tag = "4")]
        #[serde(deserialize_with = "de_i64")]
        pub start: i64,
        #[prost(int64, tag = "5")]
        #[serde(deserialize_with = "de_i64")]
        pub end: i64,
        #[prost(int64, optional, tag = "6")]
        #[serde(
            rename = "maxNodes",
            alias = "max_nodes",
            deserialize_with = "de_opt_i64"
        )]
        pub max_nodes: Option<i64>,
        #[prost(int32, tag = "7")]
        #[serde(deserialize_with = "de_format")]
        pub format: i32,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    pub struct SelectMergeStacktracesResponse {
        #[prost(message, optional, tag = "1")]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub flamegraph: Option<FlameGraph>,
    }

    /// Levels of `[x offset (delta to the previous node's end), total, self,
    /// name index]` quadruples, as Pyroscope's `model.NewFlameGraph` writes.
    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct FlameGraph {
        #[prost(string, repeated, tag = "1")]
        pub names: Vec<String>,
        #[prost(message, repeated, tag = "2")]
        pub levels: Vec<Level>,
        #[prost(int64, tag = "3")]
        #[serde(serialize_with = "ser_i64")]
        pub total: i64,
        #[prost(int64, tag = "4")]
        #[serde(serialize_with = "ser_i64")]
        pub max_self: i64,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    pub struct Level {
        #[prost(int64, repeated, tag = "1")]
        #[serde(serialize_with = "ser_vec_i64")]
        pub values: Vec<i64>,
    }

    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default)]
    pub struct SelectMergeProfileRequest {
        #[prost(string, tag = "1")]
        #[serde(rename = "profileTypeID", alias = "profile_typeID")]
        pub profile_type_id: String,
        #[prost(string, tag = "2")]
        #[serde(rename = "labelSelector", alias = "label_selector")]
        pub label_selector: String,
        #[prost(int64, tag = "3")]
        #[serde(deserialize_with = "de_i64")]
        pub start: i64,
        #[prost(int64, tag = "4")]
        #[serde(deserialize_with = "de_i64")]
        pub end: i64,
        #[prost(int64, optional, tag = "5")]
        #[serde(
            rename = "maxNodes",
            alias = "max_nodes",
            deserialize_with = "de_opt_i64"
        )]
        pub max_nodes: Option<i64>,
    }

    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default)]
    pub struct SelectSeriesRequest {
        #[prost(string, tag = "1")]
        #[serde(rename = "profileTypeID", alias = "profile_typeID")]
        pub profile_type_id: String,
        #[prost(string, tag = "2")]
        #[serde(rename = "labelSelector", alias = "label_selector")]
        pub label_selector: String,
        #[prost(int64, tag = "3")]
        #[serde(deserialize_with = "de_i64")]
        pub start: i64,
        #[prost(int64, tag = "4")]
        #[serde(deserialize_with = "de_i64")]
        pub end: i64,
        #[prost(string, repeated, tag = "5")]
        #[serde(rename = "groupBy", alias = "group_by")]
        pub group_by: Vec<String>,
        #[prost(double, tag = "6")]
        pub step: f64,
        #[prost(int32, optional, tag = "7")]
        #[serde(deserialize_with = "de_aggregation")]
        pub aggregation: Option<i32>,
        #[prost(int64, optional, tag = "9")]
        #[serde(deserialize_with = "de_opt_i64")]
        pub limit: Option<i64>,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    pub struct SelectSeriesResponse {
        #[prost(message, repeated, tag = "1")]
        pub series: Vec<Series>,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    pub struct Series {
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<LabelPair>,
        #[prost(message, repeated, tag = "2")]
        pub points: Vec<Point>,
    }

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    pub struct Point {
        #[prost(double, tag = "1")]
        pub value: f64,
        /// Unix milliseconds.
        #[prost(int64, tag = "2")]
        #[serde(serialize_with = "ser_i64")]
        pub timestamp: i64,
    }

    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    pub struct GetProfileStatsRequest {}

    #[derive(Clone, PartialEq, prost::Message, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct GetProfileStatsResponse {
        #[prost(bool, tag = "1")]
        pub data_ingested: bool,
        #[prost(int64, tag = "2")]
        #[serde(serialize_with = "ser_i64")]
        pub oldest_profile_time: i64,
        #[prost(int64, tag = "3")]
        #[serde(serialize_with = "ser_i64")]
        pub newest_profile_time: i64,
    }
}
