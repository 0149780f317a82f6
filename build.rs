//! Links the bare-metal image: no C runtime, no libc, our linker script.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    for arg in ["-nostartfiles", "-nostdlib", "-static", "-no-pie", "-Wl,--gc-sections", "-Wl,--build-id=none"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
    println!("cargo:rerun-if-changed=linker.ld");
    for f in ["entry.s", "tables.s", "exceptions.s", "mem.s", "ap.s"] {
        println!("cargo:rerun-if-changed=asm/{f}");
    }
}
