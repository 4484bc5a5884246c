//! `moat-vmm`: placeholder entry point; the real work lands with its issue.

fn main() {
    println!("moat-vmm {}", env!("CARGO_PKG_VERSION"));
}
