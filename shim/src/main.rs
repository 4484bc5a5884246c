//! `containerd-shim-moat-v2`: placeholder entry point; the real work lands with its issue.

fn main() {
    println!("containerd-shim-moat-v2 {}", env!("CARGO_PKG_VERSION"));
}
