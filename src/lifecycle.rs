//! The policy lifecycle: `policy dev` syncs local files to development, `policy deploy` promotes
//! development's bundle to production, `policy rollback` restores an older version, `policy
//! status` compares local files, development, production and the live catalog. Each returns
//! what it did (the facts that changed, `policy::describe`) for the command line to print.
//!
//! Invariant: nothing is published that does not compile and match the live catalog, and
//! production only ever receives a bundle that is (or was) development's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tokio_postgres::Client;

use crate::auth::identity::Environment;
use crate::catalog::{self, CatalogSnapshot};
use crate::policy::bundle::DeployedBundle;
use crate::policy::describe::{columns_named, describe, diff};
use crate::policy::store::{self, Published};
use crate::policy::{Bundle, Policies, PolicyErrors, PolicySet, TableScope};

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("invalid policies:\n{0}")]
    Policy(#[from] PolicyErrors),
    #[error(transparent)]
    Store(#[from] store::PolicyStoreError),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    #[error("the policies do not match the live database:\n{}", .0.join("\n"))]
    Catalog(Vec<String>),
    #[error("nothing is deployed to development yet: run `struere-proxy policy dev` first")]
    NothingInDevelopment,
    #[error("{env} has no version {version} (see `struere-proxy policy history --env {env}`)")]
    NoSuchVersion { env: Environment, version: i32 },
}

/// What a sync, deploy or rollback did: the version in force and the facts that changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub environment: Environment,
    pub published: Published,
    pub diff: Vec<String>,
}

/// `env`'s set of a bundle.
fn set_of(bundle: &Bundle, label: &Path, env: Environment) -> Result<PolicySet, PolicyErrors> {
    Ok(PolicySet::clone(bundle.compile(label)?.for_env(env)))
}

fn facts(set: Option<&PolicySet>) -> BTreeSet<String> {
    set.map(describe).unwrap_or_default()
}

fn deployed_set(d: Option<&DeployedBundle>) -> Result<Option<PolicySet>, PolicyErrors> {
    d.map(DeployedBundle::compile).transpose()
}

/// The bundle compiled, once every managed table of both sets is shown to exist in the live
/// catalog with the columns the policy needs.
fn compile_live(catalog: &CatalogSnapshot, bundle: &Bundle, label: &Path) -> Result<Policies, LifecycleError> {
    let policies = bundle.compile(label)?;
    catalog::check_policy(catalog, &policies.all_tables()).map_err(LifecycleError::Catalog)?;
    Ok(policies)
}

/// `policy dev`: validate the bundle (compile + live catalog) and make it development's.
/// Production never changes this way; the diff also shows what production's file in the
/// bundle would change at the next deploy.
pub async fn sync_development(client: &mut Client, bundle: &Bundle, label: &Path) -> Result<Change, LifecycleError> {
    let env = Environment::Development;
    let next = compile_live(&catalog::load(client).await?, bundle, label)?;
    let current = store::latest(client, env).await?;
    let now =
        current.as_ref().map(|c| c.bundle.compile(Path::new(&format!("development v{}", c.version)))).transpose()?;
    let mut changes = diff(&facts(now.as_ref().map(|p| &*p.development)), &describe(&next.development));
    for line in diff(&facts(now.as_ref().map(|p| &*p.production)), &describe(&next.production)) {
        changes.push(format!("{line}   [production.toml: takes effect at the next deploy]"));
    }
    let published = store::publish(client, env, bundle, "policy dev", &store::publisher()).await?;
    Ok(Change { environment: env, published, diff: changes })
}

/// What `policy deploy` would change in production (and the bundle it would publish).
pub async fn plan_deploy(client: &Client) -> Result<(DeployedBundle, Vec<String>), LifecycleError> {
    let dev = store::latest(client, Environment::Development).await?.ok_or(LifecycleError::NothingInDevelopment)?;
    let label = format!("development v{}", dev.version);
    let next = compile_live(&catalog::load(client).await?, &dev.bundle, Path::new(&label))?;
    let current = deployed_set(store::latest(client, Environment::Production).await?.as_ref())?;
    Ok((dev, diff(&facts(current.as_ref()), &describe(&next.production))))
}

/// `policy deploy`: promote development's bundle to production.
pub async fn deploy(client: &mut Client) -> Result<Change, LifecycleError> {
    let (dev, changes) = plan_deploy(client).await?;
    let source = format!("deploy of development v{}", dev.version);
    let published = store::publish(client, Environment::Production, &dev.bundle, &source, &store::publisher()).await?;
    Ok(Change { environment: Environment::Production, published, diff: changes })
}

/// What rolling `env` back to version `to` would change (and the bundle it would publish).
pub async fn plan_rollback(
    client: &Client,
    env: Environment,
    to: i32,
) -> Result<(DeployedBundle, Vec<String>), LifecycleError> {
    let target = store::version(client, env, to).await?.ok_or(LifecycleError::NoSuchVersion { env, version: to })?;
    let label = format!("{} v{to}", env.as_str());
    let restored = compile_live(&catalog::load(client).await?, &target.bundle, Path::new(&label))?;
    let current = deployed_set(store::latest(client, env).await?.as_ref())?;
    Ok((target, diff(&facts(current.as_ref()), &describe(restored.for_env(env)))))
}

/// `policy rollback`: make an older version of `env` the one in force (as a new version, so the
/// history keeps every step).
pub async fn rollback(client: &mut Client, env: Environment, to: i32) -> Result<Change, LifecycleError> {
    rollback_by(client, env, to, &store::publisher()).await
}

/// `rollback`, recorded in the history as made by `by` (the dashboard names itself).
pub async fn rollback_by(client: &mut Client, env: Environment, to: i32, by: &str) -> Result<Change, LifecycleError> {
    let (target, changes) = plan_rollback(client, env, to).await?;
    let published = store::publish(client, env, &target.bundle, &format!("rollback to v{to}"), by).await?;
    Ok(Change { environment: env, published, diff: changes })
}

/// One part of `policy status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub title: String,
    pub lines: Vec<String>,
    /// Whether its lines are differences to act on (`--exit-code`), or information.
    pub counted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    pub versions: Vec<String>,
    pub sections: Vec<Section>,
}

impl Status {
    pub fn differences(&self) -> usize {
        self.sections.iter().filter(|s| s.counted).map(|s| s.lines.len()).sum()
    }
}

/// `policy status`: local files (when given) vs development vs production, and the policies'
/// columns vs the live column sets of the environment-scoped tables.
pub async fn status(client: &Client, local: Option<(&Bundle, &Path)>) -> Result<Status, LifecycleError> {
    let dev = store::latest(client, Environment::Development).await?;
    let prod = store::latest(client, Environment::Production).await?;
    let mut status = Status::default();
    for (env, d) in [(Environment::Development, &dev), (Environment::Production, &prod)] {
        status.versions.push(match d {
            Some(d) => format!("{}: v{} ({})", env.as_str(), d.version, d.bundle.hash()),
            None => format!("{}: nothing deployed (its keys are refused)", env.as_str()),
        });
    }
    let dev_label = dev.as_ref().map(|d| format!("development v{}", d.version)).unwrap_or_default();
    let dev_sets = |env| dev.as_ref().map(|d| set_of(&d.bundle, Path::new(&dev_label), env)).transpose();
    let (dev_dev, dev_prod) = (dev_sets(Environment::Development)?, dev_sets(Environment::Production)?);
    let prod_prod = deployed_set(prod.as_ref())?;
    let mut all_sets: Vec<PolicySet> = [&dev_dev, &dev_prod, &prod_prod].into_iter().flatten().cloned().collect();

    if let Some((bundle, dir)) = local {
        let policies = bundle.compile(dir)?;
        let mut lines = diff(&facts(dev_dev.as_ref()), &describe(&policies.development));
        for line in diff(&facts(dev_prod.as_ref()), &describe(&policies.production)) {
            lines.push(format!("{line}   [production.toml]"));
        }
        status.sections.push(Section {
            title: format!("local files ({}) → development (what `policy dev` would sync)", dir.display()),
            lines,
            counted: true,
        });
        all_sets.push(PolicySet::clone(&policies.development));
        all_sets.push(PolicySet::clone(&policies.production));
    }
    status.sections.push(Section {
        title: "development → production (what `policy deploy` would change)".to_owned(),
        lines: diff(&facts(prod_prod.as_ref()), &facts(dev_prod.as_ref())),
        counted: true,
    });
    status.sections.push(Section {
        title: "development vs production as deployed (roles and rules that differ by design)".to_owned(),
        lines: diff(&facts(dev_dev.as_ref()), &facts(prod_prod.as_ref())),
        counted: false,
    });
    let (problems, info) = live_columns(&catalog::load(client).await?, &all_sets);
    status.sections.push(Section {
        title: "policies vs the live catalog (tables and columns the policies name)".to_owned(),
        lines: problems,
        counted: true,
    });
    status.sections.push(Section {
        title: "live column sets of the environment-scoped tables".to_owned(),
        lines: info,
        counted: false,
    });
    Ok(status)
}

/// Problems (a managed table or a named column missing) and, per environment-scoped table, its
/// live columns with those no policy names.
fn live_columns(catalog: &CatalogSnapshot, sets: &[PolicySet]) -> (Vec<String>, Vec<String>) {
    let mut named: BTreeMap<(String, String), (TableScope, BTreeSet<String>)> = BTreeMap::new();
    for set in sets {
        for spec in set.tables.by_name.values() {
            let entry = named.entry((spec.schema.clone(), spec.name.clone())).or_insert((spec.scope, BTreeSet::new()));
            entry.1.extend(columns_named(set, &spec.name));
        }
    }
    let (mut problems, mut info) = (Vec::new(), Vec::new());
    for ((schema, name), (scope, cols)) in named {
        let Some(rel) = catalog.relation(&schema, &name) else {
            problems.push(format!("{schema}.{name}: a policy manages it, but the table does not exist"));
            continue;
        };
        for c in cols.iter().filter(|c| rel.column(c).is_none()) {
            problems.push(format!("{schema}.{name}: a policy names column {c}, which the table lacks"));
        }
        if scope != TableScope::Environment {
            continue;
        }
        let live: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
        info.push(format!("{schema}.{name}: {}", live.join(", ")));
        let unnamed: Vec<&str> = live.iter().copied().filter(|c| !cols.contains(*c)).collect();
        if !unnamed.is_empty() {
            info.push(format!(
                "{schema}.{name}: named by no field list: {} (hidden from roles with field lists; visible to roles \
                 with fields = [\"*\"])",
                unnamed.join(", ")
            ));
        }
    }
    (problems, info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_columns_reports_missing_tables_columns_and_unnamed_columns() {
        let policies = crate::policy::shipped().unwrap();
        let mut snap = crate::catalog::demo::snapshot();
        let sets = [PolicySet::clone(&policies.development)];
        let (problems, info) = live_columns(&snap, &sets);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(info.iter().any(|l| l.starts_with("public.entities: id, ")), "{info:?}");
        // A column the policies name disappears; a table disappears.
        snap.relations.retain(|(_, name), _| name != "trigger_runs");
        if let Some(rel) = snap.relations.get_mut(&("public".to_owned(), "entities".to_owned())) {
            rel.columns.retain(|c| c.name != "entity_type");
        }
        let (problems, _) = live_columns(&snap, &sets);
        assert!(
            problems.contains(&"public.trigger_runs: a policy manages it, but the table does not exist".to_owned())
        );
        assert!(
            problems.contains(&"public.entities: a policy names column entity_type, which the table lacks".to_owned()),
            "{problems:?}"
        );
    }
}
