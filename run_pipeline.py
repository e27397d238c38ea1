#!/usr/bin/env python3
"""Entry point: python run_pipeline.py COMMAND [options] (see README)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
