//! The model's vocabulary as llguidance sees it: every token's bytes in a [`TokTrie`].
//!
//! Bytes come from the same function the logprobs use (`engine::detok::token_bytes`: GPT-2
//! byte-level entries mapped back to raw bytes, SentencePiece `<0xNN>` byte tokens, anything else
//! decoded alone). Special tokens (added tokens flagged special, e.g. `<|im_end|>`) get
//! llguidance's marker byte in front, so grammar text can never produce them; added tokens that
//! decode as text (Qwen's `<tool_call>`) stay text, so a grammar that writes `<tool_call>` lets the
//! model use its single token for it. Ids past the tokenizer's vocabulary (models pad their
//! output layer) are specials that no grammar allows.
use std::sync::Arc;

use llguidance::toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use tokenizers::Tokenizer;

use crate::engine::detok::{is_byte_level, token_bytes};

pub struct InferdTokEnv {
    tokenizer: Arc<Tokenizer>,
    trie: TokTrie,
    /// Byte-level BPE encodes text canonically; SentencePiece's prefix space does not.
    canonical: bool,
}

impl InferdTokEnv {
    /// `n_vocab`: the mask size (the model's logits, at least the tokenizer's ids); `eos`: the
    /// token that ends a constrained answer.
    pub fn new(tokenizer: Arc<Tokenizer>, n_vocab: usize, eos: u32) -> Self {
        let byte_level = is_byte_level(&tokenizer);
        let added = tokenizer.get_added_vocabulary();
        let specials: std::collections::HashSet<u32> =
            added.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();
        let n = n_vocab;
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| {
                let Some(piece) = tokenizer.id_to_token(id) else {
                    return [&[TokTrie::SPECIAL_TOKEN_MARKER][..], format!("[{id}]").as_bytes()].concat();
                };
                if specials.contains(&id) {
                    [&[TokTrie::SPECIAL_TOKEN_MARKER][..], piece.as_bytes()].concat()
                } else {
                    token_bytes(&tokenizer, id, byte_level)
                }
            })
            .collect();
        let info = TokRxInfo::new(n as u32, eos);
        let trie = TokTrie::from(&info, &words);
        Self { tokenizer, trie, canonical: byte_level }
    }
}

impl TokenizerEnv for InferdTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Grammars hand over text they need tokenised (forced prefixes); invalid UTF-8 falls back
        // to the trie's greedy split.
        match std::str::from_utf8(s) {
            Ok(text) => match self.tokenizer.encode(text, false) {
                Ok(enc) => enc.get_ids().to_vec(),
                Err(_) => self.trie.greedy_tokenize(s),
            },
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }

    fn tokenize_is_canonical(&self) -> bool {
        self.canonical
    }
}
