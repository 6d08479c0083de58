//! The layout holds: lower crates never depend on higher ones, and no module of the facade,
//! the Python bindings or xtask imports a module that (directly or not) imports it back.
//! Read from the sources, so a change that bends either rule fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The workspace crates a crate's `[dependencies]` (not dev-dependencies) name.
fn runtime_deps(manifest: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut section = String::new();
    let mut deps = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.to_string();
        } else if section == "[dependencies]" && line.starts_with("weightlift") {
            let name = line.split(['=', '.', ' ']).next().unwrap();
            deps.insert(name.to_string());
        }
    }
    deps
}

#[test]
fn lower_crates_never_depend_on_higher_ones() {
    let allowed: &[(&str, &[&str])] = &[
        ("crates/format", &[]),
        ("crates/storage", &[]),
        ("crates/device", &[]),
        (
            "crates/workload",
            &[
                "weightlift-format",
                "weightlift-storage",
                "weightlift-device",
            ],
        ),
        (
            "crates/weightlift",
            &[
                "weightlift-format",
                "weightlift-storage",
                "weightlift-device",
            ],
        ),
        // The binary ships: the facade and the publishable workloads, never test support.
        ("crates/cli", &["weightlift", "weightlift-workload"]),
        ("crates/python", &["weightlift"]),
    ];
    for (dir, ok) in allowed {
        let deps = runtime_deps(&root().join(dir).join("Cargo.toml"));
        let extra: Vec<_> = deps.iter().filter(|d| !ok.contains(&d.as_str())).collect();
        assert!(extra.is_empty(), "{dir} depends on {extra:?}");
    }
}

/// `module -> modules it names as crate::module`, for every file of `src` but the root.
fn module_graph(src: &Path, root_file: &str) -> BTreeMap<String, BTreeSet<String>> {
    let files: Vec<PathBuf> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .filter(|p| p.file_name().unwrap() != root_file)
        .collect();
    let names: BTreeSet<String> = files
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let me = file.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(file).unwrap();
        let mut uses = BTreeSet::new();
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            // `use crate::{a, b}` names several.
            let named: Vec<String> = if name.is_empty() && rest.starts_with('{') {
                let group = &rest[1..rest.find('}').unwrap_or(rest.len())];
                group
                    .split(',')
                    .map(|s| s.trim().split("::").next().unwrap_or("").to_string())
                    .collect()
            } else {
                vec![name]
            };
            for n in named {
                if n != me && names.contains(&n) {
                    uses.insert(n);
                }
            }
        }
        graph.insert(me, uses);
    }
    graph
}

/// A cycle of the graph, if it has one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    for (src, root_file) in [
        ("crates/weightlift/src", "lib.rs"),
        ("crates/python/src", "lib.rs"),
        ("xtask/src", "main.rs"),
    ] {
        let graph = module_graph(&root().join(src), root_file);
        assert!(graph.len() > 3, "{src}: {graph:?}");
        if let Some(c) = cycle(&graph) {
            panic!("{src}: modules import each other: {}", c.join(" -> "));
        }
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    let acyclic: BTreeMap<String, BTreeSet<String>> = [("a", vec!["b"]), ("b", vec![])]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
    assert!(cycle(&acyclic).is_none());
}
