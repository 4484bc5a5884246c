//! Generates the message types and the sync + async ttrpc client/server
//! code from `proto/agent.proto` with the pure-Rust protobuf parser (no
//! `protoc` needed).

use std::{fs, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn generate(out: &PathBuf, async_all: bool) {
    fs::create_dir_all(out).expect("create codegen output dir");
    Codegen::new()
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().generate_accessors(true))
        .customize(Customize {
            async_all,
            ..Default::default()
        })
        .out_dir(out)
        .run()
        .expect("ttrpc codegen of proto/agent.proto failed");
    // `include!` cannot take inner attributes or inner doc comments.
    for entry in fs::read_dir(out).expect("read codegen output dir") {
        let path = entry.expect("codegen dir entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path).expect("read generated file");
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
                .collect();
            fs::write(&path, kept.join("\n")).expect("write generated file");
        }
    }
}

fn main() {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR set by cargo"));
    generate(&out.join("sync"), false);
    generate(&out.join("async"), true);
}
