//! Rules: what the proxy changes in requests and responses, as read from TOML or JSON.
//!
//! A rules file is a list of `[[rule]]` tables and an optional `[cache]` table:
//!
//! ```toml
//! [cache]
//! enabled = true
//! ttl_secs = 300
//! max_entries = 1000
//!
//! [[rule]]
//! name = "cool"
//! paths = ["/v1/chat/completions"]
//! model = "gemma.*"
//! action = { type = "clamp", key = "temperature", min = 0.0, max = 0.7 }
//!
//! [[rule]]
//! name = "no-secrets"
//! [rule.action]
//! type = "redact"
//! pattern = "sk-[a-z0-9]{8}"
//! regex = true
//! mask = "*"
//! ```
//!
//! The JSON form of one rule (the admin API's body) has the same shape as one `[[rule]]`
//! table. Unknown fields are refused everywhere, and the error names them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The paths rules apply to when they name none: the generation endpoints.
pub const GENERATION_PATHS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/completion"];

/// Longest match, in bytes, assumed for a regex whose matches have no upper bound, when a
/// streamed response is filtered: a longer match that straddles chunks is not found whole.
pub const UNBOUNDED_MATCH_WINDOW: usize = 1024;

/// An ordered, named set of rules plus the cache settings, as read from a rules file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    /// The response cache settings, when the file gives them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSettings>,
    #[serde(default, rename = "rule")]
    rules: Vec<Rule>,
}

/// One rule: where it applies and what it does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A name unique in its set.
    pub name: String,
    /// A disabled rule is kept but not applied.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Request paths it applies to (exact); the generation paths when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    /// The request's `model` it applies to: an exact name or a regex matched against the
    /// whole name. Any model (even none) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// What it does.
    pub action: Action,
}

fn default_true() -> bool {
    true
}

/// What a rule does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Sets a top-level request key when the request does not give it.
    Set {
        /// The key.
        key: String,
        /// Its value.
        value: serde_json::Value,
    },
    /// Sets a top-level request key whatever the request gives.
    Override {
        /// The key.
        key: String,
        /// Its value.
        value: serde_json::Value,
    },
    /// Clamps a numeric request key into `min..=max` when the request gives it.
    Clamp {
        /// The key.
        key: String,
        /// Lower bound.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<f64>,
        /// Upper bound.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<f64>,
    },
    /// Injects a system prompt: a system message for chat requests, a prompt prefix for
    /// completion requests.
    SystemPrompt {
        /// The text.
        text: String,
        /// How it combines with a system message the request already has.
        #[serde(default)]
        mode: PromptMode,
    },
    /// Adds token biases to the request's `logit_bias`.
    LogitBias {
        /// Token id (as a string, as in TOML keys and JSON objects) to bias.
        bias: BTreeMap<String, f32>,
    },
    /// Redacts matches in generated text, whole and streamed.
    Redact {
        /// A literal string, or a regex when `regex` is true.
        pattern: String,
        /// Whether `pattern` is a regex.
        #[serde(default)]
        regex: bool,
        /// The replacement text (regex replacements may use `$1` and `${name}`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replacement: Option<String>,
        /// A character that replaces every character of a match.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mask: Option<char>,
    },
    /// Ends a streamed response early, cleanly, with a final event.
    StopStream {
        /// Stop after this many text chunks.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after_chunks: Option<u64>,
        /// Stop once the text holds this pattern (kept up to the end of the match).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pattern: Option<String>,
        /// Whether `pattern` is a regex.
        #[serde(default)]
        regex: bool,
    },
}

/// How an injected system prompt combines with an existing system message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptMode {
    /// Always a new first message.
    #[default]
    Prepend,
    /// Merged in front of the first message's text when it is a system message, a new
    /// first message otherwise.
    Merge,
}

/// Settings of the response cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    /// Whether deterministic requests are answered from the cache.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How long an entry lives, in seconds.
    #[serde(default = "default_ttl")]
    pub ttl_secs: u64,
    /// How many entries it holds at most.
    #[serde(default = "default_max_entries")]
    pub max_entries: u64,
}

fn default_ttl() -> u64 {
    300
}

fn default_max_entries() -> u64 {
    1000
}

impl Default for CacheSettings {
    /// Disabled, 300 s, 1000 entries.
    fn default() -> CacheSettings {
        CacheSettings {
            enabled: false,
            ttl_secs: default_ttl(),
            max_entries: default_max_entries(),
        }
    }
}

impl CacheSettings {
    /// Checks the bounds: a TTL of at least one second and at least one entry.
    pub fn validate(&self) -> Result<()> {
        if self.ttl_secs == 0 || self.max_entries == 0 {
            return Err(Error::BadRequest(
                "cache: ttl_secs and max_entries must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

impl RuleSet {
    /// A set of rules, checked as [`RuleSet::from_toml_str`] checks them.
    pub fn new(rules: Vec<Rule>, cache: Option<CacheSettings>) -> Result<RuleSet> {
        let set = RuleSet { cache, rules };
        set.validate()?;
        Ok(set)
    }

    /// Parses and checks a rules file. Errors name the offending field or rule.
    pub fn from_toml_str(text: &str) -> Result<RuleSet> {
        let set: RuleSet = toml::from_str(text).map_err(|e| Error::Rules(e.to_string()))?;
        set.validate()?;
        Ok(set)
    }

    /// The set as a rules file.
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Rules(e.to_string()))
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Checks every rule (as [`Rule::validate`]) and that names are unique.
    pub fn validate(&self) -> Result<()> {
        if let Some(cache) = &self.cache {
            cache.validate()?;
        }
        let mut names = std::collections::HashSet::new();
        for rule in &self.rules {
            rule.validate()?;
            if !names.insert(rule.name.as_str()) {
                return Err(Error::DuplicateRule(rule.name.clone()));
            }
        }
        Ok(())
    }

    /// The rule with this name.
    pub fn get(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// Appends a rule; refuses a duplicate name.
    pub fn push(&mut self, rule: Rule) -> Result<()> {
        rule.validate()?;
        if self.get(&rule.name).is_some() {
            return Err(Error::DuplicateRule(rule.name));
        }
        self.rules.push(rule);
        Ok(())
    }

    /// Replaces the rule named `name` in place (the new rule may carry a new name, as
    /// long as no other rule has it).
    pub fn replace(&mut self, name: &str, rule: Rule) -> Result<()> {
        rule.validate()?;
        let index = self.index(name)?;
        if rule.name != name && self.get(&rule.name).is_some() {
            return Err(Error::DuplicateRule(rule.name));
        }
        self.rules[index] = rule;
        Ok(())
    }

    /// Removes the rule named `name` and returns it.
    pub fn remove(&mut self, name: &str) -> Result<Rule> {
        let index = self.index(name)?;
        Ok(self.rules.remove(index))
    }

    /// Enables or disables the rule named `name`.
    pub fn set_enabled(&mut self, name: &str, enabled: bool) -> Result<()> {
        let index = self.index(name)?;
        self.rules[index].enabled = enabled;
        Ok(())
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.rules
            .iter()
            .position(|r| r.name == name)
            .ok_or_else(|| Error::NoSuchRule(name.to_owned()))
    }
}

impl Rule {
    /// Parses one rule from JSON (the admin API's body). Errors name the offending field.
    pub fn from_json_slice(bytes: &[u8]) -> Result<Rule> {
        let rule: Rule = serde_json::from_slice(bytes).map_err(|e| Error::Rules(e.to_string()))?;
        rule.validate()?;
        Ok(rule)
    }

    /// Checks what serde cannot: a name, valid regexes, sensible bounds. Compiling the
    /// rule (which the proxy does) repeats none of these checks' failures.
    pub fn validate(&self) -> Result<()> {
        crate::patcher::CompiledRule::compile(self, crate::stats::RuleStats::detached()).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_error(text: &str, expected: &str) {
        let error = RuleSet::from_toml_str(text).expect_err("should be refused");
        let message = error.to_string();
        assert!(
            message.contains(expected),
            "error {message:?} does not mention {expected:?}"
        );
    }

    const FULL: &str = r##"
[cache]
enabled = true
ttl_secs = 60
max_entries = 10

[[rule]]
name = "default-temp"
action = { type = "set", key = "temperature", value = 0.2 }

[[rule]]
name = "seed"
paths = ["/completion"]
model = "gemma.*"
action = { type = "override", key = "seed", value = 42 }

[[rule]]
name = "cool"
enabled = false
action = { type = "clamp", key = "temperature", max = 0.5 }

[[rule]]
name = "persona"
action = { type = "system_prompt", text = "Be brief.", mode = "merge" }

[[rule]]
name = "ban"
action = { type = "logit_bias", bias = { "15" = -100.0, "7" = 2.5 } }

[[rule]]
name = "keys"
[rule.action]
type = "redact"
pattern = "sk-[0-9]+"
regex = true
mask = "#"

[[rule]]
name = "short"
action = { type = "stop_stream", after_chunks = 3, pattern = "END" }
"##;

    #[test]
    fn full_file_round_trips() {
        let set = RuleSet::from_toml_str(FULL).unwrap();
        assert_eq!(set.rules().len(), 7);
        assert_eq!(
            set.cache,
            Some(CacheSettings {
                enabled: true,
                ttl_secs: 60,
                max_entries: 10
            })
        );
        assert!(!set.rules()[2].enabled);
        assert_eq!(
            set.rules()[1].paths.as_deref(),
            Some(&["/completion".to_owned()][..])
        );
        assert_eq!(
            set.rules()[3].action,
            Action::SystemPrompt {
                text: "Be brief.".into(),
                mode: PromptMode::Merge
            }
        );
        let again = RuleSet::from_toml_str(&set.to_toml_string().unwrap()).unwrap();
        assert_eq!(again, set);
        // The JSON form of a rule is the TOML table's shape.
        let json = serde_json::to_vec(&set.rules()[5]).unwrap();
        assert_eq!(Rule::from_json_slice(&json).unwrap(), set.rules()[5]);
    }

    #[test]
    fn unknown_fields_are_named() {
        check_error(
            "[[rule]]\nname = \"a\"\ncolour = 1\naction = { type = \"set\", key = \"k\", value = 1 }",
            "colour",
        );
        check_error(
            "[[rule]]\nname = \"a\"\naction = { type = \"set\", key = \"k\", value = 1, extra = 2 }",
            "extra",
        );
        check_error("[cache]\nttl = 3\n", "ttl");
        check_error("[[rules]]\nname = \"a\"\n", "rules");
        check_error(
            "[[rule]]\nname = \"a\"\naction = { type = \"explode\" }",
            "explode",
        );
        let error = Rule::from_json_slice(
            br#"{"name":"a","action":{"type":"set","key":"k","value":1},"when":1}"#,
        )
        .unwrap_err();
        assert!(error.to_string().contains("when"), "{error}");
    }

    #[test]
    fn unusable_rules_are_refused() {
        check_error(
            "[[rule]]\nname = \"\"\naction = { type = \"set\", key = \"k\", value = 1 }",
            "name",
        );
        check_error(
            "[[rule]]\nname = \"a\"\naction = { type = \"redact\", pattern = \"(\", regex = true, mask = \"*\" }",
            "regex",
        );
        check_error(
            "[[rule]]\nname = \"a\"\naction = { type = \"redact\", pattern = \"x*\", regex = true, mask = \"*\" }",
            "empty",
        );
        check_error(
            "[[rule]]\nname = \"a\"\naction = { type = \"redact\", pattern = \"x\", mask = \"*\", replacement = \"y\" }",
            "replacement",
        );
        check_error(
            "[[rule]]\nname = \"a\"\naction = { type = \"clamp\", key = \"t\", min = 2.0, max = 1.0 }",
            "min",
        );
        check_error(
            "[[rule]]\nname = \"a\"\naction = { type = \"logit_bias\", bias = { \"x\" = 1.0 } }",
            "token id",
        );
        check_error(
            "[[rule]]\nname = \"a\"\naction = { type = \"stop_stream\" }",
            "after_chunks",
        );
        check_error(
            "[[rule]]\nname = \"a\"\nmodel = \"[\"\naction = { type = \"set\", key = \"k\", value = 1 }",
            "model",
        );
        check_error(
            "[[rule]]\nname = \"a\"\naction = { type = \"set\", key = \"k\", value = 1 }\n[[rule]]\nname = \"a\"\naction = { type = \"set\", key = \"k\", value = 1 }",
            "already exists",
        );
        check_error("[cache]\nttl_secs = 0\n", "ttl_secs");
    }

    #[test]
    fn set_edits_keep_names_unique() {
        let mut set = RuleSet::from_toml_str(FULL).unwrap();
        let rule = set.rules()[0].clone();
        assert!(matches!(
            set.push(rule.clone()),
            Err(Error::DuplicateRule(_))
        ));
        let mut renamed = rule.clone();
        renamed.name = "seed".into();
        assert!(matches!(
            set.replace("default-temp", renamed),
            Err(Error::DuplicateRule(_))
        ));
        set.set_enabled("cool", true).unwrap();
        assert!(set.get("cool").unwrap().enabled);
        assert!(matches!(set.remove("nope"), Err(Error::NoSuchRule(_))));
        assert_eq!(set.remove("cool").unwrap().name, "cool");
        assert_eq!(set.rules().len(), 6);
    }
}
