//! The batchd binary.

#[allow(dead_code, reason = "the server wiring that uses the handlers comes next")]
mod handlers;

fn main() {}
