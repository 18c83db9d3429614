"""Commands of the shared service: `backfill serve`, `backfill users add|list|set|remove|token` and
`backfill credentials add|list|remove|grant|revoke|new-key|rotate-key`, the last two on the server's machine."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import closing
from pathlib import Path
from types import FrameType
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from backfill.errors import BackfillError
from backfill.server import logs
from backfill.server.caps import Caps
from backfill.server.db import ServerDB
from backfill.server.secrets import SECRET_ENV, SecretBox, new_key, open_box, read_keys
from backfill.server.webhooks import parse_networks

DataDir = typer.Option(Path("backfill-data"), "--data-dir", envvar="BACKFILL_DATA_DIR", help="Where the server keeps everything (protect it: it holds the provider keys).")
out = Console()
err = Console(stderr=True)

SecretKeyFile = typer.Option(None, "--secret-key-file", help="File holding the Fernet key(s) provider keys are encrypted with, newest first.", show_default=f"${SECRET_ENV}")
users_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Manage the users of a `backfill serve` data directory.")
credentials_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Manage the provider credentials of a `backfill serve` data directory.")


def _open_db(data_dir: Path, box: SecretBox | None = None) -> closing[ServerDB]:
    """The data directory's database, closed when the `with` block ends."""
    return closing(ServerDB(data_dir / "server.db", box=box))


def private_files() -> None:
    """Everything this process creates is readable by its user only: the data directory holds cached answers,
    uploads, outputs and encrypted keys."""
    os.umask(0o077)


def serve_command(
    data_dir: Path = DataDir,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    allow_dir: list[Path] = typer.Option([], "--allow-dir", help="A directory jobs may read input paths from (repeatable)."),
    max_jobs: int = typer.Option(16, "--max-jobs", help="Jobs running at once, all users together."),
    max_streams_per_user: int = typer.Option(4, "--max-streams-per-user", min=1, help="Event streams (/jobs/{id}/events) one user may hold open."),
    webhook_allow: list[str] = typer.Option([], "--webhook-allow", help="A network webhooks may reach though it is not public, as CIDR (repeatable).", show_default="none"),
    secret_key_file: Path | None = SecretKeyFile,
    log_level: str = typer.Option("info", "--log-level", help="Least severe log level written: debug, info, warning or error."),
) -> None:
    """Run the shared service: API (/docs), dashboard (/), metrics (/metrics) and the job workers."""
    # The web stack is imported here, not at the top, so every other `backfill` command starts fast.
    import uvicorn

    from backfill.server.app import ServerConfig, begin_shutdown, create_app

    logs.configure(log_level)
    private_files()
    keys = read_keys(secret_key_file)
    open_box(keys)  # a malformed key is refused now, not at the first credential
    try:
        parse_networks(webhook_allow)
    except ValueError as e:
        raise BackfillError(str(e)) from None
    for d in allow_dir:
        if not d.is_dir():
            raise BackfillError(f"--allow-dir {d} is not a directory; create it or fix the path.")
    config = ServerConfig(
        data_dir=data_dir.resolve(), allow_dirs=[d.resolve() for d in allow_dir], max_running=max_jobs,
        secret_keys=keys, max_streams_per_user=max_streams_per_user, webhook_allow=webhook_allow,
    )
    with _open_db(config.data_dir) as db:
        if not any(u.is_operator for u in db.list_users()):
            logs.log.warning(f"No operator yet: run `backfill users add NAME --role operator --data-dir {data_dir}`.")
    app = create_app(config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # uvicorn waits for open connections before the lifespan ends; event streams would keep jobs
            # dispatching all that while. The loop does the work: this runs in a signal handler.
            loop = getattr(app.state, "loop", None)
            if loop is not None and sig in (signal.SIGTERM, signal.SIGINT):
                loop.call_soon_threadsafe(begin_shutdown, app)
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=config.shutdown_grace_s + 5))
    server.run()


@users_app.command("add")
def users_add(
    name: str = typer.Argument(...),
    role: str = typer.Option("user", "--role", help="user or operator."),
    data_dir: Path = DataDir,
) -> None:
    """Add a user and print their API token (shown once; only its hash is stored)."""
    private_files()
    with _open_db(data_dir) as db:
        from backfill.server import auth

        _, token = auth.add_user(db, name, role)
    err.print(f"user {name} ({role}) added; their token (shown once):", highlight=False)
    print(token)


@users_app.command("list")
def users_list(data_dir: Path = DataDir) -> None:
    """The users, their roles, weights and quotas."""
    with _open_db(data_dir) as db:
        table = Table("user", "role", "weight", "max jobs", "USD/day", "USD/month")
        for u in db.list_users():
            table.add_row(u.name, u.role, f"{u.weight:g}", _opt(u.max_jobs), _opt(u.usd_per_day), _opt(u.usd_per_month))
    out.print(table)


@users_app.command("set")
def users_set(
    name: str = typer.Argument(...),
    max_rows: int | None = typer.Option(None, "--max-rows", min=1, help="The largest job, in rows.", show_default="unchanged"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="The largest max_tokens per request (and the default).", show_default="unchanged"),
    max_attempts: int | None = typer.Option(None, "--max-attempts", min=1, help="The most attempts per row.", show_default="unchanged"),
    max_in_flight: int | None = typer.Option(None, "--max-in-flight", min=1, help="The most requests in flight per job.", show_default="unchanged"),
    max_chunk_size: int | None = typer.Option(None, "--max-chunk-size", min=1, help="The largest chunk size.", show_default="unchanged"),
    default_budget_usd: float | None = typer.Option(None, "--default-budget-usd", min=0.000001, help="The budget of a job that sets none.", show_default="unchanged"),
    max_upload_bytes: int | None = typer.Option(None, "--max-upload-bytes", min=1, help="The largest upload.", show_default="unchanged"),
    upload_retention_days: float | None = typer.Option(None, "--upload-retention-days", min=0.000001, help="Uploads older than this are deleted.", show_default="unchanged"),
    max_jobs: int | None = typer.Option(None, "--max-jobs", min=0, help="Jobs of this user that run at once.", show_default="unchanged"),
    clear: list[str] = typer.Option([], "--clear", help="A cap to remove (the server's applies again), e.g. max_rows; repeatable."),
    data_dir: Path = DataDir,
) -> None:
    """Set a user's caps (what the server-wide settings are for everyone else); a running server applies them to new jobs."""
    private_files()
    given: dict[str, Any] = {
        "max_rows": max_rows, "max_tokens": max_tokens, "max_attempts": max_attempts, "max_in_flight": max_in_flight,
        "max_chunk_size": max_chunk_size, "default_budget_usd": default_budget_usd, "max_upload_bytes": max_upload_bytes,
        "upload_retention_days": upload_retention_days,
    }
    unknown = [c for c in clear if c not in Caps.model_fields and c != "max_jobs"]
    if unknown:
        raise BackfillError(f"There is no cap {unknown[0]}; use one of: {', '.join([*Caps.model_fields, 'max_jobs'])}.")
    with _open_db(data_dir) as db:
        user = db.get_user(name)
        if user is None:
            raise BackfillError(f"There is no user {name}; `backfill users list` shows them.")
        caps = user.caps.model_copy(update={k: v for k, v in given.items() if v is not None})
        caps = caps.model_copy(update={c: None for c in clear if c in Caps.model_fields})
        changes: dict[str, Any] = {"caps_json": caps.model_dump_json(exclude_none=True)}
        if max_jobs is not None or "max_jobs" in clear:
            changes["max_jobs"] = max_jobs
        db.update_user(name, **changes)
        shown = ", ".join(f"{k}={v}" for k, v in caps.model_dump(exclude_none=True).items()) or "none (the server's apply)"
    err.print(f"user {name}: caps {shown}", highlight=False)


@users_app.command("remove")
def users_remove(name: str = typer.Argument(...), data_dir: Path = DataDir) -> None:
    """Remove a user: their token stops working; their queued jobs are cancelled."""
    with _open_db(data_dir) as db:
        if not db.remove_user(name):
            raise BackfillError(f"There is no user {name}; `backfill users list` shows them.")
    err.print(f"user {name} removed")


@users_app.command("token")
def users_token(name: str = typer.Argument(...), data_dir: Path = DataDir) -> None:
    """Give a user a new token (the old one stops working) and print it once."""
    with _open_db(data_dir) as db:
        from backfill.server import auth

        token = auth.rotate_token(db, name)
    print(token)


# --- credentials ------------------------------------------------------------------------------


def _box(secret_key_file: Path | None) -> SecretBox:
    keys = read_keys(secret_key_file)
    if not keys:
        raise BackfillError(f"No secret key: set {SECRET_ENV} (or pass --secret-key-file), from `backfill credentials new-key`.")
    return SecretBox(keys)


def _prices(items: list[str]) -> dict[str, dict[str, float]]:
    prices: dict[str, dict[str, float]] = {}
    for item in items:
        model, _, rest = item.partition("=")
        parts = rest.split(",")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if not model or len(values) not in (2, 3) or any(v < 0 for v in values):
            raise BackfillError(f"--price {item!r} is not MODEL=INPUT,OUTPUT[,CACHED_INPUT] in USD per 1M tokens, e.g. gpt-4o=2.5,10.")
        prices[model] = {"input": values[0], "output": values[1], **({"cached_input": values[2]} if len(values) == 3 else {})}
    return prices


@credentials_app.command("add")
def credentials_add(
    name: str = typer.Argument(...),
    provider: str = typer.Option(..., "--provider", help="sim, openai, azure or anthropic."),
    base_url: str | None = typer.Option(None, "--base-url", help="The endpoint, e.g. https://api.openai.com/v1.", show_default="the provider's"),
    key_env: str | None = typer.Option(None, "--key-env", help="Read the provider key from this environment variable.", show_default="read from standard input"),
    no_key: bool = typer.Option(False, "--no-key", help="The endpoint takes no key."),
    show_base_url: bool = typer.Option(False, "--show-base-url", help="Users granted it see its base URL."),
    shared_cache: bool = typer.Option(False, "--shared-cache", help="One response cache for every user of it (default: one per user)."),
    price: list[str] = typer.Option([], "--price", help="MODEL=INPUT,OUTPUT[,CACHED] USD per 1M tokens, billed on this credential; repeatable."),
    grant: list[str] = typer.Option([], "--grant", help="A user who may use it (repeatable); later: `backfill credentials grant`."),
    secret_key_file: Path | None = SecretKeyFile,
    data_dir: Path = DataDir,
) -> None:
    """Add or replace a credential; its key is encrypted with the secret key and never shown again."""
    from backfill.server.auth import check_name

    private_files()
    check_name(name, "credential")
    if provider not in ("sim", "openai", "azure", "anthropic"):
        raise BackfillError(f"The provider {provider!r} is unknown; use sim, openai, azure or anthropic.")
    key: str | None = None
    if key_env is not None:
        key = os.environ.get(key_env)
        if not key:
            raise BackfillError(f"${key_env} is not set; export the key in it, or pipe the key to standard input.")
    elif not no_key:
        key = sys.stdin.readline().strip()
        if not key:
            raise BackfillError("No key on standard input; pipe it in, pass --key-env VAR, or --no-key.")
    with _open_db(data_dir, box=_box(secret_key_file) if key is not None else None) as db:
        missing = [u for u in grant if db.get_user(u) is None]
        if missing:
            raise BackfillError(f"There is no user {missing[0]}; `backfill users list` shows them.")
        db.put_credential(name, provider, base_url, key, show_base_url=show_base_url, cache_shared=shared_cache, prices=_prices(price))
        for user in grant:
            db.grant(name, user)
    who = f"granted to {', '.join(grant)}" if grant else f"grant it with `backfill credentials grant {name} USER`"
    err.print(f"credential {name} ({provider}) stored; {who}", highlight=False)


@credentials_app.command("list")
def credentials_list(data_dir: Path = DataDir) -> None:
    """The credentials, who may use them, and whether their cache is shared (never their keys)."""
    with _open_db(data_dir) as db:
        table = Table("credential", "provider", "base URL", "users", "cache", "base URL shown")
        for c in db.list_credentials():
            table.add_row(c.name, c.provider, c.base_url or "-", ", ".join(db.grantees(c.name)) or "-",
                          "shared" if c.cache_shared else "per user", "yes" if c.show_base_url else "no")
    out.print(table)


@credentials_app.command("remove")
def credentials_remove(name: str = typer.Argument(...), data_dir: Path = DataDir) -> None:
    """Remove a credential and its grants; jobs on it fail at their next start."""
    with _open_db(data_dir) as db:
        if not db.remove_credential(name):
            raise BackfillError(f"There is no credential {name}; `backfill credentials list` shows them.")
    err.print(f"credential {name} removed")


@credentials_app.command("grant")
def credentials_grant(name: str = typer.Argument(...), user: str = typer.Argument(...), data_dir: Path = DataDir) -> None:
    """Let a user name a credential in their jobs."""
    with _open_db(data_dir) as db:
        if not any(c.name == name for c in db.list_credentials()):
            raise BackfillError(f"There is no credential {name}; `backfill credentials list` shows them.")
        if db.get_user(user) is None:
            raise BackfillError(f"There is no user {user}; `backfill users list` shows them.")
        db.grant(name, user)
    err.print(f"credential {name} granted to {user}")


@credentials_app.command("revoke")
def credentials_revoke(name: str = typer.Argument(...), user: str = typer.Argument(...), data_dir: Path = DataDir) -> None:
    """Stop a user from naming a credential."""
    with _open_db(data_dir) as db:
        if not db.revoke(name, user):
            raise BackfillError(f"The credential {name} is not granted to {user}; `backfill credentials list` shows who has it.")
    err.print(f"credential {name} revoked from {user}")


@credentials_app.command("new-key")
def credentials_new_key() -> None:
    """Print a new secret key (Fernet) for BACKFILL_SECRET_KEY or --secret-key-file."""
    print(new_key())


@credentials_app.command("rotate-key")
def credentials_rotate_key(secret_key_file: Path | None = SecretKeyFile, data_dir: Path = DataDir) -> None:
    """Re-encrypt every stored provider key under the first secret key given; list the old key after the new one
    (NEW,OLD), run this with the server stopped, then keep only the new key."""
    private_files()
    box = _box(secret_key_file)
    with _open_db(data_dir, box=box) as db:
        n = db.rotate_keys(box)
    err.print(f"{n} provider key(s) re-encrypted under the first secret key; the others can be removed now.")


def _opt(value: object) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def main() -> None:
    """`python -m backfill.server`: the same commands as `backfill serve` and `backfill users`."""
    app = typer.Typer(add_completion=False, no_args_is_help=True)
    app.command("serve")(serve_command)
    app.add_typer(users_app, name="users")
    app.add_typer(credentials_app, name="credentials")
    try:
        app(standalone_mode=False)
    except BackfillError as e:
        err.print(f"error: {e}", highlight=False, markup=False)
        sys.exit(e.exit_code)


