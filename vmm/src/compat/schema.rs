//! The manifest's schema evolution rule.
//!
//! A field added to the manifest after a release has a default that means
//! the old behaviour. It is left out of the manifest at that default
//! (`#[serde(default, skip_serializing_if = ...)]`), so manifests of guests
//! that do not use it stay byte-identical to what older releases wrote and
//! compare. And comparison treats an absent field as its default
//! ([`normalize`]), so a newer Abide takes an older snapshot whose
//! manifest predates the field, and an older Abide takes a newer one whose
//! guest keeps the default.
//!
//! Every such field is listed in [`ADDED_FIELDS`], with its default.

use serde_json::Value;

/// A manifest field added after a release: where it lives (dot-separated,
/// `[]` after a name that holds an array) and its default.
#[derive(Clone, Copy, Debug)]
pub struct AddedField {
    /// Path, e.g. `pci.functions[].rom.saved`.
    pub path: &'static str,
    /// Default (as JSON): what absent means.
    pub default: fn() -> Value,
    /// The first release that has it.
    pub since: &'static str,
}

/// Fields added to the manifest since format 1 (0.1.0); the test build
/// adds one more to prove the rule.
pub const ADDED_FIELDS: &[AddedField] = &[
    // `--firmware`: absent for a directly booted guest, which is every
    // guest an older release can run.
    AddedField {
        path: "firmware",
        default: || Value::Null,
        since: "0.4.0",
    },
    #[cfg(test)]
    AddedField {
        path: "test_added_later",
        default: || Value::from(0),
        since: "test build",
    },
];

fn strip(v: &mut Value, segments: &[&str], default: &Value) {
    let Some((first, rest)) = segments.split_first() else {
        return;
    };
    let (key, many) = match first.strip_suffix("[]") {
        Some(k) => (k, true),
        None => (*first, false),
    };
    let Some(obj) = v.as_object_mut() else {
        return;
    };
    if rest.is_empty() && !many {
        if obj.get(key) == Some(default) {
            obj.remove(key);
        }
        return;
    }
    let Some(child) = obj.get_mut(key) else {
        return;
    };
    match (many, child) {
        (true, Value::Array(items)) => items.iter_mut().for_each(|i| strip(i, rest, default)),
        (false, child) => strip(child, rest, default),
        _ => {}
    }
}

/// Removes every added field that holds its default, so that absent and
/// default compare equal.
pub fn normalize(manifest: &mut Value) {
    for f in ADDED_FIELDS {
        let segments: Vec<&str> = f.path.split('.').collect();
        strip(manifest, &segments, &(f.default)());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_and_array_paths_are_stripped_at_their_default_only() {
        let mut v = json!({"a": {"items": [{"x": 0}, {"x": 1}, {"y": 2}]}});
        strip(&mut v, &["a", "items[]", "x"], &json!(0));
        assert_eq!(v, json!({"a": {"items": [{}, {"x": 1}, {"y": 2}]}}));
        let mut v = json!({"top": false, "other": 1});
        strip(&mut v, &["top"], &json!(false));
        assert_eq!(v, json!({"other": 1}));
        // Paths that are not there are left alone.
        let mut v = json!({"a": 1});
        strip(&mut v, &["b", "c[]", "d"], &json!(0));
        assert_eq!(v, json!({"a": 1}));
    }
}
