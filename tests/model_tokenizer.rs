//! The tokenizer rebuilt from GGUF metadata must tokenise exactly like the model's official
//! tokenizer. Needs the real models under models/ (scripts/fetch_models.sh); skipped otherwise.
use std::path::Path;

use inferd::model::gguf_tokenizer::read_gguf_assets;

const QWEN_GGUF: &str = "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
const QWEN_TOKENIZER_JSON: &str = "models/qwen-tokenizer/tokenizer.json";
const SMOLLM_GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const MIXED_TEXT: &str = include_str!("fixtures/model/mixed_text.txt");

fn have(paths: &[&str]) -> bool {
    let missing: Vec<_> = paths.iter().filter(|p| !Path::new(p).exists()).collect();
    if !missing.is_empty() {
        eprintln!("SKIPPED: missing {missing:?} (run scripts/fetch_models.sh)");
    }
    missing.is_empty()
}

#[test]
fn qwen_gguf_tokenizer_matches_official_tokenizer_json() {
    if !have(&[QWEN_GGUF, QWEN_TOKENIZER_JSON]) {
        return;
    }
    let start = std::time::Instant::now();
    let assets = read_gguf_assets(Path::new(QWEN_GGUF)).expect("Qwen GGUF assets");
    eprintln!("GGUF header + tokenizer build: {:?}", start.elapsed());
    let ours = assets.tokenizer;
    let official = tokenizers::Tokenizer::from_file(QWEN_TOKENIZER_JSON).expect("official tokenizer.json");

    // Line by line first, so a mismatch points at the offending line.
    for line in MIXED_TEXT.split_inclusive('\n') {
        let a = ours.encode(line, true).expect("encode").get_ids().to_vec();
        let b = official.encode(line, true).expect("encode").get_ids().to_vec();
        assert_eq!(a, b, "token ids differ for line {line:?}");
    }
    let a = ours.encode(MIXED_TEXT, true).expect("encode").get_ids().to_vec();
    let b = official.encode(MIXED_TEXT, true).expect("encode").get_ids().to_vec();
    assert_eq!(a, b);
    assert!(a.len() > 500, "the fixture should be a few kB of text, got {} tokens", a.len());
    // ChatML markers are single special tokens.
    assert_eq!(a[0], 151644, "<|im_start|>");
    assert!(a.contains(&151645) && a.contains(&151643) && a.contains(&151657), "<|im_end|>, <|endoftext|>, <tool_call>");

    assert_eq!(ours.decode(&a, false).expect("decode"), MIXED_TEXT);
    // The official file marks the FIM/repo tokens (151659..=151664) as non-special, while the GGUF
    // types them as control (3) like llama.cpp's converter does; they are the only difference when
    // skipping special tokens.
    let fim = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"];
    let official_skipped = fim.iter().fold(official.decode(&b, true).expect("decode"), |s, t| s.replace(t, ""));
    assert_eq!(ours.decode(&a, true).expect("decode"), official_skipped);
    let skipped = ours.decode(&a, true).expect("decode");
    assert!(!skipped.contains("<|im_start|>") && skipped.contains("<tool_call>"), "control tokens skipped, user-defined kept");

    assert_eq!(assets.eos_token_ids, vec![151645, 151643]);
    assert_eq!(assets.context_length, Some(32768));
    assert_eq!(assets.architecture, "qwen2");
    assert_eq!(assets.bos_token.as_deref(), Some("<|endoftext|>"));
    assert_eq!(assets.eos_token.as_deref(), Some("<|im_end|>"));
    assert!(assets.chat_template.as_deref().is_some_and(|t| t.contains("<|im_start|>")));
}

#[test]
fn smollm_gguf_tokenizer_matches_independent_implementations() {
    if !have(&[SMOLLM_GGUF]) {
        return;
    }
    let assets = read_gguf_assets(Path::new(SMOLLM_GGUF)).expect("SmolLM2 GGUF assets");
    let tk = assets.tokenizer;
    let ids = tk.encode(MIXED_TEXT, true).expect("encode").get_ids().to_vec();
    assert_eq!(tk.decode(&ids, false).expect("decode"), MIXED_TEXT, "round trip");

    // Expected ids from tests/fixtures/model/smollm_expected_ids.py: a pure-Python port of
    // llama.cpp's "smollm" BPE path and transformers' GGUF converter with SmolLM2's pre-tokenizer
    // (Digits(individual) + ByteLevel) agree on them.
    //   .venv/bin/python tests/fixtures/model/smollm_expected_ids.py
    let text = "<|im_start|>user\nHello, world! It's 2024-11-25: 12345 café 東京 🙂\n    def f(x):  return x**2<|im_end|>\n";
    let expected: Vec<u32> = vec![
        1, 4093, 198, 19556, 28, 905, 17, 657, 506, 216, 34, 32, 34, 36, 29, 33, 33, 29, 34, 37, 42, 216, 33, 34, 35,
        36, 37, 37366, 17097, 247, 126, 16736, 122, 47526, 472, 753, 275, 24, 104, 727, 216, 1003, 1792, 828, 34, 2, 198,
    ];
    assert_eq!(tk.encode(text, true).expect("encode").get_ids(), expected.as_slice());
    assert_eq!(tk.decode(&expected, false).expect("decode"), text);
    assert_eq!(tk.decode(&expected, true).expect("decode"), text.replace("<|im_start|>", "").replace("<|im_end|>", ""));

    assert_eq!(assets.architecture, "llama");
    assert_eq!(assets.eos_token_ids, vec![2, 0], "<|im_end|> (declared EOS) and <|endoftext|>");
    assert_eq!(assets.context_length, Some(8192));
    assert_eq!(assets.bos_token.as_deref(), Some("<|im_start|>"));
}
