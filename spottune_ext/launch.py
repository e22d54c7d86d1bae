"""Runs an unmodified training script with spottune_ext imported, so that the models it builds by name
(torchvision.models.get_model, timm.create_model) can be the spottune_<arch> ones:

    python -m spottune_ext.launch [--strategy NAME] [--option KEY=VALUE ...] SCRIPT.py [ARGS ...]
    torchrun --nproc-per-node 2 -m spottune_ext.launch [...] SCRIPT.py [ARGS ...]

--strategy and --option set the builders' defaults (spottune_ext.models.registry.set_defaults); VALUE
is a Python literal (3, 0.5, [4, 5], "cpp") or else taken as a string. The script runs as __main__ with
sys.argv = [SCRIPT.py, ARGS ...] and its own directory first on sys.path, as `python SCRIPT.py` runs it.
"""
import argparse
import ast
import os
import runpy
import sys
from typing import Any, Dict, List, Optional


def _option(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a keyword argument name, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m spottune_ext.launch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", help="default strategy of the spottune_<arch> builders (spottune_ext.STRATEGIES)")
    parser.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="a default keyword argument of the builders: a strategy option (k=3) or a convert() "
                             "option (frozen_bn=train); repeatable")
    parser.add_argument("script", help="the Python script to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    return parser.parse_args(argv)


def defaults(args: argparse.Namespace) -> Dict[str, Any]:
    options = dict(args.option)
    if args.strategy is not None:
        if "strategy" in options:
            raise SystemExit("spottune_ext.launch: strategy given twice (--strategy and --option strategy=...)")
        options["strategy"] = args.strategy
    from .models import STRATEGIES
    if "strategy" in options and options["strategy"] not in STRATEGIES:
        raise SystemExit(f"spottune_ext.launch: unknown strategy {options['strategy']!r}; expected one of "
                         f"{list(STRATEGIES)}")
    return options


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if not os.path.isfile(args.script):
        raise SystemExit(f"spottune_ext.launch: no script {args.script!r}")
    import spottune_ext  # registers the builders (torchvision, and timm when it is installed)
    spottune_ext.models.registry.set_defaults(**defaults(args))
    sys.argv = [args.script, *args.args]
    # the script's folder first, as `python SCRIPT.py` has it; the launcher's own entry stays, so that
    # processes the script spawns still find spottune_ext where it was found
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
