#!/usr/bin/env python3
"""Property-based tests of a live Abide API with schemathesis.

Generates requests for every operation of docs/api/openapi.yaml (the
spec's examples, then random valid requests, then random invalid ones),
sends them over the Unix socket, and checks each response:

- no 5xx other than the codes the operation documents;
- the status code, the content type and the body conform to the spec;
- requests that violate the schema are refused with a 4xx.

Every request has a deadline: a request that gets no answer is a failure
(a hang). File paths in generated bodies are moved into a sandbox
directory, tap names and fds made unusable, migration addresses kept on
loopback or in the sandbox, and vCPU counts and memory kept small, so that
the generated VMs stay harmless to the host.

Prints a JSON report on stdout (per operation: status codes seen,
failures) and exits 1 if anything failed. Run by tests/tests/api_schemathesis.rs
with the venv that resources/scripts/setup.sh makes.

Usage: schemathesis_run.py --spec FILE --socket PATH --sandbox DIR
           [--examples N] [--exclude OPERATION_ID,...] [--last OPERATION_ID]
           [--seed N] [--log FILE]
"""

import argparse
import json
import os
import random
import re
import socket
import sys
import time
import urllib.parse

import requests
import schemathesis
import urllib3
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core import NOT_SET
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode

REQUEST_TIMEOUT_S = 60
PATH_FIELDS = {"path", "kernel", "initrd", "rom"}


class Sandbox:
    """Rewrites generated values that would reach outside the test."""

    def __init__(self, root):
        self.root = root

    def path(self, value):
        if not isinstance(value, str):
            return value
        flat = value.replace("/", "_")[:100]
        return os.path.join(self.root, "p_" + flat)

    def fix(self, value, key=None):
        if isinstance(value, dict):
            return {k: self.fix(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.fix(v, key) for v in value]
        if key in PATH_FIELDS:
            return self.path(value)
        if key == "serial" and isinstance(value, str) and value.startswith("file:"):
            return "file:" + self.path(value[5:])
        if key in ("destination_url", "listen_url") and isinstance(value, str):
            # Migrations stay on this machine: loopback (port 9, where
            # nothing listens, as a destination; any free port to listen
            # on), or a socket in the sandbox.
            if value.startswith("tcp:"):
                return "tcp:127.0.0.1:0" if key == "listen_url" else "tcp:127.0.0.1:9"
            if value.startswith("unix:") and len(value) > 5:
                return "unix:" + self.path(value[5:])
            return value
        if key == "tap" and isinstance(value, str) and 0 < len(value) < 16:
            # An existing interface that is no tap: opening it fails.
            return "lo"
        if key == "fd" and isinstance(value, int) and value >= 0:
            return 1_000_000  # not open in abide
        if key == "cpus" and isinstance(value, int) and value > 2:
            return 2
        if key == "memory" and isinstance(value, int) and value > 512:
            return 256
        return value


class UnixConnection(urllib3.connection.HTTPConnection):
    """HTTP over the API's Unix socket."""

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class UnixPool(urllib3.connectionpool.HTTPConnectionPool):
    def __init__(self, path):
        super().__init__("localhost", timeout=REQUEST_TIMEOUT_S)
        self.unix_path = path

    def _new_conn(self):
        return UnixConnection(self.unix_path, REQUEST_TIMEOUT_S)


class UnixAdapter(requests.adapters.HTTPAdapter):
    """Sends every http://localhost request to one Unix socket."""

    def __init__(self, path):
        super().__init__()
        self.pool = UnixPool(path)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return self.pool

    def get_connection(self, url, proxies=None):
        return self.pool

    def close(self):
        self.pool.close()


def documented(case):
    return {str(code) for code in case.operation.definition.raw.get("responses", {})}


def invalid_parts(case):
    """Whether a case from the negative strategy really sends something
    invalid: an operation without parameters cannot, and an optional body
    the generator left out is no invalid body."""
    meta = case.meta
    if meta is None:
        return False
    for location, component in meta.components.items():
        if not component.mode.is_negative:
            continue
        if location == ParameterLocation.BODY and case.body is NOT_SET:
            continue
        return True
    return False


def events_query_valid(url):
    """Whether the events query, as sent (read back from the request's URL),
    is valid: schemathesis may mark a value invalid whose wire form is valid
    (the string "5" for an integer, a boolean it serialised as "true")."""
    query = urllib.parse.urlsplit(url).query
    seen = set()
    for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if k in seen:
            return False
        seen.add(k)
        if k == "since" and re.fullmatch(r"[0-9]+", v) and int(v) < 1 << 64:
            continue
        if k == "follow" and v in ("true", "false"):
            continue
        return False
    return True


def is_stream(case):
    follow = (case.query or {}).get("follow", True)
    return case.operation.path == "/api/v1/events" and follow in (True, "true")


class Run:
    def __init__(self, args):
        self.args = args
        self.base = "http://localhost"
        self.session = requests.Session()
        self.session.mount("http://", UnixAdapter(args.socket))
        self.sandbox = Sandbox(args.sandbox)
        self.report = {}
        self.log_file = open(args.log, "a") if args.log else None

    def log(self, case, status):
        if self.log_file:
            body = case.body if isinstance(case.body, (dict, list, str, int, float, bool, type(None))) else repr(case.body)
            entry = {"op": case.operation.label, "query": case.query, "body": body, "status": status}
            self.log_file.write(json.dumps(entry, default=repr) + "\n")
            self.log_file.flush()

    def record(self, label, mode, status, failure=None):
        r = self.report.setdefault(label, {"calls": 0, "statuses": {}, "failures": []})
        r["calls"] += 1
        key = str(status)
        r["statuses"][key] = r["statuses"].get(key, 0) + 1
        if failure and len(r["failures"]) < 10:
            r["failures"].append({"mode": mode, "failure": failure})

    def check(self, case, mode, only_invalid=False):
        if only_invalid and not invalid_parts(case):
            return  # would be a valid request: not in this pass
        if case.body is not None and not isinstance(case.body, (bytes, str)):
            case.body = self.sandbox.fix(case.body)
        label = case.operation.label
        try:
            if is_stream(case):
                kwargs = case.as_transport_kwargs(base_url=self.base)
                response = self.session.request(**kwargs, stream=True, timeout=REQUEST_TIMEOUT_S)
                status = response.status_code
                ctype = response.headers.get("content-type", "")
                response.close()
                self.log(case, status)
                problem = None
                sent = response.request.url
                invalid = invalid_parts(case) and not events_query_valid(sent)
                if mode == "negative" and invalid and not 400 <= status < 500:
                    problem = f"an invalid event stream request got {status}: {sent} ({case.as_curl_command()})"
                elif mode != "negative" and (status != 200 or not ctype.startswith("application/x-ndjson")):
                    problem = f"event stream answered {status} {ctype}: {case.as_curl_command()}"
                self.record(label, mode, status, problem)
                return
            response = case.call(base_url=self.base, session=self.session, timeout=REQUEST_TIMEOUT_S)
        except requests.exceptions.Timeout:
            self.record(label, mode, "timeout", f"no answer within {REQUEST_TIMEOUT_S} s: {case.as_curl_command()}")
            return
        except requests.exceptions.RequestException as e:
            self.record(label, mode, "error", f"{type(e).__name__}: {e}: {case.as_curl_command()}")
            return
        status = response.status_code
        self.log(case, status)
        problems = []
        if status >= 500:
            r = self.report.setdefault(label, {"calls": 0, "statuses": {}, "failures": []})
            seen = r.setdefault("server_errors", [])
            if len(seen) < 5:
                seen.append({"status": status, "request": case.as_curl_command(), "body": response.text[:300]})
            if str(status) not in documented(case):
                problems.append(f"undocumented {status}: {response.text[:300]}")
        checks = [status_code_conformance, content_type_conformance, response_schema_conformance]
        if mode == "negative" and invalid_parts(case):
            checks.append(negative_data_rejection)
        try:
            case.validate_response(response, checks=checks)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # FailureGroup and friends: report them all
            problems.append(str(e)[:1500])
        failure = None
        if problems:
            failure = {"request": case.as_curl_command(), "status": status, "problems": problems}
        self.record(label, mode, status, failure)

    def operation(self, op, examples, modes, only_invalid=False):
        strategies = [(m.value, op.as_strategy(generation_mode=m)) for m in modes]
        if GenerationMode.POSITIVE in modes:
            for s in op.get_strategies_from_examples():
                strategies.insert(0, ("example", s))
        for mode, strategy in strategies:
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @seed(self.args.seed)
            @given(case=strategy)
            def run(case):
                self.check(case, mode, only_invalid)

            try:
                run()
            except Unsatisfiable:
                # Nothing to generate in this mode (an operation without
                # parameters or body has no invalid form).
                r = self.report.setdefault(op.label, {"calls": 0, "statuses": {}, "failures": []})
                r.setdefault("modes_without_cases", []).append(mode)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--sandbox", required=True)
    p.add_argument("--examples", type=int, default=20)
    p.add_argument("--exclude", default="")
    p.add_argument("--last", default="")
    p.add_argument("--seed", type=int, default=random.randrange(1 << 32))
    p.add_argument("--log", default="", help="append every request and its status here (JSON lines)")
    args = p.parse_args()
    os.makedirs(args.sandbox, exist_ok=True)
    schema = schemathesis.openapi.from_path(args.spec)
    excluded = {x for x in args.exclude.split(",") if x}
    ops = [r.ok() for r in schema.get_all_operations()]
    op_id = lambda op: op.definition.raw.get("operationId")
    todo = [op for op in ops if op_id(op) not in excluded and op_id(op) != args.last]
    run = Run(args)
    started = time.monotonic()
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    for op in todo:
        run.operation(op, args.examples, modes)
    if args.last:
        # The last operation ends the process (vmm.shutdown): invalid
        # requests first (all refused), then one valid one.
        last = next(op for op in ops if op_id(op) == args.last)
        run.operation(last, args.examples, [GenerationMode.NEGATIVE], only_invalid=True)
        run.operation(last, 1, [GenerationMode.POSITIVE])
    failures = sum(len(r["failures"]) for r in run.report.values())
    summary = {
        "seed": args.seed,
        "seconds": round(time.monotonic() - started, 1),
        "operations": len(run.report),
        "calls": sum(r["calls"] for r in run.report.values()),
        "failures": failures,
        "excluded": sorted(excluded),
        "report": run.report,
    }
    json.dump(summary, sys.stdout, indent=1, sort_keys=True)
    print()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
