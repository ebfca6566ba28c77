"""`marketplace audit ...`: verify the chain (as the operator, or from outside with the public key
alone), print the public key, save the published checkpoints, check a task's receipt."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click


@click.group("audit")
def audit() -> None:
    """Tamper-evident audit log."""


def _public_key(path: str) -> Any:
    from marketplace.audit.hashing import load_public_key

    try:
        return load_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--public-key") from exc


@audit.command("verify")
@click.option("--public-key", "public_key_file", type=click.Path(exists=True, dir_okay=False),
              help="verify from outside: the Ed25519 public key (PEM) is all the verifier trusts")
@click.option("--url", help="the API to page the records from (GET /v1/audit/records), with --token")
@click.option("--token", envvar="MARKETPLACE_AUDIT_TOKEN", help="an admin's or auditor's access token "
              "(or MARKETPLACE_AUDIT_TOKEN)")
@click.option("--database-url", help="read the records with SELECT only from this database instead "
              "(neither given: MARKETPLACE_DATABASE_URL's)")
@click.option("--checkpoints", "checkpoint_sources", multiple=True,
              help="a folder of saved checkpoints (pull-checkpoints) or an API URL; repeatable")
@click.option("--every-signature", is_flag=True,
              help="check every record's signature, also where a matching checkpoint's signature covers it")
@click.option("--chain-pending/--no-chain-pending", default=True, show_default=True,
              help="(operator mode) first move buffered subtask records into the chain")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def verify(public_key_file: str | None, url: str | None, token: str | None, database_url: str | None,
           checkpoint_sources: tuple[str, ...], every_signature: bool, chain_pending: bool, as_json: bool) -> None:
    """Walk the chain; exit 1 and name the first bad sequence number when it is broken.

    With --public-key and --url or --database-url, every hash, link and signature is checked here,
    with that key alone (no settings, no secrets), and the chain against every checkpoint given:
    an edit, a deleted tail, a re-signed rewrite and a fork are each named. Without them, the
    operator's check with this installation's settings."""
    if public_key_file or url or database_url or checkpoint_sources:
        _verify_outside(public_key_file, url, token, database_url, checkpoint_sources, every_signature, as_json)
        return
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


def _verify_outside(public_key_file: str | None, url: str | None, token: str | None, database_url: str | None,
                    checkpoint_sources: tuple[str, ...], every_signature: bool, as_json: bool) -> None:
    from marketplace.audit import sources
    from marketplace.audit.verifier import BadCheckpoint, ChainVerifier

    if not public_key_file:
        raise click.UsageError("--public-key FILE is required to verify from outside")
    if url and database_url:
        raise click.UsageError("give one of --url API_URL or --database-url URL")
    if not url and not database_url:  # an operator's shortcut: this installation's database, still SELECT only
        from marketplace.settings import get_settings

        database_url = get_settings().database_url
    key = _public_key(public_key_file)
    try:
        checkpoints = [cp for where in checkpoint_sources for cp in sources.load_checkpoints(where)]
        verifier = ChainVerifier(key, checkpoints, every_signature=every_signature)
        records = sources.api_records(url, token=token) if url else sources.database_records(str(database_url))
        try:
            for record in records:
                if not verifier.feed(record):
                    break
        finally:
            records.close()  # a verdict before the end: the read (its transaction) ends now
    except (sources.SourceError, BadCheckpoint) as exc:
        click.echo(f"audit verify: {exc}", err=True)
        sys.exit(2)
    verdict = verifier.finish()
    if as_json:
        click.echo(json.dumps(verdict.as_dict()))
    elif verdict.valid:
        click.echo(f"audit chain valid: {verdict.length} records, head {verdict.head}, Merkle root {verdict.root}; "
                   f"{verdict.checkpoints_matched} of {verdict.checkpoints} checkpoints matched")
    else:
        click.echo(f"audit chain INVALID: first bad seq {verdict.first_bad_seq}: {verdict.reason} "
                   f"({verdict.length} records verified before it)")
    sys.exit(0 if verdict.valid else 1)


@audit.command("public-key")
def public_key() -> None:
    """Print the Ed25519 public key (PEM) that verifies record and checkpoint signatures (publish it)."""
    from marketplace.audit import signing

    click.echo(signing.public_key_pem(), nl=False)


@audit.command("pull-checkpoints")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--url", help="the API (GET /v1/audit/checkpoints; no token needed)")
@click.option("--s3", "bucket", help="an S3 bucket the checkpoints are published to (audit/checkpoints/)")
@click.option("--endpoint-url", help="with --s3: the S3 endpoint (MinIO, ...); AWS credentials from the environment")
@click.option("--store", "configured", is_flag=True, help="this installation's object store (its settings)")
def pull_checkpoints(folder: str, url: str | None, bucket: str | None, endpoint_url: str | None,
                     configured: bool) -> None:
    """Save the published checkpoints into FOLDER, outside the operator's reach; run it regularly.
    A checkpoint is never overwritten: a different one of a size already saved is kept beside it."""
    from marketplace.audit import sources

    if sum(map(bool, (url, bucket, configured))) != 1:
        raise click.UsageError("give one of --url API_URL, --s3 BUCKET or --store")
    try:
        if url:
            found = sources.api_checkpoints(url)
        else:
            from marketplace.infra.storage import S3Store, build_store

            store = S3Store(endpoint_url=endpoint_url, bucket=str(bucket)) if bucket else build_store()
            found = sources.store_checkpoints(store)
        new, warnings = sources.save_checkpoints(found, Path(folder))
    except Exception as exc:  # network, S3, JSON: said in one line, exit 2
        click.echo(f"audit pull-checkpoints: {exc}", err=True)
        sys.exit(2)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    total = len(list(Path(folder).glob("*.json")))
    click.echo(f"{new} new checkpoints saved in {folder} ({total} in all)")
    sys.exit(1 if any("fork" in w for w in warnings) else 0)


@audit.command("check-receipt")
@click.argument("receipt_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--public-key", "public_key_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="the platform's published Ed25519 public key (PEM)")
def check_receipt(receipt_file: str, public_key_file: str) -> None:
    """Check a task's receipt offline: its completion record, signed, is in the tree a signed
    checkpoint names. Needs nothing but the file and the key; exit 1 if it does not hold."""
    from marketplace.audit.verifier import receipt_problem

    raw = Path(receipt_file).read_bytes()
    problem = receipt_problem(raw, _public_key(public_key_file))
    if problem:
        click.echo(f"receipt INVALID: {problem}")
        sys.exit(1)
    doc = json.loads(raw)
    record, cp = doc["record"], doc["checkpoint"]
    click.echo(f"receipt valid: task {doc['task_id']} {record['action']} is record {record['seq']} "
               f"(at {record['ts']}), in the audit log of {cp['size']} records signed at {cp['time']} "
               f"(root {cp['root']})")
