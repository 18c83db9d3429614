"""Commands of the shared service: `backfill serve` and `backfill users add|list|remove|token`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from backfill.errors import BackfillError
from backfill.server import logs
from backfill.server.db import ServerDB

DataDir = typer.Option(Path("backfill-data"), "--data-dir", envvar="BACKFILL_DATA_DIR", help="Where the server keeps everything (protect it: it holds the provider keys).")
out = Console()
err = Console(stderr=True)

users_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Manage the users of a `backfill serve` data directory.")


def serve_command(
    data_dir: Path = DataDir,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8080, "--port"),
    allow_dir: list[Path] = typer.Option([], "--allow-dir", help="A directory jobs may read input paths from (repeatable)."),
    max_jobs: int = typer.Option(16, "--max-jobs", help="Jobs running at once, all users together."),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Run the shared service: API (/docs), dashboard (/), metrics (/metrics) and the job workers."""
    # The web stack is imported here, not at the top, so every other `backfill` command starts fast.
    import uvicorn

    from backfill.server.app import ServerConfig, create_app

    logs.configure(log_level)
    for d in allow_dir:
        if not d.is_dir():
            raise BackfillError(f"--allow-dir {d} is not a directory; create it or fix the path.")
    config = ServerConfig(data_dir=data_dir.resolve(), allow_dirs=[d.resolve() for d in allow_dir], max_running=max_jobs)
    db = ServerDB(config.data_dir / "server.db")
    if not any(u.is_operator for u in db.list_users()):
        err.print(f"No operator yet: run `backfill users add NAME --role operator --data-dir {data_dir}`.", highlight=False)
    db.close()
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), host=host, port=port, log_config=None, timeout_graceful_shutdown=config.shutdown_grace_s + 5)
    )
    server.run()


@users_app.command("add")
def users_add(
    name: str = typer.Argument(...),
    role: str = typer.Option("user", "--role", help="user or operator."),
    data_dir: Path = DataDir,
) -> None:
    """Add a user and print their API token (shown once; only its hash is stored)."""
    db = ServerDB(data_dir / "server.db")
    try:
        from backfill.server import auth

        _, token = auth.add_user(db, name, role)
    finally:
        db.close()
    err.print(f"user {name} ({role}) added; their token (shown once):", highlight=False)
    print(token)


@users_app.command("list")
def users_list(data_dir: Path = DataDir) -> None:
    """The users, their roles, weights and quotas."""
    db = ServerDB(data_dir / "server.db")
    try:
        table = Table("user", "role", "weight", "max jobs", "USD/day", "USD/month")
        for u in db.list_users():
            table.add_row(u.name, u.role, f"{u.weight:g}", _opt(u.max_jobs), _opt(u.usd_per_day), _opt(u.usd_per_month))
    finally:
        db.close()
    out.print(table)


@users_app.command("remove")
def users_remove(name: str = typer.Argument(...), data_dir: Path = DataDir) -> None:
    """Remove a user: their token stops working; their queued jobs are cancelled."""
    db = ServerDB(data_dir / "server.db")
    try:
        if not db.remove_user(name):
            raise BackfillError(f"There is no user {name}; `backfill users list` shows them.")
    finally:
        db.close()
    err.print(f"user {name} removed")


@users_app.command("token")
def users_token(name: str = typer.Argument(...), data_dir: Path = DataDir) -> None:
    """Give a user a new token (the old one stops working) and print it once."""
    db = ServerDB(data_dir / "server.db")
    try:
        from backfill.server import auth

        token = auth.rotate_token(db, name)
    finally:
        db.close()
    print(token)


def _opt(value: object) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def main() -> None:
    """`python -m backfill.server`: the same commands as `backfill serve` and `backfill users`."""
    app = typer.Typer(add_completion=False, no_args_is_help=True)
    app.command("serve")(serve_command)
    app.add_typer(users_app, name="users")
    try:
        app(standalone_mode=False)
    except BackfillError as e:
        err.print(f"error: {e}", highlight=False, markup=False)
        sys.exit(e.exit_code)


