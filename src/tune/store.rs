//! The JSON files of `natsl tune` and `natsl bench peaks`: read whole, written whole
//! and atomically (a temporary file in the same folder, then a rename), so a reader
//! never sees a torn file and an interrupted writer leaves the previous one.
//!
//! A file that does not parse, or whose `format` is not this build's, is *damaged*:
//! callers then start from an empty table and the next write replaces it (the damaged
//! bytes are kept beside it as `<name>.damaged` for a look).

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Version of the file layout; a file of another format is treated as damaged.
pub const FORMAT: u32 = 1;

/// Largest file read (a cache of every model shape of many GPUs stays far below).
const MAX_BYTES: u64 = 16 << 20;

/// What reading a store found.
#[derive(Debug)]
pub enum Loaded<T> {
    /// No file there: an empty table.
    Missing,
    /// The file's entries.
    Ok(Vec<T>),
    /// A file that is not a store of this format (the reason): rebuild it.
    Damaged(String),
}

impl<T> Loaded<T> {
    /// The entries (none for a missing or damaged file).
    pub fn entries(self) -> Vec<T> {
        match self {
            Loaded::Ok(v) => v,
            _ => Vec::new(),
        }
    }
}

#[derive(serde::Deserialize)]
struct Doc<T> {
    #[allow(dead_code)]
    format: u32,
    entries: Vec<T>,
}

#[derive(Serialize)]
struct DocOut<'a, T> {
    format: u32,
    /// What wrote it (for a person reading the file).
    writer: String,
    entries: &'a [T],
}

/// Read the store at `path`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Loaded<T> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
        Err(e) => return Loaded::Damaged(format!("cannot stat: {e}")),
    };
    if !meta.is_file() {
        return Loaded::Damaged("not a regular file".into());
    }
    if meta.len() > MAX_BYTES {
        return Loaded::Damaged(format!("{} bytes, more than {MAX_BYTES}", meta.len()));
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => return Loaded::Damaged(format!("cannot read: {e}")),
    };
    // The format first, so a future layout is reported as such (not as a parse error).
    let head: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return Loaded::Damaged(format!("not JSON: {e}")),
    };
    match head.get("format").and_then(|f| f.as_u64()) {
        Some(f) if f == FORMAT as u64 => {}
        Some(f) => return Loaded::Damaged(format!("format {f}, this build reads {FORMAT}")),
        None => return Loaded::Damaged("no `format` field".into()),
    }
    match serde_json::from_value::<Doc<T>>(head) {
        Ok(d) => Loaded::Ok(d.entries),
        Err(e) => Loaded::Damaged(format!("bad entries: {e}")),
    }
}

/// Write `entries` to `path` atomically (creating the folder). A damaged file there is
/// first kept as `<path>.damaged`.
pub fn save<T: Serialize>(path: &Path, entries: &[T], damaged: bool) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    if damaged && path.is_file() {
        let _ = std::fs::rename(path, side_path(path, "damaged"));
    }
    let doc = DocOut { format: FORMAT, writer: format!("natsl {}", env!("CARGO_PKG_VERSION")), entries };
    let text = serde_json::to_string_pretty(&doc).map_err(std::io::Error::other)?;
    let tmp = side_path(path, &format!("tmp.{}.{}", std::process::id(), unique()));
    std::fs::write(&tmp, text.as_bytes())?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn side_path(path: &Path, ext: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
