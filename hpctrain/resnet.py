"""ResNet image classification: `python -m hpctrain.resnet [--config FILE] [flags]` under any launcher.
The recipe (data, model, task) is hpctrain/recipes/resnet.py; the run is hpctrain.cli."""
import sys

from hpctrain import cli


def main(argv: list[str] | None = None) -> int:
    return cli.main("resnet", argv)


if __name__ == "__main__":
    sys.exit(main())
