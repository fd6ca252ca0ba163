use super::*;
use crate::auth::identity::{ActorContext, ActorType, Environment};
use crate::rewrite::Rewriter;
use crate::rewrite::engine::tests::engine;

fn classes(sql: &str) -> Option<(String, Vec<(&str, Class)>)> {
    scan(sql).map(|s| (s.key.replace(MARK, "?"), s.literals.iter().map(|l| (l.text, l.class)).collect()))
}

#[test]
fn shapes_replace_literals_by_their_class() {
    let (key, lits) = classes("SELECT abalance FROM pgbench_accounts WHERE aid = 48213;").unwrap();
    assert_eq!(key, "SELECT abalance FROM pgbench_accounts WHERE aid = ?i;");
    assert_eq!(lits, [("48213", Class::Int4)]);
    let (key, lits) =
        classes("SELECT \"it's\" FROM t WHERE a IN (3000000000, 1.5, 2e3, 'x''y', 99999999999999999999) AND b = $1")
            .unwrap();
    assert_eq!(key, "SELECT \"it's\" FROM t WHERE a IN (?l, ?n, ?n, ?s, ?n) AND b = $1");
    let got: Vec<Class> = lits.iter().map(|l| l.1).collect();
    assert_eq!(got, [Class::Int8, Class::Numeric, Class::Numeric, Class::Str, Class::Numeric]);
    assert_eq!(lits[3].0, "'x''y'");
    // Identifiers with digits are not numbers; no literal, no shape.
    assert_eq!(scan("SELECT t1.c2 FROM t1"), None);
}

#[test]
fn anything_outside_the_subset_has_no_shape() {
    for sql in [
        "SELECT 1 -- comment",
        "SELECT /* c */ 1",
        "SELECT $$x$$, 1",
        "SELECT $tag$x$tag$, 1",
        "SELECT E'a\\nb', 1",
        "SELECT B'101', 1",
        "SELECT U&'d\\0061t', 1",
        "SELECT N'x', 1",
        "SELECT 'a'\n'b'",
        "SELECT 'a' \r\n  'b'",
        "SELECT 123abc",
        "SELECT .5",
        "SELECT 1.2.3",
        "SELECT 1e",
        "SELECT 'unterminated",
        "SELECT \"unterminated",
        "SELECT '\u{1}', 1",
        "SELECT '\0', 1",
    ] {
        assert_eq!(scan(sql), None, "{sql:?}");
    }
}

fn teacher() -> ActorContext {
    ActorContext {
        organization: "acme".into(),
        environment: Environment::Development,
        roles: vec!["teacher".into()],
        actor_type: ActorType::User,
        actor_id: "acme-teacher-1".into(),
    }
}

/// Every text, rewritten through a warm cache (templates), gives exactly what the full
/// pipeline gives (or the same refusal).
fn assert_same_as_uncached(cached: &Rewriter, actor: &ActorContext, sql: &str) {
    let uncached = Rewriter::new(0, engine());
    let want = uncached.rewrite(sql, actor).map(|r| r.sql.clone());
    let got = cached.rewrite(sql, actor);
    if let Ok(rw) = &got {
        assert_bound_is_the_rewrite(rw);
    }
    assert_eq!(got.map(|r| r.sql.clone()), want, "{sql}");
}

/// The parameterised form with its values put back as literals is exactly the filled text
/// (without its conversion gates when the form left them out).
fn assert_bound_is_the_rewrite(rw: &crate::rewrite::Rewritten) {
    let Some(b) = &rw.bound else { return };
    assert_eq!(b.types.len(), b.values.len());
    // Without its gates, the form no longer holds the parameters only they held.
    let ungated = !b.sql.contains("num_nulls(") && rw.sql.contains("num_nulls(");
    let mut text = b.sql.to_string();
    // Highest first, so that `$1` never matches the start of `$12`.
    for k in (0..b.values.len()).rev() {
        let literal = match b.types[k] {
            0 => crate::rewrite::string_literal(&b.values[k]),
            _ => b.values[k].clone(),
        };
        let marker = format!("${}", k + 1);
        let count = text.matches(&marker).count();
        assert!(count == 1 || (ungated && count == 0), "{marker} {count} times in {}", b.sql);
        text = text.replacen(&marker, &literal, 1);
    }
    if !ungated {
        assert_eq!(text, rw.sql);
    } else {
        let parsed = sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, &rw.sql).unwrap();
        let [statement] = parsed.as_slice() else { panic!("one statement: {}", rw.sql) };
        let without = crate::rewrite::engine::ungate::without_any_gates(statement);
        assert_eq!(text, crate::rewrite::printer::print(without).unwrap().text);
    }
}

#[test]
fn a_filled_template_is_exactly_the_full_rewrite() {
    let r = Rewriter::new(100, engine());
    let a = teacher();
    let shapes = [
        "SELECT id, data FROM entities WHERE id = {s} AND created_at > {s}",
        "SELECT count(*) FROM entities WHERE entity_type = {s}",
        "SELECT * FROM entities WHERE id IN ({s}, {s}) ORDER BY id LIMIT 5",
        "SELECT id FROM entities e WHERE e.id BETWEEN {s} AND {s}",
        "UPDATE entities SET data = data WHERE id = {s}",
        "SELECT id FROM entities WHERE {s} = id",
        "SELECT 1 WHERE 2000000000 < {i}",
        "SELECT id, data FROM entities WHERE id = {i}::text OR id = CAST({s} AS text)",
        "SELECT id, data FROM entities WHERE id = {i}::text AND created_at > {s}::timestamptz",
    ];
    let strings = ["'acme-development-session-2'", "'x''y'", "'student'", "'session'", "'\\'", "''", "'é ☃'"];
    let ints = ["1", "-5", "2147483647"];
    for shape in shapes {
        for (k, _) in strings.iter().enumerate() {
            let mut sql = shape.to_owned();
            let mut n = k;
            while let Some(p) = sql.find("{s}") {
                sql.replace_range(p..p + 3, strings[n % strings.len()]);
                n += 1;
            }
            while let Some(p) = sql.find("{i}") {
                sql.replace_range(p..p + 3, ints[n % ints.len()]);
                n += 1;
            }
            assert_same_as_uncached(&r, &a, &sql);
        }
    }
    let hits = r.stats().template_hits.load(std::sync::atomic::Ordering::Relaxed);
    assert!(hits >= 4 * 5, "templates were built and used: {hits} hits");
}

#[test]
fn template_hits_carry_a_parameterised_form_typed_like_the_literals() {
    let r = Rewriter::new(100, engine());
    let a = teacher();
    let sql = |id: &str, n: &str| format!("SELECT id FROM entities WHERE id = {id} OR id = {n}::text");
    // The first text of a shape notes it, the second builds its template, the third fills it.
    assert!(r.rewrite(&sql("'a'", "5000000001"), &a).unwrap().bound.is_none());
    assert!(r.rewrite(&sql("'b'", "5000000002"), &a).unwrap().bound.is_none());
    let hit = r.rewrite(&sql("'it''s'", "5000000000"), &a).unwrap();
    let b = hit.bound.as_ref().expect("a template hit has a parameterised form");
    assert!(!b.sql.contains("it''s") && !b.sql.contains("5000000000"), "{}", b.sql);
    assert!(b.values.contains(&"it's".to_owned()), "strings are decoded: {:?}", b.values);
    assert!(b.types.contains(&0) && b.types.contains(&20), "{:?}", b.types);
    assert_bound_is_the_rewrite(&hit);
    // A miss (the first text of a shape) and texts without slots are sent as they are.
    assert!(
        r.rewrite("SELECT id FROM entities WHERE id = 'q' AND entity_type = 'session'", &a).unwrap().bound.is_none()
    );
    assert!(r.rewrite("SELECT count(*) FROM entities", &a).unwrap().bound.is_none());
}

#[test]
fn a_parameterised_form_leaves_out_the_gates_its_types_make_redundant() {
    let r = Rewriter::new(100, engine());
    let a = teacher();
    // The second text of a shape builds its template and the parameterised form with it; the
    // third is a fill, found where sessions look on the event loop (`cached`).
    let third = |sql: &dyn Fn(usize) -> String| {
        for n in 1..=2 {
            assert!(r.rewrite(&sql(n), &a).unwrap().sql.contains("num_nulls("), "{}", sql(n));
        }
        let hit = r.cached(&sql(3), &a).unwrap();
        assert_bound_is_the_rewrite(&hit);
        hit
    };
    // A string cast: each `$k` undeclared, typed by its only use; the gate's own is declared text.
    let hit = third(&|n| format!("SELECT id FROM entities WHERE created_at > '2026-01-0{n}'::timestamptz"));
    let b = hit.bound.as_ref().unwrap();
    assert!(!b.sql.contains("num_nulls(") && b.sql.contains("> $1::TIMESTAMPTZ"), "{}", b.sql);
    assert_eq!(&*b.types, &[0, 25]);
    // An integer as text (pgbench's `:sid::text`): a conversion that cannot fail.
    let hit = third(&|n| format!("SELECT id, data FROM entities WHERE id = {}::text", 1_000_000 + n));
    let b = hit.bound.as_ref().unwrap();
    assert!(!b.sql.contains("num_nulls(") && b.sql.contains("= $1::TEXT"), "{}", b.sql);
    assert_eq!(&*b.types, &[23, 23]);
    // The filled text itself keeps the gate (PostgreSQL folds it while planning).
    assert!(hit.sql.contains("num_nulls("), "{}", hit.sql);
}

#[test]
fn literals_that_decide_never_share_a_rewrite() {
    let r = Rewriter::new(100, engine());
    let a = teacher();
    // JSON keys decide which field is shown (a hidden key reads as NULL); function arguments
    // name settings and channels; the type column in VALUES picks the rules.
    for sql in [
        "SELECT data->>'status' FROM entities",
        "SELECT data->>'paymentAmount' FROM entities",
        "SELECT data->>'status' FROM entities",
        "SELECT current_setting('search_path')",
        "SELECT current_setting('application_name')",
        "SELECT pg_notify('a', 'x')",
        "SELECT pg_notify('b', 'x')",
        "INSERT INTO entities (id, entity_type, data) VALUES ('n1', 'session', '{\"teacherId\": \"acme-teacher-1\"}')",
        "INSERT INTO entities (id, entity_type, data) VALUES ('n1', 'student', '{\"teacherId\": \"acme-teacher-1\"}')",
        "SELECT data->>'status' FROM entities WHERE data->>'teacherId' = 'acme-teacher-1'",
        "SELECT data->>'paymentAmount' FROM entities WHERE data->>'teacherId' = 'acme-teacher-1'",
    ] {
        assert_same_as_uncached(&r, &a, sql);
    }
}

#[test]
fn templates_are_per_caller_and_dropped_with_the_policy() {
    let r = Rewriter::new(100, engine());
    let a = teacher();
    let mut b = teacher();
    b.organization = "globex".into();
    let hits = || r.stats().template_hits.load(std::sync::atomic::Ordering::Relaxed);
    // A shape's first text is noted (and cached as a text), its second builds the template.
    assert_same_as_uncached(&r, &a, "SELECT id FROM entities WHERE id = 'a'");
    assert_same_as_uncached(&r, &b, "SELECT id FROM entities WHERE id = 'b'");
    assert_eq!((r.templates.len(), r.cache.len()), (2, 2));
    assert_same_as_uncached(&r, &a, "SELECT id FROM entities WHERE id = 'c'");
    assert_eq!((r.templates.len(), r.cache.len(), hits()), (2, 2, 0), "the second variant built the template");
    assert_same_as_uncached(&r, &a, "SELECT id FROM entities WHERE id = 'd'");
    assert_eq!((r.templates.len(), r.cache.len(), hits()), (2, 2, 1), "the third variant used it");
    // The other caller's shape is still only noted.
    assert_same_as_uncached(&r, &b, "SELECT id FROM entities WHERE id = 'e'");
    assert_eq!((r.cache.len(), hits()), (2, 1), "literal variants with a template do not fill the exact cache");
    r.set_policy(engine());
    assert_eq!(r.templates.len(), 0);
}

#[test]
fn without_exact_texts_a_repeated_text_builds_and_then_fills_its_template() {
    let r = Rewriter::new(100, engine()).with_exact_cache_capacity(0);
    let a = teacher();
    for _ in 0..3 {
        assert_same_as_uncached(&r, &a, "SELECT id FROM entities WHERE id = 'a'");
    }
    assert_eq!(r.cache.len(), 0);
    assert_eq!(r.stats().template_hits.load(std::sync::atomic::Ordering::Relaxed), 1);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Whatever values a client puts in the slots (quotes, backslashes, newlines, `--`, `$$`),
    /// the filled template is what the full pipeline prints and verifies.
    #[test]
    fn any_slot_values_fill_to_the_full_rewrite(s1 in ".{0,12}", s2 in "[a-z'\\\\$ -]{0,8}", n in proptest::num::i64::ANY) {
        use std::sync::OnceLock;
        static WARM: OnceLock<Rewriter> = OnceLock::new();
        let r = WARM.get_or_init(|| Rewriter::new(100, engine()));
        let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
        let sql = format!(
            "SELECT id FROM entities WHERE id = {} AND entity_type <> {} AND created_at IS NOT NULL OR id = '{n}'",
            quote(&s1),
            quote(&s2)
        );
        let number = format!("SELECT id FROM entities WHERE id IN ('x', 'y') AND 3 < {n}");
        for text in [sql, number] {
            let uncached = Rewriter::new(0, engine());
            let want = uncached.rewrite(&text, &teacher()).map(|x| x.sql.clone());
            let got = r.rewrite(&text, &teacher()).map(|x| x.sql.clone());
            proptest::prop_assert_eq!(got, want, "{}", text);
        }
    }
}

/// The byte-at-a-time `scan` that the skipping one replaced (same subset, same shapes), kept as
/// the oracle of `scan_is_the_byte_at_a_time_scan`: what changed is how bytes are skipped and
/// quotes closed, which this does one byte at a time.
fn scan_one_byte_at_a_time(sql: &str) -> Option<Shape<'_>> {
    let bytes = sql.as_bytes();
    // The marker byte anywhere (even inside a literal or an identifier) could make two texts
    // look alike; NUL is refused by the full pipeline, so it must never reach a template.
    if bytes.iter().any(|&b| b <= 0x01) {
        return None;
    }
    let mut key = String::with_capacity(sql.len());
    let mut literals = Vec::new();
    // Start of the verbatim run not yet copied into `key`.
    let mut copied = 0;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'\'' => {
                // A prefix glued to the quote makes another kind of string (E'', B'', U&'').
                if i > 0 && bytes.get(i - 1).is_some_and(|&p| ident_byte(p) || p == b'&') {
                    return None;
                }
                let mut j = i + 1;
                loop {
                    match bytes.get(j) {
                        None => return None,
                        Some(b'\'') if bytes.get(j + 1) == Some(&b'\'') => j += 2,
                        Some(b'\'') => break,
                        Some(_) => j += 1,
                    }
                }
                let end = j + 1;
                if continues_on_a_later_line(bytes, end) {
                    return None;
                }
                push_literal(sql, &mut key, &mut literals, &mut copied, i..end, Class::Str)?;
                i = end;
            }
            b'"' => {
                let mut j = i + 1;
                loop {
                    match bytes.get(j) {
                        None => return None,
                        Some(b'"') if bytes.get(j + 1) == Some(&b'"') => j += 2,
                        Some(b'"') => break,
                        Some(_) => j += 1,
                    }
                }
                i = j + 1;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => return None,
            b'/' if bytes.get(i + 1) == Some(&b'*') => return None,
            b'$' => {
                // `$1` is a parameter; anything else starts a dollar quote.
                if !bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    return None;
                }
                i += 1;
                while bytes.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
            }
            b'0'..=b'9' => {
                // Tokens are read and recorded by the same helpers (unchanged by the skipping scan).
                let start = i;
                i = number_end(bytes, start)?;
                let class = number_class(sql.get(start..i)?);
                push_literal(sql, &mut key, &mut literals, &mut copied, start..i, class)?;
            }
            c if ident_byte(c) => {
                while bytes.get(i).is_some_and(|&c| ident_byte(c)) {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    if literals.is_empty() {
        return None;
    }
    key.push_str(sql.get(copied..)?);
    Some(Shape { key, literals })
}

/// Every construct at every offset from an eight-byte boundary, after letters and after plain
/// bytes: `next_candidate` tests eight bytes at a time, so each byte it must stop at is tried
/// in each lane.
#[test]
fn scan_stops_at_every_special_byte_in_every_lane() {
    let constructs = [
        "\"a'1-\"",
        "\"x\"\"'\"",
        "'s'",
        "'it''s'",
        "'a'\n'b'",
        "$1",
        "$tag$x$tag$",
        "-- c",
        "/* c */",
        "12",
        "1.5",
        "1e5",
        "1e",
        ".5",
        "1.2.3",
        "12ab",
        "E'x'",
        "U&'x'",
        "t1",
        "a$b",
        "é1",
        "(1)",
        "#%&*+,./",
    ];
    for construct in constructs {
        for pad in 0..17 {
            for filler in [" ", "a", "é"] {
                let sql = format!("{}{construct} = 'v' AND b = 7", filler.repeat(pad));
                assert_eq!(scan(&sql), scan_one_byte_at_a_time(&sql), "{sql:?}");
                let sql = format!("x = 1 {}{construct}", filler.repeat(pad));
                assert_eq!(scan(&sql), scan_one_byte_at_a_time(&sql), "{sql:?}");
            }
        }
    }
}

/// Tokens dense in everything `scan` treats specially, weighted so that most texts hold
/// literals and none of the bytes that end every shape (`\x01`, NUL, a lone quote or dollar).
fn scannable_text() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let token = prop_oneof![
        4 => Just(" ".to_owned()),
        3 => "[a-zA-Z_]{1,3}",
        3 => "[0-9]{1,3}",
        2 => "'[a-z' ]{0,3}'",
        1 => r#""[a-z" '0-]{0,3}""#,
        1 => r"\$[0-9]",
        3 => r"[.eE&+*/=,()-]{1,2}",
        // The pairs where one byte changes what the next one means.
        2 => r"--|/\*|[0-9]\.[0-9]?|\.[0-9]|[0-9][eE][+-]?[0-9]?|[a-zA-Z&]'|'[\n\r] *'|\$[0-9]\$|[a-z]\$",
        1 => "[\n\r\t;é]",
        1 => "[\u{1}\u{0}\\\\'\"$]",
    ];
    proptest::collection::vec(token, 0..24).prop_map(|tokens| tokens.concat())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(8192))]

    #[test]
    fn scan_is_the_byte_at_a_time_scan(sql in scannable_text()) {
        proptest::prop_assert_eq!(scan(&sql), scan_one_byte_at_a_time(&sql));
    }
}
