//! `moat-agent`: placeholder entry point; the real work lands with its issue.

fn main() {
    println!("moat-agent {}", env!("CARGO_PKG_VERSION"));
}
