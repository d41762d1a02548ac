//! A running relay under refused certificates and hostile peers: each is refused with
//! a message an operator understands, nothing of theirs is stored, the relay stays up
//! with bounded memory, and a well-behaved agent keeps delivering meanwhile.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use soclink::certs::{CertKind, IssueParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn refused_certificates_store_nothing_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(dir.path(), &pki, "relay", "");
    relay.start();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // A client certificate from another CA, and from another CA with the same name.
    for (sub, ca_name) in [("other", "some other CA"), ("twin", "soclink test CA")] {
        let d = dir.path().join(sub).join("certs");
        std::fs::create_dir_all(&d).unwrap();
        let ca = soclink::certs::Ca::new(ca_name).unwrap();
        let i = ca
            .issue(&IssueParams::new("intruder", &[], CertKind::Client))
            .unwrap();
        std::fs::write(d.join("c.pem"), &i.cert_pem).unwrap();
        common::write_key(&d.join("k.pem"), &i.key_pem);
        let cfg =
            soclink::tls::client_config(&pki.ca(), &d.join("c.pem"), &d.join("k.pem")).unwrap();
        let Err(e) = rt.block_on(tls_connect(&relay.address(), cfg)) else {
            panic!("must be refused")
        };
        assert!(e.contains("CA"), "{ca_name}: {e}");
    }

    // An expired client certificate.
    let mut p = IssueParams::new("expired", &[], CertKind::Client);
    p.not_before = SystemTime::now() - Duration::from_secs(3 * 86400);
    p.not_after = SystemTime::now() - Duration::from_secs(86400);
    let (ec, ek) = pki.issue_with("expired", &p);
    let Err(e) = rt.block_on(tls_connect(&relay.address(), client_config(&pki, &ec, &ek))) else {
        panic!("expired must be refused")
    };
    assert!(e.contains("expired"), "{e}");

    // No client certificate at all.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in soclink::tls::load_certs(&pki.ca()).unwrap() {
            r.add(c).unwrap();
        }
        r
    };
    let nocert = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth(),
    );
    let Err(e) = rt.block_on(tls_connect(&relay.address(), nocert)) else {
        panic!("no cert must be refused")
    };
    assert!(e.contains("certificate"), "{e}");

    // A TLS 1.2-only client (the relay requires 1.3).
    let (gc, gk) = pki.issue("good", CertKind::Client);
    let tls12 = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            soclink::tls::load_certs(&gc).unwrap(),
            soclink::tls::load_key(&gk).unwrap(),
        )
        .unwrap(),
    );
    let Err(e) = rt.block_on(tls_connect(&relay.address(), tls12)) else {
        panic!("TLS 1.2 must be refused")
    };
    assert!(e.contains("TLS version") || e.contains("version"), "{e}");

    // An agent that expects the relay under another name refuses it, and says so.
    let adir = dir.path().join("agent");
    std::fs::create_dir_all(&adir).unwrap();
    let alog = adir.join("a.log");
    std::fs::write(&alog, "secret line\n").unwrap();
    let up = upstream_toml(&pki, &relay.address(), "misnamed").replace(
        "server_name = \"localhost\"",
        "server_name = \"center.example.gov.tw\"",
    );
    let mut agent = AgentProc::new(&adir, &file_source("a", &[&alog], ""), &up);
    agent.start();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        agent
            .log()
            .contains("not valid for name center.example.gov.tw"),
        "the agent must say the relay's certificate has the wrong name:\n{}",
        agent.log()
    );
    agent.stop();

    // The relay logged each refusal and stored nothing.
    let log = relay.log();
    assert!(log.contains("TLS handshake refused"), "{log}");
    relay.stop();
    assert!(
        store_events(&relay.store).is_empty(),
        "nothing may be stored"
    );
}

#[test]
fn hostile_peers_do_not_hurt_the_relay_or_other_agents() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut relay = RelayProc::new(
        dir.path(),
        &pki,
        "relay",
        // Every hostile peer here shares 127.0.0.1 with the honest agent; the bound on
        // one address's unauthenticated sockets has its own test (security_host.rs).
        "max_unauthenticated_per_address = 1024",
    );
    relay.start();
    let mut witness = Witness::start(dir.path(), &pki, &relay);
    witness.write(1000);
    witness.check(&relay);
    let rss_before = rss_kib(relay.pid());
    let (hc, hk) = pki.issue("hostile", CertKind::Client);
    let cfg = client_config(&pki, &hc, &hk);
    let addr = relay.address();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Random bytes instead of TLS.
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let junk: Vec<u8> = (0..65536).map(|i| (i * 7919 % 251) as u8).collect();
        let _ = s.write_all(&junk).await;
        drop(s);

        // Random bytes after a good handshake and Hello.
        let mut s = tls_connect(&addr, cfg.clone()).await.unwrap();
        let _ = s.write_all(&junk).await;
        drop(s);

        // A frame claiming 4 GiB.
        let mut s = tls_connect(&addr, cfg.clone()).await.unwrap();
        let _ = s.write_all(&[0xff, 0xff, 0xff, 0xff, 0x10]).await;
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(
            matches!(n, Ok(Ok(_)) | Ok(Err(_))),
            "the relay must answer or close"
        );
        drop(s);

        // A gzip bomb: 1 GiB of zeros in ~1 MB, declared as small.
        let bomb = {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(9));
            let zeros = vec![b'{'; 1 << 20];
            for _ in 0..1024 {
                enc.write_all(&zeros).unwrap();
            }
            enc.finish().unwrap()
        };
        let mut s = tls_connect(&addr, cfg.clone()).await.unwrap();
        let batch = soclink::protocol::Frame::Batch(soclink::protocol::Batch {
            header: soclink::protocol::BatchHeader {
                stream: "logs".into(),
                seq: 1,
                source: "bomb".into(),
                day: "2026-11-26".into(),
                events: 1,
                raw_bytes: 1000,
                origin: None,
                item: None,
            },
            gzip: bytes::Bytes::from(bomb),
        });
        let _ = soclink::protocol::write_frame(&mut s, &batch).await;
        let mut resp = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp)).await;
        assert!(
            String::from_utf8_lossy(&resp).contains("rejected"),
            "the bomb must be refused"
        );
        drop(s);

        // 500 idle connections and a slowloris that sends one byte a second.
        let mut idle = Vec::new();
        for _ in 0..500 {
            if let Ok(s) = tokio::net::TcpStream::connect(&addr).await {
                idle.push(s);
            }
        }
        let mut slow = tls_connect(&addr, cfg.clone()).await.unwrap();
        // A batch frame trickling in one byte at a time.
        for b in [0u8, 0, 0, 50] {
            let _ = slow.write_all(&[b]).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Meanwhile the witness keeps delivering.
        tokio::task::block_in_place(|| {
            witness.write(2000);
            witness.check(&relay);
        });
        let rss_during = rss_kib(relay.pid());
        assert!(
            rss_during < rss_before + 200 * 1024,
            "relay memory grew from {rss_before} KiB to {rss_during} KiB"
        );
        drop(idle);
        drop(slow);
    });
    // Nothing of the hostile peer was stored; the relay is still up and serving.
    assert!(!relay.store.join("hostile").join("bomb").exists());
    witness.write(500);
    witness.check(&relay);
    assert!(
        relay.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "relay must still run"
    );
    assert!(
        relay.log().contains("rejected"),
        "the bomb's refusal must be logged:\n{}",
        relay.log()
    );
    witness.agent.stop();
    relay.stop();
}
