"""`python -m hpctrain.doctor [--run-dir DIR] [--entry resnet|bert] [--json] [--bytes N] [--timeout S]`."""
import sys

from hpctrain.doctor.cli import main

if __name__ == "__main__":
    sys.exit(main())
