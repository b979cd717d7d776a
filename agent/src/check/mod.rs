//! `fathom-agent check`: what this kernel lets the agent do.
//!
//! Every program of the three eBPF objects is loaded the way the agent
//! loads it, in each configuration the agent uses (the pid filter on and
//! off, `traceparent` injection on and off), with the verifier's figures
//! compared to the verification budget. With `--smoke`, each signal is then
//! started as the daemon starts it and driven by a workload of the agent's
//! own binary (`smoke`, `workload`), and what it produced is checked.
pub mod smoke;
pub mod workload;

use std::fmt::Write as _;

use aya::{Btf, Ebpf, programs::Program};

use crate::{
    ebpf::{self, BUDGET_PEAK_STATES, BUDGET_PROCESSED_INSNS, LoadError, VerifierStats},
    network::capture::{self as net_capture, NetCapture, NetCaptureConfig},
    profiles::capture::{self as profiler, Profiler, ProfilerConfig},
    traces::capture::{self as http_capture, HttpCapture, HttpCaptureConfig},
};

/// One program loaded in one configuration.
#[derive(Clone, Debug)]
pub struct ProgramCheck {
    pub object: &'static str,
    /// The configuration's name (`default`, `pids`, `inject+pids`, …).
    pub config: &'static str,
    pub program: String,
    pub outcome: Result<Option<VerifierStats>, String>,
}

impl ProgramCheck {
    /// Loaded, with figures within the budget.
    pub fn ok(&self) -> bool {
        matches!(&self.outcome, Ok(Some(s)) if s.within_budget())
    }

    /// Rejected, but the agent runs its signal without it (see
    /// [`degradation`]).
    pub fn degraded(&self) -> Option<&'static str> {
        self.outcome.as_ref().err().and(degradation(&self.program))
    }
}

/// What the agent does without a program it could not load, for the
/// programs a signal can do without; `None` for the ones it needs.
pub fn degradation(program: &str) -> Option<&'static str> {
    match program {
        "profile_unwind" => Some("profiles: user stacks by frame pointers only"),
        "profile_python" => Some("profiles: no Python frames (native frames only)"),
        "offcpu_switch" | "offcpu_switch_in" | "offcpu_store" => {
            Some("profiles: no off-CPU profiles (CPU profiles run on)")
        }
        "fathom_sk_msg" | "fathom_sock_ops" => Some("traces: captured, no traceparent injected"),
        "fathom_sk_skb" => Some("traces: traceparent in the first request of each connection only"),
        "net_tcp_probe_btf" => Some("network: tcp_probe as a classic tracepoint"),
        "http_sock_recv"
        | "http_sock_send"
        | "http_sock_recv_process"
        | "http_sock_send_process"
        | "http_sock_state" => Some("traces: captured on syscall tracepoints (slower)"),
        _ => None,
    }
}

/// The configurations of each object that the agent loads.
fn configurations() -> Vec<(&'static str, &'static str, Configured)> {
    let me = std::process::id();
    let profiler = |pids: Vec<u32>| ProfilerConfig {
        pids,
        ..ProfilerConfig::default()
    };
    let http = |inject: bool, pids: Vec<u32>| HttpCaptureConfig {
        inject,
        pids,
        ..HttpCaptureConfig::default()
    };
    vec![
        (
            profiler::OBJECT,
            "default",
            Configured::Profiler(profiler(vec![])),
        ),
        (
            profiler::OBJECT,
            "pids",
            Configured::Profiler(profiler(vec![me])),
        ),
        (
            http_capture::OBJECT,
            "default",
            Configured::Http(http(false, vec![])),
        ),
        (
            http_capture::OBJECT,
            "pids",
            Configured::Http(http(false, vec![me])),
        ),
        (
            http_capture::OBJECT,
            "inject",
            Configured::Http(http(true, vec![])),
        ),
        (
            http_capture::OBJECT,
            "inject+pids",
            Configured::Http(http(true, vec![me])),
        ),
        (
            net_capture::OBJECT,
            "default",
            Configured::Net(NetCaptureConfig::default()),
        ),
    ]
}

enum Configured {
    Profiler(ProfilerConfig),
    Http(HttpCaptureConfig),
    Net(NetCaptureConfig),
}

/// Loads every program of every object in every configuration; with
/// `objects` or `configs` not empty, only those named.
pub fn check_programs(objects: &[String], configs: &[String]) -> Vec<ProgramCheck> {
    let btf = Btf::from_sys_fs().ok();
    let mut checks = Vec::new();
    let wanted = |list: &[String], name: &str| list.is_empty() || list.iter().any(|n| n == name);
    for (object, config, configured) in configurations() {
        if !wanted(objects, object) || !wanted(configs, config) {
            continue;
        }
        let opened: Result<Ebpf, String> = match &configured {
            Configured::Profiler(c) => Profiler::open_object(c).map_err(|e| e.to_string()),
            Configured::Http(c) => HttpCapture::open_object(c).map_err(|e| e.to_string()),
            Configured::Net(c) => NetCapture::open_object(c)
                .map(|(ebpf, _)| ebpf)
                .map_err(|e| e.to_string()),
        };
        let mut ebpf = match opened {
            Ok(ebpf) => ebpf,
            Err(e) => {
                checks.push(ProgramCheck {
                    object,
                    config,
                    program: "(object)".into(),
                    outcome: Err(e),
                });
                continue;
            }
        };
        let mut names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
        names.sort();
        for name in names {
            let Some(program) = ebpf.program_mut(&name) else {
                continue;
            };
            let outcome = load_any(object, &name, program, btf.as_ref()).map_err(|e| e.to_string());
            checks.push(ProgramCheck {
                object,
                config,
                program: name,
                outcome,
            });
        }
    }
    checks
}

/// The kernel tracepoint a BTF tracepoint program of ours attaches to.
fn btf_tracepoint_of(program: &str) -> Option<&'static str> {
    let (name, tracepoint) = net_capture::BTF_PROBE;
    (program == name)
        .then_some(tracepoint)
        .or_else(|| {
            fathom_common::profiler::names::PROGRAMS_OFF_CPU
                .contains(&program)
                .then_some("sched_switch")
        })
        .or_else(|| http_capture::btf_tracepoint_of(program))
}

/// Loads a program of any type the objects have.
fn load_any(
    object: &'static str,
    name: &str,
    program: &mut Program,
    btf: Option<&Btf>,
) -> Result<Option<VerifierStats>, LoadError> {
    match program {
        Program::TracePoint(p) => ebpf::load_program(object, name, || p.load()),
        Program::PerfEvent(p) => ebpf::load_program(object, name, || p.load()),
        Program::UProbe(p) => ebpf::load_program(object, name, || p.load()),
        Program::SockOps(p) => ebpf::load_program(object, name, || p.load()),
        Program::SkMsg(p) => ebpf::load_program(object, name, || p.load()),
        Program::SkSkb(p) => ebpf::load_program(object, name, || p.load()),
        Program::SchedClassifier(p) => ebpf::load_program(object, name, || p.load()),
        Program::BtfTracePoint(p) => {
            let tracepoint = btf_tracepoint_of(name).unwrap_or("unknown");
            match btf {
                Some(btf) => ebpf::load_program(object, name, || p.load(tracepoint, btf)),
                None => ebpf::load_program(object, name, || {
                    Err(aya::programs::ProgramError::UnexpectedProgramType)
                }),
            }
        }
        _ => ebpf::load_program(object, name, || {
            Err(aya::programs::ProgramError::UnexpectedProgramType)
        }),
    }
}

/// The figures as a table, one program and configuration a line.
pub fn programs_table(checks: &[ProgramCheck]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<12} {:<28} {:>10} {:>8} {:>10}  verdict",
        "object", "config", "program", "insns", "states", "time"
    );
    for c in checks {
        let (insns, states, time, verdict) = match &c.outcome {
            Ok(Some(s)) => (
                s.processed_insns.to_string(),
                s.peak_states.to_string(),
                format!("{:.1} ms", s.verification_time.as_secs_f64() * 1e3),
                if s.within_budget() {
                    "ok".to_string()
                } else {
                    "OVER BUDGET".to_string()
                },
            ),
            Ok(None) => (
                "?".into(),
                "?".into(),
                "?".into(),
                "loaded, no figures".into(),
            ),
            Err(e) => match degradation(&c.program) {
                Some(then) => (
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("DEGRADED ({then}): {e}"),
                ),
                None => ("-".into(), "-".into(), "-".into(), format!("REJECTED: {e}")),
            },
        };
        let _ = writeln!(
            out,
            "{:<12} {:<12} {:<28} {:>10} {:>8} {:>10}  {verdict}",
            c.object, c.config, c.program, insns, states, time
        );
    }
    let _ = writeln!(
        out,
        "budget: {BUDGET_PROCESSED_INSNS} instructions processed and {BUDGET_PEAK_STATES} peak \
         states per program"
    );
    out
}

/// One signal's smoke check: what was seen, or why it failed.
#[derive(Clone, Debug)]
pub struct SmokeCheck {
    pub signal: &'static str,
    pub outcome: Result<String, String>,
}

/// Runs each signal's smoke check in turn.
pub fn check_smoke() -> Vec<SmokeCheck> {
    type Smoke = fn() -> Result<String, String>;
    let checks: [(&'static str, Smoke); 3] = [
        ("profiles", smoke::profiles),
        ("traces", smoke::traces),
        ("network", smoke::network),
    ];
    checks
        .into_iter()
        .map(|(signal, check)| SmokeCheck {
            signal,
            outcome: check(),
        })
        .collect()
}

/// One line per smoke check.
pub fn smoke_table(checks: &[SmokeCheck]) -> String {
    let mut out = String::new();
    for c in checks {
        let _ = match &c.outcome {
            Ok(said) => writeln!(out, "smoke {:<9} ok: {said}", c.signal),
            Err(why) => writeln!(out, "smoke {:<9} FAILED: {why}", c.signal),
        };
    }
    out
}
