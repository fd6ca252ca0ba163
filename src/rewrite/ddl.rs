//! Step 3, second way: DDL on the caller's own scratch objects that sqlparser cannot read
//! (`ALTER SEQUENCE`, `ALTER COLUMN … DROP IDENTITY`, `CREATE INDEX … TABLESPACE`,
//! `DROP INDEX CONCURRENTLY`, `COMMENT ON CONSTRAINT`, `ON DELETE SET NULL (col)`,
//! `ALTER TYPE … ADD / DROP / ALTER ATTRIBUTE` on a composite type, …).
//!
//! Used only when sqlparser fails on a statement PostgreSQL classifies as one of [`KINDS`].
//! PostgreSQL's own tree is walked against an explicit allowlist: every node type and every
//! field of the statements below is named here (structs are destructured without `..`, so a
//! field a new pg_query adds does not compile until it is decided), and anything not allowed is
//! refused (42501) with a message naming the construct.
//!
//! - Every relation the statement creates, changes, drops, comments on or references — table,
//!   index, sequence; the table of a constraint or column — goes to the policy's DDL rules
//!   ([`DdlTarget::Relation`], the same rules as DDL sqlparser reads); every type, collation and
//!   operator class to [`DdlTarget::Uses`].
//! - Expressions (defaults, `USING`, `CHECK`, index expressions) may only be constants, casts,
//!   `COLLATE` and, where PostgreSQL reads them as the target's columns, column names. Function
//!   calls, operators, subqueries and anything else are refused, with one way round for indexes:
//!   a `CREATE INDEX … TABLESPACE pg_default` whose expressions or predicate the allowlist does
//!   not read, but whose every other part it accepts, goes the usual way without its tablespace
//!   (sqlparser, the policy's CREATE INDEX rules and function allowlist, the printer, the
//!   verifier), and the tablespace goes back on PostgreSQL's tree of the verified rewrite
//!   (`index_without_tablespace`, `with_default_tablespace`): the index the client could create
//!   by sending the statement without the clause, in the one tablespace DDL may name.
//! - Tablespaces are cluster-wide: only `pg_default`. Storage parameters and index access
//!   methods come from short lists.
//!
//! The statement is then printed by PostgreSQL's own printer (pg_query's deparser, which quotes
//! identifiers with `quote_identifier` and writes strings as `'…'`/`E'…'` with every quote and
//! backslash doubled: no escaping guesses), and `verify` requires PostgreSQL to read the printed
//! text as exactly the client's tree (every node, field and value; only byte offsets may differ).
//! The one form that printer gets wrong, `ALTER COLUMN … TYPE … COLLATE … USING …` (it writes the
//! COLLATE after the USING expression), is printed here from the allowlisted tree with the
//! printer's quoting (`print_alter_column_types`) and verified the same way.
//!
//! Invariant: a statement leaves this module only if every node of PostgreSQL's tree is on the
//! allowlist and every name in it passed the policy; the text forwarded is a printing of that
//! same tree (PostgreSQL's, or the proxy's for `ALTER COLUMN … TYPE … COLLATE … USING`), and is
//! refused unless it parses back to it. (An index's expressions that only the policy read leave
//! through `super::index_in_default_tablespace`, verified like any rewrite.)

use pg_query::NodeEnum;
use pg_query::protobuf::{self as pb, Node};

use super::Refusal;
use super::engine::walk::RESERVED_PREFIX;
use super::pgtree;
use super::policy::DdlTarget;
use super::printer;

/// The statement kinds (pg_query node names) this way may handle.
pub(crate) const KINDS: &[&str] =
    &["AlterSeqStmt", "AlterTableStmt", "IndexStmt", "DropStmt", "CommentStmt", "CreateStmt", "RenameStmt"];

/// The only tablespace scratch objects may name: tablespaces are cluster-wide.
const TABLESPACE: &str = "pg_default";

/// Index access methods built into PostgreSQL.
const INDEX_METHODS: &[&str] = &["btree", "hash", "gist", "gin", "brin", "spgist"];

/// Storage parameters (`WITH (…)`) of scratch tables and indexes: layout and maintenance only.
const STORAGE_PARAMETERS: &[&str] = &[
    "fillfactor",
    "deduplicate_items",
    "fastupdate",
    "gin_pending_list_limit",
    "pages_per_range",
    "autosummarize",
    "buffering",
];

/// Sequence options of `ALTER SEQUENCE` and identity columns (not `SEQUENCE NAME`, which
/// could name a sequence anywhere).
const SEQUENCE_OPTIONS: &[&str] = &["as", "increment", "minvalue", "maxvalue", "start", "restart", "cache", "cycle"];

/// Checks one name against the policy (`StatementPolicy::check_ddl_target`).
pub(crate) type Check<'a> = dyn FnMut(&DdlTarget<'_>) -> Result<(), Refusal> + 'a;

/// Checks the statement against the allowlist and prints it with PostgreSQL's printer (or, for
/// the one form that printer gets wrong, `print_alter_column_types`).
pub(crate) fn print(node: &NodeEnum, label: &str, check: &mut Check<'_>) -> Result<String, Refusal> {
    statement(node, check)?;
    match node {
        NodeEnum::AlterTableStmt(s) if s.cmds.iter().any(collation_and_using) => print_alter_column_types(s),
        _ => super::deparse(node, label),
    }
}

/// `CREATE INDEX … TABLESPACE pg_default` without its tablespace: for an index whose expressions
/// or predicate the allowlist does not read (a function call, an operator), the statement takes
/// the usual way (sqlparser, the policy's CREATE INDEX rules, the printer, the verifier), and
/// `with_default_tablespace` puts the clause back on the verified rewrite. The tablespace is the
/// only one DDL may name (`check_names`), so the index is the one the client could create by
/// sending the statement without it, stored where the clause says.
/// Everything but the expressions and the predicate still passes this allowlist (names, access
/// method, operator classes, collations, storage parameters).
pub(crate) fn index_without_tablespace(node: &NodeEnum, check: &mut Check<'_>) -> Result<Option<NodeEnum>, Refusal> {
    let NodeEnum::IndexStmt(index) = node else { return Ok(None) };
    if index.table_space != TABLESPACE {
        return Ok(None);
    }
    create_index(index, Expressions::Policy, check)?;
    let mut bare = index.clone();
    bare.table_space.clear();
    Ok(Some(NodeEnum::IndexStmt(bare)))
}

/// PostgreSQL's tree of the verified rewrite `rewritten` (one CREATE INDEX without a tablespace),
/// with `TABLESPACE pg_default` put back.
pub(crate) fn with_default_tablespace(rewritten: &str, label: &str) -> Result<NodeEnum, Refusal> {
    let refused = || Refusal::Unverifiable(format!("refused: the proxy cannot put the tablespace back on {label}"));
    let Some(NodeEnum::IndexStmt(mut index)) = super::classify::parse_alone(rewritten) else { return Err(refused()) };
    if !index.table_space.is_empty() {
        return Err(refused());
    }
    index.table_space = TABLESPACE.to_owned();
    Ok(NodeEnum::IndexStmt(index))
}

/// `ALTER COLUMN … TYPE … COLLATE … USING …`: pg_query 18.1's printer writes the COLLATE after the
/// USING expression, where PostgreSQL reads it as a collation of that expression.
fn collation_and_using(cmd: &Node) -> bool {
    matches!(
        &cmd.node,
        Some(NodeEnum::AlterTableCmd(c)) if c.subtype == pb::AlterTableType::AtAlterColumnType as i32
            && matches!(c.def.as_deref().and_then(|d| d.node.as_ref()),
                Some(NodeEnum::ColumnDef(d)) if d.coll_clause.is_some() && d.raw_default.is_some())
    )
}

/// Prints an `ALTER TABLE` whose subcommands are all `ALTER COLUMN … TYPE`, from a tree the
/// allowlist accepted: every name quoted (`printer::push_quoted_ident`), every string through the
/// printer's literal (`standard_conforming_strings` is pinned on), in the grammar's order
/// `TYPE t COLLATE c USING e`. The verifier then requires PostgreSQL to read the text as exactly
/// the client's tree (`Form::Deparsed`), so a slip here is a refusal, never another statement.
fn print_alter_column_types(s: &pb::AlterTableStmt) -> Result<String, Refusal> {
    let unexpected = || refuse("this form of ALTER TABLE … ALTER COLUMN … TYPE … COLLATE … USING");
    let pb::AlterTableStmt { relation: rel, cmds, objtype: _, missing_ok } = s;
    let rel = rel.as_ref().ok_or_else(unexpected)?;
    let mut out = String::from("ALTER TABLE ");
    if *missing_ok {
        out.push_str("IF EXISTS ");
    }
    if !rel.inh {
        out.push_str("ONLY ");
    }
    let parts = [&rel.catalogname, &rel.schemaname, &rel.relname];
    print_names(&mut out, parts.into_iter().filter(|p| !p.is_empty()));
    for (i, cmd) in cmds.iter().enumerate() {
        let Some(NodeEnum::AlterTableCmd(cmd)) = &cmd.node else { return Err(unexpected()) };
        let Some(NodeEnum::ColumnDef(def)) = cmd.def.as_deref().and_then(|d| d.node.as_ref()) else {
            return Err(refuse("ALTER COLUMN … TYPE … COLLATE … USING together with other subcommands"));
        };
        if cmd.subtype != pb::AlterTableType::AtAlterColumnType as i32 {
            return Err(refuse("ALTER COLUMN … TYPE … COLLATE … USING together with other subcommands"));
        }
        out.push_str(if i == 0 { " ALTER COLUMN " } else { ", ALTER COLUMN " });
        printer::push_quoted_ident(&mut out, &cmd.name);
        out.push_str(" TYPE ");
        print_type(&mut out, def.type_name.as_ref().ok_or_else(unexpected)?)?;
        if let Some(coll) = &def.coll_clause {
            out.push_str(" COLLATE ");
            print_names(&mut out, strings(&coll.collname, "a collation name")?.iter());
        }
        if let Some(using) = &def.raw_default {
            out.push_str(" USING ");
            print_expr(&mut out, using)?;
        }
    }
    Ok(out)
}

/// `"a"."b"`.
fn print_names<'a>(out: &mut String, names: impl Iterator<Item = &'a String>) {
    for (i, n) in names.enumerate() {
        if i > 0 {
            out.push('.');
        }
        printer::push_quoted_ident(out, n);
    }
}

/// A type name as the allowlist accepts it: names, constant modifiers, array bounds.
fn print_type(out: &mut String, t: &pb::TypeName) -> Result<(), Refusal> {
    print_names(out, strings(&t.names, "a type name")?.iter());
    if !t.typmods.is_empty() {
        out.push('(');
        for (i, m) in t.typmods.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            print_expr(out, m)?;
        }
        out.push(')');
    }
    for b in &t.array_bounds {
        match &b.node {
            Some(NodeEnum::Integer(i)) if i.ival < 0 => out.push_str("[]"),
            Some(NodeEnum::Integer(i)) => out.push_str(&format!("[{}]", i.ival)),
            _ => return Err(refuse("this array bound")),
        }
    }
    Ok(())
}

/// An expression as the allowlist accepts it (`expr`): constants, casts, COLLATE, column names.
fn print_expr(out: &mut String, node: &Node) -> Result<(), Refusal> {
    use pb::a_const::Val;
    match &node.node {
        Some(NodeEnum::AConst(c)) => match &c.val {
            None if c.isnull => out.push_str("NULL"),
            Some(Val::Ival(i)) => out.push_str(&i.ival.to_string()),
            Some(Val::Boolval(b)) => out.push_str(if b.boolval { "true" } else { "false" }),
            Some(Val::Sval(v)) => printer::push_string_literal(out, &v.sval),
            // PostgreSQL keeps a numeric constant's text and a bit string's digits after its
            // kind letter; anything else is not a constant it wrote.
            Some(Val::Fval(f)) if is_numeric(&f.fval) => out.push_str(&f.fval),
            Some(Val::Bsval(b)) => match b.bsval.split_at_checked(1) {
                Some(("b", digits)) if digits.chars().all(|c| c == '0' || c == '1') => {
                    out.push('B');
                    printer::push_string_literal(out, digits);
                }
                Some(("x", digits)) if digits.chars().all(|c| c.is_ascii_hexdigit()) => {
                    out.push('X');
                    printer::push_string_literal(out, digits);
                }
                _ => return Err(refuse("this bit string")),
            },
            _ => return Err(refuse("this constant")),
        },
        Some(NodeEnum::TypeCast(c)) => {
            out.push_str("CAST(");
            print_expr(out, c.arg.as_deref().ok_or_else(|| refuse("this cast"))?)?;
            out.push_str(" AS ");
            print_type(out, c.type_name.as_ref().ok_or_else(|| refuse("this cast"))?)?;
            out.push(')');
        }
        Some(NodeEnum::CollateClause(c)) => {
            out.push('(');
            print_expr(out, c.arg.as_deref().ok_or_else(|| refuse("this COLLATE"))?)?;
            out.push_str(") COLLATE ");
            print_names(out, strings(&c.collname, "a collation name")?.iter());
        }
        Some(NodeEnum::ColumnRef(pb::ColumnRef { fields, location: _ })) => match fields.as_slice() {
            [Node { node: Some(NodeEnum::String(s)) }] => printer::push_quoted_ident(out, &s.sval),
            _ => return Err(refuse("a qualified column reference")),
        },
        _ => return Err(refuse(expression_name(node))),
    }
    Ok(())
}

/// A numeric constant as PostgreSQL's lexer wrote it: digits, one point, an exponent, a sign.
fn is_numeric(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty()
        && digits.chars().next().is_some_and(|c| c.is_ascii_digit() || c == '.')
        && digits.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
}

/// For every statement, whichever parser reads it: the tables its foreign keys reference follow
/// the DDL rules (a foreign key probes and pins the rows it references; pg_query's own node
/// iterator does not reach constraints), and its tablespaces are `pg_default`. Types and
/// collations of its columns stay in the catalog or the caller's own schemas.
pub(crate) fn check_names(node: &NodeEnum, check: &mut Check<'_>) -> Result<(), Refusal> {
    fn column(c: &pb::ColumnDef, check: &mut Check<'_>) -> Result<(), Refusal> {
        if let Some(t) = &c.type_name {
            uses(&strings(&t.names, "a type name")?, "type", check)?;
        }
        if let Some(coll) = &c.coll_clause {
            uses(&strings(&coll.collname, "a collation name")?, "collation", check)?;
        }
        c.constraints.iter().try_for_each(|k| element(k, check))
    }
    fn element(n: &Node, check: &mut Check<'_>) -> Result<(), Refusal> {
        match &n.node {
            Some(NodeEnum::ColumnDef(c)) => column(c, check),
            Some(NodeEnum::Constraint(k)) => {
                tablespace(&k.indexspace)?;
                k.pktable.as_ref().map_or(Ok(()), |t| relation(t, "reference", false, check))
            }
            _ => Ok(()),
        }
    }
    match node {
        NodeEnum::CreateStmt(s) => {
            tablespace(&s.tablespacename)?;
            s.table_elts.iter().try_for_each(|e| element(e, check))
        }
        NodeEnum::AlterTableStmt(s) => s.cmds.iter().try_for_each(|c| match &c.node {
            Some(NodeEnum::AlterTableCmd(c)) => c.def.as_deref().map_or(Ok(()), |d| element(d, check)),
            _ => Ok(()),
        }),
        // `CREATE TYPE … AS (…)`: its attributes' types and collations, as a table's columns'.
        NodeEnum::CompositeTypeStmt(s) => s.coldeflist.iter().try_for_each(|e| element(e, check)),
        NodeEnum::IndexStmt(s) => tablespace(&s.table_space),
        NodeEnum::CreateTableAsStmt(s) => s.into.as_ref().map_or(Ok(()), |i| tablespace(&i.table_space_name)),
        _ => Ok(()),
    }
}

fn refuse(what: impl std::fmt::Display) -> Refusal {
    Refusal::Denied(format!("refused: {what} is not allowed in DDL through an environment key"))
}

fn statement(node: &NodeEnum, check: &mut Check<'_>) -> Result<(), Refusal> {
    match node {
        NodeEnum::AlterSeqStmt(s) => alter_sequence(s, check),
        NodeEnum::AlterTableStmt(s) => alter_table(s, check),
        NodeEnum::IndexStmt(s) => create_index(s, Expressions::Allowlist, check),
        NodeEnum::DropStmt(s) => drop(s, check),
        NodeEnum::CommentStmt(s) => comment(s, check),
        NodeEnum::CreateStmt(s) => create_table(s, check),
        NodeEnum::RenameStmt(s) => rename(s, check),
        other => Err(refuse(format!("the statement {}", pgtree::node_kind(other)))),
    }
}

// ---- statements ----

fn alter_sequence(s: &pb::AlterSeqStmt, check: &mut Check<'_>) -> Result<(), Refusal> {
    let pb::AlterSeqStmt { sequence, options, for_identity, missing_ok: _ } = s;
    if *for_identity {
        return Err(refuse("ALTER SEQUENCE of an identity column"));
    }
    relation(required(sequence.as_ref(), "ALTER SEQUENCE")?, "alter", false, check)?;
    options.iter().try_for_each(|o| sequence_option(o, check))
}

fn alter_table(s: &pb::AlterTableStmt, check: &mut Check<'_>) -> Result<(), Refusal> {
    let pb::AlterTableStmt { relation: rel, cmds, objtype, missing_ok: _ } = s;
    if *objtype == pb::ObjectType::ObjectType as i32 {
        return alter_composite_type(rel.as_ref(), cmds, check);
    }
    if *objtype != pb::ObjectType::ObjectTable as i32 {
        return Err(refuse(format!("ALTER {}", object_type_name(*objtype))));
    }
    relation(required(rel.as_ref(), "ALTER TABLE")?, "alter", false, check)?;
    for cmd in cmds {
        let Some(NodeEnum::AlterTableCmd(cmd)) = &cmd.node else {
            return Err(refuse(format!("ALTER TABLE with {}", node_name(cmd))));
        };
        alter_table_cmd(cmd, check)?;
    }
    Ok(())
}

fn alter_table_cmd(cmd: &pb::AlterTableCmd, check: &mut Check<'_>) -> Result<(), Refusal> {
    use pb::AlterTableType as T;
    let pb::AlterTableCmd { subtype, name: column, num, newowner, def, behavior: _, missing_ok: _, recurse } = cmd;
    let subtype = T::try_from(*subtype).unwrap_or(T::Undefined);
    let what = || format!("ALTER TABLE … {}", subtype.as_str_name().trim_start_matches("AT_"));
    if newowner.is_some() || *recurse || *num != 0 {
        return Err(refuse(what()));
    }
    let def = def.as_deref();
    match subtype {
        // Column (or constraint) name only.
        T::AtDropIdentity | T::AtSetNotNull | T::AtDropNotNull | T::AtDropColumn | T::AtDropConstraint
            if def.is_none() =>
        {
            name(column)
        }
        T::AtSetStatistics => {
            name(column)?;
            match def.and_then(|d| d.node.as_ref()) {
                None | Some(NodeEnum::Integer(_)) => Ok(()),
                Some(_) => Err(refuse(what())),
            }
        }
        T::AtColumnDefault => {
            name(column)?;
            def.map_or(Ok(()), |d| expr(d, false, check))
        }
        T::AtAlterColumnType => {
            name(column)?;
            match def.and_then(|d| d.node.as_ref()) {
                Some(NodeEnum::ColumnDef(c)) => column_def(c, ColumnUse::AlterType, check),
                _ => Err(refuse(what())),
            }
        }
        T::AtAddColumn if column.is_empty() => match def.and_then(|d| d.node.as_ref()) {
            Some(NodeEnum::ColumnDef(c)) => column_def(c, ColumnUse::Define, check),
            _ => Err(refuse(what())),
        },
        T::AtAddConstraint if column.is_empty() => match def.and_then(|d| d.node.as_ref()) {
            Some(NodeEnum::Constraint(c)) => constraint(c, check),
            _ => Err(refuse(what())),
        },
        _ => Err(refuse(what())),
    }
}

/// `ALTER TYPE … ADD ATTRIBUTE / DROP ATTRIBUTE / ALTER ATTRIBUTE … TYPE` (PostgreSQL reads them
/// as an `AlterTableStmt` of a type): a composite type of the caller's own (the same rules as
/// `CREATE TYPE … AS (…)` and `DROP TYPE` on it: unqualified, where the pinned search_path puts the
/// caller's scratch schema first, or qualified with that schema or `pg_temp`), attributes of a
/// name, a type and a collation exactly as `CREATE TYPE … AS (…)` may declare them (the types and
/// collations from the catalog or the caller's own schemas, `check_names`): no default, no
/// constraint, no `USING`. `CASCADE` reaches only typed tables (`CREATE TABLE … OF type`), which
/// no environment key may create. Anything else (`OWNER TO`, `RENAME`, `SET SCHEMA`, other
/// subcommands) is refused.
fn alter_composite_type(rel: Option<&pb::RangeVar>, cmds: &[Node], check: &mut Check<'_>) -> Result<(), Refusal> {
    use pb::AlterTableType as T;
    relation(required(rel, "ALTER TYPE")?, "alter the type", false, check)?;
    if cmds.is_empty() {
        return Err(refuse("this form of ALTER TYPE"));
    }
    for cmd in cmds {
        let Some(NodeEnum::AlterTableCmd(cmd)) = &cmd.node else {
            return Err(refuse(format!("ALTER TYPE with {}", node_name(cmd))));
        };
        let pb::AlterTableCmd { subtype, name: attribute, num, newowner, def, behavior: _, missing_ok: _, recurse } =
            &**cmd;
        let subtype = T::try_from(*subtype).unwrap_or(T::Undefined);
        let what = || format!("ALTER TYPE … {}", subtype.as_str_name().trim_start_matches("AT_"));
        if newowner.is_some() || *recurse || *num != 0 {
            return Err(refuse(what()));
        }
        let def = def.as_deref().and_then(|d| d.node.as_ref());
        match (subtype, def) {
            (T::AtAddColumn, Some(NodeEnum::ColumnDef(c))) if attribute.is_empty() => {
                column_def(c, ColumnUse::Attribute, check)?;
            }
            (T::AtDropColumn, None) => name(attribute)?,
            (T::AtAlterColumnType, Some(NodeEnum::ColumnDef(c))) => {
                name(attribute)?;
                column_def(c, ColumnUse::AttributeType, check)?;
            }
            _ => return Err(refuse(what())),
        }
    }
    Ok(())
}

/// Who decides on an index's expressions and predicate.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expressions {
    /// This allowlist (`expr`): constants, casts, COLLATE, column names.
    Allowlist,
    /// The policy, on sqlparser's reading of the statement (`index_without_tablespace`).
    Policy,
}

fn create_index(s: &pb::IndexStmt, expressions: Expressions, check: &mut Check<'_>) -> Result<(), Refusal> {
    let pb::IndexStmt {
        idxname,
        relation: rel,
        access_method,
        table_space,
        index_params,
        index_including_params,
        options,
        where_clause,
        exclude_op_names,
        idxcomment,
        index_oid,
        old_number,
        old_create_subid,
        old_first_relfilelocator_subid,
        unique: _,
        nulls_not_distinct: _,
        primary,
        isconstraint,
        iswithoutoverlaps,
        deferrable,
        initdeferred,
        transformed,
        concurrent: _,
        if_not_exists: _,
        reset_default_tblspc,
    } = s;
    let internal = !exclude_op_names.is_empty()
        || !idxcomment.is_empty()
        || *index_oid != 0
        || *old_number != 0
        || *old_create_subid != 0
        || *old_first_relfilelocator_subid != 0
        || *primary
        || *isconstraint
        || *iswithoutoverlaps
        || *deferrable
        || *initdeferred
        || *transformed
        || *reset_default_tblspc;
    if internal {
        return Err(refuse("this form of CREATE INDEX"));
    }
    relation(required(rel.as_ref(), "CREATE INDEX")?, "create an index on", false, check)?;
    // The index lands in its table's schema: its name is checked like a relation created there.
    if !idxname.is_empty() {
        name(idxname)?;
        check(&DdlTarget::Relation {
            parts: std::slice::from_ref(idxname),
            verb: "create the index",
            creates: Some(false),
        })?;
    }
    if !INDEX_METHODS.contains(&access_method.as_str()) {
        return Err(refuse(format!("the index access method {access_method}")));
    }
    tablespace(table_space)?;
    for p in index_params {
        index_elem(p, Some(expressions), check)?;
    }
    for p in index_including_params {
        index_elem(p, None, check)?;
    }
    storage_parameters(options)?;
    match (where_clause.as_deref(), expressions) {
        (Some(w), Expressions::Allowlist) => expr(w, true, check),
        _ => Ok(()),
    }
}

/// `expressions`: `None` where an expression may not stand (INCLUDE columns).
fn index_elem(node: &Node, expressions: Option<Expressions>, check: &mut Check<'_>) -> Result<(), Refusal> {
    let Some(NodeEnum::IndexElem(e)) = &node.node else {
        return Err(refuse(format!("an index column given as {}", node_name(node))));
    };
    let pb::IndexElem {
        name: column,
        expr: expression,
        indexcolname,
        collation,
        opclass,
        opclassopts,
        ordering: _,
        nulls_ordering: _,
    } = &**e;
    if !indexcolname.is_empty() || !opclassopts.is_empty() {
        return Err(refuse("operator class options"));
    }
    match (column.is_empty(), expression.as_deref(), expressions) {
        (false, None, _) => name(column)?,
        (true, Some(x), Some(Expressions::Allowlist)) => expr(x, true, check)?,
        (true, Some(_), Some(Expressions::Policy)) => {}
        _ => return Err(refuse("this index column")),
    }
    if !collation.is_empty() {
        uses(&strings(collation, "a collation name")?, "collation", check)?;
    }
    if !opclass.is_empty() {
        uses(&strings(opclass, "an operator class name")?, "operator class", check)?;
    }
    Ok(())
}

fn drop(s: &pb::DropStmt, check: &mut Check<'_>) -> Result<(), Refusal> {
    use pb::ObjectType as O;
    let pb::DropStmt { objects, remove_type, behavior: _, missing_ok: _, concurrent: _ } = s;
    if ![O::ObjectIndex, O::ObjectTable, O::ObjectSequence].iter().any(|t| *t as i32 == *remove_type) {
        return Err(refuse(format!("DROP {}", object_type_name(*remove_type))));
    }
    // Every object, so one statement cannot mix a scratch object with anything else.
    for object in objects {
        let Some(NodeEnum::List(list)) = &object.node else {
            return Err(refuse(format!("DROP of {}", node_name(object))));
        };
        qualified(&strings(&list.items, "an object name")?, "drop", check)?;
    }
    Ok(())
}

fn comment(s: &pb::CommentStmt, check: &mut Check<'_>) -> Result<(), Refusal> {
    use pb::ObjectType as O;
    let pb::CommentStmt { objtype, object, comment: _ } = s;
    let Some(NodeEnum::List(list)) = object.as_deref().and_then(|o| o.node.as_ref()) else {
        return Err(refuse(format!("COMMENT ON {}", object_type_name(*objtype))));
    };
    let mut parts = strings(&list.items, "an object name")?;
    match O::try_from(*objtype) {
        Ok(O::ObjectTable | O::ObjectIndex | O::ObjectSequence) => {}
        // The constraint's or column's name comes last; the rest names its table.
        Ok(O::ObjectTabconstraint | O::ObjectColumn) if parts.len() >= 2 => {
            let last = parts.pop().unwrap_or_default();
            name(&last)?;
        }
        _ => return Err(refuse(format!("COMMENT ON {}", object_type_name(*objtype)))),
    }
    qualified(&parts, "comment on", check)
}

fn create_table(s: &pb::CreateStmt, check: &mut Check<'_>) -> Result<(), Refusal> {
    let pb::CreateStmt {
        relation: rel,
        table_elts,
        inh_relations,
        partbound,
        partspec,
        of_typename,
        constraints,
        nnconstraints,
        options,
        oncommit: _,
        tablespacename,
        access_method,
        if_not_exists: _,
    } = s;
    if !inh_relations.is_empty() {
        return Err(refuse("INHERITS"));
    }
    if partbound.is_some() || partspec.is_some() {
        return Err(refuse("partitioning"));
    }
    if of_typename.is_some() {
        return Err(refuse("CREATE TABLE … OF type"));
    }
    if !constraints.is_empty() || !nnconstraints.is_empty() {
        return Err(refuse("this form of CREATE TABLE"));
    }
    if !access_method.is_empty() && access_method != "heap" {
        return Err(refuse(format!("the table access method {access_method}")));
    }
    relation(required(rel.as_ref(), "CREATE TABLE")?, "create", true, check)?;
    tablespace(tablespacename)?;
    storage_parameters(options)?;
    for element in table_elts {
        match &element.node {
            Some(NodeEnum::ColumnDef(c)) => column_def(c, ColumnUse::Define, check)?,
            Some(NodeEnum::Constraint(c)) => constraint(c, check)?,
            // LIKE copies another table's definition.
            _ => return Err(refuse(format!("CREATE TABLE with {}", node_name(element)))),
        }
    }
    Ok(())
}

fn rename(s: &pb::RenameStmt, check: &mut Check<'_>) -> Result<(), Refusal> {
    let pb::RenameStmt {
        rename_type,
        relation_type: _,
        relation: rel,
        object,
        subname,
        newname,
        behavior: _,
        missing_ok: _,
    } = s;
    // Tables are renamed through sqlparser's path; indexes are altered by no environment key.
    if *rename_type != pb::ObjectType::ObjectSequence as i32 || object.is_some() || !subname.is_empty() {
        return Err(refuse(format!("renaming {}", object_type_name(*rename_type))));
    }
    relation(required(rel.as_ref(), "ALTER SEQUENCE … RENAME")?, "rename", false, check)?;
    // The new name lands in the sequence's schema: checked like a relation created there.
    name(newname)?;
    check(&DdlTarget::Relation { parts: std::slice::from_ref(newname), verb: "rename to", creates: Some(false) })
}

// ---- parts of statements ----

#[derive(Clone, Copy, PartialEq, Eq)]
enum ColumnUse {
    /// A column of CREATE TABLE or ALTER TABLE … ADD COLUMN.
    Define,
    /// ALTER COLUMN … TYPE: a type, a collation and a `USING` expression over the columns.
    AlterType,
    /// An attribute of `ALTER TYPE … ADD ATTRIBUTE`: a name, a type and a collation only, as in
    /// `CREATE TYPE … AS (…)`.
    Attribute,
    /// `ALTER TYPE … ALTER ATTRIBUTE … TYPE`: a type and a collation only (no `USING`).
    AttributeType,
}

fn column_def(c: &pb::ColumnDef, usage: ColumnUse, check: &mut Check<'_>) -> Result<(), Refusal> {
    let pb::ColumnDef {
        colname,
        type_name: typ,
        compression,
        inhcount,
        is_local: _,
        is_not_null,
        is_from_type,
        storage,
        storage_name,
        raw_default,
        cooked_default,
        identity,
        identity_sequence,
        generated,
        coll_clause,
        coll_oid,
        constraints,
        fdwoptions,
        location: _,
    } = c;
    // Fields set only after parse analysis, or by syntax the proxy does not allow (STORAGE and
    // COMPRESSION are printed without quoting by pg_query's printer).
    let other = !compression.is_empty()
        || *inhcount != 0
        || *is_not_null
        || *is_from_type
        || !storage.is_empty()
        || !storage_name.is_empty()
        || cooked_default.is_some()
        || !identity.is_empty()
        || identity_sequence.is_some()
        || !generated.is_empty()
        || *coll_oid != 0
        || !fdwoptions.is_empty();
    if other {
        return Err(refuse("this column definition (STORAGE, COMPRESSION or OPTIONS)"));
    }
    type_name(required(typ.as_ref(), "a column definition")?, check)?;
    if let Some(coll) = coll_clause {
        let pb::CollateClause { arg, collname, location: _ } = &**coll;
        if arg.is_some() {
            return Err(refuse("this COLLATE clause"));
        }
        uses(&strings(collname, "a collation name")?, "collation", check)?;
    }
    match usage {
        ColumnUse::Define => {
            name(colname)?;
            if raw_default.is_some() {
                return Err(refuse("this column default"));
            }
            for c in constraints {
                match &c.node {
                    Some(NodeEnum::Constraint(c)) => constraint(c, check)?,
                    _ => return Err(refuse(format!("a column constraint given as {}", node_name(c)))),
                }
            }
            Ok(())
        }
        ColumnUse::AlterType => {
            if !colname.is_empty() || !constraints.is_empty() {
                return Err(refuse("this ALTER COLUMN … TYPE"));
            }
            raw_default.as_deref().map_or(Ok(()), |u| expr(u, true, check))
        }
        ColumnUse::Attribute | ColumnUse::AttributeType => {
            let named = match usage {
                ColumnUse::Attribute => !colname.is_empty(),
                _ => colname.is_empty(),
            };
            if !named || raw_default.is_some() || !constraints.is_empty() {
                return Err(refuse("this attribute of ALTER TYPE (a name, a type and a collation only)"));
            }
            name(colname)
        }
    }
}

fn constraint(c: &pb::Constraint, check: &mut Check<'_>) -> Result<(), Refusal> {
    use pb::ConstrType as C;
    let pb::Constraint {
        contype,
        conname,
        deferrable: _,
        initdeferred: _,
        is_enforced: _,
        skip_validation: _,
        initially_valid: _,
        is_no_inherit: _,
        raw_expr,
        cooked_expr,
        generated_when,
        generated_kind,
        nulls_not_distinct: _,
        keys,
        without_overlaps,
        including,
        exclusions,
        options,
        indexname,
        indexspace,
        reset_default_tblspc,
        access_method,
        where_clause,
        pktable,
        fk_attrs,
        pk_attrs,
        fk_with_period,
        pk_with_period,
        fk_matchtype: _,
        fk_upd_action: _,
        fk_del_action: _,
        fk_del_set_cols,
        old_conpfeqop,
        old_pktable_oid,
        location: _,
    } = c;
    let contype = C::try_from(*contype).unwrap_or(C::Undefined);
    let what = || format!("the constraint {}", contype.as_str_name().trim_start_matches("CONSTR_"));
    match contype {
        C::ConstrNull
        | C::ConstrNotnull
        | C::ConstrDefault
        | C::ConstrIdentity
        | C::ConstrCheck
        | C::ConstrPrimary
        | C::ConstrUnique
        | C::ConstrForeign
        | C::ConstrAttrDeferrable
        | C::ConstrAttrNotDeferrable
        | C::ConstrAttrDeferred
        | C::ConstrAttrImmediate => {}
        // Generated columns (expressions), exclusion constraints (operators), ENFORCED.
        _ => return Err(refuse(what())),
    }
    let other = !cooked_expr.is_empty()
        || !generated_kind.is_empty()
        || *without_overlaps
        || !exclusions.is_empty()
        || !indexname.is_empty()
        || *reset_default_tblspc
        || !access_method.is_empty()
        || where_clause.is_some()
        || *fk_with_period
        || *pk_with_period
        || !old_conpfeqop.is_empty()
        || *old_pktable_oid != 0
        || !(generated_when.is_empty() || contype == C::ConstrIdentity);
    if other {
        return Err(refuse(what()));
    }
    if !conname.is_empty() {
        name(conname)?;
    }
    if let Some(e) = raw_expr.as_deref() {
        match contype {
            C::ConstrDefault => expr(e, false, check)?,
            C::ConstrCheck => expr(e, true, check)?,
            _ => return Err(refuse(what())),
        }
    }
    for list in [keys, including, fk_attrs, pk_attrs, fk_del_set_cols] {
        strings(list, "a column name")?.iter().try_for_each(|c| name(c))?;
    }
    tablespace(indexspace)?;
    if contype == C::ConstrIdentity {
        options.iter().try_for_each(|o| sequence_option(o, check))?;
    } else {
        storage_parameters(options)?;
    }
    if let Some(t) = pktable {
        relation(t, "reference", false, check)?;
    }
    Ok(())
}

/// A relation named by a RangeVar: checked by the policy (`verb`: what the statement does to
/// it; `creating`: CREATE TABLE, whose persistence decides whether it is temporary).
fn relation(rv: &pb::RangeVar, verb: &str, creating: bool, check: &mut Check<'_>) -> Result<(), Refusal> {
    let pb::RangeVar { catalogname, schemaname, relname, inh: _, relpersistence, alias, location: _ } = rv;
    if alias.is_some() {
        return Err(refuse("an alias"));
    }
    let temporary = match relpersistence.as_str() {
        "p" => false,
        "t" if creating => true,
        "u" if creating => false,
        _ => return Err(refuse("this relation persistence")),
    };
    let parts: Vec<String> =
        [catalogname, schemaname, relname].into_iter().filter(|p| !p.is_empty()).cloned().collect();
    parts.iter().try_for_each(|p| name(p))?;
    check(&DdlTarget::Relation { parts: &parts, verb, creates: creating.then_some(temporary) })
}

/// A relation named by a list of names (DROP, COMMENT).
fn qualified(parts: &[String], verb: &str, check: &mut Check<'_>) -> Result<(), Refusal> {
    parts.iter().try_for_each(|p| name(p))?;
    check(&DdlTarget::Relation { parts, verb, creates: None })
}

fn uses(parts: &[String], what: &str, check: &mut Check<'_>) -> Result<(), Refusal> {
    parts.iter().try_for_each(|p| name(p))?;
    check(&DdlTarget::Uses { parts, what })
}

fn type_name(t: &pb::TypeName, check: &mut Check<'_>) -> Result<(), Refusal> {
    let pb::TypeName { names, type_oid, setof, pct_type, typmods, typemod, array_bounds, location: _ } = t;
    if *type_oid != 0 || *setof || *typemod != -1 {
        return Err(refuse("this type name"));
    }
    // `t.col%TYPE` reads another relation's column.
    if *pct_type {
        return Err(refuse("%TYPE"));
    }
    uses(&strings(names, "a type name")?, "type", check)?;
    for m in typmods {
        match &m.node {
            Some(NodeEnum::AConst(pb::AConst {
                val: Some(pb::a_const::Val::Ival(_) | pb::a_const::Val::Sval(_)),
                ..
            })) => {}
            _ => return Err(refuse(format!("a type modifier given as {}", node_name(m)))),
        }
    }
    for b in array_bounds {
        if !matches!(b.node, Some(NodeEnum::Integer(_))) {
            return Err(refuse("this array bound"));
        }
    }
    Ok(())
}

/// An expression: constants, casts, `COLLATE`, and (`columns`) plain column names, which
/// PostgreSQL reads as the target's own columns in these positions. Nothing that runs code
/// beyond a type's input or cast.
fn expr(node: &Node, columns: bool, check: &mut Check<'_>) -> Result<(), Refusal> {
    match &node.node {
        Some(NodeEnum::AConst(pb::AConst { isnull: _, location: _, val: _ })) => Ok(()),
        Some(NodeEnum::TypeCast(c)) => {
            let pb::TypeCast { arg, type_name: typ, location: _ } = &**c;
            expr(required(arg.as_deref(), "a cast")?, columns, check)?;
            type_name(required(typ.as_ref(), "a cast")?, check)
        }
        Some(NodeEnum::CollateClause(c)) => {
            let pb::CollateClause { arg, collname, location: _ } = &**c;
            expr(required(arg.as_deref(), "COLLATE")?, columns, check)?;
            uses(&strings(collname, "a collation name")?, "collation", check)
        }
        Some(NodeEnum::ColumnRef(pb::ColumnRef { fields, location: _ })) if columns => match fields.as_slice() {
            [Node { node: Some(NodeEnum::String(s)) }] => name(&s.sval),
            _ => Err(refuse("a qualified column reference")),
        },
        _ => Err(refuse(expression_name(node))),
    }
}

fn expression_name(node: &Node) -> String {
    match &node.node {
        Some(NodeEnum::FuncCall(_)) => "a function call".to_owned(),
        Some(NodeEnum::SubLink(_)) => "a subquery".to_owned(),
        Some(NodeEnum::AExpr(_)) => "an operator".to_owned(),
        Some(NodeEnum::BoolExpr(_)) => "AND/OR/NOT".to_owned(),
        Some(NodeEnum::ColumnRef(_)) => "a column reference here".to_owned(),
        Some(NodeEnum::ParamRef(_)) => "a parameter".to_owned(),
        _ => format!("the expression {}", node_name(node)),
    }
}

fn sequence_option(node: &Node, check: &mut Check<'_>) -> Result<(), Refusal> {
    let Some(NodeEnum::DefElem(d)) = &node.node else {
        return Err(refuse(format!("a sequence option given as {}", node_name(node))));
    };
    let pb::DefElem { defnamespace, defname, arg, defaction, location: _, arg_location: _ } = &**d;
    let option = || format!("the sequence option {defname}");
    if !defnamespace.is_empty() || *defaction != pb::DefElemAction::DefelemUnspec as i32 {
        return Err(refuse(option()));
    }
    let arg = arg.as_deref().and_then(|a| a.node.as_ref());
    match (defname.as_str(), arg) {
        ("owned_by", Some(NodeEnum::List(list))) => {
            let mut parts = strings(&list.items, "a column name")?;
            // OWNED BY NONE, or OWNED BY table.column: the table is checked like any target.
            if matches!(parts.as_slice(), [none] if none == "none") {
                return Ok(());
            }
            let column = parts.pop().unwrap_or_default();
            name(&column)?;
            if parts.is_empty() {
                return Err(refuse(option()));
            }
            qualified(&parts, "own a sequence by", check)
        }
        ("as", Some(NodeEnum::TypeName(t))) => type_name(t, check),
        ("cycle", Some(NodeEnum::Boolean(_))) => Ok(()),
        // NO MINVALUE / NO MAXVALUE, RESTART without a value.
        ("minvalue" | "maxvalue" | "restart", None) => Ok(()),
        (o, Some(NodeEnum::Integer(_) | NodeEnum::Float(_))) if SEQUENCE_OPTIONS.contains(&o) && o != "as" => Ok(()),
        _ => Err(refuse(option())),
    }
}

fn storage_parameters(options: &[Node]) -> Result<(), Refusal> {
    for o in options {
        let Some(NodeEnum::DefElem(d)) = &o.node else {
            return Err(refuse(format!("a storage parameter given as {}", node_name(o))));
        };
        let pb::DefElem { defnamespace, defname, arg, defaction, location: _, arg_location: _ } = &**d;
        let known = defnamespace.is_empty()
            && STORAGE_PARAMETERS.contains(&defname.as_str())
            && *defaction == pb::DefElemAction::DefelemUnspec as i32;
        // A value is a number, a string, or a bare word (`off`), which PostgreSQL's parser
        // reads as a one-part type name.
        let value = match arg.as_deref().and_then(|a| a.node.as_ref()) {
            None | Some(NodeEnum::Integer(_) | NodeEnum::Float(_) | NodeEnum::String(_) | NodeEnum::Boolean(_)) => true,
            Some(NodeEnum::TypeName(t)) => {
                t.names.len() == 1 && t.typmods.is_empty() && t.array_bounds.is_empty() && !t.setof && !t.pct_type
            }
            Some(_) => false,
        };
        if !known || !value {
            return Err(refuse(format!("the storage parameter {defname}")));
        }
    }
    Ok(())
}

fn tablespace(name: &str) -> Result<(), Refusal> {
    if name.is_empty() || name == TABLESPACE {
        Ok(())
    } else {
        Err(Refusal::Denied(format!(
            "refused: the tablespace {name} is not allowed: tablespaces are shared by the whole cluster (only {TABLESPACE})"
        )))
    }
}

/// An identifier the statement names: never one of the proxy's reserved names.
fn name(n: &str) -> Result<(), Refusal> {
    if n.to_ascii_lowercase().starts_with(RESERVED_PREFIX) {
        return Err(Refusal::Denied(format!(
            "refused: names starting with {RESERVED_PREFIX} are reserved by the proxy"
        )));
    }
    Ok(())
}

/// The strings of a list of `String` nodes; anything else in it is refused.
fn strings(nodes: &[Node], what: &str) -> Result<Vec<String>, Refusal> {
    nodes
        .iter()
        .map(|n| match &n.node {
            Some(NodeEnum::String(s)) => Ok(s.sval.clone()),
            _ => Err(refuse(format!("{what} given as {}", node_name(n)))),
        })
        .collect()
}

fn required<'n, T>(node: Option<&'n T>, what: &str) -> Result<&'n T, Refusal> {
    node.ok_or_else(|| refuse(format!("this form of {what}")))
}

fn node_name(node: &Node) -> String {
    node.node.as_ref().map_or_else(|| "nothing".to_owned(), pgtree::node_kind)
}

fn object_type_name(t: i32) -> String {
    pb::ObjectType::try_from(t)
        .map(|t| t.as_str_name().trim_start_matches("OBJECT_").replace('_', " "))
        .unwrap_or_else(|_| "this object".to_owned())
}

#[cfg(test)]
pub(crate) mod tests;
