//! One step of the onnx backend: which `Run`s a step makes and over which slots (see the
//! module docs of `backend::onnx`): decode rows batched over a slot range, first prompt chunks
//! of new sequences batched right-padded, other chunks alone; with LoRA, the rows' adapters.
use std::ffi::CString;
use std::sync::Arc;

use super::run::View;
use super::{shapes, OnnxBackend, RowOut};
use crate::backend::{BackendError, SeqId, StepInput};
use crate::lora::LoraAdapter;

impl OnnxBackend {
    /// The LoRA inputs for one run whose batch row `i` uses adapter `rows[i]` (none, or only
    /// the row mask, when every row runs the base model).
    pub(super) fn adapter_inputs(&mut self, rows: &[Option<&Arc<LoraAdapter>>]) -> Result<Vec<(CString, View)>, BackendError> {
        match self.lora.as_mut() {
            Some(g) => g.run_inputs(rows, &self.host).map_err(BackendError::Compute),
            None => Ok(Vec::new()),
        }
    }

    /// The batching group of a row with `adapter`: rows of different groups never share a
    /// `Run`. Graphs with the LoRA row mask mix adapters, so everything is one group.
    fn group_of(&self, adapter: Option<&Arc<LoraAdapter>>) -> u64 {
        match (&self.lora, adapter) {
            (Some(g), Some(a)) if !g.mixes() => a.id,
            _ => 0,
        }
    }

    /// First prompt chunks of new sequences on adjacent slots (`rows`, sorted by slot), of one
    /// group, in one right-padded run.
    fn prefill_together(
        &mut self,
        inputs: &[StepInput<'_>],
        slots: &[usize],
        rows: &[usize],
        out: &mut [Option<RowOut>],
    ) -> Result<(), BackendError> {
        let (lo, b) = (slots[rows[0]], rows.len());
        let s = rows.iter().map(|&i| inputs[i].tokens.len()).max().unwrap_or(1);
        let mut tokens = vec![0i64; b * s];
        let mut new = Vec::with_capacity(b);
        for (r, &i) in rows.iter().enumerate() {
            let t = inputs[i].tokens;
            for (j, &x) in t.iter().enumerate() {
                tokens[r * s + j] = i64::from(x);
            }
            new.push(t.len());
        }
        let adapters: Vec<_> = rows.iter().map(|&i| inputs[i].adapter).collect();
        let extra = self.adapter_inputs(&adapters)?;
        self.forward(lo, b, s, &mut tokens, &vec![0; b], &new, &extra)?;
        let picks: Vec<(usize, usize, usize)> = rows.iter().enumerate().filter(|&(_, &i)| inputs[i].want_logits).map(|(r, &i)| (i, r, new[r] - 1)).collect();
        self.emit(s, b, &picks, out)?;
        for (r, &i) in rows.iter().enumerate() {
            self.kv.set_len(slots[i], new[r]);
        }
        Ok(())
    }

    /// With several adapters in use, keeps each adapter's sequences on adjacent slots (ordered by
    /// adapter, packed from slot 0) so that each group's decode run covers only its own rows.
    /// Moves happen only when the layout changed (a sequence joined, left or switched adapter);
    /// each copies the two slots' positions in use.
    fn group_slots(&mut self) {
        let owners = self.kv.owners().to_vec();
        let mut live: Vec<(u64, usize, SeqId)> = owners
            .iter()
            .enumerate()
            .filter_map(|(slot, o)| o.map(|seq| (self.adapter_of.get(&seq).copied().unwrap_or(0), slot, seq)))
            .collect();
        if live.iter().all(|l| l.0 == live[0].0) {
            return;
        }
        live.sort();
        for (target, &(_, _, seq)) in live.iter().enumerate() {
            let Some(now) = self.kv.slot(seq) else { continue };
            if now != target && !self.kv.swap_slots(now, target) {
                return; // device memory: leave the layout as it is
            }
        }
    }

    pub(super) fn step_inner(&mut self, inputs: &[StepInput<'_>], out: &mut [Option<RowOut>]) -> Result<(), BackendError> {
        self.kv.shrink();
        for inp in inputs {
            self.kv.slot_for(inp.seq).expect("check() counted the free slots");
            // Every row's adapter, whatever the graph: slot grouping and the prefix cache's
            // keys (positions computed under one adapter serve only that adapter) read it.
            self.adapter_of.insert(inp.seq, inp.adapter.map_or(0, |a| a.id));
        }
        if self.lora.as_ref().is_some_and(|g| !g.mixes()) {
            self.group_slots();
        }
        let slots: Vec<usize> = inputs.iter().map(|inp| self.kv.slot(inp.seq).expect("assigned above")).collect();
        if let Some(g) = self.lora.as_mut() {
            g.forget_unused();
        }
        // Decode rows: one batched run per group, over the slots from the group's lowest to its
        // highest (other slots in between ride along as padding rows).
        let mut groups: std::collections::BTreeMap<u64, Vec<usize>> = std::collections::BTreeMap::new();
        for i in (0..inputs.len()).filter(|&i| inputs[i].tokens.len() == 1) {
            groups.entry(self.group_of(inputs[i].adapter)).or_default().push(i);
        }
        for rows in groups.values() {
            let lo = rows.iter().map(|&i| slots[i]).min().expect("groups are not empty");
            let hi = rows.iter().map(|&i| slots[i]).max().expect("groups are not empty");
            let (lo, b) = if self.fixed_shapes { shapes::decode_range(lo, hi, self.kv.shape.slots) } else { (lo, hi - lo + 1) };
            let lens: Vec<usize> = self.kv.lens()[lo..lo + b].to_vec();
            let mut tokens = vec![0i64; b];
            let mut adapters = vec![None; b];
            for &i in rows {
                tokens[slots[i] - lo] = i64::from(inputs[i].tokens[0]);
                adapters[slots[i] - lo] = inputs[i].adapter;
            }
            let extra = self.adapter_inputs(&adapters)?;
            self.forward(lo, b, 1, &mut tokens, &lens, &vec![1; b], &extra)?;
            let picks: Vec<(usize, usize, usize)> = rows.iter().filter(|&&i| inputs[i].want_logits).map(|&i| (i, slots[i] - lo, 0)).collect();
            self.emit(1, b, &picks, out)?;
            for &i in rows {
                let slot = slots[i];
                self.kv.set_len(slot, lens[slot - lo] + 1);
            }
        }
        // Prompt chunks. First chunks of new sequences on adjacent slots in the same group
        // run together (GroupQueryAttention's first-prompt mode takes right-padded rows); every
        // other chunk runs alone on its own slot.
        let mut single: Vec<usize> = Vec::new();
        let mut fresh: std::collections::BTreeMap<u64, Vec<usize>> = std::collections::BTreeMap::new();
        for i in (0..inputs.len()).filter(|&i| inputs[i].tokens.len() > 1) {
            // A graph pruned by the builder returns the last position of the padded row, so it
            // prefills alone; with the logits index (`prune`) each row names its own position.
            if self.kv.lens()[slots[i]] == 0 && (!self.last_only || self.names.logits_index.is_some()) {
                fresh.entry(self.group_of(inputs[i].adapter)).or_default().push(i);
            } else {
                single.push(i);
            }
        }
        for mut rows in fresh.into_values() {
            rows.sort_by_key(|&i| slots[i]);
            let mut start = 0;
            while start < rows.len() {
                let mut end = start + 1;
                while end < rows.len() && slots[rows[end]] == slots[rows[end - 1]] + 1 {
                    end += 1;
                }
                match &rows[start..end] {
                    [one] => single.push(*one),
                    run if self.fixed_shapes => {
                        let mut at = 0;
                        for n in shapes::pow2_parts(run.len()) {
                            self.prefill_together(inputs, &slots, &run[at..at + n], out)?;
                            at += n;
                        }
                    }
                    run => self.prefill_together(inputs, &slots, run, out)?,
                }
                start = end;
            }
        }
        for i in single {
            let (slot, s) = (slots[i], inputs[i].tokens.len());
            let len = self.kv.lens()[slot];
            let mut tokens: Vec<i64> = inputs[i].tokens.iter().map(|&t| i64::from(t)).collect();
            let extra = self.adapter_inputs(&[inputs[i].adapter])?;
            self.forward(slot, 1, s, &mut tokens, &[len], &[s], &extra)?;
            if inputs[i].want_logits {
                self.emit(s, 1, &[(i, 0, s - 1)], out)?;
            }
            self.kv.set_len(slot, len + s);
        }
        Ok(())
    }
}
