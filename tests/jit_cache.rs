//! The on-disk kernel cache: entries round-trip, corrupt or truncated entries
//! are rejected (and so recompiled), concurrent writers never leave a torn entry,
//! only regular files of bounded size are read, an entry records its key, an entry
//! whose image does not load is evicted and recompiled, and a dead writer's
//! temporary files are removed.

use natsl::jit::{read_entry, write_entry, MAX_ENTRY_BYTES};
use std::time::{Duration, SystemTime};

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("natsl-cache-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn entries_round_trip() {
    let d = tmpdir("rt");
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let p = write_entry(&d, "abc", &payload).unwrap();
    assert_eq!(read_entry(&p).unwrap(), payload);
}

#[test]
fn corrupt_and_truncated_entries_are_rejected() {
    let d = tmpdir("bad");
    let payload = vec![42u8; 4096];
    let p = write_entry(&d, "k", &payload).unwrap();
    let good = std::fs::read(&p).unwrap();
    // truncated
    std::fs::write(&p, &good[..good.len() - 1]).unwrap();
    assert!(read_entry(&p).is_none());
    // one flipped payload byte
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    std::fs::write(&p, &flipped).unwrap();
    assert!(read_entry(&p).is_none());
    // wrong magic, empty file, missing file
    let mut magic = good.clone();
    magic[0] = b'X';
    std::fs::write(&p, &magic).unwrap();
    assert!(read_entry(&p).is_none());
    std::fs::write(&p, b"").unwrap();
    assert!(read_entry(&p).is_none());
    assert!(read_entry(&d.join("missing.cubin")).is_none());
    // rewriting repairs it
    write_entry(&d, "k", &payload).unwrap();
    assert_eq!(read_entry(&p).unwrap(), payload);
}

#[test]
fn concurrent_writers_leave_a_whole_entry() {
    let d = tmpdir("race");
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            let d = d.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    write_entry(&d, "same", &vec![i; 100_000]).unwrap();
                }
            })
        })
        .collect();
    let reader = {
        let p = d.join("same.cubin");
        std::thread::spawn(move || {
            for _ in 0..200 {
                if let Some(v) = read_entry(&p) {
                    assert!(v.iter().all(|&b| b == v[0]), "torn entry");
                }
            }
        })
    };
    for t in threads {
        t.join().unwrap();
    }
    reader.join().unwrap();
    let v = read_entry(&d.join("same.cubin")).unwrap();
    assert_eq!(v.len(), 100_000);
    // no temporary files left behind
    let left: Vec<_> = std::fs::read_dir(&d).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).collect();
    assert!(left.is_empty());
}

#[test]
fn a_fifo_or_directory_in_the_cache_is_skipped_not_read() {
    let d = tmpdir("fifo");
    std::fs::create_dir_all(&d).unwrap();
    let fifo = d.join("k.cubin");
    let ok = std::process::Command::new("mkfifo").arg(&fifo).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "mkfifo failed");
    // On a blocking open this waits for a writer forever: give it 10 s.
    let (tx, rx) = std::sync::mpsc::channel();
    let p = fifo.clone();
    std::thread::spawn(move || tx.send(read_entry(&p)).unwrap());
    let got = rx.recv_timeout(Duration::from_secs(10)).expect("read_entry hung on a FIFO");
    assert!(got.is_none());
    std::fs::create_dir(d.join("dir.cubin")).unwrap();
    assert!(read_entry(&d.join("dir.cubin")).is_none());
}

#[test]
fn entries_larger_than_the_limit_are_neither_read_nor_written() {
    let d = tmpdir("big");
    let p = write_entry(&d, "big", b"small").unwrap();
    // A sparse file just over the limit: rejected from its size, not read.
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(MAX_ENTRY_BYTES + 1).unwrap();
    assert!(read_entry(&p).is_none());
    let huge = vec![0u8; MAX_ENTRY_BYTES as usize];
    assert!(write_entry(&d, "huge", &huge).is_err());
    assert!(!d.join("huge.cubin").exists());
}

#[test]
fn an_entry_records_its_key() {
    let d = tmpdir("key");
    let a = write_entry(&d, "aaaa", b"image of aaaa").unwrap();
    assert_eq!(read_entry(&a).unwrap(), b"image of aaaa");
    // The same bytes under another key's name (a copied or renamed file): a valid
    // checksum, but not this key's image.
    let b = d.join("bbbb.cubin");
    std::fs::copy(&a, &b).unwrap();
    assert!(read_entry(&b).is_none());
    // Keys that are not plain file names are refused.
    for k in ["", "../x", ".hidden", "a/b"] {
        assert!(write_entry(&d, k, b"x").is_err(), "{k:?}");
    }
}

#[test]
fn stale_temp_files_of_dead_writers_are_removed() {
    let d = tmpdir("tmp");
    std::fs::create_dir_all(&d).unwrap();
    let stale = d.join(".k.4242.1.tmp");
    let fresh = d.join(".k.4243.2.tmp");
    let other = d.join("notes.txt");
    for p in [&stale, &fresh, &other] {
        std::fs::write(p, b"partial").unwrap();
    }
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options().write(true).open(&stale).unwrap().set_modified(hour_ago).unwrap();
    std::fs::File::options().write(true).open(&other).unwrap().set_modified(hour_ago).unwrap();
    write_entry(&d, "next", b"payload").unwrap();
    assert!(!stale.exists(), "a dead writer's temp file was left");
    assert!(fresh.exists(), "a live writer's temp file was removed");
    assert!(other.exists(), "a file that is not ours was removed");
}

/// With a real NVRTC: an entry whose checksum holds but whose image the loader
/// refuses is evicted, compiled again and replaced by the good image.
#[test]
fn an_entry_that_does_not_load_is_evicted_and_recompiled() {
    if let Err(e) = natsl::jit::ensure_nvrtc() {
        if std::env::var("NATSL_REQUIRE_NVRTC").as_deref() == Ok("1") {
            panic!("NATSL_REQUIRE_NVRTC=1 but {e}");
        }
        eprintln!("skipped: NVRTC not available ({e})");
        return;
    }
    use natsl_codegen::{catalog, Arch, DType, Sparsity, Unit};
    let d = tmpdir("evict");
    let unit = Unit {
        spec: catalog::router_spec(DType::Bf16, Sparsity::Dense, Arch::Sm80),
        name: "natsl_cache_evict_test".into(),
        source: format!("// {}\nextern \"C\" __global__ void natsl_cache_evict_test_k(int* p) {{ if (p) *p = 1; }}\n", std::process::id()),
        entries: vec!["k".into()],
    };
    let is_elf = |c: &[u8]| c.starts_with(b"\x7fELF");
    // A loader that accepts only ELF images, like the driver.
    let calls = std::cell::RefCell::new(Vec::<bool>::new());
    let load = |c: &[u8]| -> natsl::Result<usize> {
        calls.borrow_mut().push(is_elf(c));
        if is_elf(c) { Ok(c.len()) } else { Err(natsl::Error::Unsupported("not an image".into())) }
    };
    natsl::jit::compile_and_load_in(Some(&d), &unit, "sm_80", load).unwrap();
    let entry = natsl::jit::entry_path(&d, &unit, "sm_80").unwrap();
    assert!(is_elf(&read_entry(&entry).unwrap()));
    // A cached hit loads without compiling.
    calls.borrow_mut().clear();
    natsl::jit::compile_and_load_in(Some(&d), &unit, "sm_80", load).unwrap();
    assert_eq!(*calls.borrow(), vec![true]);
    // Valid checksum, unusable image.
    let key = entry.file_stem().unwrap().to_str().unwrap().to_string();
    write_entry(&d, &key, b"not an image").unwrap();
    calls.borrow_mut().clear();
    natsl::jit::compile_and_load_in(Some(&d), &unit, "sm_80", load).unwrap();
    assert_eq!(*calls.borrow(), vec![false, true], "the bad entry was not retried with a fresh compile");
    assert!(is_elf(&read_entry(&entry).unwrap()), "the bad entry was not replaced");
}
