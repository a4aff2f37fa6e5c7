//! Block-sparse flash softmax (prefill) and paged decode: written by the sparse family.
