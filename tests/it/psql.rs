//! The psql binary through the proxy: meta-commands (catalog queries), \copy, variables,
//! ON_ERROR_STOP, TLS with sslmode=require, and NOTIFY.

use std::process::Command;

use crate::harness::fixture;

fn psql(key: &str, sslmode: &str, script: &str) -> (bool, String, String) {
    let f = fixture();
    let out = Command::new(&f.psql)
        .arg(format!("host=127.0.0.1 port={} user=psql dbname=app password={key} sslmode={sslmode}", f.addr.port()))
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(script.as_bytes())?;
            child.wait_with_output()
        })
        .expect("psql runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn meta_commands_and_copy_over_tls() {
    let f = fixture();
    let t = crate::harness::unique("psql");
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("in.csv");
    std::fs::write(&csv, "1,one\n2,two\n3,three\n").unwrap();
    let out_csv = dir.path().join("out.csv");
    let script = format!(
        "CREATE TABLE {t} (id int PRIMARY KEY, name text);\n\
         \\copy {t} FROM '{}' WITH (FORMAT csv)\n\
         \\set wanted 2\n\
         SELECT name FROM {t} WHERE id = :wanted;\n\
         \\dt\n\
         \\d {t}\n\
         \\d+ {t}\n\
         \\copy (SELECT * FROM {t} ORDER BY id) TO '{}' WITH (FORMAT csv)\n",
        csv.display(),
        out_csv.display()
    );
    let (ok, stdout, stderr) = psql(&f.dev_key, "require", &script);
    assert!(ok, "psql failed: {stderr}\n{stdout}");
    // TLS itself is checked from psql's side (\conninfo) in psql_reports_tls_from_the_proxy.
    assert!(stdout.contains("two"), "{stdout}");
    assert!(stdout.contains(&t), "\\dt lists the table: {stdout}");
    assert!(stdout.contains("id") && stdout.contains("integer"), "\\d describes it: {stdout}");
    assert_eq!(std::fs::read_to_string(&out_csv).unwrap(), "1,one\n2,two\n3,three\n");
}

#[test]
fn psql_reports_tls_from_the_proxy() {
    let f = fixture();
    let (ok, stdout, stderr) = psql(&f.dev_key, "require", "\\conninfo\n");
    assert!(ok, "{stderr}");
    assert!(stdout.contains("SSL connection"), "{stdout}");
}

#[test]
fn on_error_stop_and_refusals() {
    let f = fixture();
    let (ok, stdout, stderr) = psql(&f.dev_key, "prefer", "SELECT 'first';\nSET ROLE postgres;\nSELECT 'never';\n");
    assert!(!ok);
    assert!(stdout.contains("first"));
    assert!(!stdout.contains("never"));
    assert!(stderr.contains("role"), "{stderr}");
}

#[test]
fn notify_in_the_same_session() {
    let f = fixture();
    let (ok, stdout, stderr) = psql(&f.dev_key, "disable", "LISTEN ch;\nNOTIFY ch, 'payload';\nSELECT 1;\n");
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Asynchronous notification \"ch\" with payload \"payload\""), "{stdout}");
}

#[test]
fn bad_key_with_psql() {
    let (ok, _stdout, stderr) = psql("sk_prod_nope", "prefer", "SELECT 1;\n");
    assert!(!ok);
    assert!(stderr.contains("password authentication failed"), "{stderr}");
}
