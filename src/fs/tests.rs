
#[test]
fn a_node_keeps_one_lookup_count_when_its_kind_changes() {
    let f = fixture();
    f.publish(T1);
    fs::write(f.mount().join("tmp.yaml"), format!("model:\n  api_key: {T1}\n")).unwrap_or_default();
    let tmp = ok(f.fs.lookup(ROOT_ID, OsStr::new("tmp.yaml"))).id;
    assert_eq!(ok(f.fs.lookup(ROOT_ID, OsStr::new("tmp.yaml"))).id, tmp);
    let renamed = f.fs.rename(ROOT_ID, OsStr::new("tmp.yaml"), ROOT_ID, OsStr::new("config.yaml"), RenameFlags::empty());
    ok(run(renamed));
    assert!(f.fs.views.get(tmp).is_some() && f.fs.inodes.get(tmp).is_none());
    // The kernel's two references to the temp file's node are the view's.
    f.fs.forget(tmp, 1);
    assert!(f.fs.views.get(tmp).is_some());
    f.fs.forget(tmp, 1);
    assert!(f.fs.views.get(tmp).is_none() && f.fs.inodes.get(tmp).is_none());
    // A current view forgotten by the kernel is no longer current: the next
    // lookup makes a new one.
    let v = ok(f.fs.lookup(ROOT_ID, OsStr::new("config.yaml"))).id;
    f.fs.forget(v, 1);
    assert_ne!(ok(f.fs.lookup(ROOT_ID, OsStr::new("config.yaml"))).id, v);
}
