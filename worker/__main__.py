"""`python -m worker ...` == `paratrain worker ...`."""

import argparse
import sys

from worker.cli import add_arguments, run

parser = argparse.ArgumentParser(prog="paratrain worker")
add_arguments(parser)
sys.exit(run(parser.parse_args()))
