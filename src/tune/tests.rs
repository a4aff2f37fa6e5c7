//! CPU tests of the tune cache: keying, foreign entries, damaged files, buckets.

use super::*;

fn key(gpu: &str) -> TuneKey {
    TuneKey {
        device: DeviceId { gpu: gpu.into(), sm_count: 132, compute_capability: "9.0".into(), driver: 13000 },
        arch: "sm_90a".into(),
        nvrtc: "13.0".into(),
        natsl: env!("CARGO_PKG_VERSION").into(),
        source_hash: source_hash().into(),
    }
}

fn entry(k: &TuneKey, bucket: &str, choice: Choice) -> Entry {
    Entry { key: k.clone(), bucket: bucket.into(), choice, ms: 1.0, default_ms: 1.2, candidates: 5, shape: "test".into(), date: "2026-12-05".into() }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("natsl-tune-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d.join("tune.json")
}

fn fused_choice() -> Choice {
    Choice::gdn(PrefillVariant { tile: ScanTile::Fused, cp: ScanParallel::Segments(4), part: None })
}

#[test]
fn choices_round_trip_through_their_names() {
    let variants = [
        PrefillVariant::default(),
        PrefillVariant { tile: ScanTile::Reg, cp: ScanParallel::Off, part: None },
        PrefillVariant { tile: ScanTile::Fused, cp: ScanParallel::Segments(16), ..Default::default() },
        PrefillVariant { tile: ScanTile::Wide, cp: ScanParallel::Segments(8), part: None },
    ];
    for v in variants {
        assert_eq!(Choice::gdn(v).gdn_variant(), Some(v), "{v:?}");
    }
    for k in [PrefillKernel::MmaSync, PrefillKernel::Wgmma, PrefillKernel::WarpSpecialized] {
        assert_eq!(Choice::sparse(k).sparse_kernel(), Some(k));
    }
    // A choice of one family is no choice of another.
    assert_eq!(Choice::sparse(PrefillKernel::Wgmma).gdn_variant(), None);
    // A name this build lacks is unknown (an entry of a newer build), never guessed.
    let future = Choice::GdnPrefill { tile: "quantum".into(), cp: "auto".into() };
    assert!(!future.known());
    // Tiles of older builds (removed, bench/NOTES.md cleanup) are unknown too.
    assert!(!Choice::GdnPrefill { tile: "narrow".into(), cp: "auto".into() }.known());
    assert!(!Choice::GdnPrefill { tile: "wide".into(), cp: "cpX".into() }.known());
}

#[test]
fn keys_differ_in_every_field() {
    let base = key("NVIDIA H200");
    let mut variants = Vec::new();
    let mut k = base.clone();
    k.device.gpu = "NVIDIA H100 80GB HBM3".into();
    variants.push(k);
    let mut k = base.clone();
    k.device.sm_count = 114;
    variants.push(k);
    let mut k = base.clone();
    k.device.compute_capability = "8.0".into();
    variants.push(k);
    let mut k = base.clone();
    k.device.driver = 12080;
    variants.push(k);
    let mut k = base.clone();
    k.arch = "sm_80".into();
    variants.push(k);
    let mut k = base.clone();
    k.nvrtc = "12.8".into();
    variants.push(k);
    let mut k = base.clone();
    k.natsl = "0.0.1".into();
    variants.push(k);
    let mut k = base.clone();
    k.source_hash = "0000000000000000".into();
    variants.push(k);
    let b = "gdn_prefill bf16 dk128 dv256 hqk6 hv6 n1 t32768";
    for other in variants {
        assert_ne!(other, base);
        // An entry measured under any other key is ignored, never applied.
        let t = Table::for_key(&base, &[entry(&other, b, fused_choice())]);
        assert!(t.get(b).is_none(), "{other:?}");
        assert_eq!(t.foreign, 1);
    }
    let t = Table::for_key(&base, &[entry(&base, b, fused_choice())]);
    assert_eq!(t.get(b), Some(&fused_choice()));
}

#[test]
fn source_hash_is_stable_and_short() {
    assert_eq!(source_hash(), source_hash());
    assert_eq!(source_hash().len(), 16);
    assert!(source_hash().chars().all(|c| c.is_ascii_hexdigit()));
}

#[test]
fn a_file_shared_by_two_gpus_keeps_both_and_applies_only_its_own() {
    let path = tmp("shared");
    let (a, b) = (key("NVIDIA H200"), key("NVIDIA H100 80GB HBM3"));
    let bucket = "sparse_prefill bf16 dk64 dv128 hq12 hkv12 routed n1 t32768";
    let mut entries = vec![entry(&a, bucket, Choice::sparse(PrefillKernel::WarpSpecialized)), entry(&b, bucket, Choice::sparse(PrefillKernel::Wgmma))];
    store::save(&path, &entries, false).unwrap();
    let back: Vec<Entry> = match store::load(&path) {
        store::Loaded::Ok(v) => v,
        other => panic!("{other:?}"),
    };
    assert_eq!(back, entries);
    assert_eq!(Table::for_key(&a, &back).get(bucket), Some(&Choice::sparse(PrefillKernel::WarpSpecialized)));
    assert_eq!(Table::for_key(&b, &back).get(bucket), Some(&Choice::sparse(PrefillKernel::Wgmma)));
    // Re-tuning one GPU's bucket replaces that entry only.
    upsert(&mut entries, entry(&a, bucket, Choice::sparse(PrefillKernel::MmaSync)));
    assert_eq!(entries.len(), 2);
    assert_eq!(Table::for_key(&a, &entries).get(bucket), Some(&Choice::sparse(PrefillKernel::MmaSync)));
    assert_eq!(Table::for_key(&b, &entries).get(bucket), Some(&Choice::sparse(PrefillKernel::Wgmma)));
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn damaged_files_are_reported_and_rebuilt() {
    let path = tmp("damaged");
    assert!(matches!(store::load::<Entry>(&path), store::Loaded::Missing));
    let k = key("NVIDIA H200");
    let good = serde_json::to_string(&entry(&k, "b", fused_choice())).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("garbage", b"\x00\xffnot json at all".to_vec()),
        ("truncated", format!("{{\"format\": 1, \"writer\": \"x\", \"entries\": [{}", &good[..good.len() / 2]).into_bytes()),
        ("no format", format!("{{\"entries\": [{good}]}}").into_bytes()),
        ("other format", format!("{{\"format\": 99, \"writer\": \"x\", \"entries\": [{good}]}}").into_bytes()),
        ("bad entry", b"{\"format\": 1, \"writer\": \"x\", \"entries\": [{\"key\": 3}]}".to_vec()),
        ("not an object", b"[1, 2, 3]".to_vec()),
    ];
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(store::load::<Entry>(&path), store::Loaded::Damaged(_)), "{what}");
        // The tuner's rebuild: a fresh file, the damaged bytes kept aside.
        store::save(&path, &[entry(&k, "b", fused_choice())], true).unwrap();
        assert!(matches!(store::load::<Entry>(&path), store::Loaded::Ok(v) if v.len() == 1), "{what}");
        assert_eq!(std::fs::read(path.with_extension("json.damaged")).unwrap(), bytes, "{what}");
    }
    // A folder where the file should be is damaged too (and not read).
    let dir_path = path.parent().unwrap().join("dir.json");
    std::fs::create_dir_all(&dir_path).unwrap();
    assert!(matches!(store::load::<Entry>(&dir_path), store::Loaded::Damaged(_)));
    // No temporary file is left behind.
    let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains(".tmp.")).collect();
    assert!(left.is_empty(), "{left:?}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn unknown_choices_of_this_key_are_ignored() {
    let k = key("NVIDIA H200");
    let odd = Choice::SparsePrefill { kernel: "hyper".into() };
    let t = Table::for_key(&k, &[entry(&k, "sparse_prefill bf16 dk64 dv128 hq12 hkv12 routed n1 t32768", odd)]);
    assert!(t.is_empty());
    assert_eq!(t.unknown, 1);
}

#[test]
fn buckets_round_shapes_up() {
    use natsl_codegen::DType::Bf16;
    assert_eq!(len_bucket(1), 64);
    assert_eq!(len_bucket(4096), 4096);
    assert_eq!(len_bucket(4097), 8192);
    assert_eq!(count_bucket(0), 1);
    assert_eq!(count_bucket(3), 4);
    let one = gdn_bucket(Bf16, 128, 256, 6, 6, &[0, 32768]);
    assert_eq!(one, "gdn_prefill bf16 dk128 dv256 hqk6 hv6 n1 t32768");
    // A shorter sequence of the same bucket, a ragged batch of another.
    assert_eq!(gdn_bucket(Bf16, 128, 256, 6, 6, &[0, 20000]), one);
    assert_eq!(gdn_bucket(Bf16, 128, 256, 6, 6, &[0, 3000, 7000, 8000]), "gdn_prefill bf16 dk128 dv256 hqk6 hv6 n4 t4096");
    assert_ne!(gdn_bucket(Bf16, 192, 384, 6, 6, &[0, 32768]), one);
    assert_eq!(sparse_bucket(Bf16, 64, 128, 12, 12, true, &[0, 8192, 16384]), "sparse_prefill bf16 dk64 dv128 hq12 hkv12 routed n2 t8192");
}

#[test]
fn cache_path_follows_the_environment() {
    // Only reads the variables (set by no other test of this binary).
    if std::env::var_os("NATSL_TUNE_CACHE").is_none() {
        if let Some(p) = cache_path() {
            assert!(p.ends_with("tune.json"));
        }
    }
}
