//! A grammar-based generator of SQL over the demo schema: joins of every kind, subqueries and
//! CTEs, aggregates and window functions, set operations, JSON operators, ORDER/LIMIT, and writes
//! (INSERT, INSERT … SELECT, ON CONFLICT, UPDATE … FROM, DELETE … USING, RETURNING).
//!
//! Deterministic per seed (a hand-written xorshift), so a failing statement is replayed from its
//! seed. Results must not depend on row order unless the statement fixes it: LIMIT only comes
//! with ORDER BY every output column (ties are then identical rows), ordered aggregates order
//! their input, and window functions order by a unique key or rank ties alike.

use std::fmt::Write as _;

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Never zero (xorshift's fixed point); spread small seeds.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// True with probability `p` percent.
    pub fn pct(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }

    pub fn word(&mut self, items: &[&'static str]) -> &'static str {
        items[self.below(items.len())]
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Ty {
    Text,
    Json,
    Bool,
    Time,
}

pub struct Table {
    pub name: &'static str,
    pub cols: &'static [(&'static str, Ty)],
}

impl Table {
    fn of(&self, ty: Ty) -> Vec<&'static str> {
        self.cols.iter().filter(|(_, t)| *t == ty).map(|(c, _)| *c).collect()
    }
}

use Ty::*;

/// The demo schema (policies/schema.sql).
pub const TABLES: &[Table] = &[
    Table { name: "organizations", cols: &[("id", Text), ("name", Text)] },
    Table {
        name: "users",
        cols: &[("id", Text), ("organization_id", Text), ("email", Text), ("name", Text), ("phone", Text)],
    },
    Table {
        name: "agents",
        cols: &[("id", Text), ("organization_id", Text), ("slug", Text), ("name", Text), ("description", Text)],
    },
    Table {
        name: "tool_permissions",
        cols: &[("id", Text), ("organization_id", Text), ("agent_id", Text), ("tool", Text), ("allowed", Bool)],
    },
    Table {
        name: "entity_types",
        cols: &[("id", Text), ("organization_id", Text), ("environment", Text), ("slug", Text), ("schema", Json)],
    },
    Table {
        name: "entities",
        cols: &[
            ("id", Text),
            ("organization_id", Text),
            ("environment", Text),
            ("entity_type", Text),
            ("data", Json),
            ("created_at", Time),
            ("updated_at", Time),
        ],
    },
    Table {
        name: "entity_relations",
        cols: &[
            ("id", Text),
            ("organization_id", Text),
            ("environment", Text),
            ("from_id", Text),
            ("to_id", Text),
            ("relation_type", Text),
        ],
    },
    Table {
        name: "agent_configs",
        cols: &[
            ("id", Text),
            ("organization_id", Text),
            ("environment", Text),
            ("agent_id", Text),
            ("system_prompt", Text),
            ("model", Text),
            ("tools", Json),
        ],
    },
    Table {
        name: "threads",
        cols: &[
            ("id", Text),
            ("organization_id", Text),
            ("environment", Text),
            ("agent_id", Text),
            ("user_id", Text),
            ("created_at", Time),
        ],
    },
    Table {
        name: "messages",
        cols: &[
            ("id", Text),
            ("organization_id", Text),
            ("environment", Text),
            ("thread_id", Text),
            ("role", Text),
            ("content", Text),
            ("created_at", Time),
        ],
    },
    Table {
        name: "trigger_runs",
        cols: &[
            ("id", Text),
            ("organization_id", Text),
            ("environment", Text),
            ("trigger", Text),
            ("status", Text),
            ("started_at", Time),
        ],
    },
];

pub fn table(name: &str) -> Option<&'static Table> {
    TABLES.iter().find(|t| t.name == name)
}

/// Join conditions the schema suggests: (table, column, table, column); JSON columns as `->>`.
const EDGES: &[(&str, &str, &str, &str)] = &[
    ("users", "organization_id", "organizations", "id"),
    ("agents", "organization_id", "organizations", "id"),
    ("tool_permissions", "agent_id", "agents", "id"),
    ("threads", "agent_id", "agents", "id"),
    ("threads", "user_id", "users", "id"),
    ("messages", "thread_id", "threads", "id"),
    ("agent_configs", "agent_id", "agents", "id"),
    ("entity_relations", "to_id", "entities", "id"),
    ("entity_relations", "from_id", "users", "id"),
    ("entities", "data->>'studentId'", "entities", "id"),
    ("entities", "data->>'teacherId'", "users", "id"),
    ("entities", "entity_type", "entity_types", "slug"),
];

const JSON_KEYS: &[&str] = &[
    "studentId",
    "teacherId",
    "startTime",
    "status",
    "paymentAmount",
    "guardianPhone",
    "internalNotes",
    "name",
    "grade",
];

/// A table, the columns the identity may write there (`None`: all) and the visible keys of a
/// jsonb column it sees in part.
pub type Writable = (&'static str, Option<Vec<String>>, Option<Vec<String>>);

/// What the identity's roles allow, so most statements exercise what it may do (a statement on a
/// table it may not touch is refused by both sides, which proves little).
#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub readable: Vec<&'static str>,
    pub insertable: Vec<&'static str>,
    pub updatable: Vec<&'static str>,
    pub deletable: Vec<&'static str>,
    /// Per table: columns the identity may write (`None`: every column), and for a jsonb column
    /// seen in part, its visible keys.
    pub writable: Vec<Writable>,
    pub actor_id: String,
}

/// Literal values that exist in the data (so conditions select something), plus misses.
#[derive(Debug, Clone, Default)]
pub struct Pools {
    /// (table, column) → distinct values seen in the seeded data, every tenant's.
    pub values: Vec<((String, String), Vec<String>)>,
}

impl Pools {
    fn of(&self, table: &str, col: &str) -> &[String] {
        self.values.iter().find(|((t, c), _)| t == table && c == col).map(|(_, v)| v.as_slice()).unwrap_or(&[])
    }
}

pub struct Gen<'a> {
    pub rng: Rng,
    pub profile: &'a Profile,
    pub pools: &'a Pools,
    aliases: usize,
    seed: u64,
}

fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A statement and what its result's order means.
pub struct Statement {
    pub sql: String,
    /// The statement orders every output column: compare rows in order.
    pub ordered: bool,
}

impl<'a> Gen<'a> {
    pub fn new(seed: u64, profile: &'a Profile, pools: &'a Pools) -> Gen<'a> {
        Gen { rng: Rng::new(seed), profile, pools, aliases: 0, seed }
    }

    fn alias(&mut self) -> String {
        self.aliases += 1;
        format!("t{}", self.aliases)
    }

    fn readable_table(&mut self) -> &'static Table {
        let any = self.rng.pct(5) || self.profile.readable.is_empty();
        let name = if any { self.rng.pick(TABLES).name } else { *self.rng.pick(&self.profile.readable) };
        table(name).unwrap_or(&TABLES[0])
    }

    /// A value for `table.col`: mostly one that exists (any tenant's), sometimes a miss.
    fn value(&mut self, table: &str, col: &str) -> String {
        let pool = self.pools.of(table, col);
        if pool.is_empty() || self.rng.pct(10) {
            return q(self.rng.word(&["acme", "globex", "acme-teacher-1", "scheduled", "nothing", "development"]));
        }
        let v = self.rng.pick(pool).clone();
        q(&v)
    }

    fn json_key(&mut self) -> &'static str {
        self.rng.word(JSON_KEYS)
    }

    /// A scalar expression over `a.col` of type text (for select lists, group keys, comparisons).
    fn text_expr(&mut self, a: &str, t: &Table) -> String {
        let json = t.of(Json);
        if !json.is_empty() && self.rng.pct(35) {
            let c = *self.rng.pick(&json);
            let k = self.json_key();
            return match self.rng.below(4) {
                0 => format!("{a}.{c}->>{}", q(k)),
                1 => format!("{a}.{c} #>> ARRAY[{}]", q(k)),
                2 => format!("jsonb_typeof({a}.{c}->{})", q(k)),
                _ => format!("({a}.{c}->{})::text", q(k)),
            };
        }
        let c = *self.rng.pick(&t.of(Text));
        match self.rng.below(8) {
            0 => format!("lower({a}.{c})"),
            1 => format!("{a}.{c} || '/x'"),
            2 => format!("substr({a}.{c}, 1, 6)"),
            3 => format!("coalesce({a}.{c}, 'none')"),
            _ => format!("{a}.{c}"),
        }
    }

    /// Any output expression (text, json, bool, number or timestamp).
    fn item(&mut self, a: &str, t: &Table) -> String {
        match self.rng.below(10) {
            0 if !t.of(Json).is_empty() => {
                let c = *self.rng.pick(&t.of(Json));
                match self.rng.below(3) {
                    0 => format!("{a}.{c}"),
                    1 => format!("{a}.{c}->{}", q(self.json_key())),
                    _ => format!("{a}.{c} ? {}", q(self.json_key())),
                }
            }
            1 if !t.of(Time).is_empty() => format!("{a}.{}", self.rng.pick(&t.of(Time))),
            2 if !t.of(Bool).is_empty() => format!("{a}.{}", self.rng.pick(&t.of(Bool))),
            3 => format!("length({})", self.text_expr(a, t)),
            4 => format!("{a}.{}", self.rng.pick(t.cols).0),
            _ => self.text_expr(a, t),
        }
    }

    /// A condition on `a` (of table `t`); `depth` bounds subqueries.
    fn cond(&mut self, a: &str, t: &'static Table, depth: u32) -> String {
        let text = t.of(Text);
        match self.rng.below(if depth > 0 { 14 } else { 11 }) {
            0 | 1 => {
                let c = *self.rng.pick(&text);
                format!("{a}.{c} = {}", self.value(t.name, c))
            }
            2 => {
                let c = *self.rng.pick(&text);
                let (v1, v2) = (self.value(t.name, c), self.value(t.name, c));
                format!("{a}.{c} IN ({v1}, {v2})")
            }
            3 => format!(
                "{a}.{} LIKE {}",
                self.rng.pick(&text),
                q(self.rng.word(&["acme%", "%globex%", "%-1", "%production%"]))
            ),
            4 => format!("{a}.{} IS {}NULL", self.rng.pick(t.cols).0, if self.rng.pct(50) { "NOT " } else { "" }),
            5 if !t.of(Json).is_empty() => {
                let c = *self.rng.pick(&t.of(Json));
                match self.rng.below(4) {
                    0 => format!("{a}.{c} ? {}", q(self.json_key())),
                    1 => format!("{a}.{c} @> '{{\"status\": \"scheduled\"}}'"),
                    2 => format!("{a}.{c} ?| ARRAY['paymentAmount', 'guardianPhone']"),
                    _ => format!("{a}.{c}->>{} = {}", q(self.json_key()), self.value("json", "any")),
                }
            }
            6 if !t.of(Time).is_empty() => {
                format!("{a}.{} > {}", self.rng.pick(&t.of(Time)), q(self.rng.word(&["2000-01-01", "2100-01-01"])))
            }
            7 => format!("length({}) > {}", self.text_expr(a, t), self.rng.below(30)),
            8 => format!("NOT ({})", self.cond(a, t, depth)),
            9 => format!("({} OR {})", self.cond(a, t, depth), self.cond(a, t, depth)),
            10 => format!("({} AND {})", self.cond(a, t, depth), self.cond(a, t, depth)),
            11 | 12 => {
                // Correlated EXISTS over a related table, or IN over a subquery.
                let (other, on) = self.related(a, t);
                let b = self.alias();
                let inner = self.cond(&b, other, depth - 1);
                let on = on.replace("$B", &b);
                if self.rng.pct(50) {
                    format!(
                        "{}EXISTS (SELECT 1 FROM {} {b} WHERE {on} AND {inner})",
                        if self.rng.pct(20) { "NOT " } else { "" },
                        other.name
                    )
                } else {
                    let c = *self.rng.pick(&text);
                    let oc = *self.rng.pick(&other.of(Text));
                    format!("{a}.{c} IN (SELECT {b}.{oc} FROM {} {b} WHERE {inner})", other.name)
                }
            }
            13 => {
                let (other, _) = self.related(a, t);
                let b = self.alias();
                let inner = self.cond(&b, other, depth - 1);
                format!("(SELECT count(*) FROM {} {b} WHERE {inner}) > {}", other.name, self.rng.below(3))
            }
            _ => {
                let c = *self.rng.pick(&text);
                format!("{a}.{c} <> {}", self.value(t.name, c))
            }
        }
    }

    /// A table related to `t` by a schema edge (or by organization), and the ON condition with
    /// `$B` standing for the other table's alias.
    fn related(&mut self, a: &str, t: &'static Table) -> (&'static Table, String) {
        let edges: Vec<_> = EDGES.iter().filter(|e| e.0 == t.name || e.2 == t.name).collect();
        if !edges.is_empty() && self.rng.pct(75) {
            let e = **self.rng.pick(&edges);
            let (mine, other, theirs) = if e.0 == t.name { (e.1, e.2, e.3) } else { (e.3, e.0, e.1) };
            if let Some(o) = table(other) {
                let readable = self.profile.readable.contains(&o.name) || self.rng.pct(10);
                if readable {
                    return (o, format!("{} = {}", qualify(a, mine), qualify("$B", theirs)));
                }
            }
        }
        let o = self.readable_table();
        let org = |t: &Table, x: &str| {
            if t.name == "organizations" { format!("{x}.id") } else { format!("{x}.organization_id") }
        };
        (o, format!("{} = {}", org(t, a), org(o, "$B")))
    }

    /// A SELECT, and whether its rows come in a fixed order.
    pub fn select(&mut self, depth: u32) -> Statement {
        let (sql, ordered) = match self.rng.below(9) {
            0 | 1 => {
                let t = self.readable_table();
                let a = self.alias();
                let n = 1 + self.rng.below(4);
                let items: Vec<String> = (0..n).map(|_| self.item(&a, t)).collect();
                let mut s = format!(
                    "SELECT {}{} FROM {} {a}",
                    if self.rng.pct(15) { "DISTINCT " } else { "" },
                    items.join(", "),
                    t.name
                );
                if self.rng.pct(70) {
                    let _ = write!(s, " WHERE {}", self.cond(&a, t, depth));
                }
                self.finish(s, n)
            }
            2 => self.join(depth),
            3 => self.aggregate(depth),
            4 => self.window(depth),
            5 => self.set_op(depth),
            6 => self.cte(depth),
            7 => {
                // A subquery in FROM, filtered outside.
                let t = self.readable_table();
                let (a, s) = (self.alias(), self.alias());
                let c = *self.rng.pick(&t.of(Text));
                let inner_cond = self.cond(&a, t, depth);
                let e = self.text_expr(&a, t);
                let sql = format!(
                    "SELECT {s}.k, {s}.v FROM (SELECT {a}.{c} AS k, {e} AS v FROM {} {a} WHERE {inner_cond}) {s} WHERE {s}.v IS NOT NULL",
                    t.name
                );
                self.finish(sql, 2)
            }
            _ => {
                // Scalar subqueries in the select list.
                let t = self.readable_table();
                let a = self.alias();
                let (other, on) = self.related(&a, t);
                let b = self.alias();
                let on = on.replace("$B", &b);
                let agg = self.rng.pick(&["count(*)", "max({b}.id)", "min({b}.id)"]).replace("{b}", &b);
                let sql = format!(
                    "SELECT {a}.id, (SELECT {agg} FROM {} {b} WHERE {on}) AS related FROM {} {a}",
                    other.name, t.name
                );
                self.finish(sql, 2)
            }
        };
        Statement { sql, ordered }
    }

    /// Optionally ORDER BY every output column, with LIMIT/OFFSET.
    fn finish(&mut self, mut sql: String, n: usize) -> (String, bool) {
        if !self.rng.pct(40) {
            return (sql, false);
        }
        let cols: Vec<String> =
            (1..=n).map(|i| format!("{i}{}", if self.rng.pct(30) { " DESC" } else { "" })).collect();
        let _ = write!(sql, " ORDER BY {}", cols.join(", "));
        if self.rng.pct(60) {
            let _ = write!(sql, " LIMIT {}", 1 + self.rng.below(4));
            if self.rng.pct(30) {
                let _ = write!(sql, " OFFSET {}", self.rng.below(3));
            }
        }
        (sql, true)
    }

    fn join(&mut self, depth: u32) -> (String, bool) {
        let t = self.readable_table();
        let a = self.alias();
        let (o, on) = self.related(&a, t);
        let b = self.alias();
        let on = on.replace("$B", &b);
        let kind = *self.rng.pick(&[
            "JOIN",
            "INNER JOIN",
            "LEFT JOIN",
            "RIGHT JOIN",
            "FULL JOIN",
            "CROSS JOIN",
            "LEFT JOIN LATERAL",
        ]);
        let from = match kind {
            "CROSS JOIN" => format!("{} {a} CROSS JOIN {} {b}", t.name, o.name),
            "LEFT JOIN LATERAL" => {
                let c = self.alias();
                let inner_on = on.replace(&format!("{b}."), &format!("{c}."));
                format!(
                    "{} {a} LEFT JOIN LATERAL (SELECT {c}.id FROM {} {c} WHERE {inner_on}) {b} ON true",
                    t.name, o.name
                )
            }
            _ => format!("{} {a} {kind} {} {b} ON {on}", t.name, o.name),
        };
        let mut items = vec![self.item(&a, t)];
        if kind == "LEFT JOIN LATERAL" {
            items.push(format!("{b}.id"));
        } else {
            items.push(self.item(&b, o));
        }
        if self.rng.pct(40) {
            items.push(self.item(&a, t));
        }
        let n = items.len();
        let mut sql = format!("SELECT {} FROM {from}", items.join(", "));
        if self.rng.pct(60) {
            let _ = write!(sql, " WHERE {}", self.cond(&a, t, depth));
        }
        self.finish(sql, n)
    }

    fn aggregate(&mut self, depth: u32) -> (String, bool) {
        let t = self.readable_table();
        let a = self.alias();
        let key = self.text_expr(&a, t);
        let c = *self.rng.pick(&t.of(Text));
        let agg = match self.rng.below(7) {
            0 => "count(*)".to_owned(),
            1 => format!("count(DISTINCT {a}.{c})"),
            2 => format!("max({a}.{c})"),
            3 => format!("min(length({a}.{c}))"),
            4 => format!("string_agg({a}.{c}, ',' ORDER BY {a}.{c})"),
            5 => format!("jsonb_agg({a}.{c} ORDER BY {a}.{c})"),
            _ => format!("bool_or({a}.{c} LIKE 'acme%')"),
        };
        let mut sql = if self.rng.pct(25) {
            format!("SELECT {agg} FROM {} {a}", t.name)
        } else {
            format!("SELECT {key} AS k, {agg} AS v FROM {} {a}", t.name)
        };
        let grouped = sql.contains(" AS k");
        if self.rng.pct(50) {
            let _ = write!(sql, " WHERE {}", self.cond(&a, t, depth));
        }
        if grouped {
            sql.push_str(" GROUP BY 1");
            if self.rng.pct(30) {
                let _ = write!(sql, " HAVING count(*) > {}", self.rng.below(2));
            }
        }
        self.finish(sql, if grouped { 2 } else { 1 })
    }

    fn window(&mut self, depth: u32) -> (String, bool) {
        let t = self.readable_table();
        let a = self.alias();
        let part = self.text_expr(&a, t);
        let c = *self.rng.pick(&t.of(Text));
        let w = match self.rng.below(6) {
            0 => format!("count(*) OVER (PARTITION BY {part})"),
            1 => format!("row_number() OVER (PARTITION BY {part} ORDER BY {a}.id)"),
            2 => format!("rank() OVER (ORDER BY {a}.{c})"),
            3 => format!("dense_rank() OVER (PARTITION BY {part} ORDER BY {a}.{c})"),
            4 => format!("lag({a}.{c}) OVER (ORDER BY {a}.id)"),
            _ => format!("max({a}.{c}) OVER (PARTITION BY {part})"),
        };
        let mut sql = format!("SELECT {a}.id, {w} AS w FROM {} {a}", t.name);
        if self.rng.pct(50) {
            let _ = write!(sql, " WHERE {}", self.cond(&a, t, depth));
        }
        self.finish(sql, 2)
    }

    fn set_op(&mut self, depth: u32) -> (String, bool) {
        let op = *self.rng.pick(&["UNION", "UNION ALL", "INTERSECT", "EXCEPT", "INTERSECT ALL", "EXCEPT ALL"]);
        let side = |g: &mut Gen| {
            let t = g.readable_table();
            let a = g.alias();
            let e = g.text_expr(&a, t);
            let mut s = format!("SELECT {e} FROM {} {a}", t.name);
            if g.rng.pct(50) {
                let _ = write!(s, " WHERE {}", g.cond(&a, t, depth));
            }
            s
        };
        let (l, r) = (side(self), side(self));
        let sql = format!("({l}) {op} ({r})");
        self.finish(sql, 1)
    }

    fn cte(&mut self, depth: u32) -> (String, bool) {
        let t = self.readable_table();
        let a = self.alias();
        let c = *self.rng.pick(&t.of(Text));
        let e = self.text_expr(&a, t);
        let cond = self.cond(&a, t, depth);
        let mut sql = format!("WITH x AS (SELECT {a}.id, {a}.{c} AS c, {e} AS e FROM {} {a} WHERE {cond})", t.name);
        if self.rng.pct(50) {
            sql.push_str(" SELECT x.c, count(*) FROM x GROUP BY x.c");
            return self.finish(sql, 2);
        }
        let (o, _) = self.related(&a, t);
        let b = self.alias();
        let oc = *self.rng.pick(&o.of(Text));
        let _ = write!(sql, " SELECT x.id, x.e, {b}.{oc} FROM x LEFT JOIN {} {b} ON {b}.id = x.c", o.name);
        self.finish(sql, 3)
    }

    fn fresh_id(&self, n: usize) -> String {
        format!("diff-{}-{n}", self.seed)
    }

    /// The columns the identity may write in `table` (never the tenant columns, set by the
    /// proxy), and the visible keys of a partly visible jsonb column.
    fn writable(&self, t: &Table) -> (Vec<&'static str>, Option<Vec<String>>) {
        let w = self.profile.writable.iter().find(|(n, _, _)| *n == t.name);
        let (cols, keys) = match w {
            Some((_, cols, keys)) => (cols.clone(), keys.clone()),
            None => (None, None),
        };
        let cols = t
            .cols
            .iter()
            .map(|(c, _)| *c)
            .filter(|c| !(matches!(*c, "organization_id" | "environment") || (t.name == "organizations" && *c == "id")))
            .filter(|c| cols.as_ref().is_none_or(|l| l.iter().any(|x| x == c)))
            .collect();
        (cols, keys)
    }

    /// A value to write into `t.c`.
    fn write_value(&mut self, t: &Table, c: &str, ty: Ty, keys: &Option<Vec<String>>) -> String {
        match ty {
            Text if c == "id" => {
                let n = self.rng.below(3);
                q(&self.fresh_id(n))
            }
            Text if c.ends_with("_id") || c == "entity_type" || c == "role" => self.value(t.name, c),
            Text => q(&format!("v{}-{}", self.seed % 1000, self.rng.below(9))),
            Bool => self.rng.pick(&["true", "false"]).to_string(),
            Time => q(self.rng.word(&["2026-01-01 00:00:00+00", "2027-06-01 12:00:00+00"])),
            Json => self.json_object(keys),
        }
    }

    /// A JSON object, mostly with keys the identity may set and its own actor id as teacher.
    fn json_object(&mut self, keys: &Option<Vec<String>>) -> String {
        let mut parts = Vec::new();
        let own = self.profile.actor_id.clone();
        let teacher = if self.rng.pct(85) { own } else { "acme-teacher-2".to_owned() };
        parts.push(format!("\"teacherId\": \"{teacher}\""));
        for _ in 0..self.rng.below(3) {
            let k = match keys {
                Some(ks) if !ks.is_empty() && self.rng.pct(80) => self.rng.pick(ks).clone(),
                _ => self.json_key().to_owned(),
            };
            if k != "teacherId" && !parts.iter().any(|p| p.starts_with(&format!("\"{k}\""))) {
                parts.push(format!("\"{k}\": \"w{}\"", self.rng.below(5)));
            }
        }
        format!("'{{{}}}'", parts.join(", "))
    }

    fn write_table(&mut self, list: &[&'static str]) -> &'static Table {
        if list.is_empty() || self.rng.pct(5) {
            return self.rng.pick(TABLES);
        }
        table(self.rng.word(list)).unwrap_or(&TABLES[0])
    }

    fn returning(&mut self, t: &Table, with_from: bool) -> String {
        if !self.rng.pct(50) {
            return String::new();
        }
        // Every column named rather than `*`: other tests of the binary add columns to the shared
        // database's tables, which the reference does not have.
        let a = t.name;
        if !with_from && self.rng.pct(30) {
            let all: Vec<String> = t.cols.iter().map(|(c, _)| format!("{a}.{c}")).collect();
            return format!(" RETURNING {}", all.join(", "));
        }
        let e = self.text_expr(a, t);
        format!(" RETURNING {a}.id, {e}")
    }

    /// A write statement.
    pub fn write(&mut self, depth: u32) -> Statement {
        let sql = match self.rng.below(6) {
            0 | 1 => self.insert(),
            2 => self.insert_select(depth),
            3 => self.update(depth),
            4 => self.update_from(depth),
            _ => self.delete(depth),
        };
        Statement { sql, ordered: false }
    }

    fn insert_cols(&mut self, t: &'static Table) -> (Vec<&'static str>, Option<Vec<String>>) {
        let (cols, keys) = self.writable(t);
        // Always the key and the columns without defaults; some of the others.
        let required =
            ["id", "entity_type", "from_id", "to_id", "relation_type", "agent_id", "thread_id", "role", "content"];
        let required2 = ["email", "name", "slug", "tool", "model", "trigger", "status"];
        let chosen: Vec<&'static str> = cols
            .iter()
            .copied()
            .filter(|c| required.contains(c) || required2.contains(c) || self.rng.pct(50))
            .collect();
        (chosen, keys)
    }

    fn insert(&mut self) -> String {
        let t = self.write_table(&self.profile.insertable.clone());
        let (cols, keys) = self.insert_cols(t);
        if cols.is_empty() {
            return format!("INSERT INTO {} DEFAULT VALUES", t.name);
        }
        let rows = 1 + self.rng.below(2);
        let mut values = Vec::new();
        for r in 0..rows {
            let vals: Vec<String> = cols
                .iter()
                .map(|c| {
                    let ty = t.cols.iter().find(|(n, _)| n == c).map(|(_, ty)| *ty).unwrap_or(Text);
                    if *c == "id" {
                        if self.rng.pct(15) { self.value(t.name, "id") } else { q(&self.fresh_id(r)) }
                    } else {
                        self.write_value(t, c, ty, &keys)
                    }
                })
                .collect();
            values.push(format!("({})", vals.join(", ")));
        }
        let mut sql = format!("INSERT INTO {} ({}) VALUES {}", t.name, cols.join(", "), values.join(", "));
        // The reference writes a jsonb column seen in part through INSTEAD OF triggers, and
        // PostgreSQL has no ON CONFLICT for those.
        let conflict = if keys.is_some() { 4 } else { self.rng.below(5) };
        match conflict {
            0 => sql.push_str(" ON CONFLICT DO NOTHING"),
            1 => sql.push_str(" ON CONFLICT (id) DO NOTHING"),
            2 => {
                let c = *self.rng.pick(&cols);
                if c != "id" {
                    let _ = write!(sql, " ON CONFLICT (id) DO UPDATE SET {c} = EXCLUDED.{c}");
                    if self.rng.pct(30) {
                        let _ = write!(sql, " WHERE {}.{c} IS NOT NULL", t.name);
                    }
                }
            }
            _ => {}
        }
        sql + &self.returning(t, false)
    }

    fn insert_select(&mut self, depth: u32) -> String {
        let t = self.write_table(&self.profile.insertable.clone());
        let (cols, keys) = self.insert_cols(t);
        let a = self.alias();
        let items: Vec<String> = cols
            .iter()
            .map(|c| {
                let ty = t.cols.iter().find(|(n, _)| n == c).map(|(_, ty)| *ty).unwrap_or(Text);
                match (*c, ty) {
                    ("id", _) => format!("{a}.id || '-copy-{}'", self.seed),
                    (_, Json) if keys.is_some() => self.json_object(&keys),
                    _ if self.rng.pct(70) => format!("{a}.{c}"),
                    _ => self.write_value(t, c, ty, &keys),
                }
            })
            .collect();
        let cond = self.cond(&a, t, depth);
        format!(
            "INSERT INTO {} ({}) SELECT {} FROM {} {a} WHERE {cond}",
            t.name,
            cols.join(", "),
            items.join(", "),
            t.name
        ) + &self.returning(t, false)
    }

    fn set_list(&mut self, t: &'static Table) -> Option<String> {
        let (cols, keys) = self.writable(t);
        let cols: Vec<&str> = cols.into_iter().filter(|c| *c != "id").collect();
        if cols.is_empty() {
            return None;
        }
        let n = 1 + self.rng.below(2);
        let mut sets = Vec::new();
        for _ in 0..n {
            let c = *self.rng.pick(&cols);
            if sets.iter().any(|s: &String| s.starts_with(&format!("{c} ="))) {
                continue;
            }
            let ty = t.cols.iter().find(|(n, _)| *n == c).map(|(_, ty)| *ty).unwrap_or(Text);
            let v = match ty {
                Json => match self.rng.below(3) {
                    0 => format!("{}.{c} || '{{\"status\": \"done\"}}'", t.name),
                    1 => format!("jsonb_set({}.{c}, '{{status}}', '\"moved\"')", t.name),
                    _ => self.json_object(&keys),
                },
                Text if c != "entity_type" && !c.ends_with("_id") && self.rng.pct(50) => {
                    format!("{}.{c} || '-u'", t.name)
                }
                _ => self.write_value(t, c, ty, &keys),
            };
            sets.push(format!("{c} = {v}"));
        }
        Some(sets.join(", "))
    }

    fn update(&mut self, depth: u32) -> String {
        let t = self.write_table(&self.profile.updatable.clone());
        let Some(sets) = self.set_list(t) else { return self.insert() };
        let cond = self.cond(t.name, t, depth);
        format!("UPDATE {} SET {sets} WHERE {cond}", t.name) + &self.returning(t, false)
    }

    fn update_from(&mut self, depth: u32) -> String {
        let t = self.write_table(&self.profile.updatable.clone());
        let Some(sets) = self.set_list(t) else { return self.insert() };
        // The reference's INSTEAD OF triggers fire once per joined row, where a table's UPDATE
        // changes a row once: join those targets one to one.
        let (o, on) =
            if self.writable(t).1.is_some() { (t, format!("{}.id = $B.id", t.name)) } else { self.related(t.name, t) };
        let b = self.alias();
        let on = on.replace("$B", &b);
        let cond = self.cond(&b, o, depth);
        format!("UPDATE {} SET {sets} FROM {} {b} WHERE {on} AND {cond}", t.name, o.name) + &self.returning(t, true)
    }

    fn delete(&mut self, depth: u32) -> String {
        let t = self.write_table(&self.profile.deletable.clone());
        if self.rng.pct(40) {
            let (o, on) = self.related(t.name, t);
            let b = self.alias();
            let on = on.replace("$B", &b);
            let cond = self.cond(&b, o, depth);
            return format!("DELETE FROM {} USING {} {b} WHERE {on} AND {cond}", t.name, o.name)
                + &self.returning(t, true);
        }
        let cond = self.cond(t.name, t, depth);
        format!("DELETE FROM {} WHERE {cond}", t.name) + &self.returning(t, false)
    }

    /// One statement: mostly reads; writes where the identity may write (and some where not).
    pub fn statement(&mut self) -> Statement {
        let writes = !self.profile.insertable.is_empty() || !self.profile.updatable.is_empty();
        if self.rng.pct(if writes { 40 } else { 15 }) { self.write(1) } else { self.select(1) }
    }
}

fn qualify(alias: &str, col: &str) -> String {
    match col.split_once("->>") {
        Some((c, k)) => format!("{alias}.{c}->>{k}"),
        None => format!("{alias}.{col}"),
    }
}
