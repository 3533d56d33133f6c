"""``kvstore serve``: run the daemon that owns the host pool and the L3 store for this node.

    kvstore serve --layout-num-layers 32 --layout-num-kv-heads 8 --layout-head-dim 128 --layout-page-size 16
    kvstore serve --config /etc/kvstore.toml --metrics-port 9400
    kvstore serve --config /etc/kvstore.toml --print-config

Every setting can come from the TOML file, a KVSTORE_* variable or a flag
(flags override the environment, which overrides the file); see
controller/daemon/config.py and the README.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from controller.daemon.config import FIELDS

    parser.add_argument("--config", metavar="FILE.toml", help="TOML configuration file")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration (TOML) and exit")
    for spec in FIELDS:
        parser.add_argument(spec.flag, dest=f"set:{spec.name}", metavar="VALUE",
                            help=f"{spec.help} (env {spec.env})")


def run(args: argparse.Namespace) -> int:
    from controller.config import ConfigError
    from controller.daemon.config import load_config, to_toml
    from controller.daemon.runtime import AddressInUse

    flags = {name[4:]: value for name, value in vars(args).items() if name.startswith("set:")}
    try:
        config = load_config(args.config, flags=flags)
    except (ConfigError, OSError) as exc:
        print(f"kvstore serve: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_toml(config.to_toml_dict()), end="")
        return 0
    if not args.verbose:
        logging.getLogger("kvstore.daemon").setLevel(logging.INFO)
        logging.getLogger().setLevel(logging.INFO)
    from controller.daemon.server import DaemonServer

    try:
        return DaemonServer(config).run()
    except AddressInUse as exc:
        print(f"kvstore serve: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, OSError, ValueError) as exc:
        print(f"kvstore serve: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.serve_cli")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
