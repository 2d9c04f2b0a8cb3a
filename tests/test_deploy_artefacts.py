"""The deployment artefacts in deploy/ are consistent with the code they deploy.

No image is built and nothing is started here: the Dockerfiles, the compose files,
the Kubernetes manifests, the systemd units, the example configs and the runbook
are read and checked against the real command tree (``medmeta.cli.build_parser``),
the real config loader (``load_any_config``) and Flower's own CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from medmeta.cli import build_parser
from medmeta_common.config.deploy import ServerConfig, SiteDeployConfig, load_any_config
from tests.conftest import ROOT, SHARED_DATA

DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yaml"
COMPOSE_FILES = sorted(COMPOSE_DIR.glob("docker-compose*.yaml"))
COMPOSE_CONFIGS = sorted((COMPOSE_DIR / "config").glob("*.yaml"))
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
EXAMPLES = DEPLOY / "examples"
EXAMPLE_CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
README = DEPLOY / "README.md"
SITES = ("hospital-a", "hospital-b", "hospital-c")
# Folders of the compose demo that `medmeta certs` fills (never in git, never in an image).
GENERATED = ("pki", "keys", "sites")
DEFAULT_CMD = {
    "server.Dockerfile": ["server", "start", "--foreground", "--config", "/config/server.yaml"],
    "site.Dockerfile": ["site", "start", "--config", "/config/site.yaml"],
    "site-cuda.Dockerfile": ["site", "start", "--config", "/config/site.yaml"],
}


# --- helpers ---------------------------------------------------------------------------


@functools.cache
def medmeta_parser() -> argparse.ArgumentParser:
    return build_parser()


def medmeta_error(argv: list[str]) -> str | None:
    """Why ``medmeta ARGV`` is not a valid command line, or None when it is."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            args = medmeta_parser().parse_args(argv)
    except SystemExit as exc:
        return f"medmeta {shlex.join(argv)}: {stderr.getvalue().strip() or exc}"
    if not callable(getattr(args, "handler", None)):
        return f"medmeta {shlex.join(argv)}: no command handler"
    return None


def flwr_error(argv: list[str]) -> str | None:
    """Why ``flwr ARGV`` is not a valid Flower CLI command line, or None when it is."""
    import click
    import typer
    from flwr.cli.app import app

    command: Any = typer.main.get_command(app)
    try:
        context = command.make_context("flwr", list(argv))
        rest = list(argv)
        while isinstance(command, click.Group):
            name, command, rest = command.resolve_command(context, rest)
            context = command.make_context(name, list(rest), parent=context)
    except click.exceptions.Exit:
        return None
    except click.ClickException as exc:
        return f"flwr {shlex.join(argv)}: {exc.format_message()}"
    return None


def yaml_documents(path: Path) -> list[Any]:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def load_config_text(text: str, tmp_path: Path, name: str) -> Any:
    path = tmp_path / name
    path.write_text(text)
    return load_any_config(path)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path}: a continuation line at the end"
    return instructions


def dockerfile_exec_form(path: Path, keyword: str) -> list[str]:
    values = [rest for kw, rest in dockerfile_instructions(path) if kw == keyword]
    assert values, f"{path.name}: no {keyword}"
    value = json.loads(values[-1])  # exec form: a JSON array, so signals reach the process
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), value
    return value


def dockerfile_command(path: Path) -> list[str]:
    """The medmeta arguments a container of this image runs by default."""
    entrypoint = dockerfile_exec_form(path, "ENTRYPOINT")
    medmeta = [i for i, token in enumerate(entrypoint) if PurePosixPath(token).name == "medmeta"]
    assert medmeta, f"{path.name}: the entrypoint {entrypoint} does not run medmeta"
    return entrypoint[medmeta[0] + 1:] + dockerfile_exec_form(path, "CMD")


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "ENV":
            for token in shlex.split(rest):
                key, sep, value = token.partition("=")
                if sep:
                    env[key] = value
    return env


def dockerignore_excludes(relative: str) -> bool:
    """Whether the repository's .dockerignore keeps ``relative`` out of the context."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def expand_default(value: str) -> str:
    """``${VAR:-default}`` as compose sees it with VAR unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", value)


def unit_entries(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a systemd unit as lists of (key, value): keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in sections.get(section, []) if k == key]


def shell_commands(text: str) -> Iterator[list[str]]:
    """The simple commands of a shell snippet, as token lists (heredoc bodies skipped)."""
    heredoc: str | None = None
    for line in re.sub(r"\\\n", " ", text).splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        marker = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if marker:
            heredoc = marker.group(1)
            line = line[: marker.start()]
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        command: list[str] = []
        redirected = False
        for token in lexer:
            if token and set(token) <= set(";&|()<>"):
                if "<" in token or ">" in token:  # a redirection: the rest is not argv
                    if command and command[-1].isdigit():
                        command.pop()
                    redirected = True
                    continue
                if command:
                    yield command
                command, redirected = [], False
            elif not redirected:
                command.append(token)
        if command:
            yield command


IMAGE = re.compile(r"^(\S+/)?medmeta-(server|site|site-cuda)(:\S+)?$")


def tool_invocations(text: str) -> Iterator[tuple[str, list[str]]]:
    """(tool, argv) for every `medmeta` and `flwr` command in a shell snippet.

    Understands the wrappers the runbook uses: environment assignments, ``sudo -u``,
    ``docker compose exec SERVICE``, ``docker run ... IMAGE`` (the images' entrypoint
    is medmeta) and ``kubectl exec ... --``.
    """
    for tokens in shell_commands(text):
        while tokens:
            head = tokens[0]
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", head) or head == "env":
                tokens = tokens[1:]
            elif head == "sudo":
                tokens = tokens[1:]
                while tokens and tokens[0].startswith("-"):
                    tokens = tokens[2:] if tokens[0] in ("-u", "-g") else tokens[1:]
            elif tokens[:3] == ["docker", "compose", "exec"]:
                tokens = tokens[3:]
                while tokens and tokens[0].startswith("-"):
                    takes_value = tokens[0] in ("-u", "--user", "-w", "--workdir", "-e", "--env")
                    tokens = tokens[2:] if takes_value else tokens[1:]
                tokens = tokens[1:]  # the service
            elif tokens[:2] == ["docker", "run"]:
                images = [i for i, t in enumerate(tokens) if IMAGE.match(t)]
                tokens = ["medmeta", *tokens[images[0] + 1:]] if images else []
            elif head == "kubectl" and "exec" in tokens and "--" in tokens:
                tokens = tokens[tokens.index("--") + 1:]
            else:
                break
        if not tokens:
            continue
        name = PurePosixPath(tokens[0]).name
        if name in ("medmeta", "flwr") and (name == tokens[0] or "bin" in tokens[0]):
            yield name, tokens[1:]


def fenced_shell_blocks(markdown: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", markdown, flags=re.S)


def fill_placeholders(text: str) -> str:
    """Stand-ins for the runbook's <placeholders> (an integer where Flower wants an ID)."""
    text = re.sub(r"<[a-z-]*id>", "1234", text)
    return re.sub(r"<([a-z][a-z -]*)>", lambda m: m.group(1).replace(" ", "-"), text)


def container_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


# --- the helpers catch what they should --------------------------------------------------


def test_command_checks_reject_what_does_not_exist() -> None:
    assert medmeta_error(["site", "start", "--config", "/config/site.yaml"]) is None
    assert medmeta_error(["server", "launch", "--config", "s.yaml"]) is not None
    assert medmeta_error(["site", "start"]) is not None  # --config is required
    assert medmeta_error(["site", "start", "--config", "x", "--foreground"]) is not None
    assert medmeta_error(["server"]) is not None
    assert flwr_error(["supernode", "unregister", "1234", "medmeta"]) is None
    assert flwr_error(["supernode", "remove", "1234"]) is not None
    assert flwr_error(["supernode", "unregister", "hospital-a"]) is not None  # an ID is an int
    snippet = ("FLWR_HOME=s/flwr_home .venv/bin/flwr supernode ls medmeta && "
               "sudo -u medmeta /opt/medmeta/.venv/bin/medmeta server status --config x\n"
               "docker compose exec -T server medmeta privacy report --state /state  # c\n"
               "docker run --rm -v \"$PWD:/w\" medmeta-server:latest certs init --out /w\n"
               "cd /opt/medmeta; useradd --system medmeta\n"
               "python - <<'EOF'\nmedmeta = 'it''s not a command'\nEOF\n"
               "medmeta config check x.yaml 2>/dev/null || echo no\n")
    assert list(tool_invocations(snippet)) == [
        ("flwr", ["supernode", "ls", "medmeta"]),
        ("medmeta", ["server", "status", "--config", "x"]),
        ("medmeta", ["privacy", "report", "--state", "/state"]),
        ("medmeta", ["certs", "init", "--out", "/w"]),
        ("medmeta", ["config", "check", "x.yaml"]),
    ]
    assert dockerignore_excludes(".venv/bin/python")
    assert not dockerignore_excludes("pyproject.toml")


# --- the files are there -----------------------------------------------------------------


def test_the_expected_artefacts_exist() -> None:
    expected = [
        ROOT / ".dockerignore", README,
        DEPLOY / "docker/server.Dockerfile", DEPLOY / "docker/site.Dockerfile",
        DEPLOY / "docker/site-cuda.Dockerfile", COMPOSE_FILE,
        COMPOSE_DIR / "config/server.yaml", DEPLOY / "k8s/server.yaml", DEPLOY / "k8s/site.yaml",
        DEPLOY / "systemd/medmeta-site@.service", DEPLOY / "systemd/medmeta-server.service",
        EXAMPLES / "server.yaml",
        *(COMPOSE_DIR / f"config/{s}.yaml" for s in SITES),
        *(EXAMPLES / f"{s}.yaml" for s in SITES),
    ]
    missing = [str(p.relative_to(ROOT)) for p in expected if not p.is_file()]
    assert not missing
    assert "placeholder" not in README.read_text().lower()


# --- Docker ------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_medmeta_as_a_non_root_user(dockerfile: Path) -> None:
    instructions = dockerfile_instructions(dockerfile)
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, f"{dockerfile.name}: no USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    env = dockerfile_env(dockerfile)
    assert env.get("FLWR_TELEMETRY_ENABLED") == "0"
    assert env.get("FLWR_DISABLE_UPDATE_CHECK") == "1"
    command = dockerfile_command(dockerfile)
    assert medmeta_error(command) is None
    assert command == DEFAULT_CMD[dockerfile.name]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_torch_then_the_repository_editable(dockerfile: Path) -> None:
    runs = [rest for keyword, rest in dockerfile_instructions(dockerfile) if keyword == "RUN"]
    torch = [i for i, r in enumerate(runs) if re.search(r"pip install .*TORCH_SPEC", r)]
    editable = [i for i, r in enumerate(runs) if re.search(r"pip install (--no-deps )?-e \.", r)]
    assert torch and editable and torch[0] < editable[0]
    # `flwr run` builds the app from the checkout: the repository goes in whole.
    copies = [rest for keyword, rest in dockerfile_instructions(dockerfile) if keyword == "COPY"]
    assert ". ." in copies
    for copy in copies:
        for source in copy.split()[:-1]:
            if source != ".":
                assert (ROOT / source).exists() and not dockerignore_excludes(source), source


def test_cuda_image_starts_from_a_cuda_image_and_keeps_its_torch() -> None:
    path = DEPLOY / "docker/site-cuda.Dockerfile"
    instructions = dockerfile_instructions(path)
    args = dict(rest.split("=", 1) for keyword, rest in instructions
                if keyword == "ARG" and "=" in rest)
    base = next(rest for keyword, rest in instructions if keyword == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base.startswith(("nvidia/cuda:", "pytorch/pytorch:"))
    assert "cpu" not in args.get("TORCH_INDEX_URL", "")
    installs = [step for keyword, rest in instructions if keyword == "RUN"
                for step in rest.split("&&") if "pip install" in step and "-e ." in step]
    assert installs
    for step in installs:  # the project's install must not replace the CUDA torch
        assert "torch" not in step and not re.search(r"(-U|--upgrade|--force-reinstall)\b", step)


@pytest.mark.parametrize("relative", [".venv/bin/python", "runs/demo/checkpoint.pt", ".git/HEAD",
                                      ".bench_data/x.npz", ".whl/opacus.whl",
                                      "server/__pycache__/app.cpython-311.pyc",
                                      "deploy/compose/pki/ca.key", "deploy/compose/keys/a/a.key",
                                      "deploy/compose/sites/hospital-a.pub", "some/site.key"])
def test_dockerignore_keeps_environments_data_and_keys_out(relative: str) -> None:
    assert dockerignore_excludes(relative)


@pytest.mark.parametrize("relative", ["pyproject.toml", "README.md", ".gitignore",
                                      "medmeta/cli.py", "medmeta_common/pki.py",
                                      "server/superlink.py", "client/supernode.py"])
def test_dockerignore_keeps_what_the_images_need(relative: str) -> None:
    assert not dockerignore_excludes(relative)


# --- Docker Compose ----------------------------------------------------------------------


def compose() -> dict[str, Any]:
    documents = yaml_documents(COMPOSE_FILE)
    assert len(documents) == 1
    return documents[0]


def volume_source(volume: Any) -> tuple[str, str, str, bool]:
    """(type, source, target, read_only) of a compose volume entry."""
    if isinstance(volume, dict):
        return (volume["type"], volume["source"], volume["target"],
                bool(volume.get("read_only", False)))
    parts = volume.split(":")
    kind = "bind" if parts[0].startswith((".", "/", "$", "~")) else "volume"
    return kind, parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_parse_and_their_builds_exist(path: Path) -> None:
    base_services = compose()["services"]
    (document,) = yaml_documents(path)
    for name, service in document["services"].items():
        build = service.get("build")
        if build is None:
            continue
        base_build = base_services.get(name, {}).get("build", {})
        context = (path.parent / build.get("context", base_build.get("context", "."))).resolve()
        assert (context / "pyproject.toml").is_file(), f"{name}: context {context}"
        dockerfile = context / build.get("dockerfile", base_build.get("dockerfile", "Dockerfile"))
        assert dockerfile.is_file(), f"{name}: {dockerfile}"
        assert dockerfile.resolve() in [d.resolve() for d in DOCKERFILES]


def test_compose_runs_one_server_and_three_sites() -> None:
    services = compose()["services"]
    assert set(services) == {"server", *SITES}
    for name, service in services.items():
        dockerfile = ROOT / service["build"]["dockerfile"]
        default = dockerfile_command(dockerfile)
        command = service.get("command", default)
        assert medmeta_error(command) is None, command
        assert command[0] == ("server" if name == "server" else "site")
        assert command[1] == "start"
    assert any(str(p).endswith(":8000") or p == 8000 for p in services["server"]["ports"])
    assert "server" in services["hospital-a"]["depends_on"]


def test_compose_mounts_exist_secrets_are_read_only_and_state_is_a_named_volume() -> None:
    document = compose()
    declared = set(document.get("volumes", {}))
    state_volumes = []
    for name, service in document["services"].items():
        targets = {}
        for entry in service["volumes"]:
            kind, source, target, read_only = volume_source(entry)
            targets[target] = (kind, source, read_only)
            if kind == "volume":
                assert source in declared, f"{name}: volume {source} is not declared"
                continue
            source = expand_default(source)
            resolved = (COMPOSE_DIR / source).resolve()
            top = PurePosixPath(source).parts[0] if source.startswith("./") else None
            if target.startswith("/config/"):
                assert resolved.is_file(), f"{name}: {source} does not exist"
            elif top in GENERATED:
                assert dockerignore_excludes(f"deploy/compose/{top}/x")  # made by medmeta certs
            else:  # the images: ../shared/data by default
                assert target == "/data"
                assert resolved.is_relative_to(SHARED_DATA.resolve()) or \
                    resolved.is_relative_to((ROOT.parent / "shared" / "data").resolve())
            assert read_only, f"{name}: {source} is mounted writable"
        assert targets["/state"][0] == "volume"
        state_volumes.append(targets["/state"][1])
        assert "/pki/ca.key" not in targets  # the CA's key never leaves the operator
    assert len(set(state_volumes)) == len(state_volumes)  # a ledger per site


@pytest.mark.parametrize("path", COMPOSE_CONFIGS + EXAMPLE_CONFIGS,
                         ids=lambda p: str(p.relative_to(DEPLOY)))
def test_deploy_configs_validate(path: Path) -> None:
    config = load_any_config(path)
    assert isinstance(config, ServerConfig | SiteDeployConfig)
    assert not (config.superlink.insecure if isinstance(config, ServerConfig)
                else config.insecure), "examples must show the secure set-up"


def test_compose_configs_match_their_mounts() -> None:
    services = compose()["services"]
    mounts = {name: {volume_source(v)[2] for v in s["volumes"]} for name, s in services.items()}
    server = load_any_config(COMPOSE_DIR / "config/server.yaml")
    assert isinstance(server, ServerConfig)
    assert server.state_dir == "/state"
    for file in ("ca.crt", "server.pem", "server.key"):
        assert f"{server.superlink.certificates}/{file}" in mounts["server"]
    assert [s.name for s in server.sites] == list(SITES)
    for site in server.sites:
        assert any(site.public_key.startswith(m + "/") for m in mounts["server"]), site
    for name in SITES:
        mount = next(volume_source(v) for v in services[name]["volumes"]
                     if volume_source(v)[2] == "/config/site.yaml")
        config = load_any_config(COMPOSE_DIR / mount[1])
        assert isinstance(config, SiteDeployConfig)
        assert config.name == name
        assert config.state_dir == "/state"
        assert config.root_certificate in mounts[name]
        assert config.private_key in mounts[name]
        assert str(PurePosixPath(config.data.path).parent) in mounts[name]
        host, _, port = config.superlink.rpartition(":")
        assert host == "server" and int(port) == server.superlink.port
        # the key is mounted from where `medmeta certs site --out keys/<site>` puts it
        key = next(volume_source(v)[1] for v in services[name]["volumes"]
                   if volume_source(v)[2] == config.private_key)
        assert key == f"./keys/{name}/{name}.key"


# --- Kubernetes --------------------------------------------------------------------------


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_k8s_manifests_parse(path: Path) -> None:
    documents = yaml_documents(path)
    assert documents
    for doc in documents:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        assert doc["metadata"].get("name")


def k8s_objects() -> dict[str, list[dict[str, Any]]]:
    return {p.name: yaml_documents(p) for p in K8S_FILES}


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_k8s_commands_volumes_and_references(path: Path) -> None:
    documents = yaml_documents(path)
    defined = {(d["kind"], d["metadata"]["name"])
               for docs in k8s_objects().values() for d in docs}
    for doc in documents:
        if doc["kind"] not in ("StatefulSet", "Deployment"):
            continue
        spec = doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in doc["spec"].get("volumeClaimTemplates", [])}
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert doc["spec"]["selector"]["matchLabels"].items() <= \
            doc["spec"]["template"]["metadata"]["labels"].items()
        for volume in volumes.values():
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in defined, volume
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in defined, volume
        for container in container_specs(doc):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, mount
            command = container.get("command")
            if command is None:  # the image's entrypoint: medmeta
                assert medmeta_error(container["args"]) is None, container["args"]
            elif PurePosixPath(command[0]).name == "medmeta":
                assert medmeta_error(command[1:] + container.get("args", [])) is None


def workload(kind_of_config: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The StatefulSet/Deployment that runs ``medmeta <kind> start``, and its file."""
    for documents in k8s_objects().values():
        for doc in documents:
            if doc["kind"] in ("StatefulSet", "Deployment"):
                for container in doc["spec"]["template"]["spec"]["containers"]:
                    if container.get("args", [])[:2] == [kind_of_config, "start"]:
                        return doc, documents
    raise AssertionError(f"no workload runs `medmeta {kind_of_config} start`")


def mounted_config(doc: dict[str, Any], documents: list[dict[str, Any]], container: dict,
                   tmp_path: Path) -> Any:
    config_path = container["args"][container["args"].index("--config") + 1]
    mount = next(m for m in container["volumeMounts"]
                 if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in doc["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    config_map = next(d for d in documents if d["kind"] == "ConfigMap"
                      and d["metadata"]["name"] == volume["configMap"]["name"])
    key = config_path[len(mount["mountPath"]) + 1:]
    return load_config_text(config_map["data"][key], tmp_path, key)


def under_a_mount(path: str, container: dict[str, Any]) -> bool:
    return any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
               for m in container["volumeMounts"])


def test_k8s_server_has_state_claim_service_and_valid_config(tmp_path: Path) -> None:
    doc, documents = workload("server")
    container = doc["spec"]["template"]["spec"]["containers"][0]
    config = mounted_config(doc, documents, container, tmp_path)
    assert isinstance(config, ServerConfig)
    state = next(m for m in container["volumeMounts"] if m["mountPath"] == config.state_dir)
    assert state["name"] in {c["metadata"]["name"] for c in doc["spec"]["volumeClaimTemplates"]}
    assert under_a_mount(config.superlink.certificates or "", container)
    assert all(under_a_mount(s.public_key, container) for s in config.sites)
    service = next(d for d in documents if d["kind"] == "Service")
    assert service["spec"]["selector"].items() <= \
        doc["spec"]["template"]["metadata"]["labels"].items()
    port = service["spec"]["ports"][0]
    assert port["port"] == config.superlink.port == 8000
    container_ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert container_ports[port["targetPort"]] == config.superlink.port
    assert doc["spec"]["replicas"] == 1


def test_k8s_site_has_state_claim_keys_data_and_valid_config(tmp_path: Path) -> None:
    doc, documents = workload("site")
    container = doc["spec"]["template"]["spec"]["containers"][0]
    config = mounted_config(doc, documents, container, tmp_path)
    assert isinstance(config, SiteDeployConfig)
    state = next(m for m in container["volumeMounts"] if m["mountPath"] == config.state_dir)
    assert state["name"] in {c["metadata"]["name"] for c in doc["spec"]["volumeClaimTemplates"]}
    for path in (config.root_certificate, config.private_key, config.data.path):
        assert path is not None and under_a_mount(path, container), path
    data = next(m for m in container["volumeMounts"] if config.data.path.startswith(m["mountPath"]))
    assert data.get("readOnly") is True
    assert "nvidia.com/gpu" in (DEPLOY / "k8s/site.yaml").read_text()
    assert doc["spec"]["replicas"] == 1


# --- systemd -----------------------------------------------------------------------------


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_units_have_the_expected_sections_and_hardening(unit: Path) -> None:
    sections = unit_entries(unit)
    assert {"Unit", "Service", "Install"} <= set(sections)
    assert unit_values(sections, "Install", "WantedBy") == ["multi-user.target"]
    assert unit_values(sections, "Service", "Restart") == ["on-failure"]
    user = unit_values(sections, "Service", "User")
    assert user and user[-1] not in ("root", "0")
    assert unit_values(sections, "Service", "NoNewPrivileges") == ["yes"]
    assert unit_values(sections, "Service", "ProtectSystem") == ["strict"]
    state = [f"/var/lib/{d}" for d in unit_values(sections, "Service", "StateDirectory")]
    writable = " ".join(unit_values(sections, "Service", "ReadWritePaths")).split()
    assert state and set(state) <= set(writable)
    for key in ("ExecStartPre", "ExecStart", "ExecStop"):
        for line in unit_values(sections, "Service", key):
            argv = shlex.split(line.lstrip("-@+!:").replace("%i", "hospital-a"))
            assert argv[0] == "/opt/medmeta/.venv/bin/medmeta", line
            assert medmeta_error(argv[1:]) is None, line


def test_systemd_site_unit_is_a_template_for_the_site_config() -> None:
    sections = unit_entries(DEPLOY / "systemd/medmeta-site@.service")
    assert unit_values(sections, "Service", "ExecStart") == [
        "/opt/medmeta/.venv/bin/medmeta site start --config /etc/medmeta/%i.yaml"]
    assert "/var/lib/medmeta/%i" in " ".join(unit_values(sections, "Service", "ReadWritePaths"))
    server = unit_entries(DEPLOY / "systemd/medmeta-server.service")
    (start,) = unit_values(server, "Service", "ExecStart")
    assert shlex.split(start)[1:4] == ["server", "start", "--foreground"]


# --- the loopback examples ---------------------------------------------------------------


def test_loopback_examples_fit_together() -> None:
    server = load_any_config(EXAMPLES / "server.yaml")
    assert isinstance(server, ServerConfig)
    sites = [load_any_config(EXAMPLES / f"{name}.yaml") for name in SITES]
    assert all(isinstance(s, SiteDeployConfig) for s in sites)
    assert [s.name for s in sites] == [s.name for s in server.sites] == list(SITES)
    assert len({s.port for s in sites}) == len(sites)  # one SuperNode API port per site
    assert len({s.state_dir for s in sites} | {server.state_dir}) == len(sites) + 1
    for site in sites:
        assert site.superlink == f"127.0.0.1:{server.superlink.port}"
        assert server.superlink.host == "127.0.0.1" and server.superlink.port == 8000
        # state, keys and the PKI under runs/ (ignored by git, left out of images)
        for path in (site.state_dir, site.private_key, site.root_certificate):
            assert Path(path or "").is_relative_to(ROOT / "runs"), path
        # the operator registers the key the site makes
        registered = next(s for s in server.sites if s.name == site.name)
        assert Path(registered.public_key).name == Path(site.public_key or "").name
        # the images come from ../shared/data, the folder the project's tests use
        data = Path(site.data.path)
        assert data.is_relative_to((ROOT.parent / "shared" / "data").resolve())
        if SHARED_DATA.is_dir():
            assert data.is_file(), data
    for path in (server.state_dir, server.superlink.certificates):
        assert Path(path or "").is_relative_to(ROOT / "runs"), path


# --- the runbook -------------------------------------------------------------------------


def runbook_invocations() -> list[tuple[str, list[str]]]:
    return [inv for block in fenced_shell_blocks(README.read_text())
            for inv in tool_invocations(fill_placeholders(block))]


def test_runbook_documents_only_commands_that_exist() -> None:
    invocations = runbook_invocations()
    errors = [medmeta_error(argv) for tool, argv in invocations
              if tool == "medmeta"]
    errors += [flwr_error(argv) for tool, argv in invocations
               if tool == "flwr"]
    assert not [e for e in errors if e]
    used = {tuple(argv[:2]) for tool, argv in invocations if tool == "medmeta"}
    for command in [("certs", "init"), ("certs", "server"), ("certs", "site"),
                    ("server", "start"), ("server", "status"), ("server", "stop"),
                    ("site", "check"), ("site", "start"), ("privacy", "report"),
                    ("config", "check")]:
        assert command in used, f"the runbook never shows `medmeta {' '.join(command)}`"
    flwr = {tuple(argv[:2]) for tool, argv in invocations if tool == "flwr"}
    assert ("supernode", "unregister") in flwr


def test_runbook_server_certificates_cover_loopback() -> None:
    # `medmeta server start` reaches a SuperLink listening on 0.0.0.0 at 127.0.0.1,
    # with TLS: every server certificate the runbook makes must name it.
    made = [argv for tool, argv in runbook_invocations() if argv[:2] == ["certs", "server"]]
    assert made
    for argv in made:
        hosts = [argv[i + 1] for i, token in enumerate(argv) if token == "--host"]
        assert "127.0.0.1" in hosts, argv
    compose_hosts = [argv for argv in made if "server" in argv[2:]]
    assert compose_hosts, "the compose walk-through must make a certificate for `server`"


def test_runbook_points_to_every_artefact() -> None:
    text = README.read_text()
    for path in [*EXAMPLE_CONFIGS, *DOCKERFILES, *COMPOSE_FILES, *K8S_FILES, *UNITS]:
        assert str(path.relative_to(DEPLOY)) in text or str(path.relative_to(ROOT)) in text, path
