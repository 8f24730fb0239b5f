//! Prompt batching with tokenisation identical to open_clip's `SimpleTokenizer` (CLIP BPE,
//! `clean='lower'`, context 77, truncation keeps the first `context_length` ids and puts the
//! end token last).
//!
//! Exactness contract: every text is reproduced exactly or rejected. Supported: ASCII text.
//! open_clip cleans with `ftfy.fix_text`, then `html.unescape` twice; on ASCII input this module
//! replays exactly the parts that can change ASCII text:
//! * ftfy, per line segment, until nothing changes: HTML entity decoding (only when no segment
//!   so far contained `<`; entities must end in `;`, all-caps variants included), line-break
//!   normalisation, removal of ANSI terminal escapes and of control characters;
//! * Python's `html.unescape` (numeric references, the HTML5 named references, the longest-prefix
//!   rule for legacy names without `;`), twice;
//! * whitespace clean-up and lower-casing.
//!
//! A text that is not ASCII, or that any of these steps would turn into non-ASCII text (for
//! example `&eacute;` or `&rsquo;`, which ftfy would go on to transform further), is rejected
//! with [`Error::Value`]. The HTML5 entity table is not copied here: the caller passes Python's
//! `html.entities.html5` (and the `str.upper()` of its values) at construction.

use std::collections::HashMap;
use std::io::Read;

use crate::error::{Error, Result};

pub const SOT: &str = "<start_of_text>";
pub const EOT: &str = "<end_of_text>";
pub const DEFAULT_CONTEXT_LENGTH: usize = 77;
/// Number of merges open_clip reads from the vocabulary file (`merges[1:49152-256-2+1]`).
const N_MERGES: usize = 49152 - 256 - 2;

/// SCMD's prompt: "this is a photo of a {name}".
pub const SCMD_TEMPLATE: &str = "this is a photo of a {}";

/// The 80 prompt templates CLIP used for ImageNet zero-shot classification.
pub const IMAGENET_TEMPLATES: [&str; 80] = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
];

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

/// A string quoted roughly like Python's `repr` (control and C1 characters escaped).
pub fn quote(text: &str) -> String {
    let mut q = String::with_capacity(text.len() + 2);
    q.push('\'');
    for c in text.chars() {
        match c {
            '\\' => q.push_str("\\\\"),
            '\'' => q.push_str("\\'"),
            '\n' => q.push_str("\\n"),
            '\r' => q.push_str("\\r"),
            '\t' => q.push_str("\\t"),
            c if (c as u32) < 0x20 || (0x7F..=0xA0).contains(&(c as u32)) => {
                q.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c == '\u{2028}' || c == '\u{2029}' => q.push_str(&format!("\\u{:04x}", c as u32)),
            c => q.push(c),
        }
    }
    q.push('\'');
    q
}

fn err_unsupported(text: &str, why: &str) -> Error {
    Error::Value(format!(
        "fastsel cannot reproduce open_clip's tokenisation of {} exactly ({why}); \
         use open_clip's tokenizer for this text",
        quote(text)
    ))
}

// ---------------------------------------------------------------------------------------------
// HTML entities (Python's html.unescape and ftfy's unescape_html)
// ---------------------------------------------------------------------------------------------

/// Python's `html._invalid_codepoints` (decoded to "").
fn invalid_codepoint(n: u32) -> bool {
    matches!(n, 0x1..=0x8 | 0xB | 0xE..=0x1F | 0x7F..=0x9F | 0xFDD0..=0xFDEF)
        || (n <= 0x10FFFF && (n & 0xFFFE) == 0xFFFE)
}

/// Marker for a numeric reference that decodes to a non-ASCII character we do not need exactly
/// (any non-ASCII output is rejected later; only its presence matters).
const NON_ASCII_MARK: char = '\u{FFFD}';

/// Python refuses to convert decimal strings longer than this (`sys.get_int_max_str_digits()`).
const PY_INT_MAX_STR_DIGITS: usize = 4300;

pub struct Entities {
    /// `html.entities.html5`: names with and without `;` -> value.
    html5: HashMap<String, String>,
    /// ftfy's `HTML_ENTITIES`: "&name;" -> value, plus the all-caps variants.
    ftfy: HashMap<String, String>,
}

impl Entities {
    /// `html5`: Python's `html.entities.html5`; `upper`: `value.upper()` for (at least) every
    /// lower-case name ending in `;`.
    pub fn new(html5: HashMap<String, String>, upper: &HashMap<String, String>) -> Result<Self> {
        let mut e = Entities {
            html5,
            ftfy: HashMap::new(),
        };
        let mut ftfy = HashMap::new();
        for (name, value) in &e.html5 {
            if !name.ends_with(';') {
                continue;
            }
            ftfy.insert(format!("&{name}"), value.clone());
            if !name.is_ascii() || *name != name.to_ascii_lowercase() {
                continue;
            }
            let key = format!("&{}", name.to_ascii_uppercase());
            if e.html_unescape(&key)? == key {
                let up = upper.get(name).ok_or_else(|| {
                    Error::Value(format!("missing upper-case value for HTML entity {name:?}"))
                })?;
                ftfy.insert(key, up.clone());
            }
        }
        e.ftfy = ftfy;
        Ok(e)
    }

    /// Python's `html.unescape` on ASCII text.
    pub fn html_unescape(&self, s: &str) -> Result<String> {
        let b = s.as_bytes();
        if !b.contains(&b'&') {
            return Ok(s.to_string());
        }
        let mut out = String::with_capacity(s.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'&' {
                // Copy up to the next '&' (ASCII input, so byte slicing is safe).
                let next = b[i..]
                    .iter()
                    .position(|&c| c == b'&')
                    .map_or(b.len(), |p| i + p);
                out.push_str(&s[i..next]);
                i = next;
                continue;
            }
            match self.charref_at(s, i)? {
                Some((end, repl)) => {
                    out.push_str(&repl);
                    i = end;
                }
                None => {
                    out.push('&');
                    i += 1;
                }
            }
        }
        Ok(out)
    }

    /// Match of `&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)` at `i` and its
    /// replacement (`html._replace_charref`).
    fn charref_at(&self, s: &str, i: usize) -> Result<Option<(usize, String)>> {
        let b = s.as_bytes();
        let j = i + 1;
        if j < b.len() && b[j] == b'#' {
            let k = j + 1;
            let dec = b[k..].iter().take_while(|c| c.is_ascii_digit()).count();
            let (digits, radix, mut end) = if dec > 0 {
                (&s[k..k + dec], 10, k + dec)
            } else if k < b.len() && (b[k] == b'x' || b[k] == b'X') {
                let hex = b[k + 1..]
                    .iter()
                    .take_while(|c| c.is_ascii_hexdigit())
                    .count();
                if hex == 0 {
                    return Ok(None);
                }
                (&s[k + 1..k + 1 + hex], 16, k + 1 + hex)
            } else {
                return Ok(None);
            };
            if end < b.len() && b[end] == b';' {
                end += 1;
            }
            if radix == 10 && digits.len() > PY_INT_MAX_STR_DIGITS {
                return Err(err_unsupported(
                    s,
                    "a numeric character reference too long for Python's int()",
                ));
            }
            // Saturating parse: anything above 0x10FFFF behaves the same.
            let mut num: u32 = 0;
            for c in digits.chars() {
                let d = c.to_digit(radix).expect("digit");
                num = num.saturating_mul(radix).saturating_add(d).min(0x11_0000);
            }
            let repl = match num {
                0 => NON_ASCII_MARK.to_string(),
                0x0D => "\r".to_string(),
                0x80..=0x9F => NON_ASCII_MARK.to_string(),
                0xD800..=0xDFFF | 0x11_0000.. => NON_ASCII_MARK.to_string(),
                n if invalid_codepoint(n) => String::new(),
                n if n < 0x80 => char::from(n as u8).to_string(),
                _ => NON_ASCII_MARK.to_string(),
            };
            return Ok(Some((end, repl)));
        }
        let n = b[j..]
            .iter()
            .take(32)
            .take_while(|&&c| !matches!(c, b'\t' | b'\n' | 0x0C | b' ' | b'<' | b'&' | b'#' | b';'))
            .count();
        if n == 0 {
            return Ok(None);
        }
        let mut end = j + n;
        if end < b.len() && b[end] == b';' {
            end += 1;
        }
        let name = &s[j..end];
        if let Some(v) = self.html5.get(name) {
            return Ok(Some((end, v.clone())));
        }
        for x in (2..name.len()).rev() {
            if let Some(v) = self.html5.get(&name[..x]) {
                return Ok(Some((end, format!("{v}{}", &name[x..]))));
            }
        }
        Ok(Some((end, format!("&{name}"))))
    }

    /// ftfy's `unescape_html`: `&#?[0-9A-Za-z]{1,24};` replaced via `HTML_ENTITIES`, numeric
    /// references only when `html.unescape` consumes the `;`.
    fn ftfy_unescape(&self, s: &str) -> Result<String> {
        let b = s.as_bytes();
        if !b.contains(&b'&') {
            return Ok(s.to_string());
        }
        let mut out = String::with_capacity(s.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'&' {
                let mut k = i + 1;
                if k < b.len() && b[k] == b'#' {
                    k += 1;
                }
                let run = b[k..]
                    .iter()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .count();
                let end = k + run;
                if (1..=24).contains(&run) && end < b.len() && b[end] == b';' {
                    let m = &s[i..=end];
                    if let Some(v) = self.ftfy.get(m) {
                        out.push_str(v);
                    } else if m.starts_with("&#") {
                        let u = self.html_unescape(m)?;
                        out.push_str(if u.contains(';') { m } else { &u });
                    } else {
                        out.push_str(m);
                    }
                    i = end + 1;
                    continue;
                }
            }
            let c = s[i..].chars().next().expect("char");
            out.push(c);
            i += c.len_utf8();
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Cleaning (ftfy.fix_text -> html.unescape x2 -> whitespace -> lower)
// ---------------------------------------------------------------------------------------------

/// Python's `str.isspace()` for ASCII.
fn py_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | 0x1C..=0x1F)
}

fn remove_terminal_escapes(s: &str) -> String {
    let b = s.as_bytes();
    if !b.contains(&0x1B) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == 0x1B && i + 1 < b.len() && b[i + 1] == b'[' {
            let run = b[i + 2..]
                .iter()
                .take_while(|&&c| c.is_ascii_digit() || c == b';')
                .count();
            let end = i + 2 + run;
            if end < b.len() && b[end].is_ascii_alphabetic() {
                i = end + 1;
                continue;
            }
        }
        out.push(char::from(b[i]));
        i += 1;
    }
    out
}

fn ftfy_segment(seg: &str, unescape: bool, ents: &Entities, text: &str) -> Result<String> {
    let mut t = seg.to_string();
    loop {
        let orig = t.clone();
        if unescape {
            t = ents.ftfy_unescape(&t)?;
            if !t.is_ascii() {
                return Err(err_unsupported(
                    text,
                    "an HTML entity decodes to a non-ASCII character",
                ));
            }
        }
        t = t.replace("\r\n", "\n").replace('\r', "\n");
        t = remove_terminal_escapes(&t);
        t.retain(|c| !matches!(c, '\u{0}'..='\u{8}' | '\u{B}' | '\u{E}'..='\u{1F}' | '\u{7F}'));
        if t == orig {
            return Ok(t);
        }
    }
}

/// open_clip's `_clean_lower` on ASCII text, or an error when it cannot be reproduced exactly.
pub fn clean_lower(text: &str, ents: &Entities) -> Result<String> {
    if !text.is_ascii() {
        return Err(err_unsupported(text, "non-ASCII text"));
    }
    let simple = text.bytes().all(|c| (0x20..0x7F).contains(&c) && c != b'&');
    let cleaned = if simple {
        text.to_string()
    } else {
        if text.len() > 1_000_000 {
            return Err(err_unsupported(text, "longer than ftfy's segment limit"));
        }
        // ftfy.fix_text: segments end after each '\n'; a '<' disables entity decoding for its
        // segment and every later one.
        let mut unescape = true;
        let mut fixed = String::with_capacity(text.len());
        for seg in text.split_inclusive('\n') {
            if seg.contains('<') {
                unescape = false;
            }
            fixed.push_str(&ftfy_segment(seg, unescape, ents, text)?);
        }
        let mut t = fixed;
        for _ in 0..2 {
            t = ents.html_unescape(&t)?;
            if !t.is_ascii() {
                return Err(err_unsupported(
                    text,
                    "an HTML entity decodes to a non-ASCII character",
                ));
            }
        }
        t
    };
    // strip, " ".join(split()), strip, lower
    let mut out = String::with_capacity(cleaned.len());
    for word in cleaned
        .as_bytes()
        .split(|&c| py_space(c))
        .filter(|w| !w.is_empty())
    {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.iter().map(|c| char::from(c.to_ascii_lowercase())));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenisation (open_clip's regex on cleaned ASCII text)
// ---------------------------------------------------------------------------------------------

/// One piece of `re.findall(pat, text)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    Special(u32),
    Word(&'a [u8]),
}

/// `<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
/// on ASCII text.
pub fn pre_tokenize<'a>(text: &'a [u8], sot: u32, eot: u32, out: &mut Vec<Piece<'a>>) {
    let n = text.len();
    let mut i = 0;
    while i < n {
        let c = text[i];
        let rest = &text[i..];
        if py_space(c) {
            i += 1;
        } else if rest.starts_with(SOT.as_bytes()) {
            out.push(Piece::Special(sot));
            i += SOT.len();
        } else if rest.starts_with(EOT.as_bytes()) {
            out.push(Piece::Special(eot));
            i += EOT.len();
        } else if c == b'\'' && rest.len() >= 2 && matches!(rest[1], b's' | b't' | b'm' | b'd') {
            out.push(Piece::Word(&text[i..i + 2]));
            i += 2;
        } else if c == b'\'' && rest.len() >= 3 && matches!(&rest[1..3], b"re" | b"ve" | b"ll") {
            out.push(Piece::Word(&text[i..i + 3]));
            i += 3;
        } else if c.is_ascii_alphabetic() {
            let run = rest.iter().take_while(|c| c.is_ascii_alphabetic()).count();
            out.push(Piece::Word(&text[i..i + run]));
            i += run;
        } else if c.is_ascii_digit() {
            out.push(Piece::Word(&text[i..i + 1]));
            i += 1;
        } else {
            let run = rest
                .iter()
                .take_while(|&&c| !(py_space(c) || c.is_ascii_alphanumeric()))
                .count();
            out.push(Piece::Word(&text[i..i + run]));
            i += run;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Byte-level BPE
// ---------------------------------------------------------------------------------------------

pub struct Bpe {
    /// Id of each byte as a symbol, and as a word-final symbol (`…</w>`).
    byte_id: [u32; 256],
    byte_end_id: [u32; 256],
    /// (left, right) -> (rank, merged id).
    merges: HashMap<u64, (u32, u32)>,
    pub sot: u32,
    pub eot: u32,
    pub vocab_size: usize,
}

impl Bpe {
    /// Builds the vocabulary exactly as `SimpleTokenizer.__init__` does from the merges text
    /// (the decompressed `bpe_simple_vocab_16e6.txt`).
    pub fn from_merges_text(text: &str) -> Result<Self> {
        let table = bytes_to_unicode();
        let mut vocab: Vec<String> = table.iter().map(|&(_, c)| c.to_string()).collect();
        vocab.extend(table.iter().map(|&(_, c)| format!("{c}</w>")));
        let lines: Vec<&str> = text.split('\n').collect();
        let upper = lines.len().min(N_MERGES + 1);
        let mut merges: Vec<(String, String)> = Vec::new();
        // Like Python: every line in the slice adds `''.join(line.split())` to the vocabulary;
        // only two-field lines can ever match a pair of symbols.
        for line in lines.iter().take(upper).skip(1) {
            let parts: Vec<&str> = line.split_whitespace().collect();
            vocab.push(parts.concat());
            if parts.len() == 2 {
                merges.push((parts[0].to_string(), parts[1].to_string()));
            }
        }
        vocab.push(SOT.to_string());
        vocab.push(EOT.to_string());
        let vocab_size = vocab.len();
        let encoder: HashMap<&str, u32> = vocab
            .iter()
            .enumerate()
            .map(|(i, v)| (v.as_str(), i as u32))
            .collect();
        let mut byte_id = [0u32; 256];
        let mut byte_end_id = [0u32; 256];
        for &(b, c) in &table {
            byte_id[b as usize] = encoder[c.to_string().as_str()];
            byte_end_id[b as usize] = encoder[format!("{c}</w>").as_str()];
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            // A merge whose parts are not symbols can never fire.
            if let (Some(&ia), Some(&ib)) = (encoder.get(a.as_str()), encoder.get(b.as_str())) {
                let merged = encoder[format!("{a}{b}").as_str()];
                merge_map.insert((u64::from(ia) << 32) | u64::from(ib), (rank as u32, merged));
            }
        }
        Ok(Bpe {
            byte_id,
            byte_end_id,
            merges: merge_map,
            sot: encoder[SOT],
            eot: encoder[EOT],
            vocab_size,
        })
    }

    pub fn from_gz_file(path: &std::path::Path) -> Result<Self> {
        let raw = std::fs::read(path)
            .map_err(|e| Error::from_io(&e, &format!("BPE vocabulary {path:?}")))?;
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_string(&mut text)
            .map_err(|e| Error::Value(format!("cannot decompress BPE vocabulary {path:?}: {e}")))?;
        Self::from_merges_text(&text)
    }

    /// `SimpleTokenizer.bpe` for one pre-token, appending the ids to `out`.
    pub fn encode_word(&self, word: &[u8], out: &mut Vec<u32>) {
        let Some((&last, head)) = word.split_last() else {
            return;
        };
        let mut sym: Vec<u32> = head.iter().map(|&b| self.byte_id[b as usize]).collect();
        sym.push(self.byte_end_id[last as usize]);
        while sym.len() > 1 {
            let mut best: Option<(u32, u32, u32, u32)> = None; // (rank, left, right, merged)
            for w in sym.windows(2) {
                if let Some(&(rank, merged)) = self
                    .merges
                    .get(&((u64::from(w[0]) << 32) | u64::from(w[1])))
                {
                    if best.is_none_or(|b| rank < b.0) {
                        best = Some((rank, w[0], w[1], merged));
                    }
                }
            }
            let Some((_, left, right, merged)) = best else {
                break;
            };
            let mut next = Vec::with_capacity(sym.len());
            let mut i = 0;
            while i < sym.len() {
                if i + 1 < sym.len() && sym[i] == left && sym[i + 1] == right {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(sym[i]);
                    i += 1;
                }
            }
            sym = next;
        }
        out.extend_from_slice(&sym);
    }
}

// ---------------------------------------------------------------------------------------------
// Templates
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Name,
    Domain,
}

/// Parses a `str.format` template supporting `{}` / `{0}` (the class name), `{domain}`,
/// `{{` and `}}`. Anything else is rejected.
fn parse_template(t: &str) -> Result<Vec<Part>> {
    let bad = |why: &str| Error::Value(format!("template {t:?}: {why}"));
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut auto_used = false;
    let mut manual_used = false;
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                lit.push('}');
            }
            '}' => return Err(bad("single '}' encountered")),
            '{' => {
                let mut field = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some('{') => {
                            return Err(bad("nested '{' in a replacement field is not supported"))
                        }
                        Some(x) => field.push(x),
                        None => return Err(bad("unclosed '{'")),
                    }
                }
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                match field.as_str() {
                    "" => {
                        if manual_used {
                            return Err(bad(
                                "cannot switch from manual to automatic field numbering",
                            ));
                        }
                        if auto_used {
                            return Err(bad("more than one '{}' (only the class name is passed)"));
                        }
                        auto_used = true;
                        parts.push(Part::Name);
                    }
                    "0" => {
                        if auto_used {
                            return Err(bad(
                                "cannot switch from automatic to manual field numbering",
                            ));
                        }
                        manual_used = true;
                        parts.push(Part::Name);
                    }
                    "domain" => parts.push(Part::Domain),
                    other => {
                        return Err(bad(&format!(
                        "unsupported replacement field {{{other}}} (use {{}}, {{0}} or {{domain}})"
                    )))
                    }
                }
            }
            _ => lit.push(c),
        }
    }
    if !lit.is_empty() {
        parts.push(Part::Lit(lit));
    }
    Ok(parts)
}

fn render(parts: &[Part], name: &str, domain: Option<&str>, template: &str) -> Result<String> {
    let mut s = String::new();
    for p in parts {
        match p {
            Part::Lit(l) => s.push_str(l),
            Part::Name => s.push_str(name),
            Part::Domain => match domain {
                Some(d) => s.push_str(d),
                None => {
                    return Err(Error::Value(format!(
                        "template {template:?} uses {{domain}} but no domain_names were given"
                    )))
                }
            },
        }
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

pub struct Tokenizer {
    pub bpe: Bpe,
    pub entities: Entities,
}

impl Tokenizer {
    pub fn new(bpe: Bpe, entities: Entities) -> Self {
        Tokenizer { bpe, entities }
    }

    /// `[sot] + encode(text) + [eot]` before truncation.
    fn encode_one(
        &self,
        text: &str,
        cache: &mut HashMap<Vec<u8>, Vec<u32>>,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let cleaned = clean_lower(text, &self.entities)?;
        let mut pieces = Vec::new();
        pre_tokenize(cleaned.as_bytes(), self.bpe.sot, self.bpe.eot, &mut pieces);
        out.push(self.bpe.sot);
        for p in pieces {
            match p {
                Piece::Special(id) => out.push(id),
                Piece::Word(w) => {
                    if let Some(ids) = cache.get(w) {
                        out.extend_from_slice(ids);
                    } else {
                        let mut ids = Vec::new();
                        self.bpe.encode_word(w, &mut ids);
                        out.extend_from_slice(&ids);
                        cache.insert(w.to_vec(), ids);
                    }
                }
            }
        }
        out.push(self.bpe.eot);
        Ok(())
    }

    /// Row-major `[texts.len(), context_length]` ids, as open_clip's tokenizer returns them.
    pub fn tokenize<S: AsRef<str>>(&self, texts: &[S], context_length: usize) -> Result<Vec<i64>> {
        if context_length == 0 {
            return Err(Error::Value("context_length must be >= 1".into()));
        }
        let mut out = vec![0i64; texts.len() * context_length];
        let mut cache = HashMap::new();
        let mut ids = Vec::new();
        for (r, text) in texts.iter().enumerate() {
            ids.clear();
            self.encode_one(text.as_ref(), &mut cache, &mut ids)?;
            let row = &mut out[r * context_length..(r + 1) * context_length];
            if ids.len() > context_length {
                ids.truncate(context_length);
                ids[context_length - 1] = self.bpe.eot;
            }
            for (dst, &id) in row.iter_mut().zip(&ids) {
                *dst = i64::from(id);
            }
        }
        Ok(out)
    }

    /// The prompts of `batch` in row order (class-major, then domain, then template).
    pub fn prompts(
        classnames: &[String],
        templates: &[String],
        domain_names: Option<&[String]>,
    ) -> Result<(Vec<String>, Vec<i64>)> {
        if templates.is_empty() {
            return Err(Error::Value("templates must not be empty".into()));
        }
        if let Some(d) = domain_names {
            if d.is_empty() {
                return Err(Error::Value(
                    "domain_names must not be empty (pass None for no domains)".into(),
                ));
            }
        }
        let parsed: Vec<Vec<Part>> = templates
            .iter()
            .map(|t| parse_template(t))
            .collect::<Result<_>>()?;
        if domain_names.is_some() {
            for (t, p) in templates.iter().zip(&parsed) {
                if !p.contains(&Part::Domain) {
                    return Err(Error::Value(format!(
                        "template {t:?} has no {{domain}} field but domain_names were given \
                         (it would repeat the same prompt for every domain)"
                    )));
                }
            }
        }
        let domains: Vec<Option<String>> = match domain_names {
            Some(d) => d.iter().map(|x| Some(x.replace('_', " "))).collect(),
            None => vec![None],
        };
        let mut prompts = Vec::with_capacity(classnames.len() * domains.len() * templates.len());
        let mut class_index = Vec::with_capacity(prompts.capacity());
        for (c, name) in classnames.iter().enumerate() {
            let name = name.replace('_', " ");
            for d in &domains {
                for (t, p) in templates.iter().zip(&parsed) {
                    prompts.push(render(p, &name, d.as_deref(), t)?);
                    class_index.push(c as i64);
                }
            }
        }
        Ok((prompts, class_index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Tokenizer {
        // header line, then merges: "h e", "l l", "he ll", "o</w>" pieces, "hell o</w>"
        let merges = "#version: test\nh e\nl l\nhe ll\nhell o</w>\na b\n";
        let bpe = Bpe::from_merges_text(merges).unwrap();
        let mut html5 = HashMap::new();
        for (k, v) in [
            ("amp;", "&"),
            ("amp", "&"),
            ("lt;", "<"),
            ("lt", "<"),
            ("excl;", "!"),
            ("not", "\u{ac}"),
        ] {
            html5.insert(k.to_string(), v.to_string());
        }
        let upper: HashMap<String, String> = html5
            .iter()
            .map(|(k, v)| (k.clone(), v.to_uppercase()))
            .collect();
        Tokenizer::new(bpe, Entities::new(html5, &upper).unwrap())
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
    fn tiny_vocab_bpe() {
        let tok = tiny();
        let bpe = &tok.bpe;
        // five merges plus the empty last line (Python keeps it as an empty vocabulary entry)
        assert_eq!(bpe.vocab_size, 512 + 6 + 2);
        assert_eq!((bpe.sot, bpe.eot), (518, 519));
        let mut ids = Vec::new();
        bpe.encode_word(b"hello", &mut ids);
        assert_eq!(ids, vec![512 + 3]); // "hello</w>"
        ids.clear();
        bpe.encode_word(b"helo", &mut ids);
        // h e -> he; l, o</w> stay
        assert_eq!(
            ids,
            vec![
                512,
                bpe.byte_id[b'l' as usize],
                bpe.byte_end_id[b'o' as usize]
            ]
        );
        ids.clear();
        bpe.encode_word(b"llll", &mut ids);
        // left-to-right merging: ll ll</w>? "l</w>" is final, so: l l l l</w> -> ll l l</w>
        assert_eq!(
            ids,
            vec![
                513,
                bpe.byte_id[b'l' as usize],
                bpe.byte_end_id[b'l' as usize]
            ]
        );
    }

    #[test]
    fn cleaning_rules() {
        let e = &tiny().entities;
        assert_eq!(clean_lower("  A  B\tc\n", e).unwrap(), "a b c");
        assert_eq!(clean_lower("a &amp;amp;amp;amp; b", e).unwrap(), "a & b");
        assert_eq!(clean_lower("x&EXCL;", e).unwrap(), "x!");
        assert_eq!(clean_lower("&ampx", e).unwrap(), "&x");
        assert_eq!(clean_lower("<&amp;amp;", e).unwrap(), "<&");
        assert_eq!(clean_lower("a\u{1b}[31mb", e).unwrap(), "ab");
        assert_eq!(clean_lower("&#65;&#x42;&#0059;", e).unwrap(), "ab;");
        assert!(clean_lower("&not;", e).is_err());
        assert!(clean_lower("caf\u{e9}", e).is_err());
        assert_eq!(quote("a'\n\u{a0}\u{e9}"), "'a\\'\\n\\xa0\u{e9}'");
    }

    #[test]
    fn pre_tokenizer_alternation_order() {
        let mut p = Vec::new();
        pre_tokenize(b"it's <start_of_text>x !'s 12", 1, 2, &mut p);
        let words: Vec<String> = p
            .iter()
            .map(|x| match x {
                Piece::Special(i) => format!("#{i}"),
                Piece::Word(w) => String::from_utf8_lossy(w).into_owned(),
            })
            .collect();
        assert_eq!(words, vec!["it", "'s", "#1", "x", "!'", "s", "1", "2"]);
    }

    #[test]
    fn truncation_and_templates() {
        let tok = tiny();
        let long = "a ".repeat(100);
        let out = tok.tokenize(&[long.as_str()], 5).unwrap();
        assert_eq!(out[0], 518);
        assert_eq!(out[4], 519);
        let (p, c) = Tokenizer::prompts(
            &["a_b".into(), "c".into()],
            &["x {} y".into(), "{0}{{}}".into()],
            None,
        )
        .unwrap();
        assert_eq!(p, vec!["x a b y", "a b{}", "x c y", "c{}"]);
        assert_eq!(c, vec![0, 0, 1, 1]);
        assert!(Tokenizer::prompts(&["a".into()], &["{} {}".into()], None).is_err());
        assert!(Tokenizer::prompts(&["a".into()], &["{domain} {}".into()], None).is_err());
        let (p, _) = Tokenizer::prompts(
            &["a".into()],
            &["{domain}: {}".into()],
            Some(&["real_world".into()]),
        )
        .unwrap();
        assert_eq!(p, vec!["real world: a"]);
    }
}
