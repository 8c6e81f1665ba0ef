"""The deployment files agree with the code they run.

Every command in docker-compose.yml, the Dockerfile and the Procfile must name a Celery app, a WSGI
callable, a scheduler class or a management command that exists, so that a rename in the code cannot
leave a container that starts and dies. The README and the CI entry point must keep the two-command
promise. None of these tests touch the database.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from celery import Celery
from celery.app.utils import find_app
from celery.beat import Scheduler
from django.conf import settings
from django.core.management import get_commands
from django.urls import resolve

# Importing the WSGI app starts whitenoise, which warns that var/static/ is missing before collectstatic.
pytestmark = pytest.mark.filterwarnings("ignore:No directory at:UserWarning")

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("web", "worker", "beat")
HEALTHCHECKED_SERVICES = ("postgres", "redis", "web", "worker")
LONG_RUNNING_SERVICES = ("postgres", "redis", "web", "worker", "beat")
SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash"}
COMMAND_SEPARATORS = {"&&", "||", ";"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def service_ids(name: str) -> str:
    # A bare parameter id is a keyword: `-k redis` must not pick these tests, which only read a file.
    return f"{name}-service"


# --- Reading the files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def split_commands(command: str | list) -> list[list[str]]:
    """The simple commands in a compose/Procfile command: a string or a list, chained with ``&&`` and
    possibly wrapped in ``sh -c "..."``. Leading ``exec`` and ``VAR=value`` assignments are dropped."""
    argv = shlex.split(command) if isinstance(command, str) else [str(part) for part in command]
    if len(argv) >= 3 and argv[0] in SHELLS and argv[1].startswith("-") and argv[1].endswith("c"):
        return split_commands(argv[2])
    commands: list[list[str]] = []
    current: list[str] = []
    for token in [*argv, "&&"]:
        if token in COMMAND_SEPARATORS:
            while current and (current[0] == "exec" or ENV_ASSIGNMENT.match(current[0])):
                current = current[1:]
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    return commands


def healthcheck_commands(healthcheck: dict) -> list[list[str]]:
    test = healthcheck["test"]
    if isinstance(test, str):
        return split_commands(test)
    kind, *rest = test
    if kind == "CMD-SHELL":
        return split_commands(rest[0])
    if kind == "CMD":
        return split_commands(rest)
    return []


def service_commands(service: dict) -> list[list[str]]:
    commands = split_commands(service["command"]) if "command" in service else []
    if "healthcheck" in service:
        commands += healthcheck_commands(service["healthcheck"])
    return commands


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: str(value) for key, value in env.items()}


def depends_on(service: dict) -> dict[str, str]:
    """Service name -> condition (compose's short list form means ``service_started``)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def instruction_argv(arguments: str) -> list[str]:
    """A CMD/ENTRYPOINT in exec form (JSON) or shell form."""
    if arguments.startswith("["):
        return json.loads(arguments)
    return shlex.split(arguments)


def procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


# --- Checking one command against the code --------------------------------------------------------------


def option_value(argv: list[str], *names: str) -> str | None:
    for index, token in enumerate(argv):
        for name in names:
            if token == name and index + 1 < len(argv):
                return argv[index + 1]
            if name.startswith("--") and token.startswith(name + "="):
                return token.split("=", 1)[1]
    return None


@pytest.fixture(autouse=True)
def _a_production_secret_key(settings):
    """Importing the WSGI module checks for a secret key, as a production start does."""
    settings.SECRET_KEY_IS_SET = True


def import_path(path: str) -> object:
    """``package.module:Name`` or ``package.module.Name``."""
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def program(argv: list[str]) -> str:
    """The program a command runs, seen through ``python -m``."""
    name = Path(argv[0]).name
    if name.startswith("python") and len(argv) > 2 and argv[1] == "-m":
        return argv[2]
    return name


def program_args(argv: list[str]) -> list[str]:
    name = Path(argv[0]).name
    if name.startswith("python") and len(argv) > 2 and argv[1] == "-m":
        return argv[3:]
    return argv[1:]


def manage_command(argv: list[str]) -> str | None:
    if Path(argv[0]).name.startswith("python") and len(argv) > 2 and Path(argv[1]).name == "manage.py":
        return argv[2]
    return None


def check_command(argv: list[str]) -> bool:
    """Assert that what ``argv`` names exists; return whether it was a command this test knows how to check
    (python manage.py, celery, gunicorn). Others (pg_isready, redis-cli, python -c) pass unchecked."""
    where = shlex.join(argv)
    if (command := manage_command(argv)) is not None:
        assert command in get_commands(), f"{where}: no management command {command!r}"
        return True
    name, args = program(argv), program_args(argv)
    if name == "celery":
        app_name = option_value(args, "-A", "--app")
        assert app_name, f"{where}: celery needs -A/--app"
        assert importlib.util.find_spec(app_name.partition(":")[0]) is not None, (
            f"{where}: no module {app_name}"
        )
        assert isinstance(find_app(app_name), Celery), f"{where}: {app_name} is not a Celery app"
        scheduler = option_value(args, "-S", "--scheduler")
        if scheduler:
            scheduler_class = import_path(scheduler)
            assert issubclass(scheduler_class, Scheduler), f"{where}: {scheduler} is not a beat scheduler"
        return True
    if name == "gunicorn":
        targets = [arg for arg in args if re.fullmatch(r"[\w.]+:\w+", arg)]
        assert targets, f"{where}: gunicorn needs a module:callable"
        module_name, _, attribute = targets[0].partition(":")
        assert importlib.util.find_spec(module_name) is not None, f"{where}: no module {module_name}"
        module = importlib.import_module(module_name)
        assert hasattr(module, attribute), f"{where}: {module_name} has no {attribute}"
        assert callable(getattr(module, attribute)), f"{where}: {targets[0]} is not callable"
        return True
    if Path(argv[0]).name.startswith("python") and len(argv) > 2 and argv[1] == "-m":
        assert importlib.util.find_spec(argv[2]) is not None, f"{where}: no module {argv[2]}"
    return False


def runs(commands: list[list[str]], name: str) -> bool:
    return any(manage_command(argv) == name for argv in commands)


# --- The helpers themselves -----------------------------------------------------------------------------


def test_split_commands_handles_strings_lists_chains_and_shell_wrappers():
    expected = [
        ["python", "manage.py", "migrate", "--noinput"],
        ["python", "manage.py", "load_reference_data"],
    ]
    chained = "python manage.py migrate --noinput && python manage.py load_reference_data"
    assert split_commands(chained) == expected
    assert split_commands(["sh", "-c", chained]) == expected
    assert split_commands(f"sh -c '{chained}'") == expected
    assert split_commands(["celery", "-A", "axiom_grid", "worker"]) == [
        ["celery", "-A", "axiom_grid", "worker"]
    ]
    assert split_commands("DEBUG=true exec gunicorn a:b") == [["gunicorn", "a:b"]]


def test_check_command_refuses_names_that_do_not_exist():
    with pytest.raises(AssertionError):
        check_command(["python", "manage.py", "no_such_command"])
    with pytest.raises(AssertionError):
        check_command(["gunicorn", "axiom_grid.wsgi:no_such_app"])
    with pytest.raises(ImportError):
        check_command(["celery", "-A", "axiom_grid", "beat", "--scheduler", "no_such_module:Scheduler"])


# --- docker-compose.yml ---------------------------------------------------------------------------------


def test_compose_file_uses_the_compose_spec_without_a_version_key(compose):
    assert "version" not in compose


def test_compose_has_database_broker_web_worker_and_beat(services):
    for name in ("postgres", "redis", *APP_SERVICES):
        assert name in services, f"docker-compose.yml has no {name!r} service"
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")


@pytest.mark.parametrize("name", HEALTHCHECKED_SERVICES, ids=service_ids)
def test_service_has_a_health_check(services, name):
    healthcheck = services[name].get("healthcheck")
    assert healthcheck, f"{name} has no healthcheck"
    assert not healthcheck.get("disable")
    assert healthcheck_commands(healthcheck), f"{name}'s healthcheck runs nothing"


@pytest.mark.parametrize("name", LONG_RUNNING_SERVICES, ids=service_ids)
def test_long_running_service_restarts_unless_stopped(services, name):
    assert services[name].get("restart") == "unless-stopped"


def test_app_services_run_one_image_built_from_the_project(services):
    builds = {name: services[name].get("build") for name in APP_SERVICES}
    images = {name: services[name].get("image") for name in APP_SERVICES}
    assert len({json.dumps(build, sort_keys=True) for build in builds.values()}) == 1, builds
    assert len(set(images.values())) == 1, images
    build = builds["web"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert context in {".", "./"}
    assert images["web"] == "axiom-grid"


def test_every_compose_command_names_code_that_exists(services):
    for name, service in services.items():
        checked = [argv for argv in service_commands(service) if check_command(argv)]
        if name in APP_SERVICES:
            assert checked, f"{name}'s command was not recognised"


def test_web_serves_the_wsgi_app_on_port_8000_and_checks_healthz(services):
    web = services["web"]
    (command,) = split_commands(web["command"])
    assert program(command) == "gunicorn"
    assert "axiom_grid.wsgi:application" in command
    assert option_value(program_args(command), "-b", "--bind") == "0.0.0.0:8000"
    assert any(str(port).endswith("8000") for port in web.get("ports", []))
    probe = " ".join(" ".join(argv) for argv in healthcheck_commands(web["healthcheck"]))
    assert "http://127.0.0.1:8000/healthz" in probe
    assert "curl" not in probe, "python:3.11-slim has no curl"
    assert resolve("/healthz").url_name == "healthz"


def test_worker_keeps_its_metrics_in_a_fresh_directory_and_serves_them_unpublished(services):
    """The pool processes' metrics add up only in a shared directory, emptied at each start (tmpfs); the
    worker serves them without a key, so on the compose network only."""
    worker = services["worker"]
    env = environment(worker)
    assert env["PROMETHEUS_MULTIPROC_DIR"] in worker.get("tmpfs", [])
    host, _, port = env["METRICS_BIND"].rpartition(":")
    assert host == "0.0.0.0" and port.isdigit()
    assert not worker.get("ports"), "the metrics need no key: they must not be published"
    assert environment(worker).items() >= environment(services["web"]).items()  # the same app otherwise


def test_worker_and_beat_run_celery_with_the_database_scheduler(services):
    (worker,) = split_commands(services["worker"]["command"])
    assert program(worker) == "celery" and "worker" in worker
    (beat,) = split_commands(services["beat"]["command"])
    assert program(beat) == "celery" and "beat" in beat
    scheduler = option_value(program_args(beat), "-S", "--scheduler")
    assert scheduler, "beat must name its scheduler"
    from django_celery_beat.schedulers import DatabaseScheduler

    assert import_path(scheduler) is DatabaseScheduler
    probe = healthcheck_commands(services["worker"]["healthcheck"])
    assert any(program(argv) == "celery" and "ping" in argv for argv in probe)


def test_migrations_and_reference_data_run_on_start(services):
    """Either web migrates before it serves, or a one-shot service does and every app service waits for it."""
    web_commands = split_commands(services["web"]["command"])
    if runs(web_commands, "migrate"):
        assert runs(web_commands, "load_reference_data")
        return
    migrators = [name for name, service in services.items() if runs(service_commands(service), "migrate")]
    assert migrators, "nothing runs `python manage.py migrate` on start"
    (migrator,) = migrators
    commands = split_commands(services[migrator]["command"])
    assert runs(commands, "load_reference_data")
    assert [manage_command(argv) for argv in commands].index("migrate") == 0, "migrate must run first"
    assert services[migrator].get("restart", "no") == "no", "a one-shot service must not restart"
    for name in APP_SERVICES:
        assert depends_on(services[name]).get(migrator) == "service_completed_successfully", name


@pytest.mark.parametrize("name", APP_SERVICES, ids=service_ids)
def test_app_service_waits_for_healthy_postgres_and_redis(services, name):
    deps = depends_on(services[name])
    assert deps.get("postgres") == "service_healthy"
    assert deps.get("redis") == "service_healthy"


@pytest.mark.parametrize("name", APP_SERVICES, ids=service_ids)
def test_app_service_environment_points_at_the_compose_database_and_redis(services, name):
    env = environment(services[name])
    database = urlsplit(env["DATABASE_URL"])
    assert database.scheme in {"postgres", "postgresql"}
    assert (database.hostname, database.port) == ("postgres", 5432)
    postgres_env = environment(services["postgres"])
    assert database.username == postgres_env["POSTGRES_USER"]
    assert database.password == postgres_env["POSTGRES_PASSWORD"]
    assert database.path.lstrip("/") == postgres_env["POSTGRES_DB"]
    redis = urlsplit(env["REDIS_URL"])
    assert redis.scheme == "redis"
    assert (redis.hostname, redis.port) == ("redis", 6379)


@pytest.mark.parametrize("name", APP_SERVICES, ids=service_ids)
def test_app_service_environment_is_production_like(services, name):
    env = environment(services[name])
    assert env["SECRET_KEY"].startswith("${SECRET_KEY:?"), "compose must refuse to start without SECRET_KEY"
    assert env["DEBUG"].lower() == "false"
    assert env["STATIC_MANIFEST"].lower() == "true"
    assert "127.0.0.1" in env["ALLOWED_HOSTS"], "the web health check calls 127.0.0.1"
    flags = [setting for setting in dir(settings) if setting.startswith("ENABLE_")]
    assert len(flags) == 4, flags
    for flag in flags:
        assert env.get(flag) == f"${{{flag}:-true}}", flag


# --- docker-compose.yml: the `scale` profile, more than one node -----------------------------------------

SCALE_PROFILE = "scale"


def running(services: dict[str, dict], *profiles: str) -> dict[str, dict]:
    """The services ``docker compose --profile P ... up`` starts: those without profiles, and those in one of
    ``profiles``."""
    return {
        name: service
        for name, service in services.items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }


def role(service: dict) -> str | None:
    """web (gunicorn), worker or beat (celery), from what the service runs; None for anything else."""
    commands = split_commands(service["command"]) if "command" in service else []
    if len(commands) != 1:
        return None
    (argv,) = commands
    if program(argv) == "gunicorn":
        return "web"
    if program(argv) == "celery":
        return next((word for word in program_args(argv) if word in {"worker", "beat"}), None)
    return None


def roles(services: dict[str, dict]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, service in services.items():
        if (kind := role(service)) is not None:
            found.setdefault(kind, []).append(name)
    return found


def published_host_ports(service: dict) -> set[str]:
    ports = set()
    for port in service.get("ports", []):
        host, _, container = str(port).rpartition(":")
        ports.add(host.rpartition(":")[2] or container)
    return ports


def test_without_a_profile_compose_runs_one_web_one_worker_and_one_beat(services):
    assert roles(running(services)) == {"web": ["web"], "worker": ["worker"], "beat": ["beat"]}


def test_the_scale_profile_runs_two_web_nodes_two_workers_and_still_one_beat(services):
    started = running(services, SCALE_PROFILE)
    found = roles(started)
    assert len(found["web"]) == 2, found
    assert len(found["worker"]) == 2, found
    # A second beat would send every schedule twice.
    assert found["beat"] == ["beat"], found
    assert not services["beat"].get("profiles"), "beat must run in every profile, and only once"
    for name in ("postgres", "redis", "migrate"):
        assert name in started and not services[name].get("profiles"), f"{name} is shared by every node"
    assert [name for name in started if services[name].get("profiles")] == [
        name for kind in ("web", "worker") for name in found[kind] if name not in {"web", "worker"}
    ], "the profile adds nodes only"


@pytest.mark.parametrize("kind", ["web", "worker"])
def test_a_scaled_node_is_the_same_service_as_the_first(services, kind):
    """The second node runs the same image, command, environment, health check and dependencies: only its
    profile and its published port differ."""
    (first,) = roles(running(services))[kind]
    (second,) = [name for name in roles(running(services, SCALE_PROFILE))[kind] if name != first]
    assert services[second]["profiles"] == [SCALE_PROFILE]
    differing = {"profiles", "ports"}
    same = {key: value for key, value in services[first].items() if key not in differing}
    other = {key: value for key, value in services[second].items() if key not in differing}
    assert other == same


def test_the_web_nodes_publish_different_host_ports_for_the_same_container_port(services):
    web_nodes = roles(running(services, SCALE_PROFILE))["web"]
    host_ports = [published_host_ports(services[name]) for name in web_nodes]
    assert all(len(ports) == 1 for ports in host_ports), host_ports
    assert len(set.union(*host_ports)) == len(web_nodes), f"two nodes cannot publish one port: {host_ports}"
    for name in web_nodes:
        (port,) = services[name]["ports"]
        assert str(port).endswith(":8000"), "gunicorn binds 8000 inside every container"


def test_every_node_of_the_scale_profile_shares_one_database_and_one_redis(services):
    started = running(services, SCALE_PROFILE)
    nodes = [name for names in roles(started).values() for name in names]
    assert len(nodes) == 5
    urls = {
        (environment(services[name])["DATABASE_URL"], environment(services[name])["REDIS_URL"])
        for name in nodes
    }
    assert len(urls) == 1, urls
    for name in nodes:
        deps = depends_on(services[name])
        assert deps.get("postgres") == "service_healthy" and deps.get("redis") == "service_healthy", name
        assert deps.get("migrate") == "service_completed_successfully", name


# --- Dockerfile and .dockerignore -----------------------------------------------------------------------


def test_dockerfile_cmd_serves_a_wsgi_callable_that_exists():
    commands = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "CMD"]
    assert commands, "the Dockerfile has no CMD"
    argv = instruction_argv(commands[-1])
    assert program(argv) == "gunicorn"
    assert check_command(argv)
    assert option_value(program_args(argv), "-b", "--bind") == "0.0.0.0:8000"


def test_dockerfile_builds_from_python_slim_as_a_non_root_user():
    instructions = dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert keywords.index("USER") < len(keywords) - 1 - keywords[::-1].index("CMD")
    assert ("EXPOSE", "8000") in instructions


def test_dockerfile_installs_dependencies_before_copying_the_source():
    instructions = dockerfile_instructions()
    copies = [index for index, (keyword, _) in enumerate(instructions) if keyword == "COPY"]
    first_copy = instructions[copies[0]][1].split()
    assert "pyproject.toml" in first_copy and "README.md" in first_copy
    install = next(
        index
        for index, (keyword, arguments) in enumerate(instructions)
        if keyword == "RUN" and "pip install ." in arguments
    )
    source_copy = next(index for index in copies if instructions[index][1].split()[-2:-1] == ["."])
    assert copies[0] < install < source_copy


def test_dockerfile_collects_static_files_for_the_manifest_storage():
    instructions = dockerfile_instructions()
    collect = next(
        index
        for index, (keyword, arguments) in enumerate(instructions)
        if keyword == "RUN" and "manage.py collectstatic --noinput" in arguments
    )
    before = " ".join(
        arguments for keyword, arguments in instructions[: collect + 1] if keyword in {"ENV", "RUN"}
    )
    assert "STATIC_MANIFEST=true" in before
    assert "collectstatic" in get_commands()


def test_dockerignore_keeps_local_state_out_but_not_the_build_inputs():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "var"} <= ignored
    assert not ignored & {"pyproject.toml", "README.md", "manage.py", "axiom_grid", "*"}


def test_collectstatic_works_with_the_manifest_storage(tmp_path):
    """What the image build runs: no database, no broker, a throwaway key, the manifest storage."""
    env = {key: value for key, value in os.environ.items() if key not in {"DATABASE_URL", "REDIS_URL"}}
    env.update(STATIC_MANIFEST="true", SECRET_KEY="test-build-key", AXIOM_VAR_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "static" / "staticfiles.json").read_text(encoding="utf-8"))
    assert "admin/css/base.css" in manifest["paths"]


# --- Procfile (make run) --------------------------------------------------------------------------------


def test_procfile_runs_web_worker_and_beat():
    entries = procfile()
    assert {"web", "worker", "beat"} <= set(entries)
    (worker,) = split_commands(entries["worker"])
    assert program(worker) == "celery" and "worker" in worker
    (beat,) = split_commands(entries["beat"])
    assert program(beat) == "celery" and "beat" in beat
    from django_celery_beat.schedulers import DatabaseScheduler

    assert import_path(option_value(program_args(beat), "-S", "--scheduler")) is DatabaseScheduler


def test_procfile_web_is_gunicorn_with_bounded_threads_on_loopback():
    """`make run` serves as production does: gunicorn's threaded workers, a fixed number of threads (so of
    database connections), on the address the README promises."""
    (web,) = split_commands(procfile()["web"])
    args = program_args(web)
    assert program(web) == "gunicorn"
    assert "axiom_grid.wsgi:application" in args
    assert option_value(args, "-b", "--bind") == "127.0.0.1:8000"
    assert option_value(args, "-k", "--worker-class") == "gthread"
    assert option_value(args, "-w", "--workers") == "${WEB_CONCURRENCY:-2}"
    assert option_value(args, "--threads") == "${WEB_THREADS:-4}"
    assert "runserver" not in " ".join(procfile().values())


def test_procfile_commands_are_single_programs():
    """The runner execs each command, so that a stop signal reaches the program and not a shell."""
    from axiom_grid.procfile import procfile_read

    entries = procfile_read(ROOT / "Procfile")
    assert entries == procfile()
    for command in entries.values():
        assert len(split_commands(command)) == 1
        assert not set(shlex.split(command)) & {"|", "&", ";", "&&", "||"}


def test_readme_documents_the_procfile_sizing_variables():
    variables = set(re.findall(r"\$\{([A-Z_]+):-", (ROOT / "Procfile").read_text(encoding="utf-8")))
    assert {"WEB_CONCURRENCY", "WEB_THREADS"} <= variables
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert not sorted(name for name in variables if f"`{name}`" not in readme)


@pytest.mark.parametrize("name", ["web", "worker", "beat"])
def test_procfile_command_names_code_that_exists(name):
    commands = split_commands(procfile()[name])
    assert commands
    assert all(check_command(argv) for argv in commands), f"Procfile {name}: unrecognised command"


# --- The two commands of the README ---------------------------------------------------------------------


def test_ci_entry_point_runs_make_test_on_the_embedded_and_on_the_machines_postgres():
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    runs = [
        line for line in lines if re.search(r"(^|\s)make test(\s|$)", line) and not line.startswith("echo")
    ]
    assert len(runs) == 2, runs
    embedded, machine = runs
    assert embedded.startswith("env -u DATABASE_URL make test")
    assert machine.startswith('DATABASE_URL="$machine_database_url" make test')
    assert 'machine_database_url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/axiom_grid}"' in lines
    assert "export CI=true" in lines
    assert any(line.startswith("export REDIS_URL=") for line in lines)


def makefile_recipe(target: str) -> str:
    text = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    match = re.search(rf"^{target}:.*\n((?:\t.*\n?)*)", text, flags=re.MULTILINE)
    assert match, f"no {target} target"
    return match.group(1)


def test_makefile_has_the_run_and_test_targets():
    targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert {"run", "test", "lint", "format", "clean"} <= set(targets)


def test_make_run_prepares_and_serves_under_the_embedded_database_launcher():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = makefile_recipe("run")
    assert "$(WITH_DATABASE) sh -c" in recipe
    assert "WITH_DATABASE := $(BIN)/python -m axiom_grid.embedded_postgres --" in makefile
    steps = ["$(PREPARE)", "load_demo_data", "-m axiom_grid.procfile Procfile"]
    positions = [recipe.index(step) for step in steps]
    assert positions == sorted(positions)
    assert "exec $(BIN)/python -m axiom_grid.procfile" in recipe  # the runner gets the signals itself
    for command in ("migrate --noinput", "load_reference_data", "setup_periodic_tasks"):
        assert command in makefile
    assert "runserver" not in recipe


def test_make_clean_stops_or_refuses_before_removing_var():
    recipe = makefile_recipe("clean")
    assert recipe.index("-m axiom_grid.embedded_postgres --stop") < recipe.index("rm -rf var/")


def test_compose_postgres_is_a_supported_version(services):
    oldest, newest = settings.POSTGRESQL_VERSIONS
    major = int(services["postgres"]["image"].split(":")[1].split(".")[0].split("-")[0])
    assert oldest <= major <= newest


def test_readme_quick_start_shows_make_run_and_make_test_first():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", readme, flags=re.MULTILINE)
    assert headings[0] == "Quick start"
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", quick_start, flags=re.DOTALL))
    lines = [line.strip() for line in code.splitlines()]
    assert "make run" in lines and "make test" in lines
    assert lines.index("make run") < lines.index("make test")
    assert "## API" in readme
    assert "/api/docs/" in readme and "/api/schema/" in readme


def test_readme_documents_every_environment_variable_the_settings_read():
    source = (ROOT / "axiom_grid" / "settings.py").read_text(encoding="utf-8")
    names = set(re.findall(r"(?:os\.environ\.get|env_bool|env_list)\(\s*\"([A-Z_][A-Z0-9_]*)\"", source))
    assert "DATABASE_URL" in names
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = sorted(name for name in names if f"`{name}`" not in readme)
    assert not missing, f"README.md does not document {missing}"
