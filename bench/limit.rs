//! `limit`: the floor for the benchmark — a bare accept-and-answer HTTP/1.0 server, no Tcl.
fn main() {}
