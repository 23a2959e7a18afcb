//! Compiles `proto/**/*.proto` with protox (pure Rust, no system `protoc`) and
//! generates prost messages plus tonic clients and servers for every service.
//! The encoded FileDescriptorSet is written next to the generated code so that
//! reflection and path-based routing can serve the exact same contract.

use std::path::{Path, PathBuf};

/// Messages whose Debug output must not show their secrets.
const REDACTED_MESSAGES: [&str; 5] = [
    ".agora.users.v1.CreateUserRequest",
    ".agora.users.v1.AuthenticateRequest",
    ".agora.users.v1.AuthenticateResponse",
    ".agora.payments.v1.ChargeRequest",
    ".agora.orders.v1.PlaceOrderRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = Path::new("proto");
    let mut files = Vec::new();
    collect_protos(proto_root, &mut files)?;
    files.sort();

    let mut compiler = protox::Compiler::new([proto_root])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(&files)?;
    let file_descriptors = compiler.file_descriptor_set();

    // Encoded by protox itself, not from `file_descriptors`: prost's
    // `MethodOptions` has no field for custom options and would drop the
    // `(agora.common.v1.access)` level of every RPC.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("agora_descriptor.bin");
    std::fs::write(&descriptor_path, compiler.encode_file_descriptor_set())?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Messages carrying passwords, card numbers or access tokens get a
        // hand-written, redacting Debug (src/redact.rs) instead of the derived one.
        .skip_debug(REDACTED_MESSAGES)
        .compile_fds(file_descriptors)?;

    println!("cargo:rerun-if-changed=proto");
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    Ok(())
}

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
