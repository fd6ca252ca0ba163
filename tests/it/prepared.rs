//! Repeated rewritten statements run as statements prepared on the upstream connection
//! (session/statements.rs): simple Queries that differ only in literal values bind them as
//! parameters, and a client's unnamed Parse of a known text reuses the prepared statement. The
//! client sees exactly what the literal statement would have answered, errors included, and
//! never the proxy's own names.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use struere_proxy::auth::identity::{ActorContext, ActorType, Environment};
use struere_proxy::server::Proxy;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{code, connect_to, copy_in, fixture, unique};
use crate::hostile::{Raw, cstr, msg};

struct Proxied {
    addr: std::net::SocketAddr,
    proxy: Arc<Proxy>,
    key: String,
    org: String,
}

impl Proxied {
    /// A proxy of its own (its metrics count only this test) and an admin key of a fresh
    /// organization whose development rows are `prep-1` … `prep-6`.
    async fn start() -> Proxied {
        let (addr, proxy) = fixture().start_proxy(fixture().settings.clone());
        let org = unique("prep");
        let admin = fixture().admin().await;
        admin.execute("INSERT INTO organizations (id, name) VALUES ($1, $1)", &[&org]).await.unwrap();
        for env in ["development", "production"] {
            admin
                .execute(
                    "INSERT INTO entities (id, organization_id, environment, entity_type, data, created_at)
                     SELECT $1 || '-' || $2 || '-' || n, $1, $2, CASE WHEN n % 2 = 0 THEN 'session' ELSE 'student' END,
                            jsonb_build_object('n', n, 'q', 'it''s \\ \"' || n), timestamptz '2026-01-01' + n * interval '1 day'
                     FROM generate_series(1, 6) AS n",
                    &[&org, &env],
                )
                .await
                .unwrap();
        }
        let actor = ActorContext {
            organization: org.clone(),
            environment: Environment::Development,
            roles: vec!["admin".into()],
            actor_type: ActorType::User,
            actor_id: "prep-admin".into(),
        };
        let key = fixture().create_key_for(&unique("prep"), actor, None).await;
        Proxied { addr, proxy, key, org }
    }

    async fn client(&self) -> Client {
        let url =
            format!("host=127.0.0.1 port={} user=t dbname=app password={} sslmode=disable", self.addr.port(), self.key);
        connect_to(&url).await.expect("connects")
    }

    fn counts(&self) -> (u64, u64) {
        let m = &self.proxy.metrics;
        (m.statements_prepared.load(Ordering::Relaxed), m.statements_reused.load(Ordering::Relaxed))
    }
}

/// Rows (all columns as text) and the CommandComplete counts of a simple Query.
fn table(msgs: &[SimpleQueryMessage]) -> (Vec<String>, Vec<Vec<Option<String>>>, Vec<u64>) {
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    let mut counts = Vec::new();
    for m in msgs {
        match m {
            SimpleQueryMessage::RowDescription(d) => columns = d.iter().map(|c| c.name().to_owned()).collect(),
            SimpleQueryMessage::Row(r) => rows.push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect()),
            SimpleQueryMessage::CommandComplete(n) => counts.push(*n),
            _ => {}
        }
    }
    (columns, rows, counts)
}

/// What the literal statement answers directly (as the owner, with the caller's rows only).
async fn direct(admin: &Client, sql: &str) -> (Vec<String>, Vec<Vec<Option<String>>>, Vec<u64>) {
    table(&admin.simple_query(sql).await.unwrap())
}

#[tokio::test]
async fn repeated_simple_statements_bind_their_literals_and_answer_like_the_literal_text() {
    let p = Proxied::start().await;
    let c = p.client().await;
    let admin = fixture().admin().await;
    let org = &p.org;
    let mine = format!("organization_id = '{org}' AND environment = 'development'");
    let before = p.counts();
    let ids = ["1", "2", "3", "4", "99", "5", "6"];
    for (round, n) in ids.iter().enumerate() {
        let id = format!("{org}-development-{n}");
        for (via_proxy, direct_sql) in [
            (
                format!("SELECT id, entity_type, data->>'q' AS q FROM entities WHERE id = '{id}'"),
                format!("SELECT id, entity_type, data->>'q' AS q FROM entities WHERE id = '{id}' AND {mine}"),
            ),
            (
                format!(
                    "SELECT count(*) FROM entities WHERE created_at >= '2026-01-0{}' AND id <> '{id}'",
                    1 + round % 5
                ),
                format!(
                    "SELECT count(*) FROM entities WHERE created_at >= '2026-01-0{}' AND id <> '{id}' AND {mine}",
                    1 + round % 5
                ),
            ),
            (
                format!("UPDATE entities SET updated_at = created_at WHERE id = '{id}'"),
                format!("UPDATE entities SET updated_at = created_at WHERE id = '{id}' AND {mine}"),
            ),
            // Another organization's row with the same suffix: never found.
            (
                format!("SELECT id FROM entities WHERE id = '{org}-production-{n}'"),
                format!("SELECT id FROM entities WHERE id = '{org}-production-{n}' AND {mine}"),
            ),
        ] {
            let got = table(&c.simple_query(&via_proxy).await.unwrap());
            assert_eq!(got, direct(&admin, &direct_sql).await, "{via_proxy}");
        }
    }
    let (prepared, reused) = p.counts();
    assert!(prepared - before.0 >= 4, "each shape prepared once: {prepared}");
    // Round 1 notes each shape, round 2 builds its template; from round 3 on they bind its parameterised form.
    assert!(reused - before.1 >= 4 * (ids.len() as u64 - 3), "later rounds bind the prepared statements: {reused}");
    assert!(prepared - before.0 <= 8, "no shape prepared again and again: {prepared}");
}

#[tokio::test]
async fn errors_of_bound_values_are_the_literals_errors_and_the_session_goes_on() {
    let p = Proxied::start().await;
    let c = p.client().await;
    // Also cast: the conversion gate is left out of that parameterised form (its `$k` is
    // typed by the cast, and converted at Bind).
    for cast in ["", "::timestamptz"] {
        let q = |d: &str| format!("SELECT count(*) FROM entities WHERE created_at > '{d}'{cast}");
        for d in ["2026-01-01", "2026-01-02", "2026-01-03"] {
            c.simple_query(&q(d)).await.unwrap();
        }
        // A value the column type rejects: the server's own error for the literal (22007).
        let e = c.simple_query(&q("not a date")).await.unwrap_err();
        assert_eq!(code(&e), "22007", "{e:?}");
        assert!(!format!("{e:?}").contains("__struere"), "the proxy's names stay out of messages: {e:?}");
        let rows = table(&c.simple_query(&q("2026-01-04")).await.unwrap()).1;
        assert_eq!(rows, vec![vec![Some("3".to_owned())]], "the session goes on");
    }
    let q = |d: &str| format!("SELECT count(*) FROM entities WHERE created_at > '{d}'");

    // Inside a transaction: the error fails the transaction like the literal statement does.
    c.batch_execute("BEGIN").await.unwrap();
    c.simple_query(&q("2026-01-05")).await.unwrap();
    assert_eq!(code(&c.simple_query(&q("2026-13-45")).await.unwrap_err()), "22008");
    assert_eq!(code(&c.simple_query(&q("2026-01-05")).await.unwrap_err()), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(table(&c.simple_query(&q("2026-01-06")).await.unwrap()).1, vec![vec![Some("1".to_owned())]]);
}

#[tokio::test]
async fn the_clients_discard_and_deallocate_do_not_break_the_proxys_statements() {
    let p = Proxied::start().await;
    let c = p.client().await;
    let q = |n: u32| format!("SELECT id FROM entities WHERE id = '{}-development-{n}'", p.org);
    for reset in ["DISCARD ALL", "DEALLOCATE ALL", "DISCARD PLANS"] {
        for n in 1..=3 {
            assert_eq!(table(&c.simple_query(&q(n)).await.unwrap()).1.len(), 1);
        }
        match c.batch_execute(reset).await {
            Ok(()) => {}
            Err(e) => assert_eq!(code(&e), "42501", "{reset}: {e:?}"),
        }
        for n in 4..=6 {
            assert_eq!(table(&c.simple_query(&q(n)).await.unwrap()).1.len(), 1, "after {reset}");
        }
    }
}

#[tokio::test]
async fn a_pooled_connection_comes_back_without_the_previous_sessions_statements() {
    let p = Proxied::start().await;
    let q = |n: u32| format!("SELECT id FROM entities WHERE id = '{}-development-{n}'", p.org);
    let mut pids = Vec::new();
    for _ in 0..3 {
        let returned = p.proxy.pool.stats.returned.load(Ordering::Relaxed);
        let c = p.client().await;
        pids.push(c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get::<_, i32>(0));
        for n in 1..=4 {
            assert_eq!(table(&c.simple_query(&q(n)).await.unwrap()).1.len(), 1);
        }
        drop(c);
        let start = Instant::now();
        while p.proxy.pool.stats.returned.load(Ordering::Relaxed) <= returned {
            assert!(start.elapsed() < Duration::from_secs(30), "the connection never came back to the pool");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(pids.windows(2).any(|w| w[0] == w[1]), "a later session reused the connection: {pids:?}");
}

#[tokio::test]
async fn a_parse_whose_types_convert_nothing_is_prepared_without_the_conversion_gate() {
    // The conversion gate (`num_nulls(…) >= 0`) has PostgreSQL convert `$1` once, before any
    // row is read; it costs a Result node in every generic plan. Undeclared or declared as the
    // column's type, `$1` converts nothing, and the proxy prepares the statement without it.
    use tokio_postgres::types::Type;
    let p = Proxied::start().await;
    let c = p.client().await;
    let admin = fixture().admin().await;
    let marker = unique("ungate");
    // A table of two columns: PostgreSQL shows the first 1,024 bytes of a query.
    let sql = format!("SELECT id FROM organizations WHERE id = $1 AND '{marker}' <> ''");
    let want = p.org.clone();
    let text: &(dyn tokio_postgres::types::ToSql + Sync) = &want;
    for (types, value, gated) in [
        (&[][..], text, false),
        (&[Type::TEXT], text, false),
        (&[Type::VARCHAR], text, false),
        // `unknown` declares nothing: PostgreSQL types `$1` from its cast, as an undeclared one.
        (&[Type::UNKNOWN], text, false),
        (&[Type::BPCHAR], text, true),
        // An integer converts to text without fail: nothing for the gate to do either.
        (&[Type::INT8], &12i64, false),
    ] {
        let statement = c.prepare_typed(&sql, types).await.unwrap();
        let rows = c.query(&statement, &[value]).await.unwrap();
        let got: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let want = if types == [Type::INT8] { vec![] } else { vec![want.clone()] };
        assert_eq!(got, want, "{types:?}");
        let ran = upstream_ran(&admin, &marker).await;
        assert_eq!(ran.contains("num_nulls"), gated, "{types:?}: {ran}");
        assert!(ran.contains("__struere_raw_id"), "still the guarded statement: {ran}");
    }
}

/// The one statement holding `marker` that the upstream runs or ran last, as PostgreSQL
/// reports it (`pg_stat_activity`: a backend's current or last query).
async fn upstream_ran(admin: &Client, marker: &str) -> String {
    let ran: Vec<String> = admin
        .query(
            "SELECT query FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
            &[&marker],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ran.len(), 1, "{ran:?}");
    ran[0].clone()
}

#[tokio::test]
async fn a_simple_querys_bound_form_leaves_out_the_gates_its_literals_types_make_redundant() {
    // `'…'::text` and `12::text` in a guarded condition are gated (`num_nulls(…) >= 0`). In the
    // literal text PostgreSQL folds the gate while planning; in the bound form (a generic plan)
    // it would be a Result node on every execution, yet converts nothing: the string's `$k` is
    // typed by its cast at Bind, and an integer is always a text.
    let p = Proxied::start().await;
    let c = p.client().await;
    let admin = fixture().admin().await;
    let marker = unique("ungatesimple");
    // The row is found by a name of its own, with a quote in it: the bound value must arrive
    // undoubled, where the literal text carries it doubled.
    let name = format!("{} it's", unique("named"));
    admin.execute("UPDATE organizations SET name = $2 WHERE id = $1", &[&p.org, &name]).await.unwrap();
    for (round, value) in [name.as_str(), "nobody", name.as_str(), "12", name.as_str()].into_iter().enumerate() {
        for (sql, want) in [
            (
                // Each text once (a text seen before is an exact hit, sent as it was).
                format!(
                    "SELECT id AS {marker} FROM organizations WHERE name = '{}'::text AND id <> 'r{round}'",
                    value.replace('\'', "''")
                ),
                if value == name { vec![vec![Some(p.org.clone())]] } else { vec![] },
            ),
            (format!("SELECT name AS {marker} FROM organizations WHERE id = {}::text", 10 + round), vec![]),
        ] {
            assert_eq!(table(&c.simple_query(&sql).await.unwrap()).1, want, "{sql}");
            let ran = upstream_ran(&admin, &marker).await;
            assert!(ran.contains("__struere_raw_"), "the guarded statement: {ran}");
            // The first two texts of a shape run as sent (rewritten, with their literals); from
            // the third on the session binds the values to the shape's parameterised form.
            assert_eq!(ran.contains("num_nulls"), round < 2, "round {round}: {ran}");
            assert_eq!(ran.contains("$1"), round >= 2, "round {round}: {ran}");
        }
    }
}

#[tokio::test]
async fn unnamed_statements_of_a_known_text_reuse_the_prepared_one() {
    let p = Proxied::start().await;
    let c = p.client().await;
    let before = p.counts();
    let sql = "SELECT id, data FROM entities WHERE id = $1 OR created_at < $2::timestamptz";
    for n in 1..=5 {
        let id = format!("{}-development-{n}", p.org);
        // query_typed: an unnamed Parse, Bind and Execute in one round trip.
        let rows = c
            .query_typed(
                sql,
                &[(&id, tokio_postgres::types::Type::TEXT), (&"2026-01-03", tokio_postgres::types::Type::TEXT)],
            )
            .await
            .unwrap();
        let mut got: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        got.sort();
        let mut want = vec![format!("{}-development-1", p.org)];
        if n != 1 {
            want.push(id);
        }
        want.sort();
        assert_eq!(got, want);
    }
    let (prepared, reused) = p.counts();
    assert_eq!(prepared - before.0, 1, "prepared once");
    assert!(reused - before.1 >= 4, "then reused: {reused}");
}

#[tokio::test]
async fn the_proxys_statement_names_are_out_of_the_clients_reach() {
    let mut raw = Raw::session().await;
    // Parse, Bind, Describe and Close naming the reserved prefix are refused; the session goes on.
    for (tag, body) in [
        (b'P', [cstr("__struere_s1"), cstr("SELECT 1"), vec![0, 0]].concat()),
        (b'B', [cstr(""), cstr("__struere_s1"), vec![0, 0, 0, 0, 0, 0]].concat()),
        (b'B', [cstr("__STRUERE_p"), cstr(""), vec![0, 0, 0, 0, 0, 0]].concat()),
        (b'D', [vec![b'S'], cstr("__struere_s1")].concat()),
        (b'C', [vec![b'S'], cstr("__struere_s1")].concat()),
    ] {
        let mut batch = msg(tag, &body);
        batch.extend(msg(b'S', b""));
        raw.send(&batch).await;
        let answer = raw.until_ready().await;
        let tags: String = answer.iter().map(|m| m.0 as char).collect();
        assert_eq!(tags, "EZ", "{}", tag as char);
        assert_eq!(crate::hostile::sqlstate(&answer[0].1), "42501");
    }
    // The same unnamed text three times, with Describe of the statement: every round trip
    // answers exactly what the client asked for, in order.
    let text = "SELECT id FROM entities WHERE id = $1";
    let mut batch = Vec::new();
    for _ in 0..3 {
        batch.extend(msg(b'P', &[cstr(""), cstr(text), vec![0, 0]].concat()));
        batch.extend(msg(b'D', &[vec![b'S'], cstr("")].concat()));
        batch
            .extend(msg(b'B', &[cstr(""), cstr(""), vec![0, 0, 0, 1, 0, 0, 0, 1], b"x".to_vec(), vec![0, 0]].concat()));
        batch.extend(msg(b'D', &[vec![b'P'], cstr("")].concat()));
        batch.extend(msg(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()));
        batch.extend(msg(b'S', b""));
        // A simple Query between them (a template hit after the first round).
        batch.extend(msg(b'Q', &cstr("SELECT id FROM entities WHERE id = 'nope'")));
    }
    raw.send(&batch).await;
    for round in 0..3 {
        let answer = raw.until_ready().await;
        let tags: String = answer.iter().map(|m| m.0 as char).collect();
        assert_eq!(tags, "1tT2TCZ", "extended round {round}");
        let answer = raw.until_ready().await;
        let tags: String = answer.iter().map(|m| m.0 as char).collect();
        assert_eq!(tags, "TCZ", "simple round {round}");
    }
}

/// PostgreSQL ignores a Sync it reads in COPY FROM STDIN's copy-in mode, and libpq and
/// tokio-postgres send one right after the COPY's Execute: that Sync gets no ReadyForQuery. The
/// proxy counted one for it, and from then on paired the server's answers with the wrong round
/// trips: the answers to its own messages of a later bound statement reached the client
/// (tokio-postgres: "unexpected message").
#[tokio::test]
async fn after_an_extended_copy_from_stdin_the_proxys_own_answers_stay_its_own() {
    let p = Proxied::start().await;
    let c = p.client().await;
    let table = unique("copied");
    c.batch_execute(&format!("CREATE TABLE {table} (n int)")).await.unwrap();
    assert_eq!(copy_in(&c, &table, b"1\n2\n").await.unwrap(), 2);
    // A COPY the server fails in the middle of its data: it then waits for the Sync after
    // the data, the one the client sends at the end.
    assert_eq!(code(&copy_in(&c, &table, b"3\nnot a number\n").await.unwrap_err()), "22P02");
    // Texts of one shape: from the fourth on, Bind/Describe/Execute of the proxy's own prepared
    // statement, whose ParseComplete and BindComplete the client must not see. Until one was
    // reused: other tests' DDL in the shared database reloads the catalog, which starts the
    // rewrite cache (and the shape's template) over.
    for round in 0..40 {
        let rows = c.simple_query(&format!("SELECT n FROM {table} WHERE n = {}", 1 + round % 2)).await.unwrap();
        assert_eq!(table_of(&rows), vec![vec![Some((1 + round % 2).to_string())]], "round {round}");
        let rows = c.query(&format!("SELECT n FROM {table} WHERE n = $1"), &[&2i32]).await.unwrap();
        assert_eq!(rows.len(), 1, "round {round}");
        if round >= 5 && p.counts().1 > 0 {
            break;
        }
    }
    assert!(p.counts().1 > 0, "the bound statements were reused");
    // Refusals keep their place too.
    assert_eq!(code(&c.query_one("SELECT * FROM pg_authid", &[]).await.unwrap_err()), "42501");
    assert_eq!(c.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0), 7);
}

fn table_of(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    table(msgs).1
}
