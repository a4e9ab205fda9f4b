//! Placeholder created by the lead so the workspace manifest parses; replace it.
fn main() {}
