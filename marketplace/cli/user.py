"""Client commands of the `marketplace` CLI: login, submit, status, result, cancel; `users create` for operators."""
from __future__ import annotations

import json
import math
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import requests

from marketplace.client import FINAL, ApiError, Client

CONFIG_ENV = "MARKETPLACE_CONFIG_DIR"
config_dir_option = click.option(
    # click.get_app_dir follows XDG_CONFIG_HOME (~/.config without it), as Linux tools do.
    "--config-dir", envvar=CONFIG_ENV, default=lambda: click.get_app_dir("marketplace"),
    show_default="$XDG_CONFIG_HOME/marketplace or ~/.config/marketplace", type=click.Path(file_okay=False),
    help="where credentials.json lives",
)


def credentials_path(config_dir: str) -> Path:
    return Path(config_dir).expanduser() / "credentials.json"


def save_credentials(config_dir: str, creds: dict[str, Any]) -> Path:
    """Write the tokens readable by the owner only (0600, directory 0700)."""
    path = credentials_path(config_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(creds, fh, indent=2)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT
    return path


def load_client(config_dir: str) -> tuple[Client, dict[str, Any]]:
    path = credentials_path(config_dir)
    try:
        creds = json.loads(path.read_text())
    except FileNotFoundError:
        raise click.ClickException(f"not logged in (no {path}); run `marketplace login`") from None
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read {path} ({exc}); run `marketplace login` again") from None
    if not isinstance(creds, dict) or not isinstance(creds.get("url"), str):
        raise click.ClickException(f"{path} names no API url; run `marketplace login` again")
    client = Client(creds["url"], creds.get("access_token"), refresh_token=creds.get("refresh_token"))
    return client, creds


def _persist_refresh(config_dir: str, client: Client, creds: dict[str, Any]) -> None:
    if client.token != creds.get("access_token"):
        save_credentials(config_dir, {**creds, "access_token": client.token})


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def _api_call(config_dir: str, fn):  # type: ignore[no-untyped-def]
    client, creds = load_client(config_dir)
    try:
        return fn(client)
    except ApiError as exc:
        raise click.ClickException(str(exc)) from None
    except requests.RequestException as exc:
        raise _unreachable(client.base_url, exc) from None
    finally:
        _persist_refresh(config_dir, client, creds)


def _unreachable(url: str, exc: Exception) -> click.ClickException:
    """A down server, a wrong URL or port, a URL without a scheme: one line, not a traceback."""
    reason = type(exc).__name__ if isinstance(exc, requests.ConnectionError) else str(exc)
    return click.ClickException(f"cannot reach the API at {url}: {reason}")


@click.command()
@click.option("--url", envvar="MARKETPLACE_URL", default="http://127.0.0.1:8000", show_default=True)
@click.option("--email", prompt=True)
@click.option("--password", prompt=True, hide_input=True)
@config_dir_option
def login(url: str, email: str, password: str, config_dir: str) -> None:
    """Log in and keep the tokens in the user config directory (mode 0600)."""
    client = Client(url)
    try:
        tokens = client.login(email, password)
    except ApiError as exc:
        raise click.ClickException(str(exc)) from None
    except requests.RequestException as exc:
        raise _unreachable(url, exc) from None
    path = save_credentials(config_dir, {"url": url, "email": email, "access_token": tokens["access_token"],
                                         "refresh_token": tokens["refresh_token"]})
    click.echo(f"logged in as {email}; credentials saved to {path}")


@click.command()
@config_dir_option
def logout(config_dir: str) -> None:
    """End this login (its access and refresh tokens are refused) and forget the saved credentials."""
    path = credentials_path(config_dir)
    if not path.exists():
        click.echo("not logged in")
        return
    client, creds = load_client(config_dir)
    try:
        client.logout()
    except ApiError as exc:
        if exc.status != 401:  # a 401: the session has ended already
            raise click.ClickException(str(exc)) from None
    except requests.RequestException as exc:
        raise _unreachable(client.base_url, exc) from None
    path.unlink()
    click.echo(f"logged out; removed {path}")


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _json_input(raw: str) -> Any:
    """An --input under --json: JSON or a usage error (a typo must not go up as a string)."""
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise click.BadParameter(f"{raw!r} is not JSON: {exc}", param_hint="--input") from None


@click.command()
@click.option("--model", "-m", required=True)
@click.option("--input", "-i", "inputs", multiple=True, help="an input item (a string; JSON with --json)")
@click.option("--inputs", "-I", "inputs_file", type=click.File("r", encoding="utf-8"), default=None,
              help="input items from a file, one per line (JSON Lines with --json); - reads stdin")
@click.option("--json", "as_json", is_flag=True, help="parse each --input (and --inputs line) as JSON")
@click.option("--file", "-f", "files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="upload a file and use it as an input item")
@click.option("--param", "-p", "params", multiple=True, help="model parameter k=v (v parsed as JSON if it can be)")
@click.option("--device", type=click.Choice(["any", "cpu", "gpu"]), default="any", show_default=True)
@click.option("--batch-size", type=int, default=None)
@click.option("--priority", type=click.IntRange(0, 9), default=None)
@click.option("--webhook-url", default=None)
@click.option("--idempotency-key", default=None)
@click.option("--max-cost", default=None, help="refuse the task (422) if its estimated cost is higher (credits)")
@click.option("--wait", is_flag=True, help="wait with a progress bar, then print the result")
@click.option("--timeout", type=float, default=3600.0, show_default=True, help="seconds --wait waits")
@config_dir_option
def submit(model: str, inputs: tuple[str, ...], inputs_file: Any, as_json: bool, files: tuple[str, ...],
           params: tuple[str, ...], device: str, batch_size: int | None, priority: int | None, webhook_url: str | None,
           idempotency_key: str | None, max_cost: str | None, wait: bool, timeout: float, config_dir: str) -> None:
    """Submit a task; with --wait, follow it to the end and print its result."""
    parsed: dict[str, Any] = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not k=v", param_hint="--param")
        parsed[key] = _parse_value(value)
    items: list[Any] = [_json_input(x) if as_json else x for x in inputs]
    if inputs_file is not None:
        items += _read_items(inputs_file, as_json=as_json)

    def run(client: Client) -> None:
        for path in files:
            items.append({"file": client.upload(path)["id"]})
        if not items:
            raise click.UsageError("give at least one --input, --inputs or --file")
        task = client.submit(model, items, params=parsed, device=device, batch_size=batch_size, priority=priority,
                             webhook_url=webhook_url, max_cost=max_cost, idempotency_key=idempotency_key)
        if not wait:
            _echo_json(task)
            return
        try:
            doc = _wait_with_progress(client, task["id"], total=task["subtasks"], timeout=timeout)
        except TimeoutError as exc:
            raise click.ClickException(f"{exc}; it goes on: marketplace status {task['id']}") from None
        if doc["status"] != "Done":
            _echo_json(doc)
            raise click.ClickException(f"task {doc['id']} ended {doc['status']}: {doc.get('error')} "
                                       f"(the outputs it has: marketplace result --partial {doc['id']})")
        _echo_json(client.result(task["id"]))

    _api_call(config_dir, run)


def _read_items(fh: Any, *, as_json: bool) -> list[Any]:
    """One item per non-blank line; with `as_json` each line must be JSON (a bad one names its line,
    rather than going up as a string the model would then reject or, worse, accept)."""
    items: list[Any] = []
    for number, line in enumerate(fh, start=1):
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if not as_json:
            items.append(text)
            continue
        try:
            items.append(json.loads(text))
        except ValueError as exc:
            raise click.BadParameter(f"line {number} is not JSON: {exc}", param_hint="--inputs") from None
    return items


def _wait_with_progress(client: Client, task_id: str, *, total: int, timeout: float) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # The bar goes to stderr so that stdout stays the result JSON.
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        bar = progress.add_task(f"task {task_id[:8]}", total=total or 1)

        def update(doc: dict[str, Any]) -> None:
            p = doc["progress"]
            progress.update(bar, completed=p["done"] + p["failed"], total=p["total"] or 1,
                            description=f"task {task_id[:8]} {doc['status']}")

        return client.wait(task_id, timeout=timeout, on_progress=update)


@click.command("list")
@click.option("--status", "status_filter", type=click.Choice(["Created", "Scheduled", "InProgress", "Done", "Failed",
                                                              "Cancelled"]), default=None, help="only tasks in this status")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--cursor", default=None, help="the next page: the cursor a previous page printed")
@click.option("--json", "as_json", is_flag=True, help="print the page as JSON")
@config_dir_option
def list_tasks(status_filter: str | None, limit: int, cursor: str | None, as_json: bool, config_dir: str) -> None:
    """List your tasks, newest first."""
    page = _api_call(config_dir, lambda c: c.list(status=status_filter, limit=limit, cursor=cursor))
    if as_json:
        _echo_json(page)
        return
    from rich.console import Console
    from rich.table import Column, Table

    table = Table(Column("id", no_wrap=True, min_width=36), "status", "model", "progress", "cost",
                  Column("created (UTC)", no_wrap=True))
    for task in page["tasks"]:
        p = task["progress"]
        progress = f"{p['done']}/{p['total']}" + (f" ({p['failed']} failed)" if p["failed"] else "")
        # An active task's cost is what it has spent so far: its estimate goes alongside.
        cost = task["cost"] if task["status"] in FINAL else f"{task['cost']} (est. {task['estimated_cost']})"
        table.add_row(task["id"], task["status"], task["model"], progress, cost, task["created_at"][:19].replace("T", " "))
    console = Console()
    if not console.is_terminal:  # piped: full ids on one line each, whatever the 80 columns assumed
        console = Console(width=160)
    console.print(table)
    if page.get("next_cursor"):
        again = f"--status {status_filter} " if status_filter else ""
        console.print(f"more: marketplace list {again}--limit {limit} --cursor {page['next_cursor']}", soft_wrap=True)


@click.command()
@click.argument("task_id")
@config_dir_option
def status(task_id: str, config_dir: str) -> None:
    """Print a task's status document."""
    _echo_json(_api_call(config_dir, lambda c: c.get(task_id)))


@click.command()
@click.argument("task_id")
@click.option("--partial", is_flag=True, help="what the task has at any status: null for the items of subtasks "
                                             "that are not Done, listed under `missing`")
@config_dir_option
def result(task_id: str, partial: bool, config_dir: str) -> None:
    """Print a Done task's result (--partial: what any task has so far)."""
    _echo_json(_api_call(config_dir, lambda c: c.result(task_id, partial=partial)))


@click.command()
@click.argument("task_id")
@config_dir_option
def cancel(task_id: str, config_dir: str) -> None:
    """Cancel an active task."""
    _echo_json(_api_call(config_dir, lambda c: c.cancel(task_id)))


@click.group()
def users() -> None:
    """User accounts (operators; talks to the database directly)."""


@users.command("create")
@click.option("--email", required=True)
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
@click.option("--admin", is_flag=True, help="give the account the admin role")
def users_create(email: str, password: str, admin: bool) -> None:
    """Create an account (prompts for the password when --password is absent)."""
    from pydantic import ValidationError

    from marketplace.infra.db import session_scope
    from marketplace.infra.errors import MarketplaceError
    from marketplace.users.schemas import Credentials
    from marketplace.users.service import create_user

    try:  # the rules REST and gRPC registrations follow
        creds = Credentials(email=email, password=password)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        raise click.BadParameter(error["msg"], param_hint=f"--{error['loc'][0]}") from None
    try:
        with session_scope() as session:
            user = create_user(session, email=str(creds.email), password=password, role="admin" if admin else "user")
            uid, role = str(user.id), user.role
    except MarketplaceError as exc:
        raise click.ClickException(exc.detail) from None
    click.echo(f"created {role} {email} ({uid})")


def _override(kind: type) -> click.ParamType:
    """A quota override: a number, or `default` for the setting's (stored as NULL); converted to
    ("set", value) so that an option left out (None) differs from one set to the default."""

    class Override(click.ParamType):
        name = f"{kind.__name__.upper()}|default"

        def convert(self, value: Any, param: Any, ctx: Any) -> Any:
            if isinstance(value, tuple):
                return value
            if value == "default":
                return ("set", None)
            try:
                parsed = kind(value)
            except (ValueError, ArithmeticError):
                self.fail(f"{value!r} is not a number or 'default'", param, ctx)
            top = 2**31 - 1 if kind is int else 10**12  # an INTEGER column; credits; a share
            if isinstance(parsed, Decimal | float) and not math.isfinite(parsed) or not 0 <= parsed <= top:
                self.fail(f"must be between 0 and {top}", param, ctx)
            return ("set", parsed)

    return Override()


@users.command("list")
@click.option("--json", "as_json", is_flag=True)
def users_list(as_json: bool) -> None:
    """Every account: role, balance and quota overrides (blank: the settings' default)."""
    from sqlalchemy import select

    from marketplace.infra.db import session_scope
    from marketplace.users.models import User

    with session_scope() as session:
        rows = [{"id": str(u.id), "email": u.email, "role": u.role, "balance": str(u.balance),
                 "max_active_tasks": u.max_active_tasks, "max_items_per_task": u.max_items_per_task,
                 "daily_spend_limit": None if u.daily_spend_limit is None else str(u.daily_spend_limit),
                 "share": u.share, "max_running_subtasks": u.max_running_subtasks, "provider": u.provider,
                 "created_at": u.created_at.isoformat()}
                for u in session.scalars(select(User).order_by(User.created_at))]
    if as_json:
        _echo_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("email", "role", "balance", "max active", "max items", "daily spend", "share", "max running",
                  "created (UTC)")
    for r in rows:
        table.add_row(r["email"], r["role"], r["balance"], *(str(r[k] if r[k] is not None else "") for k in (
                      "max_active_tasks", "max_items_per_task", "daily_spend_limit", "share", "max_running_subtasks")),
                      r["created_at"][:19].replace("T", " "))
    Console(width=160).print(table)


@users.command("set")
@click.argument("email")
@click.option("--role", type=click.Choice(["user", "admin", "auditor"]), default=None,
              help="auditor: reads the whole audit log (records, checkpoints) and nothing else")
@click.option("--max-active-tasks", type=_override(int), default=None)
@click.option("--max-items-per-task", type=_override(int), default=None)
@click.option("--daily-spend-limit", type=_override(Decimal), default=None)
@click.option("--share", type=_override(float), default=None,
              help="weight in the fair sharing of compute (default 1: a user with 3 gets three times the slots)")
@click.option("--max-running-subtasks", type=_override(int), default=None,
              help="cap on the user's subtasks in flight per queue (default: the setting's, none as shipped)")
@click.option("--provider/--no-provider", default=None,
              help="the provider role: the account may enroll compute nodes and earns from their work")
@click.option("--min-redundancy", type=_override(int), default=None,
              help="verified results: the least redundancy of the account's tasks, 1-5 (default: the setting's)")
def users_set(email: str, role: str | None, max_active_tasks: Any, max_items_per_task: Any,
              daily_spend_limit: Any, share: Any, max_running_subtasks: Any, provider: bool | None,
              min_redundancy: Any = None) -> None:
    """Change an account's role, fair share or quota overrides (a number, or `default` for the setting's)."""
    from marketplace.infra.db import session_scope
    from marketplace.infra.errors import MarketplaceError
    from marketplace.users.service import update_user

    changes: dict[str, Any] = {"role": role} if role else {}
    for name, value in (("max_active_tasks", max_active_tasks), ("max_items_per_task", max_items_per_task),
                        ("daily_spend_limit", daily_spend_limit), ("max_running_subtasks", max_running_subtasks)):
        if value is not None:
            changes[name] = value[1]
    if share is not None:
        if share[1] is not None and share[1] <= 0:
            raise click.BadParameter("must be greater than 0", param_hint="--share")
        changes["share"] = 1.0 if share[1] is None else share[1]
    if provider is not None:
        changes["provider"] = provider
    if min_redundancy is not None:
        if min_redundancy[1] is not None and not 1 <= min_redundancy[1] <= 5:
            raise click.BadParameter("must be between 1 and 5", param_hint="--min-redundancy")
        changes["min_redundancy"] = min_redundancy[1]
    if not changes:
        raise click.UsageError("nothing to change: give --role or a quota option")
    try:
        with session_scope() as session:
            update_user(session, email=email, actor="operator:cli", changes=changes)
    except MarketplaceError as exc:
        raise click.ClickException(exc.detail) from None
    click.echo(f"updated {email}: " + ", ".join(f"{k}={'default' if v is None else v}" for k, v in changes.items()))


COMMANDS = [login, logout, submit, list_tasks, status, result, cancel, users]
