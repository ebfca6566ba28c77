"""`marketplace audit ...`: verify the chain, print the public key."""
from __future__ import annotations

import json
import sys

import click


@click.group("audit")
def audit() -> None:
    """Tamper-evident audit log."""


@audit.command("verify")
@click.option("--chain-pending/--no-chain-pending", default=True, show_default=True,
              help="first move buffered subtask records into the chain")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def verify(chain_pending: bool, as_json: bool) -> None:
    """Walk the chain; exit 1 and name the first bad sequence number when it is broken."""
    from marketplace.audit import service
    from marketplace.infra.db import session_scope

    if chain_pending:
        service.chain_pending()
    with session_scope() as session:
        report = service.verify_chain(session)
    if as_json:
        click.echo(json.dumps(report))
    elif report["valid"]:
        click.echo(f"audit chain valid: {report['length']} records, head {report['head']}")
    else:
        click.echo(f"audit chain INVALID: first bad seq {report['first_bad_seq']}: {report['reason']} "
                   f"({report['length']} records verified before it)")
    sys.exit(0 if report["valid"] else 1)


@audit.command("public-key")
def public_key() -> None:
    """Print the Ed25519 public key (PEM) that verifies record signatures."""
    from marketplace.audit import signing

    click.echo(signing.public_key_pem(), nl=False)
