//! NVRTC tier for the GDN decode state tiles that `gdn_decode_variant` accepts beyond
//! the catalog's (JIT on first use, so tests/nvrtc.rs does not see them): each
//! compiles on both arches with zero spills.

use natsl::jit;
use natsl_codegen::spec::Tile;
use natsl_codegen::{catalog, emit, Arch, DType};

#[test]
fn decode_tiles_compile_without_spills() {
    if jit::ensure_nvrtc().is_err() {
        eprintln!("skip: NVRTC not available");
        return;
    }
    let mut bad = Vec::new();
    for arch in [Arch::Sm90a, Arch::Sm80] {
        for tile in [Tile::new(1, 32, 4, 1), Tile::new(1, 64, 8, 1), Tile::new(1, 32, 8, 1), Tile::new(1, 16, 2, 1)] {
            for (dk, dv) in [(128u32, 128u32), (64, 64), (128, 256)] {
                let mut spec = catalog::gdn_decode_spec(DType::Bf16, dk, dv, arch);
                spec.tile = tile;
                let unit = emit(&spec).unwrap();
                let img = jit::compile_uncached(&unit.name, &unit.source, &jit::options(arch)).unwrap();
                for r in jit::parse_ptxas(&img.log) {
                    println!("  {:<76} {:>3} regs spills {}/{}", r.function, r.registers, r.spill_stores, r.spill_loads);
                    if (r.spill_stores, r.spill_loads) != (0, 0) {
                        bad.push(r.function.clone());
                    }
                }
            }
        }
    }
    assert!(bad.is_empty(), "spills: {bad:?}");
}
