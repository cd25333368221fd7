//! LoRA on the candle backend: per-row adapter updates added to the base projections' outputs.
//!
//! A step's rows come from sequences that may each use a different adapter (or none). After a
//! projection ran once over all rows with the base weights, every span of rows whose sequence
//! uses an adapter targeting that projection gets `scale * B (A x)` added, row by row with a
//! fixed order of operations, so a row's result does not depend on its neighbours. The base
//! weights are never touched.
use std::ops::Range;

use super::pool::{self, SharedMut};
use crate::lora::{LoraAdapter, Module};

/// Which rows of the step use which adapter.
pub struct RowAdapters<'a> {
    spans: Vec<(Range<usize>, &'a LoraAdapter)>,
    /// All rows of the step, base-model rows included: the row width of every activation.
    n_rows: usize,
}

impl<'a> RowAdapters<'a> {
    /// `spans`: each adapted sequence's rows and its adapter (base-model sequences are left
    /// out, so the spans need not reach the last row); `n_rows`: the step's row count.
    pub fn new(spans: Vec<(Range<usize>, &'a LoraAdapter)>, n_rows: usize) -> Self {
        debug_assert!(spans.iter().all(|(r, _)| r.start < r.end && r.end <= n_rows), "a span outside the step's {n_rows} rows");
        debug_assert!(
            {
                let mut sorted: Vec<&Range<usize>> = spans.iter().map(|(r, _)| r).collect();
                sorted.sort_by_key(|r| r.start);
                sorted.windows(2).all(|w| w[0].end <= w[1].start)
            },
            "adapter spans overlap"
        );
        Self { spans, n_rows }
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Whether any row's adapter targets `(layer, m)`.
    pub fn targets(&self, layer: usize, m: Module) -> bool {
        self.spans.iter().any(|(_, a)| a.get(layer, m).is_some())
    }

    /// Adds the updates of `(layer, m)` to `out` (`[rows, out_dim]`) for input `x` (`[rows, in]`).
    pub fn apply(&self, layer: usize, m: Module, x: &[f32], out: &mut [f32]) {
        let n_rows = self.n_rows;
        if n_rows == 0 || self.spans.is_empty() {
            return;
        }
        let (in_dim, out_dim) = (x.len() / n_rows, out.len() / n_rows);
        debug_assert_eq!(x.len(), n_rows * in_dim, "input of {} values is not {n_rows} rows", x.len());
        debug_assert_eq!(out.len(), n_rows * out_dim, "output of {} values is not {n_rows} rows", out.len());
        let work: Vec<(usize, &crate::lora::LoraPair)> = self
            .spans
            .iter()
            .filter_map(|(r, a)| a.get(layer, m).map(|p| (r.clone(), p)))
            .flat_map(|(r, p)| r.map(move |row| (row, p)))
            .collect();
        if work.is_empty() {
            return;
        }
        debug_assert!(work.iter().all(|(_, p)| p.in_dim == in_dim && p.out_dim == out_dim));
        let dst = SharedMut(out.as_mut_ptr());
        pool::global().run_ranges(work.len(), 1, 4, &|range| {
            for &(row, p) in &work[range] {
                // SAFETY: every row appears once in `work`, so chunks write disjoint rows of `out`.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(row * out_dim), out_dim) };
                p.apply(&x[row * in_dim..(row + 1) * in_dim], o);
            }
        });
    }
}
