//! The module graph of a crate, read from its `src/` files, for the
//! layering tests: which modules each module names in code.
//!
//! Every `.rs` file is a module: `quant/dot/rows.rs` is `quant::dot::rows`,
//! `quant.rs` (or `quant/mod.rs`) is `quant`, `lib.rs` and `main.rs` are the
//! root, [`ROOT`]. A file's names are the paths it writes in code (not in
//! comments, not in modules under `#[cfg(test)]`): `crate::a::b::c`,
//! `super::x`, `super::super::x`, `self::x`, the groups of `use`
//! declarations (`use crate::{a, b::c}`), and the same paths inside string
//! literals (`#[serde(with = "crate::serde_float")]`). Each resolves to the
//! longest module path it starts with.
//!
//! A module naming its own ancestors or descendants is structure, not a
//! dependency, and leaves no edge, except when it names an item through an
//! ancestor that only re-exports it (`super::QuantizedActivations` when the
//! parent says `pub use activations::QuantizedActivations`): such a name is
//! followed through the ancestor's `use` declarations to the module that
//! defines the item. A crate root that re-exports modules
//! (`pub use record::{stats, ...}`) is read the same way, so `crate::stats`
//! names `record::stats`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The name of a crate's root module (`lib.rs`, `main.rs`) in a graph.
pub const ROOT: &str = "crate";

/// Which modules each module of a crate names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleGraph {
    imports: BTreeMap<String, BTreeSet<String>>,
}

impl ModuleGraph {
    /// The graph of the crate whose source directory is `src`. Panics when
    /// a file cannot be read (a test helper).
    pub fn read(src: &Path) -> Self {
        let mut files = Vec::new();
        collect(src, src, &mut files);
        Self::from_sources(files.iter().map(|(p, t)| (p.as_str(), t.as_str())))
    }

    /// The graph of the files `(path under src/, text)`, e.g.
    /// `("quant/dot/rows.rs", "use super::super::Q;")`.
    pub fn from_sources<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut parsed = BTreeMap::new();
        for (path, text) in files {
            if let Some(module) = module_of(path) {
                parsed.insert(module.clone(), File::parse(&module, text));
            }
        }
        // Modules declared under `#[cfg(test)]` in their parent's file.
        let tests: Vec<Vec<String>> = parsed
            .iter()
            .flat_map(|(m, f)| f.test_modules.iter().map(move |t| child(m, t)))
            .collect();
        for t in tests {
            parsed.remove(&t);
        }
        let crate_ = Crate { files: parsed };
        let mut imports = BTreeMap::new();
        for (module, file) in &crate_.files {
            let mut out = BTreeSet::new();
            for (raw, at) in file.named() {
                let Some(abs) = crate_.absolute(raw, at, 0) else {
                    continue;
                };
                let target = crate_.resolve(abs, module, false, 0);
                if !related(&target, module) {
                    out.insert(name(&target));
                }
            }
            imports.insert(name(module), out);
        }
        Self { imports }
    }

    /// Every module, by path (`quant::dot::rows`, [`ROOT`]).
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.imports.keys().map(String::as_str)
    }

    /// The modules `module` names (empty for an unknown module).
    pub fn imports(&self, module: &str) -> &BTreeSet<String> {
        static NONE: BTreeSet<String> = BTreeSet::new();
        self.imports.get(module).unwrap_or(&NONE)
    }

    /// Adds an edge `from -> to` (to plant a circle in a test).
    pub fn add_import(&mut self, from: &str, to: &str) {
        self.imports.entry(to.to_string()).or_default();
        self.imports
            .entry(from.to_string())
            .or_default()
            .insert(to.to_string());
    }

    /// A circle of imports, if there is one: its modules in order, the
    /// first repeated at the end and the smallest name first
    /// (`["a", "b", "a"]`).
    pub fn circle(&self) -> Option<Vec<String>> {
        let mut done = BTreeSet::new();
        for m in self.imports.keys() {
            if let Some(mut c) = self.visit(m, &mut Vec::new(), &mut done) {
                c.pop();
                let start = (0..c.len()).min_by_key(|&i| &c[i]).unwrap_or(0);
                c.rotate_left(start);
                c.push(c[0].clone());
                return Some(c);
            }
        }
        None
    }

    fn visit(
        &self,
        m: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut c = path[i..].to_vec();
            c.push(m.to_string());
            return Some(c);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in self.imports(m) {
            if let Some(c) = self.visit(d, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
}

/// The module path of the file `path` under `src/` (`quant/dot/rows.rs` →
/// `quant::dot::rows`, `lib.rs` → [`ROOT`]); `None` for a file that is not
/// Rust or sits in `src/bin/`.
pub fn module_path(path: &str) -> Option<String> {
    module_of(path).map(|m| name(&m))
}

fn module_of(path: &str) -> Option<Vec<String>> {
    let path = path.replace('\\', "/");
    let stem = path.strip_suffix(".rs")?;
    let mut segs: Vec<String> = stem.split('/').map(str::to_string).collect();
    if segs.first().is_some_and(|s| s == "bin") && segs.len() > 1 {
        return None;
    }
    if segs.len() == 1 && (segs[0] == "lib" || segs[0] == "main") {
        return Some(Vec::new());
    }
    if segs.last().is_some_and(|s| s == "mod") {
        segs.pop();
    }
    Some(segs)
}

fn name(module: &[String]) -> String {
    if module.is_empty() {
        ROOT.to_string()
    } else {
        module.join("::")
    }
}

fn child(module: &[String], name: &str) -> Vec<String> {
    let mut c = module.to_vec();
    c.push(name.to_string());
    c
}

/// Whether `a` is `b`, an ancestor or a descendant of it.
fn related(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

fn collect(dir: &Path, src: &Path, out: &mut Vec<(String, String)>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => panic!("reading {}: {e}", dir.display()),
    };
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            collect(&path, src, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => panic!("reading {}: {e}", path.display()),
            };
            let rel = path.strip_prefix(src).unwrap_or(&path);
            out.push((rel.to_string_lossy().into_owned(), text));
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    Sep,
    Punct(char),
    Str(String),
}

/// The tokens of Rust source, without comments; string literals whole.
fn tokens(text: &str) -> Vec<Tok> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && c.get(i + 1) == Some(&'*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if ch == '"' {
            let (s, next) = string(&c, i + 1);
            out.push(Tok::Str(s));
            i = next;
        } else if ch == '\'' {
            // A char literal ('x', '\n', '"'), else a lifetime.
            if c.get(i + 1) == Some(&'\\') {
                i += 3;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if ident(ch) || (ch == '$' && c.get(i + 1).is_some_and(|&n| ident(n))) {
            let start = i;
            i += 1;
            while i < c.len() && ident(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let raw = matches!(word.as_str(), "r" | "br" | "cr");
            let hashes = c[i..].iter().take_while(|&&h| h == '#').count();
            if raw && c.get(i + hashes) == Some(&'"') {
                let body = i + hashes + 1;
                let close: Vec<char> = std::iter::once('"')
                    .chain(std::iter::repeat_n('#', hashes))
                    .collect();
                let mut j = body;
                while j < c.len() && !c[j..].starts_with(&close) {
                    j += 1;
                }
                out.push(Tok::Str(c[body..j.min(c.len())].iter().collect()));
                i = (j + close.len()).min(c.len());
            } else if matches!(word.as_str(), "b" | "c") && c.get(i) == Some(&'"') {
                let (s, next) = string(&c, i + 1);
                out.push(Tok::Str(s));
                i = next;
            } else if word == "b" && c.get(i) == Some(&'\'') {
                // A byte literal: b'x', b'\n'.
                i += 1;
                if c.get(i) == Some(&'\\') {
                    i += 1;
                }
                i += 1;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if word == "r" && hashes == 1 && c.get(i + 1).is_some_and(|&n| ident(n)) {
                // A raw identifier: r#type.
                i += 1;
            } else {
                out.push(Tok::Ident(word));
            }
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            out.push(Tok::Sep);
            i += 2;
        } else {
            out.push(Tok::Punct(ch));
            i += 1;
        }
    }
    out
}

/// The body of a string literal starting at `i` (after its quote), and the
/// index after its closing quote.
fn string(c: &[char], mut i: usize) -> (String, usize) {
    let mut s = String::new();
    while i < c.len() && c[i] != '"' {
        if c[i] == '\\' {
            i += 1;
        }
        if let Some(&ch) = c.get(i) {
            s.push(ch);
        }
        i += 1;
    }
    (s, i + 1)
}

fn is(t: Option<&Tok>, word: &str) -> bool {
    matches!(t, Some(Tok::Ident(w)) if w == word)
}

/// What a `use` leaf binds.
#[derive(Debug, Clone)]
enum Bound {
    Name(String),
    Glob,
    Nothing,
}

/// A path as written, with the module it is written in.
type Named = (Vec<String>, Vec<String>);

#[derive(Debug, Default)]
struct File {
    /// Every path the file names, with the (inline) module it sits in.
    paths: Vec<Named>,
    /// The names its top-level `use` declarations bind: name → path.
    bindings: BTreeMap<String, Vec<String>>,
    /// The paths of its top-level glob imports.
    globs: Vec<Vec<String>>,
    /// The children of the file's module declared under `#[cfg(test)]`.
    test_modules: Vec<String>,
    /// The items it defines (`fn x`, `struct X`, ...), for glob imports.
    items: BTreeSet<String>,
}

impl File {
    fn parse(module: &[String], text: &str) -> Self {
        let toks = tokens(text);
        let mut f = File::default();
        // Per open brace: the inline module it opens, if it does.
        let mut scopes: Vec<Option<String>> = Vec::new();
        let here = |scopes: &[Option<String>]| {
            let mut m = module.to_vec();
            m.extend(scopes.iter().flatten().cloned());
            m
        };
        let mut i = 0;
        while i < toks.len() {
            if let Some((skip, name)) = test_module(&toks, i) {
                if scopes.is_empty() && matches!(toks.get(skip - 1), Some(Tok::Punct(';'))) {
                    f.test_modules.push(name);
                }
                i = skip;
                continue;
            }
            match &toks[i] {
                Tok::Punct('{') => {
                    let before = |k: usize| i.checked_sub(k).map(|j| &toks[j]);
                    let inline = match (before(2), before(1)) {
                        (Some(Tok::Ident(m)), Some(Tok::Ident(n))) if m == "mod" => Some(n.clone()),
                        _ => None,
                    };
                    scopes.push(inline);
                    i += 1;
                }
                Tok::Punct('}') => {
                    scopes.pop();
                    i += 1;
                }
                Tok::Ident(w)
                    if w == "use" && !matches!(toks.get(i.wrapping_sub(1)), Some(Tok::Sep)) =>
                {
                    let mut leaves = Vec::new();
                    let mut j = i + 1;
                    if matches!(toks.get(j), Some(Tok::Sep)) {
                        // `use ::extern_crate::...`
                        j += 1;
                        leaves.push((vec!["::".to_string()], Bound::Nothing));
                    } else {
                        use_tree(&toks, &mut j, Vec::new(), &mut leaves);
                    }
                    let at = here(&scopes);
                    for (path, bound) in leaves {
                        if path.first().is_some_and(|s| s == "::") {
                            continue;
                        }
                        if scopes.is_empty() {
                            match bound {
                                Bound::Name(n) => {
                                    f.bindings.insert(n, path.clone());
                                }
                                Bound::Glob => f.globs.push(path.clone()),
                                Bound::Nothing => {}
                            }
                        }
                        f.paths.push((path, at.clone()));
                    }
                    while j < toks.len() && toks[j] != Tok::Punct(';') {
                        j += 1;
                    }
                    i = j;
                }
                Tok::Ident(w)
                    if matches!(w.as_str(), "crate" | "$crate" | "self" | "super")
                        && matches!(toks.get(i + 1), Some(Tok::Sep))
                        && !matches!(toks.get(i.wrapping_sub(1)), Some(Tok::Sep)) =>
                {
                    let (path, next) = linear(&toks, i);
                    f.paths.push((path, here(&scopes)));
                    i = next;
                }
                Tok::Ident(w)
                    if matches!(
                        w.as_str(),
                        "fn" | "struct"
                            | "enum"
                            | "const"
                            | "static"
                            | "type"
                            | "trait"
                            | "mod"
                            | "union"
                    ) =>
                {
                    if let Some(Tok::Ident(n)) = toks.get(i + 1) {
                        if scopes.is_empty() {
                            f.items.insert(n.clone());
                        }
                    }
                    i += 1;
                }
                Tok::Str(s) => {
                    let inner = tokens(s);
                    let at = here(&scopes);
                    let mut j = 0;
                    while j < inner.len() {
                        match &inner[j] {
                            Tok::Ident(w)
                                if matches!(w.as_str(), "crate" | "self" | "super")
                                    && matches!(inner.get(j + 1), Some(Tok::Sep)) =>
                            {
                                let (path, next) = linear(&inner, j);
                                f.paths.push((path, at.clone()));
                                j = next;
                            }
                            _ => j += 1,
                        }
                    }
                    i += 1;
                }
                _ => i += 1,
            }
        }
        f
    }

    /// Every path the file names, with the module it is written in.
    fn named(&self) -> impl Iterator<Item = (&[String], &[String])> {
        self.paths
            .iter()
            .map(|(p, at)| (p.as_slice(), at.as_slice()))
    }
}

/// At `i`, `#[cfg(test)]` (and any further attributes) before `mod name`:
/// the index after the module (its `;` or its closing brace) and its name.
fn test_module(toks: &[Tok], i: usize) -> Option<(usize, String)> {
    let cfg_test = [
        Tok::Punct('#'),
        Tok::Punct('['),
        Tok::Ident("cfg".into()),
        Tok::Punct('('),
        Tok::Ident("test".into()),
        Tok::Punct(')'),
        Tok::Punct(']'),
    ];
    if !toks[i..].starts_with(&cfg_test) {
        return None;
    }
    let mut j = i + cfg_test.len();
    // Further attributes: `#[...]`.
    while toks.get(j) == Some(&Tok::Punct('#')) && toks.get(j + 1) == Some(&Tok::Punct('[')) {
        let mut depth = 0;
        while j < toks.len() {
            match toks[j] {
                Tok::Punct('[') => depth += 1,
                Tok::Punct(']') => {
                    depth -= 1;
                    if depth == 0 {
                        j += 1;
                        break;
                    }
                }
                _ => {}
            }
            j += 1;
        }
    }
    if is(toks.get(j), "pub") {
        j += 1;
    }
    if !is(toks.get(j), "mod") {
        return None;
    }
    let Some(Tok::Ident(name)) = toks.get(j + 1) else {
        return None;
    };
    j += 2;
    match toks.get(j) {
        Some(Tok::Punct(';')) => Some((j + 1, name.clone())),
        Some(Tok::Punct('{')) => {
            let mut depth = 0;
            while j < toks.len() {
                match toks[j] {
                    Tok::Punct('{') => depth += 1,
                    Tok::Punct('}') => {
                        depth -= 1;
                        if depth == 0 {
                            return Some((j + 1, name.clone()));
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            Some((toks.len(), name.clone()))
        }
        _ => None,
    }
}

/// The path `a::b::c` starting at `i`, and the index after it.
fn linear(toks: &[Tok], mut i: usize) -> (Vec<String>, usize) {
    let mut path = Vec::new();
    while let Some(Tok::Ident(w)) = toks.get(i) {
        path.push(w.clone());
        i += 1;
        if toks.get(i) == Some(&Tok::Sep) && matches!(toks.get(i + 1), Some(Tok::Ident(_))) {
            i += 1;
        } else {
            break;
        }
    }
    (path, i)
}

/// The leaves of the use tree at `*j` under `prefix`.
fn use_tree(toks: &[Tok], j: &mut usize, prefix: Vec<String>, out: &mut Vec<(Vec<String>, Bound)>) {
    let mut path = prefix;
    loop {
        match toks.get(*j) {
            Some(Tok::Ident(w)) => {
                *j += 1;
                if w == "self" && !path.is_empty() && toks.get(*j) != Some(&Tok::Sep) {
                    // `use a::b::{self}` binds `b`.
                    let bound = path.last().cloned().map_or(Bound::Nothing, Bound::Name);
                    out.push((path.clone(), alias(toks, j, bound)));
                    return;
                }
                path.push(w.clone());
                if toks.get(*j) == Some(&Tok::Sep) {
                    *j += 1;
                    continue;
                }
                let bound = Bound::Name(w.clone());
                out.push((path, alias(toks, j, bound)));
                return;
            }
            Some(Tok::Punct('*')) => {
                *j += 1;
                out.push((path, Bound::Glob));
                return;
            }
            Some(Tok::Punct('{')) => {
                *j += 1;
                loop {
                    match toks.get(*j) {
                        None => return,
                        Some(Tok::Punct('}')) => {
                            *j += 1;
                            return;
                        }
                        Some(Tok::Punct(',')) => *j += 1,
                        Some(_) => {
                            let before = *j;
                            use_tree(toks, j, path.clone(), out);
                            if *j == before {
                                *j += 1;
                            }
                        }
                    }
                }
            }
            _ => return,
        }
    }
}

/// `as name` (or `as _`) after a use leaf.
fn alias(toks: &[Tok], j: &mut usize, bound: Bound) -> Bound {
    if !is(toks.get(*j), "as") {
        return bound;
    }
    *j += 1;
    match toks.get(*j) {
        Some(Tok::Ident(n)) => {
            *j += 1;
            if n == "_" {
                Bound::Nothing
            } else {
                Bound::Name(n.clone())
            }
        }
        _ => bound,
    }
}

struct Crate {
    files: BTreeMap<Vec<String>, File>,
}

impl Crate {
    /// `raw`, written in module `at`, as a path from the root; `None` for a
    /// path into another crate.
    fn absolute(&self, raw: &[String], at: &[String], depth: usize) -> Option<Vec<String>> {
        let first = raw.first()?;
        let mut base: Vec<String>;
        let mut rest = raw;
        match first.as_str() {
            "crate" | "$crate" => {
                base = Vec::new();
                rest = &raw[1..];
            }
            "self" | "super" => {
                base = at.to_vec();
                while let Some(s) = rest.first() {
                    match s.as_str() {
                        "self" => {}
                        "super" => {
                            base.pop()?;
                        }
                        _ => break,
                    }
                    rest = &rest[1..];
                }
            }
            name => {
                // A relative path: a child module, or a name the module's
                // own `use` declarations bind.
                let c = child(at, name);
                if self.is_module_prefix(&c) {
                    base = at.to_vec();
                } else {
                    let target = self.files.get(at)?.bindings.get(name)?;
                    if depth > 8 || target.as_slice() == raw {
                        return None;
                    }
                    let mut abs = self.absolute(target, at, depth + 1)?;
                    abs.extend_from_slice(&raw[1..]);
                    return Some(abs);
                }
            }
        }
        base.extend_from_slice(rest);
        Some(base)
    }

    /// Whether some file's module is `m` or sits under it.
    fn is_module_prefix(&self, m: &[String]) -> bool {
        self.files.keys().any(|k| k.starts_with(m))
    }

    fn longest_module(&self, path: &[String]) -> Vec<String> {
        (0..=path.len())
            .rev()
            .map(|n| &path[..n])
            .find(|p| self.files.contains_key(*p))
            .unwrap_or(&[])
            .to_vec()
    }

    /// The module `abs` (a path from the root, named in `importer`)
    /// resolves to: the longest module it starts with, followed through
    /// the `use` declarations of an ancestor of `importer` (or, along a
    /// chain of re-exports of an item, of any module) to the module that
    /// defines the item.
    fn resolve(
        &self,
        abs: Vec<String>,
        importer: &[String],
        item_chain: bool,
        depth: usize,
    ) -> Vec<String> {
        let p = self.longest_module(&abs);
        if p.len() == abs.len() || depth > 16 || !(item_chain || importer.starts_with(&p)) {
            return p;
        }
        let Some(file) = self.files.get(&p) else {
            return p;
        };
        let name = &abs[p.len()];
        let rest = &abs[p.len() + 1..];
        let target = match file.bindings.get(name) {
            Some(t) => self.absolute(t, &p, 0),
            None => file.globs.iter().find_map(|g| {
                let g = self.absolute(g, &p, 0)?;
                let m = self.longest_module(&g);
                (m.len() == g.len() && self.files.get(&m)?.items.contains(name)).then(|| {
                    let mut t = g;
                    t.push(name.clone());
                    t
                })
            }),
        };
        let Some(target) = target else {
            return p;
        };
        let names_item = self.longest_module(&target).len() < target.len();
        let mut next = target;
        next.extend_from_slice(rest);
        self.resolve(next, importer, names_item, depth + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_map_to_module_paths() {
        assert_eq!(
            module_path("quant/dot/rows.rs").as_deref(),
            Some("quant::dot::rows")
        );
        assert_eq!(module_path("quant.rs").as_deref(), Some("quant"));
        assert_eq!(module_path("quant/mod.rs").as_deref(), Some("quant"));
        assert_eq!(module_path("lib.rs").as_deref(), Some(ROOT));
        assert_eq!(module_path("main.rs").as_deref(), Some(ROOT));
        assert_eq!(module_path("bin/tool.rs"), None);
        assert_eq!(module_path("report/page.js"), None);
    }

    #[test]
    fn paths_in_comments_and_unit_tests_are_not_names() {
        let g = ModuleGraph::from_sources([
            ("lib.rs", "mod a; mod b; mod c; mod d;"),
            (
                "a.rs",
                "// use crate::b;\n/* crate::c::X */\n/// [`d`](crate::d)\nfn f() {}\n\
                 #[cfg(test)]\nmod tests {\n    use crate::b::X;\n}\n",
            ),
            ("b.rs", "#[cfg(test)]\nmod tests;\n"),
            ("b/tests.rs", "use crate::a;"),
            ("c.rs", ""),
            ("d.rs", ""),
        ]);
        assert!(g.imports("a").is_empty(), "{g:?}");
        assert!(g.modules().all(|m| m != "b::tests"), "{g:?}");
    }

    #[test]
    fn every_form_of_path_is_read() {
        let g = ModuleGraph::from_sources([
            ("lib.rs", "mod a; mod b; mod c; mod d; mod e; mod f;"),
            (
                "a.rs",
                "use crate::{b, c::{X, Y as Z}};\nfn g() { let _ = crate::d::f(\"//\"); }\n\
                 #[cfg_attr(feature = \"serde\", serde(with = \"crate::e\"))]\nstruct S;\n\
                 fn h<'a>(c: char) -> bool { c == '\"' || super::f::G }\n",
            ),
            ("b.rs", ""),
            ("c.rs", ""),
            ("d.rs", ""),
            ("e.rs", ""),
            ("f.rs", ""),
        ]);
        let want: BTreeSet<String> = ["b", "c", "d", "e", "f"].map(String::from).into();
        assert_eq!(g.imports("a"), &want);
    }

    #[test]
    fn ancestors_and_descendants_are_structure() {
        let g = ModuleGraph::from_sources([
            ("lib.rs", "mod q; use q::r::X;"),
            ("q.rs", "mod r; use r::X; fn f() { self::r::g() }"),
            ("q/r.rs", "use super::super::q; use crate::q::f;"),
        ]);
        assert!(g.imports(ROOT).is_empty(), "{g:?}");
        assert!(g.imports("q").is_empty(), "{g:?}");
        assert!(g.imports("q::r").is_empty(), "{g:?}");
    }

    #[test]
    fn items_re_exported_by_an_ancestor_resolve_to_their_module() {
        let g = ModuleGraph::from_sources([
            (
                "lib.rs",
                "mod record; pub mod tracer;\npub use record::{stats, stage};\n\
                 pub use tracer::Tracer;",
            ),
            ("record.rs", "pub mod stats; pub mod stage;"),
            ("record/stats.rs", "pub struct TensorStats;"),
            (
                "record/stage.rs",
                "use crate::stats::TensorStats; use crate::Tracer;",
            ),
            ("tracer.rs", "pub struct Tracer;"),
        ]);
        let want: BTreeSet<String> = ["record::stats", "tracer"].map(String::from).into();
        assert_eq!(g.imports("record::stage"), &want);
    }
}
