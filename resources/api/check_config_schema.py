#!/usr/bin/env python3
"""Checks VM configurations against the VmConfig schema of the API spec.

The command line and the API share one configuration schema. This takes
JSON files (written by `abide config` for sets of flags, or made up) and
checks that each one the caller says is valid conforms to
components.schemas.VmConfig of docs/api/openapi.yaml, that each one said to
be invalid does not, and that the union of the fields in the --full files
(configurations with every flag given) is exactly the schema's fields, at
the top and in each device entry: a flag without a schema field, or a
schema field without a flag, fails.

Prints a JSON report; exits 1 on any mismatch. Run by tests/tests/api_config.rs.

Usage: check_config_schema.py SPEC [--valid F ...] [--invalid F ...] [--full F ...]
"""

import argparse
import json
import sys

import jsonschema
import yaml


def validator(spec):
    root = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": "#/components/schemas/VmConfig",
        "components": spec["components"],
    }
    return jsonschema.Draft202012Validator(root)


def properties(spec, name):
    return set(spec["components"]["schemas"][name]["properties"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("spec")
    p.add_argument("--valid", nargs="*", default=[])
    p.add_argument("--invalid", nargs="*", default=[])
    p.add_argument("--full", nargs="*", default=[])
    a = p.parse_args()
    with open(a.spec) as f:
        spec = yaml.safe_load(f)
    v = validator(spec)
    problems = []
    for path in a.valid + a.full:
        with open(path) as f:
            doc = json.load(f)
        errors = [e.message for e in v.iter_errors(doc)]
        if errors:
            problems.append({"file": path, "expected": "valid", "errors": errors[:5]})
    for path in a.invalid:
        with open(path) as f:
            doc = json.load(f)
        if v.is_valid(doc):
            problems.append({"file": path, "expected": "invalid", "errors": []})
    if a.full:
        seen = {"VmConfig": set(), "DiskConfig": set(), "NetConfig": set(), "RngConfig": set()}
        for path in a.full:
            with open(path) as f:
                doc = json.load(f)
            seen["VmConfig"] |= set(doc)
            for d in doc.get("disks", []):
                seen["DiskConfig"] |= set(d)
            for n in doc.get("nets", []):
                seen["NetConfig"] |= set(n)
            if isinstance(doc.get("rng"), dict):
                seen["RngConfig"] |= set(doc["rng"])
        for name, fields in seen.items():
            want = properties(spec, name)
            if fields != want:
                problems.append({
                    "schema": name,
                    "only_in_the_command_line": sorted(fields - want),
                    "only_in_the_spec": sorted(want - fields),
                })
    json.dump({"checked": len(a.valid) + len(a.invalid) + len(a.full), "problems": problems}, sys.stdout, indent=1)
    print()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
