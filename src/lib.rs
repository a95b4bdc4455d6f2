//! socketserver: share one TCP port among pre-forked Tcl worker processes.
#![warn(clippy::undocumented_unsafe_blocks)]

mod dispatcher;
mod fdpass;
mod fork_safety;
mod worker;
