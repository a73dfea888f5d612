//! Per-user channel permissions: policy files (`policies/*.toml`) parsed
//! and compiled at load into rules of [`Pattern`]s, the decision (default
//! deny, deny wins), and the reloadable [`PolicyStore`].
//!
//! A reload reads every file, compiles them all, and only then swaps the
//! set; any error keeps the old set and names the file, line and reason.
//! Sessions learn of a swap through a `watch` channel and re-check their
//! subscriptions themselves.

pub mod pattern;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use serde::Deserialize;
use tokio::sync::watch;

use crate::channel::ChannelName;
use crate::identity::Identity;
pub use pattern::Pattern;

/// The shipped `policies/default.toml`, written by `serve --dev` when the
/// policy directory is missing.
pub const DEFAULT_POLICY: &str = include_str!("../../policies/default.toml");

/// What a client asks to do with a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subscribe => "subscribe",
            Self::Publish => "publish",
        }
    }
}

/// Patterns per action.
#[derive(Debug, Clone, Default)]
pub struct Patterns {
    pub subscribe: Vec<Pattern>,
    pub publish: Vec<Pattern>,
}

impl Patterns {
    fn get(&self, action: Action) -> &[Pattern] {
        match action {
            Action::Subscribe => &self.subscribe,
            Action::Publish => &self.publish,
        }
    }

    fn is_empty(&self) -> bool {
        self.subscribe.is_empty() && self.publish.is_empty()
    }
}

/// One compiled rule: who it applies to and what it allows and denies.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    /// Where it was written: `file:line`.
    pub origin: String,
    /// Applies to users holding any of these roles; empty: every user.
    pub roles: Vec<String>,
    /// Applies only when every named claim equals one of its values.
    pub claims: Vec<(String, Vec<String>)>,
    pub allow: Patterns,
    pub deny: Patterns,
}

impl Rule {
    /// Whether the rule applies to `who` (roles any-of, claims all-of).
    pub fn applies_to(&self, who: &Identity) -> bool {
        let role_ok = self.roles.is_empty() || self.roles.iter().any(|r| who.roles.contains(r));
        role_ok
            && self.claims.iter().all(|(name, values)| {
                who.claims
                    .get(name)
                    .and_then(claim_text)
                    .is_some_and(|actual| values.iter().any(|v| *v == *actual))
            })
    }
}

/// A claim as text for comparisons: strings as they are, integers and
/// booleans in their JSON spelling; anything else has no text.
pub fn claim_text(value: &serde_json::Value) -> Option<std::borrow::Cow<'_, str>> {
    use serde_json::Value;
    match value {
        Value::String(s) => Some(s.as_str().into()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string().into()),
        Value::Bool(b) => Some(b.to_string().into()),
        _ => None,
    }
}

/// Why a request was allowed or denied.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'a> {
    pub allowed: bool,
    /// The deciding rule and pattern; `None` for the default deny.
    pub by: Option<(&'a Rule, &'a Pattern)>,
}

impl fmt::Display for Decision<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.allowed, self.by) {
            (true, Some((rule, p))) => {
                write!(
                    f,
                    "allowed by rule {:?} ({}), pattern {p}",
                    rule.name, rule.origin
                )
            }
            (false, Some((rule, p))) => {
                write!(
                    f,
                    "denied by rule {:?} ({}), pattern {p}",
                    rule.name, rule.origin
                )
            }
            (_, None) => f.write_str("denied: no rule allows it (default deny)"),
        }
    }
}

fn matching<'a>(
    list: &'a Patterns,
    action: Action,
    channel: &ChannelName,
    who: &Identity,
) -> Vec<&'a Pattern> {
    list.get(action)
        .iter()
        .filter(|p| p.matches(channel, who))
        .collect()
}

/// How one rule relates to one request (see [`PolicySet::trace`]).
#[derive(Debug, Clone)]
pub struct RuleTrace<'a> {
    pub rule: &'a Rule,
    pub applies: bool,
    /// Its allow patterns for the action that match the channel.
    pub allow: Vec<&'a Pattern>,
    /// Its deny patterns for the action that match the channel.
    pub deny: Vec<&'a Pattern>,
}

/// A compiled set of rules from one directory.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub rules: Vec<Rule>,
    pub files: Vec<PathBuf>,
}

impl PolicySet {
    /// Decides `action` on `channel` for `who`: denied if any applicable
    /// rule denies it, else allowed if one allows it, else denied.
    pub fn decide(&self, who: &Identity, action: Action, channel: &ChannelName) -> Decision<'_> {
        let mut allowed_by = None;
        for rule in self.rules.iter().filter(|r| r.applies_to(who)) {
            if let Some(p) = rule
                .deny
                .get(action)
                .iter()
                .find(|p| p.matches(channel, who))
            {
                return Decision {
                    allowed: false,
                    by: Some((rule, p)),
                };
            }
            if allowed_by.is_none() {
                allowed_by = rule
                    .allow
                    .get(action)
                    .iter()
                    .find(|p| p.matches(channel, who))
                    .map(|p| (rule, p));
            }
        }
        Decision {
            allowed: allowed_by.is_some(),
            by: allowed_by,
        }
    }

    /// Every rule with whether it applies to `who` and which of its
    /// patterns for `action` match `channel`: what `policy explain` prints.
    pub fn trace(
        &self,
        who: &Identity,
        action: Action,
        channel: &ChannelName,
    ) -> Vec<RuleTrace<'_>> {
        self.rules
            .iter()
            .map(|rule| RuleTrace {
                rule,
                applies: rule.applies_to(who),
                allow: matching(&rule.allow, action, channel, who),
                deny: matching(&rule.deny, action, channel, who),
            })
            .collect()
    }

    pub fn allows(&self, who: &Identity, action: Action, channel: &ChannelName) -> bool {
        self.decide(who, action, channel).allowed
    }

    /// Reads and compiles every `*.toml` file in `dir`, in name order.
    ///
    /// # Errors
    /// The first problem, with its file and line.
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyError> {
        let files = policy_files(dir)?;
        if files.is_empty() {
            return Err(PolicyError::Empty(dir.to_owned()));
        }
        let mut set = Self::default();
        for file in &files {
            let text = std::fs::read_to_string(file).map_err(|e| PolicyError::Io {
                path: file.clone(),
                message: e.to_string(),
            })?;
            set.rules.extend(compile_file(file, &text)?);
        }
        set.files = files;
        Ok(set)
    }
}

/// Why a policy directory was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{0}: no .toml policy files")]
    Empty(PathBuf),
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let entries = std::fs::read_dir(dir).map_err(|e| PolicyError::Io {
        path: dir.to_owned(),
        message: e.to_string(),
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

// ---- file format -------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    rule: Vec<toml::Spanned<RuleDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    name: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    claims: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    allow: ActionsDoc,
    #[serde(default)]
    deny: ActionsDoc,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(Scalar),
    Many(Vec<Scalar>),
}

/// A claim value in a policy file: a string, integer or boolean.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Integer(i64),
    Bool(bool),
}

impl Scalar {
    fn into_text(self) -> String {
        match self {
            Self::Text(s) => s,
            Self::Integer(n) => n.to_string(),
            Self::Bool(b) => b.to_string(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ActionsDoc {
    #[serde(default)]
    subscribe: Vec<toml::Spanned<String>>,
    #[serde(default)]
    publish: Vec<toml::Spanned<String>>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Parses and compiles one file's rules.
///
/// # Errors
/// Invalid TOML, unknown keys, bad patterns, or an empty rule, with the line.
pub fn compile_file(path: &Path, text: &str) -> Result<Vec<Rule>, PolicyError> {
    let invalid = |offset: usize, message: String| PolicyError::Invalid {
        path: path.to_owned(),
        line: line_of(text, offset),
        message,
    };
    let doc: FileDoc = toml::from_str(text)
        .map_err(|e| invalid(e.span().map_or(0, |s| s.start), e.message().to_owned()))?;
    let mut rules = Vec::with_capacity(doc.rule.len());
    for spanned in doc.rule {
        let start = spanned.span().start;
        let rule = spanned.into_inner();
        let compile = |list: Vec<toml::Spanned<String>>| -> Result<Vec<Pattern>, PolicyError> {
            list.into_iter()
                .map(|p| {
                    let offset = p.span().start;
                    Pattern::parse(p.get_ref()).map_err(|m| invalid(offset, m))
                })
                .collect()
        };
        let allow = Patterns {
            subscribe: compile(rule.allow.subscribe)?,
            publish: compile(rule.allow.publish)?,
        };
        let deny = Patterns {
            subscribe: compile(rule.deny.subscribe)?,
            publish: compile(rule.deny.publish)?,
        };
        if allow.is_empty() && deny.is_empty() {
            return Err(invalid(
                start,
                format!("rule {:?} allows and denies nothing", rule.name),
            ));
        }
        rules.push(Rule {
            origin: format!("{}:{}", path.display(), line_of(text, start)),
            name: rule.name,
            roles: rule.roles,
            claims: rule
                .claims
                .into_iter()
                .map(|(k, v)| match v {
                    OneOrMany::One(s) => (k, vec![s.into_text()]),
                    OneOrMany::Many(list) => (k, list.into_iter().map(Scalar::into_text).collect()),
                })
                .collect(),
            allow,
            deny,
        });
    }
    Ok(rules)
}

// ---- the reloadable store ----------------------------------------------------

/// The live policy set, swapped whole on reload.
#[derive(Debug)]
pub struct PolicyStore {
    dir: PathBuf,
    current: RwLock<Arc<PolicySet>>,
    generation: watch::Sender<u64>,
}

impl PolicyStore {
    /// Loads `dir` for the first time.
    ///
    /// # Errors
    /// As [`PolicySet::load_dir`].
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let set = PolicySet::load_dir(dir)?;
        Ok(Self::with_set(dir, set))
    }

    /// A store around an already compiled set.
    pub fn with_set(dir: &Path, set: PolicySet) -> Self {
        Self {
            dir: dir.to_owned(),
            current: RwLock::new(Arc::new(set)),
            generation: watch::channel(0).0,
        }
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<PolicySet> {
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Notified after every successful swap.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Re-reads the directory; on success swaps the set and tells the
    /// sessions, returning how many rules are now in force.
    ///
    /// # Errors
    /// As [`PolicySet::load_dir`]; the old set stays in force.
    pub fn reload(&self) -> Result<usize, PolicyError> {
        let set = PolicySet::load_dir(&self.dir)?;
        let count = set.rules.len();
        {
            let mut guard = match self.current.write() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            *guard = Arc::new(set);
        }
        self.generation.send_modify(|g| *g += 1);
        Ok(count)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// What a directory looks like now (names, sizes, modification times,
/// following symlinks), to notice edits by polling.
pub fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let path = e.path();
            let meta = std::fs::metadata(&path).ok()?;
            Some((path, meta.len(), meta.modified().ok()))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(user: &str, roles: &[&str], claims: serde_json::Value) -> Identity {
        Identity {
            issued_at: None,
            user: user.into(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            expires_at: 0,
            claims: claims.as_object().cloned().unwrap_or_default(),
        }
    }

    fn ch(name: &str) -> ChannelName {
        ChannelName::parse(name).unwrap()
    }

    const DEFAULT: &str = DEFAULT_POLICY;

    fn default_set() -> PolicySet {
        PolicySet {
            rules: compile_file(Path::new("default.toml"), DEFAULT).unwrap(),
            files: vec![],
        }
    }

    #[test]
    fn the_shipped_default_policy() {
        let set = default_set();
        let member = who("alice", &["member"], serde_json::json!({}));
        let admin = who("root", &["admin", "member"], serde_json::json!({}));
        let nobody = who("eve", &[], serde_json::json!({}));
        use Action::*;
        assert!(set.allows(&member, Subscribe, &ch("chat:lobby")));
        assert!(set.allows(&member, Publish, &ch("chat:lobby")));
        assert!(!set.allows(&nobody, Subscribe, &ch("chat:lobby")));
        assert!(set.allows(&member, Subscribe, &ch("user:alice")));
        assert!(set.allows(&nobody, Subscribe, &ch("user:eve")));
        assert!(!set.allows(&member, Subscribe, &ch("user:bob")));
        assert!(set.allows(&member, Subscribe, &ch("announce:all")));
        assert!(!set.allows(&member, Publish, &ch("announce:all")));
        assert!(set.allows(&admin, Publish, &ch("announce:all")));
        assert!(!set.allows(&member, Subscribe, &ch("secret")));
    }

    #[test]
    fn deny_wins_and_claims_must_all_match() {
        let text = r#"
[[rule]]
name = "acme reads"
claims = { tenant = "acme", plan = ["pro", "team"], verified = true, level = 3 }
allow.subscribe = ["t:{claim.tenant}:>"]

[[rule]]
name = "muted"
roles = ["muted"]
deny.subscribe = ["t:*:private"]
"#;
        let set = PolicySet {
            rules: compile_file(Path::new("p.toml"), text).unwrap(),
            files: vec![],
        };
        let claims = |plan: &str| serde_json::json!({"tenant": "acme", "plan": plan, "verified": true, "level": 3});
        let pro = who("a", &[], claims("pro"));
        let free = who("b", &[], claims("free"));
        let muted = who("c", &["muted"], claims("team"));
        let unverified = who(
            "d",
            &[],
            serde_json::json!({"tenant": "acme", "plan": "pro", "level": 3}),
        );
        assert!(!set.allows(&unverified, Action::Subscribe, &ch("t:acme:news")));
        assert!(set.allows(&pro, Action::Subscribe, &ch("t:acme:news")));
        assert!(!set.allows(&pro, Action::Subscribe, &ch("t:other:news")));
        assert!(!set.allows(&free, Action::Subscribe, &ch("t:acme:news")));
        assert!(set.allows(&muted, Action::Subscribe, &ch("t:acme:news")));
        let d = set.decide(&muted, Action::Subscribe, &ch("t:acme:private"));
        assert!(!d.allowed);
        assert_eq!(d.by.unwrap().0.name, "muted");
        assert!(d.to_string().contains("p.toml:7"), "{d}");
        let d = set.decide(&pro, Action::Publish, &ch("t:acme:news"));
        assert_eq!(d.to_string(), "denied: no rule allows it (default deny)");
    }

    #[test]
    fn errors_name_file_and_line() {
        let bad_pattern = "[[rule]]\nname = \"x\"\n\nallow.subscribe = [\"ok\", \"a:>:b\"]\n";
        let e = compile_file(Path::new("f.toml"), bad_pattern).unwrap_err();
        assert!(e.to_string().starts_with("f.toml:4: "), "{e}");
        let unknown = "[[rule]]\nname = \"x\"\nallw.subscribe = [\"a\"]\n";
        let e = compile_file(Path::new("f.toml"), unknown).unwrap_err();
        assert!(e.to_string().starts_with("f.toml:3: "), "{e}");
        let empty = "[[rule]]\nname = \"x\"\nroles = [\"a\"]\n";
        let e = compile_file(Path::new("f.toml"), empty).unwrap_err();
        assert!(e.to_string().contains("allows and denies nothing"), "{e}");
        let syntax = "[[rule]\n";
        assert!(compile_file(Path::new("f.toml"), syntax).is_err());
    }

    #[test]
    fn reload_keeps_the_old_set_on_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), DEFAULT).unwrap();
        let store = PolicyStore::load(dir.path()).unwrap();
        let changes = store.changes();
        let before = store.current().rules.len();
        std::fs::write(dir.path().join("b.toml"), "[[rule]]\nname = 1\n").unwrap();
        assert!(store.reload().is_err());
        assert_eq!(store.current().rules.len(), before);
        assert!(!changes.has_changed().unwrap());
        std::fs::write(
            dir.path().join("b.toml"),
            "[[rule]]\nname = \"more\"\nallow.subscribe = [\"x\"]\n",
        )
        .unwrap();
        assert_eq!(store.reload().unwrap(), before + 1);
        assert!(changes.has_changed().unwrap());
    }
}
