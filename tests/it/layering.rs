//! The modules' dependency direction (ARCHITECTURE.md, "Layering"): the
//! `crate::` paths of `src/` read as a graph of top-level modules
//! (`http::auth` counts as `http`), which must have no cycle.
//!
//! The sources are read as text, not compiled: every `crate::name` outside a
//! comment is an edge, whether in a `use`, a path in the code, or a test
//! module, since a test that reaches up a layer ties the layers together too.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// Where an edge was seen first: file and line.
type Edges = BTreeMap<String, BTreeMap<String, String>>;

#[test]
fn module_imports_form_no_cycle() {
    let graph = module_graph();
    let cycles = cycles(&graph);
    assert!(cycles.is_empty(), "import cycles between modules:\n{}", cycles.join("\n"));
}

/// The store's writer publishes through the sink it is given
/// (ARCHITECTURE.md, "Code map"), so storage does not know who listens.
#[test]
fn store_publishes_without_knowing_the_hub() {
    let graph = module_graph();
    assert_eq!(graph["store"].get("hub"), None, "store imports hub");
}

/// The shared helpers are a leaf: anything may use them because they use
/// nothing of the project.
#[test]
fn util_imports_nothing_of_the_project() {
    let graph = module_graph();
    assert_eq!(graph["util"], BTreeMap::new());
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Each top-level module with the modules it names, and where.
fn module_graph() -> Edges {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(f)).collect();
    let mut graph: Edges = modules.iter().map(|m| (m.clone(), BTreeMap::new())).collect();
    for file in &files {
        let Some(from) = module_of(file) else { continue };
        let text = std::fs::read_to_string(file).unwrap();
        let relative = file.strip_prefix(src()).unwrap().display().to_string();
        for (number, line) in text.lines().enumerate() {
            for to in crate_paths(strip_comment(line)) {
                assert!(modules.contains(&to), "src/{relative}:{}: crate::{to} is no module", number + 1);
                if to != from {
                    let edges = graph.get_mut(&from).unwrap();
                    edges.entry(to).or_insert_with(|| format!("src/{relative}:{}", number + 1));
                }
            }
        }
    }
    graph
}

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

/// `src/http/auth.rs` and `src/http/mod.rs` are `http`; the crate root
/// (`lib.rs`, `main.rs`) is no module of the graph.
fn module_of(file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src()).unwrap();
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// The line without its `//` comment (doc comments included). A `//` after
/// an odd number of quotes is inside a string ("http://…") and kept.
fn strip_comment(line: &str) -> &str {
    let mut quotes = 0;
    let bytes = line.as_bytes();
    for i in 0..bytes.len() {
        match bytes[i] {
            b'"' if i == 0 || bytes[i - 1] != b'\\' => quotes += 1,
            b'/' if quotes % 2 == 0 && bytes.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
    }
    line
}

/// The top-level modules a line names: `crate::a::…` gives `a`, and
/// `crate::{a::…, b}` gives `a` and `b`.
fn crate_paths(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        // `foo_crate::` is another path.
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // The items at the group's top level, each up to its first `::`.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => found.push(leading_name(&std::mem::take(&mut item))),
                    c => item.push(c),
                }
            }
            found.push(leading_name(&item));
        } else {
            found.push(leading_name(rest));
        }
    }
    found.retain(|name| !name.is_empty());
    found
}

fn leading_name(path: &str) -> String {
    path.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

/// One line per strongly connected group of modules: a shortest cycle
/// through it, each step with the file and line that makes it.
fn cycles(graph: &Edges) -> Vec<String> {
    let reach: BTreeMap<&String, BTreeSet<&String>> = graph.keys().map(|m| (m, reachable(graph, m))).collect();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for m in graph.keys() {
        if seen.contains(m) || !reach[m].contains(m) {
            continue;
        }
        let group: BTreeSet<&String> = reach[m].iter().copied().filter(|n| reach[n].contains(m)).collect();
        let path = shortest_cycle(graph, m);
        let steps: Vec<String> =
            path.windows(2).map(|w| format!("{} → {} ({})", w[0], w[1], graph[w[0]][w[1]])).collect();
        let names: Vec<&str> = group.iter().map(|s| s.as_str()).collect();
        out.push(format!("  [{}]: {}", names.join(", "), steps.join("; ")));
        seen.extend(group);
    }
    out
}

fn reachable<'a>(graph: &'a Edges, from: &'a String) -> BTreeSet<&'a String> {
    let mut seen = BTreeSet::new();
    let mut queue: VecDeque<&String> = graph[from].keys().collect();
    while let Some(m) = queue.pop_front() {
        if seen.insert(m) {
            queue.extend(graph[m].keys());
        }
    }
    seen
}

/// The shortest path from `start` back to itself (breadth first).
fn shortest_cycle<'a>(graph: &'a Edges, start: &'a String) -> Vec<&'a String> {
    let mut parent: BTreeMap<&String, &String> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(m) = queue.pop_front() {
        for next in graph[m].keys() {
            if next == start {
                let mut path = vec![start, m];
                let mut at = m;
                while at != start {
                    at = parent[at];
                    path.push(at);
                }
                path.reverse();
                return path;
            }
            if next != start && !parent.contains_key(next) {
                parent.insert(next, m);
                queue.push_back(next);
            }
        }
    }
    unreachable!("{start} is on a cycle")
}
