"""The ``blackbird`` command line.

``blackbird serve`` runs an actor host that answers session commands on
``bbcmd.<tenant>.<session_id>`` (NATS request/reply, queue group ``blackbird-hosts``) until
SIGINT or SIGTERM. ``blackbird session create|get|terminate`` drive a running host over NATS.
``blackbird audit`` replays a session, user or tenant from the log up to a point (read-only).
``blackbird chat`` is a conversation with an agent on the terminal; ``blackbird demo`` a scripted tour.
``blackbird mcp`` serves one session's memory and session tools to an MCP client on stdio.

Exit codes: 0 success, 1 an error (unknown session, nothing listening, ...), 2 bad input
(a :class:`~blackbird.errors.ValidationError` or a usage error). Typed errors are printed as
one ``error: <message>`` line on stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog

from blackbird._client import DEFAULT_DATA_DIR, AsyncBlackbird
from blackbird._errors_group import single_error
from blackbird._logging import configure_default_logging
from blackbird._runtime import loop_options, tune_gc_for_serving
from blackbird.audit.replay import parse_until
from blackbird.config import Settings, build_settings
from blackbird.errors import BlackbirdError, ValidationError
from blackbird.memory.master_key import rotate_master_key
from blackbird.server.access import AccessFile
from blackbird.server.embedded import EmbeddedServer
from blackbird.subjects import validate_token

log = structlog.get_logger("blackbird.cli")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds to reach NATS before a session command gives up
DEFAULT_START_TIMEOUT = 30.0  # seconds `serve` gets to start (embedded server, stream, service)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class CliError(Exception):
    """A problem reported as ``error: <message>`` with an exit code, without a traceback."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --------------------------------------------------------------------------- helpers


def _out(line: str = "") -> None:
    print(line, flush=True)


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _OneLineFormatter(logging.Formatter):
    """stdlib log records (nats-py's) as one line each: the exception's text, no traceback."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f": {type(exc).__name__}: {exc}"
        return text


class _DropRepeats(logging.Filter):
    """Drop a record identical to the previous one (nats-py retries a dead server every 0.5s)."""

    def __init__(self) -> None:
        super().__init__()
        self._last: tuple[Any, ...] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        key = (record.levelno, record.getMessage(), type(exc), str(exc))
        repeated = key == self._last
        self._last = key
        return not repeated


def _configure_logging(level: str | None, default: str) -> None:
    """structlog at ``level`` (else BLACKBIRD_LOG_LEVEL, else ``default``), all on stderr.

    nats-py logs every failed connection attempt through the stdlib ``nats`` logger with a full
    traceback; route that logger to stderr as one line per record at the same level.
    """
    name = level or _environment().log_level or default
    configure_default_logging(name, force=True)
    numeric = logging.getLevelName(name.upper())
    nats_logger = logging.getLogger("nats")
    for handler in list(nats_logger.handlers):
        if getattr(handler, "_blackbird_cli", False):
            nats_logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    handler.addFilter(_DropRepeats())
    handler._blackbird_cli = True  # type: ignore[attr-defined]
    nats_logger.addHandler(handler)
    nats_logger.setLevel(numeric if isinstance(numeric, int) else logging.WARNING)
    nats_logger.propagate = False


def _environment() -> Settings:
    """The settings the environment gives (``BLACKBIRD_*``), for defaults of the options."""
    try:
        return build_settings()
    except ValidationError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _data_dir(arg: str | None) -> Path:
    return Path(arg or _environment().data_dir or DEFAULT_DATA_DIR).resolve()


def _resolve_nats_url(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """--nats-url; else --data-dir's server; else BLACKBIRD_NATS_URL; else the default folder's.
    With the credentials to use: those given (options, else BLACKBIRD_* variables), or for a data
    folder's server when none are given, the folder's service identity."""
    given = _auth_options(args)
    if args.nats_url:
        return str(args.nats_url), given
    env = _environment()
    if args.data_dir is None and env.nats_url:
        return env.nats_url, given
    data_dir = _data_dir(args.data_dir)
    url = EmbeddedServer.running_url(data_dir)
    if url is None:
        raise CliError(
            f"no running `blackbird serve` for data folder {data_dir}; start it or pass --nats-url"
        )
    if any(v is not None for v in given.values()) or any(getattr(env, name) for name in _AUTH_OPTIONS):
        return url, given
    auth = EmbeddedServer(data_dir).service_auth()
    return url, {"nats_user": auth["user"], "nats_password": auth["password"]}


def _parse_metadata(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise CliError(
            f"metadata: expected a JSON object, got invalid JSON ({exc})", EXIT_USAGE
        ) from None
    if not isinstance(value, dict):
        raise CliError(f"metadata: expected a JSON object, got {type(value).__name__}", EXIT_USAGE)
    return value


def _run(func: Callable[[], Awaitable[int]]) -> int:
    with single_error():
        return anyio.run(func, backend="asyncio", backend_options=loop_options())


# --------------------------------------------------------------------------- serve


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:8080), got {value!r}")
    return host, int(port)


def _http_tokens(args: argparse.Namespace) -> dict[str, str]:
    from blackbird.http.app import load_tokens

    if args.http_tokens is not None:
        try:
            raw, where = Path(args.http_tokens).read_text("utf-8"), "--http-tokens"
        except OSError as exc:
            raise CliError(f"--http-tokens: cannot read {args.http_tokens} ({exc.strerror})", EXIT_USAGE) from None
    else:
        raw, where = _environment().http_tokens or "", "BLACKBIRD_HTTP_TOKENS"
    if not raw.strip():  # API keys only (`blackbird keys create`); bootstrap tokens are optional
        return {}
    try:
        return load_tokens(raw, where)
    except ValidationError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _announce(bb: AsyncBlackbird, http: tuple[str, int] | None = None) -> None:
    subjects = bb.journal.subjects
    url = bb.nats_url
    command_pattern = f"{subjects.command_prefix}.<tenant>.<session_id>"
    if bb.data_dir is not None:
        store = f"{bb.data_dir}  (embedded nats-server, store in {bb.data_dir / 'nats' / 'store'})"
    else:
        store = "(none: JetStream on the external NATS server keeps the data)"
    _out("Blackbird is serving session commands")
    _out(f"  nats:        {url}")
    _out(
        f"  commands:    {command_pattern}  (request/reply on {subjects.command_wildcard}, "
        f"queue group {bb.settings.queue_group})"
    )
    events = ", ".join(subjects.stream_subjects)
    _out(f"  events:      {events}  (JetStream stream {bb.journal.stream})")
    _out(f"  data folder: {store}")
    _out(f"  tenant:      {bb.settings.tenant}  (default; a command's subject names its tenant)")
    if http is not None:
        _out(
            f"  http:        http://{http[0]}:{http[1]}/  (console; API docs at /docs; "
            "Authorization: Bearer <API key>; streams: /v1/sessions/<id>/events)"
        )
    if bb.data_dir is not None:  # the embedded server is secured: the folder's CLI finds its credentials
        _out("  security:    no connection without credentials; tenants: `blackbird tenants add`, "
             "`blackbird credentials issue --tenant T` (README, Security)")
        _out(f"  try:         blackbird session create --user-id u1 --data-dir {bb.data_dir}")
    else:
        _out(f"  try:         blackbird session create --user-id u1 --nats-url {url}")
    _out("  stop:        Ctrl-C or SIGTERM")
    _out(f"blackbird ready nats_url={url} commands={subjects.command_wildcard} pid={os.getpid()}")


async def _serve(args: argparse.Namespace) -> int:
    listener = None
    if args.http is not None:  # taken first: a port in use is said at once, before anything starts
        from blackbird.http.app import listening_socket

        try:
            listener = listening_socket(*args.http)
        except OSError as exc:
            address = f"{args.http[0]}:{args.http[1]}"
            raise CliError(f"--http {address}: cannot listen ({exc.strerror})", EXIT_USAGE) from None
    stop = anyio.Event()
    started = forced = False
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            # The client's actor host and command service run in task groups that live as long
            # as the client, so the scope bounding start-up must enclose its whole lifetime:
            # it gets a deadline while starting, lifted once ready.
            lifetime = anyio.CancelScope(deadline=anyio.current_time() + args.start_timeout)

            async def watch_signals() -> None:
                nonlocal forced
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not stop.is_set():
                        log.info("serve_stopping", signal=name)
                        stop.set()
                        if not started:  # still starting: abandon start-up
                            lifetime.cancel()
                    else:  # a second signal: stop waiting for a clean close
                        log.warning("serve_forced_stop", signal=name)
                        forced = True
                        lifetime.cancel()

            tg.start_soon(watch_signals)
            try:
                with lifetime:
                    async with AsyncBlackbird(
                        data_dir=args.data_dir,
                        nats_url=args.nats_url,
                        tenant=args.tenant,
                        serve_commands=True,
                        **_auth_options(args),
                    ) as bb:
                        lifetime.deadline = math.inf
                        started = True
                        if not args.default_gc:
                            tune_gc_for_serving()
                        async with anyio.create_task_group() as web:
                            server = None
                            if args.http is not None:
                                from blackbird.http.app import http_app, http_server

                                host, port = args.http
                                app = http_app(bb, args.http_tokens, cors_origins=args.http_cors_origin or ())
                                server = http_server(app, host, port)
                                web.start_soon(server.serve, [listener])
                                # "ready" is announced once the HTTP listener accepts (uvicorn
                                # offers a flag, no event); a listener that cannot bind ends serve
                                while not server.started and not server.should_exit:
                                    await anyio.sleep(0.01)
                            _announce(bb, args.http)
                            await stop.wait()
                            if server is not None:
                                server.should_exit = True
            finally:
                tg.cancel_scope.cancel()
    if lifetime.cancelled_caught and not stop.is_set():
        where = args.nats_url or _data_dir(args.data_dir)
        raise CliError(
            f"could not start within {args.start_timeout:g}s (is NATS at {where} reachable?)"
        )
    log.info("serve_stopped", before_ready=not started, forced=forced)
    return EXIT_ERROR if forced else EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level, "info")
    args.http_tokens = _http_tokens(args) if args.http is not None else {}
    return _run(lambda: _serve(args))


# --------------------------------------------------------------------------- session commands


async def _with_client(
    args: argparse.Namespace, action: Callable[[AsyncBlackbird], Awaitable[int]]
) -> int:
    url, auth = _resolve_nats_url(args)
    # nats-py retries an unreachable server forever (AsyncBlackbird connects with
    # max_reconnect_attempts=-1), so bound the connection here. The scope encloses the client's
    # whole lifetime (a client may hold task groups); its deadline is lifted once connected.
    with anyio.CancelScope(deadline=anyio.current_time() + args.connect_timeout) as scope:
        async with AsyncBlackbird(nats_url=url, tenant=args.tenant, remote=True, **auth) as bb:
            scope.deadline = math.inf
            return await action(bb)
    raise CliError(
        f"could not reach NATS at {url} within {args.connect_timeout:g}s; "
        "is it running? (check --nats-url / --data-dir)"
    )


def _print_session(session: Any) -> None:
    _out(json.dumps(session.to_dict(), indent=2))


def _cmd_session_create(args: argparse.Namespace) -> int:
    metadata = _parse_metadata(args.metadata)

    async def action(bb: AsyncBlackbird) -> int:
        session = await bb.session_manager.create_session(
            args.user_id,
            args.tier,
            metadata,
            session_id=args.session_id,
            command_id=args.command_id,
        )
        _print_session(session)
        return EXIT_OK

    return _run(lambda: _with_client(args, action))


def _cmd_session_get(args: argparse.Namespace) -> int:
    async def action(bb: AsyncBlackbird) -> int:
        session = await bb.session_manager.get_session(args.session_id)
        if session is None:
            _err(f"error: session {args.session_id!r} not found in tenant {bb.settings.tenant!r}")
            return EXIT_ERROR
        _print_session(session)
        return EXIT_OK

    return _run(lambda: _with_client(args, action))


def _cmd_session_terminate(args: argparse.Namespace) -> int:
    async def action(bb: AsyncBlackbird) -> int:
        session = await bb.session_manager.terminate_session(
            args.session_id, args.reason, command_id=args.command_id
        )
        _print_session(session)
        return EXIT_OK

    return _run(lambda: _with_client(args, action))


def _cmd_session(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level, "warning")
    return int(args.session_func(args))


# --------------------------------------------------------------------------- audit


def _cmd_audit(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level, "warning")
    scoped = args.session is not None or args.user is not None or args.whole_tenant
    if args.action == "verify":
        if scoped or args.until_seq is not None or args.until is not None:
            raise CliError(
                "audit verify: expected no --session, --user, --whole-tenant, --until-seq or --until",
                EXIT_USAGE,
            )
        return _run(lambda: _with_client(args, _audit_verify(args)))
    if not scoped:
        raise CliError("audit: expected one of --session ID, --user ID or --whole-tenant", EXIT_USAGE)
    # bad input is refused before connecting
    if args.session is not None:
        validate_token(args.session, "session_id")
    if args.user is not None:
        validate_token(args.user, "user_id")
    if args.tenant is not None:
        validate_token(args.tenant, "tenant")
    parse_until(args.until)

    async def action(bb: AsyncBlackbird) -> int:
        report = await bb.audit.replay(
            session_id=args.session,
            user_id=args.user,
            tenant=bb.settings.tenant if args.whole_tenant else None,
            until_seq=args.until_seq,
            until=args.until,
        )
        _out(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
        return EXIT_OK

    return _run(lambda: _with_client(args, action))


def _audit_verify(args: argparse.Namespace) -> Callable[[AsyncBlackbird], Awaitable[int]]:
    async def action(bb: AsyncBlackbird) -> int:
        differences = await bb.audit.verify()
        if args.json:
            _out(json.dumps(differences, indent=2))
        else:
            for name, found in sorted(differences.items()):
                _out(f"{name}: OK" if not found else f"{name}: {len(found)} difference(s)")
                for difference in found:
                    _out(f"  {difference}")
        return EXIT_ERROR if any(differences.values()) else EXIT_OK

    return action


# --------------------------------------------------------------------------- tenants, credentials, keys


def _change_access(args: argparse.Namespace, change: Callable[[AccessFile], Any]) -> Any:
    """Apply ``change`` to the data folder's access file; a running server enforces it at once."""
    data_dir = _data_dir(args.data_dir)
    return _run(lambda: EmbeddedServer.change_access(data_dir, change, subject_prefix=_environment().subject_prefix))


def _access(args: argparse.Namespace) -> AccessFile:
    """The data folder's access file, read (created if missing, as a first server start would)."""
    nats_dir = _data_dir(args.data_dir) / "nats"
    nats_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return AccessFile.load_or_create(nats_dir, _environment().subject_prefix)


def _cmd_tenants(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level, "warning")
    if args.tenants_command == "list":
        access = _access(args)
        rows = [
            {"tenant": name, "credentials": len(t.credentials), "created_at": t.created_at}
            for name, t in sorted(access.tenants.items())
        ]
        _out(json.dumps(rows, indent=2) if args.json else "\n".join(f"{r['tenant']}\t{r['credentials']}" for r in rows))
        return EXIT_OK
    name = validate_token(args.name, "tenant")
    if args.tenants_command == "add":
        added = _change_access(args, lambda a: a.add_tenant(name))
        _out(f"tenant {name!r} {'added' if added else 'exists already'}")
        return EXIT_OK
    removed = _change_access(args, lambda a: a.remove_tenant(name))
    if not removed:
        _err(f"error: no tenant {name!r}")
        return EXIT_ERROR
    _out(f"tenant {name!r} removed; its credentials no longer connect (its data stays in the log)")
    return EXIT_OK


def _cmd_credentials(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level, "warning")
    if args.credentials_command == "issue":
        issued = _change_access(
            args, lambda a: a.issue(args.tenant, name=args.name, user_id=args.user, read_only=args.read_only)
        )
        url = EmbeddedServer.running_url(_data_dir(args.data_dir))
        env = {**issued.settings(), **({"BLACKBIRD_NATS_URL": url} if url else {})}
        if args.out:
            _write_env_file(Path(args.out), env)
        _out(json.dumps({**msgspec.structs.asdict(issued), "environment": env}, indent=2))
        _err("the password is shown once: Blackbird keeps only its hash")
        return EXIT_OK
    if args.credentials_command == "list":
        access = _access(args)
        rows = [
            {"user": c.user, "tenant": tenant, "read_only": c.read_only, "user_id": c.user_id,
             "created_at": c.created_at}
            for tenant, t in sorted(access.tenants.items()) if args.tenant in (None, tenant)
            for c in t.credentials.values()
        ]
        _out(json.dumps(rows, indent=2))
        return EXIT_OK
    tenant = _change_access(args, lambda a: a.revoke(args.user_name))
    if tenant is None:
        _err(f"error: no credential {args.user_name!r}")
        return EXIT_ERROR
    _out(f"credential {args.user_name!r} of tenant {tenant!r} revoked; its connections were closed")
    return EXIT_OK


def _write_env_file(path: Path, env: dict[str, str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in env.items())
    os.chmod(path, 0o600)


def _cmd_master_key(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level, "warning")

    async def rotate() -> int:
        async with AsyncBlackbird(data_dir=_data_dir(args.data_dir)) as bb:
            report = await rotate_master_key(bb)
        _out(json.dumps(msgspec.structs.asdict(report), indent=2))
        return EXIT_OK

    return _run(rotate)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a stream sequence, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a stream sequence >= 1, got {text!r}")
    return value


# --------------------------------------------------------------------------- parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _add_location(parser: argparse.ArgumentParser, *, serve: bool) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--nats-url",
        metavar="URL",
        help="an external NATS server (default: BLACKBIRD_NATS_URL)"
        if serve
        else "the NATS server `blackbird serve` listens on",
    )
    where.add_argument(
        "--data-dir",
        metavar="DIR",
        help="data folder of the embedded nats-server "
        "(default: BLACKBIRD_DATA_DIR or ./blackbird-data)"
        if serve
        else "find the NATS url of the `blackbird serve` using this data folder "
        "(default: BLACKBIRD_DATA_DIR or ./blackbird-data)",
    )
    auth = parser.add_argument_group(
        "NATS authentication and TLS",
        "at most one of --nats-creds, --nats-nkey-seed, --nats-token, --nats-user with "
        "--nats-password; each defaults to its BLACKBIRD_* variable (e.g. BLACKBIRD_NATS_CREDS)",
    )
    auth.add_argument("--nats-creds", metavar="FILE", help="a .creds file: the user's JWT and nkey seed")
    auth.add_argument("--nats-nkey-seed", metavar="FILE", help="a file holding the user's nkey seed (SU...)")
    auth.add_argument("--nats-user", metavar="USER", help="user name (with a password)")
    auth.add_argument(
        "--nats-password", metavar="PASSWORD",
        help="password of --nats-user; prefer BLACKBIRD_NATS_PASSWORD (arguments are visible to other users)",
    )
    auth.add_argument(
        "--nats-token", metavar="TOKEN",
        help="authentication token; prefer BLACKBIRD_NATS_TOKEN (arguments are visible to other users)",
    )
    auth.add_argument("--tls-ca", metavar="FILE", help="CA bundle (PEM) that signed the server's certificate")
    auth.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM), with --tls-key")
    auth.add_argument("--tls-key", metavar="FILE", help="the client certificate's key (PEM, unencrypted)")


_AUTH_OPTIONS = (
    "nats_creds", "nats_nkey_seed", "nats_user", "nats_password", "nats_token", "tls_ca", "tls_cert", "tls_key",
)


def _auth_options(args: argparse.Namespace) -> dict[str, Any]:
    """The authentication and TLS settings given on the command line (None: not given, so the
    BLACKBIRD_* environment variable applies)."""
    return {name: getattr(args, name, None) for name in _AUTH_OPTIONS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blackbird",
        description="Durable, event-sourced agent sessions on NATS JetStream.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="host session actors and answer commands over NATS until SIGINT/SIGTERM",
        description="Host session actors and answer commands on bbcmd.<tenant>.<session_id> "
        "(NATS request/reply, queue group blackbird-hosts) until SIGINT or SIGTERM.",
    )
    _add_location(serve, serve=True)
    serve.add_argument("--tenant", help="default tenant of this host (default: default)")
    serve.add_argument(
        "--log-level", choices=LOG_LEVELS, type=str.lower,
        help="log level on stderr (default: BLACKBIRD_LOG_LEVEL or info)",
    )
    serve.add_argument(
        "--start-timeout", type=_positive_float, default=DEFAULT_START_TIMEOUT, metavar="SECONDS",
        help=f"give up if not ready within this many seconds (default: {DEFAULT_START_TIMEOUT:g})",
    )
    serve.add_argument(
        "--default-gc", action="store_true",
        help="keep CPython's default garbage-collector thresholds (by default a host freezes its "
        "start-up objects and collects less often: about 20%% more commands per second)",
    )
    serve.add_argument(
        "--http", type=_host_port, metavar="HOST:PORT",
        help="also serve the HTTP API, session streams (SSE) and the web console on this address "
        "(callers use API keys: `blackbird keys create`, or bootstrap tokens: --http-tokens)",
    )
    serve.add_argument(
        "--http-tokens", metavar="FILE",
        help='JSON file {"<token>": "<tenant>", ...}: each bearer token reads one tenant\'s streams '
        "(default: the JSON in BLACKBIRD_HTTP_TOKENS)",
    )
    serve.add_argument(
        "--http-cors-origin", action="append", metavar="ORIGIN",
        help="let pages from this origin (e.g. https://app.example.com) call the HTTP API and "
        "read its streams, preflight included; repeat for several",
    )
    serve.set_defaults(func=_cmd_serve)

    session = commands.add_parser(
        "session", help="create, read or terminate sessions on a running host"
    )
    session_commands = session.add_subparsers(
        dest="session_command", metavar="ACTION", required=True
    )

    common = argparse.ArgumentParser(add_help=False)
    _add_location(common, serve=False)
    common.add_argument(
        "--tenant", help="tenant of the session (default: BLACKBIRD_TENANT or default)"
    )
    common.add_argument(
        "--connect-timeout", type=_positive_float, default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="give up reaching NATS after this many seconds "
        f"(default: {DEFAULT_CONNECT_TIMEOUT:g})",
    )
    common.add_argument(
        "--log-level", choices=LOG_LEVELS, type=str.lower,
        help="log level on stderr (default: BLACKBIRD_LOG_LEVEL or warning)",
    )

    create = session_commands.add_parser(
        "create", parents=[common], help="create a session and print it as JSON"
    )
    create.add_argument("--user-id", required=True, help="the user the session belongs to")
    create.add_argument("--tier", default="free", help="policy tier (default: free)")
    create.add_argument("--metadata", metavar="JSON", help="a JSON object stored with the session")
    create.add_argument(
        "--session-id", metavar="ID", help="the session id (default: a new random id)"
    )
    create.add_argument(
        "--command-id", metavar="ID", help="idempotency key: resending it does not create twice"
    )
    create.set_defaults(func=_cmd_session, session_func=_cmd_session_create)

    get = session_commands.add_parser(
        "get", parents=[common], help="print a session as JSON (exit 1 if unknown)"
    )
    get.add_argument("session_id", metavar="SESSION_ID")
    get.set_defaults(func=_cmd_session, session_func=_cmd_session_get)

    terminate = session_commands.add_parser(
        "terminate", parents=[common], help="terminate a session and print it as JSON"
    )
    terminate.add_argument("session_id", metavar="SESSION_ID")
    terminate.add_argument(
        "--reason", default="terminated", help="recorded reason (default: terminated)"
    )
    terminate.add_argument("--command-id", metavar="ID", help="idempotency key")
    terminate.set_defaults(func=_cmd_session, session_func=_cmd_session_terminate)

    audit = commands.add_parser(
        "audit", parents=[common],
        help="replay a session, user or tenant up to a point: timeline and state",
        description="Replay one session, user or whole tenant from the log up to a sequence "
        "and/or an instant; print the timeline (when, who, what, decision, why, sequence) and "
        "the state at that point. `audit verify` compares the running projections with a "
        "rebuild from the log (exit 1 if any differ).",
    )
    audit.add_argument(
        "action", nargs="?", choices=("verify",),
        help="verify: rebuild the projections from the log and compare",
    )
    scope = audit.add_mutually_exclusive_group()
    scope.add_argument("--session", metavar="ID", help="audit this session")
    scope.add_argument("--user", metavar="ID", help="audit this user and all of their sessions")
    scope.add_argument("--whole-tenant", action="store_true", help="audit the whole tenant")
    audit.add_argument(
        "--until-seq", type=_positive_int, metavar="N", help="stop after stream sequence N"
    )
    audit.add_argument(
        "--until", metavar="WHEN",
        help="stop at this instant: seconds since the epoch or ISO-8601 (UTC without an offset)",
    )
    audit.add_argument("--json", action="store_true", help="print one JSON document")
    audit.set_defaults(func=_cmd_audit)
    _add_access_commands(commands)
    _add_keys_command(commands, common)
    _add_agent_commands(commands)
    _add_mcp_command(commands)
    return parser


def _add_access_commands(commands: Any) -> None:
    """``tenants``, ``credentials`` and ``master-key``: who may connect, and the key wrapping data keys."""
    folder = argparse.ArgumentParser(add_help=False)
    folder.add_argument(
        "--data-dir", metavar="DIR",
        help="the data folder of the embedded nats-server (default: BLACKBIRD_DATA_DIR or ./blackbird-data)",
    )
    folder.add_argument(
        "--log-level", choices=LOG_LEVELS, type=str.lower,
        help="log level on stderr (default: BLACKBIRD_LOG_LEVEL or warning)",
    )
    tenants = commands.add_parser(
        "tenants", help="add, list or remove the tenants the embedded nats-server walls apart",
        description="Each tenant is a NATS account that reaches only its own command and read subjects "
        "(see README, Security). Adding or removing one restarts a running embedded server on the "
        "same port (its clients reconnect).",
    )
    actions = tenants.add_subparsers(dest="tenants_command", metavar="ACTION", required=True)
    for action, text in (("add", "add a tenant"), ("remove", "remove a tenant and all its credentials")):
        sub = actions.add_parser(action, parents=[folder], help=text)
        sub.add_argument("name", metavar="TENANT")
    listing = actions.add_parser("list", parents=[folder], help="list the tenants")
    listing.add_argument("--json", action="store_true", help="print JSON")
    tenants.set_defaults(func=_cmd_tenants)

    credentials = commands.add_parser(
        "credentials", help="issue, list or revoke a tenant's NATS credentials",
        description="A credential is a NATS user of the tenant's account: user name and password "
        "(shown once; only a bcrypt hash is kept). Revoking closes its connections at once.",
    )
    actions = credentials.add_subparsers(dest="credentials_command", metavar="ACTION", required=True)
    issue = actions.add_parser("issue", parents=[folder], help="issue a credential and print it once")
    issue.add_argument("--tenant", required=True, help="the tenant it belongs to")
    issue.add_argument("--user", metavar="USER_ID", help="bind it to this end user: their sessions only")
    issue.add_argument("--read-only", action="store_true", help="reads only: audits, streams, session state")
    issue.add_argument("--name", help="a name for it (default: cred-<random>); its user name is TENANT:NAME")
    issue.add_argument("--out", metavar="FILE", help="also write the BLACKBIRD_* variables to FILE (0600)")
    listing = actions.add_parser("list", parents=[folder], help="list credentials (never passwords)")
    listing.add_argument("--tenant", help="only this tenant's")
    revoke = actions.add_parser("revoke", parents=[folder], help="revoke a credential")
    revoke.add_argument("user_name", metavar="USER", help="its user name, e.g. acme:cred-1a2b3c")
    credentials.set_defaults(func=_cmd_credentials)

    master = commands.add_parser(
        "master-key", help="rotate the key that wraps the users' data keys",
        description="rotate: generate a new master key (first in the key file), rewrap every user's "
        "data key under it, then drop the old key.",
    )
    actions = master.add_subparsers(dest="master_command", metavar="ACTION", required=True)
    actions.add_parser("rotate", parents=[folder], help="rotate the master key of the data folder")
    master.set_defaults(func=_cmd_master_key)


def _add_keys_command(commands: Any, common: argparse.ArgumentParser) -> None:
    """``keys``: the API keys of the HTTP API (``common``: where the server is, as for ``session``)."""
    keys = commands.add_parser(
        "keys", help="create, list or revoke a tenant's API keys for the HTTP API",
        description="An API key (bbk_...) is shown once, when created; only its secret's SHA-256 is "
        "kept, in the tenant's log (an audit of the tenant shows who issued and revoked which key).",
    )
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", parents=[common], help="create a key and print it once, as JSON")
    create.add_argument("--role", required=True, choices=("admin", "service", "user"),
                        help="admin: the tenant; service: every session; user: one user's sessions")
    create.add_argument("--user-id", metavar="USER_ID", help="the user of a key of role user")
    create.add_argument("--label", help="what the key is for (shown in lists and audits)")
    create.add_argument("--expires-in", type=_positive_float, metavar="SECONDS",
                        help="valid for this many seconds (default: until revoked)")
    actions.add_parser("list", parents=[common], help="list the keys as JSON (never their secrets)")
    revoke = actions.add_parser("revoke", parents=[common], help="revoke a key and print it as JSON")
    revoke.add_argument("key_id", metavar="KEY_ID")
    keys.set_defaults(func=_cmd_keys)


def _cmd_keys(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level, "warning")
    if args.tenant is None:
        raise CliError("keys: --tenant is required (the tenant whose keys these are)", EXIT_USAGE)

    async def action(bb: AsyncBlackbird) -> int:
        keys = bb.api_keys
        result: Any
        if args.keys_command == "create":
            result = await keys.create(
                role=args.role, user_id=args.user_id, label=args.label, expires_in=args.expires_in, tenant=args.tenant
            )
        elif args.keys_command == "list":
            result = await keys.list(tenant=args.tenant)
        else:
            result = await keys.revoke(args.key_id, tenant=args.tenant)
        _out(json.dumps(msgspec.to_builtins(result), indent=2))
        return EXIT_OK

    return _run(lambda: _with_client(args, action))


# --------------------------------------------------------------------------- chat, demo


def _add_agent_commands(commands: Any) -> None:
    """``chat`` (a conversation with an agent, replies streamed) and ``demo`` (the scripted tour)."""
    chat = commands.add_parser(
        "chat", help="an interactive conversation with the configured agent, replies streamed",
        description="Create a session for --user and talk to its agent: each line read from stdin is "
        "sent with send_message and the reply is printed as it is generated. /quit or end of input "
        "ends the conversation (and terminates the session). Runs on the data folder's embedded "
        "server (shared with a `blackbird serve` using the folder) or on --nats-url.",
    )
    _add_location(chat, serve=True)
    chat.add_argument("--user", required=True, metavar="USER_ID", help="the user who is chatting")
    chat.add_argument("--tier", default="free", help="policy tier of the session (default: free)")
    chat.add_argument("--agent", metavar="ID", help="the agent to talk to (default: the configured one)")
    chat.add_argument("--tenant", help="tenant of the session (default: BLACKBIRD_TENANT or default)")
    chat.add_argument(
        "--log-level", choices=LOG_LEVELS, type=str.lower,
        help="log level on stderr (default: BLACKBIRD_LOG_LEVEL or warning)",
    )
    chat.set_defaults(func=_cmd_chat)

    demo = commands.add_parser(
        "demo", help="a scripted tour: sessions, quotas, rate limits, an agent that learns, streams, audit",
        description="Run a scripted tour of Blackbird on an embedded nats-server in an empty folder: "
        "sessions, usage, a quota refusal, rate limiting, concurrency, a conversation with the offline "
        "development agent that learns a fact, a second session that recalls it, a live stream and an "
        "audit of what happened.",
    )
    demo.add_argument("--data-dir", metavar="DIR", help="an empty folder for its data (default: a new temporary one)")
    demo.add_argument(
        "--log-level", choices=LOG_LEVELS, type=str.lower,
        help="log level on stderr (default: BLACKBIRD_LOG_LEVEL or warning)",
    )
    demo.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from rich.console import Console

    from blackbird.demo import run_demo

    _configure_logging(args.log_level, "warning")
    console = Console(highlight=False)
    if not console.is_terminal:  # a log or a pipe: wide enough that the tables do not wrap
        console = Console(highlight=False, width=120)
    if args.data_dir is None:
        with tempfile.TemporaryDirectory(prefix="blackbird-demo-") as temporary:
            return _run(lambda: _demo(Path(temporary), console, run_demo))
    folder = Path(args.data_dir).resolve()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise CliError(f"--data-dir {folder}: expected an empty folder (the demo creates its own data)", EXIT_USAGE)
    folder.mkdir(parents=True, exist_ok=True)
    return _run(lambda: _demo(folder, console, run_demo))


async def _demo(folder: Path, console: Any, run_demo: Callable[[Path, Any], Awaitable[None]]) -> int:
    await run_demo(folder, console)
    return EXIT_OK


def _cmd_chat(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level, "warning")
    validate_token(args.user, "user_id")
    return _run(lambda: _chat(args))


async def _chat(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(highlight=False)
    fancy = console.is_terminal
    if args.nats_url is not None:
        client = AsyncBlackbird(nats_url=args.nats_url, tenant=args.tenant, **_auth_options(args))
    else:
        client = AsyncBlackbird(data_dir=_data_dir(args.data_dir), tenant=args.tenant, **_auth_options(args))
    async with client as bb:
        session = await bb.session_manager.create_session(args.user, args.tier)
        sid = session.session_id
        _out(f"session {sid} for user {args.user!r} (tier {session.tier}); /quit or end of input ends it")
        try:
            while True:
                if fancy:
                    console.print("[bold]you>[/] ", end="")
                line = await anyio.to_thread.run_sync(sys.stdin.readline)
                if not line:  # end of input
                    break
                text = line.strip()
                if not text:
                    continue
                if text == "/quit":
                    break
                await _chat_turn(bb, sid, text, args.agent, console, fancy)
        finally:
            with anyio.CancelScope(shield=True):
                await bb.session_manager.terminate_session(sid, "chat_ended")
    return EXIT_OK


async def _chat_turn(bb: AsyncBlackbird, sid: str, text: str, agent: str | None, console: Any, fancy: bool) -> None:
    """Send one line and print the reply as it streams; a refused admission is printed, not raised."""
    if fancy:
        console.print("[bold cyan]agent>[/] ", end="")
    else:
        sys.stdout.write("agent> ")
    try:
        async for piece in bb.stream_message(text, sid, agent=agent):
            if fancy:
                console.print(piece, end="", markup=False)
            else:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except BlackbirdError as exc:
        (console.print if fancy else _out)("")
        _err(f"error: {type(exc).__name__}: {exc.message}")
        return
    if fancy:
        console.print()
    else:
        _out("")


# --------------------------------------------------------------------------- mcp


def _add_mcp_command(commands: Any) -> None:
    """``mcp``: the MCP server of one session on stdin/stdout."""
    mcp = commands.add_parser(
        "mcp", help="serve one session's memory and session tools to an MCP client on stdio",
        description="Run the MCP server (blackbird.mcp_server) of one session on stdin/stdout, for an MCP "
        "client that starts it (Claude Desktop, an IDE, the mcp SDK's stdio_client). Every tool call is "
        "admitted under the session's quotas and rate limits and recorded in its log. Logs go to stderr. "
        "--user creates a session for that user and terminates it when the client disconnects.",
    )
    _add_location(mcp, serve=True)
    which = mcp.add_mutually_exclusive_group(required=True)
    which.add_argument("--session-id", metavar="ID", help="the session the tools act for")
    which.add_argument("--user", metavar="USER_ID", help="create a session for this user (ended on exit)")
    mcp.add_argument("--tier", default="free", help="tier of a session made with --user (default: free)")
    mcp.add_argument("--tenant", help="tenant of the session (default: BLACKBIRD_TENANT or default)")
    mcp.add_argument(
        "--log-level", choices=LOG_LEVELS, type=str.lower,
        help="log level on stderr (default: BLACKBIRD_LOG_LEVEL or warning)",
    )
    mcp.set_defaults(func=_cmd_mcp)


def _cmd_mcp(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level, "warning")
    if args.session_id is not None:
        validate_token(args.session_id, "session_id")
    else:
        validate_token(args.user, "user_id")
    return _run(lambda: _mcp(args))


async def _mcp(args: argparse.Namespace) -> int:
    from blackbird.mcp_server import mcp_server

    if args.nats_url is not None:
        client = AsyncBlackbird(nats_url=args.nats_url, tenant=args.tenant, **_auth_options(args))
    else:
        client = AsyncBlackbird(data_dir=_data_dir(args.data_dir), tenant=args.tenant, **_auth_options(args))
    async with client as bb:
        sm = bb.session_manager
        if args.session_id is not None:
            sid = args.session_id
            if await sm.get_session(sid) is None:
                raise CliError(f"--session-id: no session {sid!r} in tenant {bb.settings.tenant!r}")
        else:
            sid = (await sm.create_session(args.user, args.tier)).session_id
        log.info("mcp_serving", transport="stdio", session_id=sid, tenant=bb.settings.tenant)
        try:
            await mcp_server(bb, sid).run_stdio_async()
        finally:
            if args.session_id is None:
                with anyio.CancelScope(shield=True):
                    await sm.terminate_session(sid, "mcp_ended")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``blackbird`` command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already reported
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.func(args))
    except CliError as exc:
        _err(f"error: {exc.message}")
        return exc.code
    except ValidationError as exc:
        _err(f"error: {exc.message}")
        return EXIT_USAGE
    except BlackbirdError as exc:
        _err(f"error: {exc.message}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err("error: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
