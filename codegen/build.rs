//! Embeds every file under ../cuda into the crate, so that binaries never read
//! the source tree at run time (the GPU host has no checkout of it).
use std::{env, fs, path::Path};

fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = fs::read_dir(dir).expect("read cuda dir").flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            // A directory's mtime changes when a file is added or removed in it.
            println!("cargo:rerun-if-changed={}", p.display());
            walk(&p, root, out);
        } else if matches!(p.extension().and_then(|s| s.to_str()), Some("h" | "cuh" | "cu")) {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
            out.push((rel, p.canonicalize().unwrap().to_string_lossy().into_owned()));
        }
    }
}

fn main() {
    // Read at run time: a build script compiled in another checkout (a copied target
    // dir) must not embed that checkout's templates.
    let root = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap()).join("../cuda");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    walk(&root, &root, &mut files);
    let mut src = String::from("/// (path relative to cuda/, contents) of every template file.\npub static FILES: &[(&str, &str)] = &[\n");
    for (rel, abs) in &files {
        println!("cargo:rerun-if-changed={abs}");
        src.push_str(&format!("    ({rel:?}, include_str!({abs:?})),\n"));
    }
    src.push_str("];\n");
    fs::write(Path::new(&env::var("OUT_DIR").unwrap()).join("templates.rs"), src).unwrap();
}
