#!/usr/bin/env python3
"""Enhance videos with VEnhancer. Run with --help for the flags; see venhancer/cli.py."""

import sys

from venhancer.cli import main

if __name__ == "__main__":
    sys.exit(main())
