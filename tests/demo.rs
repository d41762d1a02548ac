//! The README's first command: `soclink demo` must run the whole loop on a machine with
//! nothing else set up, and say what it proved.

mod common;

#[test]
fn demo_runs_the_whole_loop() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["demo", "--lines", "5000", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("stored    5000 / 5000 lines"), "{text}");
    assert!(text.contains("every line arrived exactly once"), "{text}");
    assert!(text.contains("verified and stored the bundle"), "{text}");
    // What it printed is true: the store holds the 5000 events.
    let evs = common::store_events(&dir.path().join("store").join("demo-agent").join("app"));
    assert_eq!(evs.len(), 5000);
}
