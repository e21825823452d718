//! The one dry-run mechanism of every writing command: the command builds its plan once
//! (a `byte_tier::plan::Plan`); `--dry-run` prints it (text, or JSON with `--json`) and
//! writes nothing; otherwise the same plan is applied.

use byte_tier::plan::Plan;
use serde::Serialize;
use serde_json::Value;

/// Reports `plan` and returns `None` when `dry_run`; applies it otherwise.
pub fn run<P: Plan>(plan: P, dry_run: bool, json: bool) -> anyhow::Result<Option<P::Applied>> {
    if dry_run {
        report(&plan, plan.is_noop(), json)?;
        return Ok(None);
    }
    Ok(Some(plan.apply()?))
}

/// A plan with what the command adds to its report (the fields of a JSON object, beside
/// the plan's own): reported and applied as the plan.
#[derive(Serialize)]
pub struct Detailed<P> {
    /// The plan.
    #[serde(flatten)]
    pub plan: P,
    /// The command's fields.
    #[serde(flatten)]
    pub details: Value,
}

impl<P: Plan> Plan for Detailed<P> {
    type Applied = P::Applied;
    type Error = P::Error;

    fn is_noop(&self) -> bool {
        self.plan.is_noop()
    }

    fn apply(self) -> Result<P::Applied, P::Error> {
        self.plan.apply()
    }
}

/// Prints what `plan` would do: its JSON with `"dry_run": true` added, or text.
pub fn report(plan: &impl Serialize, noop: bool, json: bool) -> anyhow::Result<()> {
    let mut value = serde_json::to_value(plan)?;
    if let Value::Object(map) = &mut value {
        map.insert("dry_run".to_owned(), Value::Bool(true));
        map.insert("changes_nothing".to_owned(), Value::Bool(noop));
    }
    if json {
        println!("{value}");
    } else {
        print!("{}", text(&value, noop));
    }
    Ok(())
}

/// Keys the text rendering shows in its own words; the rest are printed as they are.
const SHOWN: &[&str] = &[
    "kind",
    "file",
    "output",
    "name",
    "reverts",
    "size_before",
    "size_after",
    "writes",
    "bytes",
    "stamp",
    "stamps",
    "files",
    "removes",
    "dry_run",
    "changes_nothing",
    "marker",
    "renames",
    "keys_added",
    "keys_removed",
    "keys_changed",
    "tensors_added",
    "tensors_removed",
    "tensors_changed",
    "patches",
    // A pipeline's report, which its command prints as a table after the plan.
    "pipeline",
    "target",
    "steps",
    "undo",
];

/// Lines of a list, at most this many items each.
const LIST_ITEMS: usize = 12;

fn list(items: &[Value]) -> String {
    let mut names: Vec<String> = items
        .iter()
        .take(LIST_ITEMS)
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
        .collect();
    if items.len() > LIST_ITEMS {
        names.push(format!("and {} more", items.len() - LIST_ITEMS));
    }
    names.join(", ")
}

fn text(plan: &Value, noop: bool) -> String {
    let field = |key: &str| plan.get(key).cloned().unwrap_or(Value::Null);
    let show = |v: Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let mut out = String::new();
    let file = show(field("file"));
    match field("kind").as_str() {
        _ if noop => out.push_str(&format!("dry run: nothing would change in {file}\n")),
        Some("in_place") => {
            let writes = field("writes");
            let writes = writes.as_array().map_or(&[][..], Vec::as_slice);
            out.push_str(&format!(
                "dry run: would write {} bytes in {} range(s) of {file} in place, as transaction {:?}\n",
                show(field("bytes")),
                writes.len(),
                show(field("name")),
            ));
            for w in writes.iter().take(LIST_ITEMS) {
                let offset = w["offset"].as_u64().unwrap_or(0);
                let len = w["len"].as_u64().unwrap_or(0);
                let place = match (w["tensor"].as_str(), w["key"].as_str()) {
                    (Some(t), _) => format!(" in tensor {t}"),
                    (None, Some(k)) => format!(" in key {k}"),
                    (None, None) => String::new(),
                };
                out.push_str(&format!(
                    "  {offset}..{} ({len} bytes){place}\n",
                    offset + len
                ));
            }
            if writes.len() > LIST_ITEMS {
                out.push_str(&format!("  and {} more\n", writes.len() - LIST_ITEMS));
            }
        }
        Some("config") if field("files").as_array().is_none_or(Vec::is_empty) => {
            for path in field("removes").as_array().map_or(&[][..], Vec::as_slice) {
                out.push_str(&format!("dry run: would remove {}\n", show(path.clone())));
            }
        }
        Some("set_rewrite") => {
            let files = field("files");
            let files = files.as_array().map_or(&[][..], Vec::as_slice);
            out.push_str(&format!(
                "dry run: would rewrite the {} shards of the set of {file}{} ({} -> {} bytes)\n",
                files.len(),
                match field("output").as_str() {
                    Some(prefix) => format!(" into {prefix}-*"),
                    None => " in place".to_owned(),
                },
                show(field("size_before")),
                show(field("size_after")),
            ));
            for f in files {
                if f["rewritten"] != true {
                    out.push_str(&format!("  {}: unchanged\n", show(f["file"].clone())));
                    continue;
                }
                out.push_str(&format!(
                    "  {} -> {} ({} -> {} bytes)\n",
                    show(f["file"].clone()),
                    show(f["output"].clone()),
                    show(f["size_before"].clone()),
                    show(f["size_after"].clone()),
                ));
                for key in ["keys_changed", "tensors_added", "tensors_removed", "tensors_changed"] {
                    if let Some(items) = f.get(key).and_then(Value::as_array)
                        && !items.is_empty()
                    {
                        out.push_str(&format!("    {}: {}\n", key.replace('_', " "), list(items)));
                    }
                }
            }
        }
        Some("set_recovery") => out.push_str(&format!(
            "dry run: would finish the interrupted rewrite of a shard set ({}): {} rename(s) left\n",
            show(field("marker")),
            field("renames").as_array().map_or(0, Vec::len),
        )),
        Some("rewrite") => out.push_str(&format!(
            "dry run: would rewrite {file} into {} ({} -> {} bytes)\n",
            show(field("output")),
            show(field("size_before")),
            show(field("size_after")),
        )),
        _ => {
            let files = field("files");
            for f in files.as_array().map_or(&[][..], Vec::as_slice) {
                let tensors = f["n_tensors"]
                    .as_u64()
                    .map_or_else(String::new, |n| format!("{n} tensors, "));
                let replaces = if f["replaces"].is_object() || f["replaces"] == true {
                    ", replacing the file there"
                } else {
                    ""
                };
                out.push_str(&format!(
                    "dry run: would write {} ({tensors}{} bytes{replaces})\n",
                    show(f["path"].clone()),
                    show(f["n_bytes"].clone()),
                ));
            }
        }
    }
    for key in [
        "keys_added",
        "keys_removed",
        "keys_changed",
        "tensors_added",
        "tensors_removed",
        "tensors_changed",
    ] {
        if let Some(items) = plan.get(key).and_then(Value::as_array)
            && !items.is_empty()
        {
            out.push_str(&format!("  {}: {}\n", key.replace('_', " "), list(items)));
        }
    }
    // Live patches: one line each, with the codec's cost of a value transform.
    for p in field("patches").as_array().map_or(&[][..], Vec::as_slice) {
        let cost = match (p["path"].as_str(), p["rms_error"].as_f64()) {
            (Some(path), Some(rms)) => format!(", {path}, rms error {rms:.3e}"),
            _ => String::new(),
        };
        let over = match p["displaces"].as_array().map_or(0, Vec::len) {
            0 => String::new(),
            n => format!(", over {n} applied patch(es)"),
        };
        out.push_str(&format!(
            "  patch {:?}: {} bytes change{cost}{over}\n",
            show(p["name"].clone()),
            show(p["bytes_changed"].clone()),
        ));
    }
    if let Value::Object(map) = plan {
        for (key, value) in map.iter().filter(|(k, _)| !SHOWN.contains(&k.as_str())) {
            match value {
                // A planner's report: one line per field.
                Value::Object(fields) => {
                    for (field, value) in fields {
                        let value = match value {
                            Value::Array(items) => list(items),
                            other => show(other.clone()),
                        };
                        out.push_str(&format!("  {key}.{field}: {value}\n"));
                    }
                }
                Value::Array(items) if items.is_empty() => {}
                Value::Array(items) => out.push_str(&format!("  {key}: {}\n", list(items))),
                other => out.push_str(&format!("  {key}: {}\n", show(other.clone()))),
            }
        }
    }
    out
}

/// Before a plan that will be applied is made: rolls back an unfinished transaction of
/// `file`'s journal, as opening it for writing would, so that the plan is made from the
/// bytes it will be applied to. A dry run recovers nothing (it writes nothing).
pub fn prepare(
    file: &std::path::Path,
    dry_run: bool,
) -> anyhow::Result<Option<byte_tier::RecoveryReport>> {
    if dry_run || !byte_tier::journal_path(file).exists() {
        return Ok(None);
    }
    if byte_tier::Journal::open_read_only(file)?
        .unfinished()
        .is_none()
    {
        return Ok(None);
    }
    byte_tier::recover(file).map_err(|e| super::patch::with_server_hint(e.into(), file))
}
