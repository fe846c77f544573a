#!/usr/bin/env python3
"""Run the real-time expression recognizer and publish results over ZeroMQ.

Usage:
    python run_camera.py                 # camera if present, else the built-in demo clip
    python run_camera.py --help
"""

import sys


def main() -> int:
    print("run_camera.py: the live pipeline is not implemented yet (see the live-pipeline issue)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
