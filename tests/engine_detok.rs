//! Incremental detokenisation against real byte-level BPE tokenizers.
mod engine_common;

use engine_common::tiny_tokenizer;
use inferd::engine::detok::{is_byte_level, token_bytes, ByteTable, IncrementalDetokenizer};
use tokenizers::Tokenizer;

/// Streams `ids` after `prompt`; returns the chunks (each a valid `String`) and the flush.
fn stream(tok: &Tokenizer, prompt: &[u32], ids: &[u32]) -> (Vec<String>, String) {
    let mut d = IncrementalDetokenizer::new(prompt);
    let chunks = ids.iter().map(|&id| d.push(tok, id)).collect();
    (chunks, d.finish(tok))
}

const MIXED: &str = "Hello, 世界! Ünïcödé ✓ 🦀🎉👩‍👩‍👧 fn main() {\n    println!(\"héllo {}\", 42);\n}\n\t// 日本語のテキスト — done… 🇯🇵";

#[test]
fn tiny_tokenizer_splits_emoji_across_byte_tokens() {
    let (tok, eos) = tiny_tokenizer();
    assert!(is_byte_level(&tok));
    let ids = tok.encode("a🦀b", false).unwrap().get_ids().to_vec();
    // 'a', four bytes of the crab, 'b'
    assert_eq!(ids.len(), 6);
    let (chunks, tail) = stream(&tok, &[], &ids);
    assert_eq!(chunks, vec!["a", "", "", "", "🦀", "b"]);
    assert_eq!(tail, "");
    // EOS (special) is skipped; a dangling partial character is flushed lossily at the end.
    let crab = tok.encode("🦀", false).unwrap().get_ids().to_vec();
    let (chunks, tail) = stream(&tok, &[], &[crab[0], crab[1], eos]);
    assert_eq!(chunks.concat(), "");
    assert_eq!(tail, "\u{FFFD}");
}

#[test]
fn tiny_tokenizer_merges_and_spaces() {
    let (tok, _) = tiny_tokenizer();
    let text = "hello world, hello";
    let prompt = tok.encode("say:", false).unwrap().get_ids().to_vec();
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    assert!(ids.contains(&258), "the 'hell' merge is used: {ids:?}");
    let (chunks, tail) = stream(&tok, &prompt, &ids);
    assert_eq!(chunks.concat() + &tail, text);
}

#[test]
fn token_bytes_map_back_through_the_byte_table() {
    let (tok, eos) = tiny_tokenizer();
    let bl = is_byte_level(&tok);
    let space_w = tok.token_to_id("Ġw").unwrap();
    assert_eq!(token_bytes(&tok, space_w, bl), b" w");
    assert_eq!(token_bytes(&tok, 0xF0, bl), vec![0xF0]);
    assert_eq!(token_bytes(&tok, eos, bl), b"<eos>");
    assert_eq!(token_bytes(&tok, 99_999, bl), Vec::<u8>::new());
}

fn qwen() -> Option<Tokenizer> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/qwen-tokenizer/tokenizer.json");
    match Tokenizer::from_file(path) {
        Ok(t) => Some(t),
        Err(_) => {
            eprintln!("skipping: {path} not present");
            None
        }
    }
}

#[test]
fn qwen_stream_equals_full_decode() {
    let Some(tok) = qwen() else { return };
    assert!(is_byte_level(&tok));
    let prompt = tok.encode("<|im_start|>assistant\n", false).unwrap().get_ids().to_vec();
    for text in [MIXED, " leading space", "🦀", "ab\u{0301}c 한국어 Ελληνικά"] {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let (chunks, tail) = stream(&tok, &prompt, &ids);
        let full = tok.decode(&ids, true).unwrap();
        assert_eq!(chunks.concat() + &tail, full);
        if !text.contains('\u{0301}') {
            assert_eq!(full, text); // (the NFC normaliser composes the combining accent)
        }
        assert_eq!(tail, "");
        for c in &chunks {
            assert!(!c.contains('\u{FFFD}'), "partial character leaked: {c:?}");
        }
        // Some emoji must have been split across tokens (an empty chunk before it completes).
        if text == MIXED {
            assert!(chunks.iter().any(|c| c.is_empty()));
        }
    }
    // Special tokens are skipped.
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let (chunks, tail) = stream(&tok, &prompt, &[im_end]);
    assert_eq!(chunks.concat() + &tail, "");
}

#[test]
fn qwen_token_bytes() {
    let Some(tok) = qwen() else { return };
    let bl = is_byte_level(&tok);
    let ids = tok.encode(" hello", false).unwrap().get_ids().to_vec();
    assert_eq!(ids.len(), 1);
    assert_eq!(token_bytes(&tok, ids[0], bl), b" hello");
    let ids = tok.encode("🦀", false).unwrap().get_ids().to_vec();
    let all: Vec<u8> = ids.iter().flat_map(|&i| token_bytes(&tok, i, bl)).collect();
    assert_eq!(all, "🦀".as_bytes());
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    assert_eq!(token_bytes(&tok, im_end, bl), b"<|im_end|>");
}

/// The byte table against the tokenizer's own decode: random windows of ids (ordinary, added and
/// special tokens, single bytes that split characters, ids past the vocabulary), and a random
/// stream detokenised both ways.
fn byte_table_matches(tok: &Tokenizer, what: &str) {
    let table = ByteTable::new(tok).unwrap_or_else(|| panic!("{what}: a byte-level tokenizer gets a table"));
    let n = tok.get_vocab_size(true) as u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut windows = 0;
    for _ in 0..4000 {
        let len = 1 + (next() % 12) as usize;
        let ids: Vec<u32> = (0..len)
            .map(|_| match next() % 10 {
                0 => (n - 1 - next() % 30) as u32, // the added tokens at the end
                1 => (n + next() % 5) as u32,       // past the vocabulary
                2 | 3 => (next() % 256) as u32,     // low ids: byte tokens in GPT-2 style vocabularies
                _ => (next() % n) as u32,
            })
            .collect();
        assert_eq!(table.decode(&ids), tok.decode(&ids, true).unwrap_or_default(), "{what}: {ids:?}");
        windows += 1;
    }
    let prompt: Vec<u32> = (0..6).map(|_| (next() % n) as u32).collect();
    let ids: Vec<u32> = (0..500).map(|_| if next() % 3 == 0 { (next() % 256) as u32 } else { (next() % n) as u32 }).collect();
    let (mut plain, mut fast) = (IncrementalDetokenizer::new(&prompt), IncrementalDetokenizer::new(&prompt));
    for &id in &ids {
        assert_eq!(fast.push_with(tok, Some(&table), id), plain.push(tok, id), "{what}: pushing {id}");
    }
    assert_eq!(fast.finish_with(tok, Some(&table)), plain.finish(tok));
    eprintln!("{what}: {windows} windows and a stream of {} tokens decode alike", ids.len());
}

#[test]
fn the_byte_table_decodes_as_the_tokenizer_does() {
    let (tiny, _) = tiny_tokenizer();
    byte_table_matches(&tiny, "tiny");
    if let Some(q) = qwen() {
        byte_table_matches(&q, "qwen");
    }
}

#[test]
fn workers_of_one_model_share_one_byte_table() {
    // A model on several devices has a worker each, all holding the model's one tokenizer: they
    // get the same table. Another tokenizer (another model) gets its own, built again once its
    // first holder is gone.
    let (tiny, _) = tiny_tokenizer();
    let a = std::sync::Arc::new(tiny.clone());
    let b = std::sync::Arc::new(tiny);
    let (t1, t2) = (ByteTable::shared(&a).expect("byte-level"), ByteTable::shared(&a).expect("byte-level"));
    assert!(std::sync::Arc::ptr_eq(&t1, &t2), "one table per tokenizer");
    let other = ByteTable::shared(&b).expect("byte-level");
    assert!(!std::sync::Arc::ptr_eq(&t1, &other), "a table per model");
    assert_eq!(t1.decode(&[1, 2, 3]), other.decode(&[1, 2, 3]));
    drop(a);
    let c = std::sync::Arc::new(tiny_tokenizer().0);
    let again = ByteTable::shared(&c).expect("byte-level");
    assert!(!std::sync::Arc::ptr_eq(&again, &other));
}
