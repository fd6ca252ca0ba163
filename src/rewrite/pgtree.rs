//! A complete walk over PostgreSQL parse trees (pg_query's protobuf types).
//!
//! pg_query's own `nodes()` iterator deliberately skips node types it does not care about, so a
//! rule built on it could miss a function call hidden in an unusual position. Every protobuf
//! type pg_query generates derives `serde::Serialize`, which visits *every* field; a tiny
//! serializer that only records where it is gives us an exhaustive walk without a hand-written
//! visitor for the ~270 node types.
//!
//! The same walk also renders a position-free canonical form of a tree (`shape`), which is how
//! the verifier checks that a re-printed statement still means what the client wrote.
//!
//! Depth: the walk recurses once per protobuf message level. pg_query refuses to decode trees
//! deeper than prost's recursion limit (100 messages), so the recursion here is bounded too.
//!
//! Invariant: a walk visits every node and string of PostgreSQL's tree (no node type is skipped), so a rule built on it
//! cannot miss a function call or relation in an unusual position.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};

use pg_query::{NodeEnum, NodeRef};
use serde::Serialize;
use serde::ser::{self, Impossible};

/// One step of the path to a string: the protobuf message (Rust struct) name and the field
/// being serialized in it, e.g. `("FuncCall", "funcname")`, `("String", "sval")`.
pub(crate) type Frame = (&'static str, &'static str);

/// The node name of a tree node, e.g. `SelectStmt`, `TransactionStmt` (pg_query's variant name).
pub(crate) fn node_kind(node: &NodeEnum) -> String {
    match node.serialize(KindCatcher) {
        Ok(kind) => kind.to_string(),
        // Every NodeEnum value is a newtype variant, so this is unreachable in practice; an
        // unknown kind never matches an expected kind, so verification fails closed.
        Err(_) => "Unknown".to_string(),
    }
}

/// The callback of `walk_strings`: the path to a string and the string.
pub(crate) type OnStr<'a, E> = dyn FnMut(&[Frame], &str) -> Result<(), E> + 'a;

/// Why a walk ended early.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WalkError<E> {
    /// The callback returned this error.
    Stopped(E),
    /// serde reported a failure that did not come from the callback. Not expected for these
    /// types; callers must treat it as a failed check (fail closed), never as a clean walk.
    Serializer,
}

/// Calls `on_str(path, value)` for every string anywhere in the tree, in tree order. The walk
/// stops at the first `Err`, which is returned.
pub(crate) fn walk_strings<E>(node: &NodeEnum, on_str: &mut OnStr<'_, E>) -> Result<(), WalkError<E>> {
    Walker { on_str: Some(on_str), ..Walker::new() }.run(node)
}

/// The relations a statement names, schema-qualified where written (`public.t`, `t`), without
/// the names of its CTEs. Empty if the tree cannot be walked (it is only reported, never
/// decided on).
pub(crate) fn relations(node: &NodeEnum) -> Vec<String> {
    let Some((found, ctes)) = relations_and_ctes(node) else { return Vec::new() };
    let names: BTreeSet<String> = found
        .into_iter()
        .map(|(schema, name)| if schema.is_empty() { name } else { format!("{schema}.{name}") })
        .collect();
    names.into_iter().filter(|n| !ctes.contains(n)).collect()
}

/// A relation as written: (schema, empty where not written; name).
pub(crate) type SchemaAndName = (String, String);

/// Every relation named anywhere in the tree (PostgreSQL's `RangeVar`s: FROM items, write
/// targets, locked relations…) as (schema, name), the schema empty where not written, and the
/// names of its CTEs. A complete walk, unlike pg_query's `nodes()`, which skips some clauses
/// (locking clauses, LIMIT, VALUES lists). `None` only if serde fails (fail closed).
pub(crate) fn relations_and_ctes(node: &NodeEnum) -> Option<(Vec<SchemaAndName>, BTreeSet<String>)> {
    let (mut relations, mut ctes, mut schema) = (Vec::new(), BTreeSet::new(), String::new());
    walk_strings::<()>(node, &mut |path, v| {
        match path.last() {
            Some(("RangeVar", "schemaname")) => schema = v.to_owned(),
            Some(("RangeVar", "relname")) => relations.push((std::mem::take(&mut schema), v.to_owned())),
            Some(("CommonTableExpr", "ctename")) => {
                ctes.insert(v.to_owned());
            }
            _ => {}
        }
        Ok(())
    })
    .ok()?;
    Some((relations, ctes))
}

/// Whether the tree holds a node of this kind anywhere (e.g. `LockingClause`); `true` if serde
/// fails (fail closed).
pub(crate) fn contains_node(node: &NodeEnum, kind: &str) -> bool {
    node_kinds(node).is_none_or(|kinds| kinds.contains(kind))
}

fn node_kinds(node: &NodeEnum) -> Option<BTreeSet<&'static str>> {
    let mut walker = Walker::<()> { kinds: Some(BTreeSet::new()), ..Walker::new() };
    node.serialize(&mut walker).ok()?;
    walker.kinds
}

/// A construct of PostgreSQL's tree that the proxy's SQL parser is known not to read, named for
/// a refusal (locking strengths other than FOR UPDATE/FOR SHARE, locking several tables,
/// assignments to an array element or a field where `subscript.rs` does not apply).
pub(crate) fn unsupported_construct(node: &NodeEnum) -> Option<&'static str> {
    use pg_query::protobuf::LockClauseStrength as S;
    let found = visit(node, &mut |n| {
        let unsupported = match n {
            NodeRef::SelectStmt(sel) => sel
                .locking_clause
                .iter()
                .filter_map(|n| match &n.node {
                    Some(NodeEnum::LockingClause(l)) => Some(l),
                    _ => None,
                })
                .find_map(|l| match S::try_from(l.strength) {
                    Ok(S::LcsFornokeyupdate) => Some("FOR NO KEY UPDATE"),
                    Ok(S::LcsForkeyshare) => Some("FOR KEY SHARE"),
                    _ if l.locked_rels.len() > 1 => Some("a locking clause naming several tables (FOR … OF a, b)"),
                    _ => None,
                }),
            NodeRef::UpdateStmt(u) if subscripted(&u.target_list) => Some(
                "an assignment to an array element or a field (SET col[i] = …) in an UPDATE inside another statement",
            ),
            NodeRef::OnConflictClause(c) if subscripted(&c.target_list) => {
                Some("an assignment to an array element or a field in ON CONFLICT DO UPDATE SET col[i] = …")
            }
            NodeRef::InsertStmt(i) if subscripted(&i.cols) => {
                Some("an array element or a field in an INSERT column list (INSERT INTO t (col[i]) …)")
            }
            _ => None,
        };
        unsupported.map_or(Ok(()), Err)
    });
    match found {
        Ok(()) => None,
        Err(WalkError::Stopped(what)) => Some(what),
        Err(WalkError::Serializer) => Some("a statement whose tree could not be read"),
    }
}

/// A target list with an element or field target (`col[i]`, `col.f`).
fn subscripted(targets: &[pg_query::protobuf::Node]) -> bool {
    targets.iter().any(|t| matches!(&t.node, Some(NodeEnum::ResTarget(r)) if !r.indirection.is_empty()))
}

/// The callback of `visit`: one node of the kinds `typed_node` knows.
pub(crate) type OnNode<'a, E> = dyn FnMut(NodeRef<'_>) -> Result<(), E> + 'a;

/// Calls `on_node` for every node anywhere in the tree of the kinds PostgreSQL-side rules
/// inspect (`FuncCall`, `RangeVar`, `SelectStmt`, `UpdateStmt`, `InsertStmt`,
/// `OnConflictClause`, `CommonTableExpr`), in tree order, each once: the complete counterpart of
/// pg_query's `nodes()`, which never enters VALUES lists, LIMIT/OFFSET, locking clauses,
/// `ARRAY[…]`, subscripts, named arguments, window definitions and more. The walk stops at the
/// first `Err`, which is returned.
pub(crate) fn visit<E>(node: &NodeEnum, on_node: &mut OnNode<'_, E>) -> Result<(), WalkError<E>> {
    Walker { on_node: Some(on_node), ..Walker::new() }.run(node)
}

/// `value` as a tree node, when it is one of the kinds `visit` reports (or a box of one).
fn typed_node<T: ?Sized>(value: &T) -> Option<NodeRef<'_>> {
    use pg_query::protobuf as pb;
    use std::any::TypeId;
    let id = typeid::of::<T>();
    macro_rules! kinds {
        ($($kind:ident),*) => {$(
            if id == TypeId::of::<pb::$kind>() {
                // SAFETY: `pb::$kind` is 'static and has no lifetime parameters, so a `T` with
                // its TypeId (lifetimes erased, see `typeid::of`) is `pb::$kind` itself.
                return Some(NodeRef::$kind(unsafe { &*(value as *const T).cast::<pb::$kind>() }));
            }
            if id == TypeId::of::<Box<pb::$kind>>() {
                // SAFETY: as above, for `Box<pb::$kind>`.
                let boxed = unsafe { &*(value as *const T).cast::<Box<pb::$kind>>() };
                return Some(NodeRef::$kind(boxed));
            }
        )*};
    }
    kinds!(FuncCall, RangeVar, SelectStmt, UpdateStmt, InsertStmt, OnConflictClause, CommonTableExpr);
    None
}

/// A canonical rendering of the whole tree — every node, field, list and value, but no byte
/// offsets — so that two statements PostgreSQL reads identically have equal shapes however
/// they were spelled (`E'it\'s'` and `'it''s'`, `x::int` and `x::INT`, extra spaces…).
/// `None` only if serde fails, which these types never do.
pub(crate) fn shape(node: &NodeEnum) -> Option<String> {
    let normalized = without_null_limits(node);
    let node = normalized.as_ref().unwrap_or(node);
    let mut walker: Walker<'_, ()> = Walker { shape: Some(String::with_capacity(1024)), ..Walker::new() };
    node.serialize(&mut walker).ok()?;
    walker.shape
}

/// A limit count that is the NULL constant (`LIMIT ALL`, `LIMIT NULL`) means no limit, and
/// sqlparser prints no LIMIT for it (SQLAlchemy sends `LIMIT ALL OFFSET $1`): the canonical form
/// leaves it out, on both sides of the meaning check. `None` when the tree has none (no copy).
fn without_null_limits(node: &NodeEnum) -> Option<NodeEnum> {
    use pg_query::protobuf::LimitOption;
    fn null_count(s: &pg_query::protobuf::SelectStmt) -> bool {
        let count_option = matches!(
            LimitOption::try_from(s.limit_option),
            Ok(LimitOption::Count | LimitOption::Default | LimitOption::Undefined)
        );
        count_option
            && matches!(
                s.limit_count.as_deref().and_then(|n| n.node.as_ref()),
                Some(NodeEnum::AConst(c)) if c.isnull && c.val.is_none()
            )
    }
    let found = matches!(node, NodeEnum::SelectStmt(s) if null_count(s))
        || node.nodes().iter().any(|(n, ..)| matches!(n, pg_query::NodeRef::SelectStmt(s) if null_count(s)));
    if !found {
        return None;
    }
    let mut copy = node.clone();
    // SAFETY: every pointer comes from `copy`, which lives (unmoved) until after the loop; only
    // SelectStmt pointers are dereferenced, and what is freed (a NULL constant, which has no
    // children) holds no SelectStmt another pointer refers to.
    unsafe {
        for (n, ..) in copy.nodes_mut() {
            if let pg_query::NodeMut::SelectStmt(ptr) = n
                && let Some(s) = ptr.as_mut()
                && null_count(s)
            {
                // What PostgreSQL records without a LIMIT: `Count` when there is an OFFSET.
                s.limit_count = None;
                if s.limit_offset.is_none() {
                    s.limit_option = LimitOption::Default as i32;
                }
            }
        }
    }
    Some(copy)
}

/// The numbers of the parameter references (`$k`) in a statement, one per occurrence.
pub(crate) fn param_numbers(node: &NodeEnum) -> Option<Vec<i32>> {
    // The canonical rendering spells each reference `ParamRef{ number k `; strings are quoted
    // in it, so no string can imitate one.
    let shape = shape(node)?;
    let mut numbers = Vec::new();
    for part in shape.split("ParamRef{ ").skip(1) {
        let rest = part.strip_prefix("number ")?;
        numbers.push(rest.split(' ').next()?.parse().ok()?);
    }
    Some(numbers)
}

#[derive(Debug)]
pub(crate) struct WalkStop;

impl fmt::Display for WalkStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("walk stopped")
    }
}

impl std::error::Error for WalkStop {}

impl ser::Error for WalkStop {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        WalkStop
    }
}

struct Walker<'a, E> {
    path: Vec<Frame>,
    on_str: Option<&'a mut OnStr<'a, E>>,
    /// When set, called with every node of the kinds `typed_node` knows (see `visit`).
    on_node: Option<&'a mut OnNode<'a, E>>,
    stopped: Option<E>,
    /// When set, a canonical rendering of the whole tree is appended here (see `shape`).
    shape: Option<String>,
    /// When set, the kinds of node entered are gathered here (see `contains_node`).
    kinds: Option<BTreeSet<&'static str>>,
}

/// Fields that record byte offsets into the parsed text (`location`, `name_location`,
/// `list_start`, …); they differ between two spellings of the same statement, so `shape`
/// leaves them out.
fn is_position_field(key: &str) -> bool {
    key == "location"
        || key.ends_with("_location")
        || matches!(key, "stmt_len" | "list_start" | "list_end" | "rexpr_list_start" | "rexpr_list_end")
}

impl<E> Walker<'_, E> {
    /// A walker that records nothing; each walk sets what it gathers.
    fn new() -> Self {
        Walker { path: Vec::with_capacity(32), on_str: None, on_node: None, stopped: None, shape: None, kinds: None }
    }

    /// Walks `node`; a stop is the callback's error, or a serializer failure (fail closed).
    fn run(mut self, node: &NodeEnum) -> Result<(), WalkError<E>> {
        match node.serialize(&mut self) {
            Ok(()) => Ok(()),
            Err(WalkStop) => Err(self.stopped.map_or(WalkError::Serializer, WalkError::Stopped)),
        }
    }

    fn string(&mut self, v: &str) -> Result<(), WalkStop> {
        if let Some(shape) = &mut self.shape {
            // Debug-quoted so that string contents cannot imitate structure.
            write!(shape, "{v:?} ").map_err(|_| WalkStop)?;
        }
        let Some(on_str) = &mut self.on_str else { return Ok(()) };
        match on_str(&self.path, v) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stopped = Some(e);
                Err(WalkStop)
            }
        }
    }

    /// Reports `value` to `on_node` when it is a node of a kind `visit` reports. Called before
    /// every value is serialized, so no node is missed whatever field or list holds it.
    fn enter<T: ?Sized>(&mut self, value: &T) -> Result<(), WalkStop> {
        let Some(on_node) = &mut self.on_node else { return Ok(()) };
        let Some(node) = typed_node(value) else { return Ok(()) };
        match on_node(node) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stopped = Some(e);
                Err(WalkStop)
            }
        }
    }

    fn record(&mut self, token: impl fmt::Display) -> Result<(), WalkStop> {
        if let Some(shape) = &mut self.shape {
            write!(shape, "{token} ").map_err(|_| WalkStop)?;
        }
        Ok(())
    }

    fn field<T: ?Sized + Serialize>(&mut self, key: &'static str, value: &T) -> Result<(), WalkStop> {
        if self.shape.is_some() && is_position_field(key) {
            return Ok(());
        }
        if let Some(top) = self.path.last_mut() {
            top.1 = key;
        }
        self.record(key)?;
        self.enter(value)?;
        value.serialize(self)
    }

    fn close(&mut self, token: &str) -> Result<(), WalkStop> {
        self.record(token)
    }
}

impl<E> ser::Serializer for &mut Walker<'_, E> {
    type Ok = ();
    type Error = WalkStop;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn serialize_bool(self, v: bool) -> Result<(), WalkStop> {
        self.record(v)
    }
    fn serialize_i8(self, v: i8) -> Result<(), WalkStop> {
        self.record(v)
    }
    fn serialize_i16(self, v: i16) -> Result<(), WalkStop> {
        self.record(v)
    }
    fn serialize_i32(self, v: i32) -> Result<(), WalkStop> {
        self.record(v)
    }
    fn serialize_i64(self, v: i64) -> Result<(), WalkStop> {
        self.record(v)
    }
    fn serialize_u8(self, v: u8) -> Result<(), WalkStop> {
        self.record(v)
    }
    fn serialize_u16(self, v: u16) -> Result<(), WalkStop> {
        self.record(v)
    }
    fn serialize_u32(self, v: u32) -> Result<(), WalkStop> {
        self.record(v)
    }
    fn serialize_u64(self, v: u64) -> Result<(), WalkStop> {
        self.record(v)
    }
    fn serialize_f32(self, v: f32) -> Result<(), WalkStop> {
        self.record(v)
    }
    fn serialize_f64(self, v: f64) -> Result<(), WalkStop> {
        self.record(v)
    }
    fn serialize_char(self, v: char) -> Result<(), WalkStop> {
        self.string(v.encode_utf8(&mut [0u8; 4]))
    }
    fn serialize_str(self, v: &str) -> Result<(), WalkStop> {
        self.string(v)
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), WalkStop> {
        self.record(format_args!("{v:?}"))
    }
    fn serialize_none(self) -> Result<(), WalkStop> {
        self.record("None")
    }
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<(), WalkStop> {
        self.record("Some")?;
        self.enter(value)?;
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), WalkStop> {
        self.record("()")
    }
    fn serialize_unit_struct(self, name: &'static str) -> Result<(), WalkStop> {
        self.record(name)
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> Result<(), WalkStop> {
        self.record(variant)
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(self, name: &'static str, value: &T) -> Result<(), WalkStop> {
        self.record(name)?;
        self.enter(value)?;
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), WalkStop> {
        self.record(variant)?;
        self.enter(value)?;
        value.serialize(self)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self, WalkStop> {
        self.record("[")?;
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self, WalkStop> {
        self.record("(")?;
        Ok(self)
    }
    fn serialize_tuple_struct(self, name: &'static str, _: usize) -> Result<Self, WalkStop> {
        self.record(format_args!("{name}("))?;
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Self, WalkStop> {
        self.record(format_args!("{variant}("))?;
        Ok(self)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self, WalkStop> {
        self.record("{")?;
        Ok(self)
    }
    fn serialize_struct(self, name: &'static str, _: usize) -> Result<Self, WalkStop> {
        if let Some(kinds) = &mut self.kinds {
            kinds.insert(name);
        }
        self.path.push((name, ""));
        self.record(format_args!("{name}{{"))?;
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Self, WalkStop> {
        self.path.push((variant, ""));
        self.record(format_args!("{variant}{{"))?;
        Ok(self)
    }
}

impl<E> ser::SerializeSeq for &mut Walker<'_, E> {
    type Ok = ();
    type Error = WalkStop;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), WalkStop> {
        self.enter(value)?;
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), WalkStop> {
        self.close("]")
    }
}

impl<E> ser::SerializeTuple for &mut Walker<'_, E> {
    type Ok = ();
    type Error = WalkStop;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), WalkStop> {
        self.enter(value)?;
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), WalkStop> {
        self.close(")")
    }
}

impl<E> ser::SerializeTupleStruct for &mut Walker<'_, E> {
    type Ok = ();
    type Error = WalkStop;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), WalkStop> {
        self.enter(value)?;
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), WalkStop> {
        self.close(")")
    }
}

impl<E> ser::SerializeTupleVariant for &mut Walker<'_, E> {
    type Ok = ();
    type Error = WalkStop;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), WalkStop> {
        self.enter(value)?;
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), WalkStop> {
        self.close(")")
    }
}

impl<E> ser::SerializeMap for &mut Walker<'_, E> {
    type Ok = ();
    type Error = WalkStop;
    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> Result<(), WalkStop> {
        key.serialize(&mut **self)
    }
    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), WalkStop> {
        self.enter(value)?;
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), WalkStop> {
        self.close("}")
    }
}

impl<E> ser::SerializeStruct for &mut Walker<'_, E> {
    type Ok = ();
    type Error = WalkStop;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, key: &'static str, value: &T) -> Result<(), WalkStop> {
        self.field(key, value)
    }
    fn end(self) -> Result<(), WalkStop> {
        self.path.pop();
        self.close("}")
    }
}

impl<E> ser::SerializeStructVariant for &mut Walker<'_, E> {
    type Ok = ();
    type Error = WalkStop;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, key: &'static str, value: &T) -> Result<(), WalkStop> {
        self.field(key, value)
    }
    fn end(self) -> Result<(), WalkStop> {
        self.path.pop();
        self.close("}")
    }
}

/// Serializer that succeeds only for a newtype variant and returns its name: `NodeEnum` is a
/// oneof whose variants are all newtypes (`SelectStmt(Box<SelectStmt>)`, …).
struct KindCatcher;

impl ser::Serializer for KindCatcher {
    type Ok = &'static str;
    type Error = WalkStop;
    type SerializeSeq = Impossible<&'static str, WalkStop>;
    type SerializeTuple = Impossible<&'static str, WalkStop>;
    type SerializeTupleStruct = Impossible<&'static str, WalkStop>;
    type SerializeTupleVariant = Impossible<&'static str, WalkStop>;
    type SerializeMap = Impossible<&'static str, WalkStop>;
    type SerializeStruct = Impossible<&'static str, WalkStop>;
    type SerializeStructVariant = Impossible<&'static str, WalkStop>;

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: &T,
    ) -> Result<&'static str, WalkStop> {
        Ok(variant)
    }

    fn serialize_bool(self, _: bool) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_i8(self, _: i8) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_i16(self, _: i16) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_i32(self, _: i32) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_i64(self, _: i64) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_u8(self, _: u8) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_u16(self, _: u16) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_u32(self, _: u32) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_u64(self, _: u64) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_f32(self, _: f32) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_f64(self, _: f64) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_char(self, _: char) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_str(self, _: &str) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_none(self) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_some<T: ?Sized + Serialize>(self, _: &T) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_unit(self) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(self, _: &'static str, _: &T) -> Result<&'static str, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeTupleStruct, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, WalkStop> {
        Err(WalkStop)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, WalkStop> {
        Err(WalkStop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rewrite::classify::first_node as first_stmt;

    #[test]
    fn shape_reads_a_null_limit_as_no_limit() {
        let sh = |sql: &str| shape(&first_stmt(sql)).unwrap();
        assert_eq!(sh("SELECT a FROM t LIMIT ALL OFFSET 1"), sh("SELECT a FROM t OFFSET 1"));
        assert_eq!(sh("SELECT a FROM t LIMIT NULL"), sh("SELECT a FROM t"));
        assert_eq!(sh("SELECT (SELECT 1 LIMIT ALL)"), sh("SELECT (SELECT 1)"));
        assert_ne!(sh("SELECT a FROM t LIMIT 0"), sh("SELECT a FROM t"));
        assert_ne!(sh("SELECT a FROM t LIMIT $1"), sh("SELECT a FROM t"));
        assert_ne!(sh("SELECT a FROM t LIMIT 'x'"), sh("SELECT a FROM t"));
    }

    #[test]
    fn complete_walks_find_what_nodes_skips() {
        let calls = |sql: &str| {
            let mut names = Vec::new();
            visit::<()>(&first_stmt(sql), &mut |n| {
                if let NodeRef::FuncCall(f) = n {
                    names.push(
                        f.funcname
                            .iter()
                            .filter_map(|p| match &p.node {
                                Some(NodeEnum::String(s)) => Some(s.sval.clone()),
                                _ => None,
                            })
                            .collect::<Vec<_>>(),
                    );
                }
                Ok(())
            })
            .unwrap();
            names
        };
        let names = |v: &[&[&str]]| {
            v.iter().map(|p| p.iter().map(|s| s.to_string()).collect::<Vec<String>>()).collect::<Vec<_>>()
        };
        assert_eq!(
            calls("INSERT INTO t VALUES (now(), pg_catalog.lower('X'))"),
            names(&[&["now"], &["pg_catalog", "lower"]])
        );
        assert_eq!(calls("SELECT 1 LIMIT f(g(1), h())"), names(&[&["f"], &["g"], &["h"]]));
        // Sibling calls with no string between them stay apart.
        assert_eq!(calls("SELECT ARRAY[a(), b()], c.d()"), names(&[&["a"], &["b"], &["c", "d"]]));
        assert_eq!(calls("SELECT 'f()' AS \"g()\""), names(&[]));
        let (relations, ctes) = relations_and_ctes(&first_stmt(
            "WITH c AS (SELECT 1) SELECT 1 FROM s.t, c, u LIMIT (SELECT count(*) FROM v) FOR UPDATE OF t",
        ))
        .unwrap();
        let pairs: Vec<(&str, &str)> = relations.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(pairs, [("s", "t"), ("", "c"), ("", "u"), ("", "v"), ("", "t")]);
        assert_eq!(ctes.into_iter().collect::<Vec<_>>(), ["c"]);
        assert!(contains_node(&first_stmt("SELECT 1 FROM t FOR KEY SHARE"), "LockingClause"));
        assert!(!contains_node(&first_stmt("SELECT ' LockingClause{' FROM t"), "LockingClause"));
    }

    /// `visit` reports every node of its kinds: as many as the canonical rendering (a complete
    /// walk of another kind) holds, in clauses pg_query's `nodes()` skips too.
    #[test]
    fn visit_reports_every_node_of_its_kinds() {
        let statements = [
            "INSERT INTO t VALUES (f(1), (SELECT g() FROM u LIMIT h()))",
            "SELECT ARRAY[a()], (b())[c()], d(x => e()), count(*) FILTER (WHERE i()) OVER (PARTITION BY j())",
            "SELECT 1 FROM v LIMIT k() OFFSET (SELECT 1 FROM w) FOR UPDATE OF v",
            "INSERT INTO t VALUES (1) ON CONFLICT (a) DO UPDATE SET a = l() WHERE m() RETURNING n()",
            "WITH c AS (SELECT o() FROM x) UPDATE t SET a[p()] = q() FROM c WHERE r() IS NOT NULL",
            "SELECT s() COLLATE \"C\", CASE WHEN t() THEN u() END, ROW(v()), GREATEST(w(), 1)",
            "CREATE TABLE z (a int DEFAULT y() CHECK (a > x()))",
            "COPY (SELECT f() FROM t) TO STDOUT",
        ];
        let (mut found_by_nodes, mut found_by_visit) = (0, 0);
        for sql in statements {
            let tree = first_stmt(sql);
            let shape = shape(&tree).unwrap();
            let mut seen = std::collections::BTreeMap::new();
            visit::<()>(&tree, &mut |n| {
                let kind = match n {
                    NodeRef::FuncCall(_) => "FuncCall",
                    NodeRef::RangeVar(_) => "RangeVar",
                    NodeRef::SelectStmt(_) => "SelectStmt",
                    NodeRef::UpdateStmt(_) => "UpdateStmt",
                    NodeRef::InsertStmt(_) => "InsertStmt",
                    NodeRef::OnConflictClause(_) => "OnConflictClause",
                    NodeRef::CommonTableExpr(_) => "CommonTableExpr",
                    _ => "other",
                };
                *seen.entry(kind).or_insert(0usize) += 1;
                Ok(())
            })
            .unwrap();
            assert_eq!(seen.get("other"), None, "{sql}");
            for kind in [
                "FuncCall",
                "RangeVar",
                "SelectStmt",
                "UpdateStmt",
                "InsertStmt",
                "OnConflictClause",
                "CommonTableExpr",
            ] {
                let want =
                    shape.matches(&format!(" {kind}{{")).count() + usize::from(shape.starts_with(&format!("{kind}{{")));
                assert_eq!(seen.get(kind).copied().unwrap_or(0), want, "{sql}: {kind}");
            }
            found_by_nodes += tree.nodes().iter().filter(|(n, ..)| matches!(n, NodeRef::FuncCall(_))).count();
            found_by_visit += seen["FuncCall"];
        }
        assert!(found_by_nodes < found_by_visit, "nodes() now finds every call: the cases lost their point");
        let stop = visit(&first_stmt("SELECT 1 LIMIT f()"), &mut |n| match n {
            NodeRef::FuncCall(_) => Err("found"),
            _ => Ok(()),
        });
        assert_eq!(stop, Err(WalkError::Stopped("found")));
    }

    fn strings(sql: &str) -> Vec<(Vec<Frame>, String)> {
        let mut out = Vec::new();
        walk_strings::<()>(&first_stmt(sql), &mut |path, s| {
            out.push((path.to_vec(), s.to_string()));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn kinds_are_variant_names() {
        assert_eq!(node_kind(&first_stmt("SELECT 1")), "SelectStmt");
        assert_eq!(node_kind(&first_stmt("BEGIN")), "TransactionStmt");
        assert_eq!(node_kind(&first_stmt("SET x = 1")), "VariableSetStmt");
        assert_eq!(node_kind(&first_stmt("INSERT INTO t VALUES (1)")), "InsertStmt");
    }

    #[test]
    fn walk_sees_function_names_and_constants_with_their_paths() {
        let all = strings("SELECT pg_catalog.set_config('a', 'b', false) FROM t");
        let func: Vec<_> =
            all.iter().filter(|(p, _)| p.contains(&("FuncCall", "funcname"))).map(|(_, s)| s.as_str()).collect();
        assert_eq!(func, ["pg_catalog", "set_config"]);
        let consts: Vec<_> =
            all.iter().filter(|(p, _)| p.iter().any(|f| f.0 == "AConst")).map(|(_, s)| s.as_str()).collect();
        assert_eq!(consts, ["a", "b"]);
        assert!(all.iter().any(|(p, s)| s == "t" && p.last() == Some(&("RangeVar", "relname"))));
    }

    #[test]
    fn walk_reaches_nested_variable_set_statements() {
        let all = strings("ALTER ROLE r SET search_path = a");
        assert!(all.iter().any(|(p, s)| s == "search_path" && p.last() == Some(&("VariableSetStmt", "name"))));
    }

    #[test]
    fn walk_stops_at_first_error() {
        let mut seen = 0;
        let r = walk_strings(&first_stmt("SELECT a, b, c FROM t"), &mut |_, s| {
            seen += 1;
            if s == "b" { Err(s.to_string()) } else { Ok(()) }
        });
        assert_eq!(r, Err(WalkError::Stopped("b".to_string())));
        assert!(seen >= 2);
    }
}
