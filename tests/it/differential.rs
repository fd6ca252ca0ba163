//! Differential testing against native row-level security: every generated statement runs through
//! the proxy with a key and natively on a reference database (same schema and rows, the same
//! policies as RLS policies and security_barrier views, `struere_proxy::policy::rls`) as the same
//! identity, each in a transaction rolled back afterwards. Rows, counts and the changes a write
//! made must be identical, or the proxy must refuse (at most 5% of statements, by named class).
//!
//! Changes are captured on both sides by AFTER ROW triggers that raise a NOTICE with the old and
//! new row (only for sessions named `struere-differential`), so the proxy side's uncommitted
//! writes are seen whole, every tenant's rows included, not just what the identity can read.
//!
//! `STRUERE_DIFF_COUNT` (statements), `STRUERE_DIFF_SEED` (first seed) and `STRUERE_DIFF_ONLY`
//! (replay one seed, printing both sides) steer the runs; `scripts/differential.sh` runs 10,000.

mod grammar;

use std::collections::BTreeMap;
use std::sync::Arc;

use struere_proxy::auth::identity::{ActorContext, Environment};
use struere_proxy::policy::rls::{self, RefRole, Reference};
use struere_proxy::policy::{Action, Policies, PolicySet};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{fixture, unique};
use grammar::{Gen, Pools, Profile, TABLES, table as gen_table};

const APP_NAME: &str = "struere-differential";
const ORGS: &[&str] = &["acme", "globex"];

/// Emits every row change of a managed table as a NOTICE, for differential sessions only.
const CAPTURE_FUNCTION: &str = "CREATE OR REPLACE FUNCTION public.struere_diff_capture() RETURNS trigger \
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$ BEGIN \
    IF current_setting('application_name') = 'struere-differential' THEN \
    RAISE NOTICE 'struere_diff %', jsonb_build_object('t', TG_TABLE_NAME, \
    'old', CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END, 'new', CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END); \
    END IF; RETURN NULL; END $fn$;";

fn capture_sql() -> String {
    let mut sql = CAPTURE_FUNCTION.to_owned();
    for t in TABLES {
        sql.push_str(&format!(
            " CREATE OR REPLACE TRIGGER struere_diff_capture AFTER INSERT OR UPDATE OR DELETE ON public.{0} \
             FOR EACH ROW EXECUTE FUNCTION public.struere_diff_capture();",
            t.name
        ));
    }
    sql
}

/// The reference database, built once per test binary: its URL, the roles, the value pools.
struct Setup {
    ref_url: String,
    reference: Reference,
    policies: Policies,
    pools: Pools,
}

static SETUP: tokio::sync::OnceCell<Arc<Setup>> = tokio::sync::OnceCell::const_new();

async fn setup() -> Arc<Setup> {
    SETUP.get_or_init(|| async { Arc::new(build_setup().await) }).await.clone()
}

async fn build_setup() -> Setup {
    let f = fixture();
    let admin = f.admin().await;
    let db = unique("struere_reference");
    admin.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
    let base = f.admin_url.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap();
    let ref_url = format!("{base}/{db}");
    let reference_db = crate::harness::connect_to(&ref_url).await.unwrap();
    reference_db.batch_execute(struere_proxy::demo::DEMO_SCHEMA).await.unwrap();

    // The same rows (acme's and globex's, timestamps included), from one snapshot of the app.
    admin.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await.unwrap();
    for t in TABLES {
        let org = if t.name == "organizations" { "id" } else { "organization_id" };
        let rows: String = admin
            .query_one(
                &format!(
                    "SELECT coalesce(json_agg(t), '[]')::text FROM public.{} t WHERE {org} IN ('acme', 'globex')",
                    t.name
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        reference_db
            .execute(
                &format!(
                    "INSERT INTO public.{0} SELECT * FROM json_populate_recordset(NULL::public.{0}, $1::text::json)",
                    t.name
                ),
                &[&rows],
            )
            .await
            .unwrap();
    }
    admin.batch_execute("COMMIT").await.unwrap();

    // What the fixture's proxy enforces: the sets deployed to its database.
    let policies = struere_proxy::server::load_policies(&admin).await.unwrap();
    // The reference's own catalog: other tests of this binary add columns to the app's tables.
    let catalog = struere_proxy::catalog::load(&reference_db).await.unwrap();
    let reference = rls::reference(&policies, &catalog).unwrap();
    reference_db.batch_execute(&reference.setup_sql).await.unwrap_or_else(|e| panic!("reference DDL: {e:?}"));
    let capture = capture_sql();
    reference_db.batch_execute(&capture).await.unwrap();
    admin.batch_execute(&capture).await.unwrap();

    let mut pools = Pools::default();
    for t in TABLES {
        for (c, ty) in t.cols {
            if *ty != grammar::Ty::Text {
                continue;
            }
            let values: Vec<String> = reference_db
                .query(
                    &format!("SELECT DISTINCT {c}::text FROM public.{} WHERE {c} IS NOT NULL ORDER BY 1", t.name),
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            pools.values.push(((t.name.to_owned(), (*c).to_owned()), values));
        }
    }
    let json: Vec<String> = reference_db
        .query("SELECT DISTINCT value FROM public.entities, jsonb_each_text(data) ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    pools.values.push((("json".to_owned(), "any".to_owned()), json));
    Setup { ref_url, reference, policies, pools }
}

/// Every role of both environments, in both organizations.
fn identities(policies: &Policies) -> Vec<ActorContext> {
    let mut out = Vec::new();
    for env in [Environment::Development, Environment::Production] {
        for role in policies.for_env(env).roles.keys() {
            for org in ORGS {
                let (actor_type, actor_id) = struere_proxy::demo::demo_actor(org, role);
                out.push(ActorContext {
                    organization: (*org).to_owned(),
                    environment: env,
                    roles: vec![role.clone()],
                    actor_type,
                    actor_id,
                });
            }
        }
    }
    out
}

/// What the identity's role allows, read from the policy (only to aim the generator).
fn profile(set: &PolicySet, actor: &ActorContext) -> Profile {
    let mut p = Profile { actor_id: actor.actor_id.clone(), ..Profile::default() };
    let Some(role) = actor.roles.first().and_then(|r| set.roles.get(r)) else { return p };
    for t in TABLES {
        let grants: Vec<_> =
            role.grants.iter().filter(|g| g.resource.as_ref().is_none_or(|r| r.table == t.name)).collect();
        let allows = |a: Action| grants.iter().any(|g| g.allow.contains(&a) && !g.deny.contains(&a));
        for (a, list) in [
            (Action::Select, &mut p.readable),
            (Action::Insert, &mut p.insertable),
            (Action::Update, &mut p.updatable),
            (Action::Delete, &mut p.deletable),
        ] {
            if allows(a) {
                list.push(t.name);
            }
        }
        if let Some(g) = grants.iter().find(|g| g.allow.contains(&Action::Insert) || g.allow.contains(&Action::Update))
        {
            let f = &g.fields;
            if !f.all {
                let cols: Vec<String> =
                    f.visible.iter().filter(|v| v.path.is_empty()).map(|v| v.column.clone()).collect();
                let keys: Vec<String> =
                    f.visible.iter().filter(|v| v.path.len() == 1).map(|v| v.path[0].clone()).collect();
                let mut cols = cols;
                if !keys.is_empty() {
                    cols.push("data".to_owned());
                }
                p.writable.push((t.name, Some(cols), (!keys.is_empty()).then_some(keys)));
            }
        }
    }
    p
}

/// A client and the NOTICE texts its server sends.
struct Session {
    client: Client,
    notices: UnboundedReceiver<String>,
}

async fn session(url: &str) -> Session {
    let (client, notices) = crate::harness::connect_with_notices(url).await;
    Session { client, notices }
}

/// What one statement did: its rows and counts and net row changes, or its error.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Done { rows: Vec<Vec<Option<String>>>, counts: Vec<u64>, changes: BTreeMap<(String, String), (String, String)> },
    Failed { code: String, message: String },
}

/// Runs `sql` in a transaction opened by `begin`, rolled back afterwards.
async fn run(s: &mut Session, begin: &str, sql: &str, ordered: bool) -> Outcome {
    s.client.batch_execute(begin).await.unwrap_or_else(|e| panic!("{begin}: {e:?}"));
    let now = s.client.simple_query("SELECT now()::text, to_jsonb(now()) #>> '{}'").await.unwrap();
    let nows: Vec<String> = now
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some([r.get(0), r.get(1)].into_iter().flatten().map(str::to_owned)),
            _ => None,
        })
        .flatten()
        .collect();
    while s.notices.try_recv().is_ok() {}
    let result = s.client.simple_query(sql).await;
    let mut notices = Vec::new();
    while let Ok(n) = s.notices.try_recv() {
        notices.push(n);
    }
    s.client.batch_execute("ROLLBACK").await.unwrap();
    let norm = |v: &str| nows.iter().fold(v.to_owned(), |acc, n| acc.replace(n.as_str(), "<now>"));
    match result {
        Err(e) => {
            let (code, message) = match e.as_db_error() {
                Some(d) => (d.code().code().to_owned(), d.message().to_owned()),
                None => ("?".to_owned(), e.to_string()),
            };
            Outcome::Failed { code, message }
        }
        Ok(msgs) => {
            let mut rows = Vec::new();
            let mut counts = Vec::new();
            for m in msgs {
                match m {
                    SimpleQueryMessage::Row(r) => rows.push((0..r.len()).map(|i| r.get(i).map(norm)).collect()),
                    SimpleQueryMessage::CommandComplete(n) => counts.push(n),
                    _ => {}
                }
            }
            if !ordered {
                rows.sort();
            }
            Outcome::Done { rows, counts, changes: net_changes(&notices, &norm) }
        }
    }
}

/// The net change per row (first old image, last new image), unchanged rows dropped.
fn net_changes(notices: &[String], norm: &dyn Fn(&str) -> String) -> BTreeMap<(String, String), (String, String)> {
    let mut out: BTreeMap<(String, String), (String, String)> = BTreeMap::new();
    for n in notices {
        let Some(body) = n.strip_prefix("struere_diff ") else { continue };
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        // Only the demo schema's columns: other tests of this binary add columns to the app's
        // tables (catalog.rs adds trigger_runs.note), which the reference does not have.
        let table = gen_table(v["t"].as_str().unwrap_or("?"));
        let image = |k: &str| {
            let mut row = v[k].clone();
            if let (Some(obj), Some(t)) = (row.as_object_mut(), table) {
                obj.retain(|c, _| t.cols.iter().any(|(n, _)| n == c));
            }
            norm(&row.to_string())
        };
        let id = |k: &str| v[k]["id"].as_str().map(str::to_owned);
        let key = (v["t"].as_str().unwrap_or("?").to_owned(), id("new").or_else(|| id("old")).unwrap_or_default());
        let (old, new) = (image("old"), image("new"));
        out.entry(key).and_modify(|e| e.1 = new.clone()).or_insert((old, new));
    }
    out.retain(|_, (old, new)| old != new);
    out
}

/// How a statement's two runs compare.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    Equal,
    /// Both refused it (the proxy by rule, PostgreSQL by privilege or row security).
    BothDenied,
    /// Both failed with the same SQLSTATE (a unique or foreign key violation, a bad cast, …).
    BothFailed(String),
    /// The proxy refused what the reference ran: by class.
    Refused(String),
    /// A difference the proxy documents on purpose (README, *Writes*).
    Documented(&'static str),
    Divergent,
}

/// SQLSTATEs the proxy answers refusals with.
fn is_refusal(code: &str) -> bool {
    matches!(code, "42501" | "42601" | "54000")
}

/// PostgreSQL's own refusals on the reference: privilege or row security (42501), a masked
/// (expression) column of a view written (0A000, 55000).
fn is_native_denial(code: &str) -> bool {
    matches!(code, "42501" | "0A000" | "55000")
}

fn verdict(proxy: &Outcome, reference: &Outcome) -> Verdict {
    match (proxy, reference) {
        (a, b) if a == b => Verdict::Equal,
        (Outcome::Failed { code: p, .. }, Outcome::Failed { code: r, .. }) if p == r => {
            if is_refusal(p) {
                Verdict::BothDenied
            } else {
                Verdict::BothFailed(p.clone())
            }
        }
        (Outcome::Failed { code: p, .. }, Outcome::Failed { code: r, .. }) if is_refusal(p) && is_native_denial(r) => {
            Verdict::BothDenied
        }
        // Both fail; which error comes first depends on evaluation order (the proxy's checks
        // run before the statement, PostgreSQL's row security after the SET expressions).
        (Outcome::Failed { code: p, .. }, Outcome::Failed { code: r, .. }) if is_refusal(p) => {
            Verdict::BothFailed(format!("proxy refused, reference {r}"))
        }
        // "ON CONFLICT DO UPDATE updates an existing row only if it is in the caller's scope
        // (another tenant's … row with the same key is left alone: INSERT 0 0)"; row security
        // raises an error for the same statement instead.
        // Only rows that did not conflict were inserted (no existing row changed).
        (Outcome::Done { changes, .. }, Outcome::Failed { code, message })
            if code == "42501"
                && message.contains("(USING expression)")
                && changes.values().all(|(old, _)| old == "null") =>
        {
            Verdict::Documented("ON CONFLICT DO UPDATE on a row outside the caller's scope: INSERT 0 0, not an error")
        }
        (Outcome::Failed { code, message }, Outcome::Done { .. }) if is_refusal(code) => {
            Verdict::Refused(refusal_class(message))
        }
        _ => Verdict::Divergent,
    }
}

/// A refusal's class: its message without the names and numbers in it.
fn refusal_class(message: &str) -> String {
    let mut out = String::new();
    let mut quote: Option<char> = None;
    for ch in message.chars() {
        match (quote, ch) {
            (None, '"' | '\'') => {
                quote = Some(ch);
                out.push('…');
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, c) if c.is_ascii_digit() => {
                if !out.ends_with('N') {
                    out.push('N');
                }
            }
            (None, c) => out.push(c),
        }
    }
    let out = out.trim_start_matches("refused: ");
    out.chars().take(110).collect()
}

/// One statement's record, for the divergence report.
struct Case {
    seed: u64,
    actor: String,
    sql: String,
    proxy: Outcome,
    reference: Outcome,
}

#[derive(Default)]
struct Tally {
    generated: usize,
    /// Equal answers that were not empty (rows returned, or rows changed).
    nonempty: usize,
    /// Equal answers of writes that changed rows.
    writes: usize,
    verdicts: BTreeMap<Verdict, usize>,
    divergent: Vec<Case>,
}

impl Tally {
    fn summary(&self) -> String {
        let get = |v: &Verdict| self.verdicts.get(v).copied().unwrap_or(0);
        let refused: usize =
            self.verdicts.iter().filter(|(v, _)| matches!(v, Verdict::Refused(_))).map(|(_, n)| n).sum();
        let failed: usize =
            self.verdicts.iter().filter(|(v, _)| matches!(v, Verdict::BothFailed(_))).map(|(_, n)| n).sum();
        let documented: usize =
            self.verdicts.iter().filter(|(v, _)| matches!(v, Verdict::Documented(_))).map(|(_, n)| n).sum();
        let mut s = format!(
            "generated {}\nequal {} (same rows/counts/changes {}, both denied {}, both failed with the same SQLSTATE {})\n\
             equal and not empty {} (of which writes that changed rows {})\ndocumented differences {}\nrefused {} ({:.2}%)\ndivergent {}\n",
            self.generated,
            get(&Verdict::Equal) + get(&Verdict::BothDenied) + failed,
            get(&Verdict::Equal),
            get(&Verdict::BothDenied),
            failed,
            self.nonempty,
            self.writes,
            documented,
            refused,
            100.0 * refused as f64 / self.generated.max(1) as f64,
            get(&Verdict::Divergent)
        );
        for (v, n) in &self.verdicts {
            match v {
                Verdict::BothFailed(code) => s.push_str(&format!("  both failed {code}: {n}\n")),
                Verdict::Refused(class) => s.push_str(&format!("  refused [{class}]: {n}\n")),
                Verdict::Documented(what) => s.push_str(&format!("  documented difference [{what}]: {n}\n")),
                _ => {}
            }
        }
        let short = |o: &Outcome| format!("{o:?}").chars().take(1500).collect::<String>();
        for c in self.divergent.iter().take(40) {
            s.push_str(&format!(
                "DIVERGENT seed {} as {}\n  {}\n  proxy:     {}\n  reference: {}\n",
                c.seed,
                c.actor,
                c.sql,
                short(&c.proxy),
                short(&c.reference)
            ));
        }
        s
    }
}

fn describe(a: &ActorContext) -> String {
    format!("{}/{}/{} ({})", a.environment.as_str(), a.organization, a.roles.join(","), a.actor_id)
}

/// Runs `count` statements from `first_seed` on, spread over every identity.
async fn differential(first_seed: u64, count: usize, verbose: bool) -> Tally {
    let setup = setup().await;
    let f = fixture();
    let ids = identities(&setup.policies);
    let mut tally = Tally::default();
    for (k, actor) in ids.iter().enumerate() {
        let seeds: Vec<u64> =
            (0..count as u64).filter(|i| i % ids.len() as u64 == k as u64).map(|i| first_seed + i).collect();
        if seeds.is_empty() {
            continue;
        }
        let key = f.create_key_for(&unique("diff"), actor.clone(), None).await;
        let mut proxy = session(&format!("{} application_name={APP_NAME}", f.url(&key))).await;
        let mut native = session(&format!("{}?application_name={APP_NAME}", setup.ref_url)).await;
        let role: &RefRole = setup.reference.role(actor.environment, &actor.roles[0]).unwrap();
        let begin = format!(
            "BEGIN; {}",
            rls::identity_sql(role, &actor.organization, &actor.actor_id, actor.actor_type.as_str())
        );
        let profile = profile(setup.policies.for_env(actor.environment), actor);
        for seed in seeds {
            let stmt = Gen::new(seed, &profile, &setup.pools).statement();
            let p = run(&mut proxy, "BEGIN", &stmt.sql, stmt.ordered).await;
            let r = run(&mut native, &begin, &stmt.sql, stmt.ordered).await;
            let v = verdict(&p, &r);
            if verbose {
                println!("seed {seed} as {}\n{}\nproxy: {p:?}\nreference: {r:?}\n=> {v:?}", describe(actor), stmt.sql);
            }
            tally.generated += 1;
            if let (Verdict::Equal, Outcome::Done { rows, changes, .. }) = (&v, &p) {
                tally.nonempty += usize::from(!rows.is_empty() || !changes.is_empty());
                tally.writes += usize::from(!changes.is_empty());
            }
            *tally.verdicts.entry(v.clone()).or_default() += 1;
            if v == Verdict::Divergent {
                tally.divergent.push(Case { seed, actor: describe(actor), sql: stmt.sql, proxy: p, reference: r });
            }
        }
    }
    tally
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn check(tally: &Tally) {
    let summary = tally.summary();
    println!("{summary}");
    if let Ok(path) = std::env::var("STRUERE_DIFF_REPORT") {
        std::fs::write(path, &summary).unwrap();
    }
    let refused: usize = tally.verdicts.iter().filter(|(v, _)| matches!(v, Verdict::Refused(_))).map(|(_, n)| n).sum();
    assert!(tally.divergent.is_empty(), "divergences between the proxy and native RLS:\n{summary}");
    assert!(refused * 20 <= tally.generated, "the proxy refused more than 5% of the statements:\n{summary}");
}

/// A few hundred statements over every identity: no divergence, at most 5% refused.
#[tokio::test]
async fn generated_statements_agree_with_native_row_level_security() {
    if let Some(seed) = std::env::var("STRUERE_DIFF_ONLY").ok().and_then(|v| v.parse::<u64>().ok()) {
        let tally = differential(seed, 1, true).await;
        println!("{}", tally.summary());
        return;
    }
    let tally = differential(env_num("STRUERE_DIFF_SEED", 1), env_num("STRUERE_DIFF_COUNT", 360) as usize, false).await;
    check(&tally);
}

/// The long run (`scripts/differential.sh`): 10,000 statements unless STRUERE_DIFF_COUNT says otherwise.
#[tokio::test]
#[ignore]
async fn differential_long_run() {
    let tally =
        differential(env_num("STRUERE_DIFF_SEED", 100_000), env_num("STRUERE_DIFF_COUNT", 10_000) as usize, false)
            .await;
    check(&tally);
}

/// The comparison itself can fail: a proxy answer that differs from the reference is a divergence.
#[test]
fn a_different_answer_is_a_divergence() {
    let rows = |v: &[&str]| Outcome::Done {
        rows: v.iter().map(|s| vec![Some((*s).to_owned())]).collect(),
        counts: vec![v.len() as u64],
        changes: BTreeMap::new(),
    };
    let failed =
        |c: &str| Outcome::Failed { code: c.into(), message: format!("refused: role \"x\" may not select t ({c})") };
    assert_eq!(verdict(&rows(&["a"]), &rows(&["a"])), Verdict::Equal);
    assert_eq!(verdict(&rows(&["a", "b"]), &rows(&["a"])), Verdict::Divergent);
    assert_eq!(verdict(&rows(&["a"]), &failed("42501")), Verdict::Divergent);
    assert_eq!(verdict(&failed("42501"), &failed("0A000")), Verdict::BothDenied);
    assert_eq!(verdict(&failed("42501"), &rows(&[])), Verdict::Refused("role … may not select t (N)".into()));
    let unique = |m: &str| Outcome::Failed { code: "23505".into(), message: m.into() };
    assert_eq!(verdict(&unique("duplicate key"), &unique("duplicate key value")), Verdict::BothFailed("23505".into()));
}
