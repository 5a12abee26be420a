#!/usr/bin/env python3
"""Enhance videos with VEnhancer. Run with --help for the flags; see venhancer/cli.py."""

import sys

try:
    from venhancer.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing the command line
    sys.stderr.write("error: interrupted\n")
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
