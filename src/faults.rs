//! Faults recorded by the kernels: device-resident inputs that were out of their range.
//!
//! State-pool indices, labels, page tables and lengths, and the sparse prefill's block
//! lists live in device memory (engines
//! build them there, often inside a CUDA graph), so the host cannot check them without a
//! synchronisation. The kernels treat a bad value as documented below, never reading or
//! writing out of bounds, and record it in one word per device, which
//! [`Runtime::device_faults`](crate::Runtime::device_faults) reads and clears. The value
//! -1 in an index array is never a fault: it marks a padded slot, which is skipped.

use crate::params::{NATSL_FAULT_LABEL, NATSL_FAULT_LIST_ORDER, NATSL_FAULT_PAGE_ID, NATSL_FAULT_PAGE_LEN, NATSL_FAULT_POOL_INDEX};
use std::fmt;

/// The fault bits the kernels set since the word was last read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceFaults(pub u32);

impl DeviceFaults {
    const NAMES: [(u32, &'static str); 5] = [
        (NATSL_FAULT_POOL_INDEX, "state-pool index out of range (the sequence or row was skipped)"),
        (NATSL_FAULT_LABEL, "label other than 0, 1, 2 (read as GDN)"),
        (NATSL_FAULT_PAGE_ID, "page id out of range (the page was skipped)"),
        (NATSL_FAULT_PAGE_LEN, "page count or current-page length out of range (clamped)"),
        (NATSL_FAULT_LIST_ORDER, "sparse-prefill list entry repeated or out of order (skipped)"),
    ];

    /// No fault was recorded.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// A state-pool index outside `[-1, rows)` (GDN prefill and decode): the row is not
    /// read (zeros) or not written; a decode sequence is skipped whole (its output rows are
    /// zeros, its pools, `pos` and `gsum` untouched).
    pub fn pool_index(self) -> bool {
        self.0 & NATSL_FAULT_POOL_INDEX != 0
    }
    /// A label other than GDN (0), ATTN (1) or PARTIAL (2): read as GDN.
    pub fn label(self) -> bool {
        self.0 & NATSL_FAULT_LABEL != 0
    }
    /// A page id (table entry or current page) outside `[-1, num_pages)`: the page is skipped.
    pub fn page_id(self) -> bool {
        self.0 & NATSL_FAULT_PAGE_ID != 0
    }
    /// A `page_count` outside `[0, max_pages]` or a `cur_len` outside `[0, 64]`: clamped.
    pub fn page_len(self) -> bool {
        self.0 & NATSL_FAULT_PAGE_LEN != 0
    }
    /// A sparse-prefill list entry (router `attn_list` or block-list `kv_indices`) that
    /// is `>= 0` but not greater than every earlier entry of its list: a repeat or an
    /// entry out of order. It is skipped, by every prefill kernel alike, so the list
    /// acts as its running maxima (strictly ascending); without the skip a repeated
    /// block would be counted twice. Entries `< 0` are padding, skipped silently.
    pub fn list_order(self) -> bool {
        self.0 & NATSL_FAULT_LIST_ORDER != 0
    }
}

impl fmt::Display for DeviceFaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no device faults");
        }
        let mut first = true;
        for (bit, name) in Self::NAMES {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str("; ")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        let unknown = self.0 & !Self::NAMES.iter().fold(0, |a, (b, _)| a | b);
        if unknown != 0 {
            write!(f, "{}unknown fault bits {unknown:#x}", if first { "" } else { "; " })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn names_every_bit() {
        assert_eq!(DeviceFaults(0).to_string(), "no device faults");
        let all = DeviceFaults(0x1f);
        assert!(all.pool_index() && all.label() && all.page_id() && all.page_len() && all.list_order());
        assert_eq!(all.to_string().matches("; ").count(), 4);
        assert!(DeviceFaults(0x40).to_string().contains("unknown fault bits 0x40"));
        assert!(DeviceFaults(NATSL_FAULT_LIST_ORDER).to_string().contains("out of order"));
    }
}
