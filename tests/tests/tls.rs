//! Safe to share, TLS: a gateway started with `--tls-cert/--tls-key` serves only TLS, with
//! certificates this test makes with `openssl` (a CA, the gateway's certificate for 127.0.0.1, a
//! client certificate, and one of a CA nobody trusts).
//!
//! * two mounts with `--tls-ca` write and read a file across each other (blocks, metadata and the
//!   mount's own reads from the gateway all go over TLS);
//! * a plaintext client gets a clear error, not a hang: a raw gRPC call fails within bounds, and
//!   `stagefs mount` without `--tls-ca` fails with a message that says to pass it;
//! * with `--tls-client-ca` (mutual TLS) a client without a certificate, or with one of another
//!   CA, is refused; one with a certificate the CA signed mounts, writes and reads.

use std::fs;
use std::time::Duration;

use client::fs::{connect_gateway, meta_client, GatewayAccess};
use proto::meta as pb;
use stagefs_tests::certs::Certs;
use stagefs_tests::*;

const MIB: u64 = 1 << 20;

/// What a client with `access` gets from the gateway at `address`: `Ok` when a metadata call
/// succeeds, else the error it saw (connecting or calling). Bounded: a hang fails the test.
fn try_call(stack: &FuseStack, access: GatewayAccess) -> Result<(), String> {
    let address = stack.gateway.addr().to_string();
    stack.block_on(within(
        Duration::from_secs(30),
        "a client's first call is answered",
        async move {
            let channel = connect_gateway(&address, &access)
                .await
                .map_err(|e| e.to_string())?;
            meta_client(channel)
                .stat_fs(pb::Empty {})
                .await
                .map(|_| ())
                .map_err(|status| format!("{status:?}"))
        },
    ))
}

fn write_and_read_across(stack: &FuseStack, args: &[&str]) {
    let writer = stack.mount("writer").args(args.iter().copied()).start();
    let pattern = Pattern::new(11);
    let mut out = fs::File::create(writer.join("big")).unwrap();
    pattern.write_to(&mut out, 5 * MIB, MIB as usize).unwrap();
    out.sync_all().unwrap();
    drop(out);
    fs::write(writer.join("small"), b"over TLS").unwrap();
    let reader = stack.mount("reader").args(args.iter().copied()).start();
    pattern
        .verify(&mut fs::File::open(reader.join("big")).unwrap(), 5 * MIB)
        .unwrap();
    assert_eq!(fs::read(reader.join("small")).unwrap(), b"over TLS");
    drop(reader);
    drop(writer);
}

#[test]
fn mounts_work_over_tls_and_plaintext_is_refused_clearly() {
    let dir = TestDir::new("tls-certs");
    let certs = Certs::make(&dir.join("certs"));
    let stack = FuseStack::start("tls", |gateway| {
        gateway.tls(
            (&certs.server_cert, &certs.server_key),
            &certs.ca,
            None,
            None,
        )
    });
    let ca = certs.ca.to_str().unwrap();
    write_and_read_across(&stack, &["--tls-ca", ca]);

    let refused = try_call(&stack, GatewayAccess::default())
        .expect_err("a plaintext client is refused by a TLS gateway");
    eprintln!("plaintext client: {refused}");
    let refused_at = stack.dir.join("plaintext");
    fs::create_dir(&refused_at).unwrap();
    let stderr = failing_mount(&stack.gateway.addr().to_string(), &refused_at, &[]);
    assert!(
        stderr.contains("--tls-ca"),
        "the failed mount says what to pass: {stderr}"
    );
    // The gateway's certificate must be one the client trusts.
    let rogue_ca = dir.join("certs").join("rogue-ca.pem");
    let refused = try_call(
        &stack,
        GatewayAccess::default().with_tls(&fs::read(rogue_ca).unwrap(), None),
    )
    .expect_err("a gateway certificate of an untrusted CA is refused");
    eprintln!("untrusted gateway certificate: {refused}");
    try_call(
        &stack,
        GatewayAccess::default().with_tls(&fs::read(&certs.ca).unwrap(), None),
    )
    .expect("a client trusting the gateway's CA is served");
}

#[test]
fn mutual_tls_refuses_clients_without_a_trusted_certificate() {
    let dir = TestDir::new("mtls-certs");
    let certs = Certs::make(&dir.join("certs"));
    let stack = FuseStack::start("mtls", |gateway| {
        gateway.tls(
            (&certs.server_cert, &certs.server_key),
            &certs.ca,
            Some(&certs.ca),
            Some((&certs.client_cert, &certs.client_key)),
        )
    });
    let ca_pem = fs::read(&certs.ca).unwrap();
    let refused = try_call(&stack, GatewayAccess::default().with_tls(&ca_pem, None))
        .expect_err("a client without a certificate is refused");
    eprintln!("no client certificate: {refused}");
    let (rogue_cert, rogue_key) = (
        fs::read(&certs.rogue_cert).unwrap(),
        fs::read(&certs.rogue_key).unwrap(),
    );
    let refused = try_call(
        &stack,
        GatewayAccess::default().with_tls(&ca_pem, Some((&rogue_cert, &rogue_key))),
    )
    .expect_err("a client certificate of another CA is refused");
    eprintln!("client certificate of another CA: {refused}");
    let args = [
        "--tls-ca",
        certs.ca.to_str().unwrap(),
        "--tls-cert",
        certs.client_cert.to_str().unwrap(),
        "--tls-key",
        certs.client_key.to_str().unwrap(),
    ];
    write_and_read_across(&stack, &args);
}
