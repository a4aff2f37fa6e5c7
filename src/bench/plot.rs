//! The PNGs of `natsl bench`: per op, time and throughput against sequence length (or
//! batch) for every series of records that sweeps one (same variant, same shape but
//! for the swept number), the peers of the same shapes, and the roofline of each
//! swept shape (max(FLOPs / peak, bytes / bandwidth), with the ceilings the records
//! carry). Text uses the embedded DejaVu Sans (plotters' ab_glyph backend): no system
//! fonts are read.

use super::Record;
use crate::error::{Error, Result};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A peer's record (JSON lines as `bench/peers/*.py` write: op, shape, ms, tflops or
/// tbps, and the peer's name in `peer` or `variant`).
#[derive(Clone, Debug, PartialEq)]
pub struct Peer {
    pub op: String,
    pub shape: String,
    pub name: String,
    pub ms: f64,
    pub tflops: Option<f64>,
    pub tbps: Option<f64>,
}

/// Read a peers' results file; lines that are not such a record are skipped.
pub fn read_peers(path: &Path) -> Result<Vec<Peer>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text.lines().filter_map(parse_peer).collect())
}

fn parse_peer(line: &str) -> Option<Peer> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).filter(|x| x.is_finite());
    Some(Peer { op: s("op")?, shape: s("shape")?, name: s("peer").or_else(|| s("variant"))?, ms: f("ms").filter(|&m| m > 0.0)?, tflops: f("tflops"), tbps: f("tbps") })
}

/// What a shape sweeps: (the shape with the swept number as `*`, its value, the axis).
/// `8x8192` -> tokens per sequence 8192; `T32768`, `T=32768`, `ctx32768` -> length;
/// else `B32`, `B=32` -> batch.
pub fn x_of(shape: &str) -> Option<(String, f64, &'static str)> {
    let toks: Vec<&str> = shape.split_whitespace().collect();
    let num = |s: &str| -> Option<f64> { (!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())).then(|| s.parse().ok()).flatten() };
    let with = |i: usize, t: String| -> String {
        let mut v: Vec<String> = toks.iter().map(|s| s.to_string()).collect();
        v[i] = t;
        v.join(" ")
    };
    for (i, t) in toks.iter().enumerate() {
        if let Some((n, l)) = t.split_once('x') {
            if let (Some(_), Some(x)) = (num(n), num(l)) {
                return Some((with(i, format!("{n}x*")), x, "tokens per sequence"));
            }
        }
    }
    for (i, t) in toks.iter().enumerate() {
        for p in ["T=", "T", "ctx"] {
            if let Some(x) = t.strip_prefix(p).and_then(num) {
                return Some((with(i, format!("{p}*")), x, "sequence length"));
            }
        }
    }
    for (i, t) in toks.iter().enumerate() {
        for p in ["B=", "B"] {
            if let Some(x) = t.strip_prefix(p).and_then(num) {
                return Some((with(i, format!("{p}*")), x, "batch"));
            }
        }
    }
    None
}

/// Whether `op`'s records are held to the bandwidth (plotted in TB/s).
fn memory_bound(op: &str, recs: &[&Record]) -> bool {
    op.ends_with("decode") || op == "router" || op == "merge" || recs.iter().all(|r| r.flops == 0.0)
}

#[derive(Default)]
struct Series {
    /// (x, ms, rate)
    pts: Vec<(f64, f64, f64)>,
    roof: Vec<(f64, f64, f64)>,
    peer: bool,
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, include_bytes!("../../assets/fonts/DejaVuSans.ttf"));
    });
}

/// Draw one PNG per op of `records` that has a sweep, next to `stem` (`<stem>-<op>.png`).
/// Returns the files written.
pub fn draw(stem: &Path, records: &[Record], peers: &[Peer]) -> Result<Vec<PathBuf>> {
    register_font();
    let mut by_op: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by_op.entry(r.op.as_str()).or_default().push(r);
    }
    let mut written = Vec::new();
    for (op, recs) in by_op {
        let mem = memory_bound(op, &recs);
        let mut series: BTreeMap<String, Series> = BTreeMap::new();
        let mut axis = "";
        for r in &recs {
            let Some((pat, x, ax)) = x_of(&r.shape) else { continue };
            let s = series.entry(format!("natsl {} | {pat}", r.variant)).or_default();
            let rate = if mem { r.tbps } else { r.tflops };
            s.pts.push((x, r.ms, rate));
            let roof_ms = ((r.flops / (r.peak_tflops * 1e12)).max(r.bytes / (r.peak_tbps * 1e12))) * 1e3;
            if roof_ms > 0.0 && roof_ms.is_finite() {
                let roof_rate = if mem { r.bytes / (roof_ms * 1e-3) / 1e12 } else { r.flops / (roof_ms * 1e-3) / 1e12 };
                s.roof.push((x, roof_ms, roof_rate));
            }
            axis = ax;
        }
        // A sweep: at least two lengths (or batches) of one shape.
        series.retain(|_, s| {
            s.pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            s.pts.dedup_by(|a, b| a.0 == b.0);
            s.pts.len() >= 2
        });
        if series.is_empty() {
            continue;
        }
        let patterns: Vec<String> = series.keys().filter_map(|k| k.split_once(" | ").map(|(_, p)| p.to_string())).collect();
        for p in peers.iter().filter(|p| p.op == op) {
            let Some((pat, x, _)) = x_of(&p.shape) else { continue };
            if !patterns.contains(&pat) {
                continue;
            }
            let rate = if mem { p.tbps } else { p.tflops };
            let Some(rate) = rate else { continue };
            let s = series.entry(format!("{} | {pat}", p.name)).or_default();
            s.peer = true;
            s.pts.push((x, p.ms, rate));
        }
        for s in series.values_mut() {
            s.pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            s.roof.sort_by(|a, b| a.0.total_cmp(&b.0));
            s.roof.dedup_by(|a, b| a.0 == b.0);
        }
        let path = PathBuf::from(format!("{}-{op}.png", stem.display()));
        let first = recs[0];
        let (_, _, measured) = (first.peak_tflops, first.peak_tbps, first.peaks_measured);
        let title = format!(
            "{op} on {} ({}, commit {}); roofline: {:.0} TFLOP/s, {:.2} TB/s {}",
            first.gpu,
            first.date,
            first.commit,
            first.peak_tflops,
            first.peak_tbps,
            if measured { "(measured by natsl bench peaks)" } else { "(H200 constants: peaks not measured)" }
        );
        chart(&path, &title, axis, if mem { "TB/s" } else { "TFLOP/s" }, &series).map_err(|e| Error::Unsupported(format!("drawing {}: {e}", path.display())))?;
        written.push(path);
    }
    Ok(written)
}

fn chart(path: &Path, title: &str, axis: &str, unit: &str, series: &BTreeMap<String, Series>) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let all = || series.values().flat_map(|s| s.pts.iter().chain(s.roof.iter()));
    let (mut x0, mut x1, mut t0, mut t1, mut r1) = (f64::MAX, 0f64, f64::MAX, 0f64, 0f64);
    for &(x, ms, rate) in all() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        t0 = t0.min(ms);
        t1 = t1.max(ms);
        r1 = r1.max(rate);
    }
    let (x0, x1) = (x0 / 1.3, x1 * 1.3);
    let (t0, t1) = (t0 / 1.5, t1 * 1.5);
    let r1 = (r1 * 1.1).max(1e-6);
    let (t0, t1) = if t1 > t0 { (t0, t1) } else { (t0 / 2.0, t0 * 2.0 + 1e-6) };
    let root = BitMapBackend::new(path, (1600, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (left, right) = root.split_horizontally(800);
    let colors = |i: usize| Palette99::pick(i).to_rgba();
    let style_of = |i: usize, s: &Series| -> ShapeStyle {
        let c = colors(i);
        if s.peer {
            c.stroke_width(2)
        } else {
            c.stroke_width(3)
        }
    };
    // Time, log-log.
    {
        let mut c = ChartBuilder::on(&left).margin(16).x_label_area_size(48).y_label_area_size(72).caption("time per call (ms, log)", ("sans-serif", 18)).build_cartesian_2d((x0..x1).log_scale(), (t0..t1).log_scale())?;
        c.configure_mesh().x_desc(axis).y_desc("ms").x_label_formatter(&|x| fmt_x(*x)).label_style(("sans-serif", 14)).draw()?;
        for (i, (name, s)) in series.iter().enumerate() {
            let st = style_of(i, s);
            c.draw_series(LineSeries::new(s.pts.iter().map(|p| (p.0, p.1)), st))?.label(name.clone()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], st));
            c.draw_series(s.pts.iter().map(|p| Circle::new((p.0, p.1), 4, st.filled())))?;
            if !s.roof.is_empty() {
                c.draw_series(dashed(s.roof.iter().map(|p| (p.0, p.1)).collect(), colors(i)))?;
            }
        }
        c.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).label_font(("sans-serif", 13)).position(SeriesLabelPosition::UpperLeft).draw()?;
    }
    // Throughput, log x.
    {
        let mut c = ChartBuilder::on(&right).margin(16).x_label_area_size(48).y_label_area_size(72).caption(format!("{unit} (dashed: roofline)"), ("sans-serif", 18)).build_cartesian_2d((x0..x1).log_scale(), 0f64..r1)?;
        c.configure_mesh().x_desc(axis).y_desc(unit).x_label_formatter(&|x| fmt_x(*x)).label_style(("sans-serif", 14)).draw()?;
        for (i, (_, s)) in series.iter().enumerate() {
            let st = style_of(i, s);
            c.draw_series(LineSeries::new(s.pts.iter().map(|p| (p.0, p.2)), st))?;
            c.draw_series(s.pts.iter().map(|p| Circle::new((p.0, p.2), 4, st.filled())))?;
            if !s.roof.is_empty() {
                c.draw_series(dashed(s.roof.iter().map(|p| (p.0, p.2)).collect(), colors(i)))?;
            }
        }
    }
    root.present()?;
    Ok(())
}

/// A dashed polyline (short segments along each edge).
fn dashed(pts: Vec<(f64, f64)>, color: RGBAColor) -> Vec<PathElement<(f64, f64)>> {
    let mut out = Vec::new();
    for w in pts.windows(2) {
        let ((xa, ya), (xb, yb)) = (w[0], w[1]);
        // In log x, split in geometric steps; y linearly between them.
        const N: usize = 24;
        for k in (0..N).step_by(2) {
            let f0 = k as f64 / N as f64;
            let f1 = (k + 1) as f64 / N as f64;
            let at = |f: f64| (xa * (xb / xa).powf(f), ya + (yb - ya) * f);
            out.push(PathElement::new(vec![at(f0), at(f1)], color.stroke_width(2)));
        }
    }
    if pts.len() == 1 {
        out.push(PathElement::new(vec![pts[0], pts[0]], color.stroke_width(2)));
    }
    out
}

fn fmt_x(x: f64) -> String {
    if x >= 1024.0 && (x / 1024.0).fract() == 0.0 {
        format!("{}k", x / 1024.0)
    } else {
        format!("{x:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_give_their_swept_number() {
        assert_eq!(x_of("natsl-340M 1x32768 6 128/256"), Some(("natsl-340M 1x* 6 128/256".into(), 32768.0, "tokens per sequence")));
        assert_eq!(x_of("prefill natsl 12h 64/128 T16384 rho 0.25").map(|x| x.1), Some(16384.0));
        assert_eq!(x_of("T=4096 D=1024 Hr=6").map(|x| x.0), Some("T=* D=1024 Hr=6".into()));
        assert_eq!(x_of("B32 h16/32 d128").map(|x| (x.1, x.2)), Some((32.0, "batch")));
        assert_eq!(x_of("decode natsl B32 ctx32768 rho 1").map(|x| x.2), Some("sequence length"));
        assert_eq!(x_of("P7 1024+7168 16/32"), None);
    }

    #[test]
    fn peers_parse_leniently() {
        let p = parse_peer(r#"{"op": "gdn_prefill", "peer": "fla-0.6.0", "shape": "P1 8x8192 16/16", "ms": 2.5, "tflops": 66.8}"#).unwrap();
        assert_eq!((p.name.as_str(), p.ms, p.tflops), ("fla-0.6.0", 2.5, Some(66.8)));
        let p = parse_peer(r#"{"op": "sparse_prefill", "shape": "x T8192", "variant": "sdpa-cudnn", "ms": 3.9, "tflops": 558.4}"#).unwrap();
        assert_eq!(p.name, "sdpa-cudnn");
        assert!(parse_peer("not json").is_none());
        assert!(parse_peer(r#"{"op": "x", "shape": "y", "peer": "z", "ms": 0}"#).is_none());
    }

    fn rec(op: &str, shape: &str, variant: &str, ms: f64, flops: f64) -> Record {
        Record {
            op: op.into(),
            shape: shape.into(),
            variant: variant.into(),
            ms,
            flops,
            bytes: 1e9,
            tflops: flops / (ms * 1e-3) / 1e12,
            tbps: 1e9 / (ms * 1e-3) / 1e12,
            roofline_frac: 0.5,
            peak_tflops: 771.0,
            peak_tbps: 4.2,
            peaks_measured: false,
            gpu: "test GPU".into(),
            commit: "abc".into(),
            date: "2026-12-05".into(),
        }
    }

    /// Draws a PNG from synthetic records and peers (no GPU): the file is a PNG of the
    /// requested size, and ops without a sweep draw nothing.
    #[test]
    fn draws_a_png_with_peers_and_roofline() {
        let dir = std::env::temp_dir().join(format!("natsl-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut recs = Vec::new();
        for (i, t) in [4096usize, 8192, 16384, 32768].into_iter().enumerate() {
            let f = 1e11 * (1 << i) as f64;
            recs.push(rec("gdn_prefill", &format!("natsl-340M 1x{t} 6 128/256 sweep"), "bf16", 0.2 * (1 << i) as f64, f));
        }
        recs.push(rec("gdn_decode", "B1 h16/32 d128", "bf16", 0.01, 0.0));
        let peers: Vec<Peer> = [4096usize, 8192, 16384, 32768].iter().enumerate().map(|(i, t)| Peer { op: "gdn_prefill".into(), shape: format!("natsl-340M 1x{t} 6 128/256 sweep"), name: "fla-0.6.0".into(), ms: 0.5 * (1 << i) as f64, tflops: Some(200.0), tbps: None }).collect();
        let files = draw(&dir.join("gdn-test"), &recs, &peers).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        let bytes = std::fs::read(&files[0]).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 1600);
        if std::env::var_os("NATSL_KEEP_PLOT").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        } else {
            println!("kept {}", files[0].display());
        }
    }
}
