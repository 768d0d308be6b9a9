//! The rules file: conditions on transaction fields and named features, each with an action,
//! a priority, a reason code and a text. Parsed and type-checked once (at start, or on a
//! reload), then evaluated per transaction without allocating. Pure.
//!
//! ```toml
//! version = "rules-2026-11-22"
//! on-model-failure = "review"          # decision when the model cannot score and no rule fires
//!
//! [[rule]]
//! code = "blocklisted-email"
//! when = "email_blocklisted == 1"
//! action = "decline"                   # approve | review | decline
//! priority = 100                       # higher first; default 0
//! text = "The e-mail address is on the blocklist ({blocklist.email})."
//! ```
//!
//! `when` is an expression: numbers, "text", names, comparisons (`== != < <= > >=`), set
//! membership (`merchant_category in ["misc_net", "shopping_net"]`, `not in`), `and`, `or`,
//! `not` and parentheses. A name is a feature of the registry (a number; a bare number counts
//! as true when it is not 0) or one of the text fields in [`TextField`]; a text field the
//! transaction does not carry makes every comparison on it false. `text` may quote values:
//! `{amount}`, `{merchant_category}`, and `{blocklist.<entity>}` for the blocklist entry that
//! matched (its reference and reason).

use std::borrow::Cow;
use std::path::Path;

use serde::Deserialize;

use super::Decision;
use crate::decode::Transaction;
use crate::features::{Entity, FeatureSet};

/// A rules file that cannot be used, with the rule and the reason.
#[derive(Debug, thiserror::Error)]
#[error("rules file {path}: {message}")]
pub struct RulesError {
    pub path: String,
    pub message: String,
}

/// Text fields of a transaction that rules can test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextField {
    CustomerId,
    MerchantId,
    MerchantCategory,
    Currency,
    Channel,
    CustomerState,
    EmailDomain,
}

impl TextField {
    const ALL: [(&'static str, TextField); 7] = [
        ("customer_id", TextField::CustomerId),
        ("merchant_id", TextField::MerchantId),
        ("merchant_category", TextField::MerchantCategory),
        ("currency", TextField::Currency),
        ("channel", TextField::Channel),
        ("customer_state", TextField::CustomerState),
        ("email_domain", TextField::EmailDomain),
    ];

    /// The field's value; the e-mail domain in lower case.
    fn get(self, tx: &Transaction) -> Option<Cow<'_, str>> {
        let s = match self {
            TextField::CustomerId => Some(tx.customer_id.as_str()),
            TextField::MerchantId => Some(tx.merchant_id.as_str()),
            TextField::MerchantCategory => tx.merchant_category.as_deref(),
            TextField::Currency => Some(tx.currency.as_str()),
            TextField::Channel => tx.channel.as_deref(),
            TextField::CustomerState => tx.customer_state.as_deref(),
            TextField::EmailDomain => {
                let d = tx
                    .email
                    .as_deref()
                    .and_then(crate::state::global::email_domain)?;
                return Some(if d.bytes().any(|b| b.is_ascii_uppercase()) {
                    Cow::Owned(d.to_ascii_lowercase())
                } else {
                    Cow::Borrowed(d)
                });
            }
        };
        s.map(Cow::Borrowed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn holds(self, o: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            Cmp::Eq => o == Equal,
            Cmp::Ne => o != Equal,
            Cmp::Lt => o == Less,
            Cmp::Le => o != Greater,
            Cmp::Gt => o == Greater,
            Cmp::Ge => o != Less,
        }
    }
}

/// A typed operand: numbers are features (by column in the rule set's [`FeatureSet`]) or
/// constants; text is a field or a constant.
#[derive(Debug, Clone, PartialEq)]
enum Num {
    Feature(usize),
    Const(f64),
}

#[derive(Debug, Clone, PartialEq)]
enum Text {
    Field(TextField),
    Const(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Cond {
    Const(bool),
    /// A number that is not 0.
    Truthy(Num),
    NumCmp(Num, Cmp, Num),
    TextCmp(Text, Cmp, Text),
    NumIn(Num, Vec<f64>, bool),
    TextIn(Text, Vec<String>, bool),
    And(Vec<Cond>),
    Or(Vec<Cond>),
    Not(Box<Cond>),
}

/// What a transaction offers to rules: itself and the rule set's feature values.
pub struct Inputs<'a> {
    pub tx: &'a Transaction,
    /// One value per feature of [`RuleSet::features`], in its order.
    pub features: &'a [f32],
}

impl Num {
    fn value(&self, i: &Inputs<'_>) -> f64 {
        match self {
            Num::Feature(c) => f64::from(i.features[*c]),
            Num::Const(v) => *v,
        }
    }
}

impl Text {
    fn value<'a>(&'a self, i: &Inputs<'a>) -> Option<Cow<'a, str>> {
        match self {
            Text::Field(f) => f.get(i.tx),
            Text::Const(s) => Some(Cow::Borrowed(s)),
        }
    }
}

impl Cond {
    fn eval(&self, i: &Inputs<'_>) -> bool {
        match self {
            Cond::Const(b) => *b,
            Cond::Truthy(n) => n.value(i) != 0.0,
            Cond::NumCmp(a, op, b) => a
                .value(i)
                .partial_cmp(&b.value(i))
                .is_some_and(|o| op.holds(o)),
            Cond::TextCmp(a, op, b) => match (a.value(i), b.value(i)) {
                (Some(x), Some(y)) => op.holds(x.cmp(&y)),
                _ => false,
            },
            Cond::NumIn(a, set, negated) => {
                let v = a.value(i);
                set.contains(&v) != *negated
            }
            Cond::TextIn(a, set, negated) => match a.value(i) {
                Some(v) => set.iter().any(|s| *s == v) != *negated,
                None => false,
            },
            Cond::And(cs) => cs.iter().all(|c| c.eval(i)),
            Cond::Or(cs) => cs.iter().any(|c| c.eval(i)),
            Cond::Not(c) => !c.eval(i),
        }
    }
}

/// A piece of a rule's text.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    Lit(String),
    Feature(usize),
    Field(TextField),
    /// The blocklist entry of this entity that matched.
    Blocklist(Entity),
}

/// One rule, checked.
#[derive(Debug, Clone)]
pub struct Rule {
    pub code: String,
    pub action: Decision,
    pub priority: i32,
    pub text: Vec<Segment>,
    when: Cond,
}

/// The rules in force, in evaluation order (priority, highest first; then file order).
#[derive(Debug, Clone)]
pub struct RuleSet {
    pub version: String,
    /// The decision when the model cannot score and no rule fired.
    pub on_model_failure: Decision,
    pub rules: Vec<Rule>,
    /// The features the rules read, computed for every transaction.
    pub features: FeatureSet,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileSpec {
    version: String,
    #[serde(default = "approve")]
    on_model_failure: Decision,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleSpec>,
}

fn approve() -> Decision {
    Decision::Approve
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    code: String,
    when: String,
    action: Decision,
    #[serde(default)]
    priority: i32,
    text: String,
}

impl RuleSet {
    /// No rules: the model alone decides, and approves when it cannot score.
    pub fn empty() -> RuleSet {
        RuleSet {
            version: String::new(),
            on_model_failure: Decision::Approve,
            rules: Vec::new(),
            features: FeatureSet::resolve::<String>(&[]).expect("the empty feature set"),
        }
    }

    pub fn load(path: &Path) -> Result<RuleSet, RulesError> {
        let err = |message: String| RulesError {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        RuleSet::parse(&text).map_err(err)
    }

    /// Parses and checks a rules file's text; the error names the rule and what is wrong.
    pub fn parse(text: &str) -> Result<RuleSet, String> {
        let spec: FileSpec = toml::from_str(text).map_err(|e| e.to_string())?;
        if spec.on_model_failure == Decision::Reject {
            return Err("`on-model-failure` must be approve, review or decline".into());
        }
        let mut names: Vec<String> = Vec::new();
        let mut rules = Vec::with_capacity(spec.rules.len());
        let mut codes = std::collections::HashSet::new();
        for r in spec.rules {
            let at = |m: String| format!("rule `{}`: {m}", r.code);
            if r.code.trim().is_empty() {
                return Err("a rule has an empty `code`".into());
            }
            if !codes.insert(r.code.clone()) {
                return Err(at("the code is used twice".into()));
            }
            if r.action == Decision::Reject {
                return Err(at(
                    "`action` must be approve, review or decline (reject is for stores that are not enabled)".into(),
                ));
            }
            let when = Parser::new(&r.when, &mut names)
                .parse()
                .map_err(|m| at(format!("`when`: {m}")))?;
            let text = parse_text(&r.text, &mut names).map_err(|m| at(format!("`text`: {m}")))?;
            rules.push(Rule {
                code: r.code,
                action: r.action,
                priority: r.priority,
                text,
                when,
            });
        }
        // Highest priority first; the file order among equals (a stable sort).
        rules.sort_by_key(|r| std::cmp::Reverse(r.priority));
        let features = FeatureSet::resolve(&names).map_err(|e| e.to_string())?;
        Ok(RuleSet {
            version: spec.version,
            on_model_failure: spec.on_model_failure,
            rules,
            features,
        })
    }

    /// The rules that fire for this transaction, in evaluation order.
    pub fn fired<'a>(&'a self, inputs: &'a Inputs<'a>) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| r.when.eval(inputs))
    }
}

impl Rule {
    /// The rule's text with its values filled in; `blocklist` describes the matched entry.
    pub fn render(
        &self,
        inputs: &Inputs<'_>,
        blocklist: impl Fn(Entity) -> Option<String>,
    ) -> String {
        let mut out = String::new();
        for s in &self.text {
            match s {
                Segment::Lit(t) => out.push_str(t),
                Segment::Feature(c) => out.push_str(&format_number(f64::from(inputs.features[*c]))),
                Segment::Field(f) => out.push_str(f.get(inputs.tx).as_deref().unwrap_or("(none)")),
                Segment::Blocklist(e) => {
                    out.push_str(&blocklist(*e).unwrap_or_else(|| "no entry".into()))
                }
            }
        }
        out
    }
}

/// A number for people: integers without decimals, others with up to two.
pub fn format_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The column of a feature in the rule set's features, adding it if new.
fn column(names: &mut Vec<String>, name: &str) -> usize {
    match names.iter().position(|n| n == name) {
        Some(i) => i,
        None => {
            names.push(name.to_string());
            names.len() - 1
        }
    }
}

fn is_feature(name: &str) -> bool {
    FeatureSet::resolve(&[name.to_string()]).is_ok() && !name.starts_with("features[")
}

fn text_field(name: &str) -> Option<TextField> {
    TextField::ALL
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
}

fn unknown_name(name: &str) -> String {
    let fields: Vec<&str> = TextField::ALL.iter().map(|(n, _)| *n).collect();
    format!(
        "unknown name `{name}`: not a feature of the registry, nor a text field ({})",
        fields.join(", ")
    )
}

fn parse_text(text: &str, names: &mut Vec<String>) -> Result<Vec<Segment>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            out.push(Segment::Lit(rest[..open].to_string()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("`{{` without `}}` in {text:?}"))?
            + open;
        let name = rest[open + 1..close].trim();
        let seg = if let Some(e) = name.strip_prefix("blocklist.") {
            Segment::Blocklist(
                Entity::ALL
                    .into_iter()
                    .find(|x| x.name() == e)
                    .ok_or_else(|| format!("unknown entity in `{{{name}}}`"))?,
            )
        } else if let Some(f) = text_field(name) {
            Segment::Field(f)
        } else if is_feature(name) {
            Segment::Feature(column(names, name))
        } else {
            return Err(unknown_name(name));
        };
        out.push(seg);
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        out.push(Segment::Lit(rest.to_string()));
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Num(f64),
    Str(String),
    Name(String),
    Op(Cmp),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
}

fn tokenize(s: &str) -> Result<Vec<Token>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '(' => (out.push(Token::LParen), i += 1).1,
            ')' => (out.push(Token::RParen), i += 1).1,
            '[' => (out.push(Token::LBracket), i += 1).1,
            ']' => (out.push(Token::RBracket), i += 1).1,
            ',' => (out.push(Token::Comma), i += 1).1,
            '=' | '!' | '<' | '>' => {
                let two = b.get(i + 1) == Some(&b'=');
                let op = match (c, two) {
                    ('=', true) => Cmp::Eq,
                    ('!', true) => Cmp::Ne,
                    ('<', true) => Cmp::Le,
                    ('>', true) => Cmp::Ge,
                    ('<', false) => Cmp::Lt,
                    ('>', false) => Cmp::Gt,
                    _ => return Err(format!("`{c}` at {i}: expected ==, !=, <, <=, > or >=")),
                };
                out.push(Token::Op(op));
                i += if two { 2 } else { 1 };
            }
            '"' => {
                let end = s[i + 1..]
                    .find('"')
                    .ok_or_else(|| format!("unterminated text at {i}"))?;
                out.push(Token::Str(s[i + 1..i + 1 + end].to_string()));
                i += end + 2;
            }
            c if c.is_ascii_digit() || c == '-' || c == '.' => {
                let start = i;
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
                let t = &s[start..i];
                let v: f64 = t.parse().map_err(|_| format!("`{t}` is not a number"))?;
                out.push(Token::Num(v));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                out.push(Token::Name(s[start..i].to_string()));
            }
            _ => return Err(format!("unexpected `{c}` at {i}")),
        }
    }
    Ok(out)
}

/// An operand before its use decides what it must be.
enum Operand {
    Num(Num),
    Text(Text),
    Bool(Cond),
}

struct Parser<'a> {
    tokens: Vec<Token>,
    at: usize,
    error: Option<String>,
    names: &'a mut Vec<String>,
}

impl<'a> Parser<'a> {
    fn new(s: &str, names: &'a mut Vec<String>) -> Parser<'a> {
        let (tokens, error) = match tokenize(s) {
            Ok(t) => (t, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        Parser {
            tokens,
            at: 0,
            error,
            names,
        }
    }

    fn parse(mut self) -> Result<Cond, String> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.tokens.is_empty() {
            return Err("empty condition".into());
        }
        let c = self.or()?;
        match self.tokens.get(self.at) {
            None => Ok(c),
            Some(t) => Err(format!("unexpected {} after a complete condition", show(t))),
        }
    }

    fn peek_name(&self, word: &str) -> bool {
        matches!(self.tokens.get(self.at), Some(Token::Name(n)) if n == word)
    }

    fn or(&mut self) -> Result<Cond, String> {
        let mut parts = vec![self.and()?];
        while self.peek_name("or") {
            self.at += 1;
            parts.push(self.and()?);
        }
        Ok(if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Cond::Or(parts)
        })
    }

    fn and(&mut self) -> Result<Cond, String> {
        let mut parts = vec![self.not()?];
        while self.peek_name("and") {
            self.at += 1;
            parts.push(self.not()?);
        }
        Ok(if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Cond::And(parts)
        })
    }

    fn not(&mut self) -> Result<Cond, String> {
        if self.peek_name("not") {
            self.at += 1;
            return Ok(Cond::Not(Box::new(self.not()?)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Cond, String> {
        let left = self.operand()?;
        let negated_in = self.peek_name("not")
            && matches!(self.tokens.get(self.at + 1), Some(Token::Name(n)) if n == "in");
        if negated_in || self.peek_name("in") {
            self.at += if negated_in { 2 } else { 1 };
            let list = self.list()?;
            return match left {
                Operand::Num(n) => {
                    let set = list
                        .into_iter()
                        .map(|t| match t {
                            Token::Num(v) => Ok(v),
                            other => Err(format!("a number's set holds {}", show(&other))),
                        })
                        .collect::<Result<_, _>>()?;
                    Ok(Cond::NumIn(n, set, negated_in))
                }
                Operand::Text(x) => {
                    let set = list
                        .into_iter()
                        .map(|t| match t {
                            Token::Str(v) => Ok(v),
                            other => Err(format!("a text's set holds {}", show(&other))),
                        })
                        .collect::<Result<_, _>>()?;
                    Ok(Cond::TextIn(x, set, negated_in))
                }
                Operand::Bool(_) => Err("`in` needs a number or a text on its left".into()),
            };
        }
        let Some(Token::Op(op)) = self.tokens.get(self.at).cloned() else {
            return match left {
                Operand::Bool(c) => Ok(c),
                Operand::Num(n) => Ok(Cond::Truthy(n)),
                Operand::Text(_) => Err("a text is not a condition; compare it (==, in)".into()),
            };
        };
        self.at += 1;
        let right = self.operand()?;
        match (left, right) {
            (Operand::Num(a), Operand::Num(b)) => Ok(Cond::NumCmp(a, op, b)),
            (Operand::Text(a), Operand::Text(b)) => Ok(Cond::TextCmp(a, op, b)),
            _ => Err("cannot compare a number with a text".into()),
        }
    }

    fn list(&mut self) -> Result<Vec<Token>, String> {
        if self.tokens.get(self.at) != Some(&Token::LBracket) {
            return Err("`in` needs a list: [\"a\", \"b\"] or [1, 2]".into());
        }
        self.at += 1;
        let mut out = Vec::new();
        loop {
            match self.tokens.get(self.at).cloned() {
                Some(Token::RBracket) => {
                    self.at += 1;
                    return Ok(out);
                }
                Some(t @ (Token::Num(_) | Token::Str(_))) => {
                    out.push(t);
                    self.at += 1;
                    match self.tokens.get(self.at) {
                        Some(Token::Comma) => self.at += 1,
                        Some(Token::RBracket) => {}
                        _ => return Err("expected `,` or `]` in a list".into()),
                    }
                }
                Some(t) => return Err(format!("a list holds numbers or texts, not {}", show(&t))),
                None => return Err("unterminated list".into()),
            }
        }
    }

    fn operand(&mut self) -> Result<Operand, String> {
        let t = self
            .tokens
            .get(self.at)
            .cloned()
            .ok_or("the condition ends too early")?;
        self.at += 1;
        Ok(match t {
            Token::Num(v) => Operand::Num(Num::Const(v)),
            Token::Str(s) => Operand::Text(Text::Const(s)),
            Token::LParen => {
                let c = self.or()?;
                if self.tokens.get(self.at) != Some(&Token::RParen) {
                    return Err("missing `)`".into());
                }
                self.at += 1;
                Operand::Bool(c)
            }
            Token::Name(n) if n == "true" => Operand::Bool(Cond::Const(true)),
            Token::Name(n) if n == "false" => Operand::Bool(Cond::Const(false)),
            Token::Name(n) => {
                if let Some(f) = text_field(&n) {
                    Operand::Text(Text::Field(f))
                } else if is_feature(&n) {
                    Operand::Num(Num::Feature(column(self.names, &n)))
                } else {
                    return Err(unknown_name(&n));
                }
            }
            other => return Err(format!("unexpected {}", show(&other))),
        })
    }
}

fn show(t: &Token) -> String {
    match t {
        Token::Num(v) => format!("number {v}"),
        Token::Str(s) => format!("text {s:?}"),
        Token::Name(n) => format!("`{n}`"),
        Token::Op(o) => format!("operator {o:?}"),
        Token::LParen => "`(`".into(),
        Token::RParen => "`)`".into(),
        Token::LBracket => "`[`".into(),
        Token::RBracket => "`]`".into(),
        Token::Comma => "`,`".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(body: &str) -> RuleSet {
        RuleSet::parse(&format!("version = \"t\"\n{body}")).unwrap()
    }

    fn one(when: &str) -> RuleSet {
        rules(&format!(
            "[[rule]]\ncode = \"r\"\nwhen = '{when}'\naction = \"review\"\ntext = \"x\""
        ))
    }

    fn tx() -> Transaction {
        Transaction {
            transaction_id: "t".into(),
            customer_id: "c".into(),
            merchant_id: "m-1".into(),
            amount: 250.0,
            currency: "USD".into(),
            merchant_category: Some("shopping_net".into()),
            email: Some("Ana@Example.com".into()),
            ..Transaction::default()
        }
    }

    /// Whether the rule fires, with the features set by name.
    fn fires(r: &RuleSet, values: &[(&str, f32)]) -> bool {
        let mut row = vec![0.0f32; r.features.len()];
        for (n, v) in values {
            let i = r.features.names().iter().position(|x| x == n).unwrap();
            row[i] = *v;
        }
        let t = tx();
        let inputs = Inputs {
            tx: &t,
            features: &row,
        };
        let fired = r.fired(&inputs).count() > 0;
        fired
    }

    #[test]
    fn comparisons_sets_and_boolean_logic() {
        assert!(fires(&one("amount > 200"), &[("amount", 250.0)]));
        assert!(!fires(&one("amount > 200"), &[("amount", 200.0)]));
        assert!(fires(&one("amount >= 200"), &[("amount", 200.0)]));
        assert!(fires(&one("amount != 1"), &[("amount", 2.0)]));
        assert!(fires(&one("new_device"), &[("new_device", 1.0)]));
        assert!(!fires(&one("new_device"), &[("new_device", 0.0)]));
        assert!(fires(
            &one(r#"merchant_category in ["misc_net", "shopping_net"]"#),
            &[]
        ));
        assert!(!fires(
            &one(r#"merchant_category not in ["shopping_net"]"#),
            &[]
        ));
        assert!(fires(&one(r#"email_domain == "example.com""#), &[]));
        assert!(!fires(&one(r#"channel == "web""#), &[]), "absent field");
        assert!(!fires(&one(r#"channel != "web""#), &[]), "absent field");
        assert!(fires(
            &one("hour_of_day in [1, 2, 3]"),
            &[("hour_of_day", 2.0)]
        ));
        let r = one("(amount > 100 and new_device) or not customer_tx_total");
        assert!(fires(
            &r,
            &[
                ("amount", 150.0),
                ("new_device", 1.0),
                ("customer_tx_total", 5.0)
            ]
        ));
        assert!(!fires(&r, &[("amount", 150.0), ("customer_tx_total", 5.0)]));
        assert!(fires(&r, &[("customer_tx_total", 0.0)]));
        let r = one("amount > 1 and amount < 3 or amount == 10");
        assert!(fires(&r, &[("amount", 2.0)]));
        assert!(fires(&r, &[("amount", 10.0)]));
        assert!(!fires(&r, &[("amount", 5.0)]));
    }

    #[test]
    fn mistakes_are_named() {
        let err = |body: &str| RuleSet::parse(&format!("version = \"t\"\n{body}")).unwrap_err();
        let rule = |when: &str| {
            err(&format!(
                "[[rule]]\ncode = \"big\"\nwhen = '{when}'\naction = \"review\"\ntext = \"x\""
            ))
        };
        assert!(rule("amount > ").contains("rule `big`"));
        assert!(rule("amout > 3").contains("unknown name `amout`"));
        assert!(rule(r#"amount == "x""#).contains("cannot compare"));
        assert!(rule("merchant_id").contains("not a condition"));
        assert!(rule(r#"amount in ["a"]"#).contains("set"));
        assert!(rule("(amount > 3").contains("missing `)`"));
        assert!(rule("amount > 3 amount").contains("unexpected"));
        assert!(
            err("[[rule]]\ncode = \"r\"\nwhen = \"true\"\naction = \"reject\"\ntext = \"x\"")
                .contains("action")
        );
        assert!(err(
            "[[rule]]\ncode = \"r\"\nwhen = \"true\"\naction = \"review\"\ntext = \"{nope}\""
        )
        .contains("unknown name `nope`"));
        assert!(err("[[rule]]\ncode = \"r\"\nwhen = \"true\"\naction = \"review\"\ntext = \"x\"\n[[rule]]\ncode = \"r\"\nwhen = \"true\"\naction = \"review\"\ntext = \"x\"")
            .contains("twice"));
        assert!(err(
            "[[rule]]\ncode = \"r\"\nwhen = \"true\"\naction = \"review\"\ntext = \"x\"\nextra = 1"
        )
        .contains("extra"));
    }

    #[test]
    fn priority_orders_rules_and_text_is_filled_in() {
        let r = rules(
            r#"
[[rule]]
code = "low"
when = "true"
action = "decline"
text = "low"
[[rule]]
code = "high"
when = "amount > 100"
action = "review"
priority = 10
text = "{amount} at {merchant_category}, {blocklist.email}"
"#,
        );
        let t = tx();
        let row = [250.5f32];
        let inputs = Inputs {
            tx: &t,
            features: &row,
        };
        let fired: Vec<&Rule> = r.fired(&inputs).collect();
        assert_eq!(
            fired.iter().map(|r| r.code.as_str()).collect::<Vec<_>>(),
            ["high", "low"]
        );
        let text = fired[0].render(&inputs, |e| Some(format!("{} entry", e.name())));
        assert_eq!(text, "250.5 at shopping_net, email entry");
    }
}
