//! Bad input on `rbd:` images: a missing pool, namespace or image, a malformed name, a configuration
//! file that is not there, an unknown client id, a wrong key, a cluster that does not
//! answer. Each is one sentence on stderr and exit status 1, within a bounded time, and
//! leaves nothing behind.

use std::time::{Duration, Instant};

use integration::ceph::CephCluster;
use integration::fixture::{Fixture, Run};

/// Runs `qvol ARGS...` and checks it fails with one sentence containing `needle`, within
/// `limit`.
fn refused(f: &Fixture, args: &[&str], needle: &str, limit: Duration) -> Run {
    let t0 = Instant::now();
    let run = f.qvol(args);
    let took = t0.elapsed();
    run.one_sentence_error("qvol", needle);
    assert!(took < limit, "qvol {args:?} took {took:?}");
    run
}

#[test]
fn bad_pools_images_names_credentials_and_clusters_are_one_sentence_each() {
    let cluster = CephCluster::start();
    let f = cluster.fixture();
    let key = f.new_key("vm1");
    let quick = Duration::from_secs(10);

    refused(
        &f,
        &["info", "rbd:nopool/disk"],
        "has no pool \"nopool\"",
        quick,
    );
    refused(
        &f,
        &["info", "rbd:rbd/missing"],
        "rbd:rbd/missing does not exist",
        quick,
    );
    refused(&f, &["info", "rbd:rbd"], "write rbd:POOL/IMAGE", quick);
    // Namespaces: rbd:POOL/NAMESPACE/IMAGE, and no more slashes or empty parts than that.
    refused(&f, &["info", "rbd:rbd/a/b/c"], "(more than two /)", quick);
    refused(&f, &["info", "rbd:rbd//img"], "(an empty pool", quick);
    refused(&f, &["info", "rbd:rbd/ns/"], "(an empty pool", quick);
    refused(
        &f,
        &["info", "rbd:rbd/nons/disk"],
        "the pool \"rbd\" has no namespace \"nons\" (`rbd namespace create rbd/nons`",
        quick,
    );
    let create = [
        "create",
        "rbd:rbd/nons/disk",
        "--size",
        "16M",
        "--key",
        &key,
    ];
    refused(&f, &create, "has no namespace", quick);
    let create = ["create", "rbd:nopool/disk", "--size", "16M", "--key", &key];
    refused(&f, &create, "has no pool", quick);
    let listed = cluster.rbd(&["ls", "rbd"]).success();
    assert!(listed.stdout.trim().is_empty(), "{listed:?}");
    for (image, needle) in [
        ("rbd:rbd/missing", "rbd:rbd/missing does not exist"),
        (
            "rbd:rbd/a/b/c",
            "write rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE",
        ),
    ] {
        let socket = f.path("d.sock");
        let socket = socket.to_str().unwrap();
        let args = ["--socket-path", socket, "--blk-file", image, "--any-volume"];
        f.vhost_qvol(args).one_sentence_error("vhost-qvol", needle);
    }

    // Who and where: the flags, and the configuration they name.
    let conf = cluster.conf().to_str().unwrap();
    refused(
        &f,
        &["--ceph-conf", "/nonexistent/ceph.conf", "info", "rbd:rbd/x"],
        "/nonexistent/ceph.conf does not exist",
        quick,
    );
    refused(
        &f,
        &[
            "--ceph-conf",
            conf,
            "--ceph-id",
            "nobody",
            "info",
            "rbd:rbd/x",
        ],
        "as client.nobody",
        quick,
    );
    let text = std::fs::read_to_string(cluster.conf()).unwrap();
    // The admin's name with another key (the same format, a key the cluster never made).
    let wrong_keyring = f.path("wrong.keyring");
    std::fs::write(
        &wrong_keyring,
        "[client.admin]\n\tkey = AQBbaaaaaaaaaaAAqE2pTkc3r2sU7zxLqKbqbQ==\n",
    )
    .unwrap();
    let wrong = f.path("wrong.conf");
    let keyring_line = text
        .lines()
        .find(|l| l.starts_with("keyring") && l.contains("client.admin"))
        .unwrap();
    std::fs::write(
        &wrong,
        text.replace(
            keyring_line,
            &format!("keyring = {}", wrong_keyring.display()),
        ),
    )
    .unwrap();
    let run = refused(
        &f,
        &["--ceph-conf", wrong.to_str().unwrap(), "info", "rbd:rbd/x"],
        "cannot connect to the Ceph cluster",
        quick,
    );
    assert!(
        !run.stderr.contains("AQBb"),
        "the key is never printed: {run:?}"
    );

    // A cluster that does not answer: its mon host is a port nobody listens on. The file
    // lowers client_mount_timeout (it overrides qvol's default of 15 s).
    let dead = f.path("dead.conf");
    let mon_line = text.lines().find(|l| l.starts_with("mon host")).unwrap();
    std::fs::write(
        &dead,
        text.replace(
            mon_line,
            "mon host = v2:127.0.0.1:9\nclient mount timeout = 3",
        ),
    )
    .unwrap();
    refused(
        &f,
        &["--ceph-conf", dead.to_str().unwrap(), "info", "rbd:rbd/x"],
        "no monitor answered",
        Duration::from_secs(8),
    );
}
