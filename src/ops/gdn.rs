//! Gated DeltaNet chunk scan (prefill) and decode: written by the GDN family.
