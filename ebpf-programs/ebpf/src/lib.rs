//! Empty host-side library: the programs live in the `fathom` binary target,
//! which only builds for the BPF target. The agent's build script depends on
//! this crate so that cargo rebuilds the agent when the programs change.
#![no_std]
