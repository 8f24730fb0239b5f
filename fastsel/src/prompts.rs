//! Tokenisation identical to open_clip's `SimpleTokenizer` (CLIP BPE,
//! `clean='lower'`, context 77, truncation keeps the first `context_length` ids and puts the
//! end token last).
//!
//! Division of labour: open_clip's text cleaning (`ftfy.fix_text`, `html.unescape` twice,
//! whitespace clean-up, `str.lower`) stays in Python (`fastsel._prompts`), which hands this
//! module the cleaned text. This module does the rest with HuggingFace's `tokenizers` crate,
//! configured like HuggingFace's own CLIP tokenizer:
//! * a `Split` pre-tokenizer with open_clip's regex (matches kept, the whitespace between them
//!   dropped, as `re.findall` does), then a `ByteLevel` step (no prefix space, no regex of its
//!   own) that maps each piece's UTF-8 bytes to CLIP's byte-unicode symbols;
//! * a `BPE` model with end-of-word suffix `</w>` over the vocabulary open_clip builds from
//!   `bpe_simple_vocab_16e6.txt.gz`: the 256 byte symbols, the same with `</w>`, the merges
//!   joined, then `<start_of_text>` and `<end_of_text>`.
//!
//! The special tokens are not `tokenizers` added tokens: open_clip only recognises them where
//! its regex starts a new match (`!<start_of_text>` is the punctuation run `!<` followed by
//! ordinary words), so they are alternatives of the split regex here too, and a piece that is
//! exactly a special token gets its id instead of going through the BPE model.
//!
//! open_clip compiles its regex with Python `regex`'s IGNORECASE; [`PATTERN`] reproduces what
//! that flag changes on lower-cased text (see its documentation).

use std::collections::HashMap;
use std::io::Read;

use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    Model, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, SplitDelimiterBehavior,
};

use crate::error::{Error, Result};

pub const SOT: &str = "<start_of_text>";
pub const EOT: &str = "<end_of_text>";
/// Number of merges open_clip reads from the vocabulary file (`merges[1:49152-256-2+1]`).
const N_MERGES: usize = 49152 - 256 - 2;

/// CLIP's reversible byte -> unicode table, in its own order (printable ranges first).
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    bs.extend(0xA1..=0xAC);
    bs.extend(0xAE..=0xFF);
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.iter()
        .zip(&cs)
        .map(|(&b, &c)| (b as u8, char::from_u32(c).expect("valid code point")))
        .collect()
}

/// open_clip's pre-tokenisation regex
/// `<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
/// (compiled by open_clip with IGNORECASE), in the syntax of the Rust `regex` engine.
///
/// IGNORECASE only changes two things, both kept here:
/// * the literal alternatives match case-insensitively (after lower-casing this matters for
///   U+017F LATIN SMALL LETTER LONG S, which Python's `regex` matches as `s`: `'ſ` is one piece,
///   and so is `<ſtart_of_text>`, which then goes through BPE like any word, as in open_clip);
/// * the negated class excludes U+0345 COMBINING GREEK YPOGEGRAMMENI, whose case fold (`ι`) is
///   a letter, while `[\p{L}]` does not include it: open_clip drops that character entirely.
///
/// The Rust engine applies IGNORECASE to classes differently (it would add U+0345 to
/// `[\p{L}]`), hence the scoped `(?i:...)` and the explicit `\x{345}` instead of a global flag.
pub const PATTERN: &str = r"(?i:<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}\x{345}]+";

fn engine_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Value(format!("{what}: {e}"))
}

/// CLIP's BPE tokenizer on cleaned text.
pub struct ClipBpe {
    pre: Sequence,
    model: BPE,
    pub sot: u32,
    pub eot: u32,
    pub vocab_size: usize,
}

impl ClipBpe {
    /// Builds the vocabulary exactly as `SimpleTokenizer.__init__` does from the merges text
    /// (the decompressed `bpe_simple_vocab_16e6.txt`).
    pub fn from_merges_text(text: &str) -> Result<Self> {
        let table = bytes_to_unicode();
        let mut vocab: Vec<String> = table.iter().map(|&(_, c)| c.to_string()).collect();
        vocab.extend(table.iter().map(|&(_, c)| format!("{c}</w>")));
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        // Like Python: every line of `merges[1:N_MERGES + 1]` adds `''.join(line.split())` to
        // the vocabulary; only two-field lines can ever match a pair of symbols.
        for line in text.split('\n').take(N_MERGES + 1).skip(1) {
            let parts: Vec<&str> = line.split_whitespace().collect();
            vocab.push(parts.concat());
            if let [a, b] = parts[..] {
                pairs.push((a, b));
            }
        }
        vocab.push(SOT.to_string());
        vocab.push(EOT.to_string());
        // dict(zip(vocab, range(len(vocab)))): a repeated entry keeps its last id.
        let ids: Vocab = vocab
            .into_iter()
            .enumerate()
            .map(|(i, v)| (v, i as u32))
            .collect();
        // A merge whose parts are not symbols can never fire (every symbol BPE can form is in
        // the vocabulary); `tokenizers` would reject it, open_clip ignores it.
        let merges: Merges = pairs
            .into_iter()
            .filter(|(a, b)| ids.contains_key(*a) && ids.contains_key(*b))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let (sot, eot, vocab_size) = (ids[SOT], ids[EOT], ids.len());
        let model = BPE::builder()
            .vocab_and_merges(ids, merges)
            .end_of_word_suffix("</w>".to_string())
            .build()
            .map_err(|e| engine_err("cannot build the BPE model", e))?;
        let split = Split::new(
            SplitPattern::Regex(PATTERN.to_string()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| engine_err("cannot compile the pre-tokenisation regex", e))?;
        let pre = Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ]);
        Ok(ClipBpe {
            pre,
            model,
            sot,
            eot,
            vocab_size,
        })
    }

    pub fn from_gz_file(path: &std::path::Path) -> Result<Self> {
        let raw = std::fs::read(path)
            .map_err(|e| Error::from_io(&e, &format!("BPE vocabulary {path:?}")))?;
        let mut bytes = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut bytes)
            .map_err(|e| Error::Value(format!("cannot decompress BPE vocabulary {path:?}: {e}")))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| Error::Value(format!("BPE vocabulary {path:?} is not UTF-8 text: {e}")))?;
        Self::from_merges_text(&text)
            .map_err(|e| Error::Value(format!("BPE vocabulary {path:?}: {e}")))
    }

    /// The pieces `re.findall(pattern, text)` yields, as byte-unicode strings.
    fn pieces(&self, text: &str) -> Result<PreTokenizedString> {
        let mut pts = PreTokenizedString::from(text);
        self.pre
            .pre_tokenize(&mut pts)
            .map_err(|e| engine_err(&format!("cannot pre-tokenise {text:?}"), e))?;
        Ok(pts)
    }

    /// `SimpleTokenizer.encode` of cleaned `text`, appended to `out`.
    fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let pts = self.pieces(text)?;
        for (piece, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::None) {
            // Special tokens are printable ASCII, which the byte-level step leaves unchanged.
            match piece {
                SOT => out.push(self.sot),
                EOT => out.push(self.eot),
                _ => {
                    let tokens = self
                        .model
                        .tokenize(piece)
                        .map_err(|e| engine_err(&format!("cannot encode {text:?}"), e))?;
                    out.extend(tokens.iter().map(|t| t.id));
                }
            }
        }
        Ok(())
    }

    /// Row-major `[texts.len(), context_length]` ids of cleaned texts, as open_clip's tokenizer
    /// returns them for the raw texts.
    pub fn tokenize<S: AsRef<str>>(&self, texts: &[S], context_length: usize) -> Result<Vec<i64>> {
        if context_length == 0 {
            return Err(Error::Value("context_length must be >= 1".into()));
        }
        let mut out = vec![0i64; texts.len() * context_length];
        // No branch of the regex matches a space, and none looks behind, so the pieces of a text
        // are the pieces of its space-separated chunks in turn: each distinct chunk (prompts
        // repeat most words) goes through the pre-tokenizer and the model once per call.
        let mut cache: HashMap<&str, Vec<u32>> = HashMap::new();
        let mut ids = Vec::new();
        for (r, text) in texts.iter().enumerate() {
            ids.clear();
            ids.push(self.sot);
            for chunk in text.as_ref().split(' ').filter(|c| !c.is_empty()) {
                if let Some(known) = cache.get(chunk) {
                    ids.extend_from_slice(known);
                } else {
                    let start = ids.len();
                    self.encode(chunk, &mut ids)?;
                    cache.insert(chunk, ids[start..].to_vec());
                }
            }
            ids.push(self.eot);
            if ids.len() > context_length {
                ids.truncate(context_length);
                ids[context_length - 1] = self.eot;
            }
            let row = &mut out[r * context_length..(r + 1) * context_length];
            for (dst, &id) in row.iter_mut().zip(&ids) {
                *dst = i64::from(id);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Header line, then merges: "h e", "l l", "he ll", "hell o</w>", "a b", "x yz" (never
    /// fires: "yz" is not a symbol), and an empty last line (Python keeps it as "").
    const TINY: &str = "#version: test\nh e\nl l\nhe ll\nhell o</w>\na b\nx yz\n";

    /// Id of byte `b` as a symbol, or as a word-final symbol.
    fn sym(b: u8, last: bool) -> u32 {
        let pos = bytes_to_unicode()
            .iter()
            .position(|&(x, _)| x == b)
            .unwrap();
        pos as u32 + if last { 256 } else { 0 }
    }

    /// `[sot] + encode(text) + [eot]`, through `tokenize` (and its chunk cache).
    fn encode(tok: &ClipBpe, text: &str) -> Vec<u32> {
        let ids = tok.tokenize(&[text], 200).unwrap();
        let n = ids.iter().rposition(|&i| i != 0).map_or(0, |p| p + 1);
        ids[..n].iter().map(|&i| i as u32).collect()
    }

    fn pieces(tok: &ClipBpe, text: &str) -> Vec<String> {
        let pts = tok.pieces(text).unwrap();
        pts.get_splits(OffsetReferential::Original, OffsetType::None)
            .into_iter()
            .map(|(p, _, _)| p.to_string())
            .collect()
    }

    /// open_clip's vocabulary file, if it can be found: `FASTSEL_BPE_PATH`, else the
    /// `open_clip` package of the virtualenv in `VIRTUAL_ENV` or in `<repo>/.venv`.
    fn real_vocab() -> Option<std::path::PathBuf> {
        if let Some(p) = std::env::var_os("FASTSEL_BPE_PATH") {
            return Some(p.into());
        }
        let venvs = [
            std::env::var_os("VIRTUAL_ENV").map(std::path::PathBuf::from),
            Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv")),
        ];
        for venv in venvs.into_iter().flatten() {
            let Ok(libs) = std::fs::read_dir(venv.join("lib")) else {
                continue;
            };
            for lib in libs.flatten() {
                let p = lib
                    .path()
                    .join("site-packages/open_clip/bpe_simple_vocab_16e6.txt.gz");
                if p.is_file() {
                    return Some(p);
                }
            }
        }
        None
    }

    #[test]
    fn byte_table_order() {
        let t = bytes_to_unicode();
        assert_eq!(t.len(), 256);
        assert_eq!(t[0], (b'!', '!'));
        assert_eq!(t[93], (b'~', '~'));
        // byte 0 is the first non-printable byte -> U+0100
        assert!(t.contains(&(0u8, '\u{100}')));
        assert!(t.contains(&(b' ', '\u{120}')));
    }

    #[test]
    fn byte_level_step_uses_the_same_table() {
        // Characters whose UTF-8 encodings hold every byte value that UTF-8 can contain.
        let mut text = String::new();
        text.extend((0u32..0x100).filter_map(char::from_u32));
        text.extend((0x80u32..0x800).step_by(0x40).filter_map(char::from_u32));
        text.extend(
            (0x800u32..0x10000)
                .step_by(0x1000)
                .filter_map(char::from_u32),
        );
        text.extend(
            [0x10000u32, 0x40000, 0x80000, 0xC0000, 0x100000]
                .into_iter()
                .filter_map(char::from_u32),
        );
        let table: std::collections::HashMap<u8, char> = bytes_to_unicode().into_iter().collect();
        let want: String = text.bytes().map(|b| table[&b]).collect();
        let mut pts = PreTokenizedString::from(text.as_str());
        ByteLevel::new(false, false, false)
            .pre_tokenize(&mut pts)
            .unwrap();
        let got: String = pts
            .get_splits(OffsetReferential::Original, OffsetType::None)
            .into_iter()
            .map(|(p, _, _)| p)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn tiny_vocab_bpe() {
        let tok = ClipBpe::from_merges_text(TINY).unwrap();
        // six merges plus the empty last line
        assert_eq!(tok.vocab_size, 512 + 7 + 2);
        assert_eq!((tok.sot, tok.eot), (519, 520));
        let (s, e) = (tok.sot, tok.eot);
        assert_eq!(encode(&tok, "hello"), vec![s, 512 + 3, e]); // "hello</w>"
                                                                // h e -> he; l, o</w> stay
        assert_eq!(
            encode(&tok, "helo"),
            vec![s, 512, sym(b'l', false), sym(b'o', true), e]
        );
        // left-to-right merging: l l l l</w> -> ll l l</w>
        assert_eq!(
            encode(&tok, "llll"),
            vec![s, 513, sym(b'l', false), sym(b'l', true), e]
        );
        assert_eq!(
            encode(&tok, "ab a"),
            vec![s, sym(b'a', false), sym(b'b', true), sym(b'a', true), e]
        );
        assert_eq!(encode(&tok, ""), vec![s, e]);
    }

    #[test]
    fn pre_tokenizer_alternation_order() {
        let tok = ClipBpe::from_merges_text(TINY).unwrap();
        assert_eq!(
            pieces(&tok, "it's <start_of_text>x !'s 12"),
            ["it", "'s", SOT, "x", "!'", "s", "1", "2"]
        );
        // After punctuation the special token is not matched (the punctuation run goes on).
        assert_eq!(
            pieces(&tok, "!<start_of_text>"),
            ["!<", "start", "_", "of", "_", "text", ">"]
        );
        // Python regex's IGNORECASE: long s in literals; U+0345 is matched by no branch.
        assert_eq!(pieces(&tok, "'\u{17f}"), ["'\u{c5}\u{bf}"]);
        assert_eq!(pieces(&tok, "a\u{345}b!\u{345}"), ["a", "b", "!"]);
        // Byte-level symbols: "é" is the bytes C3 A9.
        assert_eq!(
            pieces(&tok, "caf\u{e9}\u{b2}"),
            ["caf\u{c3}\u{a9}", "\u{c2}\u{b2}"]
        );
        let (s, e) = (tok.sot, tok.eot);
        assert_eq!(
            encode(&tok, "<end_of_text> <start_of_text>"),
            vec![s, e, s, e]
        );
        // a case-folded special token is an ordinary word, as in open_clip
        assert!(!encode(&tok, "<\u{17f}tart_of_text>")[1..].contains(&s));
        // tokenize's chunk cache gives what pre-tokenising the whole text gives
        let text = "it's <start_of_text>x  !'s 12 !<start_of_text> a\u{345}b ab\u{345} hello";
        let mut direct = vec![s];
        tok.encode(text, &mut direct).unwrap();
        direct.push(e);
        assert_eq!(encode(&tok, text), direct);
    }

    #[test]
    fn corrupt_vocabulary_files() {
        let dir = std::env::temp_dir().join(format!("fastsel-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("plain.txt.gz");
        std::fs::write(&plain, "not gzip").unwrap();
        let err = ClipBpe::from_gz_file(&plain).err().unwrap();
        assert!(matches!(&err, Error::Value(m) if m.contains("cannot decompress")));
        let missing = dir.join("missing.gz");
        let err = ClipBpe::from_gz_file(&missing).err().unwrap();
        assert!(matches!(&err, Error::FileNotFound(m) if m.contains("missing.gz")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn real_vocabulary() {
        let Some(path) = real_vocab() else {
            eprintln!("open_clip's bpe_simple_vocab_16e6.txt.gz not found; set FASTSEL_BPE_PATH");
            return;
        };
        let tok = ClipBpe::from_gz_file(&path).unwrap();
        assert_eq!((tok.vocab_size, tok.sot, tok.eot), (49408, 49406, 49407));
        // ids from open_clip.get_tokenizer('ViT-B-32')
        assert_eq!(
            encode(&tok, "this is a photo of a dog"),
            [49406, 589, 533, 320, 1125, 539, 320, 1929, 49407]
        );
        assert_eq!(
            encode(
                &tok,
                "caf\u{e9} na\u{ef}ve \u{6771}\u{4eac} \u{1f44d}\u{1f3fd}"
            ),
            [49406, 15304, 1097, 35689, 563, 48338, 21078, 361, 43722, 49407]
        );
        assert_eq!(
            encode(&tok, "!<start_of_text>x<end_of_text>"),
            [49406, 0, 283, 1572, 318, 539, 318, 4160, 285, 343, 49407, 49407]
        );
    }

    #[test]
    fn truncation() {
        let tok = ClipBpe::from_merges_text(TINY).unwrap();
        let long = "a ".repeat(100);
        let out = tok.tokenize(&[long.as_str()], 5).unwrap();
        assert_eq!(out[0], 519);
        assert_eq!(out[4], 520);
        assert!(tok.tokenize(&["a"], 0).is_err());
    }
}
