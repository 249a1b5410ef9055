"""BERT MLM pretraining: `python -m hpctrain.bert [--config FILE] [flags]` under any launcher.
The recipe (corpus, model, task, Hugging Face export) is hpctrain/recipes/bert.py; the run is hpctrain.cli."""
import sys

from hpctrain import cli


def main(argv: list[str] | None = None) -> int:
    return cli.main("bert", argv)


if __name__ == "__main__":
    sys.exit(main())
