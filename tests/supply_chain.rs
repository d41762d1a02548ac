//! Supply chain, checked in every CI run without extra tools: every package in
//! Cargo.lock has a licence the policy in deny.toml allows and comes from crates.io
//! (or is the workspace itself), Cargo.lock is present and up to date (`--locked`), and
//! the crate roots forbid `unsafe`.
//!
//! deny.toml is the single source of truth: `[licenses] allow`, `[[licenses.exceptions]]`,
//! `[licenses] private` and `[sources] allow-registry` are read from it, so this test and
//! `cargo deny check licenses bans sources` (run by hand, see README "Supply chain")
//! enforce the same policy. Advisories need the RustSec database and are not checked here.
//!
//! `cargo metadata` runs without `--offline`: it reads the manifests of every package in
//! the lockfile, including Windows/macOS-only ones that a Linux `cargo test` never
//! downloads, so a fresh CI machine fetches those few from crates.io.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The licence and source policy, as written in deny.toml.
struct Policy {
    allow: BTreeSet<String>,
    /// Crate name -> licences allowed for that crate only.
    exceptions: BTreeMap<String, BTreeSet<String>>,
    ignore_private: bool,
    registries: BTreeSet<String>,
}

fn strings(v: Option<&toml::Value>, what: &str) -> BTreeSet<String> {
    let Some(v) = v else {
        return BTreeSet::new();
    };
    v.as_array()
        .unwrap_or_else(|| panic!("deny.toml: {what} must be an array of strings"))
        .iter()
        .map(|s| {
            let s = s
                .as_str()
                .unwrap_or_else(|| panic!("deny.toml: {what} holds a non-string: {s}"));
            normalise(s)
        })
        .collect()
}

fn normalise(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn policy() -> Policy {
    let path = repo().join("deny.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let doc: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("deny.toml: {e}"));
    let licenses = doc
        .get("licenses")
        .and_then(toml::Value::as_table)
        .expect("deny.toml: no [licenses] table");
    let allow = strings(licenses.get("allow"), "[licenses] allow");
    assert!(!allow.is_empty(), "deny.toml: [licenses] allow is empty");
    let mut exceptions = BTreeMap::new();
    if let Some(list) = licenses.get("exceptions") {
        for (i, e) in list
            .as_array()
            .expect("deny.toml: [licenses] exceptions must be an array of tables")
            .iter()
            .enumerate()
        {
            let name = e
                .get("name")
                .or_else(|| e.get("crate"))
                .and_then(toml::Value::as_str)
                .unwrap_or_else(|| panic!("deny.toml: licenses.exceptions[{i}] has no name"));
            let what = format!("licenses.exceptions[{i}] ({name}) allow");
            exceptions.insert(name.to_string(), strings(e.get("allow"), &what));
        }
    }
    let ignore_private = licenses
        .get("private")
        .and_then(|p| p.get("ignore"))
        .and_then(toml::Value::as_bool)
        .unwrap_or(false);
    let registries = strings(
        doc.get("sources").and_then(|s| s.get("allow-registry")),
        "[sources] allow-registry",
    );
    Policy {
        allow,
        exceptions,
        ignore_private,
        registries,
    }
}

/// An SPDX licence expression: `MIT`, `A WITH exception`, `A AND B`, `A OR B`, with
/// parentheses; the legacy `A/B` crates.io form means `A OR B` (as cargo-deny reads it).
#[derive(Debug)]
enum Expr {
    /// A licence identifier, with its exception if any ("Apache-2.0 WITH LLVM-exception").
    Licence(String),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

fn tokens(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in s.chars() {
        if c.is_whitespace() || matches!(c, '(' | ')' | '/') {
            if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
            if !c.is_whitespace() {
                out.push(c.to_string());
            }
        } else {
            word.push(c);
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

fn is_op(t: &str, op: &str) -> bool {
    t.eq_ignore_ascii_case(op) || (op == "OR" && t == "/")
}

struct Parser {
    toks: Vec<String>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&str> {
        self.toks.get(self.at).map(String::as_str)
    }
    fn next(&mut self) -> Result<String, String> {
        let t = self.toks.get(self.at).cloned().ok_or("unexpected end")?;
        self.at += 1;
        Ok(t)
    }
    fn or(&mut self) -> Result<Expr, String> {
        let mut e = self.and()?;
        while self.peek().is_some_and(|t| is_op(t, "OR")) {
            self.at += 1;
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut e = self.atom()?;
        while self.peek().is_some_and(|t| is_op(t, "AND")) {
            self.at += 1;
            e = Expr::And(Box::new(e), Box::new(self.atom()?));
        }
        Ok(e)
    }
    fn atom(&mut self) -> Result<Expr, String> {
        let t = self.next()?;
        if t == "(" {
            let e = self.or()?;
            return match self.next()?.as_str() {
                ")" => Ok(e),
                other => Err(format!("expected `)`, found `{other}`")),
            };
        }
        if t == ")" || ["AND", "OR", "WITH", "/"].iter().any(|op| is_op(&t, op)) {
            return Err(format!("expected a licence identifier, found `{t}`"));
        }
        if self.peek().is_some_and(|t| is_op(t, "WITH")) {
            self.at += 1;
            let exception = self.next()?;
            return Ok(Expr::Licence(format!("{t} WITH {exception}")));
        }
        Ok(Expr::Licence(t))
    }
}

fn parse(expr: &str) -> Result<Expr, String> {
    let mut p = Parser {
        toks: tokens(expr),
        at: 0,
    };
    let e = p.or()?;
    match p.peek() {
        None => Ok(e),
        Some(t) => Err(format!("unexpected `{t}`")),
    }
}

/// Whether some choice among the OR branches uses only licences in `allowed`. A
/// licence with an exception is distinct from the bare licence, as in cargo-deny.
fn satisfied(e: &Expr, allowed: &dyn Fn(&str) -> bool) -> bool {
    match e {
        Expr::Licence(l) => allowed(l),
        Expr::And(a, b) => satisfied(a, allowed) && satisfied(b, allowed),
        Expr::Or(a, b) => satisfied(a, allowed) || satisfied(b, allowed),
    }
}

/// Why the package's licence is not acceptable, or None when it is.
fn licence_problem(policy: &Policy, name: &str, licence: Option<&str>) -> Option<String> {
    let Some(licence) = licence else {
        return Some("has no SPDX `license` field (a licence file needs a [[licenses.clarify]] in deny.toml and a rule here)".into());
    };
    let expr = match parse(licence) {
        Ok(e) => e,
        Err(e) => return Some(format!("licence `{licence}` does not parse: {e}")),
    };
    let extra = policy.exceptions.get(name);
    let allowed = |l: &str| policy.allow.contains(l) || extra.is_some_and(|x| x.contains(l));
    (!satisfied(&expr, &allowed)).then(|| {
        format!("licence `{licence}` is not satisfied by deny.toml [licenses] allow (or an exception for this crate)")
    })
}

/// Why the package's source is not acceptable, or None when it is.
fn source_problem(
    policy: &Policy,
    source: Option<&str>,
    workspace: bool,
    manifest: &str,
) -> Option<String> {
    const CRATES_IO: &str = "https://github.com/rust-lang/crates.io-index";
    let Some(source) = source else {
        return (!workspace).then(|| {
            format!(
                "is a path dependency outside the workspace ({manifest}); only crates.io is allowed"
            )
        });
    };
    let url = source
        .strip_prefix("registry+")
        .or_else(|| source.strip_prefix("sparse+"))
        .map(|u| u.trim_end_matches('/'));
    let allowed = match url {
        // crates.io's sparse index is the same registry as its git index.
        Some("https://index.crates.io") => policy.registries.contains(CRATES_IO),
        Some(u) => policy.registries.contains(u),
        None => false,
    };
    (!allowed).then(|| {
        format!("comes from `{source}`, not a registry in deny.toml [sources] allow-registry")
    })
}

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--manifest-path",
        ])
        .arg(repo().join("Cargo.toml"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo} metadata: {e}"));
    assert!(
        out.status.success(),
        "`cargo metadata --locked` failed: Cargo.lock is missing or out of date with Cargo.toml \
         (run `cargo update -w` and commit Cargo.lock):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata printed invalid JSON")
}

#[test]
fn every_dependency_has_an_allowed_licence_and_comes_from_crates_io() {
    assert!(
        repo().join("Cargo.lock").is_file(),
        "Cargo.lock is missing: a binary crate ships its lockfile so builds are reproducible"
    );
    let policy = policy();
    let meta = metadata();
    let members: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .expect("cargo metadata: no workspace_members")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let packages = meta["packages"]
        .as_array()
        .expect("cargo metadata: no packages");
    let mut problems = Vec::new();
    for p in packages {
        let name = p["name"].as_str().unwrap_or("?");
        let version = p["version"].as_str().unwrap_or("?");
        let workspace = members.contains(p["id"].as_str().unwrap_or(""));
        // `publish = false` appears as an empty list of allowed registries.
        let private = workspace && p["publish"].as_array().is_some_and(|r| r.is_empty());
        if !(private && policy.ignore_private)
            && let Some(why) = licence_problem(&policy, name, p["license"].as_str())
        {
            problems.push(format!("{name} {version}: {why}"));
        }
        let manifest = p["manifest_path"].as_str().unwrap_or("?");
        if let Some(why) = source_problem(&policy, p["source"].as_str(), workspace, manifest) {
            problems.push(format!("{name} {version}: {why}"));
        }
    }
    println!("checked {} packages against deny.toml", packages.len());
    assert!(
        problems.is_empty(),
        "supply-chain policy (deny.toml) violated:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn crate_roots_forbid_unsafe_code() {
    for root in ["src/lib.rs", "src/main.rs"] {
        let text = std::fs::read_to_string(repo().join(root))
            .unwrap_or_else(|e| panic!("cannot read {root}: {e}"));
        assert!(
            text.lines().any(|l| l.trim() == "#![forbid(unsafe_code)]"),
            "{root} does not carry `#![forbid(unsafe_code)]` as a crate attribute"
        );
    }
}

/// The licence checker itself: it must reject what the policy does not allow, or the
/// test above could never fail.
#[test]
fn licence_expressions_are_judged_like_cargo_deny() {
    let policy = Policy {
        allow: ["MIT", "Apache-2.0", "Unicode-3.0"]
            .map(String::from)
            .into(),
        exceptions: [(
            "systemd".to_string(),
            ["LGPL-2.1-or-later WITH GCC-exception-2.0".to_string()].into(),
        )]
        .into(),
        ignore_private: true,
        registries: ["https://github.com/rust-lang/crates.io-index".to_string()].into(),
    };
    let ok = |name: &str, l: &str| licence_problem(&policy, name, Some(l)).is_none();
    assert!(ok("a", "MIT"));
    assert!(ok("a", "MIT/Apache-2.0"));
    assert!(ok("a", "Apache-2.0 / MIT"));
    assert!(ok("a", "GPL-3.0-only OR MIT"));
    assert!(ok("a", "(MIT OR Apache-2.0) AND Unicode-3.0"));
    assert!(ok(
        "a",
        "Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT"
    ));
    assert!(!ok("a", "GPL-3.0-only"));
    assert!(!ok("a", "MIT AND GPL-3.0-only"));
    assert!(!ok("a", "(MIT OR Apache-2.0) AND ISC"));
    assert!(!ok("a", "Apache-2.0 WITH LLVM-exception"));
    assert!(!ok("a", "LGPL-2.1-or-later WITH GCC-exception-2.0"));
    assert!(ok("systemd", "LGPL-2.1-or-later WITH GCC-exception-2.0"));
    assert!(!ok("systemd", "LGPL-2.1-or-later"));
    assert!(!ok("a", "MIT OR"));
    assert!(!ok("a", "(MIT"));
    assert!(licence_problem(&policy, "a", None).is_some());

    let src = |s: Option<&str>, ws: bool| source_problem(&policy, s, ws, "x/Cargo.toml").is_none();
    assert!(src(
        Some("registry+https://github.com/rust-lang/crates.io-index"),
        false
    ));
    assert!(src(Some("sparse+https://index.crates.io/"), false));
    assert!(src(None, true));
    assert!(!src(None, false));
    assert!(!src(
        Some("git+https://example.org/x.git#0123456789abcdef"),
        false
    ));
    assert!(!src(Some("sparse+https://registry.example.org/"), false));
}
