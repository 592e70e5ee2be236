"""`python -m server ...` == `paratrain serve ...`."""

import argparse
import sys

from server.cli import add_arguments, run

parser = argparse.ArgumentParser(prog="paratrain serve")
add_arguments(parser)
sys.exit(run(parser.parse_args()))
