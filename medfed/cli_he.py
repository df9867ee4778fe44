"""``medfed he keys``: the sites' one-time CKKS setup step for ``privacy.he`` over Flower.

Registered by :mod:`medfed.cli`; kept here so the main command line stays small.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

out = Console(soft_wrap=True)


def add_parsers(sub: Any) -> None:
    he = sub.add_parser("he", help="CKKS homomorphic encryption (privacy.he) over Flower")
    hsub = he.add_subparsers(dest="he_command", required=True)
    keys = hsub.add_parser(
        "keys",
        help="write the sites' shared secret context (he-secret.ctx, 0600) and the public one",
    )
    keys.add_argument("--out", type=Path, required=True, help="folder for the two files")
    keys.add_argument(
        "--config",
        type=Path,
        default=None,
        help="run config whose privacy.he parameters to use (default: HEOptions' defaults)",
    )


def cmd_he(args: argparse.Namespace) -> int:
    from medfed.config import load_config
    from medfed.privacy.config import HEOptions
    from medfed.runtime.flower.he import NODE_CONFIG_KEY, write_keys

    options = HEOptions()
    if args.config is not None:
        he = load_config(str(args.config)).privacy.he
        if he is None:
            raise ValueError(f"{args.config}: privacy.he is not set; nothing to make keys for")
        options = he
    files = write_keys(args.out, options)
    out.print(f"wrote {files.secret} (secret, mode 0600) and {files.public} (public)")
    out.print(
        f"give {files.secret.name} to every site out of band (like SuperNode keys) and start "
        f"each SuperNode with --node-config \"{NODE_CONFIG_KEY}='PATH'\"; the server needs "
        "neither file (it receives the public context from the sites)"
    )
    return 0


HANDLERS = {"he": cmd_he}
