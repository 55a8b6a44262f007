"""``linewatch dispatch CONFIG`` and ``linewatch keys generate DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``dispatch`` and ``keys`` commands."""
    dispatch = subparsers.add_parser(
        "dispatch", help="hand frames from the cameras to the inference workers"
    )
    dispatch.add_argument("config", type=Path, help="line configuration (TOML)")
    dispatch.set_defaults(func=_dispatch)

    keys = subparsers.add_parser("keys", help="CURVE keys that encrypt and authenticate sockets")
    actions = keys.add_subparsers(dest="keys_action", metavar="ACTION", required=True)
    generate = actions.add_parser("generate", help="write a server and a client key pair")
    generate.add_argument("dir", type=Path, help="folder for the key files (created 0700)")
    generate.add_argument("--force", action="store_true", help="replace existing keys")
    generate.set_defaults(func=_keys_generate)


def _dispatch(args: argparse.Namespace) -> int:
    # Imported here so that `linewatch --help` does not load ZeroMQ.
    from linewatch.config import load_config
    from linewatch.transport.dispatcher import serve

    serve(load_config(args.config).transport)
    return 0


def _keys_generate(args: argparse.Namespace) -> int:
    from linewatch.transport.security import generate_keys

    for path in generate_keys(args.dir, force=args.force):
        print(path)
    print(
        "binding hosts (dispatcher, decision) need server.key_secret and client*.key; "
        "connecting hosts need server.key and client.key_secret; "
        "set transport.curve.keys_dir to the folder"
    )
    return 0
