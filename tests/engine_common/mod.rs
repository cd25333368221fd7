//! Shared fixtures for the engine tests: a tiny byte-level BPE tokenizer built in code and a
//! deterministic mock backend whose logits depend only on each sequence's own token history.
#![allow(dead_code)]
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use inferd::backend::{Backend, BackendError, KvCapacity, SeqId, StepInput};
use inferd::engine::{Event, FinishReason, GenRequest, SamplingParams};
use tokenizers::Tokenizer;

/// GPT-2's byte-to-unicode mapping, in byte order.
pub fn byte_chars() -> Vec<char> {
    let mut direct: Vec<u32> = ('!' as u32..='~' as u32).collect();
    direct.extend('¡' as u32..='¬' as u32);
    direct.extend('®' as u32..='ÿ' as u32);
    let mut n = 0;
    (0u32..256)
        .map(|b| {
            if direct.contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            }
        })
        .collect()
}

/// Ids 0..=255 are the bytes, 256.. a few merges, and the last id is `<eos>` (special).
pub const MERGES: &[(&str, &str)] = &[("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r")];

pub fn tiny_tokenizer() -> (Tokenizer, u32) {
    let mut vocab = serde_json::Map::new();
    for (i, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), i.into());
    }
    let mut next = 256u32;
    let mut merges = Vec::new();
    for (a, b) in MERGES {
        vocab.insert(format!("{a}{b}"), next.into());
        merges.push(format!("{a} {b}"));
        next += 1;
    }
    let eos = next;
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": eos, "content": "<eos>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": merges}
    });
    let tok = Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).expect("tiny tokenizer builds");
    (tok, eos)
}

/// What the mock saw.
#[derive(Debug, Default)]
pub struct MockLog {
    /// Per step: (seq, tokens fed, want_logits).
    pub steps: Vec<Vec<(SeqId, usize, bool)>>,
    /// Adapter names seen, per step row.
    pub adapters: Vec<Option<String>>,
    /// (number of steps run so far, seq) per release call.
    pub releases: Vec<(usize, SeqId)>,
}

/// Deterministic backend: logits are a hash of the sequence's full history.
pub struct MockBackend {
    pub vocab: usize,
    pub max_context: usize,
    /// Enforced limit (may be below `max_context` to exercise `BackendError::ContextFull`).
    pub hard_limit: usize,
    pub eos: u32,
    /// Put EOS on top once a history reaches this length.
    pub eos_at_len: Option<usize>,
    /// Forced next tokens after the prompt (first chunk length), by output position.
    pub script: Option<Vec<u32>>,
    /// Step numbers (0-based) that fail with a compute error.
    pub fail_steps: Vec<usize>,
    /// Step numbers (0-based) that panic.
    pub panic_steps: Vec<usize>,
    pub delay: Duration,
    /// A bounded KV cache: (block size, total blocks); None: unbounded.
    pub kv: Option<(usize, usize)>,
    /// Blocks `kv_capacity` claims free beyond the truth (exercises `BackendError::KvFull`).
    pub kv_overstate: usize,
    pub log: Arc<Mutex<MockLog>>,
    hist: HashMap<SeqId, (usize, Vec<u32>)>,
}

impl MockBackend {
    pub fn new(vocab: usize, eos: u32) -> (Self, Arc<Mutex<MockLog>>) {
        let log = Arc::new(Mutex::new(MockLog::default()));
        let b = Self {
            vocab,
            max_context: 4096,
            hard_limit: 4096,
            eos,
            eos_at_len: None,
            script: None,
            fail_steps: Vec::new(),
            panic_steps: Vec::new(),
            delay: Duration::ZERO,
            kv: None,
            kv_overstate: 0,
            log: Arc::clone(&log),
            hist: HashMap::new(),
        };
        (b, log)
    }
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The logits the mock gives a history (public so tests can predict greedy tokens).
pub fn mock_logits(hist: &[u32], vocab: usize, eos: u32) -> Vec<f32> {
    let h = hist.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| mix(h ^ t as u64));
    let mut l: Vec<f32> = (0..vocab).map(|i| (mix(h ^ (i as u64) << 1) >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0).collect();
    l[eos as usize] = -50.0;
    l
}

impl Backend for MockBackend {
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn max_context(&self) -> usize {
        self.max_context
    }
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Option<Vec<f32>>>, BackendError> {
        std::thread::sleep(self.delay);
        let n = {
            let mut log = self.log.lock().unwrap();
            log.steps.push(inputs.iter().map(|i| (i.seq, i.tokens.len(), i.want_logits)).collect());
            log.adapters.extend(inputs.iter().map(|i| i.adapter.map(|a| a.name.clone())));
            log.steps.len() - 1
        };
        if self.panic_steps.contains(&n) {
            panic!("injected panic");
        }
        if self.fail_steps.contains(&n) {
            return Err(BackendError::Compute("injected failure".into()));
        }
        for i in inputs {
            let have = self.hist.get(&i.seq).map_or(0, |h| h.1.len());
            if have + i.tokens.len() > self.hard_limit {
                return Err(BackendError::ContextFull { seq: i.seq, max: self.hard_limit });
            }
        }
        if let Some((bs, total)) = self.kv {
            let mut free = total - self.blocks_used(bs);
            for i in inputs {
                let have = self.hist.get(&i.seq).map_or(0, |h| h.1.len());
                let need = (have + i.tokens.len()).div_ceil(bs) - have.div_ceil(bs);
                free = free.checked_sub(need).ok_or(BackendError::KvFull { seq: i.seq })?;
            }
        }
        let mut out = Vec::new();
        for i in inputs {
            let e = self.hist.entry(i.seq).or_insert_with(|| (i.tokens.len(), Vec::new()));
            e.1.extend_from_slice(i.tokens);
            if !i.want_logits {
                out.push(None);
                continue;
            }
            let (plen, hist) = (e.0, &e.1);
            let mut l = mock_logits(hist, self.vocab, self.eos);
            if self.eos_at_len.is_some_and(|n| hist.len() >= n) {
                l[self.eos as usize] = 50.0;
            }
            if let Some(tok) = self.script.as_ref().and_then(|s| s.get(hist.len() - plen)) {
                l[*tok as usize] = 60.0;
            }
            out.push(Some(l));
        }
        Ok(out)
    }
    fn kv_capacity(&self) -> Option<KvCapacity> {
        let (bs, total) = self.kv?;
        Some(KvCapacity { block_size: bs, free_blocks: (total - self.blocks_used(bs) + self.kv_overstate).min(total), total_blocks: total })
    }
    fn release(&mut self, seq: SeqId) {
        self.hist.remove(&seq);
        let mut log = self.log.lock().unwrap();
        let n = log.steps.len();
        log.releases.push((n, seq));
    }
}

impl MockBackend {
    fn blocks_used(&self, bs: usize) -> usize {
        self.hist.values().map(|h| h.1.len().div_ceil(bs)).sum()
    }
}

pub fn greedy() -> SamplingParams {
    SamplingParams { temperature: 0.0, ..SamplingParams::default() }
}

pub fn req(prompt: Vec<u32>, max_new: usize, sampling: SamplingParams) -> GenRequest {
    GenRequest {
        prompt_tokens: prompt,
        sampling,
        max_new_tokens: max_new,
        stop: Vec::new(),
        logprobs: None,
        ignore_eos: false,
        adapter: None,
        constraint: None,
    }
}

/// Everything one sequence produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Collected {
    pub ids: Vec<u32>,
    pub text: String,
    pub events: Vec<Event>,
    pub finish: Option<FinishReason>,
    pub completion_tokens: usize,
    pub error: Option<String>,
}

/// Reads a receiver to the end (blocking; call outside a runtime).
pub fn collect(mut rx: tokio::sync::mpsc::Receiver<Event>) -> Collected {
    let mut c = Collected { ids: vec![], text: String::new(), events: vec![], finish: None, completion_tokens: 0, error: None };
    while let Some(ev) = rx.blocking_recv() {
        match &ev {
            Event::Token { text, token_id, .. } => {
                c.ids.push(*token_id);
                c.text.push_str(text);
            }
            Event::Done { finish_reason, completion_tokens, .. } => {
                c.finish = Some(*finish_reason);
                c.completion_tokens = *completion_tokens;
            }
            Event::Error(e) => c.error = Some(e.clone()),
        }
        c.events.push(ev);
    }
    c
}

/// A backend that pipelines its steps (async scheduling) on top of another: `launch` runs the
/// step at once, each following row fed its sequence's last pick, and `collect` hands the
/// results out in launch order after `collect_delay` (a device's time). It checks the engine
/// keeps the contract: at most two steps uncollected, a following row only behind a launched
/// pick of its sequence.
pub struct Pipelining<B: Backend> {
    pub inner: B,
    pub collect_delay: Duration,
    /// Launches that had following rows, and following rows in all.
    pub follow_log: Arc<Mutex<(usize, usize)>>,
    /// Collects (0-based) that fail with a compute error, as a device fault surfaces there.
    pub fail_collects: Vec<usize>,
    collects: usize,
    /// Each sequence's last pick, and whether it is not collected yet.
    last: HashMap<SeqId, (u32, bool)>,
    /// Launched steps not collected: their results and the sequences they sample.
    queue: std::collections::VecDeque<(Vec<Option<inferd::engine::sampler::Sampled>>, Vec<SeqId>)>,
}

impl<B: Backend> Pipelining<B> {
    pub fn new(inner: B) -> Self {
        Self { inner, collect_delay: Duration::ZERO, follow_log: Arc::default(), fail_collects: Vec::new(), collects: 0, last: HashMap::new(), queue: Default::default() }
    }
}

impl<B: Backend> Backend for Pipelining<B> {
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn max_context(&self) -> usize {
        self.inner.max_context()
    }
    fn step(&mut self, _: &[StepInput<'_>]) -> Result<Vec<Option<Vec<f32>>>, BackendError> {
        panic!("a pipelining backend is launched and collected, never stepped")
    }
    fn pipelines(&self) -> bool {
        true
    }
    fn launch(&mut self, inputs: &[StepInput<'_>], samples: &[Option<inferd::engine::sampler::SampleSpec<'_>>], follows: &[bool]) -> Result<(), BackendError> {
        assert!(self.queue.len() < 2, "a third step launched before the first was collected");
        assert_eq!((inputs.len(), samples.len()), (follows.len(), follows.len()));
        let fed: Vec<u32> = inputs
            .iter()
            .zip(follows)
            .map(|(i, &f)| {
                if !f {
                    return 0;
                }
                assert_eq!(i.tokens, &[inferd::backend::FOLLOWS], "a following row's token is the placeholder");
                let (t, pending) = *self.last.get(&i.seq).expect("a following row's sequence has a launched pick");
                assert!(pending, "sequence {}: a row follows a pick that was already collected or followed", i.seq);
                t
            })
            .collect();
        let real: Vec<StepInput<'_>> = inputs.iter().zip(follows).zip(&fed).map(|((i, &f), t)| if f { StepInput { tokens: std::slice::from_ref(t), ..*i } } else { *i }).collect();
        let outs = self.inner.step_and_sample(&real, samples)?;
        let n_follow = follows.iter().filter(|&&f| f).count();
        if n_follow > 0 {
            let mut log = self.follow_log.lock().unwrap();
            log.0 += 1;
            log.1 += n_follow;
        }
        for ((i, &f), o) in inputs.iter().zip(follows).zip(&outs) {
            if f {
                self.last.get_mut(&i.seq).unwrap().1 = false;
            }
            if let Some(o) = o {
                self.last.insert(i.seq, (o.token, true));
            }
        }
        let sampled = inputs.iter().filter(|i| i.want_logits).map(|i| i.seq).collect();
        self.queue.push_back((outs, sampled));
        Ok(())
    }
    fn collect(&mut self) -> Result<Vec<Option<inferd::engine::sampler::Sampled>>, BackendError> {
        std::thread::sleep(self.collect_delay);
        let (outs, _) = self.queue.pop_front().expect("collect() only after a launch");
        self.collects += 1;
        if self.fail_collects.contains(&(self.collects - 1)) {
            return Err(BackendError::Compute("injected device fault".into()));
        }
        Ok(outs)
    }
    fn kv_capacity(&self) -> Option<KvCapacity> {
        self.inner.kv_capacity()
    }
    fn release(&mut self, seq: SeqId) {
        assert!(!self.queue.iter().any(|q| q.1.contains(&seq)), "sequence {seq} released with a pick not collected");
        self.last.remove(&seq);
        self.inner.release(seq)
    }
}
