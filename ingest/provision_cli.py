"""``provision``: manage device and service MQTT accounts (see ingest.provisioning).

Passwords are printed once, on add/rotate, or written to a 0600 file with ``--credentials-out``;
they are never stored in clear. Errors are one line on stderr with exit code 2, and change nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg

from ingest import provisioning as prov
from ingest.db import Session
from ingest.dbconfig import ConfigError, add_db_arguments, connect_from_args
from ingest.files import write_atomic
from ingest.hashing import DEFAULT_ALGORITHM, HashAlgorithm


class UsageError(Exception):
    pass


def _file_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0640") from None
    if mode & ~0o777 or mode & 0o007:
        raise argparse.ArgumentTypeError(f"{text} would let any local user read broker secrets; use 0640 or 0600")
    return mode


def _algorithm(spec: str | None) -> HashAlgorithm:
    if spec is None:
        return DEFAULT_ALGORITHM
    try:
        return HashAlgorithm.parse(spec)
    except ValueError as exc:
        raise UsageError(f"--hash: {exc}") from None


def _emit_credentials(args: argparse.Namespace, creds: list[prov.Credentials]) -> None:
    records = [
        {
            "device_id": c.device_id,
            "username": c.username,
            "password": c.password,
            "hash_algorithm": c.hash_algorithm,
        }
        for c in creds
    ]
    if args.credentials_out:
        write_atomic(args.credentials_out, json.dumps(records, indent=2) + "\n", 0o600)
        shown = [{k: v for k, v in r.items() if k != "password"} for r in records]
        if args.json:
            print(json.dumps({"written": str(args.credentials_out), "accounts": shown}))
        else:
            print(f"{len(records)} credential(s) written to {args.credentials_out} (mode 0600)")
        return
    if args.json:
        print(json.dumps(records if len(records) != 1 else records[0]))
        return
    for r in records:
        print(f"username: {r['username']}\npassword: {r['password']}")
    print("The password is shown once and is not stored; keep it now.", file=sys.stderr)


def _check_credentials_out(args: argparse.Namespace) -> None:
    # Checked before the database is touched: a bad path must not leave accounts whose passwords are lost.
    out: Path | None = args.credentials_out
    if out is not None and not out.parent.is_dir():
        raise UsageError(f"--credentials-out: directory {out.parent} does not exist")


def cmd_add(session: Session, args: argparse.Namespace) -> int:
    _check_credentials_out(args)
    creds = prov.add_devices(session, args.device_ids, name=args.name, type=args.type, algorithm=_algorithm(args.hash))
    _emit_credentials(args, creds)
    return 0


def cmd_add_service(session: Session, args: argparse.Namespace) -> int:
    _check_credentials_out(args)
    creds = prov.add_service(
        session,
        args.username,
        publish=args.publish,
        subscribe=args.subscribe,
        algorithm=_algorithm(args.hash),
    )
    _emit_credentials(args, [creds])
    return 0


def cmd_ensure_service(session: Session, args: argparse.Namespace) -> int:
    path: Path = args.account_password_file
    try:
        password = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"--account-password-file: cannot read {path}: {exc.strerror}") from None
    changed = prov.ensure_service(
        session,
        args.username,
        password,
        publish=args.publish,
        subscribe=args.subscribe,
        algorithm=_algorithm(args.hash),
        check_only=args.check,
    )
    if args.check:
        print(
            json.dumps({"username": args.username, "up_to_date": not changed})
            if args.json
            else f"{args.username}: {'needs an update' if changed else 'up to date'}"
        )
    else:
        print(
            json.dumps({"username": args.username, "changed": changed})
            if args.json
            else f"{args.username}: {'updated' if changed else 'unchanged'}"
        )
    return 0


def cmd_list(session: Session, args: argparse.Namespace) -> int:
    accounts = prov.list_accounts(session, kind=None if args.all else "device")
    if args.json:
        print(json.dumps([a.to_json() for a in accounts]))
        return 0
    print(f"{'USERNAME':<24} {'KIND':<8} {'ENABLED':<8} {'TYPE':<12} LAST SEEN")
    for a in accounts:
        seen = a.last_seen_at.isoformat(timespec="seconds") if a.last_seen_at else "-"
        print(f"{a.username:<24} {a.kind:<8} {'yes' if a.enabled else 'no':<8} {a.type or '-':<12} {seen}")
    return 0


def cmd_show(session: Session, args: argparse.Namespace) -> int:
    account = prov.show(session, args.username)
    if args.json:
        print(json.dumps(account.to_json()))
        return 0
    for key, value in account.to_json().items():
        if key != "acl":
            print(f"{key}: {value}")
    print("acl (in order, first match wins):")
    for rule in account.acl:
        print(f"  {rule.permission:<5} {rule.action:<9} {rule.topic}")
    return 0


def cmd_rotate(session: Session, args: argparse.Namespace) -> int:
    _check_credentials_out(args)
    creds = prov.rotate(session, args.username, algorithm=_algorithm(args.hash) if args.hash else None)
    _emit_credentials(args, [creds])
    return 0


def _toggle(enabled: bool) -> Callable[[Session, argparse.Namespace], int]:
    def run(session: Session, args: argparse.Namespace) -> int:
        changed = prov.set_enabled(session, args.username, enabled)
        state = "enabled" if enabled else "disabled"
        if args.json:
            print(json.dumps({"username": args.username, "state": state, "changed": changed}))
        else:
            print(f"{args.username}: {state}" + ("" if changed else " (already)"))
        if not enabled and changed:
            print(
                "Mosquitto hosts need `provision export-mosquitto` (the deploy does it) to refuse it.",
                file=sys.stderr,
            )
        return 0

    return run


def cmd_remove(session: Session, args: argparse.Namespace) -> int:
    if not args.yes:
        raise UsageError(f"removing {args.username!r} deletes its account and ACL for good; add --yes")
    prov.remove(session, args.username)
    print(json.dumps({"removed": args.username}) if args.json else f"{args.username}: removed")
    return 0


def cmd_export_mosquitto(session: Session, args: argparse.Namespace) -> int:
    passwd, acl = prov.export_mosquitto(session)
    if args.passwords is None and args.acl is None:
        sys.stdout.write(acl)
        return 0
    if args.passwords is None or args.acl is None:
        raise UsageError("give both --passwords and --acl (or neither to print the ACL)")
    for target in (args.passwords, args.acl):
        if not target.parent.is_dir():
            raise UsageError(f"directory {target.parent} does not exist")
    mode: int = args.mode
    changed = [str(p) for p, text in ((args.passwords, passwd), (args.acl, acl)) if write_atomic(p, text, mode)]
    if args.json:
        print(json.dumps({"changed": changed, "accounts": passwd.count("\n")}))
    else:
        print(f"{'updated ' + ', '.join(changed) if changed else 'unchanged'} ({passwd.count(chr(10))} accounts)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="provision",
        description="Manage device and service MQTT accounts: credentials hashed as EMQX verifies them, "
        "ACL rows that confine each device to its own topics, and Mosquitto files rendered from the same rows.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[Session, argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        add_db_arguments(p)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(handler=handler)
        return p

    hash_help = (
        f"hash algorithm as EMQX names it (default {DEFAULT_ALGORITHM.spec}): plain, md5, sha, sha256, sha512 "
        "with :prefix|:suffix|:disable; pbkdf2:MAC:ITERATIONS[:DKLEN]; bcrypt[:ROUNDS]"
    )
    creds_help = "write the new credentials as JSON to this file (mode 0600) instead of printing them"

    p = command("add", cmd_add, "provision one or more devices; prints each password once")
    p.add_argument("device_ids", nargs="+", metavar="DEVICE_ID", help="external id, e.g. ESP32_001")
    p.add_argument("--name", default="", help="human-readable name")
    p.add_argument("--type", default="generic", help="device type, e.g. thermalog")
    p.add_argument("--hash", help=hash_help)
    p.add_argument("--credentials-out", type=Path, help=creds_help)

    p = command("add-service", cmd_add_service, "create a non-device account (ingest service, operator)")
    p.add_argument("username")
    p.add_argument("--publish", action="append", default=[], metavar="TOPIC", help="allowed publish filter")
    p.add_argument("--subscribe", action="append", default=[], metavar="TOPIC", help="allowed subscribe filter")
    p.add_argument("--hash", help=hash_help)
    p.add_argument("--credentials-out", type=Path, help=creds_help)

    p = command(
        "ensure-service",
        cmd_ensure_service,
        "create or update a service account with a password you keep (idempotent; for deploys)",
    )
    p.add_argument("username")
    p.add_argument(
        "--account-password-file",
        type=Path,
        required=True,
        help="file holding the account's MQTT password (never on the command line)",
    )
    p.add_argument("--publish", action="append", default=[], metavar="TOPIC", help="allowed publish filter")
    p.add_argument("--subscribe", action="append", default=[], metavar="TOPIC", help="allowed subscribe filter")
    p.add_argument("--hash", help=hash_help)
    p.add_argument("--check", action="store_true", help="only report whether an update is needed; write nothing")

    p = command("list", cmd_list, "list devices (with --all, service accounts too)")
    p.add_argument("--all", action="store_true", help="include service accounts")

    p = command("show", cmd_show, "show one account and its ACL")
    p.add_argument("username")

    p = command("rotate", cmd_rotate, "issue a new password; the old one stops working at once")
    p.add_argument("username")
    p.add_argument("--hash", help=hash_help + "; default: keep the account's algorithm")
    p.add_argument("--credentials-out", type=Path, help=creds_help)

    p = command("disable", _toggle(False), "refuse the account at the broker (reversible)")
    p.add_argument("username")
    p = command("enable", _toggle(True), "accept a disabled account again")
    p.add_argument("username")

    p = command("remove", cmd_remove, "delete an account, its ACL and device row (telemetry is kept)")
    p.add_argument("username")
    p.add_argument("--yes", action="store_true", help="confirm the deletion")

    p = command(
        "export-mosquitto",
        cmd_export_mosquitto,
        "render Mosquitto's password and ACL files from the database (written atomically, only if changed)",
    )
    p.add_argument("--passwords", type=Path, help="password file to write")
    p.add_argument("--acl", type=Path, help="ACL file to write")
    p.add_argument("--mode", type=_file_mode, default=0o640, help="octal file mode of both files (default 0640)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        session = connect_from_args(args)
    except ConfigError as exc:
        print(f"provision {args.command}: error: {exc}", file=sys.stderr)
        return 2
    try:
        result: int = args.handler(session, args)
        return result
    except (prov.ProvisioningError, UsageError) as exc:
        print(f"provision {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = " (did you run `ingest migrate`?)" if isinstance(exc, psycopg.errors.UndefinedTable) else ""
        print(f"provision {args.command}: database error: {first}{hint}", file=sys.stderr)
        return 1
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main())
