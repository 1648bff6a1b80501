//! The module contracts of ARCHITECTURE.md ("Layout"), checked on the source: dependencies between
//! the top-level modules of `src/` point one way (no cycle), `net` does not import `vm`, the leaves
//! import nothing of the crate, and only `cli`/`main` know exit codes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MODULES: &[&str] = &[
    "cli",
    "controller",
    "error",
    "failpoint",
    "forgejo",
    "layer",
    "net",
    "ops",
    "paths",
    "secret",
    "types",
    "vm",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`src/vm/driver.rs` → `vm`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// Every top-level module `text` refers to as `crate::<module>` or `super::super::<module>`-free
/// `use crate::{a, b}`.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(list) = rest.strip_prefix('{') {
            let end = list.find('}').unwrap_or(list.len());
            for item in list[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.insert(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found.retain(|m| MODULES.contains(&m.as_str()));
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let module = module_of(&src, &file);
        if !MODULES.contains(&module.as_str()) {
            continue; // lib.rs, main.rs
        }
        // Comments (doc links) are not dependencies.
        let text: String = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let deps = graph.entry(module.clone()).or_default();
        for m in referenced(&text) {
            if m != module {
                deps.insert(m);
            }
        }
    }
    graph
}

#[test]
fn top_level_modules_form_no_cycle() {
    let graph = graph();
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(i) = path.iter().position(|p| p == m) {
            panic!("import cycle: {} -> {m}", path[i..].join(" -> "));
        }
        path.push(m.to_owned());
        for d in graph.get(m).into_iter().flatten() {
            visit(d, graph, path, done);
        }
        path.pop();
        done.insert(m.to_owned());
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_layering_of_architecture_md_holds() {
    let graph = graph();
    let deps = |m: &str| graph.get(m).cloned().unwrap_or_default();
    assert!(
        deps("types").is_empty(),
        "types is a leaf: {:?}",
        deps("types")
    );
    assert!(
        deps("secret").is_empty(),
        "secret is a leaf: {:?}",
        deps("secret")
    );
    assert!(
        deps("layer").is_empty(),
        "layer is a leaf: {:?}",
        deps("layer")
    );
    assert!(
        deps("failpoint").is_empty(),
        "failpoint is a leaf: {:?}",
        deps("failpoint")
    );
    let leaves = ["types", "secret", "layer", "paths", "failpoint"];
    let paths_extra: Vec<_> = deps("paths")
        .into_iter()
        .filter(|d| !leaves.contains(&d.as_str()))
        .collect();
    assert!(paths_extra.is_empty(), "paths imports {paths_extra:?}");
    for low in ["vm", "net", "forgejo"] {
        let extra: Vec<_> = deps(low)
            .into_iter()
            .filter(|d| !leaves.contains(&d.as_str()))
            .collect();
        assert!(extra.is_empty(), "{low} imports {extra:?}");
    }
    for m in [
        "vm",
        "net",
        "forgejo",
        "ops",
        "controller",
        "types",
        "secret",
        "error",
        "paths",
        "layer",
        "failpoint",
    ] {
        assert!(!deps(m).contains("cli"), "{m} imports cli");
    }
    assert!(
        !deps("ops").contains("controller"),
        "ops imports controller"
    );
}

#[test]
fn only_the_binary_knows_exit_codes() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for file in files {
        let module = module_of(&src, &file);
        if module == "cli" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for needle in ["exit_code", "exit::", "ExitCode"] {
            assert!(
                !text.contains(needle),
                "{} mentions {needle}: only cli and main map errors to exit codes",
                file.display()
            );
        }
    }
}
