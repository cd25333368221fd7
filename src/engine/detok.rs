//! Incremental detokenisation: turning a growing list of token ids into text, one valid UTF-8
//! chunk at a time.
//!
//! Decoding each token alone breaks spacing (SentencePiece's leading "▁") and multi-byte characters
//! split across byte-level BPE tokens. Like TGI and vLLM we keep two offsets into the ids: decode
//! `ids[prefix..read]` and `ids[prefix..]`, and emit the new suffix only when it is longer and does
//! not end in U+FFFD (an incomplete character). Special tokens are skipped.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tokenizers::Tokenizer;

/// How many prompt tokens to decode as left context for the first generated tokens.
const PROMPT_CONTEXT: usize = 5;

/// Per-sequence detokeniser state.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDetokenizer {
    /// Starts after `prompt`: its last few tokens are context only and never emitted.
    pub fn new(prompt: &[u32]) -> Self {
        let ctx = &prompt[prompt.len().saturating_sub(PROMPT_CONTEXT)..];
        Self { ids: ctx.to_vec(), prefix_offset: 0, read_offset: ctx.len() }
    }

    /// Appends a token; returns the newly complete text (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.push_with(tok, None, id)
    }

    /// [`IncrementalDetokenizer::push`], decoding through `table` when the tokenizer has one
    /// ([`ByteTable`]: the same text, without the tokenizer's allocations).
    pub fn push_with(&mut self, tok: &Tokenizer, table: Option<&ByteTable>, id: u32) -> String {
        self.ids.push(id);
        let prefix = decode(tok, table, &self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(tok, table, &self.ids[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            if let Some(new) = suffix_after(&full, &prefix) {
                let new = new.to_owned();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                self.compact();
                return new;
            }
        }
        String::new()
    }

    /// Releases whatever is still pending at the end of generation (an incomplete character
    /// becomes U+FFFD, as a lossy decode would).
    pub fn finish(&mut self, tok: &Tokenizer) -> String {
        self.finish_with(tok, None)
    }

    /// [`IncrementalDetokenizer::finish`] through `table` (see [`IncrementalDetokenizer::push_with`]).
    pub fn finish_with(&mut self, tok: &Tokenizer, table: Option<&ByteTable>) -> String {
        let prefix = decode(tok, table, &self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(tok, table, &self.ids[self.prefix_offset..]);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        match suffix_after(&full, &prefix) {
            Some(s) => s.to_owned(),
            None => String::new(),
        }
    }

    /// Drops ids before the prefix window so memory stays bounded on long generations.
    fn compact(&mut self) {
        if self.prefix_offset > 256 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }
}

/// The text after `prefix` in `full`; falls back to byte offsets when the decoder re-spaced the
/// prefix, and to None when that is not a character boundary.
fn suffix_after<'a>(full: &'a str, prefix: &str) -> Option<&'a str> {
    if let Some(s) = full.strip_prefix(prefix) {
        return Some(s);
    }
    full.get(prefix.len()..)
}

fn decode(tok: &Tokenizer, table: Option<&ByteTable>, ids: &[u32]) -> String {
    if ids.is_empty() {
        return String::new();
    }
    let Some(table) = table else {
        return tok.decode(ids, true).unwrap_or_default();
    };
    let text = table.decode(ids);
    debug_assert_eq!(text, tok.decode(ids, true).unwrap_or_default(), "the byte table decodes {ids:?} as the tokenizer does");
    text
}

/// Each token's bytes as a tokenizer whose decoder is exactly byte-level BPE's gives them (None:
/// a special token, which decoding skips). Decoding ids is then concatenating their bytes and
/// converting lossily to UTF-8, which is what `Tokenizer::decode(ids, true)` does for such a
/// tokenizer (per token: its added or model string, each character through GPT-2's table, or the
/// string's own bytes when a character is outside it) without a `String` per token. Built once per
/// model; the incremental detokeniser decodes two short windows per generated token, the largest
/// part of the worker's per-row work after a step on a GPU (docs/perf-notes.md, session 15).
pub struct ByteTable(Vec<Option<Box<[u8]>>>);

impl ByteTable {
    /// The table for `tok`, or None when its decoder is not byte-level BPE's alone.
    pub fn new(tok: &Tokenizer) -> Option<ByteTable> {
        if !matches!(tok.get_decoder(), Some(tokenizers::DecoderWrapper::ByteLevel(_))) {
            return None;
        }
        let added = tok.get_added_vocabulary();
        let n = tok.get_vocab_size(true) as u32;
        let max_id = (0..n).chain(added.get_vocab().values().copied()).max().map_or(0, |m| m + 1);
        let table = (0..max_id)
            .map(|id| {
                let piece = tok.id_to_token(id)?;
                if added.is_special_token(&piece) {
                    return None;
                }
                Some(byte_level_bytes(&piece).unwrap_or_else(|| piece.into_bytes()).into_boxed_slice())
            })
            .collect();
        Some(ByteTable(table))
    }

    /// The table for `tok`, built once and shared by every worker of the model that holds this
    /// tokenizer (a model on several devices has one worker each). None as for `new`.
    pub fn shared(tok: &Arc<Tokenizer>) -> Option<Arc<ByteTable>> {
        type Built = Vec<(Weak<Tokenizer>, Option<Arc<ByteTable>>)>;
        static BUILT: Mutex<Built> = Mutex::new(Vec::new());
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        built.retain(|(t, _)| t.strong_count() > 0);
        if let Some((_, table)) = built.iter().find(|(t, _)| t.as_ptr() == Arc::as_ptr(tok)) {
            return table.clone();
        }
        let table = ByteTable::new(tok).map(Arc::new);
        built.push((Arc::downgrade(tok), table.clone()));
        table
    }

    /// `ids` decoded, special and unknown ids skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 8);
        for &id in ids {
            if let Some(Some(b)) = self.0.get(id as usize) {
                bytes.extend_from_slice(b);
            }
        }
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }
}

/// GPT-2's byte-to-unicode table inverted: maps the printable stand-in characters of byte-level
/// BPE vocabularies back to raw bytes.
fn byte_level_inverse() -> &'static HashMap<char, u8> {
    static TABLE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut direct: Vec<u32> = ('!' as u32..='~' as u32).collect();
        direct.extend('¡' as u32..='¬' as u32);
        direct.extend('®' as u32..='ÿ' as u32);
        let mut map = HashMap::new();
        let mut n = 0u32;
        for b in 0u32..256 {
            let c = if direct.contains(&b) {
                b
            } else {
                n += 1;
                255 + n
            };
            map.insert(char::from_u32(c).expect("byte-level table maps into valid chars"), b as u8);
        }
        map
    })
}

/// A byte-level BPE vocabulary entry's raw bytes: each character through GPT-2's table inverted
/// (None when a character is not in it).
fn byte_level_bytes(piece: &str) -> Option<Vec<u8>> {
    let inv = byte_level_inverse();
    piece.chars().map(|c| inv.get(&c).copied()).collect()
}

/// The raw bytes of one vocabulary entry, for logprobs: byte-level BPE entries are mapped back
/// through GPT-2's table, SentencePiece byte-fallback entries (`<0xE2>`) become that byte, anything
/// else is the token decoded alone (special tokens included). `byte_level` comes from
/// [`is_byte_level`], computed once per tokenizer.
pub fn token_bytes(tok: &Tokenizer, id: u32, byte_level: bool) -> Vec<u8> {
    let Some(piece) = tok.id_to_token(id) else {
        return Vec::new();
    };
    let is_added = tok.get_added_vocabulary().simple_id_to_token(id).is_some();
    if !is_added {
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|s| s.strip_suffix('>')) {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return vec![b];
            }
        }
        if byte_level {
            if let Some(bytes) = byte_level_bytes(&piece) {
                return bytes;
            }
        }
    }
    match tok.decode(&[id], false) {
        Ok(s) if !s.is_empty() => s.into_bytes(),
        _ => piece.into_bytes(),
    }
}

/// Whether the tokenizer decodes with GPT-2 style byte-level mapping (its vocabulary entries are
/// then stand-in characters for raw bytes).
pub fn is_byte_level(tok: &Tokenizer) -> bool {
    tok.get_decoder()
        .and_then(|d| serde_json::to_string(d).ok())
        .is_some_and(|s| s.contains("\"ByteLevel\""))
}
