//! Reading, layering and interpolating configuration files.
//!
//! Layers, first wins: `FERRY__...` environment variables, `config/{env}/{scope}.config.toml`,
//! `config/{env}/config.toml`, `config/config.toml` (or one `--config FILE` plus the
//! environment). Files are merged as generic trees, `${VAR}` is replaced in every string,
//! and only then is the result deserialized, so every error names its key path.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{key, Config, ConfigError};

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

/// A configuration read, with where it came from.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// The files read, in the order they were layered.
    pub files: Vec<PathBuf>,
    /// What an operator should know but that does not stop ferry (an `ENV` or `SCOPE`
    /// without a file of its own).
    pub warnings: Vec<String>,
}

/// Loads, merges, interpolates and deserializes the configuration.
pub fn load(options: &LoadOptions, vars: &[(String, String)]) -> Result<Loaded, Vec<ConfigError>> {
    if let Some(file) = &options.file {
        let (at, text) = read_file(file).map_err(|e| vec![e])?;
        let config = load_str(&at, &text, Format::of(file), vars)?;
        let mut warnings = Vec::new();
        if options.env.is_some() || options.scope.is_some() {
            warnings.push(format!(
                "ENV/SCOPE are not used with --config {}: only that file is read",
                file.display()
            ));
        }
        return Ok(Loaded {
            config,
            files: vec![file.clone()],
            warnings,
        });
    }
    let (files, warnings) = layered_files(options)?;
    let mut layers = Vec::new();
    for file in &files {
        let (at, text) = read_file(file).map_err(|e| vec![e])?;
        let tree = parse(&at, &text, Format::of(file)).map_err(|e| vec![e])?;
        layers.push((at, tree));
    }
    let config = resolve(layers, vars)?;
    Ok(Loaded {
        config,
        files,
        warnings,
    })
}

/// One configuration text, as [`load`] reads a single file: parsed, `FERRY__` overrides
/// applied, `${VAR}` replaced, deserialized. `name` is where parse errors are reported.
/// It exists so that a text that is not in a file (a fuzz target, a test) takes the same
/// path as a file.
pub fn load_str(
    name: &str,
    text: &str,
    format: Format,
    vars: &[(String, String)],
) -> Result<Config, Vec<ConfigError>> {
    let tree = parse(name, text, format).map_err(|e| vec![e])?;
    resolve(vec![(name.to_owned(), tree)], vars)
}

/// What the environment's `FERRY__` variables are reported as, when an error is theirs.
const OVERRIDES: &str = "FERRY__ environment variables";

/// The layers (named, first overridden by later ones) to a [`Config`]: merge, overrides,
/// interpolation, then deserialization. Every error is reported, each with its key path
/// and, where it helps, the file (or the variables) its value came from.
fn resolve(
    layers: Vec<(String, Value)>,
    vars: &[(String, String)],
) -> Result<Config, Vec<ConfigError>> {
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
    let mut removed: Vec<Vec<Segment>> = Vec::new();
    loop {
        let e = match serde_path_to_error::deserialize::<_, Config>(&tree) {
            Ok(config) if errors.is_empty() => return Ok(config),
            Ok(_) => return Err(errors),
            Err(e) => e,
        };
        let path = segments(e.path());
        let what = one_line(&e.inner().to_string());
        let consequence = missing_field(&what).is_some_and(|field| {
            removed.iter().any(|r| {
                r.len() == path.len() + 1
                    && r.starts_with(&path)
                    && matches!(r.last(), Some(Segment::Key(k)) if k == field)
            })
        });
        if !consequence {
            let source = if several {
                layers
                    .iter()
                    .rev()
                    .find(|(_, layer)| lookup(layer, &path))
                    .map(|(name, _)| format!(" (in {name})"))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            errors.push(ConfigError::new(
                error_path(e.path()),
                format!("{what}{source}"),
            ));
        }
        if path.is_empty() || !remove(&mut tree, &path) || errors.len() >= 100 {
            return Err(errors);
        }
        removed.push(path);
    }
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
    let mut at = tree;
    for segment in path {
        let next = match (segment, at) {
            (Segment::Key(k), Value::Object(m)) => m.get(k),
            (Segment::Index(i), Value::Array(a)) => a.get(*i),
            _ => None,
        };
        match next {
            Some(v) => at = v,
            None => return false,
        }
    }
    true
}

/// Takes the value at `path` out of `tree`; whether there was one.
fn remove(tree: &mut Value, path: &[Segment]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut at = tree;
    for segment in parents {
        let next = match (segment, at) {
            (Segment::Key(k), Value::Object(m)) => m.get_mut(k),
            (Segment::Index(i), Value::Array(a)) => a.get_mut(*i),
            _ => None,
        };
        match next {
            Some(v) => at = v,
            None => return false,
        }
    }
    match (last, at) {
        (Segment::Key(k), Value::Object(m)) => m.remove(k).is_some(),
        (Segment::Index(i), Value::Array(a)) if *i < a.len() => {
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
        Format::Yaml => match serde_yaml::from_str::<Value>(text) {
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
            if matches!(serde_yaml::from_str::<Value>(text), Ok(Value::Object(m)) if !m.is_empty())
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

    #[test]
    fn layers_merge_deeply() {
        let mut base = serde_json::json!({"a": {"b": 1, "c": 2}});
        merge(&mut base, serde_json::json!({"a": {"c": 3, "d": 4}}));
        assert_eq!(base, serde_json::json!({"a": {"b": 1, "c": 3, "d": 4}}));
    }
}
