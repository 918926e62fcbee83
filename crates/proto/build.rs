fn main() {
    let root = "../../proto";
    let files = [
        "process/process.proto",
        "filesystem/filesystem.proto",
        "hearth/agent/v1/agent.proto",
    ]
    .map(|f| format!("{root}/{f}"));
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    connectrpc_build::Config::new()
        .files(&files)
        .includes(&[root, "/usr/include"])
        .include_file("_connectrpc.rs")
        .compile()
        .expect("protobuf code generation failed (is protoc installed? scripts/install-deps.sh installs protobuf-compiler)");
}
