// TEMP STUB
use crate::auth::identity::ActorContext;
use crate::protocol::sqlstate::SqlState;
pub struct Rewriter;
impl Rewriter {
    pub fn new(_c: usize) -> Self {
        Rewriter
    }
    pub fn rewrite(&self, sql: &str, _a: &ActorContext) -> Result<std::sync::Arc<Rewritten>, Refusal> {
        Ok(std::sync::Arc::new(Rewritten { sql: sql.to_owned(), statement_kinds: vec![] }))
    }
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    pub sql: String,
    pub statement_kinds: Vec<String>,
}
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Syntax(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Unverifiable(String),
    #[error("{0}")]
    TooComplex(String),
}
impl Refusal {
    pub fn sqlstate(&self) -> SqlState {
        SqlState::INSUFFICIENT_PRIVILEGE
    }
}
