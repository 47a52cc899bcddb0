//! Reading, layering and interpolating configuration files.
//!
//! Layers, first wins: `FERRY__...` environment variables, `config/{env}/{scope}.config.toml`,
//! `config/{env}/config.toml`, `config/config.toml` (or one `--config FILE` plus the
//! environment). Files are merged as generic trees, `${VAR}` is replaced in every string,
//! and only then is the result deserialized, so every error names its key path.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{key, Config, ConfigError, Plan};

/// Where to look for configuration.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// One file (then no layering of files).
    pub file: Option<PathBuf>,
    /// The layered tree's root (`config/`).
    pub dir: PathBuf,
    /// `ENV`: the environment layer's folder.
    pub env: Option<String>,
    /// `SCOPE`: the scope file inside the environment's folder.
    pub scope: Option<String>,
}

const EXTENSIONS: [&str; 3] = ["toml", "yaml", "yml"];
const ENV_PREFIX: &str = "FERRY__";

/// The syntax of a configuration text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TOML, the default.
    Toml,
    /// YAML (`.yaml` or `.yml` files).
    Yaml,
}

impl Format {
    /// By file extension: `.yaml` and `.yml` are YAML, anything else TOML.
    pub fn of(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => Format::Yaml,
            _ => Format::Toml,
        }
    }
}

/// A configuration read, with where it came from (the binary logs the files and warnings
/// as they are found; the loader's users and tests read them here).
#[derive(Debug)]
#[allow(dead_code)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// The files read, in the order they were layered.
    pub files: Vec<PathBuf>,
    /// What an operator should know but that does not stop ferry (an `ENV` or `SCOPE`
    /// without a file of its own).
    pub warnings: Vec<String>,
    /// The configuration validated (validation runs here, so that its errors can name the
    /// file a value came from).
    pub plan: Plan,
}

/// Loads, merges, interpolates and deserializes the configuration.
pub fn load(options: &LoadOptions, vars: &[(String, String)]) -> Result<Loaded, Vec<ConfigError>> {
    if let Some(file) = &options.file {
        let (at, text) = read_file(file).map_err(|e| vec![e])?;
        let files = vec![file.clone()];
        let mut warnings = Vec::new();
        if options.env.is_some() || options.scope.is_some() {
            warnings.push(format!(
                "ENV/SCOPE are not used with --config {}: only that file is read",
                file.display()
            ));
        }
        report(options, &files, &warnings);
        let tree = parse(&at, &text, Format::of(file)).map_err(|e| vec![e])?;
        let (config, plan) = resolve(vec![(at, tree)], vars)?;
        return Ok(Loaded {
            config,
            plan,
            files,
            warnings,
        });
    }
    let (files, warnings) = layered_files(options)?;
    report(options, &files, &warnings);
    let mut layers = Vec::new();
    for file in &files {
        let (at, text) = read_file(file).map_err(|e| vec![e])?;
        let tree = parse(&at, &text, Format::of(file)).map_err(|e| vec![e])?;
        layers.push((at, tree));
    }
    let (config, plan) = resolve(layers, vars)?;
    Ok(Loaded {
        config,
        plan,
        files,
        warnings,
    })
}

/// Logs which files are read, in order, with the `ENV` and `SCOPE` in force, and what an
/// operator should know of them, before any of them is found wrong.
fn report(options: &LoadOptions, files: &[PathBuf], warnings: &[String]) {
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    tracing::info!(
        files = ?files,
        env = options.env.as_deref().unwrap_or("-"),
        scope = options.scope.as_deref().unwrap_or("-"),
        "configuration loaded"
    );
}

/// One configuration text, as [`load`] reads a single file: parsed, `FERRY__` overrides
/// applied, `${VAR}` replaced, deserialized. `name` is where parse errors are reported.
/// It exists so that a text that is not in a file (a fuzz target, a test) takes the same
/// path as a file. The binary itself only reads files.
#[allow(dead_code)]
pub fn load_str(
    name: &str,
    text: &str,
    format: Format,
    vars: &[(String, String)],
) -> Result<Config, Vec<ConfigError>> {
    let tree = parse(name, text, format).map_err(|e| vec![e])?;
    resolve(vec![(name.to_owned(), tree)], vars).map(|(config, _)| config)
}

/// What the environment's `FERRY__` variables are reported as, when an error is theirs.
const OVERRIDES: &str = "FERRY__ environment variables";

/// The layers (named, first overridden by later ones) to a [`Config`] and its validated
/// [`Plan`]: merge, overrides, interpolation, deserialization, then validation. Every error is reported, each with its key path
/// and, where it helps, the file (or the variables) its value came from.
fn resolve(
    layers: Vec<(String, Value)>,
    vars: &[(String, String)],
) -> Result<(Config, Plan), Vec<ConfigError>> {
    let mut layers = layers;
    let mut overrides = Value::Object(Map::new());
    apply_env_overrides(&mut overrides, vars);
    if overrides.as_object().is_some_and(|m| !m.is_empty()) {
        layers.push((OVERRIDES.to_owned(), overrides));
    }
    let several = layers.len() > 1;
    let mut tree = Value::Object(Map::new());
    for (_, layer) in &layers {
        merge(&mut tree, layer.clone());
    }
    let mut errors = Vec::new();
    interpolate(&mut tree, &mut String::new(), vars, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    // serde stops at the first error: take the value it was about out of the tree and try
    // again, until the rest deserializes, so that one run lists every mistake. A required
    // key that was taken out then reports itself missing; that is not a mistake of the
    // file and is not listed.
    // Values taken out, with what serde expected there; and whether a whole section went
    // because a required key of it had to.
    let mut removed: Vec<(Vec<Segment>, String)> = Vec::new();
    let mut gone: Vec<Vec<Segment>> = Vec::new();
    let mut placed: Vec<Vec<Segment>> = Vec::new();
    loop {
        let e = match serde_path_to_error::deserialize::<_, Config>(&tree) {
            // What the rest breaks of the rules is listed too (values that parse but are
            // not allowed), so that one run shows every mistake, except where a value was
            // taken out or stood in for: its rules were already broken.
            Ok(config) => {
                let more = match super::validate(&config) {
                    Ok(plan) if errors.is_empty() => return Ok((config, plan)),
                    Ok(_) => return Err(errors),
                    Err(more) => more,
                };
                {
                    let touched = |at: &[Segment]| {
                        removed.iter().any(|(r, _)| at.starts_with(r))
                            || placed.iter().any(|p| at.starts_with(p))
                            || gone.iter().any(|g| at.starts_with(g) || g.starts_with(at))
                    };
                    let earlier = !errors.is_empty();
                    errors.extend(more.into_iter().filter_map(|mut e| {
                        let at = parse_at(&e.at);
                        if earlier && touched(&at) {
                            return None;
                        }
                        if several {
                            e.what.push_str(&blame(&layers, &at));
                        }
                        Some(e)
                    }));
                }
                return Err(errors);
            }
            Err(e) => e,
        };
        let (mut path, mut at) = (segments(e.path()), error_path(e.path()));
        let mut what = one_line(&e.inner().to_string());
        // serde reads a section chosen by its `type` (`source`, `sink`) as a whole and
        // reports its errors there; read as the type's own table it names the key.
        if let Some((inner, inner_at, inner_what)) = tagged_error(&tree, &path) {
            path.extend(inner);
            at = format!("{at}.{inner_at}");
            what = inner_what;
        }
        // A required key taken out reports itself missing: not a mistake of the file. A
        // value of the type serde expected stands in, so that the rest of its section is
        // still read; when there is none, the section goes.
        // A stand-in that does not do either: its section goes.
        if placed.contains(&path) {
            let Some((_, section)) = path.split_last() else {
                return Err(errors);
            };
            let section = section.to_vec();
            if section.is_empty() || !remove(&mut tree, &section) {
                return Err(errors);
            }
            gone.push(section);
            continue;
        }
        let cause = missing_field(&what).and_then(|field| {
            removed.iter().find(|(r, _)| {
                r.len() == path.len() + 1
                    && r.starts_with(&path)
                    && matches!(r.last(), Some(Segment::Key(k)) if k == field)
            })
        });
        if let Some((key_path, expected)) = cause {
            let key_path = key_path.clone();
            if let Some(value) = stand_in(expected) {
                if insert(&mut tree, &key_path, value) {
                    placed.push(key_path);
                    continue;
                }
            }
            if path.is_empty() || !remove(&mut tree, &path) {
                return Err(errors);
            }
            gone.push(path);
            continue;
        }
        let source = if several {
            blame(&layers, &path)
        } else {
            String::new()
        };
        errors.push(ConfigError::new(at, format!("{what}{source}")));
        if path.is_empty() || !remove(&mut tree, &path) || errors.len() >= 100 {
            return Err(errors);
        }
        removed.push((path, what));
    }
}

/// A value of the type a serde error says it expected (`expected a string`), to stand in
/// for a required value that was wrong.
fn stand_in(what: &str) -> Option<Value> {
    let expected = what.rsplit_once("expected ")?.1;
    Some(if expected.starts_with("a string") {
        Value::String(String::new())
    } else if expected.starts_with('u') || expected.starts_with('i') || expected.contains("integer")
    {
        Value::from(0)
    } else if expected.starts_with("a boolean") {
        Value::Bool(false)
    } else if expected.starts_with("a sequence") {
        Value::Array(Vec::new())
    } else {
        return None;
    })
}

/// Puts `value` at `path` in `tree` (whose parents exist); whether it could.
fn insert(tree: &mut Value, path: &[Segment], value: Value) -> bool {
    let Some((Segment::Key(last), parents)) = path.split_last() else {
        return false;
    };
    match tree.pointer_mut(&pointer(parents)) {
        Some(Value::Object(m)) => m.insert(last.clone(), value).is_none(),
        _ => false,
    }
}

/// `path` as a JSON pointer (`/routes/r/source`), to find its place with serde_json.
fn pointer(path: &[Segment]) -> String {
    let mut out = String::new();
    for segment in path {
        out.push('/');
        match segment {
            Segment::Key(k) => out.push_str(&k.replace('~', "~0").replace('/', "~1")),
            Segment::Index(i) => out.push_str(&i.to_string()),
        }
    }
    out
}

/// The error inside a section chosen by its `type` at `path`, if that is what `path` is:
/// where inside it (as segments and as text) and what.
fn tagged_error(tree: &Value, path: &[Segment]) -> Option<(Vec<Segment>, String, String)> {
    use super::{AmqpSourceConfig, HttpSinkConfig, KafkaSourceConfig, SqsSourceConfig};
    fn inner<T: serde::de::DeserializeOwned>(
        node: &Map<String, Value>,
    ) -> Option<(Vec<Segment>, String, String)> {
        let mut table = node.clone();
        table.remove("type");
        let table = Value::Object(table);
        let e = serde_path_to_error::deserialize::<_, T>(&table).err()?;
        let at = error_path(e.path());
        (at != "config").then(|| (segments(e.path()), at, one_line(&e.inner().to_string())))
    }
    let Some(Segment::Key(section)) = path.last() else {
        return None;
    };
    let node = tree.pointer(&pointer(path))?;
    let table = node.as_object()?;
    match (section.as_str(), table.get("type")?.as_str()?) {
        ("source", "sqs") => inner::<SqsSourceConfig>(table),
        ("source", "amqp") => inner::<AmqpSourceConfig>(table),
        ("source", "kafka") => inner::<KafkaSourceConfig>(table),
        ("sink", "http") => inner::<HttpSinkConfig>(table),
        _ => None,
    }
}

/// ` (in FILE)`: the last layer that sets the value at `path`, which is the one in force.
fn blame(layers: &[(String, Value)], path: &[Segment]) -> String {
    if path.is_empty() {
        return String::new();
    }
    layers
        .iter()
        .rev()
        .find(|(_, layer)| lookup(layer, path))
        .map(|(name, _)| format!(" (in {name})"))
        .unwrap_or_default()
}

/// A key path as errors write it (`routes."a.b".sink[0]`, see [`key`]) back to segments;
/// what cannot be read ends the path there.
fn parse_at(at: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut chars = at.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            '.' => {
                chars.next();
            }
            '[' => {
                chars.next();
                let digits: String = chars.by_ref().take_while(|c| *c != ']').collect();
                match digits.parse() {
                    Ok(i) => out.push(Segment::Index(i)),
                    Err(_) => break,
                }
            }
            '"' => {
                let mut quoted = String::from('"');
                chars.next();
                let mut escaped = false;
                for c in chars.by_ref() {
                    quoted.push(c);
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        break;
                    }
                }
                match serde_json::from_str::<String>(&quoted) {
                    Ok(k) => out.push(Segment::Key(k)),
                    Err(_) => break,
                }
            }
            _ => {
                let mut name = String::new();
                while let Some(&c) = chars.peek() {
                    if c == '.' || c == '[' {
                        break;
                    }
                    name.push(c);
                    chars.next();
                }
                out.push(Segment::Key(name));
            }
        }
    }
    out
}

/// One step of a key path in the generic tree.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

fn segments(path: &serde_path_to_error::Path) -> Vec<Segment> {
    use serde_path_to_error::Segment as S;
    let mut out = Vec::new();
    for segment in path.iter() {
        match segment {
            S::Seq { index } => out.push(Segment::Index(*index)),
            S::Map { key: name } => out.push(Segment::Key(name.clone())),
            // An enum's variant is a level of the Rust type, not of the file.
            S::Enum { .. } => {}
            S::Unknown => break,
        }
    }
    out
}

/// The field a serde "missing field `x`" error names.
fn missing_field(what: &str) -> Option<&str> {
    what.strip_prefix("missing field `")?.split('`').next()
}

/// Whether `tree` has a value at `path`.
fn lookup(tree: &Value, path: &[Segment]) -> bool {
    tree.pointer(&pointer(path)).is_some()
}

/// Takes the value at `path` out of `tree`; whether there was one.
fn remove(tree: &mut Value, path: &[Segment]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    match (last, tree.pointer_mut(&pointer(parents))) {
        (Segment::Key(k), Some(Value::Object(m))) => m.remove(k).is_some(),
        (Segment::Index(i), Some(Value::Array(a))) if *i < a.len() => {
            a.remove(*i);
            true
        }
        _ => false,
    }
}

/// Where a deserialization error is, written as `interpolate` writes key paths.
fn error_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut at = String::new();
    for segment in path.iter() {
        let name = match segment {
            Segment::Seq { index } => {
                at.push_str(&format!("[{index}]"));
                continue;
            }
            Segment::Map { key: name } | Segment::Enum { variant: name } => key(name),
            Segment::Unknown => "?".into(),
        };
        if !at.is_empty() {
            at.push('.');
        }
        at.push_str(&name);
    }
    if at.is_empty() {
        "config".to_owned()
    } else {
        at
    }
}

/// The files of the layered tree that exist, in order, and warnings for the layers asked
/// for (`ENV`, `SCOPE`) that have none: a typo in either must not pass unnoticed.
fn layered_files(options: &LoadOptions) -> Result<(Vec<PathBuf>, Vec<String>), Vec<ConfigError>> {
    let mut candidates = vec![("the base layer", options.dir.join("config"))];
    let mut warnings = Vec::new();
    match (&options.env, &options.scope) {
        (Some(env), scope) => {
            candidates.push(("ENV", options.dir.join(env).join("config")));
            if let Some(scope) = scope {
                candidates.push((
                    "SCOPE",
                    options.dir.join(env).join(format!("{scope}.config")),
                ));
            }
        }
        (None, Some(scope)) => warnings.push(format!(
            "SCOPE={scope} is set but ENV is not: the scope layer lives in DIR/ENV/ and is not read"
        )),
        (None, None) => {}
    }
    let mut files = Vec::new();
    let mut errors = Vec::new();
    let mut looked = Vec::new();
    for (layer, stem) in &candidates {
        let found: Vec<PathBuf> = EXTENSIONS
            .iter()
            .map(|ext| PathBuf::from(format!("{}.{ext}", stem.display())))
            .filter(|p| p.is_file())
            .collect();
        let wanted = PathBuf::from(format!("{}.toml", stem.display()));
        match found.as_slice() {
            [] => {
                looked.push(wanted.display().to_string());
                if *layer != "the base layer" {
                    let value = match *layer {
                        "ENV" => options.env.as_deref(),
                        _ => options.scope.as_deref(),
                    };
                    warnings.push(format!(
                        "{layer}={} but {} (or .yaml, .yml) does not exist: that layer is not read",
                        value.unwrap_or_default(),
                        wanted.display()
                    ));
                }
            }
            [one] => files.push(one.clone()),
            several => errors.push(ConfigError::new(
                stem.display().to_string(),
                format!(
                    "{} files for one layer ({}); keep one",
                    several.len(),
                    several
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    if files.is_empty() {
        return Err(vec![ConfigError::new(
            options.dir.display().to_string(),
            format!(
                "no configuration found (looked for {}, also as .yaml and .yml); \
                 pass --config FILE or --config-dir DIR",
                looked.join(", ")
            ),
        )]);
    }
    Ok((files, warnings))
}

/// The text of one file, and the name its errors are reported under.
fn read_file(path: &Path) -> Result<(String, String), ConfigError> {
    let at = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(&at, e.to_string()))?;
    Ok((at, text))
}

/// Parses one text to a generic tree whose top level is a table.
fn parse(at: &str, text: &str, format: Format) -> Result<Value, ConfigError> {
    let value = match format {
        Format::Yaml => match serde_yaml_ng::from_str::<Value>(text) {
            Ok(value @ (Value::Object(_) | Value::Null)) => value,
            result => {
                if toml::from_str::<toml::Table>(text).is_ok_and(|t| !t.is_empty()) {
                    return Err(ConfigError::new(
                        at,
                        "this is TOML, but the file name says YAML (.yaml, .yml): rename it to .toml",
                    ));
                }
                result.map_err(|e| ConfigError::new(at, one_line(&e.to_string())))?
            }
        },
        Format::Toml => toml::from_str::<Value>(text).map_err(|e| {
            if matches!(serde_yaml_ng::from_str::<Value>(text), Ok(Value::Object(m)) if !m.is_empty())
            {
                return ConfigError::new(
                    at,
                    "this is YAML, but the file name says TOML: rename it to .yaml or .yml",
                );
            }
            let place = e
                .span()
                .map(|s| {
                    let before = &text[..s.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!("line {line}, column {col}: ")
                })
                .unwrap_or_default();
            ConfigError::new(at, format!("{place}{}", one_line(e.message())))
        })?,
    };
    match value {
        Value::Object(_) => Ok(value),
        Value::Null => Ok(Value::Object(Map::new())),
        _ => Err(ConfigError::new(
            at,
            "the top level must be a table of keys",
        )),
    }
}

/// Deep-merges `over` into `base`; tables merge key by key, anything else replaces.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// `FERRY__ROUTES__ORDERS__SINK__URL=...` sets `routes.orders.sink.url`. Values are read as
/// TOML values when they parse as one (`10`, `true`, `["a"]`) and as strings otherwise.
fn apply_env_overrides(tree: &mut Value, vars: &[(String, String)]) {
    for (name, raw) in vars {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let keys: Vec<String> = path.split("__").map(str::to_lowercase).collect();
        if keys.iter().any(String::is_empty) {
            continue;
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .and_then(|v| serde_json::to_value(v).ok())
            .unwrap_or_else(|| Value::String(raw.clone()));
        let mut over = value;
        for key in keys.iter().rev() {
            let mut m = Map::new();
            m.insert(key.clone(), over);
            over = Value::Object(m);
        }
        merge(tree, over);
    }
}

fn interpolate(
    value: &mut Value,
    path: &mut String,
    vars: &[(String, String)],
    errors: &mut Vec<ConfigError>,
) {
    match value {
        Value::String(s) if s.contains("${") => match expand(s, vars) {
            Ok(expanded) => *s = expanded,
            Err(what) => errors.push(ConfigError::new(path.clone(), what)),
        },
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&key(k));
                interpolate(v, path, vars, errors);
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                interpolate(v, path, vars, errors);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// Replaces every `${VAR}`; a missing variable is an error (never an empty secret).
fn expand(s: &str, vars: &[(String, String)]) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${ in value".to_owned())?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid variable name {name:?} in ${{...}}"));
        }
        let value = vars
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .ok_or_else(|| format!("environment variable {name} is not set"))?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Error texts of parsers span lines; ferry reports one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expand_variables() {
        let v = vars(&[("TOKEN", "s3cret")]);
        assert_eq!(
            expand("Bearer ${TOKEN}", &v).as_deref(),
            Ok("Bearer s3cret")
        );
        assert_eq!(
            expand("${MISSING}", &v),
            Err("environment variable MISSING is not set".into())
        );
        assert!(expand("${TOKEN", &v).is_err());
    }

    #[test]
    fn env_overrides_are_typed_and_nested() {
        let mut tree = serde_json::json!({"routes": {"orders": {"sink": {"url": "http://a"}}}});
        apply_env_overrides(
            &mut tree,
            &vars(&[
                ("FERRY__ROUTES__ORDERS__SINK__URL", "http://b:1/x"),
                ("FERRY__ROUTES__ORDERS__DELIVERY__CONCURRENCY", "64"),
                ("OTHER", "x"),
            ]),
        );
        assert_eq!(tree["routes"]["orders"]["sink"]["url"], "http://b:1/x");
        assert_eq!(tree["routes"]["orders"]["delivery"]["concurrency"], 64);
    }

    #[test]
    fn a_text_loads_like_a_file() {
        let text = "[routes.orders.source]\ntype = \"sqs\"\nqueue_url = \"${Q}\"\n\
                    [routes.orders.sink]\ntype = \"http\"\nurl = \"http://a\"\n";
        let config =
            load_str("t.toml", text, Format::Toml, &vars(&[("Q", "http://q")])).expect("loads");
        assert!(config.routes.contains_key("orders"));
        let yaml = "routes:\n  orders:\n    source: {type: sqs, queue_url: http://q}\n\
                    \x20   sink: {type: http, url: http://a}\n";
        let config = load_str("t.yaml", yaml, Format::Yaml, &[]).expect("loads");
        assert!(config.routes.contains_key("orders"));
        let errors = load_str("t.toml", "routes = [", Format::Toml, &[]).expect_err("broken");
        assert!(
            errors[0].to_string().starts_with("t.toml: line 1"),
            "{errors:?}"
        );
    }

    /// An empty key (found by fuzzing) made an error with no place; a line break in a key
    /// or in a value that an error quotes made it span lines.
    #[test]
    fn every_error_names_a_place_on_one_line() {
        for (text, format, at) in [
            ("\"\" = 1", Format::Toml, "\"\""),
            ("\"\" = \"${MISSING}\"", Format::Toml, "\"\""),
            ("admin:\n&a : 1", Format::Yaml, "\"\""),
            (
                "[routes.\"a\\nb\"]\nx = \"${MISSING}\"",
                Format::Toml,
                "routes.\"a\\nb\".x",
            ),
        ] {
            let errors = load_str("t", text, format, &[]).expect_err(text);
            assert_eq!(errors[0].at, at, "{text}");
            assert!(!errors[0].to_string().contains('\n'), "{errors:?}");
        }
        let e = ConfigError::new("routes.x", "\"a\nb\" is neither a number nor \"adaptive\"");
        assert_eq!(
            e.to_string(),
            "routes.x: \"a\\nb\" is neither a number nor \"adaptive\""
        );
    }

    const ROUTE: &str = "[routes.r.source]\ntype = \"sqs\"\nqueue_url = \"http://q\"\n\
                         [routes.r.sink]\ntype = \"http\"\nurl = \"http://a\"\n";

    /// Every mistake of a file in one run, each at its key, none made up by the way the
    /// list is made (a required key taken out does not report itself missing).
    #[test]
    fn every_error_is_listed_with_its_key() {
        let text = "[routes.r.source]\ntype = \"sqs\"\nqueue_url = 5\n\
                    [routes.r.sink]\ntype = \"http\"\nurl = \"http://a\"\ntimeout = \"-5s\"\n\
                    [routes.r.delivery]\nconcurrency = -1\nmax_attempts = \"x\"\n\
                    dead_letter_statuses = [200, 400]\n";
        let errors = load_str("t.toml", text, Format::Toml, &[]).expect_err("broken");
        let at: Vec<&str> = errors.iter().map(|e| e.at.as_str()).collect();
        assert_eq!(
            at,
            [
                "routes.r.delivery.concurrency",
                "routes.r.delivery.max_attempts",
                "routes.r.sink.timeout",
                "routes.r.source.queue_url",
                // The rules on values that parse are checked in the same run.
                "routes.r.delivery.dead_letter_statuses",
            ],
            "{errors:?}"
        );
        assert!(errors[0]
            .what
            .contains("a positive integer or \"adaptive\""));
        assert!(errors[2].what.contains("cannot be negative"));
        assert!(errors[4].what.contains("200 is a success status"));
        // A stand-in for the wrong queue_url is not taken for a second mistake.
        assert!(!errors.iter().any(|e| e.what.contains("missing field")));
        assert!(!errors
            .iter()
            .any(|e| e.at == "routes.r.source.queue_url" && !e.what.contains("expected a string")));
    }

    /// Keys holding the characters a JSON pointer escapes still name their place, and the
    /// value there is taken out so that the next mistake is found too.
    #[test]
    fn keys_with_slashes_and_tildes_are_found() {
        let text = "[routes.\"a/b~c\".delivery]\nconcurrency = -1\nmax_attempts = \"x\"\n";
        let errors = load_str("t.toml", text, Format::Toml, &[]).expect_err("broken");
        let at: Vec<&str> = errors.iter().map(|e| e.at.as_str()).collect();
        assert!(
            at.starts_with(&[
                "routes.\"a/b~c\".delivery.concurrency",
                "routes.\"a/b~c\".delivery.max_attempts"
            ]),
            "{errors:?}"
        );
    }

    #[test]
    fn a_file_in_the_other_syntax_says_so() {
        let e = load_str("c.yml", ROUTE, Format::Yaml, &[]).expect_err("TOML in .yml");
        assert!(e[0].what.contains("this is TOML"), "{e:?}");
        let yaml = "routes:\n  r:\n    source: {type: sqs, queue_url: http://q}\n";
        let e = load_str("c.toml", yaml, Format::Toml, &[]).expect_err("YAML in .toml");
        assert!(e[0].what.contains("this is YAML"), "{e:?}");
    }

    fn tree(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ferry-layers-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        dir
    }

    fn options(dir: &Path, env: Option<&str>, scope: Option<&str>) -> LoadOptions {
        LoadOptions {
            file: None,
            dir: dir.to_owned(),
            env: env.map(str::to_owned),
            scope: scope.map(str::to_owned),
        }
    }

    #[test]
    fn layers_name_their_files_and_missing_ones_warn() {
        let dir = tree(&[
            ("config.toml", ROUTE),
            (
                "uat/config.toml",
                "[routes.r.delivery]\nmax_attempts = \"x\"\n",
            ),
        ]);
        let errors = load(&options(&dir, Some("uat"), None), &[]).expect_err("bad layer");
        assert_eq!(errors[0].at, "routes.r.delivery.max_attempts");
        assert!(
            errors[0]
                .what
                .ends_with(&format!("(in {})", dir.join("uat/config.toml").display())),
            "{errors:?}"
        );
        std::fs::write(dir.join("uat/config.toml"), "").expect("fix");
        let loaded = load(&options(&dir, Some("uat"), Some("uatt")), &[]).expect("loads");
        assert_eq!(loaded.files.len(), 2);
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        assert!(loaded.warnings[0].contains("uatt.config.toml"));
        let loaded = load(&options(&dir, Some("prod"), None), &[]).expect("loads");
        assert!(
            loaded.warnings[0].starts_with("ENV=prod"),
            "{:?}",
            loaded.warnings
        );
        std::fs::write(dir.join("uat/config.yml"), "").expect("second file");
        let errors = load(&options(&dir, Some("uat"), None), &[]).expect_err("two files");
        assert!(
            errors[0].what.contains("2 files for one layer"),
            "{errors:?}"
        );
        let empty = tree(&[]);
        let errors = load(&options(&empty, None, None), &[]).expect_err("nothing");
        assert!(errors[0].what.contains("looked for"), "{errors:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn layers_merge_deeply() {
        let mut base = serde_json::json!({"a": {"b": 1, "c": 2}});
        merge(&mut base, serde_json::json!({"a": {"c": 3, "d": 4}}));
        assert_eq!(base, serde_json::json!({"a": {"b": 1, "c": 3, "d": 4}}));
    }
}
