//! The crate's layout (DESIGN §8, issue 11): no import circle between the modules of `src/`,
//! neither between the top-level modules nor between the files of one module; `attribution`
//! does not use `patching`; the binary stays thin.
//!
//! Read from the source text: every `crate::…`, `super::…` and `self::…` path outside comments
//! and unit tests, and in a `mod.rs` the paths through its own submodules, is resolved to the
//! file that defines it, through `pub use` re-exports. A parent's `pub use` of its children (the
//! facade of a module) is not a use; anything else is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path relative to the crate root: `[]` is `lib.rs`, `["acdc", "sweep"]` is
/// `src/acdc/sweep.rs`.
type Module = Vec<String>;

struct Source {
    /// Module → code lines (comments and `#[cfg(test)] mod tests` removed).
    code: BTreeMap<Module, Vec<String>>,
    /// `(module, name)` → the module the name is re-exported from.
    reexports: BTreeMap<(Module, String), Module>,
}

fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("tests.rs") {
            // `tests.rs` files are unit tests (`#[cfg(test)] mod tests;`).
            out.push(path);
        }
    }
}

/// The statements of a file, one string each, without comments or unit tests.
fn statements(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t == "#[cfg(test)]" && lines.peek().is_some_and(|l| l.contains("mod ")) {
            // Unit tests may use anything: skip the module, counting braces.
            let mut depth = 0i32;
            for next in lines.by_ref() {
                depth += next.matches('{').count() as i32 - next.matches('}').count() as i32;
                if depth <= 0 && (next.contains('}') || next.trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        if t.starts_with("//") {
            continue;
        }
        // A `use` may span lines: keep it whole so re-exports can be recognised.
        if (t.starts_with("use ") || t.starts_with("pub use ") || t.starts_with("pub(crate) use "))
            && !t.ends_with(';')
        {
            let mut s = t.to_string();
            for next in lines.by_ref() {
                s.push(' ');
                s.push_str(next.trim());
                if next.trim().ends_with(';') {
                    break;
                }
            }
            out.push(s);
        } else {
            out.push(t.to_string());
        }
    }
    out
}

fn is_reexport(stmt: &str) -> bool {
    stmt.starts_with("pub use ") || stmt.starts_with("pub(crate) use ")
}

/// Names a `use` statement brings in under `prefix::`: `use a::{b, c::d}` gives `a::b`, `a::c::d`.
fn use_paths(stmt: &str) -> Vec<String> {
    let body = stmt[stmt.find("use ").unwrap() + 4..]
        .trim_end_matches(';')
        .trim();
    let mut out = Vec::new();
    expand(body, &mut out);
    out
}

fn expand(body: &str, out: &mut Vec<String>) {
    let Some(open) = body.find('{') else {
        out.push(body.split(" as ").next().unwrap().trim().to_string());
        return;
    };
    let prefix = body[..open].trim_end_matches("::");
    let inner = &body[open + 1..body.rfind('}').unwrap()];
    let (mut depth, mut start) = (0, 0);
    let mut parts = Vec::new();
    for (i, ch) in inner.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    for part in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        if part == "self" {
            out.push(prefix.to_string());
        } else {
            expand(&format!("{prefix}::{part}"), out);
        }
    }
}

fn ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Every path `a::b::c` in a line of code that starts with `crate`, `super`, `self`, `eap` or
/// one of `children`.
fn paths_in(line: &str, children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut in_string = false;
    while i < chars.len() {
        let c = chars[i];
        let char_literal = i > 0 && chars[i - 1] == '\'' && chars.get(i + 1) == Some(&'\'');
        if c == '"' && !char_literal && (i == 0 || chars[i - 1] != '\\') {
            in_string = !in_string;
        }
        if in_string
            || !ident_char(c)
            || (i > 0 && (ident_char(chars[i - 1]) || chars[i - 1] == ':'))
        {
            i += 1;
            continue;
        }
        let mut segs = Vec::new();
        let mut j = i;
        loop {
            let start = j;
            while j < chars.len() && ident_char(chars[j]) {
                j += 1;
            }
            segs.push(chars[start..j].iter().collect::<String>());
            if j + 2 < chars.len()
                && chars[j] == ':'
                && chars[j + 1] == ':'
                && ident_char(chars[j + 2])
            {
                j += 2;
            } else {
                break;
            }
        }
        let first = segs[0].as_str();
        if segs.len() > 1
            && (matches!(first, "crate" | "super" | "self" | "eap") || children.contains(first))
        {
            out.push(segs);
        }
        i = j.max(i + 1);
    }
    out
}

impl Source {
    fn read(src: &Path) -> Source {
        let mut files = Vec::new();
        rust_files(src, &mut files);
        let mut code = BTreeMap::new();
        for f in &files {
            let module = module_of(src, f);
            // The binary names the library `eap`; it is a module of its own.
            let module = if module == ["main"] {
                vec!["main".to_string()]
            } else {
                module
            };
            code.insert(module, statements(&std::fs::read_to_string(f).unwrap()));
        }
        let mut source = Source {
            code,
            reexports: BTreeMap::new(),
        };
        let modules: Vec<Module> = source.code.keys().cloned().collect();
        for m in &modules {
            for stmt in source.code[m].clone() {
                if is_reexport(&stmt) {
                    for path in use_paths(&stmt) {
                        let segs: Vec<String> = path.split("::").map(str::to_string).collect();
                        let name = segs.last().unwrap().clone();
                        if let Some(target) = source.resolve(m, &segs) {
                            source.reexports.insert((m.clone(), name), target);
                        }
                    }
                }
                if let Some(name) = stmt.strip_prefix("macro_rules! ") {
                    let name = name.trim_end_matches(" {").to_string();
                    source.reexports.insert((vec![], name), m.clone());
                }
            }
        }
        source
    }

    fn children(&self, m: &Module) -> BTreeSet<String> {
        self.code
            .keys()
            .filter(|k| k.len() == m.len() + 1 && k.starts_with(m))
            .map(|k| k.last().unwrap().clone())
            .collect()
    }

    /// The module a path written in `from` refers to.
    fn resolve(&self, from: &Module, segs: &[String]) -> Option<Module> {
        let mut base: Module = match segs[0].as_str() {
            "crate" | "eap" => vec![],
            "self" => from.clone(),
            "super" => from[..from.len().saturating_sub(1)].to_vec(),
            _ => from.clone(), // a child of `from`
        };
        let rest = if matches!(segs[0].as_str(), "crate" | "eap" | "self" | "super") {
            &segs[1..]
        } else {
            segs
        };
        for s in rest {
            let mut next = base.clone();
            next.push(s.clone());
            if self.code.contains_key(&next) {
                base = next;
            } else if let Some(target) = self.reexports.get(&(base.clone(), s.clone())) {
                base = target.clone();
            } else {
                break;
            }
        }
        (!base.is_empty()).then_some(base)
    }

    /// `from → to` for every use of one module by another.
    fn edges(&self) -> BTreeSet<(Module, Module)> {
        let mut edges = BTreeSet::new();
        for (m, stmts) in &self.code {
            let children = self.children(m);
            for stmt in stmts {
                if is_reexport(stmt) || stmt.starts_with("pub mod ") || stmt.starts_with("mod ") {
                    continue;
                }
                let paths = if stmt.starts_with("use ") {
                    use_paths(stmt)
                        .iter()
                        .map(|p| p.split("::").map(str::to_string).collect())
                        .collect()
                } else {
                    paths_in(stmt, &children)
                };
                for segs in paths {
                    if let Some(to) = self.resolve(m, &segs) {
                        if &to != m {
                            edges.insert((m.clone(), to));
                        }
                    }
                }
            }
        }
        edges
    }
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "lib".into()
    } else {
        m.join("::")
    }
}

/// The cycles of a directed graph, one per strongly connected component of more than one node.
fn cycles(edges: &BTreeSet<(String, String)>) -> Vec<Vec<String>> {
    let nodes: BTreeSet<&String> = edges.iter().flat_map(|(a, b)| [a, b]).collect();
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(n) = stack.pop() {
            for (a, b) in edges {
                if *a == n && seen.insert(b.clone()) {
                    stack.push(b.clone());
                }
            }
        }
        seen
    };
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for n in nodes {
        if done.contains(n) {
            continue;
        }
        let from_n = reach(n);
        if !from_n.contains(n) {
            continue;
        }
        let scc: Vec<String> = from_n
            .iter()
            .filter(|m| reach(m).contains(n))
            .cloned()
            .collect();
        done.extend(scc.iter().cloned());
        out.push(scc);
    }
    out
}

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every module's uses of other modules, as `from -> to` lines; `top` folds them to the
/// top-level modules.
fn uses(top: bool) -> BTreeSet<(String, String)> {
    let source = Source::read(&src());
    source
        .edges()
        .into_iter()
        .map(|(a, b)| {
            if top {
                (a[0].clone(), b[0].clone())
            } else {
                (name(&a), name(&b))
            }
        })
        .filter(|(a, b)| a != b)
        .collect()
}

#[test]
fn no_import_circle_between_files() {
    let found = cycles(&uses(false));
    assert!(found.is_empty(), "modules that use each other: {found:?}");
}

#[test]
fn no_import_circle_between_top_level_modules() {
    let edges = uses(true);
    let found = cycles(&edges);
    assert!(
        found.is_empty(),
        "top-level modules that use each other: {found:?}\n{edges:#?}"
    );
}

#[test]
fn attribution_does_not_use_patching() {
    let edges = uses(true);
    assert!(
        edges.contains(&("attribution".into(), "runs".into())),
        "{edges:?}"
    );
    for (a, b) in &edges {
        assert!(
            !(a == "attribution" && (b == "patching" || b == "acdc")),
            "attribution uses {b}"
        );
    }
}

#[test]
fn the_checker_sees_circles() {
    let mut e = BTreeSet::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        e.insert((a.to_string(), b.to_string()));
    }
    assert_eq!(cycles(&e), vec![vec!["a", "b", "c"]]);
    let paths = use_paths("pub use x::{a, b::{c, d as e}, self};");
    assert_eq!(paths, ["x::a", "x::b::c", "x::b::d", "x"]);
    let none = BTreeSet::new();
    assert_eq!(
        paths_in("let x = crate::runs::prepare(&r)?; \"crate::not\"", &none),
        [vec!["crate", "runs", "prepare"]]
    );
}

/// `cargo test --release --test tests layout::print -- --ignored --nocapture` prints the graph.
#[test]
#[ignore]
fn print_module_uses() {
    for top in [true, false] {
        for (a, b) in uses(top) {
            println!("{a} -> {b}");
        }
        println!();
    }
}

#[test]
fn the_binary_is_thin() {
    // Flag definitions live in src/flags.rs, the glue in src/main.rs.
    let main = std::fs::read_to_string(src().join("main.rs")).unwrap();
    let lines = main.lines().count();
    assert!(lines <= 400, "src/main.rs has {lines} lines");
    let edges = uses(true);
    for (a, b) in &edges {
        assert!(
            !(b == "main" || (b == "flags" && a != "main")),
            "the library uses the binary: {a} -> {b}"
        );
    }
}
