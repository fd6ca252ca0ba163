//! How long after `policy dev` commits a new version do statements through a proxy run under it?
//!
//! Starts the demo (throwaway PostgreSQL + proxy) and a second proxy serving the same database,
//! then alternates development between two policy versions (teachers see `paymentAmount` or
//! not) and, on a connection through the second proxy, repeats one statement until its result
//! shows the new version. Prints the publish time (validation + commit) and the switch time
//! (commit → first statement under the new version): medians, p90 and max.
//!
//! Run: `bash scripts/policy_switch.sh [ROUNDS]` (default 30).

use std::path::Path;
use std::time::{Duration, Instant};

use struere_proxy::auth::identity::Environment;
use struere_proxy::config::RawConfig;
use struere_proxy::demo::Demo;
use struere_proxy::policy::Bundle;
use struere_proxy::server::RunningProxy;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<34} median {:>7.2} ms   p90 {:>7.2} ms   max {:>7.2} ms   (n={})",
        ms(percentile(&v, 0.5)),
        ms(percentile(&v, 0.9)),
        ms(v.last().copied().unwrap_or_default()),
        v.len()
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(30);
    let demo = Demo::start(RawConfig { listen: Some("127.0.0.1:0".into()), ..RawConfig::default() }).await?;
    let settings = demo.proxy.proxy.settings.clone();
    let second = RunningProxy::start(settings.clone()).await?;
    let teacher = demo
        .keys
        .iter()
        .find(|k| k.environment == Environment::Development && k.organization == "acme" && k.role == "teacher")
        .ok_or("the demo has no development teacher key")?;
    let url = format!(
        "host=127.0.0.1 port={} user=bench dbname={} password={} sslmode=disable",
        second.addr.port(),
        settings.database,
        teacher.secret
    );
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let mut owner = struere_proxy::auth::store::connect_admin(&settings.admin_upstream).await?;

    let hidden = Bundle::shipped();
    let mut visible = hidden.clone();
    let text =
        hidden.files["development.toml"].replacen("\"data.status\"]", "\"data.status\", \"data.paymentAmount\"]", 1);
    visible.files.insert("development.toml".into(), text);

    let sql = "SELECT count(data->>'paymentAmount') FROM entities WHERE entity_type = 'session'";
    let (mut publish, mut switch) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (bundle, want_visible) = if round % 2 == 0 { (&visible, true) } else { (&hidden, false) };
        let start = Instant::now();
        struere_proxy::lifecycle::sync_development(&mut owner, bundle, Path::new("policies")).await?;
        let committed = start.elapsed();
        loop {
            let n: i64 = client.query_one(sql, &[]).await?.get(0);
            if (n > 0) == want_visible {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err("the second proxy never switched".into());
            }
        }
        publish.push(committed);
        switch.push(start.elapsed() - committed);
    }
    println!("policy switch on a second proxy, {rounds} rounds (development v1..v{})", rounds + 1);
    summary("publish (validate + commit)", publish);
    summary("switch (commit -> statement)", switch);
    second.stop().await;
    let Demo { proxy, cluster, .. } = demo;
    proxy.stop().await;
    if let Some(cluster) = cluster {
        tokio::task::spawn_blocking(move || drop(cluster)).await?;
    }
    Ok(())
}
