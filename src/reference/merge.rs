//! Merge epilogue (SPEC §6): normalise, weight and gate the two branch outputs.

use super::rms_normalize;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `out = (a * gamma_gdn ⊙ rms(o_gdn) + b * gamma_att ⊙ rms(o_att)) ⊙ z ⊙ sigmoid(z)`
/// with `(a, b) = softmax(w[t, j, 0], w[t, j, 1])` (weight 0 multiplies the GDN branch).
/// Layouts: o_gdn, o_att, z, out `[T, Ha, dvs]`; w `[T, Ha, 2]`; gammas `[dvs]`.
#[allow(clippy::too_many_arguments)]
pub fn merge(
    o_gdn: &[f64],
    o_att: &[f64],
    w: &[f64],
    gamma_gdn: &[f64],
    gamma_att: &[f64],
    z: &[f64],
    ha: usize,
    dvs: usize,
) -> Vec<f64> {
    let rows = z.len() / dvs;
    assert_eq!(z.len() % (ha * dvs), 0, "z must be [T, Ha, dvs]");
    assert_eq!(o_gdn.len(), z.len(), "o_gdn must be [T, Ha, dvs]");
    assert_eq!(o_att.len(), z.len(), "o_att must be [T, Ha, dvs]");
    assert_eq!(w.len(), rows * 2, "w must be [T, Ha, 2]");
    assert_eq!(gamma_gdn.len(), dvs, "gamma_gdn must be [dvs]");
    assert_eq!(gamma_att.len(), dvs, "gamma_att must be [dvs]");

    let mut out = Vec::with_capacity(z.len());
    for row in 0..rows {
        let sl = row * dvs..(row + 1) * dvs;
        let (w0, w1) = (w[2 * row], w[2 * row + 1]);
        let m = w0.max(w1);
        let (e0, e1) = ((w0 - m).exp(), (w1 - m).exp());
        let (a, b) = (e0 / (e0 + e1), e1 / (e0 + e1));
        let ng = rms_normalize(&o_gdn[sl.clone()], Some(gamma_gdn));
        let na = rms_normalize(&o_att[sl.clone()], Some(gamma_att));
        for (d, zi) in z[sl].iter().enumerate() {
            let y = a * ng[d] + b * na[d];
            out.push(y * zi * sigmoid(*zi));
        }
    }
    out
}
