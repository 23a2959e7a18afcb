//! The real `agora` binary as a user runs it.

mod common;

use std::process::Command;

use common::{AGORA, AgoraProcess};

#[test]
fn help_explains_the_flags_and_their_environment_variables() -> anyhow::Result<()> {
    let output = Command::new(AGORA).args(["serve", "--help"]).output()?;
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout)?;
    for needle in [
        "--listen",
        "--database-url",
        "DATABASE_URL",
        "--nats-url",
        "NATS_URL",
        "AGORA_USERS__DATABASE_URL",
        "users",
    ] {
        assert!(help.contains(needle), "help lacks {needle}:\n{help}");
    }
    Ok(())
}

#[test]
fn keygen_writes_private_keys_only_their_owner_can_read() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = dir.path().join("keys");
    let status = Command::new(AGORA)
        .arg("keygen")
        .arg("--dir")
        .arg(&keys)
        .status()?;
    assert!(status.success());
    let private = std::fs::read_to_string(keys.join("jwt_ed25519.pem"))?;
    assert!(private.starts_with("-----BEGIN PRIVATE KEY-----"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(keys.join("jwt_ed25519.pem"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private key readable by others: {mode:o}");
    }
    // One service-token pair per service, private keys for the owner only.
    let services = [
        "users",
        "catalog",
        "inventory",
        "payments",
        "orders",
        "notifications",
    ];
    let mut service_keys = Vec::new();
    for service in services {
        let private_path = keys.join("services").join(format!("{service}.pem"));
        let private = std::fs::read_to_string(&private_path)?;
        assert!(
            private.starts_with("-----BEGIN PRIVATE KEY-----"),
            "{service}"
        );
        let public =
            std::fs::read_to_string(keys.join("services").join(format!("{service}.pub.pem")))?;
        assert!(
            public.starts_with("-----BEGIN PUBLIC KEY-----"),
            "{service}"
        );
        assert_eq!(
            agora_platform::auth::public_pem_from_private(&private)?,
            public,
            "{service}: the public key belongs to the private one"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&private_path)?.permissions().mode();
            assert_eq!(
                mode & 0o077,
                0,
                "{service} key readable by others: {mode:o}"
            );
        }
        service_keys.push(private);
    }
    service_keys.sort();
    service_keys.dedup();
    assert_eq!(
        service_keys.len(),
        services.len(),
        "a key of its own per service"
    );

    // A second run keeps the existing pairs and writes missing ones.
    std::fs::remove_file(keys.join("services/orders.pem"))?;
    let status = Command::new(AGORA)
        .arg("keygen")
        .arg("--dir")
        .arg(&keys)
        .status()?;
    assert!(status.success());
    assert_eq!(
        std::fs::read_to_string(keys.join("jwt_ed25519.pem"))?,
        private
    );
    let payments = std::fs::read_to_string(keys.join("services/payments.pem"))?;
    assert!(service_keys.contains(&payments), "payments key kept");
    let orders = std::fs::read_to_string(keys.join("services/orders.pem"))?;
    assert!(!service_keys.contains(&orders), "orders key written anew");
    assert_eq!(
        agora_platform::auth::public_pem_from_private(&orders)?,
        std::fs::read_to_string(keys.join("services/orders.pub.pem"))?
    );
    // --force replaces them all.
    let status = Command::new(AGORA)
        .args(["keygen", "--force", "--dir"])
        .arg(&keys)
        .status()?;
    assert!(status.success());
    assert_ne!(
        std::fs::read_to_string(keys.join("jwt_ed25519.pem"))?,
        private
    );
    assert_ne!(
        std::fs::read_to_string(keys.join("services/payments.pem"))?,
        payments
    );
    Ok(())
}

#[test]
fn serve_users_answers_health_and_stops_cleanly_on_sigterm() -> anyhow::Result<()> {
    let users = AgoraProcess::start(&["users"], &[])?;
    let (serving, table) = users.health(0)?;
    assert!(serving && table.contains("SERVING"), "{table}");
    assert!(
        users.data.join("users.db").exists(),
        "SQLite default under --data-dir"
    );
    let exit = users.terminate()?;
    assert!(exit.success(), "exit status after SIGTERM: {exit}");
    Ok(())
}

#[test]
fn a_bad_database_url_fails_fast_with_a_clear_message() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let output = Command::new(AGORA)
        .args([
            "serve",
            "users",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "mysql://nope",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr)?;
    assert!(stderr.contains("postgres://"), "{stderr}");
    Ok(())
}
