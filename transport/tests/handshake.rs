//! Mutual TLS over real QUIC on 127.0.0.1: who is let in and who is not.

use std::net::SocketAddr;

use blockferry_testkit::pki::Pki;
use blockferry_transport::pki::{self, Ca, Role, Validity};
use blockferry_transport::{
    RevocationList, TlsIdentity, Tuning, client_config, client_endpoint, peer_identity,
    server_config, server_endpoint,
};
use time::{Duration, OffsetDateTime};

/// Outcome of one connection attempt, seen from both ends.
struct Attempt {
    /// The agent name the server saw, if it accepted.
    server_saw: Result<String, String>,
    /// Whether the client's connection survived a round trip.
    client_ok: bool,
}

async fn attempt(
    server_pki: &Pki,
    revoked: RevocationList,
    client_ca: &Pki,
    client: TlsIdentity,
) -> Attempt {
    let tuning = Tuning::loopback();
    let scfg = server_config(
        &server_pki.ca(),
        server_pki.identity("relay"),
        revoked,
        &tuning,
    )
    .unwrap();
    let server = server_endpoint("127.0.0.1:0".parse().unwrap(), scfg, &tuning).unwrap();
    let addr: SocketAddr = server.local_addr().unwrap();
    let ccfg = client_config(&client_ca.ca(), client, &tuning).unwrap();
    let cep = client_endpoint("127.0.0.1:0".parse().unwrap(), ccfg, &tuning).unwrap();

    let server_task = tokio::spawn(async move {
        let incoming = server.accept().await.ok_or("endpoint closed")?;
        let conn = incoming.await.map_err(|e| e.to_string())?;
        let id = peer_identity(&conn).map_err(|e| e.to_string())?;
        // Echo one stream so the client can prove the connection works.
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let data = recv.read_to_end(64).await.map_err(|e| e.to_string())?;
        send.write_all(&data).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        conn.closed().await;
        Ok::<_, String>(id.name)
    });

    let client_ok = async {
        let conn = cep.connect(addr, "relay").ok()?.await.ok()?;
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(b"ping").await.ok()?;
        send.finish().ok()?;
        let back = recv.read_to_end(64).await.ok()?;
        conn.close(0u32.into(), b"done");
        (back == b"ping").then_some(())
    }
    .await
    .is_some();
    let server_saw = server_task.await.unwrap();
    Attempt {
        server_saw,
        client_ok,
    }
}

#[tokio::test]
async fn good_certificates_connect_and_the_server_sees_the_agent_name() {
    let p = Pki::bare();
    let agent = pki::issue_agent(p.dir.path(), "host-a").unwrap();
    let id = TlsIdentity::load(&agent.cert, &agent.key).unwrap();
    let a = attempt(&p, RevocationList::default(), &p, id).await;
    assert!(a.client_ok);
    assert_eq!(a.server_saw.unwrap(), "host-a");
}

#[tokio::test]
async fn agent_of_another_ca_is_refused() {
    let p = Pki::bare();
    let other = Pki::bare();
    let agent = pki::issue_agent(other.dir.path(), "host-a").unwrap();
    let id = TlsIdentity::load(&agent.cert, &agent.key).unwrap();
    // The agent trusts the real CA (so it accepts the server); its own cert is foreign.
    let a = attempt(&p, RevocationList::default(), &p, id).await;
    assert!(!a.client_ok);
    let err = a.server_saw.unwrap_err();
    // Both CAs carry the same subject, so webpki finds the issuer by name and
    // then refuses the signature.
    assert!(err.contains("invalid peer certificate"), "{err}");
}

#[tokio::test]
async fn server_of_another_ca_is_refused_by_the_agent() {
    let p = Pki::bare();
    let other = Pki::bare();
    let agent = pki::issue_agent(p.dir.path(), "host-a").unwrap();
    let id = TlsIdentity::load(&agent.cert, &agent.key).unwrap();
    let a = attempt(&other, RevocationList::default(), &p, id).await;
    assert!(!a.client_ok);
    assert!(a.server_saw.is_err());
}

#[tokio::test]
async fn expired_agent_certificate_is_refused() {
    let p = Pki::bare();
    let now = OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - Duration::days(10),
        not_after: now - Duration::days(1),
    };
    let agent = pki::issue_agent_with(p.dir.path(), "host-a", expired).unwrap();
    let id = TlsIdentity::load(&agent.cert, &agent.key).unwrap();
    let a = attempt(&p, RevocationList::default(), &p, id).await;
    assert!(!a.client_ok);
    let err = a.server_saw.unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");
}

#[tokio::test]
async fn revoked_agent_is_refused_at_the_handshake() {
    let p = Pki::bare();
    let agent = pki::issue_agent(p.dir.path(), "host-b").unwrap();
    let id = TlsIdentity::load(&agent.cert, &agent.key).unwrap();
    let revoked = RevocationList::parse("host-b\n").unwrap();
    let a = attempt(&p, revoked, &p, id).await;
    assert!(!a.client_ok);
    let err = a.server_saw.unwrap_err();
    assert!(err.to_lowercase().contains("revoked"), "{err}");
}

#[tokio::test]
async fn a_server_only_certificate_cannot_act_as_client() {
    // The target's certificate lacks the client-auth usage: it cannot pose as an agent.
    let p = Pki::bare();
    let a = attempt(&p, RevocationList::default(), &p, p.identity("target")).await;
    assert!(!a.client_ok);
    assert!(a.server_saw.is_err());
}

#[test]
fn in_memory_ca_issues_certificates_the_tls_layer_loads() {
    let ca = Ca::generate("test CA").unwrap();
    let c = ca
        .issue("host-z", Role::Client, Validity::days_from_now(1))
        .unwrap();
    TlsIdentity::from_pem(&c.cert_pem, &c.key_pem).unwrap();
}
