"""``megatron-vr1 config show --recipe NAME [--set a.b=c ...]``: print the resolved RunConfig."""

from __future__ import annotations

import argparse
import sys


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True,
                        help="a built-in recipe name (e.g. tiny_cpu_demo) or path/to/file.py:function")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one field, type-checked (repeatable), e.g. --set grpo.beta=0.2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="config_action", metavar="<action>", required=True)
    show = sub.add_parser("show", help="print the resolved configuration as JSON")
    add_recipe_arguments(show)
    sub.add_parser("list", help="list the built-in recipes")


def run(args: argparse.Namespace) -> int:
    from megatron_vr1.config import ConfigError, available_recipes, load_recipe

    if args.config_action == "list":
        for name in available_recipes():
            print(name)
        return 0
    try:
        cfg = load_recipe(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"megatron-vr1 config: {e}", file=sys.stderr)
        return 2
    print(cfg.to_json())
    return 0
