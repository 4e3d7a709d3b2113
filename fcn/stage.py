"""What every stage script shares: logging set-up, dying with the DVC process that runs it, and
turning input errors into one line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from fcn.errors import FcnError, one_line
from fcn.lifetime import watch_owners

log = logging.getLogger("fcn")


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: %(default)s)")
    return parser


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main: input errors become one clear line on stderr and exit code 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    watch_owners()  # under DVC: die with it (fcn.lifetime)
    try:
        main()
    except FcnError as exc:
        log.error("%s", one_line(exc))
        sys.exit(1)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)
