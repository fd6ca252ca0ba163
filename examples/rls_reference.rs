//! `cargo run --release --example rls_reference -- POLICY_DIR OWNER_URL`: the native row-level-security reference of the policy
//! set in POLICY_DIR (`struere_proxy::policy::rls::reference`, the generator the differential
//! tests use), over the catalog of the database at OWNER_URL. Prints the setup SQL on stdout and
//! `ROLE <environment> <policy role> <reference role>` lines on stderr. Nothing is executed.

use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, url] = args.as_slice() else {
        eprintln!("usage: rls_reference POLICY_DIR OWNER_URL");
        return ExitCode::from(2);
    };
    match run(dir, url).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rls-reference: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(dir: &str, url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let policies = struere_proxy::policy::load_dir(std::path::Path::new(dir))?;
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let catalog = struere_proxy::catalog::load(&client).await?;
    let reference = struere_proxy::policy::rls::reference(&policies, &catalog)?;
    println!("{}", reference.setup_sql);
    for r in &reference.roles {
        eprintln!("ROLE {} {} {}", r.environment.as_str(), r.role, r.name);
    }
    Ok(())
}
