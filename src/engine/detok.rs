//! Incremental detokenisation: turning a growing list of token ids into text, one valid UTF-8
//! chunk at a time.
//!
//! Decoding each token alone breaks spacing (SentencePiece's leading "▁") and multi-byte characters
//! split across byte-level BPE tokens. Like TGI and vLLM we keep two offsets into the ids: decode
//! `ids[prefix..read]` and `ids[prefix..]`, and emit the new suffix only when it is longer and does
//! not end in U+FFFD (an incomplete character). Special tokens are skipped.
use std::collections::HashMap;
use std::sync::OnceLock;

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
        self.ids.push(id);
        let prefix = decode(tok, &self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(tok, &self.ids[self.prefix_offset..]);
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
        let prefix = decode(tok, &self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(tok, &self.ids[self.prefix_offset..]);
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

fn decode(tok: &Tokenizer, ids: &[u32]) -> String {
    if ids.is_empty() {
        return String::new();
    }
    tok.decode(ids, true).unwrap_or_default()
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
            let inv = byte_level_inverse();
            let mapped: Option<Vec<u8>> = piece.chars().map(|c| inv.get(&c).copied()).collect();
            if let Some(bytes) = mapped {
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
