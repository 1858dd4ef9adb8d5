"""deploy/compose.yaml and deploy/Dockerfile, checked without a Docker engine.

* the compose file validates against the Compose Specification JSON schema (``../shared``);
* its structure keeps each party's secrets and data with that party, TLS and SuperNode
  authentication on, no SuperLink port reachable from outside the host;
* every ``fairsplit`` command in it (also inside ``sh -c`` scripts) names a real subcommand and
  only options that subcommand accepts, read from the installed CLI; any Flower command only
  flags its ``--help`` lists;
* the party configs it mounts load with the project's own config loaders;
* the Dockerfile's ENTRYPOINT is the ``fairsplit`` console script of pyproject.toml.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import click
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"

#: Which party each service belongs to. A new service must be added here (and so be reviewed).
PARTY = {"developer-certs": "developer", "superlink": "developer",
         "auditor-keys": "auditor", "auditor": "auditor"}
#: Volumes both parties may mount: public material only (the CA certificate, the auditor's
#: SuperNode public key).
SHARED_VOLUMES = {"public"}
FLOWER_COMMANDS = ("flower-superlink", "flower-supernode", "flwr", "flower-superexec")
SHELLS = ("sh", "bash", "dash", "ash")
SHELL_OPERATORS = {";", "&&", "||", "|", "&", "(", ")", ";;"}


# ---------------------------------------------------------------------------------------------
# Reading the files
# ---------------------------------------------------------------------------------------------


@functools.cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, continuation lines joined."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form ENTRYPOINT/CMD, or None for the shell form."""
    try:
        val = json.loads(args)
    except json.JSONDecodeError:
        return None
    return val if isinstance(val, list) and all(isinstance(v, str) for v in val) else None


def image_entrypoint_and_cmd() -> tuple[list[str], list[str]]:
    entry, cmd = [], []
    for word, args in dockerfile_instructions():
        if word in ("ENTRYPOINT", "CMD"):
            form = _exec_form(args)
            val = form if form is not None else ["/bin/sh", "-c", args]
            if word == "ENTRYPOINT":
                entry, cmd = val, []  # a later ENTRYPOINT resets CMD, as in Docker
            else:
                cmd = val
    return entry, cmd


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def service_argv(svc: dict) -> list[str]:
    """The process a service runs: entrypoint + command, with Docker's override rules."""
    image_entry, image_cmd = image_entrypoint_and_cmd()
    if "entrypoint" in svc:
        entry = _as_list(svc["entrypoint"])
        cmd = _as_list(svc.get("command"))  # overriding the entrypoint drops the image's CMD
    else:
        entry = image_entry
        cmd = _as_list(svc["command"]) if "command" in svc else image_cmd
    return entry + cmd


def split_shell(script: str) -> list[list[str]]:
    """Simple commands of a (simple) shell script: words split at ; && || | & ( ) newlines."""
    lex = shlex.shlex(script.replace("\n", " ; "), posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    cmds, cur = [], []
    for tok in lex:
        if tok in SHELL_OPERATORS:
            if cur:
                cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    if cur:
        cmds.append(cur)
    return cmds


def simple_commands(argv: list[str]) -> list[list[str]]:
    """The commands a process runs: itself, or each command of an ``sh -c`` script."""
    if not argv:
        return []
    if PurePosixPath(argv[0]).name in SHELLS and "-c" in argv:
        i = argv.index("-c")
        if i + 1 >= len(argv):
            return []
        out = []
        for c in split_shell(argv[i + 1]):
            while c and c[0] in ("exec", "command", "env"):
                c = c[1:]
            if c:
                out.append(c)
        return out
    return [argv]


@dataclass
class Cmd:
    service: str
    argv: list[str]  # program name first

    @property
    def program(self) -> str:
        return PurePosixPath(self.argv[0]).name

    def opt(self, name: str) -> str | None:
        """The value of option ``name`` (``--x v`` or ``--x=v``; last one wins), or None."""
        val = None
        for i, tok in enumerate(self.argv):
            if tok == name and i + 1 < len(self.argv):
                val = self.argv[i + 1]
            elif tok.startswith(name + "="):
                val = tok.split("=", 1)[1]
        return val

    def opts(self, name: str) -> list[str]:
        return [self.argv[i + 1] for i, t in enumerate(self.argv[:-1]) if t == name] + \
               [t.split("=", 1)[1] for t in self.argv if t.startswith(name + "=")]


def all_commands() -> list[Cmd]:
    """Every command line in the compose file: each service's process and healthcheck."""
    out = []
    for name, svc in services().items():
        for argv in simple_commands(service_argv(svc)):
            out.append(Cmd(name, argv))
        test = (svc.get("healthcheck") or {}).get("test")
        if isinstance(test, str):
            test = ["CMD-SHELL", test]
        if test and test[0] == "CMD":
            out.append(Cmd(name, list(test[1:])))
        elif test and test[0] == "CMD-SHELL":
            out += [Cmd(name, c) for c in split_shell(" ".join(test[1:]))]
    return out


def fairsplit_commands(sub: str | None = None) -> list[Cmd]:
    cmds = [c for c in all_commands() if c.program == "fairsplit"]
    return [c for c in cmds if len(c.argv) > 1 and c.argv[1] == sub] if sub else cmds


def only_one(sub: str, service: str) -> Cmd:
    found = [c for c in fairsplit_commands(sub) if c.service == service]
    assert len(found) == 1, f"expected one `fairsplit {sub}` in service {service!r}, found {len(found)}"
    return found[0]


@dataclass
class Mount:
    type: str
    source: str | None
    target: str
    read_only: bool


def mounts(svc: dict) -> list[Mount]:
    """A service's mounts, short and long syntax normalised."""
    out = []
    declared = set((compose().get("volumes") or {}))
    for m in svc.get("volumes") or []:
        if isinstance(m, str):
            parts = m.split(":")
            if len(parts) == 1:
                out.append(Mount("volume", None, parts[0], False))
                continue
            src, tgt, mode = parts[0], parts[1], (parts[2] if len(parts) > 2 else "")
            kind = "volume" if src in declared or not re.match(r"^[./~$]", src) else "bind"
            out.append(Mount(kind, src, tgt, "ro" in mode.split(",")))
        else:
            ro = m.get("read_only", False)
            out.append(Mount(m["type"], m.get("source"), m["target"],
                             ro is True or str(ro).lower() == "true"))
    return out


def mount_for(service: str, path: str) -> Mount | None:
    """The mount a container path lies under (the deepest one)."""
    p = PurePosixPath(path)
    best = None
    for m in mounts(services()[service]):
        t = PurePosixPath(m.target)
        if p == t or t in p.parents:
            if best is None or len(t.parts) > len(PurePosixPath(best.target).parts):
                best = m
    return best


def source_party(m: Mount) -> str | None:
    """Which party a mount source belongs to, by name ('auditor-data', ./compose/auditor.toml)."""
    name = PurePosixPath(m.source or "").name if m.type == "bind" else (m.source or "")
    parties = {p for p in ("developer", "auditor") if p in name}
    if len(parties) > 1:
        raise AssertionError(f"mount source {m.source!r} names both parties")
    return parties.pop() if parties else None


# ---------------------------------------------------------------------------------------------
# (a) Compose Specification schema
# ---------------------------------------------------------------------------------------------


def test_compose_file_validates_against_compose_spec(shared_path):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a dev dependency")
    schema = json.loads(shared_path("schemas/compose-spec.json").read_text())
    # the file's $schema (".../draft-07/schema", no "#") is not one jsonschema recognises by URI
    validator_cls = (jsonschema.Draft7Validator if "draft-07" in schema.get("$schema", "")
                     else jsonschema.validators.validator_for(schema))
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "compose.yaml violates the Compose Specification:\n" + "\n".join(
        f"  {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


# ---------------------------------------------------------------------------------------------
# (b) structure: roles, TLS, secrets and data separation, ports, dependencies
# ---------------------------------------------------------------------------------------------


def test_services_and_roles():
    svcs = services()
    assert {"superlink", "auditor"} <= set(svcs)
    unknown = set(svcs) - set(PARTY)
    assert not unknown, f"services without a party in tests/test_compose.py: {sorted(unknown)}"
    only_one("developer", "superlink")
    only_one("auditor", "auditor")
    image_entry, _ = image_entrypoint_and_cmd()
    for name, svc in svcs.items():
        build = svc.get("build")
        assert build, f"{name}: must build the project image"
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert ((COMPOSE.parent / context / dockerfile).resolve() == DOCKERFILE.resolve()), \
            f"{name}: builds {context}/{dockerfile}, not deploy/Dockerfile"
        assert (COMPOSE.parent / context).resolve() == REPO, f"{name}: build context is not the repo root"
    assert image_entry, "Dockerfile has no ENTRYPOINT"


def test_tls_and_node_authentication_on():
    dev = only_one("developer", "superlink")
    aud = only_one("auditor", "auditor")
    for c, flags in ((dev, ("--certs", "--auditor-key")),
                     (aud, ("--root-certificates", "--auth-key", "--superlink"))):
        for flag in flags:
            assert c.opt(flag), f"{c.service}: `fairsplit {c.argv[1]}` lacks {flag}"

    def strings(obj):
        if isinstance(obj, str):
            yield obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield str(k)
                yield from strings(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from strings(v)

    offending = [s for s in strings(compose()) if "--insecure" in s]
    assert not offending, f"--insecure in compose.yaml: {offending}"
    for c in all_commands():
        assert "--insecure" not in c.argv, f"{c.service}: {c.argv}"


def test_auditor_dials_the_superlink_under_a_certified_name():
    dev = only_one("developer", "superlink")
    aud = only_one("auditor", "auditor")
    host, _, port = aud.opt("--superlink").rpartition(":")
    assert host == "superlink", f"the auditor dials {host!r}, not the superlink service"
    assert port == (dev.opt("--port") or "9092"), "the auditor dials another port than the SuperLink's"
    dev_certs = [c for c in fairsplit_commands("certs") if PARTY[c.service] == "developer"]
    assert dev_certs, "no developer certificate step (`fairsplit certs`)"
    sans = {"localhost", "127.0.0.1"} | {s for c in dev_certs for s in c.opts("--san")}
    assert host in sans, f"SuperLink certificate SANs {sorted(sans)} do not cover {host!r}"
    assert dev.opt("--host") == "0.0.0.0", "the SuperLink must listen beyond its own loopback"


def test_tls_material_comes_from_the_right_volumes():
    dev = only_one("developer", "superlink")
    aud = only_one("auditor", "auditor")
    certs = mount_for("superlink", dev.opt("--certs"))
    assert certs and certs.type == "volume" and source_party(certs) == "developer", certs
    pub = mount_for("superlink", dev.opt("--auditor-key"))
    assert pub and pub.source in SHARED_VOLUMES, f"auditor public key not from a shared volume: {pub}"
    ca = mount_for("auditor", aud.opt("--root-certificates"))
    assert ca and ca.source in SHARED_VOLUMES, f"CA certificate not from a shared volume: {ca}"
    key = mount_for("auditor", aud.opt("--auth-key"))
    assert key and key.type == "volume" and source_party(key) == "auditor", \
        f"the auditor's private key must come from an auditor-only volume: {key}"


def test_certificate_steps_write_into_their_own_partys_volumes():
    steps = fairsplit_commands("certs")
    assert {PARTY[c.service] for c in steps} == {"developer", "auditor"}, \
        "expected one certificate step per party"
    for c in steps:
        party = PARTY[c.service]
        only = c.opt("--only")
        assert only == ("superlink" if party == "developer" else "supernode"), \
            f"{c.service}: `--only {only}` makes the other party's secrets"
        out = mount_for(c.service, c.opt("--out"))
        assert out and out.type == "volume" and source_party(out) == party and not out.read_only, \
            f"{c.service}: --out {c.opt('--out')} is not in a writable {party}-only volume ({out})"
    # what the cert steps copy into a shared volume is public material only
    for name in PARTY:
        for argv in simple_commands(service_argv(services()[name])):
            if PurePosixPath(argv[0]).name in ("cp", "install"):
                dest = mount_for(name, argv[-1])
                if dest and dest.source in SHARED_VOLUMES:
                    for src in argv[1:-1]:
                        if src.startswith("-"):
                            continue
                        assert src.endswith((".pub", "ca.pem")), \
                            f"{name}: copies {src} into shared volume {dest.source}"


def test_each_partys_volumes_stay_with_that_party():
    svcs = services()
    declared = compose().get("volumes") or {}
    used_by: dict[str, set[str]] = {}
    for name, svc in svcs.items():
        for m in mounts(svc):
            if m.type == "volume" and m.source:
                assert m.source in declared, f"{name}: volume {m.source!r} is not declared"
                used_by.setdefault(m.source, set()).add(name)
            party = source_party(m)
            if m.type in ("volume", "bind") and m.source not in SHARED_VOLUMES:
                assert party == PARTY[name], (
                    f"{name} ({PARTY[name]}) mounts {m.source!r}, which belongs to "
                    f"{party or 'no party'}")
    for vol in SHARED_VOLUMES & set(used_by):
        for name in used_by[vol]:
            if name in ("superlink", "auditor"):
                m = next(m for m in mounts(svcs[name]) if m.source == vol)
                assert m.read_only, f"{name}: shared volume {vol} must be read-only"
    # explicitly: the auditor's private key and data never reach the developer's services
    assert "superlink" not in used_by.get("auditor-secrets", set())
    assert used_by.get("auditor-data") == {"auditor"}, used_by.get("auditor-data")
    assert used_by.get("developer-data") == {"superlink"}, used_by.get("developer-data")
    assert used_by.get("auditor-secrets") == {"auditor-keys", "auditor"}
    assert used_by.get("developer-secrets") == {"developer-certs", "superlink"}


def test_data_and_configs_are_read_only():
    for service, volume in (("superlink", "developer-data"), ("auditor", "auditor-data")):
        m = [m for m in mounts(services()[service]) if m.source == volume]
        assert m and all(x.read_only for x in m), f"{service}: {volume} must be mounted read-only"
    for service, sub in (("superlink", "developer"), ("auditor", "auditor")):
        cfg = mount_for(service, only_one(sub, service).opt("--config"))
        assert cfg and cfg.type == "bind" and cfg.read_only, f"{service}: config mount {cfg}"


def test_superlink_port_not_published_beyond_loopback():
    for name, svc in services().items():
        for p in svc.get("ports") or []:
            assert name == "superlink", f"{name} publishes {p}; only the SuperLink may, on loopback"
            if isinstance(p, dict):
                host_ip = p.get("host_ip")
            else:
                parts = str(p).rsplit(":", 2)
                host_ip = parts[0] if len(parts) == 3 else None
            assert host_ip in ("127.0.0.1", "[::1]", "::1"), \
                f"superlink publishes {p} beyond loopback (the Control API has no user auth)"


def test_certificate_steps_are_dependencies():
    steps = {c.service for c in fairsplit_commands("certs")}
    assert steps
    for name in ("superlink", "auditor"):
        deps = services()[name].get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        for step in steps:
            assert step in deps, f"{name} does not depend on {step}"
            assert deps[step].get("condition") == "service_completed_successfully", \
                f"{name} -> {step}: condition must be service_completed_successfully"


# ---------------------------------------------------------------------------------------------
# (c) every command and flag exists in the installed CLIs
# ---------------------------------------------------------------------------------------------


@functools.cache
def fairsplit_root() -> click.Command:
    import typer.main

    import fairsplit.deploy.cli as deploy_cli

    return typer.main.get_command(deploy_cli.app)


def check_fairsplit_argv(args: list[str]) -> list[str]:
    """Problems with ``fairsplit <args>`` against the real CLI (empty list: accepted)."""
    cmd, path, i = fairsplit_root(), ["fairsplit"], 0
    while isinstance(cmd, click.Group):
        if i < len(args) and args[i].startswith("-"):  # a group-level option
            names = {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts}
            if args[i] == "--help":
                return []
            if args[i].split("=")[0] not in names:
                return [f"`{' '.join(path)}` has no option {args[i]}"]
            i += 1
            continue
        if i >= len(args):
            return [f"`{' '.join(path)}` needs a subcommand"]
        sub = cmd.commands.get(args[i])
        if sub is None:
            return [f"`{' '.join(path)}` has no subcommand {args[i]!r} "
                    f"(has: {', '.join(sorted(cmd.commands))})"]
        cmd, path, i = sub, path + [args[i]], i + 1
    options = {o: p for p in cmd.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}
    options.setdefault("--help", None)
    arguments = [p for p in cmd.params if isinstance(p, click.Argument)]
    problems, positional, seen = [], [], set()
    rest = args[i:]
    j = 0
    while j < len(rest):
        tok = rest[j]
        if tok.startswith("-") and tok != "-":
            name, eq, value = tok.partition("=")
            param = options.get(name)
            if name not in options:
                problems.append(f"`{' '.join(path)}` has no option {name}")
                if not eq and j + 1 < len(rest) and not rest[j + 1].startswith("-"):
                    j += 1  # most likely its value; not a positional argument
            elif param is not None:
                seen.add(param.name)
                if not (param.is_flag or param.count):
                    if not eq:
                        j += 1
                        if j >= len(rest):
                            problems.append(f"`{' '.join(path)} {name}` needs a value")
                            break
                        value = rest[j]
                    if not isinstance(param.type, (click.Path, click.File)):
                        try:
                            param.type.convert(value, param, None)
                        except click.BadParameter as err:
                            problems.append(f"`{' '.join(path)} {name} {value}`: {err.message}")
        else:
            positional.append(tok)
        j += 1
    capacity = sum(float("inf") if a.nargs < 0 else a.nargs for a in arguments)
    if len(positional) > capacity:
        problems.append(f"`{' '.join(path)}` got unexpected arguments {positional}")
    for p in cmd.params:
        if isinstance(p, click.Option) and p.required and p.name not in seen:
            problems.append(f"`{' '.join(path)}` misses required option {p.opts[0]}")
    return problems


@functools.cache
def flower_flags(program: str, sub: str | None = None) -> frozenset[str]:
    """Flags in the ``--help`` output of an installed Flower command (``flwr <sub>``)."""
    argv = [program] + ([sub] if sub else []) + ["--help"]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.fail(f"{program} is not installed")
    text = res.stdout + res.stderr
    assert res.returncode == 0, f"`{' '.join(argv)}` failed: {text[-1000:]}"
    return frozenset(re.findall(r"(?<![\w-])(--[A-Za-z0-9][A-Za-z0-9-]*)", text))


def check_flower_argv(argv: list[str]) -> list[str]:
    program = PurePosixPath(argv[0]).name
    sub = None
    rest = argv[1:]
    if program == "flwr":
        if not rest or rest[0].startswith("-"):
            return ["`flwr` needs a subcommand"]
        sub, rest = rest[0], rest[1:]
    known = flower_flags(program, sub)
    label = program + (f" {sub}" if sub else "")
    return [f"`{label}` has no flag {t.split('=')[0]}" for t in rest
            if t.startswith("--") and t.split("=")[0] not in known]


def test_the_flag_checkers_reject_what_the_clis_reject():
    assert check_fairsplit_argv(["run", "--config", "x.toml"]) == []
    assert check_fairsplit_argv(["nosuchcmd"])
    assert check_fairsplit_argv(["run", "--config", "x.toml", "--no-such-flag"])
    assert check_fairsplit_argv(["run"])  # --config is required
    assert check_fairsplit_argv(["developer", "--config", "d.toml", "--port", "notanint"])
    assert check_fairsplit_argv(["bench", "fairness", "--config", "r.toml"]) == []
    assert check_flower_argv(["flower-supernode", "--superlink", "x:1", "--root-certificates", "ca.pem"]) == []
    assert check_flower_argv(["flower-supernode", "--no-such-flag"])


def test_every_fairsplit_command_is_accepted_by_the_cli():
    cmds = fairsplit_commands()
    used = {c.argv[1] for c in cmds if len(c.argv) > 1}
    assert {"certs", "developer", "auditor"} <= used, f"fairsplit subcommands found: {sorted(used)}"
    problems = [f"{c.service}: {p}" for c in cmds for p in check_fairsplit_argv(c.argv[1:])]
    assert not problems, "compose.yaml uses what the fairsplit CLI does not accept:\n  " + \
        "\n  ".join(problems)


def test_every_flower_command_is_accepted_by_flower():
    problems = [f"{c.service}: {p}" for c in all_commands() if c.program in FLOWER_COMMANDS
                for p in check_flower_argv(c.argv)]
    assert not problems, "\n".join(problems)


def test_only_known_programs_run():
    allowed = {"fairsplit", "cp", "test", "[", "mkdir", "chmod", "true", *FLOWER_COMMANDS}
    for c in all_commands():
        assert c.program in allowed, f"{c.service} runs {c.program!r}; add a check for it"


# ---------------------------------------------------------------------------------------------
# Party configs mounted by the compose file
# ---------------------------------------------------------------------------------------------


def _host_config(service: str, sub: str) -> Path:
    container_path = only_one(sub, service).opt("--config")
    m = mount_for(service, container_path)
    assert m and m.type == "bind", f"{service}: --config {container_path} is not a bind mount"
    rel = PurePosixPath(container_path).relative_to(m.target)
    host = (COMPOSE.parent / m.source / rel).resolve()
    assert host.is_file(), f"{service}: {host} does not exist"
    return host


def test_party_configs_load_and_agree():
    from fairsplit.auditor.config import load_auditor_file
    from fairsplit.developer.config import load_developer_file
    from fairsplit.protocol.config import experiment_fingerprint

    dev = load_developer_file(_host_config("superlink", "developer"))
    aud = load_auditor_file(_host_config("auditor", "auditor"))
    assert experiment_fingerprint(dev.experiment) == experiment_fingerprint(aud.experiment)
    # the demo needs no external data: both parties use the embedded synthetic source
    assert dev.developer.data.kind == "synthetic" and aud.auditor.data.kind == "synthetic"


def test_auditor_state_is_in_an_auditor_volume():
    aud_cfg = tomllib.loads(_host_config("auditor", "auditor").read_text())
    aud = only_one("auditor", "auditor")
    for path in filter(None, (aud_cfg["auditor"].get("state_dir"), aud.opt("--logs"))):
        m = mount_for("auditor", path)
        assert m and m.type == "volume" and source_party(m) == "auditor" and not m.read_only, \
            f"auditor writes {path} outside a writable auditor-only volume ({m})"
    out = mount_for("superlink", only_one("developer", "superlink").opt("--out"))
    assert out and out.type == "volume" and source_party(out) == "developer" and not out.read_only


# ---------------------------------------------------------------------------------------------
# (d) the Dockerfile
# ---------------------------------------------------------------------------------------------


def test_dockerfile_entrypoint_is_the_console_script():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entry, cmd = image_entrypoint_and_cmd()
    assert entry and PurePosixPath(entry[0]).name in scripts, \
        f"ENTRYPOINT {entry} is not a console script of pyproject.toml ({sorted(scripts)})"
    assert entry[0] == "fairsplit"
    problems = check_fairsplit_argv(entry[1:] + cmd)
    assert not problems, problems


def test_dockerfile_basics():
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    assert ins[0][0] == "FROM" and ins[0][1].startswith("python:3.11-slim")
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert re.search(r"pip install[^&]*\btorch\b[^&]*\btorchvision\b[^&]*--index-url", runs)
    assert re.search(r"pip install[^&]*\s\.(\s|$)", runs), "the project itself is not installed"
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as non-root"
    assert words.index("USER") < words.index("ENTRYPOINT")
    env = " ".join(a for w, a in ins if w == "ENV")
    assert "FLWR_TELEMETRY_ENABLED=0" in env and "HF_HUB_OFFLINE=1" in env


def test_dockerignore_keeps_the_context_clean():
    lines = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")}
    for pattern in (".git", "runs/", "fairsplit-*/", "**/__pycache__"):
        assert pattern in lines, f".dockerignore lacks {pattern}"
