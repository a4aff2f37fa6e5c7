//! The on-disk kernel cache: entries round-trip, corrupt or truncated entries
//! are rejected (and so recompiled), and concurrent writers never leave a torn entry.

use natsl::jit::{read_entry, write_entry};

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
