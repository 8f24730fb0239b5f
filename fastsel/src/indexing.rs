//! DomainBed dataset indexing with torchvision `ImageFolder` order, walked in parallel.
//!
//! * envs: directories directly under the root (symlinks followed), sorted by Python string order;
//! * classes of an env: its sorted directories (torchvision `find_classes`);
//! * samples of a class: `sorted(os.walk(class_dir, followlinks=True))`, i.e. the visited folders
//!   sorted by their *full path string*, files sorted within a folder, kept when the lower-cased
//!   name ends with one of `IMG_EXTENSIONS`.
//!
//! Errors: the first env (sorted) that fails decides, checked in ImageFolder's order on it (no
//! class folder, a class without images), then class folders that differ from the first env's.
//!
//! Names are raw bytes (Unix). Sorting follows Python's order on the `surrogateescape`-decoded
//! names: byte order for valid UTF-8, code points otherwise.
//!
//! Deliberate differences from `ImageFolder`, which silently skips what `os.walk` cannot read:
//! an unreadable folder is an error (`PermissionError`/`OSError` naming it), and a symlink that
//! leads back to one of its own ancestors is an error (`OSError`, "symlink loop") instead of
//! being walked ~40 levels deep until the kernel refuses.

use std::cmp::Ordering;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::Path;

use rayon::prelude::*;

use crate::error::{Error, Result};

/// torchvision's `IMG_EXTENSIONS`, compared against the lower-cased file name.
pub const IMG_EXTENSIONS: [&str; 9] = [
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
];

/// Image paths of one class folder, stored as one byte buffer with end offsets.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ClassPaths {
    pub buf: Vec<u8>,
    pub ends: Vec<usize>,
}

impl ClassPaths {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.ends.iter().scan(0usize, move |start, &end| {
            let p = &self.buf[*start..end];
            *start = end;
            Some(p)
        })
    }

    fn push(&mut self, parts: &[&[u8]]) {
        for (i, part) in parts.iter().enumerate() {
            if i > 0 && !self.buf.ends_with(b"/") {
                self.buf.push(b'/');
            }
            self.buf.extend_from_slice(part);
        }
        self.ends.push(self.buf.len());
    }
}

/// The samples of one environment: per class (label order) its image paths.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct EnvIndex {
    pub name: Vec<u8>,
    pub classes: Vec<ClassPaths>,
}

impl EnvIndex {
    pub fn len(&self) -> usize {
        self.classes.iter().map(ClassPaths::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn paths(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.classes.iter().flat_map(ClassPaths::iter)
    }

    pub fn labels(&self) -> Vec<i64> {
        let mut out = Vec::with_capacity(self.len());
        for (c, paths) in self.classes.iter().enumerate() {
            out.extend(std::iter::repeat_n(c as i64, paths.len()));
        }
        out
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct DatasetIndex {
    pub envs: Vec<Vec<u8>>,
    pub classes: Vec<Vec<u8>>,
    pub env_index: Vec<EnvIndex>,
}

/// Code points of `bytes` decoded as UTF-8 with `surrogateescape` (as Python sees file names).
fn code_points(mut bytes: &[u8]) -> Vec<u32> {
    let mut out = Vec::with_capacity(bytes.len());
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.extend(s.chars().map(u32::from));
                return out;
            }
            Err(e) => {
                let good = e.valid_up_to();
                if let Ok(s) = std::str::from_utf8(&bytes[..good]) {
                    out.extend(s.chars().map(u32::from));
                }
                let bad = e.error_len().unwrap_or(bytes.len() - good);
                out.extend(
                    bytes[good..good + bad]
                        .iter()
                        .map(|&b| 0xDC00 + u32::from(b)),
                );
                bytes = &bytes[good + bad..];
            }
        }
    }
}

/// Python's string order of two file names (or relative paths) given as raw bytes.
pub fn py_cmp(a: &[u8], b: &[u8]) -> Ordering {
    if std::str::from_utf8(a).is_ok() && std::str::from_utf8(b).is_ok() {
        a.cmp(b)
    } else {
        code_points(a).cmp(&code_points(b))
    }
}

/// Sorts byte strings in Python's order: byte order when all are valid UTF-8 (the usual case,
/// one check per string), code points otherwise.
fn sort_py<T>(items: &mut [T], key: impl Fn(&T) -> &[u8]) {
    if items.iter().all(|x| std::str::from_utf8(key(x)).is_ok()) {
        items.sort_unstable_by(|a, b| key(a).cmp(key(b)));
    } else {
        items.sort_by_cached_key(|x| code_points(key(x)));
    }
}

/// `sort_py` for entry indices of a listing.
fn sort_entries_py(idx: &mut [usize], listing: &Listing) {
    let key = |i: &usize| listing.name(&listing.entries[*i]);
    if idx.iter().all(|i| std::str::from_utf8(key(i)).is_ok()) {
        idx.sort_unstable_by(|a, b| key(a).cmp(key(b)));
    } else {
        idx.sort_by_cached_key(|i| code_points(key(i)));
    }
}

/// `name.lower().endswith(IMG_EXTENSIONS)`. Exact on raw bytes: no character outside ASCII
/// lower-cases to a string ending in one of these ASCII suffixes.
pub fn is_image_name(name: &[u8]) -> bool {
    IMG_EXTENSIONS.iter().any(|ext| {
        let ext = ext.as_bytes();
        name.len() >= ext.len() && name[name.len() - ext.len()..].eq_ignore_ascii_case(ext)
    })
}

/// `os.path.join(a, b)` for a relative `b` without separators.
fn join(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len() + b.len() + 1);
    out.extend_from_slice(a);
    if !a.is_empty() && !a.ends_with(b"/") {
        out.push(b'/');
    }
    out.extend_from_slice(b);
    out
}

fn show(p: &[u8]) -> String {
    format!("'{}'", String::from_utf8_lossy(p))
}

fn to_path(p: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(p))
}

// ------------------------------------------------------------------------------------------------
// Directory listing
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    Link,
    Other,
    Unknown,
}

#[derive(Debug, Clone, Copy)]
struct RawEntry {
    start: usize,
    len: usize,
    kind: Kind,
    ino: u64,
}

/// The entries of one folder (`read_dir` yields no "." or ".."), names stored back to back.
#[derive(Debug, Default)]
struct Listing {
    names: Vec<u8>,
    entries: Vec<RawEntry>,
}

impl Listing {
    fn name(&self, e: &RawEntry) -> &[u8] {
        &self.names[e.start..e.start + e.len]
    }

    fn push(&mut self, name: &[u8], kind: Kind, ino: u64) {
        let start = self.names.len();
        self.names.extend_from_slice(name);
        self.entries.push(RawEntry {
            start,
            len: name.len(),
            kind,
            ino,
        });
    }
}

/// Lists a folder (`std::fs::read_dir`; the entry type comes from the listing where the file system
/// reports it, so plain files cost no `stat`).
fn list_dir(path: &[u8]) -> std::io::Result<Listing> {
    let mut listing = Listing::default();
    for entry in fs::read_dir(to_path(path))? {
        let entry = entry?;
        let kind = match entry.file_type() {
            Ok(ft) if ft.is_dir() => Kind::Dir,
            Ok(ft) if ft.is_symlink() => Kind::Link,
            Ok(_) => Kind::Other,
            Err(_) => Kind::Unknown,
        };
        listing.push(entry.file_name().as_bytes(), kind, entry.ino());
    }
    Ok(listing)
}

/// Whether an entry is a directory, following symlinks (`DirEntry.is_dir()`): `Ok(None)` for a
/// dangling link, `Err` for other stat failures. Also returns the target's (dev, ino).
fn resolve_dir(path: &[u8], kind: Kind) -> std::io::Result<Option<fs::Metadata>> {
    match kind {
        Kind::Other => Ok(None),
        _ => match fs::metadata(to_path(path)) {
            Ok(m) => Ok(if m.is_dir() { Some(m) } else { None }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        },
    }
}

/// Sorted names of the directories in `dir` (`sorted(e.name for e in os.scandir(dir) if e.is_dir())`).
pub fn sorted_subdirs(dir: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
    let listing =
        list_dir(dir).map_err(|e| Error::from_io(&e, &format!("{what} {}", show(dir))))?;
    let mut names = Vec::new();
    for e in &listing.entries {
        let name = listing.name(e);
        let is_dir = match e.kind {
            Kind::Dir => true,
            Kind::Other => false,
            Kind::Link | Kind::Unknown => {
                let p = join(dir, name);
                resolve_dir(&p, e.kind)
                    .map_err(|err| Error::from_io(&err, &format!("cannot stat {}", show(&p))))?
                    .is_some()
            }
        };
        if is_dir {
            names.push(name.to_vec());
        }
    }
    sort_py(&mut names, |n| n.as_slice());
    Ok(names)
}

/// `sorted(os.walk(class_dir, followlinks=True))`, images only, as full paths (built like
/// `os.path.join`) in ImageFolder order.
fn walk_class(class_dir: &[u8]) -> Result<ClassPaths> {
    struct Pending {
        rel: Vec<u8>,
        dev: u64,
        ancestors: Vec<(u64, u64)>,
    }
    struct Visited {
        rel: Vec<u8>,
        listing: Listing,
        files: Vec<usize>,
    }
    let root_meta = fs::metadata(to_path(class_dir))
        .map_err(|e| Error::from_io(&e, &format!("class folder {}", show(class_dir))))?;
    let mut stack = vec![Pending {
        rel: Vec::new(),
        dev: root_meta.dev(),
        ancestors: vec![(root_meta.dev(), root_meta.ino())],
    }];
    let mut visited: Vec<Visited> = Vec::new();
    while let Some(node) = stack.pop() {
        let abs = if node.rel.is_empty() {
            class_dir.to_vec()
        } else {
            join(class_dir, &node.rel)
        };
        let listing = list_dir(&abs)
            .map_err(|e| Error::from_io(&e, &format!("cannot read folder {}", show(&abs))))?;
        let mut files = Vec::new();
        for (i, e) in listing.entries.iter().enumerate() {
            let name = listing.name(e);
            // os.walk: `entry.is_dir()` with any OSError meaning "not a directory".
            let (is_dir, id) = match e.kind {
                Kind::Dir => (true, (node.dev, e.ino)),
                Kind::Other => (false, (0, 0)),
                Kind::Link | Kind::Unknown => match resolve_dir(&join(&abs, name), e.kind) {
                    Ok(Some(m)) => (true, (m.dev(), m.ino())),
                    _ => (false, (0, 0)),
                },
            };
            if !is_dir {
                if is_image_name(name) {
                    files.push(i);
                }
                continue;
            }
            if let Some(pos) = node.ancestors.iter().position(|&a| a == id) {
                return Err(Error::Os(format!(
                    "symlink loop: {} leads back to its ancestor {} level(s) up; \
                     fastsel refuses to walk it (os.walk would recurse until the kernel stops it)",
                    show(&join(&abs, name)),
                    node.ancestors.len() - pos
                )));
            }
            let mut ancestors = node.ancestors.clone();
            ancestors.push(id);
            stack.push(Pending {
                rel: join(&node.rel, name),
                dev: id.0,
                ancestors,
            });
        }
        sort_entries_py(&mut files, &listing);
        visited.push(Visited {
            rel: node.rel,
            listing,
            files,
        });
    }
    sort_py(&mut visited, |v| v.rel.as_slice());
    let mut out = ClassPaths::default();
    for v in &visited {
        for &i in &v.files {
            let name = v.listing.name(&v.listing.entries[i]);
            if v.rel.is_empty() {
                out.push(&[class_dir, name]);
            } else {
                out.push(&[class_dir, &v.rel, name]);
            }
        }
    }
    Ok(out)
}

fn list_names(names: &[Vec<u8>]) -> String {
    names
        .iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Indexes a DomainBed-style root: `root/<env>/<class>/**/<image>`.
pub fn index_domainbed(root: &[u8]) -> Result<DatasetIndex> {
    if root.is_empty() {
        return Err(Error::FileNotFound("dataset root '' does not exist".into()));
    }
    let meta = fs::metadata(to_path(root))
        .map_err(|e| Error::from_io(&e, &format!("dataset root {}", show(root))))?;
    if !meta.is_dir() {
        return Err(Error::NotADirectory(format!(
            "dataset root {} is not a directory",
            show(root)
        )));
    }
    let envs = sorted_subdirs(root, "dataset root")?;
    if envs.is_empty() {
        return Err(Error::FileNotFound(format!(
            "dataset root {} contains no environment folders",
            show(root)
        )));
    }
    let env_paths: Vec<Vec<u8>> = envs.iter().map(|e| join(root, e)).collect();
    let env_classes = env_paths
        .iter()
        .map(|p| sorted_subdirs(p, "environment folder"))
        .collect::<Result<Vec<_>>>()?;
    // Every env's own class folders, walked in parallel.
    let jobs: Vec<(usize, usize)> = (0..envs.len())
        .flat_map(|e| (0..env_classes[e].len()).map(move |c| (e, c)))
        .collect();
    let results: Vec<Result<ClassPaths>> = jobs
        .par_iter()
        .with_max_len(1)
        .map(|&(e, c)| walk_class(&join(&env_paths[e], &env_classes[e][c])))
        .collect();
    // The first failing env decides the error, checked in the order of ImageFolder per env
    // (`scmd.data.index_imagefolder`): no class folder, then a class without images, then class
    // folders that differ from the first env's.
    let mut results = results.into_iter();
    let mut env_index = Vec::with_capacity(envs.len());
    let exts = IMG_EXTENSIONS.join(", ");
    let classes = env_classes[0].clone();
    for (e, env_path) in env_paths.iter().enumerate() {
        let own = &env_classes[e];
        if own.is_empty() {
            return Err(Error::FileNotFound(format!(
                "environment {} has no class folders (Couldn't find any class folder)",
                show(env_path)
            )));
        }
        let mut idx = EnvIndex {
            name: envs[e].clone(),
            classes: Vec::with_capacity(own.len()),
        };
        let mut empty = Vec::new();
        for class in own {
            let paths = results.next().expect("one result per job")?;
            if paths.is_empty() {
                empty.push(class.clone());
            }
            idx.classes.push(paths);
        }
        if idx.is_empty() {
            return Err(Error::FileNotFound(format!(
                "environment {} contains no image files (supported extensions: {exts})",
                show(env_path)
            )));
        }
        if !empty.is_empty() {
            return Err(Error::FileNotFound(format!(
                "environment {}: found no valid file for the classes {} (supported extensions: {exts}); \
                 torchvision's ImageFolder raises FileNotFoundError here too",
                show(env_path),
                list_names(&empty)
            )));
        }
        if *own != classes {
            let missing: Vec<Vec<u8>> = classes
                .iter()
                .filter(|x| !own.contains(x))
                .cloned()
                .collect();
            let extra: Vec<Vec<u8>> = own
                .iter()
                .filter(|x| !classes.contains(x))
                .cloned()
                .collect();
            return Err(Error::Value(format!(
                "environment {} has different class folders from the first environment {}: \
                 missing [{}], extra [{}]",
                show(env_path),
                show(&env_paths[0]),
                list_names(&missing),
                list_names(&extra)
            )));
        }
        env_index.push(idx);
    }
    Ok(DatasetIndex {
        envs,
        classes,
        env_index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_filter() {
        assert!(is_image_name(b"a.JPG"));
        assert!(is_image_name(b".jpeg"));
        assert!(is_image_name(b"x.TiFf"));
        assert!(!is_image_name(b"jpg"));
        assert!(!is_image_name(b"a.jpg.txt"));
        assert!(!is_image_name(b"a.gif"));
    }

    #[test]
    fn python_order() {
        assert_eq!(py_cmp(b"B", b"a"), Ordering::Less);
        assert_eq!(py_cmp(b"a b", b"a/b"), Ordering::Less);
        // U+E000 (valid, bytes EE 80 80) sorts after an escaped byte 0xFF (U+DCFF) in Python.
        assert_eq!(py_cmp(b"\xff", "\u{e000}".as_bytes()), Ordering::Less);
        assert_eq!(py_cmp("\u{d7ff}".as_bytes(), b"\xff"), Ordering::Less);
        assert_eq!(code_points(b"a\xe2\x82A"), vec![0x61, 0xDCE2, 0xDC82, 0x41]);
    }

    #[test]
    fn walk_order_and_errors() {
        let dir = std::env::temp_dir().join(format!("fastsel-idx-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mk = |p: &str| {
            let full = dir.join(p);
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            fs::write(full, b"").unwrap();
        };
        for env in ["e2", "e1"] {
            mk(&format!("{env}/b/x.png"));
            mk(&format!("{env}/b/sub-a/y.JPG"));
            mk(&format!("{env}/b/sub/z.jpg"));
            mk(&format!("{env}/A/1.txt"));
            mk(&format!("{env}/A/2.bmp"));
        }
        let root = dir.as_os_str().as_bytes();
        let idx = index_domainbed(root).unwrap();
        assert_eq!(idx.envs, vec![b"e1".to_vec(), b"e2".to_vec()]);
        assert_eq!(idx.classes, vec![b"A".to_vec(), b"b".to_vec()]);
        let e = &idx.env_index[0];
        let rel: Vec<String> = e
            .paths()
            .map(|p| String::from_utf8_lossy(&p[root.len() + 1..]).into_owned())
            .collect();
        // Folders sort as full path strings: "b" < "b/sub" < "b/sub-a" (and "b/sub-a" < "b/sub/x").
        assert_eq!(
            rel,
            vec![
                "e1/A/2.bmp",
                "e1/b/x.png",
                "e1/b/sub/z.jpg",
                "e1/b/sub-a/y.JPG"
            ]
        );
        assert_eq!(e.labels(), vec![0, 1, 1, 1]);

        std::os::unix::fs::symlink(dir.join("e1/b"), dir.join("e1/b/sub/loop")).unwrap();
        let err = index_domainbed(root).unwrap_err();
        assert!(
            matches!(err, Error::Os(ref m) if m.contains("symlink loop")),
            "{err:?}"
        );
        fs::remove_file(dir.join("e1/b/sub/loop")).unwrap();

        // an extra class in the second env: differing class folders, unless it has no images
        // (then, as ImageFolder on that env, a class without images)
        fs::create_dir_all(dir.join("e2/c")).unwrap();
        let err = index_domainbed(root).unwrap_err();
        assert!(
            matches!(err, Error::FileNotFound(ref m) if m.contains("for the classes c")),
            "{err:?}"
        );
        mk("e2/c/w.png");
        let err = index_domainbed(root).unwrap_err();
        assert!(
            matches!(err, Error::Value(ref m) if m.contains("missing [], extra [c]")),
            "{err:?}"
        );
        // the first failing env decides: e1 now has a class without images
        fs::create_dir_all(dir.join("e1/c")).unwrap();
        assert!(matches!(
            index_domainbed(root).unwrap_err(),
            Error::FileNotFound(_)
        ));
        assert!(matches!(
            index_domainbed(dir.join("e1/A/2.bmp").as_os_str().as_bytes()).unwrap_err(),
            Error::NotADirectory(_)
        ));
        assert!(matches!(
            index_domainbed(dir.join("nope").as_os_str().as_bytes()).unwrap_err(),
            Error::FileNotFound(_)
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
